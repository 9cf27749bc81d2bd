#!/usr/bin/env bash
# The GPU machine's checks in one command: the CUDA build, DoLa on
# every placement of the weights against the CPU, the decode/prompt table on a 7B-shaped model,
# and which CPU features (AMX) that machine has. Prepare with benchmarks/device_prep.sh, copy the
# working tree with .device/ to the GPU machine, then run there:
#   bash benchmarks/device_check.sh
# Everything is logged to $OUT/device_check.log (and the tables to $OUT/*.md).
# The machine has no network: llama.cpp comes from .device/llama.cpp; numpy, pybind11,
# scikit-build-core, cmake and ninja are in its image.
set -uo pipefail
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
exec > >(tee "$OUT/device_check.log") 2>&1
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
REPO=$PWD
step() { echo; echo "=== $* ($(date +%T), ${SECONDS}s)"; }

step machine
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
nproc
grep -m1 "model name" /proc/cpuinfo
echo "cpu flags of note: $(grep -m1 -o -w -E 'avx512f|avx512_vnni|avx_vnni|amx_tile|amx_int8|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"
python3 --version; nvcc --version 2>/dev/null | tail -1; gcc --version | head -1

step "CUDA build"
[ -f .device/llama.cpp/CMakeLists.txt ] || { echo "no .device/llama.cpp: run benchmarks/device_prep.sh here and carry .device"; exit 1; }
export CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCH:-90} -DDOLA_LLAMA_CPP_DIR=$PWD/.device/llama.cpp"
export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
t0=$SECONDS
python3 -m pip install -q --no-build-isolation --no-deps --no-index --target /tmp/site \
    -C build-dir=/tmp/dola-build . || { echo "BUILD FAILED"; exit 1; }
echo "build: $((SECONDS - t0)) s"
export PYTHONPATH=/tmp/site
python3 -c "import dola_cpp, dola_cpp._core as c; print('imported', dola_cpp.__file__)"
nm -D --defined-only /tmp/site/dola_cpp/_core*.so | awk '{print $3}' | grep -v -E '^PyInit__core$' | head -5 \
    | sed 's/^/exported symbol (should be none): /'

step "DoLa on every placement of the weights against the CPU"
timeout 120 python3 benchmarks/device_parity.py --tokens 32 | tee "$OUT/parity.md"

step "the CPU's extra buffer types (AMX where the CPU has it, CPU_REPACK) against the plain layout; exports"
# (from /tmp: in the repository root, the source folder dola_cpp/ would shadow the installed one)
(cd /tmp && timeout 150 python3 -m pytest -q -p no:cacheprovider -rs "$REPO/tests/test_backends.py" -k "not q8_kernel" \
    "$REPO/tests/test_isolation.py::test_core_exports_only_its_module_init" "$REPO/tests/test_capture.py")

step "decode and prompt processing on a 7B-shaped model (plain vs DoLa)"
timeout 300 python3 benchmarks/bench_decode.py --models llama-7b-shape --tokens 128 --repeats 3 --no-transformers \
    | tee "$OUT/bench_7b.md"

# compare LATEST_START WHAT OUTFILE VAR=VALUE: the 7B table again with one setting changed, when
# it can start before LATEST_START seconds (the call's limit is 590)
compare() {
    if [ "$SECONDS" -lt "$1" ]; then
        step "the same with $2 ($4), for comparison"
        env "$4" timeout $((560 - SECONDS)) python3 benchmarks/bench_decode.py --models llama-7b-shape \
            --tokens 64 --repeats 1 --no-transformers | tee "$OUT/$3"
    else
        echo "(no time left for the comparison with $2: run it in a second call)"
    fi
}
compare 430 "the layers copied by the eval callback" bench_7b_callback_capture.md DOLA_CPP_CAPTURE=callback
compare 480 "DoLa's contrast on the host" bench_7b_host_contrast.md DOLA_CPP_DEVICE_CONTRAST=off

step done
