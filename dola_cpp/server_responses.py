"""The server's responses: OpenAI's completion objects for one request, whole or as streamed
chunks (server-sent events), one choice per sample, with each token's logprobs (the final
layer's; with DoLa also the contrasted distribution's), tool calls, and on request its risk."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any, AsyncIterator, Optional, Sequence

from .model import Model, PromptTooLongError
from .results import GenerationResult, StepInfo, finite
from .server_schema import APIError
from .server_tools import ToolPlan, parse_answer

if TYPE_CHECKING:
    from .server import PromptScores
    from .server_http import Metrics


# OpenAI's finish reasons for ours; the choice also carries ours as dola_finish_reason when they differ
FINISH = {"stop": "stop", "length": "length", "abstained": "stop", "loop": "stop", "cancelled": "stop",
          "interrupted": "stop"}


def generation_error(e: BaseException, grammar_param: Optional[str] = None) -> APIError:
    """The error a generation's exception is; ``grammar_param``: the field the answer's grammar came
    from, named when the grammar is what failed (a schema nothing can satisfy)."""
    if isinstance(e, PromptTooLongError):
        return APIError(400, str(e), code="context_length_exceeded")
    if isinstance(e, (ValueError, TypeError)):
        return APIError(400, str(e), param=grammar_param if "grammar" in str(e) else None)
    return APIError(500, f"generation failed: {e}", type="server_error")


async def sse_events(events: asyncio.Queue, shape: "ResponseShape", finish, n_prompt: int,
                     include_usage: bool, indexes: Sequence[int]) -> AsyncIterator[str]:
    try:
        for i in indexes:
            yield sse_event(shape.chunk(i, role=True))
        n_tokens = 0
        held: dict[int, tuple[str, list[StepInfo]]] = {i: ("", []) for i in indexes}  # tool answers, parsed whole
        while True:
            event = await events.get()
            kind = event[0]
            if kind == "error":
                err = generation_error(event[1], shape.grammar_param)
                yield sse_event({"error": {"message": err.message, "type": err.type, "param": err.param,
                                           "code": err.code}})
                break
            if kind == "echo":
                yield sse_event(shape.chunk(event[1], text=shape.echo_text.get(event[1], ""), echo=event[2]))
            elif kind == "piece":
                i, text, steps = event[1], event[2], event[3]
                if shape.tools is not None:
                    held[i] = (held[i][0] + text, held[i][1] + steps)
                else:
                    yield sse_event(shape.chunk(i, text=text, steps=steps))
            elif kind == "done":
                i, result, steps = event[1], event[2], event[3]
                n_tokens += len(result.tokens) if result is not None else 0
                shape.record(result)
                calls = None
                if shape.tools is not None:
                    text, all_steps = held[i][0], held[i][1] + steps
                    answer = parse_answer(text, shape.tools)
                    calls = answer.tool_calls
                    yield sse_event(shape.chunk(i, text=answer.content, steps=all_steps, tool_calls=calls))
                elif steps:
                    yield sse_event(shape.chunk(i, text="", steps=steps))
                yield sse_event(shape.chunk(i, finish=shape.finish_reason(result, calls), result=result))
            else:  # end
                if include_usage:
                    yield sse_event({**shape.envelope(), "choices": [], "usage": usage(n_prompt, n_tokens)})
                break
        yield "data: [DONE]\n\n"
    finally:  # also when the client went away: the generation stops at once
        await finish()


def sse_event(obj: dict) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


def usage(n_prompt: int, n_completion: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}


class ResponseShape:
    """The OpenAI response objects for one request. ``n_top``: logprobs with that many
    alternatives per token (None: no logprobs); ``echo_text``: each choice's echoed prompt."""

    def __init__(self, model: Model, rid: str, created: int, name: str, chat: bool, n_top: Optional[int],
                 risk: bool, contrasted: bool = False, tools: Optional[ToolPlan] = None,
                 grammar_param: Optional[str] = None, echo_text: Optional[dict[int, str]] = None,
                 metrics: Optional["Metrics"] = None) -> None:
        self.model, self.rid, self.created, self.name = model, rid, created, name
        self.chat, self.n_top, self.risk, self.tools = chat, n_top, risk, tools
        self.contrasted = contrasted  # a decoder contrasts (DoLa, Activation): its distribution is reported too
        self.echo_text = echo_text or {}
        self.grammar_param = grammar_param
        self.metrics = metrics
        self._offsets: dict[int, int] = {}  # completions' text_offset so far, per choice

    def envelope(self, chunk: bool = True) -> dict:
        if self.chat:
            kind = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            kind = "text_completion"
        return {"id": self.rid, "object": kind, "created": self.created, "model": self.name}

    def record(self, result: Optional[GenerationResult]) -> None:
        if self.metrics is not None and result is not None:
            self.metrics.generated(result.decoder, len(result.tokens))

    def finish_reason(self, result: Optional[GenerationResult], calls: Optional[list] = None) -> str:
        if calls:
            return "tool_calls"
        return "length" if result is None else FINISH.get(result.finish_reason, "stop")

    # ------------------------------------------------------------------ logprobs

    def _piece(self, token: int) -> bytes:
        return self.model.token_bytes(token)

    def _alternatives(self, pairs: Sequence[tuple[int, float]]) -> list[dict]:
        out = []
        for t, lp in list(pairs)[: self.n_top or 0]:
            p = self._piece(t)
            out.append({"token": p.decode("utf-8", "replace"), "logprob": finite(lp), "bytes": list(p)})
        return out

    def _legacy_top(self, pairs: Sequence[tuple[int, float]]) -> dict[str, Optional[float]]:
        out: dict[str, Optional[float]] = {}
        for t, lp in list(pairs)[: self.n_top or 0]:
            out.setdefault(self._piece(t).decode("utf-8", "replace"), finite(lp))
        return out

    def _logprobs(self, index: int, steps: list[StepInfo], echo: Optional["PromptScores"] = None) -> Optional[dict]:
        if self.n_top is None:
            return None
        dola = self.contrasted
        if self.chat:
            content = []
            for s in steps:
                p = self._piece(s.token)
                entry: dict[str, Any] = {"token": p.decode("utf-8", "replace"), "logprob": finite(s.mature_logprob),
                                         "bytes": list(p),
                                         "top_logprobs": self._alternatives(s.top_logprobs)}
                if dola:
                    entry["dola_logprob"] = _maybe(s.dola_logprob)
                    entry["dola_top_logprobs"] = self._alternatives(s.dola_top_logprobs)
                content.append(entry)
            return {"content": content}
        tokens: list[str] = []
        values: list[Optional[float]] = []
        tops: list[Optional[dict]] = []
        offsets: list[int] = []
        model_values: list[Optional[float]] = []  # echo with a decoder: the final layer's beside its scores
        dola_values: list[Optional[float]] = []
        dola_tops: list[Optional[dict]] = []
        offset = self._offsets.get(index, 0)
        if echo is not None:
            for k, t in enumerate(echo.tokens):
                text = self._piece(t).decode("utf-8", "replace")
                tokens.append(text)
                values.append(_maybe(echo.logprobs[k]))
                model_values.append(_maybe(echo.model_logprobs[k]))
                tops.append(None if k == 0 else self._legacy_top(echo.top[k]))
                dola_values.append(_maybe(echo.logprobs[k]))
                dola_tops.append(None)
                offsets.append(offset)
                offset += len(text)
        for s in steps:
            text = self._piece(s.token).decode("utf-8", "replace")
            tokens.append(text)
            values.append(finite(s.mature_logprob))
            model_values.append(finite(s.mature_logprob))
            tops.append(self._legacy_top(s.top_logprobs))
            dola_values.append(_maybe(s.dola_logprob))
            dola_tops.append(self._legacy_top(s.dola_top_logprobs))
            offsets.append(offset)
            offset += len(text)
        self._offsets[index] = offset
        out: dict[str, Any] = {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
                               "text_offset": offsets}
        if dola:
            out["dola_token_logprobs"] = dola_values
            out["dola_top_logprobs"] = dola_tops
            if echo is not None:
                out["model_token_logprobs"] = model_values
        return out

    def _risk(self, steps: list[StepInfo], result: Optional[GenerationResult] = None) -> dict:
        out: dict[str, Any] = {"tokens": [finite(s.risk) for s in steps]}
        if result is not None:
            out["answer"] = None if result.risk is None else finite(result.risk)
        return out

    # ------------------------------------------------------------------ objects

    def chunk(self, index: int, text: Optional[str] = None, steps: Optional[list[StepInfo]] = None,
              role: bool = False, finish: Optional[str] = None, result: Optional[GenerationResult] = None,
              tool_calls: Optional[list[dict]] = None, echo: Optional["PromptScores"] = None) -> dict:
        steps = steps or []
        choice: dict[str, Any] = {"index": index}
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta = {"role": "assistant", "content": ""}
            elif tool_calls:
                delta = {"tool_calls": [{"index": k, **c} for k, c in enumerate(tool_calls)]}
            elif text is not None:
                delta = {"content": text}
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        choice["logprobs"] = self._logprobs(index, steps, echo) if steps or echo is not None else None
        choice["finish_reason"] = finish
        if result is not None and FINISH.get(result.finish_reason) != result.finish_reason:
            choice["dola_finish_reason"] = result.finish_reason
        if self.risk and (steps or result is not None):
            choice["risk"] = self._risk(steps, result)
        return {**self.envelope(), "choices": [choice]}

    def _choice(self, index: int, text: str, steps: list[StepInfo], result: Optional[GenerationResult],
                echo: Optional["PromptScores"]) -> dict:
        choice: dict[str, Any] = {"index": index}
        calls = None
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if self.tools is not None:
                answer = parse_answer(text, self.tools)
                calls = answer.tool_calls
                message = {"role": "assistant", "content": answer.content}
                if calls:
                    message["tool_calls"] = calls
            choice["message"] = message
        else:
            choice["text"] = self.echo_text.get(index, "") + text
        choice["logprobs"] = self._logprobs(index, steps, echo)
        choice["finish_reason"] = self.finish_reason(result, calls)
        if result is not None and FINISH.get(result.finish_reason) != result.finish_reason:
            choice["dola_finish_reason"] = result.finish_reason
        if self.risk:
            choice["risk"] = self._risk(steps, result)
        return choice

    def whole(self, choices: Sequence[tuple[int, str, list[StepInfo], Optional[GenerationResult],
                                            Optional["PromptScores"]]], n_prompt: int) -> dict:
        for c in choices:
            self.record(c[3])
        n_completion = sum(len(r.tokens) for _, _, _, r, _ in choices if r is not None)
        return {**self.envelope(chunk=False), "choices": [self._choice(*c) for c in choices],
                "usage": usage(n_prompt, n_completion)}


def _maybe(x: Optional[float]) -> Optional[float]:
    return None if x is None else finite(x)
