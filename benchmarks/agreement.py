"""Do quantized models pick the same premature layers as their F32 copy?

    python benchmarks/agreement.py [--models smollm2,gemma3-270m] [--layers high] [--tokens 32]

For each prompt, the F32 model generates a DoLa continuation; then the quantized model and the
F32 model score that same continuation teacher-forced (``Model.score``), which picks the premature
layer per position by JSD exactly as generation does. The table gives the share of positions where
both choose the same layer, and how often the quantized model's own greedy DoLa tokens equal the
F32 ones.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import dola_cpp
from dola_cpp import Model

PROMPTS = [
    "Q: What is the capital of Australia?\nA:",
    "The theory of general relativity was developed by",
    "Q: How many legs does a spider have?\nA:",
    "The largest planet in the solar system is",
    "Water boils at a temperature of",
    "Q: Who painted the Mona Lisa?\nA:",
    "The chemical symbol for gold is",
    "Q: What happens if you swallow gum?\nA:",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,gemma3-270m")
    ap.add_argument("--layers", default="high")
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    print("| model | layers | positions | same layer | same greedy tokens |\n|---|---|---:|---:|---:|")
    for name in args.models.split(","):
        path = dola_cpp.demo_model_path(name)
        with tempfile.TemporaryDirectory() as tmp:
            f32_path = Path(tmp) / "f32.gguf"
            dola_cpp.convert_model(path, f32_path, "F32")
            f32, quant = Model(f32_path, n_ctx=512), Model(path, n_ctx=512)
            same = total = same_tok = total_tok = 0
            for prompt in PROMPTS:
                ids = f32.tokenize(prompt)
                ref = f32.generate(ids, max_tokens=args.tokens, layers=args.layers, ignore_eos=True)
                q = quant.generate(ids, max_tokens=args.tokens, layers=args.layers, ignore_eos=True)
                same_tok += sum(a == b for a, b in zip(ref.tokens, q.tokens))
                total_tok += len(ref.tokens)
                a = f32.score(ids, ref.tokens, layers=args.layers)
                b = quant.score(ids, ref.tokens, layers=args.layers)
                same += sum(x == y for x, y in zip(a.premature_layers, b.premature_layers))
                total += len(a.premature_layers)
        print(f"| {name} ({path.name}) | {args.layers} | {total} | {same / total:.1%} | {same_tok / total_tok:.1%} |",
              flush=True)


if __name__ == "__main__":
    main()
