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
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional, Union

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


class CalledFunction(_Strict):
    name: str = Field(min_length=1, max_length=64)
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    """A call an earlier assistant message made (OpenAI's ``message.tool_calls[]``)."""

    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: CalledFunction


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None  # assistant messages: the calls it made
    tool_call_id: Optional[str] = None  # tool messages: the call this answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


FUNCTION_NAME = r"^[A-Za-z0-9_.-]{1,64}$"


class FunctionDefinition(_Strict):
    name: str = Field(pattern=FUNCTION_NAME)
    description: Optional[str] = None
    parameters: dict[str, Any]  # its arguments' JSON Schema (required here: the answer is constrained by it)
    strict: Optional[bool] = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class ChosenFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: ChosenFunction


class JSONSchemaSpec(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64)
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None


class TextFormat(_Strict):
    type: Literal["text"]


class JSONObjectFormat(_Strict):
    type: Literal["json_object"]


class JSONSchemaFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JSONSchemaSpec


ResponseFormat = Annotated[Union[TextFormat, JSONObjectFormat, JSONSchemaFormat], Field(discriminator="type")]


class StreamOptions(_Strict):
    include_usage: bool = False


MAX_CHOICES = 16  # n: samples of one prompt
MAX_LOGPROBS = 20  # OpenAI's bound on the alternatives reported per token
MAX_TOOLS = 128  # OpenAI's


class OpenAIFields(_Strict):
    """OpenAI's fields as OpenAI documents them, each once (``max_tokens`` 0 only where the
    endpoint allows it: a completion that echoes its prompt)."""

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=0, le=INT32_MAX)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)  # None: the chat's greedy decoding
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Optional[int] = Field(None, ge=0, le=2**64 - 1)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    response_format: Optional[ResponseFormat] = None
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
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: Optional[list[Tool]] = Field(None, max_length=MAX_TOOLS)
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool = True


class CompletionRequest(CommonRequest):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: Optional[str] = None


class TokenizeRequest(_Strict):
    """llama-server's /tokenize (``content``; its fields and defaults), or vLLM's (``prompt``,
    ``add_special_tokens``), as lm-evaluation-harness's remote tokenizer sends it."""

    content: Optional[str] = None
    prompt: Optional[str] = None
    add_special: bool = False
    add_special_tokens: Optional[bool] = None
    parse_special: bool = True
    with_pieces: bool = False

    def text(self) -> str:
        if (self.content is None) == (self.prompt is None):
            raise APIError(400, "give the text to tokenize as content (or prompt, not both)", param="content")
        return self.content if self.content is not None else self.prompt  # type: ignore[return-value]

    @property
    def special(self) -> bool:
        return self.add_special if self.add_special_tokens is None else self.add_special_tokens


class DetokenizeRequest(_Strict):
    """llama-server's /detokenize."""

    tokens: list[int]


# ---------------------------------------------------------------------------- parsing


_UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _is_field(part: Any) -> bool:
    """Whether a validation error's location part names a field or an index (not the member of a
    union that pydantic tried: ``literal['a','b']``, ``list[int]``, ``NamedToolChoice``)."""
    if isinstance(part, int):
        return True
    return isinstance(part, str) and part.isidentifier() and part[:1].islower() and part not in _UNION_TAGS


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
        param = ".".join(str(p) for p in first.get("loc", ()) if _is_field(p)) or None
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
