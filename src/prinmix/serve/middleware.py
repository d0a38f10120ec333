"""ASGI middleware in front of every endpoint: the API key, then the request-body size limit.

Both are plain ASGI (not Starlette's BaseHTTPMiddleware) so they run before any body is read and
answer without the app: a request that fails them never reaches FastAPI's JSON parsing.
"""

from __future__ import annotations

import hmac
import json

__all__ = ["ApiKeyMiddleware", "BodySizeLimitMiddleware"]

OPEN_PATHS = frozenset({"/health"})          # answered without the API key (load balancers' liveness probes)


async def _send_error(send, status: int, message: str, type: str, code: str, headers: list | None = None) -> None:
    body = json.dumps({"error": {"message": message, "type": type, "param": None, "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class ApiKeyMiddleware:
    """401 unless the request carries `Authorization: Bearer <api_key>` (constant-time comparison)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        if not hmac.compare_digest(given, self.expected):
            return await _send_error(send, 401, "missing or wrong API key: send the header "
                                     "'Authorization: Bearer <key>'", "invalid_request_error", "invalid_api_key",
                                     [(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """413 for a request body over `max_bytes`, found from Content-Length before reading or, for a chunked
    body, while reading: the body is read here (at most max_bytes held) and replayed to the app.
    After the body, `receive` passes through, so the app still hears the client disconnect."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._too_large(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":            # the client left while sending
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _too_large(self, send):
        await _send_error(send, 413, f"the request body is larger than this server's limit of {self.max_bytes} "
                          f"bytes (--max-body-bytes)", "invalid_request_error", "request_too_large",
                          [(b"connection", b"close")])
