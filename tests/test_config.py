"""DecodeConfig: defaults, validation, the penalty rule, and how generate/stream/score use it."""

import warnings

import pytest

from dola_cpp import DecodeConfig, DolaConfig, LayerPlan, PenaltyWarning

PLAIN = LayerPlan((), 30)
DOLA = LayerPlan((15, 17), 30)


def test_defaults_are_plain_greedy():
    c = DecodeConfig()
    assert c.dola == DolaConfig() and c.dola.layers is None and c.temperature == 0.0 and not c.dola.premature_norm
    assert c.penalty(PLAIN) == 1.0 and c.penalty(DOLA) == 1.2


@pytest.mark.parametrize("changes, error, message", [
    ({"temperature": -1}, ValueError, r"temperature must be >= 0, got -1"),
    ({"temperature": float("nan")}, ValueError, "temperature"),
    ({"top_p": 0.0}, ValueError, r"top_p must be in \(0, 1\]"),
    ({"min_p": 1.5}, ValueError, r"min_p must be in \[0, 1\]"),
    ({"relative_top": 1.0}, ValueError, r"relative_top must be in \[0, 1\)"),
    ({"repetition_penalty": 0}, ValueError, r"repetition_penalty must be > 0, got 0"),
    ({"top_k": 2**31}, ValueError, "top_k must be an integer >= 0 and <= 2147483647"),
    ({"top_k": -1}, ValueError, "top_k must be an integer >= 0"),
    ({"top_k": 2.5}, ValueError, "top_k must be an integer"),
    ({"seed": -3}, ValueError, "seed must be an integer >= 0"),
    ({"layers": "1,,2"}, ValueError, "empty entry"),
    ({"layers": b"high"}, TypeError, "layers must be"),
    ({"premature_norm": "yes"}, TypeError, "premature_norm must be True or False"),
    ({"temperature": "hot"}, TypeError, "temperature must be a number"),
])
def test_invalid_values_name_the_field(changes, error, message):
    name = next(iter(changes))
    with pytest.raises(error, match=message):
        DolaConfig(**changes) if name in ("layers", "premature_norm", "relative_top") else DecodeConfig(**changes)
    with pytest.raises(error, match=message):
        DecodeConfig().replace(**changes)


def test_replace_reaches_the_dola_sub_config():
    c = DecodeConfig().replace(layers="high", premature_norm=True, temperature=0.5)
    assert c.dola == DolaConfig(layers="high", premature_norm=True) and c.temperature == 0.5
    assert c.replace(relative_top=0.2).dola == DolaConfig(layers="high", premature_norm=True, relative_top=0.2)
    assert DecodeConfig(dola=DolaConfig(layers="low")).dola.layers == "low"
    with pytest.raises(TypeError, match="dola must be a DolaConfig"):
        DecodeConfig(dola={"layers": "high"})


def test_penalty_note_only_for_dola_below_the_recommendation():
    assert DecodeConfig(repetition_penalty=1.0).penalty_note(PLAIN) is None
    assert DecodeConfig().penalty_note(DOLA) is None
    assert "repetition_penalty >= 1.2 (got 1.1)" in DecodeConfig(repetition_penalty=1.1).penalty_note(DOLA)


def test_keywords_replace_the_configs_fields(smollm2):
    cfg = DecodeConfig(dola=DolaConfig(layers="high"), repetition_penalty=1.2)
    a = smollm2.generate("The capital of France is", max_tokens=6, config=cfg)
    b = smollm2.generate("The capital of France is", max_tokens=6, layers="high")
    c = smollm2.generate("The capital of France is", max_tokens=6, config=cfg, layers=None)
    d = smollm2.generate("The capital of France is", max_tokens=6, repetition_penalty=1.2)  # the config's, kept
    assert a.tokens == b.tokens and a.steps[0].premature_layer is not None
    assert c.tokens == d.tokens and c.steps[0].premature_layer is None
    s = smollm2.stream("The capital of France is", max_tokens=6, config=cfg)
    assert "".join(s) == a.text
    assert smollm2.score("Q", " A", config=cfg).score == smollm2.score("Q", " A", layers="high").score
    with pytest.raises(TypeError, match="config must be a DecodeConfig"):
        smollm2.generate("hi", config={"layers": "high"})


def test_the_penalty_warning_comes_from_the_config(smollm2, monkeypatch):
    import dola_cpp.stream as model_module

    monkeypatch.setattr(model_module, "_warned_penalty", False)
    with pytest.warns(PenaltyWarning, match="recommended with repetition_penalty >= 1.2"):
        smollm2.generate("hi", max_tokens=1, config=DecodeConfig().replace(layers="high", repetition_penalty=1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        smollm2.generate("hi", max_tokens=1, config=DecodeConfig().replace(layers="high", repetition_penalty=1.0))  # once
