// JSON schema → GBNF grammar, with llama.cpp's own converter (common/json-schema-to-grammar.cpp,
// compiled into the extension without the rest of llama.cpp's common library).
#pragma once

#include <string>

namespace dola {

// The grammar (start rule "root") of the JSON texts the schema describes. Throws dola::error with
// llama.cpp's message when schema_json is not JSON or the converter does not support a part of
// the schema (the message names it).
std::string json_schema_grammar(const std::string & schema_json);

}  // namespace dola
