"""The server's HTTP side, below the API: the API key, the timeouts a slow client meets (its
headers, its body, an idle keep-alive connection) and the body's size limit."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any, Optional

from fastapi import FastAPI, Request

from .server_schema import APIError

HEADER_TIMEOUT = 10.0  # seconds a new connection has to send its first request's headers
IDLE_TIMEOUT = 5.0  # seconds an idle keep-alive connection stays open
BODY_TIMEOUT = 60.0  # seconds a client has to send a request's body


GUARDED = ("/tokenize", "/detokenize")  # outside /v1/, llama-server's paths, behind the key too


class BearerAuth:
    """``Authorization: Bearer KEY`` on /v1/ (and GUARDED), the header's bytes compared in constant
    time. Plain ASGI: the app below keeps uvicorn's own receive, so a gone client is noticed."""

    def __init__(self, app: Any, key: bytes) -> None:
        self.app, self.key = app, key

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and (scope["path"].startswith("/v1/") or scope["path"] in GUARDED):
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.key):
                response = APIError(401, "invalid or missing API key (Authorization: Bearer ...)",
                                    type="authentication_error", code="invalid_api_key").response()
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def server_config(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *,
                  header_timeout: float = HEADER_TIMEOUT, idle_timeout: float = IDLE_TIMEOUT,
                  log_level: str = "warning") -> Any:
    """uvicorn's configuration for ``app``: a connection that has not sent its first request's
    headers within ``header_timeout`` seconds is closed (uvicorn itself waits for ever), and an
    idle keep-alive connection after ``idle_timeout``."""
    import uvicorn

    if not header_timeout > 0 or not idle_timeout > 0:
        raise ValueError("the header and idle timeouts must be positive numbers of seconds")
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=_h11_with_header_timeout(header_timeout),
                          timeout_keep_alive=idle_timeout)


def _h11_with_header_timeout(timeout: float) -> type:
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        # uvicorn times idle keep-alive connections, but not a new connection that never
        # completes its first request's headers (slowloris): this does
        _header_timer: Optional[asyncio.TimerHandle] = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._header_timer = self.loop.call_later(timeout, self._headers_too_slow)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None:
                self._stop_header_timer()

        def connection_lost(self, exc: Optional[Exception]) -> None:
            self._stop_header_timer()
            super().connection_lost(exc)

        def _stop_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

    return TimedH11Protocol


async def read_body(request: Request, max_body: int) -> bytes:
    """The body, at most ``max_body`` bytes (else 413), within BODY_TIMEOUT seconds."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_body:
        raise _too_large(max_body)

    async def read() -> bytes:
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_body:
                raise _too_large(max_body)
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout=BODY_TIMEOUT)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {BODY_TIMEOUT:g} s", code="timeout") from None


def _too_large(max_body: int) -> APIError:
    return APIError(413, f"the request body is larger than this server's limit of {max_body} bytes",
                    code="request_too_large")
