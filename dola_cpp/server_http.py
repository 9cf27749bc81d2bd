"""The server's HTTP side, below the API: the API key, the timeouts a slow client meets (its
headers, its body, an idle keep-alive connection), the body's size limit, and the counters
/metrics shows."""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from typing import Any, Optional

from fastapi import FastAPI, Request

from .server_schema import APIError

HEADER_TIMEOUT = 10.0  # seconds a new connection has to send its first request's headers
IDLE_TIMEOUT = 5.0  # seconds an idle keep-alive connection stays open
BODY_TIMEOUT = 60.0  # seconds a client has to send a request's body


GUARDED = ("/tokenize", "/detokenize", "/tokenizer_info", "/metrics")  # outside /v1/, llama-server's paths, behind the key too


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


# ---------------------------------------------------------------------------- /metrics


class Metrics:
    """The counters /metrics shows (Prometheus's text format)."""

    ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/tokenize",
                 "/detokenize", "/tokenizer_info")

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, status)
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.generations: Counter[str] = Counter()  # by decoder
        self.decoder_tokens: Counter[str] = Counter()  # generated tokens by decoder
        self.scored_tokens = 0  # prompt tokens scored for echo's logprobs

    def endpoint(self, path: str) -> str:
        if path.startswith("/v1/models"):
            return "/v1/models"
        return path if path in self.ENDPOINTS else "other"

    def generated(self, decoder: str, n_tokens: int) -> None:
        self.generations[decoder] += 1
        self.decoder_tokens[decoder] += n_tokens
        self.generated_tokens += n_tokens

    def text(self, gauges: dict[str, tuple[str, float]], counters: Optional[dict[str, tuple[str, float]]] = None) -> str:
        """The exposition: the counters (these and ``counters``), then ``gauges`` ({name: (help,
        value)})."""
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP dola_cpp_{name} {help_}")
            out.append(f"# TYPE dola_cpp_{name} {kind}")
            for labels, value in samples:
                out.append(f"dola_cpp_{name}{labels} {value:g}")

        metric("requests_total", "counter", "HTTP requests answered, by endpoint and status.",
               [(f'{{endpoint="{e}",status="{s}"}}', n) for (e, s), n in sorted(self.requests.items())])
        metric("prompt_tokens_total", "counter", "Prompt tokens of the requests served.", [("", self.prompt_tokens)])
        metric("generated_tokens_total", "counter", "Tokens generated.", [("", self.generated_tokens)])
        metric("scored_tokens_total", "counter", "Prompt tokens scored (echo with logprobs).",
               [("", self.scored_tokens)])
        metric("generations_total", "counter", "Generations (choices) run, by decoder.",
               [(f'{{decoder="{d}"}}', n) for d, n in sorted(self.generations.items())])
        metric("decoder_tokens_total", "counter", "Tokens generated, by decoder.",
               [(f'{{decoder="{d}"}}', n) for d, n in sorted(self.decoder_tokens.items())])
        for name, (help_, value) in (counters or {}).items():
            metric(name, "counter", help_, [("", value)])
        for name, (help_, value) in gauges.items():
            metric(name, "gauge", help_, [("", value)])
        return "\n".join(out) + "\n"


class CountRequests:
    """Counts each answered request by endpoint and status (plain ASGI, as BearerAuth)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            self.metrics.requests[(self.metrics.endpoint(scope["path"]), status[0])] += 1
