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

Here: the contexts, the jobs and the endpoints. The request schema (made from
``dola_cpp.settings``), its parsing and the errors are ``server_schema``; the API key, the
timeouts and the body's limit ``server_http``; the response objects ``server_responses``.

Needs the ``server`` extra: ``pip install 'dola-cpp[server]'``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import CHAT_MAX_TOKENS, DecodeConfig, DolaConfig
from .model import Model
from .prompts import TRANSCRIPT_STOP
from .server_http import (  # noqa: F401  (server_config and the timeouts: where they have always been imported from)
    BODY_TIMEOUT, HEADER_TIMEOUT, IDLE_TIMEOUT, BearerAuth, read_body, server_config,
)
from .server_responses import ResponseShape, generation_error, sse_events
from .server_schema import (  # noqa: F401  (the request schema, for clients of this module)
    APIError, ChatRequest, CommonRequest, CompletionRequest, Message, StreamOptions, TextPart, parse_request,
    DetokenizeRequest, TokenizeRequest, request_value, too_long,
)
from .settings import served

OWNED_BY = "dola-cpp"
DEFAULT_MAX_BODY = 8 * 2**20  # bytes of one request body; more is HTTP 413
DISCONNECT_POLL = 0.25  # seconds between checks that a non-streaming request's client is still there
# JSON spends at most this many bytes on one byte of text (a \u00XX escape), and a request's
# fields and markup at most this many on top of its text
_JSON_BYTES_PER_BYTE, _FIELD_BYTES, _FIELD_BYTES_PER_MESSAGE = 6, 65536, 256

log = logging.getLogger("dola_cpp.server")


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
               model_name: Optional[str] = None, max_body: int = DEFAULT_MAX_BODY,
               aliases: Sequence[str] = ()) -> FastAPI:
    """The ASGI app serving ``model`` (already loaded) with ``parallel`` contexts. Serve it with
    :func:`server_config`'s timeouts. /v1/models lists ``model_name`` (default: the file's name),
    then ``aliases``; a request's ``model`` may name any model: the one loaded answers it."""
    if parallel < 1:
        raise ValueError(f"parallel must be at least 1, got {parallel}")
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty: give a key, or none to serve without one")
    if max_body < 1024:
        raise ValueError(f"max_body must be at least 1024 bytes, got {max_body}")
    name = model_name or model.path.name
    names = list(dict.fromkeys([name, *(a for a in aliases if a)]))
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
        app.add_middleware(BearerAuth, key=key)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": name, "parallel": len(pool.contexts), "busy": pool.busy,
                "waiting": pool.waiting}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(n, created) for n in names]}

    @app.get("/v1/models/{model_id:path}")
    async def model_card(model_id: str) -> dict:
        if model_id not in names:
            raise APIError(404, f"the model {model_id!r} does not exist: this server lists {', '.join(map(repr, names))}",
                           param="model", code="model_not_found")
        return _model_card(model_id, created)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        raw = await read_body(request, limits.max_body)
        body, ids, extra_stop = await _off_loop(pool, _prepare_chat, model, raw, limits, templated)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await _serve(request, pool, body, ids, max_tokens, body.model or name, chat=True,
                            extra_stop=extra_stop)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        raw = await read_body(request, limits.max_body)
        return await _off_loop(pool, _tokenize, model, raw, limits)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        raw = await read_body(request, limits.max_body)
        return await _off_loop(pool, _detokenize, model, raw, limits)

    @app.post("/v1/completions")
    async def completions(request: Request):
        raw = await read_body(request, limits.max_body)
        body, ids = await _off_loop(pool, _prepare_completion, model, raw, limits)
        return await _serve(request, pool, body, ids, body.max_tokens, body.model or name, chat=False)

    return app


async def _off_loop(pool: Pool, fn, *args):
    """``fn(*args)`` on a worker thread: what scales with the request never blocks the event loop."""
    return await asyncio.get_running_loop().run_in_executor(pool.prep, fn, *args)


def _prepare_chat(model: Model, raw: bytes, limits: Limits, templated: bool) -> tuple[ChatRequest, list[int], list[str]]:
    """The request and its prompt's token ids, message content as text (on a worker thread)."""
    # every message has a "role" key, and inside a JSON string the quotes would be escaped: a body
    # with more of them than twice the messages the context could hold is refused unparsed
    if raw.count(b'"role"') > 2 * limits.n_ctx + 16:
        raise too_long("messages", limits)
    body = parse_request(raw, ChatRequest, limits, "messages")
    if len(body.messages) > limits.n_ctx or sum(len(m.text()) for m in body.messages) > limits.max_chars:
        raise too_long("messages", limits)
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
    body = parse_request(raw, CompletionRequest, limits, "prompt")
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
            raise too_long("prompt", limits)
        try:
            return body, model.tokenize(prompt, add_special=True)
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None
    if not prompt:
        raise APIError(400, "the prompt is empty", param="prompt")
    if len(prompt) > limits.n_ctx:
        raise too_long("prompt", limits)
    ids = [int(t) for t in prompt]
    try:
        model.check_prompt(ids)  # the core's message for an id outside the vocabulary
    except ValueError as e:
        raise APIError(400, str(e), param="prompt") from None
    return body, ids


def _tokenize(model: Model, raw: bytes, limits: Limits) -> dict:
    """llama-server's /tokenize: {"tokens": [ids]}, or with_pieces [{"id", "piece"}] (the piece as
    text, or its bytes where they are not UTF-8 on their own)."""
    body = parse_request(raw, TokenizeRequest, limits, "content")
    if len(body.content) > limits.max_chars:
        raise too_long("content", limits)
    try:
        ids = model.tokenize(body.content, add_special=body.add_special, parse_special=body.parse_special)
    except ValueError as e:
        raise APIError(400, str(e), param="content") from None
    if not body.with_pieces:
        return {"tokens": ids}
    pieces = []
    for t in ids:
        piece = model.token_bytes(t)
        try:
            pieces.append({"id": t, "piece": piece.decode("utf-8")})
        except UnicodeDecodeError:
            pieces.append({"id": t, "piece": list(piece)})
    return {"tokens": pieces}


def _detokenize(model: Model, raw: bytes, limits: Limits) -> dict:
    """llama-server's /detokenize: {"content": text}, special tokens as their text."""
    body = parse_request(raw, DetokenizeRequest, limits, "tokens")
    n = limits.n_ctx
    for i in range(0, len(body.tokens), n):  # the core's message for an id outside the vocabulary
        try:
            model.check_prompt(body.tokens[i:i + n])
        except ValueError as e:
            raise APIError(400, str(e), param="tokens") from None
    return {"content": model.detokenize(body.tokens, special=True)}


def _model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": OWNED_BY}


def _config(model: Model, body: CommonRequest) -> DecodeConfig:
    # each decode setting's request field (dola_cpp.settings); None decodes as the chat does
    fields = {s.name: request_value(s, getattr(body, s.server)) for s in served()}
    layers = fields["layers"]
    if isinstance(layers, str) and layers.strip().lower() in ("", "none"):
        layers = fields["layers"] = None
    try:
        DolaConfig(layers=layers)
    except (ValueError, TypeError) as e:
        raise APIError(400, f"dola_layers: {e}", param="dola_layers") from None
    try:
        config = DecodeConfig().replace(**fields)
    except (ValueError, TypeError) as e:  # DecodeConfig's messages start with the field's name
        word = str(e).split(" ")[0]
        raise APIError(400, str(e), param=word if word in fields else None) from None
    for t in config.logit_bias:  # the core's message for an id outside the vocabulary
        try:
            model.check_token(t)
        except ValueError as e:
            raise APIError(400, f"logit_bias: {e}", param="logit_bias") from None
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


async def _serve(request: Request, pool: Pool, body: CommonRequest, ids: list[int], max_tokens: Optional[int], name: str,
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
    shape = ResponseShape(ctx, rid, created, name, chat, want_logprobs, body.risk)

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
        return StreamingResponse(sse_events(job.events, shape, finish, len(ids), include_usage),
                                 media_type="text/event-stream",
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
                raise generation_error(event[1])
    finally:
        await finish()
    return shape.whole(text, steps, result)
