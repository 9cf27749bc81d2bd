#include "dola-rpc.h"

#include "dola-error.h"

#ifdef GGML_USE_RPC
#include "ggml-rpc.h"
#endif
#include "ggml.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>

namespace dola {

namespace {

std::mutex g_mutex;
std::condition_variable g_cv;
std::atomic<uint64_t> g_failures{0};
std::string g_error;                    // the last failure's message, guarded by g_mutex
thread_local bool t_throw_on_abort = false;  // this thread runs our calls: GGML_ABORT throws
ggml_abort_callback_t g_previous = nullptr;

// ggml's "path/file.cpp:123: message\n" as "message".
std::string ggml_message(std::string m) {
    const size_t file = m.find(".cpp:");
    const size_t colon = file == std::string::npos ? std::string::npos : m.find(": ", file + 5);
    if (colon != std::string::npos) m = m.substr(colon + 2);
    while (!m.empty() && (m.back() == '\n' || m.back() == ' ')) m.pop_back();
    return m;
}

void on_ggml_abort(const char * message) {
    if (t_throw_on_abort) throw error(ggml_message(message));
    if (std::strstr(message, "RPC") == nullptr) {  // not ours to handle: ggml's usual abort
        if (g_previous) g_previous(message);
        else std::fprintf(stderr, "%s\n", message);
        return;
    }
    {
        std::lock_guard<std::mutex> lock(g_mutex);
        g_error = message;
        ++g_failures;
    }
    g_cv.notify_all();
    // ggml's RPC socket thread: returning would abort the process. Park it for good.
    for (;;) std::this_thread::sleep_for(std::chrono::hours(24));
}

void install_abort_handler() {
    static std::once_flag once;
    std::call_once(once, [] { g_previous = ggml_set_abort_callback(on_ggml_abort); });
}

std::string broken_message() {
    std::lock_guard<std::mutex> lock(g_mutex);
    return "an RPC server stopped answering (" + ggml_message(g_error) + "); the model that used it cannot be "
           "used any more: restart the rpc-server and load the model again";
}

// Runs fn with GGML_ABORT turned into dola::error on this thread.
void guarded(const std::function<void()> & fn) {
    struct flag {
        bool old = t_throw_on_abort;
        flag() { t_throw_on_abort = true; }
        ~flag() { t_throw_on_abort = old; }
    } f;
    fn();
}

}  // namespace

uint64_t rpc_failures() { return g_failures.load(); }

#ifdef GGML_USE_RPC

bool rpc_available() { return true; }

std::vector<ggml_backend_dev_t> rpc_devices(const std::vector<std::string> & endpoints) {
    install_abort_handler();
    std::vector<ggml_backend_dev_t> out;
    for (const std::string & ep : endpoints) {
        const size_t colon = ep.rfind(':');
        if (colon == std::string::npos || colon == 0 || colon + 1 == ep.size() ||
            ep.find_first_not_of("0123456789", colon + 1) != std::string::npos) {
            throw error("RPC endpoint '" + ep + "' is not host:port");
        }
        ggml_backend_reg_t reg = nullptr;
        try {
            guarded([&] { reg = ggml_backend_rpc_add_server(ep.c_str()); });
        } catch (const error & e) {
            throw error("cannot use the RPC server at " + ep + " (is `dola-cpp rpc-server` running there?): " + e.what());
        }
        const size_t n = reg ? ggml_backend_reg_dev_count(reg) : 0;
        if (n == 0) throw error("the RPC server at " + ep + " offers no device");
        for (size_t i = 0; i < n; ++i) out.push_back(ggml_backend_reg_dev_get(reg, i));
    }
    return out;
}

void rpc_serve(const std::string & host, int port, int n_threads, const std::string & cache_dir) {
    std::vector<ggml_backend_dev_t> devices;
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t d = ggml_backend_dev_get(i);
        const auto t = ggml_backend_dev_type(d);
        if (t == GGML_BACKEND_DEVICE_TYPE_GPU || t == GGML_BACKEND_DEVICE_TYPE_IGPU) devices.push_back(d);
    }
    if (devices.empty()) devices.push_back(ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU));
    if (devices.back() == nullptr) throw error("no device to serve");
    const std::string endpoint = host + ":" + std::to_string(port);
    ggml_backend_rpc_start_server(endpoint.c_str(), cache_dir.empty() ? nullptr : cache_dir.c_str(),
                                  (size_t) std::max(1, n_threads), devices.size(), devices.data());
    throw error("the RPC server could not start at " + endpoint + " (is the port in use?)");
}

#else

bool rpc_available() { return false; }

std::vector<ggml_backend_dev_t> rpc_devices(const std::vector<std::string> &) {
    throw error("this build of dola-cpp has no RPC backend (build with -DGGML_RPC=ON)");
}

void rpc_serve(const std::string &, int, int, const std::string &) {
    throw error("this build of dola-cpp has no RPC backend (build with -DGGML_RPC=ON)");
}

#endif

void rpc_call(uint64_t epoch, const std::function<void()> & fn, const std::function<void()> & poll) {
    if (g_failures != epoch) throw error(broken_message());
    struct state {
        bool done = false;
        std::exception_ptr ex;
    };
    auto st = std::make_shared<state>();
    // The helper owns copies of what it needs to report back; fn's captures live on the caller's
    // stack, which outlives the helper unless an RPC server died (then the helper never resumes).
    std::thread([st, &fn] {
        try {
            guarded(fn);
        } catch (...) {
            st->ex = std::current_exception();
        }
        {
            std::lock_guard<std::mutex> lock(g_mutex);
            st->done = true;
        }
        g_cv.notify_all();
    }).detach();
    std::unique_lock<std::mutex> lock(g_mutex);
    while (!st->done && g_failures == epoch) {
        g_cv.wait_for(lock, std::chrono::milliseconds(20));
        if (!st->done && g_failures == epoch && poll) {
            lock.unlock();
            poll();
            lock.lock();
        }
    }
    if (!st->done) {
        lock.unlock();
        throw error(broken_message());
    }
    lock.unlock();
    if (st->ex) std::rethrow_exception(st->ex);
}

}  // namespace dola
