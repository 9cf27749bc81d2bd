"""``dola-cpp serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) with DoLa.

``POST /v1/chat/completions`` and ``/v1/completions`` (streamed as server-sent events or not),
``GET /v1/models``, ``GET /health``, ``GET /metrics``, and the tokenizer endpoints of llama-server
and vLLM. OpenAI's fields behave as OpenAI documents them (``n`` choices decode together,
``logprobs``, ``echo`` scoring, ``response_format`` and ``tools`` through a grammar); DoLa and the
other decoders come as extra body fields (``dola_layers``, ``repetition_penalty``,
``premature_norm``, ``decoder``, ``alpha``, ...; ``risk: true`` adds each token's risk), or as
server-wide defaults for requests that leave them out.

Requests decode as ``parallel`` sequences of one context (``Model.batch``: continuous batching,
one llama.cpp call for the next token of every running answer each step, new prompts decoded in
chunks in the same step); requests beyond them wait in a bounded queue, and one that finds the queue full gets HTTP
503 with ``Retry-After``. A client that disconnects cancels its generation at once. Errors are
OpenAI-style JSON bodies.

Requests are untrusted: message content is tokenized as text (only the chat template's markup is
special); a body is bounded (``max_body``, 413) and so is the work it can cause: what the context
cannot hold is refused before it is parsed or tokenized, and parsing, templating and tokenizing
run on worker threads, never on the event loop. Connections that send their headers too slowly
are closed (``server_config``).

Here: the contexts, the jobs and the endpoints. The request schema (made from
``dola_cpp.settings``), its parsing and the errors are ``server_schema``; the API key, the
timeouts, the body's limit and /metrics' counters ``server_http``; the response objects
``server_responses``; tools, structured output and tool turns ``server_tools``.

Needs the ``server`` extra: ``pip install 'dola-cpp[server]'``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import CHAT_MAX_TOKENS, DecodeConfig, DolaConfig
from .constrain import JSON_OBJECT_GRAMMAR, json_schema_grammar
from .model import DEFAULT_CACHE_MIB, Model
from .prompts import TRANSCRIPT_STOP
from .server_http import (  # noqa: F401  (server_config and the timeouts: where they have always been imported from)
    BODY_TIMEOUT, HEADER_TIMEOUT, IDLE_TIMEOUT, BearerAuth, CountRequests, Metrics, read_body, server_config,
)
from .server_responses import ResponseShape, generation_error, sse_events
from .server_schema import (  # noqa: F401  (the request schema, for clients of this module)
    APIError, ChatRequest, CommonRequest, CompletionRequest, Message, StreamOptions, TextPart, parse_request,
    DetokenizeRequest, TokenizeRequest, request_value, too_long,
)
from .server_tools import ToolPlan, check_schema, conversation, tool_plan
from .settings import served
from .stream import Stream

OWNED_BY = "dola-cpp"
DEFAULT_MAX_BODY = 8 * 2**20  # bytes of one request body; more is HTTP 413
MAX_RUNS = 128  # choices of one completion request: prompts x n
DISCONNECT_POLL = 0.25  # seconds between checks that a non-streaming request's client is still there
# JSON spends at most this many bytes on one byte of text (a \u00XX escape), and a request's
# fields and markup at most this many on top of its text
_JSON_BYTES_PER_BYTE, _FIELD_BYTES, _FIELD_BYTES_PER_MESSAGE = 6, 65536, 256

log = logging.getLogger("dola_cpp.server")


# ---------------------------------------------------------------------------- contexts


class Busy(Exception):
    pass


class Pool:
    """The sequences requests decode on: ``parallel`` sequences of one context (continuous
    batching: one llama.cpp call carries every running answer's next token), a bounded queue of
    ``max_queue`` requests waiting for one, and the loaded model's own context, which scores
    prompts (``echo``) one request at a time.

    Up to ``parallel`` of the waiting requests are prepared and handed to the batch ahead of time
    (lanes beyond ``parallel``): its engine starts the next one in the step a sequence frees, with
    no Python between one answer's end and the next one's start."""

    def __init__(self, model: Model, parallel: int, max_queue: int, cache_mib: float) -> None:
        self.model = model
        self.parallel = parallel
        self.batch = model.batch(parallel, n_threads=model.n_threads, cache_mib=cache_mib)
        self.scoring = threading.Lock()
        self.ahead = min(parallel, max_queue)  # waiting requests handed to the batch's own queue
        self.lanes = parallel + self.ahead
        self.max_queue = max_queue - self.ahead  # waiting here, for a lane
        self.waiting = 0
        self._free: Optional[asyncio.Queue] = None
        self.executor = ThreadPoolExecutor(max_workers=self.lanes, thread_name_prefix="dola-gen")
        # parsing, templates and tokenization: off the event loop, beside the generations
        self.prep = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dola-prep")

    def _queue(self) -> asyncio.Queue:
        if self._free is None:  # made on the server's event loop
            self._free = asyncio.Queue()
            for lane in range(self.lanes):
                self._free.put_nowait(lane)
        return self._free

    @property
    def busy(self) -> int:
        """Requests generating (at most ``parallel``)."""
        return min(self.parallel, self.lanes - self._queue().qsize())

    @property
    def queued(self) -> int:
        """Requests waiting: for a lane, and handed to the batch ahead of a free sequence."""
        return self.waiting + max(0, self.lanes - self._queue().qsize() - self.parallel)

    async def acquire(self) -> int:
        free = self._queue()
        if free.empty() and self.waiting >= self.max_queue:
            raise Busy()
        self.waiting += 1
        try:
            return await free.get()
        finally:
            self.waiting -= 1

    def release(self, lane: int) -> None:
        self._queue().put_nowait(lane)


@dataclass
class Run:
    """One choice of a request: a generation of ``max_tokens`` tokens from ``ids`` (none: only the
    prompt's scores), and with ``echo`` set the prompt's own log-probabilities first."""

    index: int
    ids: list[int]
    max_tokens: int
    config: DecodeConfig
    echo: Optional[int] = None  # completions' echo with logprobs: the alternatives per prompt token
    # report the one token even when it ends the answer (a completion of one token with logprobs:
    # a harness's scoring request drops that last entry, so it must be there)
    keep_end: bool = False


@dataclass
class Job:
    """A request's choices as sequences of the pool's batch, decoding together (read in turns on a
    worker thread); events reach the event loop through ``events``: ("piece", index, text, steps),
    ("echo", index, scores), ("done", index, result or None, steps), then ("end",), or
    ("error", exception)."""

    pool: Pool
    runs: list[Run]
    stop: list[str]
    stop_loops: bool = True
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    streams: list[Stream] = field(default_factory=list)

    def run(self, loop: asyncio.AbstractEventLoop) -> None:
        def emit(*event: Any) -> None:
            loop.call_soon_threadsafe(self.events.put_nowait, event)

        running: list[tuple[Run, Stream]] = []
        try:
            for r in self.runs:
                if self.cancelled.is_set():
                    break
                if r.echo is not None:
                    with self.pool.scoring:
                        emit("echo", r.index, prompt_scores(self.pool.model, r.ids, r.config, r.echo))
                if r.max_tokens == 0:
                    emit("done", r.index, None, [])
                    continue
                stream = self.pool.batch.stream(r.ids, r.max_tokens, config=r.config, stop=self.stop,
                                                stop_loops=self.stop_loops, ignore_eos=r.keep_end)
                self.streams.append(stream)
                if self.cancelled.is_set():  # cancel() may have missed it
                    stream.sequence.cancel()
                stream.start()
                running.append((r, stream))
            seen = {r.index: 0 for r, _ in running}
            while running:
                for item in list(running):
                    r, stream = item
                    piece = next(stream, None)
                    if piece is not None:
                        emit("piece", r.index, piece, stream.steps[seen[r.index]:])
                        seen[r.index] = len(stream.steps)
                        continue
                    running.remove(item)
                    result = stream.result()
                    if r.keep_end and result.tokens and result.tokens[-1] in self.pool.model.eog_tokens:
                        result = dataclasses.replace(result, finish_reason="stop")
                    emit("done", r.index, result, stream.steps[seen[r.index]:])
            emit("end")
        except BaseException as e:  # reported to the request, never raised in the worker
            emit("error", e)
        finally:
            for _, stream in running:
                stream.close()

    def cancel(self) -> None:
        self.cancelled.set()
        for stream in list(self.streams):
            stream.sequence.cancel()


@dataclass(frozen=True)
class PromptScores:
    """A prompt's tokens and, from the second on, each one's score given those before it
    (``Model.score``'s: the final layer's log-probability for plain decoding, the decoder's
    contrasted score with DoLa or Activation Decoding), the final layer's log-probability, and
    the final layer's most probable alternatives."""

    tokens: list[int]
    logprobs: list[Optional[float]]
    model_logprobs: list[Optional[float]]
    top: list[list[tuple[int, float]]]


def prompt_scores(ctx: Model, ids: list[int], config: DecodeConfig, n_top: int) -> PromptScores:
    if len(ids) < 2:
        return PromptScores(list(ids), [None] * len(ids), [None] * len(ids), [[] for _ in ids])
    r = ctx.score(ids[:1], ids[1:], config=config, top_logprobs=n_top)
    tops = [list(row) for row in r.top_tokens] if n_top else [[] for _ in ids[1:]]
    return PromptScores(list(ids), [None] + [float(v) for v in r.token_scores],
                        [None] + [float(v) for v in r.mature_logprobs], [[]] + tops)


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
               aliases: Sequence[str] = (), defaults: Optional[Mapping[str, Any]] = None,
               cache_mib: float = DEFAULT_CACHE_MIB) -> FastAPI:
    """The ASGI app serving ``model`` (already loaded) with ``parallel`` contexts. Serve it with
    :func:`server_config`'s timeouts. /v1/models lists ``model_name`` (default: the file's name),
    then ``aliases``; a request's ``model`` may name any model: the one loaded answers it.
    ``defaults``: request fields' values (``{"dola_layers": "high"}``) for requests that leave
    them out, e.g. for clients that cannot send dola-cpp's fields. ``cache_mib``: the batch's
    prompt cache (:meth:`Model.batch`)."""
    if parallel < 1:
        raise ValueError(f"parallel must be at least 1, got {parallel}")
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty: give a key, or none to serve without one")
    if max_body < 1024:
        raise ValueError(f"max_body must be at least 1024 bytes, got {max_body}")
    defaults = _checked_defaults(model, defaults or {})
    name = model_name or model.path.name
    names = list(dict.fromkeys([name, *(a for a in aliases if a)]))
    pool = Pool(model, parallel, 4 * parallel if max_queue is None else max_queue, cache_mib)
    limits = Limits.of(model, max_body)
    created = int(time.time())
    templated = model.chat_template_supported  # else chats are plain transcripts, as in the CLI
    key = api_key.encode() if api_key is not None else None
    metrics = Metrics()
    meta = _model_meta(model)
    app = FastAPI(title="dola-cpp", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pool = pool
    app.state.limits = limits
    app.state.metrics = metrics

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
    app.add_middleware(CountRequests, metrics=metrics)  # outermost: refusals by the key count too

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": name, "parallel": pool.parallel, "busy": pool.busy,
                "free": pool.parallel - pool.busy, "waiting": pool.queued}

    @app.get("/metrics")
    async def metrics_text() -> PlainTextResponse:
        gauges = {"contexts": ("Sequences decoded together (--parallel).", float(pool.parallel)),
                  "contexts_busy": ("Sequences generating now.", float(pool.busy)),
                  "requests_waiting": ("Requests waiting for a sequence.", float(pool.queued)),
                  "n_ctx": ("Tokens each sequence holds.", float(limits.n_ctx))}
        st = pool.batch.stats()
        gauges["prompt_cache_bytes"] = ("Bytes of earlier prompts' KV cells kept (--cache-ram).", float(st["cache_bytes"]))
        gauges["prompt_cache_entries"] = ("Earlier prompts kept.", float(st["cache_entries"]))
        counters = {"llama_calls_total": ("llama.cpp decode calls of the batch.", float(st["n_decodes"])),
                    "llama_call_tokens_total": ("Tokens those calls carried (answers' and prompts').",
                                                float(st["n_decoded_tokens"])),
                    "llama_call_seconds_total": ("Seconds spent in those calls.", st["decode_ms"] / 1000),
                    "prompt_cache_hits_total": ("Requests that started from a kept prompt.", float(st["n_cache_hits"])),
                    "prompt_cache_tokens_total": ("Prompt tokens taken from kept prompts, not decoded.",
                                                  float(st["n_cache_tokens"]))}
        return PlainTextResponse(metrics.text(gauges, counters), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(n, created, meta) for n in names]}

    @app.get("/v1/models/{model_id:path}")
    async def model_card(model_id: str) -> dict:
        if model_id not in names:
            raise APIError(404, f"the model {model_id!r} does not exist: this server lists {', '.join(map(repr, names))}",
                           param="model", code="model_not_found")
        return _model_card(model_id, created, meta)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        raw = await read_body(request, limits.max_body)
        prep = await _off_loop(pool, _prepare_chat, model, raw, limits, templated)
        return await _serve(request, pool, metrics, prep, prep.body.model or name, defaults)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        raw = await read_body(request, limits.max_body)
        return await _off_loop(pool, _tokenize, model, raw, limits)

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        # vLLM's: what lm-evaluation-harness's remote tokenizer asks before it tokenizes here
        eog = model.eog_tokens
        return {"eos_token": model.detokenize(eog[:1], special=True) if eog else None, "bos_token": None,
                "pad_token": None, "model_max_length": limits.n_ctx}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        raw = await read_body(request, limits.max_body)
        return await _off_loop(pool, _detokenize, model, raw, limits)

    @app.post("/v1/completions")
    async def completions(request: Request):
        raw = await read_body(request, limits.max_body)
        prep = await _off_loop(pool, _prepare_completion, model, raw, limits)
        return await _serve(request, pool, metrics, prep, prep.body.model or name, defaults)

    return app


def _checked_defaults(model: Model, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``defaults`` if each is a decode setting's request field with a valid value (ValueError
    naming the field otherwise)."""
    fields = {s.server for s in served()}
    for k in defaults:
        if k not in fields:
            raise ValueError(f"{k!r} is not a decode setting's request field ({', '.join(sorted(fields))})")
    try:
        body = ChatRequest.model_validate({"messages": [{"role": "user", "content": "-"}], **defaults})
        _config(model, body, {})
    except ValidationError as e:
        raise ValueError(f"a default is not valid: {e.errors()[0].get('msg')} "
                         f"({'.'.join(str(p) for p in e.errors()[0].get('loc', ()))})") from None
    except APIError as e:
        raise ValueError(f"a default is not valid: {e.message}") from None
    return dict(defaults)


async def _off_loop(pool: Pool, fn, *args):
    """``fn(*args)`` on a worker thread: what scales with the request never blocks the event loop."""
    return await asyncio.get_running_loop().run_in_executor(pool.prep, fn, *args)


@dataclass
class Prepared:
    """A parsed request: its prompts' token ids (one for a chat; a completion may send several),
    what else it stops at, the grammar its answers are held to, and its tools."""

    body: CommonRequest
    prompts: list[list[int]]
    chat: bool
    max_tokens: Optional[int]
    extra_stop: list[str] = field(default_factory=list)
    grammar: Optional[str] = None
    tools: Optional[ToolPlan] = None
    n_top: Optional[int] = None  # logprobs: the alternatives per token (None: no logprobs)
    texts: list[Optional[str]] = field(default_factory=list)  # a completion's text prompts, as sent


def _grammar(model: Model, body: CommonRequest, plan: Optional[ToolPlan]) -> Optional[str]:
    """The grammar of the answer: the tools' answer schema's, or response_format's (checked here,
    so that nothing the converter refuses reaches the core)."""
    fmt = body.response_format
    if plan is not None:
        if fmt is not None and fmt.type != "text":
            raise APIError(400, "response_format cannot be combined with tools (a tool answer is JSON already); "
                                "leave one out", param="response_format")
        return _schema_grammar(model, plan.schema, "tools")
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return JSON_OBJECT_GRAMMAR
    schema = fmt.json_schema.schema_
    if schema is None:
        return JSON_OBJECT_GRAMMAR
    check_schema(schema, "response_format.json_schema.schema", "response_format")
    return _schema_grammar(model, schema, "response_format")


def _schema_grammar(model: Model, schema: dict, param: str) -> str:
    try:
        grammar = json_schema_grammar(schema)
        model.check_grammar(grammar)  # what llama.cpp's grammar parser refuses (a repetition too large, ...)
    except (ValueError, TypeError, RecursionError) as e:
        raise APIError(400, f"{param}: the JSON schema cannot be used: {e}", param=param,
                       code="unsupported_schema") from None
    return grammar


def _prepare_chat(model: Model, raw: bytes, limits: Limits, templated: bool) -> Prepared:
    """The request and its prompt's token ids, message content as text (on a worker thread)."""
    # every message has a "role" key, and inside a JSON string the quotes would be escaped: a body
    # with more of them than twice the messages the context could hold is refused unparsed
    if raw.count(b'"role"') > 2 * limits.n_ctx + 16:
        raise too_long("messages", limits)
    body = parse_request(raw, ChatRequest, limits, "messages")
    if len(body.messages) > limits.n_ctx or sum(len(m.text()) for m in body.messages) > limits.max_chars:
        raise too_long("messages", limits)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    plan = tool_plan(body)
    grammar = _grammar(model, body, plan)
    messages = conversation(body.messages, plan)
    if sum(len(m["content"]) for m in messages) > limits.max_chars:
        raise too_long("messages", limits)
    try:
        ids = model.chat_tokens(messages, template=templated)
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    # without a template, as the CLI's chat: a transcript, ending at the next turn
    return Prepared(body, [ids], True, max_tokens, [] if templated else [TRANSCRIPT_STOP], grammar, plan,
                    (body.top_logprobs or 0) if body.logprobs else None)


def _prepare_completion(model: Model, raw: bytes, limits: Limits) -> Prepared:
    """The request and its prompts' token ids (a text prompt is a raw prompt: its special-token
    text is parsed, as llama-server does)."""
    body = parse_request(raw, CompletionRequest, limits, "prompt")
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    given = body.prompt
    prompts: list[Union[str, list[int]]]
    if isinstance(given, str) or (given and isinstance(given[0], int)):
        prompts = [given]  # type: ignore[list-item]
    else:
        prompts = list(given)  # type: ignore[arg-type]
    if not prompts:
        raise APIError(400, "the prompt is empty", param="prompt")
    if len(prompts) * body.n > MAX_RUNS:
        raise APIError(400, f"{len(prompts)} prompts x n = {body.n} asks for {len(prompts) * body.n} choices; "
                            f"at most {MAX_RUNS} per request", param="prompt")
    out = []
    chars = 0
    for p in prompts:
        if isinstance(p, str):
            chars += len(p)
            if not p:
                raise APIError(400, "the prompt is empty", param="prompt")
            if chars > limits.max_chars * len(prompts) or len(p) > limits.max_chars:
                raise too_long("prompt", limits)
            try:
                out.append(model.tokenize(p, add_special=True))
            except ValueError as e:
                raise APIError(400, str(e), param="prompt") from None
            continue
        if not p:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(p) > limits.n_ctx:
            raise too_long("prompt", limits)
        ids = [int(t) for t in p]
        try:
            model.check_prompt(ids)  # the core's message for an id outside the vocabulary
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None
        out.append(ids)
    grammar = _grammar(model, body, None)
    return Prepared(body, out, False, body.max_tokens, grammar=grammar, n_top=body.logprobs,
                    texts=[p if isinstance(p, str) else None for p in prompts])


def _tokenize(model: Model, raw: bytes, limits: Limits) -> dict:
    """llama-server's /tokenize: {"tokens": [ids]}, or with_pieces [{"id", "piece"}] (the piece as
    text, or its bytes where they are not UTF-8 on their own)."""
    body = parse_request(raw, TokenizeRequest, limits, "content")
    text = body.text()
    if len(text) > limits.max_chars:
        raise too_long("content", limits)
    try:
        ids = model.tokenize(text, add_special=body.special, parse_special=body.parse_special)
    except ValueError as e:
        raise APIError(400, str(e), param="content") from None
    if not body.with_pieces:
        return {"tokens": ids, "count": len(ids), "max_model_len": limits.n_ctx}
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
    text = model.detokenize(body.tokens, special=True)
    return {"content": text, "prompt": text}  # llama-server's name, and vLLM's


def _model_meta(model: Model) -> dict:
    """llama-server's ``meta`` of a model card: what a client needs to size its requests."""
    try:
        size = model.path.stat().st_size
    except OSError:
        size = None
    return {"n_ctx": model.n_ctx, "n_ctx_train": model.n_ctx_train, "n_vocab": model.n_vocab,
            "n_embd": model.n_embd, "n_layer": model.n_layers, "architecture": model.architecture,
            "size": size, "chat_template": model.chat_template_supported}


def _model_card(name: str, created: int, meta: dict) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": OWNED_BY, "meta": meta}


def _given(body: CommonRequest, field_name: str, defaults: Mapping[str, Any]) -> Any:
    """The request's value of a field, or the server's default for it where the request left it out."""
    if field_name in defaults and field_name not in body.model_fields_set:
        return defaults[field_name]
    return getattr(body, field_name)


def _config(model: Model, body: CommonRequest, defaults: Mapping[str, Any] = {}) -> DecodeConfig:  # noqa: B006
    # each decode setting's request field (dola_cpp.settings); None decodes as the chat does
    fields = {s.name: request_value(s, _given(body, s.server, defaults)) for s in served()}
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
    if plan.is_plain and not config.uses_activation and _given(body, "premature_norm", defaults) is None:
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


def _choice_seed(seed: Optional[int], index: int) -> Optional[int]:
    """Choice ``index``'s seed: the request's for the first, then one derived from it (the core
    takes 32 bits; 0xFFFFFFFF would mean a random seed there)."""
    if seed is None:
        return None
    if index == 0 and seed & 0xFFFFFFFF != 0xFFFFFFFF:
        return seed
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % 0xFFFFFFFF


def _runs(prep: Prepared, config: DecodeConfig, n_ctx: int) -> list[Run]:
    """The request's choices: n per prompt, each within the context, checked before any runs."""
    body = prep.body
    n = body.n
    echo = bool(getattr(body, "echo", False))
    runs = []
    for p, ids in enumerate(prep.prompts):
        what = "messages" if prep.chat else "prompt"
        if len(ids) >= n_ctx:
            raise APIError(400, f"the prompt has {len(ids)} tokens but the context holds {n_ctx} (with at least one "
                                f"for the answer)", param=what, code="context_length_exceeded")
        room = n_ctx - len(ids) + 1
        max_tokens = prep.max_tokens
        if max_tokens is None:  # the chat's budget, which eos_boost ends answers within
            max_tokens = min(room // n, CHAT_MAX_TOKENS)
            if max_tokens < 1:
                raise APIError(400, f"n is {n}, but the prompt's {len(ids)} tokens leave room for {room} in the "
                                    f"{n_ctx}-token context: less than one token per choice", param="n",
                               code="context_length_exceeded")
        if max_tokens < 1 and prep.chat:  # a completion may ask for none: its prompt's scores (echo)
            raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        if max_tokens > room:
            raise APIError(400, f"max_tokens is {max_tokens} but the prompt's {len(ids)} tokens leave room for {room} "
                                f"in the {n_ctx}-token context", param="max_tokens", code="context_length_exceeded")
        if n * max_tokens > room:
            raise APIError(400, f"n = {n} choices of max_tokens = {max_tokens} and the prompt's {len(ids)} tokens "
                                f"need more than the {n_ctx}-token context; ask for fewer choices or tokens",
                           param="n", code="context_length_exceeded")
        for j in range(n):
            runs.append(Run(p * n + j, ids, max_tokens, config.replace(seed=_choice_seed(config.seed, j)),
                            echo=prep.n_top if echo and prep.n_top is not None else None,
                            keep_end=not prep.chat and prep.n_top is not None and max_tokens == 1))
    return runs


async def _serve(request: Request, pool: Pool, metrics: Metrics, prep: Prepared, name: str,
                 defaults: Mapping[str, Any]):
    body = prep.body
    model = pool.model
    config = _config(model, body, defaults)
    contrasted = not (model.resolve_layers(config.dola.layers).is_plain and not config.uses_activation)
    if prep.n_top:
        config = config.replace(top_logprobs=prep.n_top)
    if prep.grammar is not None:
        config = config.replace(grammar=prep.grammar)
    runs = _runs(prep, config, model.n_ctx)
    stop = _stops(body.stop) + list(prep.extra_stop)
    try:
        lane = await pool.acquire()
    except Busy:
        raise APIError(503, "the server is busy: every context is generating and the queue is full; retry shortly",
                       type="server_error", code="server_busy", headers={"Retry-After": "1"}) from None
    n_prompt = sum(len(ids) for ids in prep.prompts)
    metrics.prompt_tokens += n_prompt
    metrics.scored_tokens += sum(len(r.ids) - 1 for r in runs if r.echo is not None)
    loop = asyncio.get_running_loop()
    job = Job(pool, runs, stop, stop_loops=body.stop_loops)
    future = loop.run_in_executor(pool.executor, job.run, loop)
    rid = ("chatcmpl-" if prep.chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    shape = ResponseShape(model, rid, created, name, prep.chat, prep.n_top, body.risk, contrasted, tools=prep.tools,
                          grammar_param=None if prep.grammar is None else "tools" if prep.tools else "response_format",
                          echo_text=_echo_texts(prep, model) if getattr(body, "echo", False) else {},
                          metrics=metrics)

    async def release_when_done() -> None:
        # the context goes back when its generation has ended, however the request ended
        try:
            await future
        finally:
            pool.release(lane)

    released = asyncio.ensure_future(release_when_done())

    async def finish() -> None:
        # only while it runs: once it has ended the context may already serve another request
        # (both run on the event loop, so nothing is released between the check and the cancel)
        if not future.done():
            job.cancel()
        await asyncio.shield(released)

    indexes = [r.index for r in runs]
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(sse_events(job.events, shape, finish, n_prompt, include_usage, indexes),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        texts = {i: "" for i in indexes}
        steps: dict[int, list] = {i: [] for i in indexes}
        results: dict[int, Any] = {}
        echoes: dict[int, PromptScores] = {}
        checked = time.monotonic()
        while True:
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
            kind = event[0]
            if kind == "piece":
                texts[event[1]] += event[2]
                steps[event[1]] += event[3]
            elif kind == "echo":
                echoes[event[1]] = event[2]
            elif kind == "done":
                results[event[1]] = event[2]
                steps[event[1]] += event[3]
            elif kind == "end":
                break
            else:
                raise generation_error(event[1], shape.grammar_param)
    finally:
        await finish()
    return shape.whole([(i, texts[i], steps[i], results.get(i), echoes.get(i)) for i in indexes], n_prompt)


def _echo_texts(prep: Prepared, model: Model) -> dict[int, str]:
    """Each choice's echoed prompt: the text as sent, or token ids' text."""
    n = prep.body.n
    out = {}
    for p, ids in enumerate(prep.prompts):
        given = prep.texts[p] if p < len(prep.texts) else None
        text = given if given is not None else model.detokenize(ids)
        out.update({p * n + j: text for j in range(n)})
    return out
