#include "dola-switches.h"

#include "dola-error.h"

#include <cstdlib>
#include <cstring>

namespace dola {

namespace {

switch_mode parse_mode(const char * name, const std::string & value) {
    if (value == "auto") return switch_mode::automatic;
    if (value == "on") return switch_mode::on;
    if (value == "off") return switch_mode::off;
    throw error(std::string(name) + " must be auto, on or off, got '" + value + "'");
}

}  // namespace

switches switches::from_environment() {
    switches s;
    const char * v = std::getenv("DOLA_CPP_VERBOSE");
    s.verbose = v && *v && std::strcmp(v, "0") != 0;
    s.no_fuse = std::getenv("DOLA_CPP_NO_FUSE") != nullptr;
    const char * c = std::getenv("DOLA_CPP_CAPTURE");
    s.capture_callback = c && std::strcmp(c, "callback") == 0;
    if (const char * q = std::getenv("DOLA_CPP_KERNEL")) s.kernel = q;
    if (const char * d = std::getenv("DOLA_CPP_DEVICE_CONTRAST")) s.device_contrast = d;
    return s;
}

switch_mode switches::kernel_mode() const { return parse_mode("DOLA_CPP_KERNEL", kernel); }
switch_mode switches::device_contrast_mode() const { return parse_mode("DOLA_CPP_DEVICE_CONTRAST", device_contrast); }

}  // namespace dola
