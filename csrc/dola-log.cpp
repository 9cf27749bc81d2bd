#include "dola-log.h"

#include "llama.h"

#include <cstdio>
#include <cstring>
#include <mutex>

namespace dola {

namespace {

std::mutex g_log_mutex;
std::string g_last_error;
bool g_verbose = false;

void log_cb(ggml_log_level level, const char * text, void *) {
    if (level == GGML_LOG_LEVEL_ERROR) {
        // keep the first error since the last clear: later ones are usually "failed to load model"
        std::lock_guard<std::mutex> lock(g_log_mutex);
        if (g_last_error.empty()) g_last_error = text;
    }
    if (g_verbose) std::fputs(text, stderr);
}

}  // namespace

std::string last_error() {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    std::string s = g_last_error;
    while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
    // "llama_model_load: error loading model: X" -> "X"
    for (const char * prefix : {"error loading model: ", "error loading model hyperparameters: ",
                                "error loading model vocabulary: "}) {
        const size_t at = s.find(prefix);
        if (at != std::string::npos) s = s.substr(at + std::strlen(prefix));
    }
    return s;
}

void clear_last_error() {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    g_last_error.clear();
}

std::string with_detail(std::string msg) {
    const std::string detail = last_error();
    if (!detail.empty()) msg += " (llama.cpp: " + detail + ")";
    return msg;
}

void backend_init_once(bool verbose) {
    static std::once_flag once;
    std::call_once(once, [verbose] {
        g_verbose = verbose;
        llama_log_set(log_cb, nullptr);
        llama_backend_init();
    });
}

}  // namespace dola
