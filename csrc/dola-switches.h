// The DOLA_CPP_* environment switches: read in one place (from_environment, which the bindings
// call when they create a model or a context) and handed to the core in its parameters, so that
// the core itself never reads the environment and a C++ caller can set them directly.
#pragma once

#include <string>

namespace dola {

enum class switch_mode { automatic, on, off };

struct switches {
    // DOLA_CPP_VERBOSE (set, not "0"): llama.cpp's log on stderr. Process-wide: the first
    // backend initialisation decides.
    bool verbose = false;
    // DOLA_CPP_NO_FUSE (set): never compute the final logits together with the premature rows.
    bool no_fuse = false;
    // DOLA_CPP_CAPTURE=callback: capture layers with llama.cpp's eval callback even where the
    // build has the graph-allocation hook.
    bool capture_callback = false;
    // DOLA_CPP_KERNEL and DOLA_CPP_DEVICE_CONTRAST: auto, on or off, kept as given; a value that
    // is none of these is an error only when the projection is first needed (kernel_mode,
    // device_contrast_mode), as an unknown setting then names the switch the user got wrong.
    std::string kernel = "auto";
    std::string device_contrast = "auto";

    static switches from_environment();

    // Throw dola::error naming the variable when its value is not auto, on or off.
    switch_mode kernel_mode() const;
    switch_mode device_contrast_mode() const;
};

}  // namespace dola
