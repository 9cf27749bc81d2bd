"""Risk per token and per answer, abstaining, and answers that end: every end-of-generation token,
stop strings across tokens, eos_boost (seeds 003 and 004)."""

import math

import numpy as np
import pytest

import dola_cpp
from dola_cpp import DecodeConfig
from dola_cpp.risk import RISK_FORMULA, answer_risk, signal_risks, token_risk
from dola_cpp.selective import area, coverage_curve
from dola_cpp.stream import ABSTAIN_MIN_TOKENS
from dola_cpp.synthetic import write_llama_gguf

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def chat_prompt(smollm2):
    return smollm2.apply_chat_template([{"role": "user", "content": QUESTION}])


# ---------------------------------------------------------------------------- the formula


def test_token_risk_formula():
    # RISK_FORMULA, by hand: the mature distribution's uncertainty (1 - its top probability)
    assert "1 - p_top" in RISK_FORMULA
    assert token_risk(math.log(0.9)) == pytest.approx(0.1)
    assert token_risk(0.0) == 0.0  # a certain step
    assert token_risk(math.log(1e-9)) == pytest.approx(1.0)
    # less sure = riskier; bounded
    values = [token_risk(math.log(p)) for p in (0.99, 0.7, 0.4, 0.1, 1e-6)]
    assert values == sorted(values) and all(0.0 <= v <= 1.0 for v in values)
    assert answer_risk([0.1, 0.3, 0.5]) == pytest.approx(0.3)
    assert answer_risk([]) is None


def test_signal_risks_are_means_over_the_answer():
    lp = np.log([0.5, 0.25])
    top = np.log([0.8, 0.4])
    ent = np.array([1.0, 2.0])
    jsd = np.array([np.nan, np.nan])
    r = signal_risks(lp, top, ent, jsd, n_vocab=100)
    assert r["risk"] == pytest.approx(np.mean([token_risk(t) for t in top]))
    assert r["risk"] == pytest.approx(np.mean([0.2, 0.6]))
    assert r["surprise"] == pytest.approx(np.mean([0.5, 0.75]))
    assert r["entropy"] == pytest.approx(1.5 / math.log(100))
    assert math.isnan(r["jsd"])


def test_steps_carry_their_risk(smollm2, chat_prompt):
    r = smollm2.generate(chat_prompt, max_tokens=24)
    assert r.steps and r.risk is not None
    for s in r.steps:
        assert s.top_logprob >= s.mature_logprob - 1e-6 and s.top_logprob <= 0.0
        assert s.risk == pytest.approx(token_risk(s.top_logprob))
        assert 0.0 <= s.risk <= 1.0
    assert r.risk == pytest.approx(np.mean([s.risk for s in r.steps]))
    # the first step's top log-probability is the final layer's, at the prompt's last position
    z = smollm2.layer_logits(chat_prompt, [smollm2.n_layers])[0].astype(np.float64)
    lp = z - np.logaddexp.reduce(z)
    assert r.steps[0].top_logprob == pytest.approx(lp.max(), abs=1e-4)
    assert r.steps[0].mature_logprob == pytest.approx(lp[r.tokens[0]], abs=1e-4)


def test_teacher_forced_signals_match_the_generation(f32_model):
    """score() reports, per continuation token, what generating it reported: the mature
    log-probability, top log-probability, entropy and (dynamic DoLa) the premature layer's JSD."""
    prompt = f32_model.tokenize("Q: What is the capital of France?\nA:")
    for layers in (None, "high"):
        g = f32_model.generate(prompt, max_tokens=12, layers=layers, ignore_eos=True)
        s = f32_model.score(prompt, g.tokens, layers=layers)
        # F32 weights and KV cache: scoring's many-row matmuls and generation's one-row ones differ
        # only in float32 summation order (over 576 or 1536 terms), ~1e-6 relative, so log-probs
        # (|x| <= ~20) agree to ~1e-5 (8e-6 measured on an AVX2 EPYC) and entropies too
        np.testing.assert_allclose(s.mature_logprobs, [st.mature_logprob for st in g.steps], rtol=0, atol=5e-5)
        np.testing.assert_allclose(s.top_logprobs, [st.top_logprob for st in g.steps], rtol=0, atol=5e-5)
        np.testing.assert_allclose(s.entropies, [st.entropy for st in g.steps], rtol=0, atol=5e-5)
        if layers is None:
            assert np.isnan(s.jsd).all()
        else:
            assert s.premature_layers == [st.premature_layer for st in g.steps]
            chosen = [st.jsd[g.layers.index(st.premature_layer)] for st in g.steps]
            # the JSD is a difference of such sums: the same relative error (2e-6 measured)
            np.testing.assert_allclose(s.jsd, chosen, rtol=5e-5, atol=1e-9)


# ---------------------------------------------------------------------------- abstaining


def test_abstaining_returns_the_partial_answer(smollm2, chat_prompt):
    full = smollm2.generate(chat_prompt, max_tokens=24)
    assert full.finish_reason == "stop"
    # a threshold below the answer's running risk: it stops once the rule may judge
    low = min(np.mean([s.risk for s in full.steps[:k]]) for k in range(ABSTAIN_MIN_TOKENS, len(full.steps) + 1)) / 2
    r = smollm2.generate(chat_prompt, max_tokens=24, abstain_above=low)
    assert r.finish_reason == "abstained"
    assert len(r.tokens) == ABSTAIN_MIN_TOKENS
    assert r.tokens == full.tokens[:ABSTAIN_MIN_TOKENS] and full.text.startswith(r.text)
    assert r.risk > low
    # a threshold the answer never crosses: the same answer as without one
    high = max(np.mean([s.risk for s in full.steps[:k]]) for k in range(1, len(full.steps) + 1))
    same = smollm2.generate(chat_prompt, max_tokens=24, abstain_above=min(1.0, high + 1e-3))
    assert same.finish_reason == "stop" and same.tokens == full.tokens
    # a short answer is judged when it ends
    short = smollm2.generate(chat_prompt, max_tokens=2, abstain_above=low)
    assert short.finish_reason == "abstained" and len(short.tokens) == 2
    # streaming: the pieces so far, then "abstained"
    stream = smollm2.stream(chat_prompt, max_tokens=24, abstain_above=low)
    assert "".join(stream) == r.text and stream.finish_reason == "abstained"


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), "0.5", True])
def test_abstain_above_is_validated(smollm2, bad):
    with pytest.raises(ValueError, match="abstain_above"):
        smollm2.generate("Hi", max_tokens=2, abstain_above=bad)


# ---------------------------------------------------------------------------- answers that end


def test_every_end_of_generation_token_ends_the_answer(tmp_path):
    """An EOT token that is not the EOS ends generation as EOS does (llama_vocab_is_eog)."""
    base = write_llama_gguf(tmp_path / "base.gguf", seed=3)
    m = dola_cpp.Model(base, n_ctx=128, n_threads=1)
    run = m.generate("the capital", max_tokens=12, ignore_eos=True)
    assert m.eog_tokens == [2]
    # a token the random model emits at step 4 (and not before) becomes the end-of-turn token
    eot = next(t for i, t in enumerate(run.tokens) if i >= 3 and t not in run.tokens[:i] and t != 2)
    k = run.tokens.index(eot)
    eot_model = write_llama_gguf(tmp_path / "eot.gguf", seed=3, metadata={"tokenizer.ggml.eot_token_id": eot})
    m2 = dola_cpp.Model(eot_model, n_ctx=128, n_threads=1)
    assert sorted(m2.eog_tokens) == sorted({2, eot})
    r = m2.generate("the capital", max_tokens=12)
    assert r.finish_reason == "stop" and r.tokens == run.tokens[:k]
    assert m2.generate("the capital", max_tokens=12, ignore_eos=True).tokens == run.tokens


def test_demo_models_end_of_generation_tokens(smollm2):
    md = smollm2.metadata()
    assert int(md["tokenizer.ggml.eos_token_id"]) in smollm2.eog_tokens
    names = {smollm2.detokenize([t], special=True) for t in smollm2.eog_tokens}
    assert {"<|endoftext|>", "<|im_end|>"} <= names


def test_stop_strings_spanning_tokens_are_never_shown(smollm2):
    prompt = "Paris is the capital of France. It is known for"
    full = smollm2.generate(prompt, max_tokens=40, ignore_eos=True)
    pieces = [smollm2.detokenize([t]) for t in full.tokens]
    # a stop string from the middle of one token to the middle of a later one
    ends = np.cumsum([len(p) for p in pieces])
    k = next(i for i in range(4, len(pieces) - 2) if len(pieces[i]) >= 3 and len(pieces[i + 1]) >= 2)
    start = ends[k] - 2
    stop = full.text[start:ends[k + 1] - 1]
    assert len(stop) >= 3 and stop not in full.text[:start + len(stop) - 1]
    stream = smollm2.stream(prompt, max_tokens=40, ignore_eos=True, stop=[stop, "never appears"])
    shown = list(stream)
    # what was shown is exactly the text before the stop string: none of it was ever printed,
    # though its first characters arrived inside a token that also held shown text
    assert "".join(shown) == full.text[:start]
    assert stream.finish_reason == "stop" and stream.result().text == full.text[:start]


def test_eos_bonus_schedule():
    c = DecodeConfig(eos_boost=10.0)
    budget = 100
    bonus = [c.eos_bonus(i, budget) for i in range(budget)]
    assert all(b == 0.0 for b in bonus[:80])
    assert bonus[80] == pytest.approx(10.0 / 20) and bonus[-1] == pytest.approx(10.0)
    assert np.all(np.diff(bonus[80:]) > 0)  # rising, linearly
    np.testing.assert_allclose(np.diff(bonus[80:]), 0.5)
    assert DecodeConfig().eos_bonus(99, 100) == 0.0  # off by default
    with pytest.raises(ValueError, match="eos_boost"):
        DecodeConfig(eos_boost=-1.0)


def test_eos_boost_ends_an_answer_dola_would_cut(smollm2, chat_prompt):
    """The issue's example: DoLa high on the demo model runs to the token budget; the boost acts
    from 80% of it (the tokens before are unchanged) and brings back an end token that DoLa's
    relative-top filter had removed."""
    cut = smollm2.generate(chat_prompt, max_tokens=24, layers="high")
    assert cut.finish_reason == "length" and len(cut.tokens) == 24
    start = int(0.8 * 24)
    ended = smollm2.generate(chat_prompt, max_tokens=24, layers="high", eos_boost=1000.0)
    assert ended.finish_reason == "stop"
    assert ended.tokens == cut.tokens[:start]
    # a modest boost changes nothing before the ramp either
    mild = smollm2.generate(chat_prompt, max_tokens=24, layers="high", eos_boost=2.0)
    assert mild.tokens[:start] == cut.tokens[:start]


def test_selective_curve_and_area():
    cov, acc = coverage_curve([True, False, True, False], [0.1, 0.9, 0.2, 0.8])
    np.testing.assert_allclose(cov, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(acc, [1.0, 1.0, 2 / 3, 0.5])
    assert area(cov, acc) == pytest.approx(np.mean([1.0, 1.0, 2 / 3, 0.5]))
    # ties are answered in expectation: an uninformative signal is the random line
    _, flat = coverage_curve([True, False, True, False], [0.5] * 4)
    np.testing.assert_allclose(flat, 0.5)
    # NaN risk (no signal) ranks last
    _, acc = coverage_curve([False, True], [float("nan"), 0.3])
    np.testing.assert_allclose(acc, [1.0, 0.5])
