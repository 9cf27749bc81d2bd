"""Tools and structured output for the server: OpenAI's ``tools``, ``tool_choice`` and
``response_format`` as a JSON schema the answer is constrained to, and the conversation's tool
turns as text any chat template can hold.

Tool calls use one generic JSON format, whatever the model's template: a system message lists
the tools (their names, descriptions and parameters' JSON Schemas) and the answer's shape, and
the answer is constrained by the grammar made from that shape's schema:
``{"tool_calls": [{"name": ..., "arguments": {...}}, ...]}`` (one call unless
``parallel_tool_calls``), or with ``tool_choice: "auto"`` that or ``{"response": "..."}``. The
answer therefore always parses. Tool definitions are untrusted text, like message content: they
reach the model as the content of a system message (tokenized as text), never as template
markup.

Earlier turns: an assistant message's ``tool_calls`` become the JSON it would have written, a
``tool`` message a user turn that names the call it answers.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .server_schema import APIError, ChatRequest, Message, NamedToolChoice

# the JSON Schema keywords a "type" may name, and those whose values are schemas
_TYPES = {"string", "number", "integer", "boolean", "object", "array", "null"}
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_ONE = ("items", "additionalProperties", "not", "contains", "propertyNames", "additionalItems")
_MAX_DEPTH = 64


def check_schema(schema: Any, where: str, param: str, depth: int = 0) -> None:
    """APIError (400, ``param``) naming the first place where ``schema`` is not a JSON Schema:
    a schema is an object or a boolean, "type" names JSON's types, "required" lists names,
    "enum" is a list, and the keywords that hold schemas hold schemas."""
    def bad(what: str) -> APIError:
        return APIError(400, f"{where}: {what}", param=param, code="invalid_schema")

    if depth > _MAX_DEPTH:
        raise bad("the schema is nested too deeply")
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise bad(f"a JSON Schema is an object, got {type(schema).__name__}")
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        for k in kinds:
            if not isinstance(k, str) or k not in _TYPES:
                raise bad(f"type {k!r} is not one of JSON Schema's types ({', '.join(sorted(_TYPES))})")
    required = schema.get("required")
    if required is not None and not (isinstance(required, list) and all(isinstance(r, str) for r in required)):
        raise bad("required must be a list of property names")
    if "enum" in schema and not (isinstance(schema["enum"], list) and schema["enum"]):
        raise bad("enum must be a non-empty list")
    for key in _SCHEMA_LISTS:
        if key in schema:
            value = schema[key]
            if not isinstance(value, list) or not value:
                raise bad(f"{key} must be a non-empty list of schemas")
            for i, sub in enumerate(value):
                check_schema(sub, f"{where}.{key}[{i}]", param, depth + 1)
    for key in _SCHEMA_MAPS:
        if key in schema:
            value = schema[key]
            if not isinstance(value, dict):
                raise bad(f"{key} must be an object of schemas")
            for name, sub in value.items():
                check_schema(sub, f"{where}.{key}.{name}", param, depth + 1)
    for key in _SCHEMA_ONE:
        if key in schema:
            check_schema(schema[key], f"{where}.{key}", param, depth + 1)


# ---------------------------------------------------------------------------- the tools


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools ask for: the system text, the answer's schema, and whether the
    answer may be a plain ``response``."""

    system: str
    schema: dict
    may_respond: bool


def tool_plan(body: ChatRequest) -> Optional[ToolPlan]:
    """The request's tool plan, or None when no tool may be called (no tools, or ``none``)."""
    tools = body.tools or []
    choice = body.tool_choice
    if choice is not None and not tools:
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    if not tools or choice == "none":
        return None
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise APIError(400, "two tools have the same name", param="tools")
    for i, t in enumerate(tools):
        check_schema(t.function.parameters, f"tools[{i}].function.parameters", "tools")
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not one of the tools",
                           param="tool_choice")
        callable_ = [t for t in tools if t.function.name == choice.function.name]
    else:
        callable_ = tools
    may_respond = choice in (None, "auto")
    one_call = not body.parallel_tool_calls or isinstance(choice, NamedToolChoice)
    call_items = [{"type": "object",
                   "properties": {"name": {"const": t.function.name}, "arguments": t.function.parameters},
                   "required": ["name", "arguments"], "additionalProperties": False} for t in callable_]
    calls: dict[str, Any] = {"type": "array", "items": call_items[0] if len(call_items) == 1 else {"anyOf": call_items},
                             "minItems": 1}
    if one_call:
        calls["maxItems"] = 1
    call_answer = {"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"],
                   "additionalProperties": False}
    respond = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"],
               "additionalProperties": False}
    schema = {"anyOf": [call_answer, respond]} if may_respond else call_answer
    listed = [{"name": t.function.name, **({"description": t.function.description} if t.function.description else {}),
               "parameters": t.function.parameters} for t in tools]
    shape = '{"tool_calls": [{"name": "<tool name>", "arguments": {<its arguments>}}]}'
    lines = ["You can call these tools (each with a JSON Schema of its arguments):",
             json.dumps(listed, ensure_ascii=False, indent=1), ""]
    if isinstance(choice, NamedToolChoice):
        lines.append(f"Call the tool {choice.function.name} now. Answer with one JSON object: {shape}")
    elif may_respond:
        lines.append(f"Answer with one JSON object: either {shape} to call tools"
                     f"{'' if one_call else ' (one or more calls)'}, or {{\"response\": \"<your answer>\"}} "
                     "to answer the user directly.")
    else:
        lines.append(f"Call one or more of the tools now. Answer with one JSON object: {shape}"
                     if not one_call else f"Call one of the tools now. Answer with one JSON object: {shape}")
    return ToolPlan("\n".join(lines), schema, may_respond)


@dataclass(frozen=True)
class ParsedAnswer:
    content: Optional[str]
    tool_calls: Optional[list[dict]]  # OpenAI's message.tool_calls


def parse_answer(text: str, plan: ToolPlan) -> ParsedAnswer:
    """The constrained answer as OpenAI's message: its tool calls, or its ``response`` as content.
    An answer cut short keeps the calls it wrote whole; one with none stays text."""
    try:
        data = json.loads(text)
    except ValueError:
        done = _complete_calls(text)
        if not done:
            return ParsedAnswer(text, None)
        data = {"tool_calls": done}
    if isinstance(data, dict) and isinstance(data.get("tool_calls"), list):
        calls = [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                  "function": {"name": str(c.get("name", "")),
                               "arguments": json.dumps(c.get("arguments", {}), ensure_ascii=False)}}
                 for c in data["tool_calls"] if isinstance(c, dict)]
        return ParsedAnswer(None, calls)
    if isinstance(data, dict) and isinstance(data.get("response"), str):
        return ParsedAnswer(data["response"], None)
    return ParsedAnswer(text, None)


def _complete_calls(text: str) -> list[dict]:
    """The calls written whole in an answer cut short (the token budget, or the loop stop while
    it listed call after call): the grammar held each one to its tool's schema."""
    head = text.lstrip()
    start = head.find("[")
    if not head.startswith("{") or start < 0 or not head[1:start].strip().startswith('"tool_calls"'):
        return []
    decoder = json.JSONDecoder()
    calls: list[dict] = []
    i = start + 1
    while True:
        while i < len(head) and head[i] in " \t\r\n,":
            i += 1
        try:
            item, i = decoder.raw_decode(head, i)
        except ValueError:
            return calls
        if not isinstance(item, dict) or "name" not in item:
            return calls
        calls.append(item)


# ---------------------------------------------------------------------------- the conversation


def conversation(messages: Sequence[Message], plan: Optional[ToolPlan]) -> list[dict]:
    """The messages as ``{"role", "content"}`` text turns: the tools' system text first (in the
    first system message, or one of its own), assistant tool calls as their JSON, tool results as
    user turns naming the call. A tool message that answers no earlier call is a 400."""
    calls: dict[str, str] = {}  # id -> the function's name
    out: list[dict] = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        if m.tool_calls and role != "assistant":
            raise APIError(400, f"messages[{i}]: only assistant messages make tool calls",
                           param=f"messages.{i}.tool_calls")
        if m.tool_call_id is not None and role != "tool":
            raise APIError(400, f"messages[{i}]: tool_call_id belongs to tool messages",
                           param=f"messages.{i}.tool_call_id")
        if role == "assistant" and m.tool_calls:
            written = []
            for c in m.tool_calls:
                try:
                    arguments: Any = json.loads(c.function.arguments)
                except ValueError:
                    raise APIError(400, f"messages[{i}]: the arguments of tool call {c.id!r} are not JSON",
                                   param=f"messages.{i}.tool_calls") from None
                calls[c.id] = c.function.name
                written.append({"name": c.function.name, "arguments": arguments})
            text = json.dumps({"tool_calls": written}, ensure_ascii=False)
            out.append({"role": "assistant", "content": (m.text() + "\n" + text) if m.text() else text})
        elif role == "tool":
            if m.tool_call_id is None:
                raise APIError(400, f"messages[{i}]: a tool message needs the tool_call_id of the call it answers",
                               param=f"messages.{i}.tool_call_id")
            if m.tool_call_id not in calls:
                raise APIError(400, f"messages[{i}]: tool_call_id {m.tool_call_id!r} answers no earlier tool call",
                               param=f"messages.{i}.tool_call_id")
            out.append({"role": "user", "content": f"Result of the tool call {m.tool_call_id} "
                                                   f"({calls[m.tool_call_id]}):\n{m.text()}"})
        else:
            out.append({"role": role, "content": m.text()})
    if plan is not None:
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + plan.system}
        else:
            out.insert(0, {"role": "system", "content": plan.system})
    return out
