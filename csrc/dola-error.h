#pragma once

#include <stdexcept>
#include <string>

namespace dola {

// A user-facing failure: bad input, a model we cannot load, an unsupported architecture.
struct error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Decoding was stopped by cancel() or an interrupt; the context stays usable.
struct aborted : std::runtime_error {
    aborted() : std::runtime_error("decoding was interrupted") {}
};

}  // namespace dola
