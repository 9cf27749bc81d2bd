// How many threads to compute with. ggml's threads meet at a barrier after every graph node; when
// another process keeps a core busy, the thread that shares it is descheduled for a whole time
// slice at each barrier while the others spin, and decoding drops to a few tokens a second. The
// governor samples how much CPU time other processes take on the cores this process may run on
// and uses that many fewer threads (never more than asked for, never fewer than one).
#pragma once

#include <chrono>
#include <cstdint>
#include <vector>

namespace dola {

class thread_governor {
public:
    // adaptive = false: always max_threads.
    thread_governor(int32_t max_threads, bool adaptive);

    // The thread count to use now. Reads the load at most every 200 ms (two small /proc reads on
    // Linux; elsewhere the governor keeps max_threads).
    int32_t threads();
    int32_t max_threads() const { return max_; }
    bool adaptive() const { return adaptive_; }

private:
    bool sample(double & other_cores);

    int32_t max_;
    bool adaptive_;
    int32_t current_;
    std::vector<int> cpus_;  // the CPUs this process may run on
    std::chrono::steady_clock::time_point last_;
    uint64_t last_busy_ = 0, last_total_ = 0, last_self_ = 0;
    bool primed_ = false;
};

}  // namespace dola
