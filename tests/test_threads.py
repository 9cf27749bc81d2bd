"""Decoding keeps working on a busy machine: with another process keeping a core busy, the
context computes with fewer threads (ggml's threads wait for each other at every graph node, so a
thread that shares its core with the other process stalls them all), and with all of them again
once the machine is idle.

The governor reads the machine's load from /proc/stat every 200 ms. A shared test machine is never
reliably idle, so the idle machine (and a machine with exactly one other core busy) is simulated:
a preloaded library serves the governor a /proc/stat in which the only CPU time spent is this
process's own (plus, for the busy machine, one core's worth), advancing with the clock. The same
library counts the governor's reads, so each check waits for a number of samples, not for a time.
The real machine with a real busy process is checked too (more load can only mean fewer threads).
"""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dola_cpp import Model

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

pytestmark = [pytest.mark.hardware("linux"),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the load is read from /proc (Linux only)")]

# FAKE_PROC_STAT_OTHER unset: the real /proc/stat (reads counted); "0": an idle machine; "1": one
# core busy with another process
SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

int proc_stat_reads = 0;  /* read by the test with ctypes */

static int fake_fd(void) {
    const char * other_env = getenv("FAKE_PROC_STAT_OTHER");
    if (!other_env) return -2;
    double other = atof(other_env);
    long ncpu = sysconf(_SC_NPROCESSORS_CONF);
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    const double hz = (double) sysconf(_SC_CLK_TCK);
    const double elapsed = (double) ts.tv_sec * hz + (double) ts.tv_nsec * hz / 1e9;  /* jiffies */
    unsigned long long utime = 0, stime = 0;
    FILE * self = fopen("/proc/self/stat", "r");  /* not intercepted: another path */
    if (self) {
        char buf[4096];
        size_t n = fread(buf, 1, sizeof buf - 1, self);
        buf[n] = 0;
        fclose(self);
        char * p = strrchr(buf, ')');
        /* fields after the command: state(3) ... utime(14) stime(15) */
        if (p) {
            p += 2;
            for (int field = 3; field < 14 && p; ++field) { p = strchr(p, ' '); if (p) ++p; }
            if (p) sscanf(p, "%llu %llu", &utime, &stime);
        }
    }
    /* jiffies of all CPUs together: ours and the other load busy, the rest idle (never going back) */
    static unsigned long long last_idle = 0;
    const unsigned long long busy = (unsigned long long) ((double) (utime + stime) + other * elapsed);
    const double all = elapsed * (double) ncpu;
    unsigned long long idle = all > (double) busy ? (unsigned long long) (all - (double) busy) : 0;
    if (idle < last_idle) idle = last_idle;
    last_idle = idle;
    char text[16384];
    size_t len = 0;
    len += snprintf(text + len, sizeof text - len, "cpu  0 0 0 0 0 0 0 0 0 0\n");
    for (long c = 0; c < ncpu; ++c) {
        unsigned long long user = busy / ncpu + (c == 0 ? busy % ncpu : 0);
        unsigned long long free = idle / ncpu + (c == 0 ? idle % ncpu : 0);
        len += snprintf(text + len, sizeof text - len, "cpu%ld %llu 0 0 %llu 0 0 0 0 0 0\n", c, user, free);
    }
    len += snprintf(text + len, sizeof text - len, "procs_running %d\n", 1 + (int) other);
    int fd = memfd_create("fake-proc-stat", 0);
    if (fd < 0) return -1;
    if (write(fd, text, len) != (ssize_t) len) { close(fd); return -1; }
    lseek(fd, 0, SEEK_SET);
    return fd;
}

static FILE * intercept_fopen(const char * name, const char * path, const char * mode) {
    FILE * (*real)(const char *, const char *) = (FILE * (*)(const char *, const char *)) dlsym(RTLD_NEXT, name);
    if (path && strcmp(path, "/proc/stat") == 0) {
        __atomic_add_fetch(&proc_stat_reads, 1, __ATOMIC_SEQ_CST);
        int fd = fake_fd();
        if (fd >= 0) return fdopen(fd, mode);
    }
    return real(path, mode);
}

/* std::ifstream opens with libstdc++'s fopen64 (large-file builds), C code with fopen */
FILE * fopen(const char * path, const char * mode) { return intercept_fopen("fopen", path, mode); }
FILE * fopen64(const char * path, const char * mode) { return intercept_fopen("fopen64", path, mode); }
"""

PROBE = """
import ctypes, sys
import dola_cpp
shim = ctypes.CDLL(sys.argv[2])
reads = ctypes.c_int.in_dll(shim, "proc_stat_reads")
m = dola_cpp.Model(sys.argv[1], n_ctx=256, n_threads=int(sys.argv[3]))
start = reads.value
while reads.value < start + 4:  # the governor's first look and three samples of an interval
    m.generate("The history of Rome", max_tokens=16, ignore_eos=True)
print("threads", m.threads_in_use, "reads", reads.value - start)
"""


@pytest.fixture(scope="module")
def shim(tmp_path_factory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed to build the /proc/stat shim"
    d = tmp_path_factory.mktemp("shim")
    (d / "shim.c").write_text(SHIM)
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(d / "libshim.so"), str(d / "shim.c"), "-ldl"],
                   check=True, capture_output=True)
    return d / "libshim.so"


def threads_in_use(smollm2_path, shim: Path, tmp_path, other: str | None, n_threads: int = CORES) -> int:
    env = {k: v for k, v in os.environ.items() if k != "FAKE_PROC_STAT_OTHER"}
    env["LD_PRELOAD"] = str(shim)
    if other is not None:
        env["FAKE_PROC_STAT_OTHER"] = other
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(PROBE))
    r = subprocess.run([sys.executable, "-I", str(script), str(smollm2_path), str(shim), str(n_threads)], env=env,
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    words = r.stdout.split()
    assert words[0] == "threads" and int(words[3]) >= 4, r.stdout
    return int(words[1])


def needs_two_cores(test):
    return pytest.mark.hardware("two cores")(
        pytest.mark.skipif(CORES < 2, reason="one core: there is no thread to give up")(test))


@needs_two_cores
def test_all_threads_on_an_idle_machine_and_one_fewer_beside_a_busy_core(smollm2_path, shim, tmp_path):
    assert threads_in_use(smollm2_path, shim, tmp_path, other="0") == CORES
    assert threads_in_use(smollm2_path, shim, tmp_path, other="1") == CORES - 1


@pytest.fixture
def busy_core(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", "print('spinning', flush=True)\nwhile True: pass"],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "spinning"  # it runs now
    yield
    p.kill()
    p.wait()
    p.stdout.close()


@needs_two_cores
def test_fewer_threads_while_another_process_is_busy(smollm2_path, shim, tmp_path, busy_core):
    """The real /proc/stat (the shim only counts the reads), with a process spinning on a core:
    whatever else runs on the machine, fewer threads than cores."""
    assert threads_in_use(smollm2_path, shim, tmp_path, other=None) < CORES


def test_all_threads_when_fixed(smollm2_path):
    fixed = Model(smollm2_path, n_ctx=256, n_threads=CORES, adaptive_threads=False)
    fixed.generate("The history of Rome", max_tokens=4)
    assert fixed.threads_in_use == CORES and not fixed.share()._session.adaptive_threads
