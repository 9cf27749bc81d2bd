"""`dola-cpp serve` against llama.cpp's `llama-server`, under the same streamed chat load: aggregate
tokens/s, request latency and time to the first token (p50/p95) at 1, 4 and 16 clients, with the
official openai client over loopback. Both servers run as a user starts them (separate processes,
the same model file, the same number of parallel sequences); dola-cpp is measured with plain
decoding and with DoLa (`dola_layers: "high"`, normed premature layers). The same requests also go
through ``Model.stream`` in this process, one at a time (the engine without HTTP), and the table
ends with the server's 1-client rate over that. The servers take turns over `--rounds` rounds
and each row keeps its best round, for both alike (a VM's speed drifts between runs).

llama-server is built from the llama.cpp source dola-cpp builds against (third_party/llama.cpp,
fetched by the first `pip install`) into build/llama-server, unless `--llama-server PATH` names
one; `--no-llama-server` measures dola-cpp alone.

    python benchmarks/bench_server.py [--model smollm2] [--parallel 4] [--requests 32] [--max-tokens 32]
        [--rounds 2] [--no-llama-server] [--no-in-process] [--serve-args '--cache-ram 0' ...]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

import openai

from dola_cpp.hub import resolve_model

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "What is the capital of France?", "Who wrote Hamlet?", "Why is the sky blue?", "Name three planets.",
    "What is photosynthesis?", "Who painted the Mona Lisa?", "What is the largest ocean?", "How do vaccines work?",
    "What is the boiling point of water?", "Who discovered penicillin?", "What is the speed of light?",
    "How many continents are there?", "What is DNA?", "Who was Albert Einstein?", "What causes tides?",
    "What is the tallest mountain?",
]


def build_llama_server() -> Path:
    """llama-server from the pinned llama.cpp source, built once into build/llama-server."""
    src = ROOT / "third_party" / "llama.cpp"
    if not (src / "CMakeLists.txt").exists():
        sys.exit("third_party/llama.cpp is missing: `pip install .` fetches it (or pass --llama-server PATH)")
    out = ROOT / "build" / "llama-server"
    exe = out / "bin" / "llama-server"
    if exe.exists():
        return exe
    print(f"building llama-server from {src} into {out} (a few minutes)...", flush=True)
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(src), "-B", str(out), *gen, "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_COMMON=ON",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_OPENSSL=OFF",
                    "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(out), "--target", "llama-server", "-j", str(os.cpu_count() or 1)],
                   check=True, stdout=subprocess.DEVNULL)
    return exe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{cmd[0]} exited: {proc.stderr.read().decode(errors='replace')[-2000:] if proc.stderr else ''}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.25)
    proc.kill()
    sys.exit(f"{cmd[0]} did not become healthy")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it has not exited in 10 s (llama-server can wait on idle HTTP threads)."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def rss_mib(proc: subprocess.Popen) -> Optional[float]:
    try:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def one(client: openai.OpenAI, question: str, max_tokens: int, extra: dict) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    first = None
    tokens = 0
    stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": question}],
                                            max_tokens=max_tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body=extra)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - t0
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return time.perf_counter() - t0, first or 0.0, tokens


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def load(url: str, extra: dict, args: argparse.Namespace) -> list[tuple]:
    client = openai.OpenAI(base_url=url, api_key="none", timeout=600, max_retries=0)
    one(client, QUESTIONS[0], 4, extra)  # warm-up
    rows = []
    for n_clients in args.clients:
        questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.requests)]
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(n_clients) as pool:
            results = list(pool.map(lambda q: one(client, q, args.max_tokens, extra), questions))
        wall = time.perf_counter() - t0
        latency = [r[0] for r in results]
        ttft = [r[1] for r in results]
        tokens = sum(r[2] for r in results)
        rows.append((n_clients, tokens / wall, statistics.median(latency), pct(latency, 0.95),
                     statistics.median(ttft), pct(ttft, 0.95)))
        print("   ", rows[-1], flush=True)
    return rows


def in_process(path: Path, layers: Optional[str], args: argparse.Namespace) -> tuple:
    """The same requests through ``Model.stream`` in this process, one at a time, with the settings
    the server decodes a chat with when a request leaves them unset: the engine without HTTP."""
    from dola_cpp import Model, settings

    model = Model(path, n_threads=args.threads)
    kw = dict(layers=layers, premature_norm=settings.CHAT_PREMATURE_NORM, eos_boost=settings.CHAT_EOS_BOOST,
              dry_multiplier=settings.CHAT_DRY_MULTIPLIER, stop_loops=True)
    chats = [model.chat_tokens([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
             for i in range(args.requests)]
    model.generate(chats[0], max_tokens=4, **kw)  # warm-up
    latency, ttft, tokens = [], [], 0
    t0 = time.perf_counter()
    for ids in chats:
        t = time.perf_counter()
        first = None
        stream = model.stream(ids, args.max_tokens, **kw)
        for piece in stream:
            if piece and first is None:
                first = time.perf_counter() - t
        latency.append(time.perf_counter() - t)
        ttft.append(first or 0.0)
        tokens += len(stream.tokens)
    wall = time.perf_counter() - t0
    row = (1, tokens / wall, statistics.median(latency), pct(latency, 0.95), statistics.median(ttft), pct(ttft, 0.95))
    print("   ", row, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--parallel", type=int, default=4, help="parallel sequences (llama-server -np, serve --parallel)")
    ap.add_argument("--requests", type=int, default=32, help="requests per row")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads, both servers")
    ap.add_argument("--ctx", type=int, default=8192, help="llama-server's -c (shared by its slots)")
    ap.add_argument("--llama-server", type=Path, default=None, help="a llama-server binary (default: build it)")
    ap.add_argument("--no-llama-server", action="store_true", help="measure dola-cpp serve alone")
    ap.add_argument("--rounds", type=int, default=2,
                    help="rounds, the servers taking turns in each; every row keeps its best round (a VM's speed "
                         "drifts between runs)")
    ap.add_argument("--serve-args", action="append", metavar="ARGS",
                    help="options for dola-cpp serve, e.g. '--cache-ram 0' (named in its rows); repeated: one "
                         "server of each in every round")
    ap.add_argument("--no-in-process", action="store_true",
                    help="skip the same requests through Model.stream in this process, one at a time")
    args = ap.parse_args()

    path = resolve_model(args.model)
    exe = None if args.no_llama_server else (args.llama_server or build_llama_server())
    # (server, mode) -> the best row per client count over the rounds, and the largest RSS
    best: dict[tuple[str, str], dict[int, tuple]] = {}
    rss: dict[tuple[str, str], Optional[float]] = {}

    def keep(server: str, mode: str, rows: list[tuple], mem: Optional[float]) -> None:
        kept = best.setdefault((server, mode), {})
        for row in rows:
            if row[0] not in kept or row[1] > kept[row[0]][1]:
                kept[row[0]] = row
        if mem is not None:
            rss[server, mode] = max(mem, rss.get((server, mode)) or 0.0)

    variants = args.serve_args or [""]
    for r in range(args.rounds):
        print(f"round {r + 1} of {args.rounds}", flush=True)
        if exe is not None:
            port = free_port()
            proc = start([str(exe), "-m", str(path), "--port", str(port), "-np", str(args.parallel), "-c",
                          str(args.ctx), "-t", str(args.threads), "--no-webui"], port)
            try:
                print("llama-server, plain", flush=True)
                rows = load(f"http://127.0.0.1:{port}/v1", {}, args)
                keep("llama-server", "plain", rows, rss_mib(proc))
            finally:
                stop(proc)
        for extra_args in variants:
            name = " ".join(["dola-cpp serve", *shlex.split(extra_args)])
            port = free_port()
            proc = start([sys.executable, "-m", "dola_cpp", "serve", str(path), "--port", str(port),
                          "--parallel", str(args.parallel), "--threads", str(args.threads), "--queue", "1024",
                          *shlex.split(extra_args)], port)
            try:
                for mode, extra in (("plain", {"dola_layers": "none"}), ("DoLa high", {"dola_layers": "high"})):
                    print(f"{name}, {mode}", flush=True)
                    rows = load(f"http://127.0.0.1:{port}/v1", extra, args)
                    keep(name, mode, rows, rss_mib(proc))
            finally:
                stop(proc)
        if not args.no_in_process:
            for mode, layers in (("plain", None), ("DoLa high", "high")):
                print(f"in-process Model.stream, {mode}", flush=True)
                keep("in-process Model.stream", mode, [in_process(path, layers, args)], None)
    runs = [(server, mode, [rows[n] for n in sorted(rows)], rss.get((server, mode))) for (server, mode), rows in best.items()]

    base = {r[0]: r[1] for server, mode, rows, _ in runs if server == "llama-server" for r in rows}
    print(f"\n{path.name}, {args.parallel} parallel sequences, {args.threads} threads, {args.requests} streamed "
          f"chat requests per row, {args.max_tokens} tokens at most, greedy; {os.cpu_count()} cores; each row the "
          f"best of {args.rounds} rounds, the servers taking turns")
    print("\n| server | decoding | clients | aggregate tok/s | × llama-server | latency p50 | p95 "
          "| first token p50 | p95 | RSS MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for server, mode, rows, rss in runs:
        for n, tps, l50, l95, f50, f95 in rows:
            ratio = f"{tps / base[n]:.2f}" if n in base else ""
            mem = f"{rss:.0f}" if rss is not None else ""
            print(f"| {server} | {mode} | {n} | {tps:.1f} | {ratio} | {l50:.2f} s | {l95:.2f} s "
                  f"| {f50:.2f} s | {f95:.2f} s | {mem} |")
    alone = {mode: rows[0][1] for server, mode, rows, _ in runs if server.startswith("in-process")}
    first = " ".join(["dola-cpp serve", *shlex.split(variants[0])])
    served = {mode: r[1] for server, mode, rows, _ in runs if server == first for r in rows if r[0] == 1}
    if alone and served:
        print("\nserved at 1 client ÷ in-process: " + ", ".join(f"{m} {served[m] / alone[m]:.2f}" for m in alone))


if __name__ == "__main__":
    main()
