"""What the server checks before a route reads a byte of a request (ASGI middleware): the API key
(every route but /health) and the body-size limit (413), so that neither a stranger nor one huge
body reaches the JSON parser or the tokenizer."""

from __future__ import annotations

import hmac
import json

OPEN_PATHS = ("/health",)  # answered without the key: load balancers probe it


class Guard:
    def __init__(self, app, api_key: str | None, max_body_bytes: int, count=None):
        self.app, self.api_key, self.max_body, self.count = app, api_key, max_body_bytes, count or (lambda path, status: None)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers, path = dict(scope.get("headers") or []), scope.get("path", "")
        if self.api_key and path not in OPEN_PATHS and not self.authorised(headers):
            self.count(path, 401)
            return await reply(send, 401, "a valid API key is needed: Authorization: Bearer KEY", "authentication_error",
                               [(b"www-authenticate", b"Bearer")])  # fmt: skip
        length = headers.get(b"content-length", b"").decode("latin-1")
        if length.isdigit():  # the server's HTTP layer holds the body to this length
            if int(length) > self.max_body:
                self.count(path, 413)
                return await reply(send, 413, self.too_large(), "invalid_request_error")
            return await self.app(scope, receive, send)
        messages, received = [], 0  # a body of unknown length (chunked): read up to the limit, then replay
        while True:
            message = await receive()
            messages.append(message)
            received += len(message.get("body", b""))
            if received > self.max_body:
                self.count(path, 413)
                return await reply(send, 413, self.too_large(), "invalid_request_error")
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    def authorised(self, headers: dict) -> bool:
        given = headers.get(b"authorization", b"").decode("latin-1")
        return hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode())

    def too_large(self) -> str:
        return f"the request body is larger than the server's limit of {self.max_body} bytes (twotower serve --max-body-mb)"


def header_timeout_protocol(seconds: float):
    """uvicorn's h11 protocol, closing a connection whose request headers have not all arrived
    `seconds` after it opened (a slowloris socket holds a connection open by sending them slowly);
    idle keep-alive connections are closed by uvicorn's own keep-alive timeout."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self.loop.call_later(seconds, self.drop_if_silent)

        def drop_if_silent(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

    return Protocol


async def reply(send, status: int, message: str, kind: str, headers=()) -> None:
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})
