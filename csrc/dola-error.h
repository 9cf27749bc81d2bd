#pragma once

#include <cstddef>
#include <stdexcept>
#include <string>

namespace dola {

// A user-facing failure: bad input, a model we cannot load, an unsupported architecture.
struct error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// A prompt with more tokens than the context holds (the bindings raise it as its own Python
// type, which the package turns into its PromptTooLongError).
struct prompt_too_long : error {
    prompt_too_long(size_t n_tokens_, size_t n_ctx_)
        : error("the prompt has " + std::to_string(n_tokens_) + " tokens but the context holds " + std::to_string(n_ctx_) +
                "; create the Model with a larger n_ctx or shorten the prompt"),
          n_tokens(n_tokens_), n_ctx(n_ctx_) {}
    size_t n_tokens, n_ctx;
};

// Decoding was stopped by cancel() or an interrupt; the context stays usable.
struct aborted : std::runtime_error {
    aborted() : std::runtime_error("decoding was interrupted") {}
};

}  // namespace dola
