"""``dola-cpp serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) with DoLa.

``POST /v1/chat/completions`` and ``/v1/completions`` (streamed as server-sent events or not),
``GET /v1/models``, ``GET /health``. OpenAI's fields behave as OpenAI documents them; DoLa and the
other decoders come as extra body fields (``dola_layers``, ``repetition_penalty``,
``premature_norm``, ``decoder``, ``alpha``, ...; ``risk: true`` adds each token's risk).

``parallel`` contexts share the loaded weights (``Model.share()``); requests beyond them wait in
a bounded queue, and one that finds the queue full gets HTTP 503 with ``Retry-After``. A client
that disconnects cancels its generation at once. Errors are OpenAI-style JSON bodies.

Requests are untrusted: message content is tokenized as text (only the chat template's markup is
special); a body is bounded (``max_body``, 413) and so is the work it can cause: what the context
cannot hold is refused before it is parsed or tokenized, and parsing, templating and tokenizing
run on worker threads, never on the event loop. Connections that send their headers too slowly
are closed (``server_config``).

Needs the ``server`` extra: ``pip install 'dola-cpp[server]'``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal, Optional, Sequence, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import (CHAT_DRY_MULTIPLIER, CHAT_EOS_BOOST, CHAT_MAX_TOKENS, CHAT_PREMATURE_NORM, INT32_MAX,
                     DecodeConfig, DolaConfig)
from .model import Model, PromptTooLongError
from .prompts import TRANSCRIPT_STOP
from .results import GenerationResult, StepInfo

OWNED_BY = "dola-cpp"
DEFAULT_MAX_BODY = 8 * 2**20  # bytes of one request body; more is HTTP 413
HEADER_TIMEOUT = 10.0  # seconds a new connection has to send its first request's headers
IDLE_TIMEOUT = 5.0  # seconds an idle keep-alive connection stays open
BODY_TIMEOUT = 60.0  # seconds a client has to send a request's body
DISCONNECT_POLL = 0.25  # seconds between checks that a non-streaming request's client is still there
# JSON spends at most this many bytes on one byte of text (a \u00XX escape), and a request's
# fields and markup at most this many on top of its text
_JSON_BYTES_PER_BYTE, _FIELD_BYTES, _FIELD_BYTES_PER_MESSAGE = 6, 65536, 256

log = logging.getLogger("dola_cpp.server")


# ---------------------------------------------------------------------------- errors


class APIError(Exception):
    """An OpenAI-style error: HTTP status, message, type, param and code."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# ---------------------------------------------------------------------------- requests


class _Strict(BaseModel):
    # unknown fields are errors: a misspelt option must not be silently ignored
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    """The fields both endpoints take: OpenAI's, then dola-cpp's extras."""

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1, le=INT32_MAX)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)  # None: the chat's greedy decoding
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Optional[int] = Field(None, ge=0, le=2**64 - 1)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, le=1)
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0)  # not implemented: only the neutral value
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0)
    user: Optional[str] = None
    # dola-cpp; None = the chat's default (CHAT_* in dola_cpp.config)
    dola_layers: Union[str, list[int], None] = None
    premature_norm: Optional[bool] = None
    relative_top: float = 0.1
    repetition_penalty: Optional[float] = None
    decoder: Literal["dola", "activation"] = "dola"
    alpha: float = 0.5
    info_layer: Optional[int] = Field(None, ge=0, le=INT32_MAX)
    eos_boost: Optional[float] = None
    top_k: int = Field(0, ge=0, le=INT32_MAX)
    min_p: float = 0.0
    dry_multiplier: Optional[float] = None
    dry_base: float = 1.75
    dry_allowed_length: int = Field(2, ge=0, le=INT32_MAX)
    dry_penalty_last_n: int = Field(-1, ge=-1, le=INT32_MAX)
    stop_loops: bool = True
    risk: bool = False


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=0)  # alternatives are not reported


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int]]
    logprobs: Optional[int] = Field(None, ge=0, le=0)
    echo: bool = Field(False)
    suffix: Optional[str] = None


# ---------------------------------------------------------------------------- contexts


class Busy(Exception):
    pass


class Pool:
    """``parallel`` contexts on one set of weights and a bounded queue of waiting requests."""

    def __init__(self, model: Model, parallel: int, max_queue: int) -> None:
        self.contexts = [model] + [model.share() for _ in range(parallel - 1)]
        self.max_queue = max_queue
        self.waiting = 0
        self._free: Optional[asyncio.Queue] = None
        self.executor = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="dola-gen")
        # parsing, templates and tokenization: off the event loop, beside the generations
        self.prep = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dola-prep")

    def _queue(self) -> asyncio.Queue:
        if self._free is None:  # made on the server's event loop
            self._free = asyncio.Queue()
            for ctx in self.contexts:
                self._free.put_nowait(ctx)
        return self._free

    @property
    def busy(self) -> int:
        return len(self.contexts) - self._queue().qsize()

    async def acquire(self) -> Model:
        free = self._queue()
        if free.empty() and self.waiting >= self.max_queue:
            raise Busy()
        self.waiting += 1
        try:
            return await free.get()
        finally:
            self.waiting -= 1

    def release(self, ctx: Model) -> None:
        self._queue().put_nowait(ctx)


@dataclass
class Job:
    """One generation running on a worker thread; events reach the event loop through ``events``."""

    ctx: Model
    ids: list[int]
    max_tokens: int
    config: DecodeConfig
    stop: list[str]
    stop_loops: bool = True
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def run(self, loop: asyncio.AbstractEventLoop) -> None:
        def emit(*event: Any) -> None:
            loop.call_soon_threadsafe(self.events.put_nowait, event)

        try:
            stream = self.ctx.stream(self.ids, self.max_tokens, config=self.config, stop=self.stop,
                                     stop_loops=self.stop_loops)
            seen = 0
            for piece in stream:
                emit("piece", piece, stream.steps[seen:])
                seen = len(stream.steps)
                if self.cancelled.is_set():
                    break
            stream.close()
            emit("done", stream.result(), stream.steps[seen:])
        except BaseException as e:  # reported to the request, never raised in the worker
            emit("error", e)

    def cancel(self) -> None:
        self.cancelled.set()
        self.ctx.cancel()


# ---------------------------------------------------------------------------- the app


@dataclass(frozen=True)
class Limits:
    """What one request may cost before it is refused: its body's bytes, and what the context
    could hold (messages, characters of text, the JSON values and bytes that can carry them),
    all checked before the body is parsed or tokenized."""

    max_body: int
    n_ctx: int
    max_chars: int  # text beyond n_ctx tokens of the model's longest piece cannot fit

    @classmethod
    def of(cls, model: Model, max_body: int) -> "Limits":
        longest = max(len(model.token_bytes(t)) for t in range(model.n_vocab))
        return cls(max_body, model.n_ctx, model.n_ctx * max(1, longest))

    @property
    def max_json_bytes(self) -> int:
        return self.max_chars * _JSON_BYTES_PER_BYTE + self.n_ctx * _FIELD_BYTES_PER_MESSAGE + _FIELD_BYTES

    @property
    def max_json_values(self) -> int:
        return self.max_chars + 8 * self.n_ctx + 4096


def create_app(model: Model, *, parallel: int = 1, max_queue: Optional[int] = None, api_key: Optional[str] = None,
               model_name: Optional[str] = None, max_body: int = DEFAULT_MAX_BODY) -> FastAPI:
    """The ASGI app serving ``model`` (already loaded) with ``parallel`` contexts. Serve it with
    :func:`server_config`'s timeouts."""
    if parallel < 1:
        raise ValueError(f"parallel must be at least 1, got {parallel}")
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty: give a key, or none to serve without one")
    if max_body < 1024:
        raise ValueError(f"max_body must be at least 1024 bytes, got {max_body}")
    name = model_name or model.path.name
    pool = Pool(model, parallel, 4 * parallel if max_queue is None else max_queue)
    limits = Limits.of(model, max_body)
    created = int(time.time())
    templated = model.chat_template_supported  # else chats are plain transcripts, as in the CLI
    key = api_key.encode() if api_key is not None else None
    app = FastAPI(title="dola-cpp", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pool = pool
    app.state.limits = limits

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail), type="invalid_request_error").response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        # the last resort: a JSON 500 the client can quote, the traceback in the server's log
        rid = uuid.uuid4().hex[:16]
        log.error("request %s %s failed (request id %s)", request.method, request.url.path, rid, exc_info=exc)
        return APIError(500, f"internal server error (request id {rid})", type="server_error").response()

    if key is not None:
        app.add_middleware(_Auth, key=key)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": name, "parallel": len(pool.contexts), "busy": pool.busy,
                "waiting": pool.waiting}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(name, created)]}

    @app.get("/v1/models/{model_id:path}")
    async def model_card(model_id: str) -> dict:
        _check_model(model_id, name)
        return _model_card(name, created)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        raw = await _read_body(request, limits)
        body, ids, extra_stop = await _off_loop(pool, _prepare_chat, model, raw, limits, templated)
        _check_model(body.model, name)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await _serve(request, pool, body, ids, max_tokens, name, chat=True, extra_stop=extra_stop)

    @app.post("/v1/completions")
    async def completions(request: Request):
        raw = await _read_body(request, limits)
        body, ids = await _off_loop(pool, _prepare_completion, model, raw, limits)
        _check_model(body.model, name)
        return await _serve(request, pool, body, ids, body.max_tokens, name, chat=False)

    return app


class _Auth:
    """``Authorization: Bearer KEY`` on /v1/, the header's bytes compared in constant time. Plain
    ASGI: the app below keeps uvicorn's own receive, so a gone client is noticed."""

    def __init__(self, app: Any, key: bytes) -> None:
        self.app, self.key = app, key

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
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


async def _read_body(request: Request, limits: Limits) -> bytes:
    """The body, at most ``limits.max_body`` bytes (else 413), within BODY_TIMEOUT seconds."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_body:
        raise _too_large(limits)

    async def read() -> bytes:
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limits.max_body:
                raise _too_large(limits)
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout=BODY_TIMEOUT)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {BODY_TIMEOUT:g} s", code="timeout") from None


def _too_large(limits: Limits) -> APIError:
    return APIError(413, f"the request body is larger than this server's limit of {limits.max_body} bytes",
                    code="request_too_large")


async def _off_loop(pool: Pool, fn, *args):
    """``fn(*args)`` on a worker thread: what scales with the request never blocks the event loop."""
    return await asyncio.get_running_loop().run_in_executor(pool.prep, fn, *args)


def _too_long(what: str, limits: Limits) -> APIError:
    return APIError(400, f"the {what} cannot fit in the {limits.n_ctx}-token context", param=what,
                    code="context_length_exceeded")


def _parse(raw: bytes, kind: type[_Common], limits: Limits, what: str) -> Any:
    """The JSON body as ``kind``, or an OpenAI-style 400. A body that could not fit in the context
    whatever it holds is refused before it is parsed: JSON parsing holds the GIL."""
    if len(raw) > limits.max_json_bytes or \
            raw.count(b",") + raw.count(b"[") + raw.count(b"{") > limits.max_json_values:
        raise _too_long(what, limits)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())) or None
        kind_ = first.get("type", "")
        if kind_ == "extra_forbidden":
            message = f"unknown field {param!r}"
        elif kind_ == "missing":
            message = f"missing required field {param!r}"
        else:
            message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid")
        raise APIError(400, message, param=param, code=kind_ or None) from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None


def _prepare_chat(model: Model, raw: bytes, limits: Limits, templated: bool) -> tuple[ChatRequest, list[int], list[str]]:
    """The request and its prompt's token ids, message content as text (on a worker thread)."""
    # every message has a "role" key, and inside a JSON string the quotes would be escaped: a body
    # with more of them than twice the messages the context could hold is refused unparsed
    if raw.count(b'"role"') > 2 * limits.n_ctx + 16:
        raise _too_long("messages", limits)
    body = _parse(raw, ChatRequest, limits, "messages")
    if len(body.messages) > limits.n_ctx or sum(len(m.text()) for m in body.messages) > limits.max_chars:
        raise _too_long("messages", limits)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    try:
        ids = model.chat_tokens(messages, template=templated)
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None
    # without a template, as the CLI's chat: a transcript, ending at the next turn
    return body, ids, [] if templated else [TRANSCRIPT_STOP]


def _prepare_completion(model: Model, raw: bytes, limits: Limits) -> tuple[CompletionRequest, list[int]]:
    """The request and its prompt's token ids (a text prompt is a raw prompt: its special-token
    text is parsed, as llama-server does)."""
    body = _parse(raw, CompletionRequest, limits, "prompt")
    if body.echo or body.suffix:
        raise APIError(400, "echo and suffix are not supported", param="echo" if body.echo else "suffix")
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise APIError(400, "one prompt per request (n = 1)", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(prompt) > limits.max_chars:
            raise _too_long("prompt", limits)
        try:
            return body, model.tokenize(prompt, add_special=True)
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None
    if not prompt:
        raise APIError(400, "the prompt is empty", param="prompt")
    if len(prompt) > limits.n_ctx:
        raise _too_long("prompt", limits)
    ids = [int(t) for t in prompt]
    bad = [t for t in ids if not 0 <= t < model.n_vocab]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{model.n_vocab - 1})", param="prompt")
    return body, ids


def _model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": OWNED_BY}


def _check_model(requested: Optional[str], name: str) -> None:
    """A request names the loaded model (or none); the server never loads another."""
    if requested not in (None, "", name):
        raise APIError(404, f"the model {requested!r} does not exist: this server serves {name!r}",
                       param="model", code="model_not_found")


def _config(model: Model, body: _Common) -> DecodeConfig:
    layers = body.dola_layers
    if isinstance(layers, str) and layers.strip().lower() in ("", "none"):
        layers = None
    fields = dict(layers=layers,
                  premature_norm=CHAT_PREMATURE_NORM if body.premature_norm is None else body.premature_norm,
                  relative_top=body.relative_top, repetition_penalty=body.repetition_penalty, decoder=body.decoder,
                  alpha=body.alpha, info_layer=body.info_layer,
                  eos_boost=CHAT_EOS_BOOST if body.eos_boost is None else body.eos_boost,
                  temperature=0.0 if body.temperature is None else body.temperature, top_k=body.top_k, top_p=body.top_p, min_p=body.min_p, seed=body.seed,
                  dry_multiplier=CHAT_DRY_MULTIPLIER if body.dry_multiplier is None else body.dry_multiplier,
                  dry_base=body.dry_base, dry_allowed_length=body.dry_allowed_length,
                  dry_penalty_last_n=body.dry_penalty_last_n)
    try:
        DolaConfig(layers=layers)
    except (ValueError, TypeError) as e:
        raise APIError(400, f"dola_layers: {e}", param="dola_layers") from None
    try:
        config = DecodeConfig().replace(**fields)
    except (ValueError, TypeError) as e:  # DecodeConfig's messages start with the field's name
        word = str(e).split(" ")[0]
        raise APIError(400, str(e), param=word if word in fields else None) from None
    try:
        plan = model.resolve_layers(config.dola.layers)
    except (ValueError, TypeError) as e:
        raise APIError(400, f"dola_layers: {e}", param="dola_layers") from None
    if plan.is_plain and not config.uses_activation and body.premature_norm is None:
        config = config.replace(premature_norm=False)  # nothing is projected: the default stays neutral
    try:
        config.to_core(plan, model.n_layers)
    except ValueError as e:
        raise APIError(400, str(e), param="info_layer") from None
    return config


def _stops(stop: Union[str, list[str], None]) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4:
        raise APIError(400, "at most 4 stop sequences", param="stop")
    return [s for s in stops if s]


# OpenAI's finish reasons for ours; the choice also carries ours as dola_finish_reason when they differ
FINISH = {"stop": "stop", "length": "length", "abstained": "stop", "loop": "stop", "cancelled": "stop",
          "interrupted": "stop"}


async def _serve(request: Request, pool: Pool, body: _Common, ids: list[int], max_tokens: Optional[int], name: str,
                 chat: bool, extra_stop: Sequence[str] = ()):
    model = pool.contexts[0]
    n_ctx = model.n_ctx
    if len(ids) >= n_ctx:
        raise APIError(400, f"the prompt has {len(ids)} tokens but the context holds {n_ctx} (with at least one "
                            f"for the answer)", param="messages" if chat else "prompt", code="context_length_exceeded")
    room = n_ctx - len(ids) + 1
    if max_tokens is None:  # the chat's budget, which eos_boost ends answers within
        max_tokens = min(room, CHAT_MAX_TOKENS)
    if max_tokens < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    if max_tokens > room:
        raise APIError(400, f"max_tokens is {max_tokens} but the prompt's {len(ids)} tokens leave room for {room} "
                            f"in the {n_ctx}-token context", param="max_tokens", code="context_length_exceeded")
    config = _config(model, body)
    stop = _stops(body.stop) + list(extra_stop)
    want_logprobs = bool(body.logprobs is not None and body.logprobs is not False)
    try:
        ctx = await pool.acquire()
    except Busy:
        raise APIError(503, "the server is busy: every context is generating and the queue is full; retry shortly",
                       type="server_error", code="server_busy", headers={"Retry-After": "1"}) from None
    loop = asyncio.get_running_loop()
    job = Job(ctx, ids, max_tokens, config, stop, stop_loops=body.stop_loops)
    future = loop.run_in_executor(pool.executor, job.run, loop)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    shape = _Shape(ctx, rid, created, name, chat, want_logprobs, body.risk)

    async def release_when_done() -> None:
        # the context goes back when its generation has ended, however the request ended
        try:
            await future
        finally:
            pool.release(ctx)

    released = asyncio.ensure_future(release_when_done())

    async def finish() -> None:
        # only while it runs: once it has ended the context may already serve another request
        # (both run on the event loop, so nothing is released between the check and the cancel)
        if not future.done():
            job.cancel()
        await asyncio.shield(released)

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(job, shape, finish, len(ids), include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        text, steps, result = "", [], None
        checked = time.monotonic()
        while result is None:
            try:
                event = await asyncio.wait_for(job.events.get(), timeout=DISCONNECT_POLL)
            except asyncio.TimeoutError:
                event = None
            # every DISCONNECT_POLL seconds, also while tokens keep coming
            if event is None or time.monotonic() - checked >= DISCONNECT_POLL:
                checked = time.monotonic()
                if await request.is_disconnected():
                    return JSONResponse({}, status_code=499)
            if event is None:
                continue
            if event[0] == "piece":
                text += event[1]
                steps += event[2]
            elif event[0] == "done":
                result = event[1]
                steps += event[2]
            else:
                raise _generation_error(event[1])
    finally:
        await finish()
    return shape.whole(text, steps, result)


def _generation_error(e: BaseException) -> APIError:
    if isinstance(e, PromptTooLongError):
        return APIError(400, str(e), code="context_length_exceeded")
    if isinstance(e, (ValueError, TypeError)):
        return APIError(400, str(e))
    return APIError(500, f"generation failed: {e}", type="server_error")


async def _sse(job: Job, shape: "_Shape", finish, n_prompt: int, include_usage: bool) -> AsyncIterator[str]:
    try:
        yield _event(shape.chunk(role=True))
        n_tokens = 0
        while True:
            event = await job.events.get()
            if event[0] == "error":
                err = _generation_error(event[1])
                yield _event({"error": {"message": err.message, "type": err.type, "param": err.param,
                                        "code": err.code}})
                break
            if event[0] == "piece":
                n_tokens += len(event[2])
                yield _event(shape.chunk(text=event[1], steps=event[2]))
            else:
                result: GenerationResult = event[1]
                n_tokens += len(event[2])
                if event[2]:
                    yield _event(shape.chunk(text="", steps=event[2]))
                yield _event(shape.chunk(finish=FINISH.get(result.finish_reason, "stop"), result=result))
                if include_usage:
                    yield _event({**shape.envelope(), "choices": [], "usage": _usage(n_prompt, n_tokens)})
                break
        yield "data: [DONE]\n\n"
    finally:  # also when the client went away: the generation stops at once
        await finish()


def _event(obj: dict) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


def _usage(n_prompt: int, n_completion: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}


def _finite(x: float) -> Optional[float]:
    return float(x) if math.isfinite(x) else None


class _Shape:
    """The OpenAI response objects for one request."""

    def __init__(self, model: Model, rid: str, created: int, name: str, chat: bool, logprobs: bool,
                 risk: bool) -> None:
        self.model, self.rid, self.created, self.name = model, rid, created, name
        self.chat, self.logprobs, self.risk = chat, logprobs, risk

    def envelope(self, chunk: bool = True) -> dict:
        if self.chat:
            kind = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            kind = "text_completion"
        return {"id": self.rid, "object": kind, "created": self.created, "model": self.name}

    def _logprobs(self, steps: list[StepInfo]) -> Optional[dict]:
        if not self.logprobs:
            return None
        pieces = [self.model.token_bytes(s.token) for s in steps]
        if self.chat:
            return {"content": [{"token": p.decode("utf-8", "replace"), "logprob": _finite(s.mature_logprob),
                                 "bytes": list(p), "top_logprobs": []} for p, s in zip(pieces, steps)]}
        return {"tokens": [p.decode("utf-8", "replace") for p in pieces],
                "token_logprobs": [_finite(s.mature_logprob) for s in steps], "top_logprobs": None,
                "text_offset": None}

    def _risk(self, steps: list[StepInfo], result: Optional[GenerationResult] = None) -> dict:
        out: dict[str, Any] = {"tokens": [_finite(s.risk) for s in steps]}
        if result is not None:
            out["answer"] = None if result.risk is None else _finite(result.risk)
        return out

    def chunk(self, text: Optional[str] = None, steps: Optional[list[StepInfo]] = None, role: bool = False,
              finish: Optional[str] = None, result: Optional[GenerationResult] = None) -> dict:
        steps = steps or []
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta = {"role": "assistant", "content": ""}
            elif text is not None:
                delta = {"content": text}
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        choice["logprobs"] = self._logprobs(steps) if steps else None
        choice["finish_reason"] = finish
        if result is not None and FINISH.get(result.finish_reason) != result.finish_reason:
            choice["dola_finish_reason"] = result.finish_reason
        if self.risk and (steps or result is not None):
            choice["risk"] = self._risk(steps, result)
        return {**self.envelope(), "choices": [choice]}

    def whole(self, text: str, steps: list[StepInfo], result: GenerationResult) -> dict:
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = self._logprobs(steps)
        choice["finish_reason"] = FINISH.get(result.finish_reason, "stop")
        if choice["finish_reason"] != result.finish_reason:
            choice["dola_finish_reason"] = result.finish_reason
        if self.risk:
            choice["risk"] = self._risk(steps, result)
        return {**self.envelope(chunk=False), "choices": [choice], "usage": _usage(result.prompt_tokens,
                                                                                    len(result.tokens))}
