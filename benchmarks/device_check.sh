#!/usr/bin/env bash
# The GPU machine's checks in one command: the CUDA build, DoLa and continuous batching on every
# placement of the weights against the CPU (both capture modes), the CPU's extra buffer types
# (AMX where it has them), and on a 7B-shaped model continuous batching and the decode/prompt
# table. Prepare with benchmarks/device_prep.sh, copy the working tree with .device/ (and .whl/,
# the wheels the machine lacks) to the GPU machine, then run there:
#   bash benchmarks/device_check.sh [SECONDS]
# Steps run in order of importance, each within what is left of SECONDS (default 570). The build
# goes to .devbuild/ (git-ignored), so a second run on the same machine does not rebuild.
# Everything is logged to $OUT/device_check.log (and the tables to $OUT/*.md).
# The machine has no network: llama.cpp comes from .device/llama.cpp; numpy, pybind11,
# scikit-build-core, cmake and ninja are in its image.
set -uo pipefail
BUDGET=${1:-570}
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
exec > >(tee "$OUT/device_check.log") 2>&1
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
REPO=$PWD
step() { echo; echo "=== $* ($(date +%T), ${SECONDS}s)"; }
# left MAX: seconds for the next step, at most MAX, ending 10 s before the budget
left() { local l=$((BUDGET - 10 - SECONDS)); [ "$l" -gt "$1" ] && l=$1; echo $((l > 1 ? l : 1)); }

step machine
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
nproc
grep -m1 "model name" /proc/cpuinfo
echo "cpu flags of note: $(grep -m1 -o -w -E 'avx512f|avx512_vnni|avx_vnni|amx_tile|amx_int8|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"
python3 --version; nvcc --version 2>/dev/null | tail -1; gcc --version | head -1

step "CUDA build"
[ -f .device/llama.cpp/CMakeLists.txt ] || { echo "no .device/llama.cpp: run benchmarks/device_prep.sh here and carry .device"; exit 1; }
# (Python runs from /tmp below: in the repository root the source folder dola_cpp/ would shadow
# the installed one)
SITE=$REPO/.devbuild/site
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" .whl/*.whl
fi
# (GPU_CMAKE_ARGS= runs the same steps on a CPU-only build: a rehearsal of this script)
export CMAKE_ARGS="${GPU_CMAKE_ARGS--DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCH:-90}} -DDOLA_LLAMA_CPP_DIR=$PWD/.device/llama.cpp"
export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
t0=$SECONDS
python3 -m pip install -q --no-build-isolation --no-deps --no-index --upgrade --target "$SITE" \
    -C build-dir="$REPO/.devbuild/build" . || { echo "BUILD FAILED"; exit 1; }
echo "build: $((SECONDS - t0)) s"
export PYTHONPATH=$SITE
(cd /tmp && python3 -c "import dola_cpp, dola_cpp._core as c; print('imported', dola_cpp.__file__); print(c.system_info())")
nm -D --defined-only "$SITE"/dola_cpp/_core*.so | awk '{print $3}' | grep -v -E '^PyInit__core$' | head -5 \
    | sed 's/^/exported symbol (should be none): /'

step "DoLa and continuous batching on every placement of the weights against the CPU"
(cd /tmp && timeout "$(left 120)" python3 "$REPO/benchmarks/device_parity.py" --tokens 32) | tee "$OUT/parity.md"

step "the same with the layers copied by the eval callback (DOLA_CPP_CAPTURE=callback)"
(cd /tmp && DOLA_CPP_CAPTURE=callback timeout "$(left 90)" python3 "$REPO/benchmarks/device_parity.py" --tokens 32) \
    | tee "$OUT/parity_callback.md"

step "the CPU's extra buffer types (AMX where the CPU has it, CPU_REPACK) against the plain layout; exports"
# (the tests here that need the PyPI demo models are left out, and so is the suite's conftest,
# which fetches them first: the machine cannot)
(cd /tmp && timeout "$(left 120)" python3 -m pytest -q -p no:cacheprovider --noconftest -o addopts= -rs \
    "$REPO/tests/test_backends.py" \
    -k "not q8_0_kernel and not kernel_setting and not contrast and not device_parity" \
    "$REPO/tests/test_isolation.py::test_core_exports_only_its_module_init")

step "continuous batching on a 7B-shaped model: 1, 4 and 16 generations at once"
(cd /tmp && timeout "$(left 200)" python3 "$REPO/benchmarks/bench_decode.py" --models llama-7b-shape --batch 1,4,16 \
    --tokens 64 --repeats 2) | tee "$OUT/bench_7b_batch.md"

step "the same with DoLa's contrast on the host (DOLA_CPP_DEVICE_CONTRAST=off), for comparison"
(cd /tmp && DOLA_CPP_DEVICE_CONTRAST=off timeout "$(left 120)" python3 "$REPO/benchmarks/bench_decode.py" \
    --models llama-7b-shape --batch 1,4,16 --tokens 64 --repeats 1) | tee "$OUT/bench_7b_batch_host_contrast.md"

step "decode and prompt processing on a 7B-shaped model (plain vs DoLa)"
(cd /tmp && timeout "$(left 300)" python3 "$REPO/benchmarks/bench_decode.py" --models llama-7b-shape --tokens 64 \
    --repeats 2 --no-transformers) | tee "$OUT/bench_7b.md"

# compare WHAT VAR=VALUE: the 7B table again with one setting changed, if 60 s are left (in the log
# only: at most 8 files come back from the machine)
compare() {
    if [ "$(left 1000)" -gt 60 ]; then
        step "the same with $1 ($2), for comparison"
        (cd /tmp && env "$2" timeout "$(left 300)" python3 "$REPO/benchmarks/bench_decode.py" --models llama-7b-shape \
            --tokens 64 --repeats 1 --no-transformers)
    else
        echo "(no time left for the comparison with $1: run it in a second call)"
    fi
}
compare "DoLa's contrast on the host" DOLA_CPP_DEVICE_CONTRAST=off
compare "the layers copied by the eval callback" DOLA_CPP_CAPTURE=callback
compare "no fused final row" DOLA_CPP_NO_FUSE=1

step done
