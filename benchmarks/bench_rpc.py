"""What ggml's RPC backend costs on loopback: decode and prompt speed with every layer local, on
one `dola-cpp rpc-server`, and split across two, plain and DoLa. Loopback shows the protocol's
overhead (a round trip per graph split and per captured layer), not a network's latency.

    python benchmarks/bench_rpc.py [--model smollm2] [--tokens 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

from dola_cpp import Model
from dola_cpp.hub import resolve_model


def start_server(threads: int, cwd: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dola_cpp.cli", "rpc-server", "--port", str(port), "--threads",
                             str(threads)], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    return proc, f"127.0.0.1:{port}"


def _wall(m: Model, prompt: str, tokens: int, layers) -> float:
    m.clear_cache()
    t0 = time.perf_counter()
    m.generate(prompt, max_tokens=tokens, layers=layers, ignore_eos=True)
    return time.perf_counter() - t0


def measure(m: Model, prompt: str, tokens: int, layers) -> tuple[float, float]:
    """(decode tok/s, prompt tok/s), best of 3. Wall times, not the result's prefill/decode split:
    the RPC backend computes asynchronously, so a prompt's compute finishes inside the first
    token's step. Prompt = a 1-token generation from a cleared cache; decode = the extra time of
    ``tokens`` tokens over that one."""
    m.generate(prompt, max_tokens=4, layers=layers)  # warm-up
    first = min(_wall(m, prompt, 1, layers) for _ in range(3))
    whole = min(_wall(m, prompt, tokens, layers) for _ in range(3))
    return (tokens - 1) / (whole - first), len(m.tokenize(prompt)) / first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="threads of the local context and of each server")
    args = ap.parse_args()
    path = resolve_model(args.model)
    prompt = "Explain how a telescope works, in detail. " * 8
    cwd = tempfile.mkdtemp()
    servers = [start_server(args.threads, cwd) for _ in range(2)]
    try:
        setups = [
            ("local", {"repack": False}),
            ("1 rpc-server", {"rpc": servers[0][1]}),
            ("2 rpc-servers", {"rpc": [s[1] for s in servers]}),
        ]
        rows = []
        for name, kw in setups:
            m = Model(path, n_ctx=1024, n_threads=args.threads, **kw)
            for mode, layers in (("plain", None), ("DoLa high", "high")):
                tps, pps = measure(m, prompt, args.tokens, layers)
                rows.append((name, mode, tps, pps))
                print(rows[-1], flush=True)
            del m
    finally:
        for proc, _ in servers:
            proc.kill()
    print(f"\n{path.name}, {args.threads} thread(s) per context and per server, loopback, best of 3")
    print("| layers | mode | decode tok/s | vs local | prompt tok/s | vs local |")
    print("|---|---|---:|---:|---:|---:|")
    local = {mode: (tps, pps) for name, mode, tps, pps in rows if name == "local"}
    for name, mode, tps, pps in rows:
        print(f"| {name} | {mode} | {tps:.1f} | {tps / local[mode][0]:.2f}x | {pps:.0f} | {pps / local[mode][1]:.2f}x |")


if __name__ == "__main__":
    os.environ.setdefault("DOLA_CPP_DEBUG", "")
    main()
