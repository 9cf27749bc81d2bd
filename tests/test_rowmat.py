"""dola-cpp's projection kernels (csrc/dola-rowmat.cpp) against numpy, per weight type.

The kernels multiply a few hidden rows by every row of the output matrix in ggml's block formats.
The reference dequantizes the same blocks with gguf-py, rounds the activations as ggml does for
that type (Q8_0 blocks, Q8_K blocks, F16, BF16) and multiplies in float64: only the kernels'
float32 sums may differ. On a real model the same kernels are compared with ggml's matmul
(tests/test_backends.py).
"""

from __future__ import annotations

import ctypes
import platform
import shutil
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import quants

from dola_cpp import _core
from skip_policy import cpu_flags

# (type, byte offsets of the fp16 scales in a block)
TYPES = {"Q8_0": (0,), "Q6_K": (208,), "Q4_K": (0, 2), "F16": (), "BF16": ()}


def random_matrix(qtype: str, n_out: int, n_in: int, rng: np.random.Generator) -> np.ndarray:
    """Random blocks (every bit pattern of the quants and sub-block scales) with sane fp16 scales."""
    t = gguf.GGMLQuantizationType[qtype]
    if qtype in ("F16", "BF16"):
        w = rng.standard_normal((n_out, n_in)).astype(np.float32)
        if qtype == "F16":
            return w.astype(np.float16).view(np.uint8).reshape(n_out, -1)
        return (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(n_out, -1)
    qk, nbytes = gguf.GGML_QUANT_SIZES[t]
    raw = np.frombuffer(rng.bytes(n_out * n_in // qk * nbytes), dtype=np.uint8).reshape(-1, nbytes).copy()
    for off in TYPES[qtype]:
        d = rng.uniform(0.001, 0.02, size=len(raw)).astype(np.float16)
        raw[:, off:off + 2] = d.view(np.uint8).reshape(-1, 2)
    return raw.reshape(n_out, -1)


def ggml_rounded(x: np.ndarray, qtype: str) -> np.ndarray:
    """The activations as ggml's matmul for this weight type sees them, as float64."""
    x = x.astype(np.float32)
    if qtype == "Q8_0":  # per 32 values: d = amax / 127 (stored as fp16), q = round-half-even(x / d)
        xb = x.reshape(-1, 32)
        d = np.abs(xb).max(axis=1) / np.float32(127)
        q = np.rint(xb * (np.float32(1) / d)[:, None])
        return (q * d.astype(np.float16).astype(np.float64)[:, None]).reshape(x.shape)
    if qtype in ("Q6_K", "Q4_K"):  # Q8_K: per 256 values, iscale = -127 / (the value of largest magnitude)
        xb = x.reshape(-1, 256)
        mx = xb[np.arange(len(xb)), np.abs(xb).argmax(axis=1)]
        iscale = np.float32(-127) / mx
        q = np.minimum(127, np.rint(xb * iscale[:, None]))
        return (q * (np.float32(1) / iscale).astype(np.float64)[:, None]).reshape(x.shape)
    if qtype == "F16":
        return x.astype(np.float16).astype(np.float64)
    u = x.view(np.uint32).astype(np.uint64)  # BF16: round half to even on the upper 16 bits
    return (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32).astype(np.float64)


@pytest.mark.hardware("KERNELS")
@pytest.mark.parametrize("qtype", list(TYPES))
@pytest.mark.parametrize("n_rows", [1, 2, 5, 9, 12, 13, 27])
def test_kernel_matches_numpy(qtype, n_rows):
    """Row counts of one group, a group and one, and several groups (the engine's batched steps)."""
    if not _core.kernels.rowmat_isa():
        pytest.skip("this build has no projection kernels (x86 without AVX2)")
    rng = np.random.default_rng(n_rows)
    n_out, n_in = 67, 512  # an odd vocabulary: the threads' last chunk is short
    w = random_matrix(qtype, n_out, n_in, rng)
    x = rng.standard_normal((n_rows, n_in)).astype(np.float32) * rng.uniform(0.1, 10, size=(n_rows, 1)).astype(np.float32)
    ref = ggml_rounded(x, qtype) @ quants.dequantize(w, gguf.GGMLQuantizationType[qtype]).astype(np.float64).T
    for threads in (1, 2):
        y = _core.kernels.rowmat(qtype, w, n_in, x, threads)
        assert y.shape == (n_rows, n_out)
        np.testing.assert_allclose(y, ref, rtol=2e-6, atol=2e-6 * np.abs(ref).max())


@pytest.mark.hardware("KERNELS")
def test_q8_0_odd_block_count():
    """An odd number of Q8_0 blocks per row, and a vocabulary not a multiple of the threads' chunks."""
    if not _core.kernels.rowmat_isa():
        pytest.skip("this build has no projection kernels (x86 without AVX2)")
    rng = np.random.default_rng(1)
    w = random_matrix("Q8_0", 300, 160, rng)
    x = rng.standard_normal((6, 160)).astype(np.float32)
    ref = ggml_rounded(x, "Q8_0") @ quants.dequantize(w, gguf.GGMLQuantizationType.Q8_0).astype(np.float64).T
    np.testing.assert_allclose(_core.kernels.rowmat("Q8_0", w, 160, x, 2), ref, rtol=2e-6, atol=2e-6 * np.abs(ref).max())


def test_kernel_refuses_what_it_cannot_read():
    rng = np.random.default_rng(2)
    if not _core.kernels.rowmat_isa():
        with pytest.raises(ValueError, match="no projection kernel"):
            _core.kernels.rowmat("Q8_0", random_matrix("Q8_0", 4, 64, rng), 64, np.zeros((1, 64), np.float32))
        return
    with pytest.raises(ValueError, match="no projection kernel for Q4_0"):
        _core.kernels.rowmat("Q4_0", np.zeros((4, 36), np.uint8), 64, np.zeros((1, 64), np.float32))
    with pytest.raises(ValueError, match="no projection kernel for Q6_K rows of 320"):
        _core.kernels.rowmat("Q6_K", np.zeros((4, 263), np.uint8), 320, np.zeros((1, 320), np.float32))
    with pytest.raises(ValueError, match="unknown ggml type"):
        _core.kernels.rowmat("Q9_9", np.zeros((4, 34), np.uint8), 32, np.zeros((1, 32), np.float32))
    with pytest.raises(ValueError, match=r"w must be \[n_out, 210\] bytes"):
        _core.kernels.rowmat("Q6_K", np.zeros((4, 200), np.uint8), 256, np.zeros((1, 256), np.float32))
    with pytest.raises(ValueError, match=r"x must be \[n_rows, n_in\]"):
        _core.kernels.rowmat("Q6_K", random_matrix("Q6_K", 4, 256, rng), 256, np.zeros((1, 255), np.float32))


# The kernels' other builds: the wheel and the native build compile only the widest ISA the build
# machine has, so the 256-bit paths (AVX2's multiply-add pairs, and 256-bit VNNI as on CPUs with
# AVX-VNNI) are compiled here on their own and run where this CPU can, and the ARM NEON build is
# cross-compiled and run under qemu where an aarch64 toolchain and qemu-user are installed
# (Debian: apt install g++-aarch64-linux-gnu qemu-user).
WRAPPER = """
#include "dola-rowmat.h"
extern "C" const char * isa() { return dola::rowmat_isa(); }
extern "C" int available(int type, long n_in) { return dola::rowmat_available((ggml_type) type, n_in); }
extern "C" void rowmat(int type, const void * w, long n_out, long n_in, long stride, const float * x, int n_rows,
                       float * y, int n_threads) {
    dola::rowmat((ggml_type) type, w, n_out, n_in, stride, x, n_rows, y, n_threads);
}
"""
HARNESS = """
#include "dola-rowmat.h"
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>
static std::vector<char> slurp(const char * path) {
    std::vector<char> v;
    FILE * f = std::fopen(path, "rb");
    char buf[65536];
    for (size_t n; f && (n = std::fread(buf, 1, sizeof buf, f)) > 0;) v.insert(v.end(), buf, buf + n);
    if (f) std::fclose(f);
    return v;
}
int main(int argc, char ** argv) {  // isa | type n_out n_in stride n_rows w x y
    if (argc == 2 && std::string(argv[1]) == "isa") return std::printf("%s", dola::rowmat_isa()), 0;
    const int type = std::atoi(argv[1]), n_rows = std::atoi(argv[5]);
    const long n_out = std::atol(argv[2]), n_in = std::atol(argv[3]), stride = std::atol(argv[4]);
    if (!dola::rowmat_available((ggml_type) type, n_in)) return 3;
    std::vector<char> w = slurp(argv[6]), x = slurp(argv[7]);
    std::vector<float> y((size_t) n_rows * n_out);
    dola::rowmat((ggml_type) type, w.data(), n_out, n_in, stride, (const float *) x.data(), n_rows, y.data(), 2);
    FILE * f = std::fopen(argv[8], "wb");
    std::fwrite(y.data(), sizeof(float), y.size(), f);
    return std::fclose(f), 0;
}
"""
ROOT = Path(__file__).resolve().parents[1]
X86_BUILDS = {  # flags, the /proc/cpuinfo flags the CPU needs, the ISA the build reports
    "avx2": (["-mavx2", "-mfma", "-mf16c"], {"avx2", "fma", "f16c"}, "AVX2"),
    "vnni256": (["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512vl", "-mavx512vnni"],
                {"avx2", "fma", "f16c", "avx512f", "avx512vl", "avx512_vnni"}, "AVX2 + VNNI"),
}


def _sources(tmp_path: Path, extra: str, name: str) -> list[str]:
    include = ROOT / "third_party" / "llama.cpp" / "ggml" / "include"
    assert (include / "ggml.h").exists(), "ggml's headers come with the build (third_party/)"
    (tmp_path / name).write_text(extra)
    return [f"-I{ROOT / 'csrc'}", f"-I{include}", str(ROOT / "csrc" / "dola-rowmat.cpp"), str(tmp_path / name)]


def _x86_build(build: str, tmp_path: Path):
    flags, needs, isa = X86_BUILDS[build]
    if platform.machine() not in ("x86_64", "AMD64") or not needs <= cpu_flags():
        pytest.skip(f"this CPU cannot run the {build} build ({', '.join(sorted(needs - cpu_flags()))} missing)")
    cxx = shutil.which("c++") or shutil.which("g++")
    assert cxx, "a C++ compiler is needed"
    lib = tmp_path / f"rowmat-{build}.so"
    r = subprocess.run([cxx, "-O2", "-shared", "-fPIC", "-std=c++17", *flags, *_sources(tmp_path, WRAPPER, "wrap.cpp"),
                        "-o", str(lib)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    k = ctypes.CDLL(str(lib))
    k.isa.restype = ctypes.c_char_p
    k.available.argtypes = [ctypes.c_int, ctypes.c_long]
    k.rowmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                         ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    assert k.isa().decode() == isa

    def mm(t: int, w: np.ndarray, n_in: int, x: np.ndarray) -> np.ndarray:
        assert k.available(t, n_in)
        y = np.zeros((x.shape[0], w.shape[0]), np.float32)
        k.rowmat(t, w.ctypes.data, w.shape[0], n_in, w.shape[1], x.ctypes.data, x.shape[0], y.ctypes.data, 2)
        return y
    return mm


def _neon_build(tmp_path: Path):
    cxx, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
    if not cxx or not qemu:
        pytest.skip("no aarch64 cross compiler and qemu-user here (apt install g++-aarch64-linux-gnu qemu-user)")
    exe = tmp_path / "rowmat-neon"
    r = subprocess.run([cxx, "-O2", "-static", "-std=c++17", "-march=armv8.2-a+dotprod",
                        *_sources(tmp_path, HARNESS, "harness.cpp"), "-o", str(exe)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    run = [qemu, "-cpu", "max", str(exe)]
    assert subprocess.run(run + ["isa"], capture_output=True, text=True).stdout == "NEON dotprod"

    def mm(t: int, w: np.ndarray, n_in: int, x: np.ndarray) -> np.ndarray:
        (tmp_path / "w").write_bytes(w.tobytes())
        (tmp_path / "x").write_bytes(x.tobytes())
        r = subprocess.run(run + [str(v) for v in (t, w.shape[0], n_in, w.shape[1], x.shape[0])] +
                           [str(tmp_path / f) for f in ("w", "x", "y")], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return np.frombuffer((tmp_path / "y").read_bytes(), np.float32).reshape(x.shape[0], w.shape[0])
    return mm


# AVX2 is what the projection kernels need (KERNELS); the 256-bit VNNI build runs on AVX-512 VNNI
# CPUs; the NEON one where the cross tools are
@pytest.mark.parametrize("build", [pytest.param("avx2", marks=pytest.mark.hardware("KERNELS")),
                                   pytest.param("vnni256", marks=pytest.mark.hardware("AVX512_VNNI")),
                                   pytest.param("neon", marks=pytest.mark.hardware("AARCH64_CROSS_TOOLS"))])
def test_other_builds_match_numpy(build, tmp_path):
    mm = _neon_build(tmp_path) if build == "neon" else _x86_build(build, tmp_path)
    for qtype in TYPES:
        t = gguf.GGMLQuantizationType[qtype]
        for n_rows, n_in in ((1, 512), (9, 512), (13, 256 if qtype != "Q8_0" else 160)):
            rng = np.random.default_rng(n_rows)
            w = random_matrix(qtype, 37, n_in, rng)
            x = rng.standard_normal((n_rows, n_in)).astype(np.float32)
            ref = ggml_rounded(x, qtype) @ quants.dequantize(w, t).astype(np.float64).T
            np.testing.assert_allclose(mm(t.value, w, n_in, x), ref, rtol=2e-6, atol=2e-6 * np.abs(ref).max(),
                                       err_msg=f"{build} {qtype} {n_rows} x {n_in}")

