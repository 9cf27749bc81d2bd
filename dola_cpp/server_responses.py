"""The server's responses: OpenAI's completion objects for one request, whole or as streamed
chunks (server-sent events), with each token's logprob and, on request, its risk."""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Optional

from .model import Model, PromptTooLongError
from .results import GenerationResult, StepInfo, finite
from .server_schema import APIError


# OpenAI's finish reasons for ours; the choice also carries ours as dola_finish_reason when they differ
FINISH = {"stop": "stop", "length": "length", "abstained": "stop", "loop": "stop", "cancelled": "stop",
          "interrupted": "stop"}


def generation_error(e: BaseException) -> APIError:
    if isinstance(e, PromptTooLongError):
        return APIError(400, str(e), code="context_length_exceeded")
    if isinstance(e, (ValueError, TypeError)):
        return APIError(400, str(e))
    return APIError(500, f"generation failed: {e}", type="server_error")


async def sse_events(events: asyncio.Queue, shape: "ResponseShape", finish, n_prompt: int,
                     include_usage: bool) -> AsyncIterator[str]:
    try:
        yield sse_event(shape.chunk(role=True))
        n_tokens = 0
        while True:
            event = await events.get()
            if event[0] == "error":
                err = generation_error(event[1])
                yield sse_event({"error": {"message": err.message, "type": err.type, "param": err.param,
                                           "code": err.code}})
                break
            if event[0] == "piece":
                n_tokens += len(event[2])
                yield sse_event(shape.chunk(text=event[1], steps=event[2]))
            else:
                result: GenerationResult = event[1]
                n_tokens += len(event[2])
                if event[2]:
                    yield sse_event(shape.chunk(text="", steps=event[2]))
                yield sse_event(shape.chunk(finish=FINISH.get(result.finish_reason, "stop"), result=result))
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
            return {"content": [{"token": p.decode("utf-8", "replace"), "logprob": finite(s.mature_logprob),
                                 "bytes": list(p), "top_logprobs": []} for p, s in zip(pieces, steps)]}
        return {"tokens": [p.decode("utf-8", "replace") for p in pieces],
                "token_logprobs": [finite(s.mature_logprob) for s in steps], "top_logprobs": None,
                "text_offset": None}

    def _risk(self, steps: list[StepInfo], result: Optional[GenerationResult] = None) -> dict:
        out: dict[str, Any] = {"tokens": [finite(s.risk) for s in steps]}
        if result is not None:
            out["answer"] = None if result.risk is None else finite(result.risk)
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
        return {**self.envelope(chunk=False), "choices": [choice],
                "usage": usage(result.prompt_tokens, len(result.tokens))}
