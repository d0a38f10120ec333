"""Server trust (issue 13, items 6–8): API key, runtime loading policy, body and prompt limits that keep the
event loop answering, cancelled requests of departed clients, 500s without exception text, start-up checks."""

import http.client
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from server_helpers import MAX_LEN, is_error_shape, post, request, running

from conftest import make_app
from prinmix import cli
from prinmix.cli.serve import server_config

KEY = "s3cret-key"
SMALL_BODY = 64 * 1024


@pytest.fixture(scope="module")
def locked(llama):
    """A server with the defaults but an API key and a 64 KiB body limit (runtime loading off)."""
    with running(make_app(llama, api_key=KEY, max_body_bytes=SMALL_BODY), api_key=KEY) as s:
        yield s


def _auth(key=KEY):
    return {"Authorization": f"Bearer {key}"}


def test_api_key_is_required_everywhere_but_health(locked):
    url = locked.url
    assert request(f"{url}/health")[0] == 200
    for path in ("/v1/models", "/metrics", "/version", "/stats"):
        for headers in ({}, _auth("wrong"), {"Authorization": KEY}):
            status, body = request(f"{url}{path}", headers=headers)
            assert status == 401 and is_error_shape(body) and body["error"]["code"] == "invalid_api_key", path
        assert request(f"{url}{path}", headers=_auth())[0] == 200, path
    status, body = post(f"{url}/v1/completions", json.dumps({"model": "base", "prompt": "1+1="}).encode())
    assert status == 401 and is_error_shape(body)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()
    r = locked.client.completions.create(model="low", prompt="1+1=", max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason


def test_runtime_loading_is_off_by_default(locked, llama):
    deltas = llama[1]
    for path, body in (("/v1/load_lora_adapter", {"lora_name": "z", "lora_path": str(deltas["low"])}),
                       ("/v1/unload_lora_adapter", {"lora_name": "low"})):
        status, answer = post(f"{locked.url}{path}", json.dumps(body).encode(), _auth())
        assert status == 403 and answer["error"]["code"] == "runtime_loading_disabled"
        assert "--allow-runtime-loading" in answer["error"]["message"]
    assert {m.id for m in locked.client.models.list()} == {"base", "low", "bit"}


def _load(url, name, path):
    return post(f"{url}/v1/load_lora_adapter", json.dumps({"lora_name": name, "lora_path": path}).encode())


def test_runtime_loading_is_confined_to_its_directories(server, llama, tmp_path):
    base, deltas, _, _ = llama
    inside = deltas["low"].parent
    outside = tmp_path / "outside.delta"
    outside.write_bytes(deltas["low"].read_bytes())
    (inside / "escape.delta").symlink_to(outside)
    messages = {}
    for label, path in {"missing": str(inside / "missing.delta"), "outside": str(outside),
                        "symlink out": str(inside / "escape.delta"), "dot-dot": f"../{tmp_path.name}/outside.delta",
                        "dot-dot abs": f"{inside}/../{deltas['low'].parent.name}/../../{tmp_path.name}/outside.delta",
                        "a directory": str(inside), "base config": f"{base}/config.json",
                        "nul byte": "low.delta\x00x", "etc": "/etc/hostname"}.items():
        status, body = _load(server.url, "probe", path)
        assert status == 400 and body["error"]["param"] == "lora_path", label
        messages[label] = body["error"]["message"].replace(repr(path[:256]), "PATH")
    assert len(set(messages.values())) == 1, messages          # nothing tells which of them exists
    assert "probe" not in {m.id for m in server.client.models.list()}
    status, _ = _load(server.url, "rel", "low.delta")          # a relative name inside the directory loads
    assert status == 200
    assert post(f"{server.url}/v1/unload_lora_adapter", json.dumps({"lora_name": "rel"}).encode())[0] == 200


def test_runtime_tenant_names_and_cap(server, llama):
    path = str(llama[1]["low"])
    for name in ("../x", "a b", "x" * 129, "-lead", "new\nline", "caf\u00e9", ""):
        status, body = _load(server.url, name, path)
        assert status == 400 and body["error"]["param"] == "lora_name", name
    loaded = []
    try:                                                       # 2 tenants at start; the cap is 4
        for name in ("org/low-2", "low_3"):
            assert _load(server.url, name, path)[0] == 200
            loaded.append(name)
        status, body = _load(server.url, "low.4", path)
        assert status == 409 and body["error"]["code"] == "too_many_tenants"
    finally:
        for name in loaded:
            post(f"{server.url}/v1/unload_lora_adapter", json.dumps({"lora_name": name}).encode())
    assert len(server.scheduler.tenants) == 2


def _health_times(url, stop: threading.Event) -> list[float]:
    times = []
    while not stop.is_set():
        t0 = time.perf_counter()
        assert request(f"{url}/health", timeout=5)[0] == 200
        times.append(time.perf_counter() - t0)
        time.sleep(0.02)
    return times


def _raw_post(port: int, path: str, body: bytes, headers: dict) -> int | str:
    """HTTP status of a POST, or the connection error's name (the server may close while the body is sent)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **headers})
        return conn.getresponse().status
    except (ConnectionError, http.client.HTTPException) as e:
        return type(e).__name__
    finally:
        conn.close()


def _head_then_response(port: int, head: bytes, body_parts: list[bytes]) -> tuple[int, dict]:
    """Send a request head and body parts on a raw socket, then read the answer (status, JSON body). The parts
    stop where the server should answer, so it has read all that was sent and closes cleanly (no reset)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        for part in body_parts:
            sock.sendall(part)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head_part, _, body = answer.partition(b"\r\n\r\n")
    return int(head_part.split()[1]), json.loads(body)


def test_oversized_bodies_get_413_and_health_stays_fast(locked):
    auth = f"Authorization: Bearer {KEY}\r\n".encode()
    status, answer = _head_then_response(locked.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + auth
                                         + f"Content-Length: {SMALL_BODY + 1}\r\n\r\n".encode(), [])
    assert status == 413 and is_error_shape(answer) and answer["error"]["code"] == "request_too_large"
    chunks = [b"%x\r\n%s\r\n" % (n, b"x" * n) for n in (SMALL_BODY // 2, SMALL_BODY // 2, 1)]   # limit + 1 bytes
    status, answer = _head_then_response(locked.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + auth
                                         + b"Transfer-Encoding: chunked\r\n\r\n", chunks)
    assert status == 413 and answer["error"]["code"] == "request_too_large"
    status, _ = post(f"{locked.url}/v1/completions",            # exactly at the limit: read, parsed ({}: no model)
                     b"{" + b" " * (SMALL_BODY - 2) + b"}", _auth())
    assert status == 400

    huge = json.dumps({"model": "base", "prompt": "x" * 10 * 2**20}).encode()   # 10 MB
    stop = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        health = pool.submit(_health_times, locked.url, stop)
        big = [pool.submit(_raw_post, locked.port, "/v1/completions", huge, _auth()) for _ in range(3)]
        results = [f.result() for f in big]
        time.sleep(0.2)
        stop.set()
        times = health.result()
    assert all(r in (413, "BrokenPipeError", "ConnectionResetError") for r in results), results
    assert times and max(times) < 1.0


def test_a_long_prompt_is_refused_before_tokenising(server):
    text = "7+8=" * (3 * 2**20 // 4)                          # 3 MiB: under the body limit, far over MAX_LEN
    body = json.dumps({"model": "base", "prompt": text}).encode()
    stop = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        health = pool.submit(_health_times, server.url, stop)
        t0 = time.perf_counter()
        status, answer = post(f"{server.url}/v1/completions", body)
        elapsed = time.perf_counter() - t0
        stop.set()
        times = health.result()
    assert status == 400 and answer["error"]["code"] == "context_length_exceeded"
    assert f"{MAX_LEN} tokens" in answer["error"]["message"]
    assert elapsed < 5 and times and max(times) < 1.0
    status, answer = post(f"{server.url}/v1/chat/completions",
                          json.dumps({"model": "base", "messages": [{"role": "user", "content": text}]}).encode())
    assert status == 400 and answer["error"]["code"] == "context_length_exceeded"


def _send_and_leave(server, admitted: bool) -> int:
    """Post a long non-streaming completion on a raw socket, close the socket while the request is queued
    (admitted=False) or decoding (True) with the scheduler paused; returns the tokens generated for it."""
    sched = server.scheduler
    cancelled, generated = sched.stats.finished.get("cancelled", 0), sched.stats.generated_tokens
    body = json.dumps({"model": "low", "prompt": "1+2=", "max_tokens": MAX_LEN - 8, "temperature": 0}).encode()
    if not admitted:
        sched.pause()
    try:
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.time() + 30
        while (sched.num_running if admitted else sched.num_waiting) < 1 and time.time() < deadline:
            time.sleep(0.001)
        sched.pause()
        sock.close()
        time.sleep(0.5)                                        # the server hears the disconnect
    finally:
        sched.resume()
    deadline = time.time() + 30
    while sched.stats.finished.get("cancelled", 0) == cancelled and time.time() < deadline:
        time.sleep(0.02)
    assert sched.stats.finished.get("cancelled", 0) == cancelled + 1
    assert sched.num_running == 0 and sched.num_waiting == 0
    return sched.stats.generated_tokens - generated


def test_a_departed_clients_request_is_cancelled(server):
    assert _send_and_leave(server, admitted=False) == 0        # it never reached the model
    assert 1 <= _send_and_leave(server, admitted=True) < MAX_LEN - 8           # it stopped mid-way


def test_500_never_echoes_the_exception(server, monkeypatch):
    model = server.scheduler.model

    def broken(*args, **kwargs):
        raise RuntimeError("SECRET detail at /home/someone/.cache")

    monkeypatch.setattr(model, "forward", broken)
    status, body = post(f"{server.url}/v1/completions", json.dumps({"model": "low", "prompt": "1+1="}).encode())
    assert status == 500 and is_error_shape(body) and body["error"]["type"] == "server_error"
    assert "SECRET" not in json.dumps(body) and "RuntimeError" not in json.dumps(body)
    monkeypatch.undo()

    class Unprintable:
        def __str__(self):
            raise RuntimeError("SECRET in a handler")

    monkeypatch.setattr(model, "base_dir", Unprintable())
    status, body = request(f"{server.url}/v1/models")
    assert status == 500 and is_error_shape(body) and "SECRET" not in json.dumps(body)
    monkeypatch.undo()
    assert server.client.completions.create(model="low", prompt="1+1=", max_tokens=2).choices[0].finish_reason


@pytest.mark.parametrize("flags, message", [(["--port", "99999"], "--port must be in 1..65535"),
                                            (["--port", "0"], "--port must be in 1..65535"),
                                            (["--max-model-len", "0"], "--max-model-len must be >= 1"),
                                            (["--max-model-len", "-5"], "--max-model-len must be >= 1"),
                                            (["--max-num-seqs", "0"], "--max-num-seqs must be >= 1"),
                                            (["--max-batch", "-1"], "--max-num-seqs must be >= 1"),
                                            (["--allow-runtime-loading"], "--runtime-delta-dir"),
                                            (["--chat-template", "/no/such/file"], "--chat-template")])
def test_bad_settings_are_refused_at_start_with_one_line(flags, message, tmp_path, capsys, monkeypatch):
    for var in ("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "PRINMIX_ALLOW_RUNTIME_LOADING"):
        monkeypatch.delenv(var, raising=False)
    assert cli.main(["serve", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err


def test_env_vars_as_vllm(monkeypatch, tmp_path):
    parser = cli.build_parser()
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    config = server_config(parser.parse_args(["serve", str(tmp_path), "--runtime-delta-dir", str(tmp_path)]))
    assert config.api_key == "from-env" and config.allow_runtime_loading
    config = server_config(parser.parse_args(["serve", str(tmp_path), "--api-key", "flag", "--runtime-delta-dir",
                                              str(tmp_path), "--max-num-seqs", "3", "--served-model-name", "m",
                                              "--lora-modules", "a=x.delta", "b=y.delta", "--name", "c=z.delta"]))
    assert (config.api_key, config.max_batch, config.base_name) == ("flag", 3, "m")
    assert parser.parse_args(["serve", "b", "--lora-modules", "a=x", "b=y", "--name", "c=z"]).name == \
        ["a=x", "b=y", "c=z"]
    assert os.environ["VLLM_API_KEY"] == "from-env"
