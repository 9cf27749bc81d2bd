"""Constrained output: grammars from JSON schemas.

A grammar is GBNF text, llama.cpp's grammar format with the start rule ``root``
(``DecodeConfig.grammar``; ``Model.generate(..., grammar=...)``). :func:`json_schema_grammar`
converts a JSON schema with llama.cpp's own converter; :data:`JSON_OBJECT_GRAMMAR` allows any JSON
object (OpenAI's ``response_format={"type": "json_object"}``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Union

from . import _core

JsonSchema = Union[Mapping[str, Any], str]


def json_schema_grammar(schema: JsonSchema) -> str:
    """The GBNF grammar of the JSON texts ``schema`` describes (a dict, or its JSON text).

    ValueError (``DolaError``) when the text is not JSON or the converter does not support a part
    of the schema: llama.cpp's message names it (``unsupported $ref``, an unknown ``format``, ...).
    """
    if isinstance(schema, Mapping):
        try:
            text = json.dumps(schema)
        except (TypeError, ValueError) as e:
            raise ValueError(f"the JSON schema cannot be written as JSON: {e}") from None
    elif isinstance(schema, str):
        text = schema
    else:
        raise TypeError(f"a JSON schema must be a dict or its JSON text, got {type(schema).__name__}")
    return _core.json_schema_to_grammar(text)


# Any JSON object (llama.cpp's grammars/json.gbnf, from the converter).
JSON_OBJECT_GRAMMAR: str = json_schema_grammar({"type": "object"})
