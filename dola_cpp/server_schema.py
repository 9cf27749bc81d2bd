"""The server's requests and errors: the request bodies (pydantic), how a body is parsed into one,
and the OpenAI-style error every refusal is.

OpenAI's fields keep OpenAI's meaning, bounds and defaults; dola-cpp's decode settings come as
extra fields made from ``dola_cpp.settings``: each setting with a ``server`` name is a field of that
name with the setting's type and default (None where the chat's default differs from the
library's: ``Setting.chat_default``, filled in when the request is decoded). Integers are bounded
in the schema (the core holds them in C++ ints); numbers are checked by ``DecodeConfig``, whose
message names the field.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from .settings import INT32_MAX, Setting, served

if TYPE_CHECKING:
    from .server import Limits


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


class OpenAIFields(_Strict):
    """The fields both endpoints take as OpenAI documents them."""

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1, le=INT32_MAX)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)  # None: the chat's greedy decoding
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Optional[int] = Field(None, ge=0, le=2**64 - 1)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, le=1)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: Optional[str] = None


def request_field(setting: Setting) -> tuple[Any, Any]:
    """``setting``'s request field (not an OpenAI one): its type and its default or ``Field``."""
    kind: Any = setting.server_type or (Literal[setting.choices] if setting.choices else setting.type)
    default = None if setting.has_chat_default else setting.default
    if default is None:
        kind = Optional[kind]
    if setting.type is int:  # a C++ int in the core
        return kind, Field(default, ge=int(setting.low), le=INT32_MAX)
    return kind, default


def request_value(setting: Setting, value: Any) -> Any:
    """What a request's ``value`` for ``setting`` decodes with: None is the chat's default."""
    return setting.chat_value if value is None else value


# OpenAI's fields, then the decode settings' (dola_cpp.settings), in the table's order
_DecodeFields = create_model("_DecodeFields", __base__=OpenAIFields, __module__=__name__,
                             **{s.server: request_field(s) for s in served() if not s.openai})


class CommonRequest(_DecodeFields):  # type: ignore[misc, valid-type]
    """The fields both endpoints take: OpenAI's, then dola-cpp's extras."""

    stop_loops: bool = True
    risk: bool = False


class ChatRequest(CommonRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=0)  # alternatives are not reported


class CompletionRequest(CommonRequest):
    prompt: Union[str, list[str], list[int]]
    logprobs: Optional[int] = Field(None, ge=0, le=0)
    echo: bool = Field(False)
    suffix: Optional[str] = None


class TokenizeRequest(_Strict):
    """llama-server's /tokenize: its fields and defaults."""

    content: str
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(_Strict):
    """llama-server's /detokenize."""

    tokens: list[int]


# ---------------------------------------------------------------------------- parsing


def too_long(what: str, limits: "Limits") -> APIError:
    return APIError(400, f"the {what} cannot fit in the {limits.n_ctx}-token context", param=what,
                    code="context_length_exceeded")


def parse_request(raw: bytes, kind: type[_Strict], limits: "Limits", what: str) -> Any:
    """The JSON body as ``kind``, or an OpenAI-style 400. A body that could not fit in the context
    whatever it holds is refused before it is parsed: JSON parsing holds the GIL."""
    if len(raw) > limits.max_json_bytes or \
            raw.count(b",") + raw.count(b"[") + raw.count(b"{") > limits.max_json_values:
        raise too_long(what, limits)
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
