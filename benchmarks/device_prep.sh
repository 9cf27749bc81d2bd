#!/usr/bin/env bash
# Prepares what the GPU machine's check (benchmarks/device_check.sh) needs and cannot fetch: that
# machine has no network, and what is copied to it is at most 64 MiB. Run here, in the repository root,
# after one build (which fetched llama.cpp into third_party/). Writes .device/ (git-ignored through
# .git/info/exclude): llama.cpp's build inputs without its models, docs, tools and tests (~38 MB).
#
# Then copy the working tree with .device/ to the GPU machine, run there
#   bash benchmarks/device_check.sh
# and read $OUT/device_check.log.
set -euo pipefail
cd "$(dirname "$0")/.."
src=third_party/llama.cpp
[ -f "$src/CMakeLists.txt" ] || { echo "no $src: build once first (pip install -e .)" >&2; exit 1; }
mkdir -p .git/info
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
rm -rf .device && mkdir -p .device/llama.cpp
for p in CMakeLists.txt LICENSE cmake include src ggml vendor licenses common; do
    [ -e "$src/$p" ] && cp -r "$src/$p" .device/llama.cpp/
done
du -sh .device
