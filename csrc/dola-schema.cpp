#include "dola-schema.h"

#include "dola-error.h"

#include "json-schema-to-grammar.h"
#include "json.h"

#include <stdexcept>
#include <string>
#include <vector>

namespace dola {

std::string json_schema_grammar(const std::string & schema_json) {
    common_json schema;
    try {
        schema = common_json::parse(schema_json);
    } catch (const std::exception & e) {
        throw error(std::string("the JSON schema is not valid JSON: ") + e.what());
    }
    try {
        return json_schema_to_grammar(schema, /* force_gbnf = */ true);
    } catch (const std::exception & e) {
        throw error(e.what());  // "JSON schema conversion failed:\n<what it does not support>"
    }
}

}  // namespace dola

// The three string helpers of llama.cpp's common.h that the converter calls (common.cpp, where
// llama.cpp defines them, pulls in the rest of its common library).
std::string string_join(const std::vector<std::string> & values, const std::string & separator) {
    std::string out;
    for (size_t i = 0; i < values.size(); ++i) {
        if (i) out += separator;
        out += values[i];
    }
    return out;
}

std::vector<std::string> string_split(const std::string & str, const std::string & delimiter) {
    std::vector<std::string> parts;
    if (delimiter.empty()) return {str};
    size_t from = 0;
    for (size_t at; (at = str.find(delimiter, from)) != std::string::npos; from = at + delimiter.size()) {
        parts.push_back(str.substr(from, at - from));
    }
    parts.push_back(str.substr(from));
    return parts;
}

std::string string_repeat(const std::string & str, size_t n) {
    std::string out;
    out.reserve(str.size() * n);
    for (size_t i = 0; i < n; ++i) out += str;
    return out;
}
