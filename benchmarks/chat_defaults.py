"""Which settings the chat and the server default to: short factual and list questions on the demo models.

    python benchmarks/chat_defaults.py [--models smollm2,gemma3-270m] [--max-tokens 48] [--list-tokens 160]

Asks 30 short factual questions and 10 list questions (written for this benchmark, not taken from
TruthfulQA or FACTOR, so no evaluation set is tuned on) the way `dola-cpp run` does (the GGUF's chat
template, else a User:/Assistant: transcript), greedy, in several modes: plain, DoLa high on raw
hidden states (the paper's semantics), DoLa high with the final norm (``premature_norm``), DoLa
low, and DoLa high normed with ``eos_boost``, then with llama.cpp's DRY sampler and
``stop_loops`` at the repetition penalty 1.2 and at 1.0 (the chat's defaults: with DRY the
automatic penalty is 1.0). Prints, per model and mode, the share of factual answers that contain the
expected entity, the share of answers that end by themselves (EOS or the transcript's next
"User:") within the token budget, the answers that loop (repeat a cycle of 3 or more tokens 4
times in a row, the cycle's shortest period) and those that ``stop_loops`` ended (at a cycle's
third time, or a run of one or two tokens over 32).
"""

from __future__ import annotations

import argparse
import time

import dola_cpp
from dola_cpp import Model
from dola_cpp.config import CHAT_DRY_MULTIPLIER, CHAT_EOS_BOOST, CHAT_PREMATURE_NORM
from dola_cpp.stream import loop_cycle

QUESTIONS: list[tuple[str, tuple[str, ...]]] = [
    ("What is the capital of France?", ("Paris",)),
    ("What is the capital of Japan?", ("Tokyo",)),
    ("What is the capital of Italy?", ("Rome",)),
    ("What is the capital of Germany?", ("Berlin",)),
    ("What is the capital of Spain?", ("Madrid",)),
    ("What is the capital of Egypt?", ("Cairo",)),
    ("What is the capital of Canada?", ("Ottawa",)),
    ("Who wrote Hamlet?", ("Shakespeare",)),
    ("Who wrote Pride and Prejudice?", ("Austen",)),
    ("Who painted the Mona Lisa?", ("Leonardo", "Vinci")),
    ("Who developed the theory of relativity?", ("Einstein",)),
    ("Who was the first president of the United States?", ("Washington",)),
    ("Who discovered penicillin?", ("Fleming",)),
    ("Which planet is known as the Red Planet?", ("Mars",)),
    ("What is the largest planet in the solar system?", ("Jupiter",)),
    ("What is the chemical symbol for gold?", ("Au",)),
    ("What is the chemical symbol for water?", ("H2O", "H₂O")),
    ("What gas do plants absorb from the air for photosynthesis?", ("carbon dioxide", "CO2", "CO₂")),
    ("How many continents are there on Earth?", ("seven", "7")),
    ("How many legs does a spider have?", ("eight", "8")),
    ("What is the largest ocean on Earth?", ("Pacific",)),
    ("What is the longest river in South America?", ("Amazon",)),
    ("What is the tallest mountain in the world?", ("Everest",)),
    ("In which country are the pyramids of Giza?", ("Egypt",)),
    ("What language is spoken in Brazil?", ("Portuguese",)),
    ("What is the currency of the United Kingdom?", ("pound",)),
    ("What is the freezing point of water in degrees Celsius?", ("0", "zero")),
    ("Which animal is known as the king of the jungle?", ("lion",)),
    ("What is the hardest natural substance?", ("diamond",)),
    ("Which organ pumps blood through the human body?", ("heart",)),
]

LIST_QUESTIONS: list[str] = [
    "List five fruits that are high in vitamin C.",
    "Name three primary colours.",
    "List the days of the week.",
    "Name four planets of the solar system.",
    "List five animals that live in the ocean.",
    "Give three examples of mammals.",
    "List the first five prime numbers.",
    "Name three countries in Europe.",
    "List four musical instruments.",
    "Name five vegetables.",
]

CHAT = dict(layers="high", premature_norm=CHAT_PREMATURE_NORM, eos_boost=CHAT_EOS_BOOST)

MODES = {
    "plain": dict(layers=None),
    "DoLa high (raw)": dict(layers="high"),
    "DoLa high (normed)": dict(layers="high", premature_norm=True),
    "DoLa low (raw)": dict(layers="low"),
    "DoLa high, normed, eos_boost (repetition penalty 1.2)": dict(CHAT),
    "+ DRY and stop_loops, repetition penalty 1.2": dict(CHAT, dry_multiplier=CHAT_DRY_MULTIPLIER, stop_loops=True,
                                                         repetition_penalty=1.2),
    "the chat's defaults: + DRY and stop_loops (repetition penalty 1.0)": dict(
        CHAT, dry_multiplier=CHAT_DRY_MULTIPLIER, stop_loops=True),
}


def loops(r) -> bool:
    """Whether an answer repeats a cycle of >= 3 tokens (its shortest period) 4 times in a row anywhere."""
    return any(loop_cycle(r.tokens[:end], repeats=4, runs=False) for end in range(1, len(r.tokens) + 1))


def prompt_for(m: Model, question: str) -> tuple[str, list[str]]:
    if m.chat_template:
        try:
            return m.apply_chat_template([{"role": "user", "content": question}]), []
        except dola_cpp.DolaError:
            pass
    return f"User: {question}\nAssistant:", ["\nUser:"]


def run(model_name: str, max_tokens: int, list_tokens: int, modes: list[str]) -> list[str]:
    m = Model(dola_cpp.demo_model_path(model_name), n_ctx=1024)
    n, n_list = len(QUESTIONS), len(LIST_QUESTIONS)
    lines = [f"### {model_name} ({n} factual questions, at most {max_tokens} tokens; {n_list} list questions, "
             f"at most {list_tokens}; greedy)", "",
             "| mode | right entity | ends by itself | loops | stopped repeating | mean tokens | seconds |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    asked = [(q, a, max_tokens) for q, a in QUESTIONS] + [(q, (), list_tokens) for q in LIST_QUESTIONS]
    for mode, kw in MODES.items():
        if modes and mode not in modes:
            continue
        right = ended = looped = stopped = n_tokens = 0
        t0 = time.perf_counter()
        for question, answers, budget in asked:
            prompt, stop = prompt_for(m, question)
            r = m.generate(prompt, max_tokens=budget, stop=stop, **kw)
            right += any(a.lower() in r.text.lower() for a in answers)
            ended += r.finish_reason == "stop"
            looped += loops(r)
            stopped += r.finish_reason == "loop"
            n_tokens += len(r.tokens)
        total = len(asked)
        lines.append(f"| {mode} | {right}/{n} | {ended}/{total} | {looped}/{total} | {stopped}/{total} | "
                     f"{n_tokens / total:.1f} | "
                     f"{time.perf_counter() - t0:.0f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,gemma3-270m")
    ap.add_argument("--max-tokens", type=int, default=48, help="budget of a factual answer")
    ap.add_argument("--list-tokens", type=int, default=160, help="budget of a list answer")
    ap.add_argument("--modes", default="", help="comma-separated numbers of the modes to run (default: all): "
                    + ", ".join(f"{i} = {m}" for i, m in enumerate(MODES)))
    args = ap.parse_args()
    names = list(MODES)
    modes = [names[int(i)] for i in args.modes.split(",")] if args.modes else []
    for name in args.models.split(","):
        print("\n".join(run(name, args.max_tokens, args.list_tokens, modes)), "\n", flush=True)


if __name__ == "__main__":
    main()
