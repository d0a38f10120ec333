"""Shared by the serve tests: running an app on a loopback port, raw HTTP posts, the tenants' recipe."""

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from types import SimpleNamespace

import openai
import uvicorn

TENANTS = {"low": ("lowrank", "1/16"), "bit": ("bitdelta", "1/8")}
PROMPTS = {"base": "12+35=", "low": "7+8=", "bit": "the quick brown fox"}
MAX_LEN = 64
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


@contextmanager
def running(app, api_key: str = "x"):
    """Serve `app` with uvicorn on a free loopback port; yields (url, client, scheduler)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="critical"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=60)
    try:
        yield SimpleNamespace(url=url, port=port, client=client, scheduler=app.state.scheduler)
    finally:
        srv.should_exit = True
        thread.join(10)
        sock.close()


def request(url, data: bytes | None = None, headers: dict | None = None, timeout: float = 60):
    """(status, parsed JSON body or text) of a GET (data None) or POST."""
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


def post(url, data: bytes, headers: dict | None = None):
    return request(url, data, headers)


def is_error_shape(body):
    return set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
