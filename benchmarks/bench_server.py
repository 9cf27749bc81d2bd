"""`dola-cpp serve` under concurrent streaming clients: aggregate tokens/s and per-request latency
(p50/p95, and time to the first token) for 1, 4 and 16 clients, plain and DoLa, with the official
openai client over loopback. The same run measures plain llama.cpp decoding (one context without
the capture callback) as the baseline.

    python benchmarks/bench_server.py [--model smollm2] [--parallel 4] [--requests 32] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import socket
import statistics
import threading
import time

import openai
import uvicorn

from dola_cpp import Model
from dola_cpp.hub import resolve_model
from dola_cpp.server import create_app

QUESTIONS = [
    "What is the capital of France?", "Who wrote Hamlet?", "Why is the sky blue?", "Name three planets.",
    "What is photosynthesis?", "Who painted the Mona Lisa?", "What is the largest ocean?", "How do vaccines work?",
]


def serve(app) -> tuple[uvicorn.Server, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}/v1"


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--requests", type=int, default=32, help="requests per row")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--threads", type=int, default=None, help="threads per context")
    args = ap.parse_args()

    path = resolve_model(args.model)
    base = Model(path, n_ctx=1024, n_threads=args.threads, capture=False)
    prompt = base.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}])
    base.generate(prompt, max_tokens=8)
    r = base.generate(prompt, max_tokens=args.max_tokens, ignore_eos=True)
    baseline = r.tokens_per_second
    del base

    model = Model(path, n_ctx=1024, n_threads=args.threads)
    server, url = serve(create_app(model, parallel=args.parallel, max_queue=1024, model_name="m"))
    client = openai.OpenAI(base_url=url, api_key="none", timeout=600, max_retries=0)
    rows = []
    for mode, extra in (("plain", {}), ("DoLa high", {"dola_layers": "high", "premature_norm": True})):
        one(client, QUESTIONS[0], 4, extra)  # warm-up
        for n_clients in args.clients:
            questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.requests)]
            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(n_clients) as pool:
                results = list(pool.map(lambda q: one(client, q, args.max_tokens, extra), questions))
            wall = time.perf_counter() - t0
            latency = [r[0] for r in results]
            ttft = [r[1] for r in results]
            tokens = sum(r[2] for r in results)
            rows.append((mode, n_clients, tokens / wall, statistics.median(latency), pct(latency, 0.95),
                         statistics.median(ttft), pct(ttft, 0.95)))
            print(rows[-1], flush=True)
    server.should_exit = True

    print(f"\n{path.name}, --parallel {args.parallel}, {args.requests} streamed requests per row, "
          f"{args.max_tokens} tokens at most, greedy")
    print(f"plain llama.cpp decoding, one context, no capture: {baseline:.1f} tok/s\n")
    print("| mode | clients | aggregate tok/s | latency p50 | p95 | first token p50 | p95 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode, n, tps, l50, l95, f50, f95 in rows:
        print(f"| {mode} | {n} | {tps:.1f} | {l50:.2f} s | {l95:.2f} s | {f50:.2f} s | {f95:.2f} s |")


if __name__ == "__main__":
    main()
