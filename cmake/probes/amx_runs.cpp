// Runs an int8 tile multiply on two threads the way llama.cpp's AMX kernels do (permission
// request once per process, a stack tile configuration loaded once per thread) and checks the
// result. Exit 0: AMX works in binaries built with these flags on this machine; 77: this CPU has
// no AMX (nothing to decide); anything else, or a signal: it does not.
#include "tile_config.h"

#include <immintrin.h>
#include <cpuid.h>
#include <cstdint>
#include <cstdio>
#include <sys/syscall.h>
#include <thread>
#include <unistd.h>

namespace {

bool cpu_has_amx_int8() {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    return (d & (1u << 24)) && (d & (1u << 25));  // AMX-TILE, AMX-INT8
}

int multiply_once() {
    alignas(64) tile_config tc = {};
    tc.palette_id = 1;
    tc.rows[0] = 16; tc.colsb[0] = 64;  // C: 16 x 16 int32
    tc.rows[1] = 16; tc.colsb[1] = 64;  // A: 16 x 64 int8
    tc.rows[2] = 16; tc.colsb[2] = 64;  // B: 16 x (16 x 4) int8, VNNI layout
    _tile_loadconfig(&tc);
    alignas(64) int8_t A[16][64], B[16][64];
    alignas(64) int32_t C[16][16];
    for (int i = 0; i < 16; ++i)
        for (int k = 0; k < 64; ++k) {
            A[i][k] = (int8_t) ((i + k) % 7 - 3);
            B[i][k] = (int8_t) ((i * 3 + k) % 5 - 2);
        }
    _tile_zero(0);
    _tile_loadd(1, A, 64);
    _tile_loadd(2, B, 64);
    _tile_dpbssd(0, 1, 2);
    _tile_stored(0, C, 64);
    _tile_release();
    // C[m][n] = sum_k A[m][k] * Bfull[k][n] where B[k/4][n*4 + k%4] = Bfull[k][n]
    for (int m = 0; m < 16; ++m)
        for (int n = 0; n < 16; ++n) {
            int32_t want = 0;
            for (int k = 0; k < 64; ++k) want += A[m][k] * B[k / 4][n * 4 + k % 4];
            if (C[m][n] != want) return 1;
        }
    return 0;
}

}  // namespace

int main() {
    if (!cpu_has_amx_int8()) return 77;
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) != 0) {
        std::puts("arch_prctl(ARCH_REQ_XCOMP_PERM) refused");
        return 2;
    }
    int rc[2] = {1, 1};
    std::thread t0([&] { rc[0] = multiply_once(); });
    std::thread t1([&] { rc[1] = multiply_once(); });
    t0.join();
    t1.join();
    if (rc[0] || rc[1]) std::puts("wrong AMX result");
    return rc[0] || rc[1] ? 3 : 0;
}
