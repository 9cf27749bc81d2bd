import pytest

from dola_cpp import resolve_layers


@pytest.mark.parametrize(
    "n, tied, name, expected",
    [
        (30, True, "high", [15, 17, 19, 21, 23, 25, 27, 29]),  # SmolLM2-135M
        (30, True, "low", [2, 4, 6, 8, 10, 12, 14]),
        (18, True, "high", [9, 11, 13, 15, 17]),  # Gemma-3-270M
        (18, True, "low", [2, 4, 6, 8]),
        (32, False, "low", [0, 2, 4, 6, 8, 10, 12, 14]),  # Llama-2-7B
        (32, False, "high", [16, 18, 20, 22, 24, 26, 28, 30]),
        (48, False, "high", list(range(28, 48, 2))),  # > 40 layers: last 20
        (48, True, "low", list(range(2, 20, 2))),
        (2, True, "low", [1]),  # start == N // 2
        (2, False, "low", [0]),
        (1, True, "low", [0]),
    ],
    ids=lambda v: str(v),
)
def test_named_layers_follow_transformers(n, tied, name, expected):
    plan = resolve_layers(name, n, tied)
    assert list(plan.candidates) == expected
    assert plan.mature == n


def test_explicit_list_keeps_order_and_drops_out_of_range():
    plan = resolve_layers([20, 4, 40, 30, 4], 30, True)
    assert plan.candidates == (20, 4)
    assert plan.mature == 30
    assert plan.mode == "dynamic"


def test_early_exit_layer_strings():
    assert resolve_layers("16,18,32", 32, False) == resolve_layers([16, 18], 32, False)
    static = resolve_layers("8,24", 32, False)
    assert static.candidates == (8,) and static.mature == 24 and static.mode == "static"
    single = resolve_layers("32", 32, False)
    assert single.is_plain and single.mature == 32
    early = resolve_layers("12", 32, False)
    assert early.is_plain and early.mature == 12


@pytest.mark.parametrize("spec", [None, "none", "off", "plain", "vanilla"])
def test_plain_specs(spec):
    assert resolve_layers(spec, 30, True).is_plain


@pytest.mark.parametrize(
    "spec, message",
    [
        ("medium", "'medium' is not a layer spec: use high, low, none"),
        ("4,99", "valid layers are 0..30"),
        ("-1,30", "valid layers are 0..30"),
        ("4,0", "mature layer must be in 1..30"),
        ("30,30", "both a premature candidate and the mature layer"),
        ([-2, 4], "valid premature layers are 0..29"),
        ([30, 31], "valid premature layers are 0..29"),
    ],
)
def test_invalid_specs_name_the_valid_range(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve_layers(spec, 30, True)


def test_wrong_type():
    with pytest.raises(TypeError):
        resolve_layers(3.5, 30, True)
