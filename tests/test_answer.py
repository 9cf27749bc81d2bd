"""The core's answer tracker (``_core.AnswerText``, what ends an answer and what text it shows)
on its own, token by token; the batch engine ending a sequence where its answer ends instead of
decoding ahead of its consumer; and the session's token loop in the core (``Session.run``, what
``Model.generate`` takes its steps from)."""

import dataclasses
import random
import time

import numpy as np
import pytest

from dola_cpp import _core


@pytest.fixture(scope="module")
def vocab(smollm2):
    return smollm2._weights


@pytest.fixture(scope="module")
def byte_tokens(vocab):
    """Byte values and a token whose text is that one byte (SmolLM2's byte-level vocabulary has
    all but 21: a few control characters and the bytes C0, C1, F1, F2, F5-FF, which decode as the
    other invalid leads and four-byte leads do)."""
    out = {}
    for t in range(vocab.n_vocab):
        p = vocab.token_to_piece(t, False)
        if len(p) == 1 and p[0] not in out:
            out[p[0]] = t
    # continuation bytes, every lead byte with its own second-byte range, and the ASCII text
    assert set(range(0x20, 0x7F)) | set(range(0x80, 0xC0)) | {0xC2, 0xDF, 0xE0, 0xE1, 0xED, 0xEF, 0xF0, 0xF3, 0xF4} <= set(out)
    return out


def run(vocab, tokens, **rules):
    """Feeds tokens to a tracker until it ends; returns (pieces, last step, steps taken)."""
    rules.setdefault("max_tokens", len(tokens) + 1)
    a = _core.AnswerText(vocab, n_prompt=1, n_ctx=100000, **rules)
    pieces, st, n = [], None, 0
    for t in tokens:
        st = _core.Step(t, -0.1)
        a.add(st)
        n += 1
        pieces.append(st.piece)
        if st.finish:
            break
    return pieces, st, n


def test_text_is_decoded_as_pythons_replace_decoder_does(vocab, byte_tokens):
    # random bytes, biased to UTF-8 lead and continuation bytes, fed a byte per token: the pieces
    # plus what an end would still show are the bytes decoded at once with errors="replace"
    rng = random.Random(7)
    pool = list(range(0x20, 0x7F)) + [b for b in range(0x80, 0x100) if b in byte_tokens] * 2
    pool += [0xE2, 0x82, 0xAC, 0xF0, 0x9F, 0x98, 0x80, 0xED, 0xA0, 0xF4, 0x90] * 8
    for _ in range(300):
        data = bytes(rng.choice(pool) for _ in range(rng.randint(1, 24)))
        pieces, st, n = run(vocab, [byte_tokens[b] for b in data])
        assert n == len(data) and not st.finish
        assert "".join(pieces) + st.held == data.decode("utf-8", errors="replace"), data
    # a character split over tokens shows only once whole
    euro = "€".encode()
    pieces, st, _ = run(vocab, [byte_tokens[b] for b in euro + b"!"])
    assert pieces == ["", "", "€", "!"]
    pieces, st, _ = run(vocab, [byte_tokens[b] for b in euro[:2]])
    assert pieces == ["", ""] and st.held == "\ufffd"


def test_stop_strings_across_tokens_cut_the_text_and_hold_back_its_start(vocab, byte_tokens):
    text = "The answer is 42.\n\nQ: and then?"
    toks = [byte_tokens[b] for b in text.encode()]
    pieces, st, n = run(vocab, toks, stop=["\n\nQ:", "never"])
    assert st.finish == "stop" and st.counted
    assert "".join(pieces) == "The answer is 42."
    assert n == text.index("\n\nQ:") + 4  # ended at the token that completed the stop string
    # while "\n\n" could begin the stop string it was held, not shown
    shown = "".join(pieces[: text.index("\n\nQ:") + 2])
    assert shown == "The answer is 42." and pieces[-1] == ""
    # a start that does not complete is shown once it cannot be one any more
    pieces, st, n = run(vocab, [byte_tokens[b] for b in b"a\n\nb"], stop=["\n\nQ:"])
    assert pieces == ["a", "", "", "\n\nb"] and not st.finish


def test_budget_end_tokens_and_a_full_context(vocab, byte_tokens):
    toks = [byte_tokens[b] for b in b"abcdef"]
    pieces, st, n = run(vocab, toks, max_tokens=3)
    assert (n, st.finish, "".join(pieces)) == (3, "length", "abc")
    eos = vocab.eog_tokens[0]
    pieces, st, n = run(vocab, toks[:2] + [eos] + toks[2:])
    assert (n, st.finish, st.counted, "".join(pieces)) == (3, "stop", False, "ab")
    pieces, st, n = run(vocab, toks[:2] + [eos] + toks[2:], ignore_eos=True, max_tokens=4)
    assert (n, st.finish, st.counted) == (4, "length", True)
    # a prompt that fills the context leaves one token to choose
    a = _core.AnswerText(vocab, max_tokens=10, n_prompt=8, n_ctx=8)
    st = _core.Step(toks[0])
    a.add(st)
    assert st.finish == "length"
    with pytest.raises(_core.Error, match="ended"):
        a.add(_core.Step(toks[1]))
    with pytest.raises(_core.Error, match="max_tokens"):
        _core.AnswerText(vocab, max_tokens=0, n_prompt=1, n_ctx=8)


def test_loops_and_abstaining_end_the_answer(vocab, byte_tokens):
    cycle = [byte_tokens[b] for b in b"abc"]
    pieces, st, n = run(vocab, cycle * 5, stop_loops=True)
    assert (st.finish, st.loop, n) == ("loop", 3, 9)
    assert "".join(pieces) == "abc" * 3
    # every step's top log-prob -0.1: risk 1 - exp(-0.1) = 0.095 a token
    assert _core.token_risk(-0.1) == pytest.approx(0.0952, abs=1e-4)
    pieces, st, n = run(vocab, [byte_tokens[b] for b in b"abcdefgh"], abstain_above=0.09)
    assert (st.finish, n) == ("abstained", _core.ABSTAIN_MIN_TOKENS)
    pieces, st, n = run(vocab, [byte_tokens[b] for b in b"abcdefgh"], abstain_above=0.1)
    assert st.finish == ""


def test_the_engine_stops_a_sequence_where_its_answer_ends(smollm2):
    """A stop string ends the sequence in the engine at the step that completes it: no tokens are
    decoded beyond the answer (the consumer does not have to notice and cancel)."""
    prompt = "Q: Count from one to twenty.\nA: one, two, three"
    alone = smollm2.generate(prompt, max_tokens=40, ignore_eos=True)
    assert ", six" in alone.text  # the case under test
    stop = ", six"
    want = smollm2.generate(prompt, max_tokens=40, ignore_eos=True, stop=stop)
    assert want.finish_reason == "stop" and want.text == alone.text[: alone.text.index(stop)]
    batch = smollm2.batch(2)
    s = batch.stream(prompt, 40, ignore_eos=True, stop=stop)
    s.start()
    # the engine runs on while nothing is read: it must stop by itself
    for _ in range(400):
        st = batch.stats()
        if st["n_steps"] > 0 and st["n_running"] + st["n_queued"] == 0:
            break
        time.sleep(0.05)
    assert batch.stats()["n_running"] + batch.stats()["n_queued"] == 0
    assert batch.stats()["n_steps"] == len(want.tokens)
    r = "".join(s)
    assert (r, s.finish_reason, s.tokens) == (want.text, "stop", want.tokens)


# one answer per way it can end, and the settings that make a step depend on the ones before
LOOP_CASES = {
    "plain to the budget": dict(max_tokens=24, ignore_eos=True),
    "an end token": dict(prompt="Q: What is the capital of France?\nA:", max_tokens=64),
    "a stop string": dict(prompt="Q: Count from one to twenty.\nA: one, two, three", max_tokens=40,
                          ignore_eos=True, stop=", six"),
    "dola-high, penalties, eos_boost": dict(max_tokens=40, layers="high", repetition_penalty=1.2, eos_boost=30.0),
    "sampled": dict(max_tokens=30, temperature=0.8, top_k=40, seed=3, top_logprobs=2),
    "a loop": dict(prompt="Repeat after me: I am a robot. I am a robot. I am a robot.", max_tokens=60,
                   ignore_eos=True, stop_loops=True, dry_multiplier=0.0),
    "abstaining": dict(max_tokens=40, layers="high", abstain_above=0.05),
    "a grammar": dict(max_tokens=40, json_schema={"type": "object", "properties": {"a": {"type": "integer"}},
                                                  "required": ["a"]}),
}


@pytest.mark.parametrize("name", list(LOOP_CASES))
def test_generate_runs_the_token_loop_in_the_core_with_the_streams_results(smollm2, name):
    """Model.generate takes its steps from the core's loop (several per call, no Python between
    them); a stream takes one when its reader asks. Both give the same answer, step for step, for
    every way an answer ends."""
    kw = dict(LOOP_CASES[name])
    prompt = kw.pop("prompt", "Q: Why is the sky blue?\nA:")
    whole = smollm2.generate(prompt, **kw)
    stream = smollm2.stream(prompt, kw.pop("max_tokens"), **kw)
    assert "".join(stream) == whole.text
    got = stream.result()
    assert (got.tokens, got.finish_reason, got.loop) == (whole.tokens, whole.finish_reason, whole.loop)
    np.testing.assert_equal([dataclasses.asdict(st) for st in got.steps], [dataclasses.asdict(st) for st in whole.steps])
    np.testing.assert_equal(got.risk, whole.risk)
    if name == "dola-high, penalties, eos_boost":  # the boost ends it, at a step of the second call or later
        assert whole.finish_reason == "stop" and 16 < len(whole.tokens) < 39, whole
    if name == "a stop string":
        assert whole.finish_reason == "stop"
    if name == "a loop":
        assert whole.finish_reason == "loop"
    if name == "abstaining":
        assert whole.finish_reason == "abstained"


def test_the_core_loop_is_one_call_for_many_steps(smollm2):
    """``Session.run``: up to ``max_steps`` steps a call, each token decoded unless the answer ended
    there; the steps are those of sample-and-accept one at a time."""
    session = smollm2._session
    ids = smollm2.tokenize("Q: Count from one to twenty.\nA: one, two, three")
    vocab = smollm2._weights

    def tracker():
        return _core.AnswerText(vocab, max_tokens=20, n_prompt=len(ids), n_ctx=session.n_ctx, ignore_eos=True,
                                stop=[", six"])

    session.configure(_core.DecodeParams())
    session.prefill(ids)
    answer, one_by_one = tracker(), []
    while True:
        st = session.sample(0.0)
        answer.add(st)
        one_by_one.append((st.token, st.piece, st.finish))
        if st.finish:
            break
        session.accept(st.token)
    assert one_by_one[-1][2] == "stop" and len(one_by_one) > 5
    session.prefill(ids)
    answer, steps = tracker(), []
    calls = 0
    while not steps or not steps[-1].finish:
        got = session.run(answer, [], len(steps), 4)
        assert 1 <= len(got) <= 4 and all(not s.finish for s in got[:-1])
        steps += got
        calls += 1
    assert [(s.token, s.piece, s.finish) for s in steps] == one_by_one
    assert calls == -(-len(one_by_one) // 4)
    assert session.n_cached == len(ids) + len(one_by_one) - 1  # the ending token is not decoded
