"""OpenAI's sampling fields in the core: frequency and presence penalties over the answer so
far, and logit_bias, after plain decoding's, DoLa's and Activation Decoding's scores."""

from collections import Counter

import pytest

PROMPT = "Count: 1, 2, 3,"
DECODERS = [{}, {"layers": "high"}, {"decoder": "activation"}, {"decoder": "activation", "layers": "high"}]


@pytest.mark.parametrize("decoding", DECODERS)
def test_the_penalties_lower_each_score_as_openai_defines_them(smollm2, decoding):
    """score(t) -= frequency_penalty * count(t) + presence_penalty * (count(t) > 0), the counts
    over the tokens generated so far (the prompt's do not count: the first step is unchanged)."""
    fp, pp = 1e-3, 2e-3  # small enough to leave the greedy tokens as they are
    base = smollm2.generate(PROMPT, max_tokens=12, **decoding)
    pen = smollm2.generate(PROMPT, max_tokens=12, frequency_penalty=fp, presence_penalty=pp, **decoding)
    tokens = [s.token for s in base.steps]
    assert [s.token for s in pen.steps] == tokens
    assert len(set(tokens)) < len(tokens)  # the answer repeats tokens: the penalties act
    seen: Counter = Counter()
    for b, p in zip(base.steps, pen.steps):
        n = seen[b.token]
        assert p.score == pytest.approx(b.score - (fp * n + pp * (n > 0)), abs=2e-5)
        seen[b.token] += 1
    assert pen.steps[0].score == base.steps[0].score


def test_a_large_frequency_penalty_suppresses_a_repeated_token(smollm2):
    base = smollm2.generate(PROMPT, max_tokens=12)
    pen = smollm2.generate(PROMPT, max_tokens=12, frequency_penalty=2.0)
    a, b = [s.token for s in base.steps], [s.token for s in pen.steps]
    i = next(i for i in range(len(a)) if a[i] != b[i])
    assert a[i] in a[:i]  # where they part, the greedy token was a repeat
    # and a negative presence penalty is accepted (it raises repeats)
    assert smollm2.generate(PROMPT, max_tokens=4, presence_penalty=-2.0).text


@pytest.mark.parametrize("decoding", DECODERS)
def test_logit_bias_bans_and_forces_tokens(smollm2, decoding):
    first = smollm2.generate(PROMPT, max_tokens=2, **decoding).steps[0].token
    banned = smollm2.generate(PROMPT, max_tokens=2, logit_bias={first: -100}, **decoding)
    assert banned.steps[0].token != first
    forced = smollm2.generate(PROMPT, max_tokens=2, logit_bias={"100": 100}, **decoding)  # JSON's text keys too
    assert forced.steps[0].token == 100


def test_logit_bias_is_checked(smollm2):
    with pytest.raises(ValueError, match=r"logit_bias: token id 1000000 is outside the vocabulary \(0\.\.49151\)"):
        smollm2.generate(PROMPT, max_tokens=2, logit_bias={10**6: 1.0})
    with pytest.raises(ValueError, match=r"logit_bias values must be numbers in \[-100, 100\], got 101"):
        smollm2.generate(PROMPT, max_tokens=2, logit_bias={1: 101})
    with pytest.raises(ValueError, match="logit_bias keys must be token ids"):
        smollm2.generate(PROMPT, max_tokens=2, logit_bias={"one": 1.0})
    with pytest.raises(ValueError, match=r"frequency_penalty must be in \[-2, 2\], got 2.5"):
        smollm2.generate(PROMPT, max_tokens=2, frequency_penalty=2.5)


def test_a_config_with_a_logit_bias_stays_hashable_and_holds_int_keys():
    from dola_cpp import DecodeConfig

    c = DecodeConfig(logit_bias={"7": 1.5})
    assert c.logit_bias == {7: 1.5} and c == DecodeConfig(logit_bias={7: 1.5})
    assert hash(c) == hash(DecodeConfig())  # the bias is left out of the hash, not of equality
    assert c != DecodeConfig()
