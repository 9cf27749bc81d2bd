#include "dola-threads.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>

#if defined(__linux__)
#include <dirent.h>
#include <sched.h>
#endif

namespace dola {

namespace {

constexpr auto k_interval = std::chrono::milliseconds(200);

#if defined(__linux__)
// Threads of this process that are running or runnable now (/proc/self/task/*/stat).
int64_t own_running_threads() {
    int64_t n = 0;
    DIR * dir = opendir("/proc/self/task");
    if (!dir) return 1;
    while (dirent * e = readdir(dir)) {
        if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
        std::ifstream f(std::string("/proc/self/task/") + e->d_name + "/stat");
        std::string s((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
        const size_t paren = s.rfind(')');
        if (paren != std::string::npos && paren + 2 < s.size() && s[paren + 2] == 'R') ++n;
    }
    closedir(dir);
    return std::max<int64_t>(n, 1);
}
#endif

}  // namespace

thread_governor::thread_governor(int32_t max_threads, bool adaptive)
    : max_(std::max(1, max_threads)), adaptive_(adaptive && max_threads > 1), current_(max_) {
#if defined(__linux__)
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        for (int c = 0; c < CPU_SETSIZE; ++c)
            if (CPU_ISSET(c, &set)) cpus_.push_back(c);
    }
#endif
    if (cpus_.empty()) adaptive_ = false;
}

// Busy and total jiffies of our CPUs (/proc/stat), and this process's own CPU time.
bool thread_governor::sample(double & other_cores) {
#if defined(__linux__)
    std::ifstream stat("/proc/stat");
    if (!stat) return false;
    uint64_t busy = 0, total = 0;
    int64_t running = -1, n_online = 0;
    std::string line;
    size_t next = 0;  // cpus_ is sorted; /proc/stat lists cpuN in order
    while (std::getline(stat, line)) {
        if (line.compare(0, 14, "procs_running ") == 0) running = std::atoll(line.c_str() + 14);
        if (line.compare(0, 3, "cpu") != 0) continue;
        if (line.size() < 4 || line[3] < '0' || line[3] > '9') continue;  // the aggregate line
        ++n_online;
        const int cpu = std::atoi(line.c_str() + 3);
        while (next < cpus_.size() && cpus_[next] < cpu) ++next;
        if (next == cpus_.size()) continue;
        if (cpus_[next] != cpu) continue;
        std::istringstream in(line.substr(line.find(' ')));
        uint64_t v[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // user nice system idle iowait irq softirq steal
        for (auto & x : v) in >> x;
        busy += v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
        total += v[0] + v[1] + v[2] + v[3] + v[4] + v[5] + v[6] + v[7];
    }
    std::ifstream self("/proc/self/stat");
    std::string s((std::istreambuf_iterator<char>(self)), std::istreambuf_iterator<char>());
    const size_t paren = s.rfind(')');  // the command name may contain spaces
    if (paren == std::string::npos || total == 0) return false;
    std::istringstream fields(s.substr(paren + 2));
    std::string skip;
    for (int i = 3; i < 14; ++i) fields >> skip;  // state .. cmajflt: fields 3-13
    uint64_t utime = 0, stime = 0;
    fields >> utime >> stime;
    const uint64_t self_time = utime + stime;
    bool ok = primed_ && total > last_total_;
    if (!primed_ && running > 0 && n_online > 0) {
        // First look: no interval to measure yet, so count the runnable threads that are not ours
        // (this one, and compute threads of other contexts still spinning), scaled to the share of
        // the machine's CPUs that are ours.
        other_cores = (double) std::max<int64_t>(0, running - own_running_threads()) * (double) cpus_.size() / (double) n_online;
        ok = true;
    } else if (ok) {
        const double d_total = (double) (total - last_total_);
        const double d_other = (double) (busy - last_busy_) - (double) (self_time - last_self_);
        other_cores = std::max(0.0, d_other) / d_total * (double) cpus_.size();
    }
    last_busy_ = busy;
    last_total_ = total;
    last_self_ = self_time;
    primed_ = true;
    return ok;
#else
    (void) other_cores;
    return false;
#endif
}

int32_t thread_governor::threads() {
    if (!adaptive_) return max_;
    const auto now = std::chrono::steady_clock::now();
    if (primed_ && now - last_ < k_interval) return current_;
    last_ = now;
    double other = 0.0;
    if (sample(other)) {
        const double free_cores = (double) cpus_.size() - other;
        current_ = std::clamp((int32_t) std::lround(free_cores), 1, max_);
    }
    return current_;
}

}  // namespace dola
