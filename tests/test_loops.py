"""Answers that do not loop: llama.cpp's DRY sampler in the decoding chain, and stop_loops ending
an answer that repeats a cycle of tokens (its own finish_reason, counted in the risk)."""

import pytest
from typer.testing import CliRunner

import dola_cpp
from dola_cpp import DecodeConfig
from dola_cpp.cli._app import app
from dola_cpp.cli._chat import Chat
from dola_cpp.stream import LOOP_RISK, STOP_LOOP_REPEATS, loop_cycle

# Gemma-3-270M (a base model) answers this greedily by repeating the question and a made-up turn,
# " Name three primary colours.\nStudent:", to the budget
LOOPING = "User: Name three primary colours.\nAssistant:"


@pytest.fixture(scope="module")
def gemma():
    return dola_cpp.Model(dola_cpp.demo_model_path("gemma3-270m"), n_ctx=512)


def test_loop_cycle_finds_the_shortest_cycle_of_three_or_more_tokens():
    assert loop_cycle([9, 1, 2, 3, 1, 2, 3, 1, 2, 3]) == 3
    assert loop_cycle([1, 2, 3, 1, 2, 3]) == 0  # twice is not a loop
    assert loop_cycle([1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4], repeats=3) == 4
    assert loop_cycle([1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 5]) == 0
    assert loop_cycle([1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3], repeats=4) == 3
    # a token or two again and again ("!!!", a table's "|---|---|") is a run: a loop only over 32 tokens
    assert loop_cycle([7] * 31) == 0 and loop_cycle([7] * 32) == 1
    assert loop_cycle([5, 6] * 15) == 0 and loop_cycle([5, 6] * 16) == 2
    assert loop_cycle([5, 6] * 16, repeats=4, runs=False) == 0  # not a cycle of 4 tokens either


def test_stop_loops_ends_a_looping_answer_and_counts_it_in_the_risk(gemma):
    plain = gemma.generate(LOOPING, max_tokens=64, stop=["\nUser:"])
    assert plain.finish_reason == "length" and loop_cycle(plain.tokens, repeats=4, runs=False)  # the control
    r = gemma.generate(LOOPING, max_tokens=64, stop=["\nUser:"], stop_loops=True)
    assert r.finish_reason == "loop" and r.loop >= 3 and r.risk == LOOP_RISK
    assert r.tokens == plain.tokens[:len(r.tokens)]  # the same answer, ended at the third cycle
    assert loop_cycle(r.tokens) == r.loop and not loop_cycle(r.tokens[:-1])
    assert len(r.tokens) < len(plain.tokens)
    stream = gemma.stream(LOOPING, max_tokens=64, stop=["\nUser:"], stop_loops=True)
    assert "".join(stream) == r.text and stream.finish_reason == "loop"


def test_dry_never_extends_a_repeat_beyond_the_allowed_length(smollm2):
    """With an overwhelming multiplier and no sequence breakers, no trigram of the context is
    ever completed again by a generated token (allowed length 2); without DRY the same greedy
    answer repeats trigrams (the control)."""
    prompt = "one two three one two three one two three one two three"
    kw = dict(dry_base=1.75, dry_allowed_length=2, dry_sequence_breakers=())
    control = smollm2.generate(prompt, max_tokens=48)
    r = smollm2.generate(prompt, max_tokens=48, dry_multiplier=1e6, **kw)

    def repeated_trigrams(ids, n_prompt):
        seen, repeats = set(), 0
        for i in range(len(ids) - 2):
            tri = tuple(ids[i:i + 3])
            repeats += i + 2 >= n_prompt and tri in seen
            seen.add(tri)
        return repeats

    ids = smollm2.tokenize(prompt)
    assert repeated_trigrams(ids + control.tokens, len(ids)) > 0
    assert repeated_trigrams(ids + r.tokens, len(ids)) == 0
    assert r.tokens != control.tokens


def test_dry_with_dola_and_sampling(smollm2):
    base = smollm2.generate("The capital of France is", max_tokens=24, layers="high")
    same = smollm2.generate("The capital of France is", max_tokens=24, layers="high", dry_multiplier=0.0)
    assert same.tokens == base.tokens  # 0 = off: nothing changes
    a = smollm2.generate("The capital of France is", max_tokens=24, layers="high", dry_multiplier=0.8,
                         temperature=0.8, seed=3)
    b = smollm2.generate("The capital of France is", max_tokens=24, layers="high", dry_multiplier=0.8,
                         temperature=0.8, seed=3)
    assert a.tokens == b.tokens


@pytest.mark.parametrize("field, value, message", [
    ("dry_multiplier", -1.0, "dry_multiplier must be >= 0"),
    ("dry_base", 0.5, "dry_base must be >= 1"),
    ("dry_allowed_length", -1, "dry_allowed_length must be an integer >= 0"),
    ("dry_penalty_last_n", -2, "dry_penalty_last_n must be an integer >= -1"),
    ("dry_sequence_breakers", ("",), "dry_sequence_breakers must be"),
    ("dry_sequence_breakers", "\n", "dry_sequence_breakers must be"),
    ("dry_sequence_breakers", ("a\0b",), "dry_sequence_breakers must be"),
])
def test_dry_settings_are_checked(field, value, message):
    with pytest.raises(ValueError, match=message):
        DecodeConfig().replace(**{field: value})


def test_the_chat_sets_dry_and_stop_loops(smollm2):
    chat = Chat(smollm2, DecodeConfig().replace(layers="high", dry_multiplier=0.8), interactive=False)
    assert chat.stop_loops
    assert chat.command("/set dry_multiplier 1.5") and chat.settings.dry_multiplier == 1.5
    assert chat.command("/set dry_allowed_length 3") and chat.settings.dry_allowed_length == 3
    assert chat.command("/set stop_loops off") and not chat.stop_loops


def test_the_chat_defaults_and_the_footer_of_a_stopped_loop(gemma, monkeypatch):
    runner = CliRunner(env={"NO_COLOR": "1", "COLUMNS": "100"})
    r = runner.invoke(app, ["generate", "gemma3-270m", LOOPING, "--template", "none", "--layers", "none",
                            "--stop-loops", "-n", "64", "--json"])
    assert r.exit_code == 0, r.output
    assert '"finish_reason": "loop"' in r.stdout
    # the chat decodes with DRY and stops loops unless told otherwise
    seen = {}
    real = Chat.__init__

    def spy(self, model, settings, **kw):
        seen.update(settings=settings, **kw)
        real(self, model, settings, **kw)

    monkeypatch.setattr(Chat, "__init__", spy)
    r = runner.invoke(app, ["run", "smollm2", "-n", "4"], input="Hi\n")
    assert r.exit_code == 0, r.output
    assert seen["settings"].dry_multiplier > 0 and seen["stop_loops"] and seen["settings"].eos_boost > 0
    assert STOP_LOOP_REPEATS == 3


def test_with_dry_the_automatic_penalty_is_1_and_nothing_warns(smollm2):
    dola = smollm2.resolve_layers("high")
    assert DecodeConfig().penalty(dola) == 1.2
    with_dry = DecodeConfig(dry_multiplier=0.8)
    assert with_dry.penalty(dola) == 1.0 and with_dry.penalty_note(dola) is None
    assert DecodeConfig(dry_multiplier=0.8, repetition_penalty=1.3).penalty(dola) == 1.3  # a set one stands
    # the greeting that the blanket penalty over the chat template's system text derails
    hi = smollm2.chat_tokens([{"role": "user", "content": "Hi"}])
    derailed = smollm2.generate(hi, 48, layers="high", premature_norm=True, repetition_penalty=1.2,
                                dry_multiplier=0.8)
    r = smollm2.generate(hi, 48, layers="high", premature_norm=True, dry_multiplier=0.8)
    assert derailed.finish_reason == "length" and r.finish_reason == "stop"
