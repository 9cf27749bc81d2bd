"""DoLa on every placement of the weights, against the CPU: full GPU offload, half the layers
offloaded, and none (the CPU computes; with a GPU build the weights sit in pinned CUDA_Host
memory). On a random-weight F32 llama written here (no download), with the exact-mode F32 KV cache:
greedy DoLa-high, static and plain generation, and a DoLa score, compared token by token with
the CPU run (JSD and scores within tolerance).

    python benchmarks/device_parity.py [--tokens 32]

On a build without a GPU every placement is the CPU: the script then checks itself and says so.
Exit status 1 when a placement disagrees.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dola_cpp import Model
from dola_cpp.synthetic import write_llama_gguf

N_LAYER = 8
PROMPT = "the quick brown fox jumps over the lazy dog"


def run(path: Path, n_gpu_layers: int, n_tokens: int) -> dict:
    m = Model(path, n_ctx=256, kv_type="f32", n_gpu_layers=n_gpu_layers)
    out = {}
    t0 = time.perf_counter()
    for name, layers in (("plain", None), ("static", [N_LAYER // 2]), ("high", "high")):
        r = m.generate(PROMPT, max_tokens=n_tokens, ignore_eos=True, layers=layers)
        out[name] = r
    out["score"] = m.score(PROMPT, " over the lazy dog again", layers="high")
    out["seconds"] = time.perf_counter() - t0
    out["backend"] = m.projection_backend
    return out


def compare(ref: dict, got: dict) -> list[str]:
    problems = []
    for name in ("plain", "static", "high"):
        a, b = ref[name], got[name]
        if a.tokens != b.tokens:
            first = next(i for i, (x, y) in enumerate(zip(a.tokens + [-1], b.tokens + [-2])) if x != y)
            problems.append(f"{name}: tokens differ from position {first}")
            continue
        layers_a = [s.premature_layer for s in a.steps]
        layers_b = [s.premature_layer for s in b.steps]
        if layers_a != layers_b:
            problems.append(f"{name}: premature layers differ")
        for sa, sb in zip(a.steps, b.steps):
            if sa.jsd.size and not np.allclose(sa.jsd, sb.jsd, rtol=1e-3, atol=1e-6):
                problems.append(f"{name}: JSD differs beyond 1e-3 (max {np.max(np.abs(sa.jsd - sb.jsd)):.2e})")
                break
            if not np.isclose(sa.score, sb.score, rtol=1e-3, atol=1e-3):
                problems.append(f"{name}: scores differ ({sa.score} vs {sb.score})")
                break
    sa, sb = ref["score"], got["score"]
    if sa.premature_layers != sb.premature_layers or not np.allclose(sa.token_scores, sb.token_scores, rtol=1e-3,
                                                                     atol=1e-3):
        problems.append("score(): premature layers or token scores differ")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_llama_gguf(Path(tmp) / "parity-f32.gguf", n_layer=N_LAYER, n_embd=256, n_head=4, n_ff=512,
                                n_vocab=4096, n_ctx=256, seed=7)
        placements = (("cpu (n_gpu_layers=0)", 0), ("half offloaded", N_LAYER // 2), ("all offloaded", -1))
        results = {name: run(path, n, args.tokens) for name, n in placements}
    ref = results["cpu (n_gpu_layers=0)"]
    print("| placement | projection runs on | seconds | agrees with the CPU |")
    print("|---|---|---:|---|")
    failed = False
    for name, _ in placements:
        r = results[name]
        problems = [] if r is ref else compare(ref, r)
        failed = failed or bool(problems)
        print(f"| {name} | {r['backend']} | {r['seconds']:.2f} | {'yes' if not problems else '; '.join(problems)} |")
    if all("CUDA" not in results[n]["backend"] and "Metal" not in results[n]["backend"] for n, _ in placements):
        print("(no GPU in this build or machine: every placement ran on the CPU)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
