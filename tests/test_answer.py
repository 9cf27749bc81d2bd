"""The core's answer tracker (``_core.AnswerText``, what ends an answer and what text it shows)
on its own, token by token, and the batch engine ending a sequence where its answer ends instead
of decoding ahead of its consumer."""

import random
import time

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
