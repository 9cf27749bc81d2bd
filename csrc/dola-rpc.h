// ggml's RPC backend (GGML_RPC): a model's layers on other machines' rpc-servers, and this
// machine's devices served to others. Knows no Python.
//
// ggml's RPC client aborts the process when a server goes away (its socket thread calls
// GGML_ABORT) and a caller waiting on that thread would wait forever. So while a model uses RPC,
// calls into it run on a helper thread (rpc_call): when a server dies, ggml's abort is caught (the
// socket thread is parked instead of killing the process), the waiting caller gets a dola::error,
// and the models that used RPC are left unusable (their memory is leaked rather than freed
// through dead connections).
#pragma once

#include "ggml-backend.h"

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace dola {

// Whether this build has the RPC backend.
bool rpc_available();

// The devices of the RPC servers at `endpoints` ("host:port"); connects to each. A server that
// cannot be reached is a dola::error.
std::vector<ggml_backend_dev_t> rpc_devices(const std::vector<std::string> & endpoints);

// How many times an RPC server died so far. A model records it when it loads; once it changes,
// the model may hold buffers on a dead server.
uint64_t rpc_failures();

// Runs fn on a helper thread for a model loaded at `epoch` (rpc_failures() then); poll() runs on
// the calling thread every ~20 ms while it waits (for Ctrl-C). Throws what fn throws, or a
// dola::error when an RPC server has died since the model loaded.
void rpc_call(uint64_t epoch, const std::function<void()> & fn, const std::function<void()> & poll = {});

// Serves this machine's devices (its GPUs, else the CPU) at host:port with ggml's RPC protocol.
// Blocks; returns only when the server cannot start.
void rpc_serve(const std::string & host, int port, int n_threads, const std::string & cache_dir);

}  // namespace dola
