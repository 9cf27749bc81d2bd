// GGUF files before llama.cpp sees them, and conversion between types.
#pragma once

#include <cstdint>
#include <string>

namespace dola {

// Validates a GGUF file's header, metadata and tensor extents without llama.cpp's loader (which
// asserts, i.e. aborts the process, on some malformed files). Throws dola::error.
void check_gguf_file(const std::string & path);

// Writes an F32 (or other type) copy of a GGUF with llama.cpp's quantizer. verbose: llama.cpp's
// log on stderr, when this is the process's first use of llama.cpp (backend_init_once).
void convert_model(const std::string & src, const std::string & dst, const std::string & type, int32_t n_threads,
                   bool verbose = false);

}  // namespace dola
