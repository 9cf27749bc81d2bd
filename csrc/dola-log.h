// llama.cpp's log: silent unless verbose (DOLA_CPP_VERBOSE), with the first error line kept so that
// our errors can say why llama.cpp failed.
#pragma once

#include <string>

namespace dola {

// Routes llama.cpp's log here and initialises its backends, once per process; verbose: the log
// also goes to stderr (switches::verbose). The first call decides.
void backend_init_once(bool verbose);

void clear_last_error();
// llama.cpp's first error line since the last clear, without its "error loading model:" prefix.
std::string last_error();
// msg, followed by " (llama.cpp: <last_error()>)" when there is one.
std::string with_detail(std::string msg);

}  // namespace dola
