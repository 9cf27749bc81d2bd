"""Which DoLa variant the chat should default to: short factual questions on the demo models.

    python benchmarks/chat_defaults.py [--models smollm2,gemma3-270m] [--max-tokens 48]

Asks 30 short factual questions (written for this benchmark, not taken from TruthfulQA or FACTOR,
so no evaluation set is tuned on) the way `dola-cpp run` does (the GGUF's chat template, else a
User:/Assistant: transcript), greedy, in four modes: plain, DoLa high on raw hidden states (the
paper's semantics), DoLa high with the final norm (``premature_norm``), DoLa low. Prints, per
model and mode, the share of answers that contain the expected entity and the share that end by
themselves (EOS or the transcript's next "User:") within the token budget.
"""

from __future__ import annotations

import argparse
import time

import dola_cpp
from dola_cpp import Model

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

MODES = {
    "plain": dict(layers=None),
    "DoLa high (raw)": dict(layers="high"),
    "DoLa high (normed)": dict(layers="high", premature_norm=True),
    "DoLa low (raw)": dict(layers="low"),
}


def prompt_for(m: Model, question: str) -> tuple[str, list[str]]:
    if m.chat_template:
        try:
            return m.apply_chat_template([{"role": "user", "content": question}]), []
        except dola_cpp.DolaError:
            pass
    return f"User: {question}\nAssistant:", ["\nUser:"]


def run(model_name: str, max_tokens: int) -> list[str]:
    m = Model(dola_cpp.demo_model_path(model_name), n_ctx=1024)
    lines = [f"### {model_name} ({len(QUESTIONS)} questions, greedy, at most {max_tokens} tokens)", "",
             "| mode | right entity | ends by itself | mean tokens | seconds |", "|---|---:|---:|---:|---:|"]
    for mode, kw in MODES.items():
        right = ended = n_tokens = 0
        t0 = time.perf_counter()
        for question, answers in QUESTIONS:
            prompt, stop = prompt_for(m, question)
            r = m.generate(prompt, max_tokens=max_tokens, stop=stop, **kw)
            right += any(a.lower() in r.text.lower() for a in answers)
            ended += r.finish_reason == "stop"
            n_tokens += len(r.tokens)
        n = len(QUESTIONS)
        lines.append(f"| {mode} | {right}/{n} ({right / n:.0%}) | {ended}/{n} ({ended / n:.0%}) | "
                     f"{n_tokens / n:.1f} | {time.perf_counter() - t0:.0f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,gemma3-270m")
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()
    for name in args.models.split(","):
        print("\n".join(run(name, args.max_tokens)), "\n", flush=True)


if __name__ == "__main__":
    main()
