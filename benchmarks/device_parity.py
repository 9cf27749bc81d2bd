"""DoLa on every placement of the weights, against the CPU: full GPU offload, half the layers
offloaded, and none (the CPU computes; with a GPU build the weights sit in pinned CUDA_Host
memory). On a random-weight F32 llama written here (no download), with the exact-mode F32 KV cache:
greedy DoLa-high, static and plain generation, and a DoLa score, compared token by token with
the CPU run (JSD and scores within tolerance). Then, on each placement, continuous batching
(``Model.batch``): a mix of decoders in one batch, and prompts restored from the prompt cache,
each against the same request alone on that placement.

Tolerances: one generated token's rows agree with the CPU's within 1e-3. Where rows go through a
matrix product several at a time (score()'s continuation, a batch of sequences), llama.cpp's CUDA
backend multiplies F32 matrices with cuBLAS in TF32 (a 10-bit mantissa): those results agree with
one row's to ~1e-3 relative, which DoLa's contrast (a difference of log-probabilities) carries
into its scores as ~1e-3 absolute, so they are compared within 1e-2 (measured on an H200,
2026-12-04: up to 3e-3). A greedy token may then flip where the two best scores tie, and a sampled
one where the draw falls near the boundary between two tokens (on the H200: after 15 and 18
matching steps of 32): the table reports those as ties, and anything else as a disagreement.

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

from dola_cpp import DecodeConfig, Model
from dola_cpp.synthetic import write_llama_gguf

N_LAYER = 8
ROW_TOL = dict(rtol=1e-3, atol=1e-3)  # one row at a time
BATCHED_TOL = dict(rtol=1e-2, atol=1e-2)  # several rows per product (TF32 on CUDA)
PROMPT = "the quick brown fox jumps over the lazy dog"
PROMPTS = [PROMPT, "a lazy dog sleeps in the sun", "the brown fox runs away", "over the hills and far away"]
# one of each decoder set-up; top_logprobs=2 gives each step's two best scores (to tell a tie)
BATCH_CONFIGS = {
    "plain": DecodeConfig(),
    "static": DecodeConfig().replace(layers=[N_LAYER // 2]),
    "high": DecodeConfig().replace(layers="high", repetition_penalty=1.2),
    "low-normed": DecodeConfig().replace(layers="low", premature_norm=True),
    "activation": DecodeConfig().replace(decoder="activation", layers=None),
    "sampled": DecodeConfig().replace(layers="high", temperature=0.8, top_k=40, seed=7),
}
BATCH_CONFIGS = {k: v.replace(top_logprobs=2) for k, v in BATCH_CONFIGS.items()}


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


def same_as_alone(batched, alone, sampled: bool = False) -> str:
    """'' when a batched generation gives what it gives alone; 'tie at k' when they part at a step
    whose two best scores (alone) were within BATCHED_TOL, or, ``sampled``, at a step after the
    first with every step before it the same; else what differs."""
    for k, (a, b) in enumerate(zip(batched.steps, alone.steps)):
        if a.token != b.token:
            top = b.dola_top_logprobs or b.top_logprobs
            if (len(top) == 2 and top[0][1] - top[1][1] < BATCHED_TOL["atol"]) or (sampled and k > 0):
                return f"tie at {k}"
            return f"tokens differ from {k}"
        if a.premature_layer != b.premature_layer:
            return f"premature layer differs at {k}"
        if not np.isclose(a.score, b.score, **BATCHED_TOL) or (
                a.jsd.size and not np.allclose(a.jsd, b.jsd, rtol=BATCHED_TOL["rtol"], atol=1e-6)):
            return (f"score or JSD differs at {k} (scores {a.score:.5f} vs {b.score:.5f}, JSD by "
                    f"{np.max(np.abs(a.jsd - b.jsd), initial=0):.1e})")
    if len(batched.tokens) != len(alone.tokens):
        return "lengths differ"
    return ""


def run_batch(path: Path, n_gpu_layers: int, n_tokens: int) -> tuple[list[str], list[str]]:
    """(disagreements, ties) of continuous batching against the same requests alone."""
    m = Model(path, n_ctx=256, kv_type="f32", n_gpu_layers=n_gpu_layers)
    pairs = [(PROMPTS[i % len(PROMPTS)], name) for i, name in enumerate(BATCH_CONFIGS)]
    alone = {pair: m.generate(pair[0], n_tokens, ignore_eos=True, config=BATCH_CONFIGS[pair[1]])
             for pair in pairs + [(p, "high") for p in PROMPTS]}
    batch = m.batch(parallel=len(pairs))
    got = batch.generate([p for p, _ in pairs], n_tokens, ignore_eos=True,
                         configs=[BATCH_CONFIGS[n] for _, n in pairs])
    checks = [(f"mixed batch, {name}", r, alone[pair], BATCH_CONFIGS[name].temperature > 0)
              for pair, r, name in zip(pairs, got, BATCH_CONFIGS)]
    # the prompt cache: two prompts saved when two others take their sequences, then asked again
    batch = m.batch(parallel=2)
    high = [BATCH_CONFIGS["high"]] * 2
    batch.generate(PROMPTS[:2], n_tokens, ignore_eos=True, configs=high)
    batch.generate(PROMPTS[2:4], n_tokens, ignore_eos=True, configs=high)
    hits = batch.stats()["n_cache_hits"]
    again = batch.generate([PROMPTS[1], PROMPTS[0]], n_tokens, ignore_eos=True, configs=high)
    checks += [(f"from the prompt cache, {p!r}", r, alone[p, "high"], False) for p, r in zip(PROMPTS[1::-1], again)]
    problems, ties = [], []
    if batch.stats()["n_cache_hits"] - hits != 2:
        problems.append(f"prompt cache: {batch.stats()['n_cache_hits'] - hits} hits where 2 were due")
    for what, r, a, sampled in checks:
        verdict = same_as_alone(r, a, sampled)
        (ties if verdict.startswith("tie") else problems).extend([f"{what}: {verdict}"] if verdict else [])
    return problems, ties


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
            if not np.isclose(sa.score, sb.score, **ROW_TOL):
                problems.append(f"{name}: scores differ ({sa.score} vs {sb.score})")
                break
    sa, sb = ref["score"], got["score"]
    if sa.premature_layers != sb.premature_layers or not np.allclose(sa.token_scores, sb.token_scores,
                                                                     **BATCHED_TOL):
        problems.append("score(): premature layers or token scores differ")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    placements = (("cpu (n_gpu_layers=0)", 0), ("half offloaded", N_LAYER // 2), ("all offloaded", -1))
    with tempfile.TemporaryDirectory() as tmp:
        path = write_llama_gguf(Path(tmp) / "parity-f32.gguf", n_layer=N_LAYER, n_embd=256, n_head=4, n_ff=512,
                                n_vocab=4096, n_ctx=256, seed=7)
        results = {name: run(path, n, args.tokens) for name, n in placements}
        ref = results["cpu (n_gpu_layers=0)"]
        print("| placement | projection runs on | seconds | agrees with the CPU |")
        print("|---|---|---:|---|")
        failed = False
        for name, _ in placements:
            r = results[name]
            problems = [] if r is ref else compare(ref, r)
            failed = failed or bool(problems)
            print(f"| {name} | {r['backend']} | {r['seconds']:.2f} | "
                  f"{'yes' if not problems else '; '.join(problems)} |")
        if all("CUDA" not in results[n]["backend"] and "Metal" not in results[n]["backend"] for n, _ in placements):
            print("(no GPU in this build or machine: every placement ran on the CPU)")
        print("\n| placement | continuous batching (6 decoders in one batch; 2 prompts from the prompt cache) "
              "against each request alone |")
        print("|---|---|", flush=True)
        for name, n in placements:
            problems, ties = run_batch(path, n, args.tokens)
            failed = failed or bool(problems)
            verdict = "; ".join(problems) if problems else "the same"
            print(f"| {name} | {verdict}{' (ties: ' + '; '.join(ties) + ')' if ties else ''} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
