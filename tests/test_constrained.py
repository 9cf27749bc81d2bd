"""Constrained output and log-probabilities on SmolLM2: llama.cpp's grammar applied after DoLa's
contrast (plain, DoLa and Activation Decoding, greedy and sampled), grammars from JSON schemas,
the errors of grammars and schemas llama.cpp cannot use, and the top log-probs each step and each
scored token report, against log-softmaxes computed here from the layers' logits."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from dola_cpp import (
    JSON_OBJECT_GRAMMAR,
    DecodeConfig,
    DolaError,
    _core,
    json_schema_grammar,
)

PROMPT = "Q: What colour is the sky on a clear day?\nA:"
# an answer SmolLM2 does not give by itself (checked below), in a form a regex can check
COLOUR_GRAMMAR = 'root ::= " It is " ("red" | "green" | "purple") " and " [0-9] [0-9]? " percent."'
COLOUR_RE = re.compile(r" It is (red|green|purple) and [0-9][0-9]? percent\.")

DECODERS = {
    "plain": {},
    "dola-high": {"layers": "high"},
    "activation": {"decoder": "activation"},
}
SAMPLING = {"greedy": {}, "sampled": {"temperature": 0.9, "seed": 7}}

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "student": {"type": "boolean"},
    },
    "required": ["name", "age", "student"],
    "additionalProperties": False,
}
TYPES = {"string": str, "integer": int, "boolean": bool, "number": (int, float)}


def schema_errors(value, schema) -> list[str]:
    """What in ``value`` breaks ``schema`` (the object/required/type/length/range subset used here)."""
    errors = []
    if schema.get("type") == "object":
        if not isinstance(value, dict):
            return [f"not an object: {value!r}"]
        props = schema.get("properties", {})
        errors += [f"missing {k}" for k in schema.get("required", []) if k not in value]
        if schema.get("additionalProperties") is False:
            errors += [f"extra {k}" for k in value if k not in props]
        for k, v in value.items():
            if k in props:
                errors += [f"{k}: {e}" for e in schema_errors(v, props[k])]
        return errors
    want = TYPES[schema["type"]]
    if not isinstance(value, want) or (schema["type"] == "integer" and isinstance(value, bool)):
        return [f"{value!r} is not {schema['type']}"]
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        errors.append(f"{value!r} is longer than {schema['maxLength']}")
    if "minimum" in schema and value < schema["minimum"] or "maximum" in schema and value > schema["maximum"]:
        errors.append(f"{value!r} is out of range")
    return errors


def test_the_validator_finds_what_breaks_the_schema():
    assert schema_errors({"name": "Ann", "age": 30, "student": False}, PERSON) == []
    assert schema_errors({"name": 3, "age": True, "x": 1}, PERSON) == [
        "missing student", "extra x", "name: 3 is not string", "age: True is not integer"]


# ---------------------------------------------------------------------------------- grammars


def test_unconstrained_answers_do_not_match_the_grammar(smollm2):
    for name, kw in DECODERS.items():
        for sampling in SAMPLING.values():
            r = smollm2.generate(PROMPT, max_tokens=16, **kw, **sampling)
            assert not COLOUR_RE.fullmatch(r.text), (name, r.text)


@pytest.mark.parametrize("sampling", SAMPLING)
@pytest.mark.parametrize("decoder", DECODERS)
def test_a_grammar_forces_the_answer_and_it_ends_where_the_grammar_does(smollm2, decoder, sampling):
    r = smollm2.generate(PROMPT, max_tokens=32, grammar=COLOUR_GRAMMAR, **DECODERS[decoder], **SAMPLING[sampling])
    assert COLOUR_RE.fullmatch(r.text), r.text
    assert r.finish_reason == "stop"  # complete, the grammar allows only the end tokens
    # the same through a config, and streamed
    cfg = DecodeConfig().replace(grammar=COLOUR_GRAMMAR, **DECODERS[decoder], **SAMPLING[sampling])
    assert "".join(smollm2.stream(PROMPT, max_tokens=32, config=cfg)) == r.text


def test_a_complete_grammar_ends_the_answer_even_with_ignore_eos(smollm2):
    r = smollm2.generate(PROMPT, max_tokens=32, grammar=COLOUR_GRAMMAR, ignore_eos=True)
    assert COLOUR_RE.fullmatch(r.text) and r.finish_reason == "stop"


def test_the_grammar_restarts_with_each_answer(smollm2):
    first = smollm2.generate(PROMPT, max_tokens=32, grammar=COLOUR_GRAMMAR)
    # the same prompt again (its cached prefix reused), and a longer one that extends it
    assert smollm2.generate(PROMPT, max_tokens=32, grammar=COLOUR_GRAMMAR).text == first.text
    longer = smollm2.generate(PROMPT + first.text + "\nQ: And at night?\nA:", max_tokens=32, grammar=COLOUR_GRAMMAR)
    assert COLOUR_RE.fullmatch(longer.text), longer.text


def test_a_greedy_grammar_answer_is_the_constrained_argmax(smollm2):
    """Greedy decoding checks the argmax alone first; with log-probs asked for, the grammar runs on
    the whole vocabulary: the same tokens, and each is the best the grammar allows."""
    quick = smollm2.generate(PROMPT, max_tokens=32, grammar=COLOUR_GRAMMAR, layers="high")
    full = smollm2.generate(PROMPT, max_tokens=32, grammar=COLOUR_GRAMMAR, layers="high", top_logprobs=3)
    assert quick.tokens == full.tokens
    for s in full.steps:
        assert s.dola_top_logprobs[0][0] == s.token


def test_a_grammar_that_does_not_parse_is_a_value_error(smollm2):
    with pytest.raises(DolaError, match="cannot parse this grammar: Undefined rule identifier 'undefined-rule'$"):
        smollm2.generate(PROMPT, max_tokens=4, grammar="root ::= undefined-rule")
    with pytest.raises(DolaError, match=r"cannot parse this grammar: expecting ::= at = \"a\"$"):
        smollm2.check_grammar('root = "a"')
    with pytest.raises(DolaError, match="cannot use this grammar: unsupported grammar, left recursion"):
        smollm2.check_grammar('root ::= root "a" | "b"')
    with pytest.raises(ValueError, match="does not contain a 'root' symbol"):
        smollm2.stream(PROMPT, max_tokens=4, grammar='answer ::= "yes"')  # checked at the call
    with pytest.raises(TypeError, match="grammar must be GBNF text"):
        DecodeConfig(grammar=b'root ::= "x"')
    with pytest.raises(TypeError, match="without NUL"):
        DecodeConfig(grammar='root ::= "\0"')
    # the model still answers
    assert smollm2.generate(PROMPT, max_tokens=32, grammar=COLOUR_GRAMMAR).finish_reason == "stop"


def test_a_token_the_grammar_rejects_is_refused_not_decoded(smollm2_path):
    weights = _core.Model(str(smollm2_path))
    s = _core.Session(weights, n_ctx=256)
    p = _core.DecodeParams()
    p.grammar = 'root ::= "yes"'
    s.configure(p)
    s.prefill(weights.tokenize(PROMPT, True, True))
    n = s.n_cached
    no = weights.tokenize(" no", False, False)[0]
    with pytest.raises(DolaError, match="not allowed by the grammar"):
        s.accept(no)
    with pytest.raises(DolaError, match="not allowed by the grammar"):  # an end token before the end
        s.accept(weights.eog_tokens[0])
    assert s.n_cached == n
    step = s.sample()
    assert weights.token_to_piece(step.token, False) in (b"yes", b"y", b"ye")


def test_sampling_with_a_grammar_draws_from_the_constrained_distribution(smollm2_path):
    """Temperature-only sampling keeps a draw the grammar allows and draws again from the
    constrained scores otherwise: the frequencies are the constrained distribution's, which the
    step reports (dola_top_logprobs, from the grammar run over the whole vocabulary)."""
    weights = _core.Model(str(smollm2_path))
    s = _core.Session(weights, n_ctx=256, n_threads=1)
    ids = weights.tokenize("Q: Is the sky blue?\nA:", True, True)
    p = _core.DecodeParams()
    p.grammar = 'root ::= (" Yes" | " No" | " yes" | " no" | " Maybe") "."'
    p.temperature, p.seed, p.n_probs = 1.0, 5, 20
    s.configure(p)
    s.prefill(ids)
    step = s.sample()
    want = dict(zip(step.dola_top_tokens, np.exp(step.dola_top_logprobs)))
    assert sum(want.values()) == pytest.approx(1.0, abs=1e-4)  # the grammar allows fewer than 20 tokens here
    # the unconstrained distribution puts most of its mass on tokens the grammar rejects
    mature = dict(zip(step.top_tokens, np.exp(step.top_logprobs_mature)))
    assert sum(mature.get(t, 0.0) for t in want) < 0.5
    p.n_probs = 0  # the one-check path
    s.configure(p)
    s.prefill(ids)
    n = 600
    drawn = [s.sample().token for _ in range(n)]
    assert set(drawn) <= set(want)
    for t, q in want.items():
        if q > 0.04:
            f = drawn.count(t) / n
            assert abs(f - q) <= 4.5 * np.sqrt(q * (1 - q) / n), (weights.token_to_piece(t, False), f, q)


def test_decode_configs_with_a_grammar_stay_hashable_and_compare_by_it():
    a = DecodeConfig(grammar=COLOUR_GRAMMAR, top_logprobs=2)
    assert hash(a) == hash(DecodeConfig(grammar=COLOUR_GRAMMAR, top_logprobs=2))
    assert a != DecodeConfig(grammar=COLOUR_GRAMMAR) and a != a.replace(grammar="")


# ---------------------------------------------------------------------------------- JSON schemas


@pytest.mark.parametrize("kw", [{}, {"layers": "high"}, {"temperature": 0.8, "seed": 3}],
                         ids=["plain", "dola-high", "sampled"])
def test_a_json_schema_answer_parses_and_follows_the_schema(smollm2, kw):
    prompt = "Describe a person as a JSON object with their name, age and whether they are a student.\n"
    r = smollm2.generate(prompt, max_tokens=64, json_schema=PERSON, **kw)
    assert r.finish_reason == "stop", r.text
    assert schema_errors(json.loads(r.text), PERSON) == [], r.text
    # the schema's JSON text gives the same grammar
    assert json_schema_grammar(json.dumps(PERSON)) == json_schema_grammar(PERSON)


def test_a_json_schema_answer_on_gemma(gemma_path):
    """Gemma-3's 262k-token vocabulary: the greedy path checks the argmax alone and runs the grammar
    over the vocabulary only when the grammar rejects it."""
    from dola_cpp import Model

    m = Model(gemma_path, n_ctx=512)
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "country": {"type": "string", "maxLength": 20}},
              "required": ["city", "country"], "additionalProperties": False}
    for kw in ({}, {"layers": "low", "premature_norm": True}):
        r = m.generate("The capital of France, as JSON:\n", max_tokens=40, json_schema=schema, **kw)
        assert r.finish_reason == "stop", r.text
        value = json.loads(r.text)
        assert set(value) == {"city", "country"} and all(isinstance(v, str) for v in value.values()), r.text


def test_any_json_object(smollm2):
    r = smollm2.generate("A JSON object with one key:\n", max_tokens=48, grammar=JSON_OBJECT_GRAMMAR)
    assert r.finish_reason == "stop", r.text
    assert isinstance(json.loads(r.text), dict)
    assert JSON_OBJECT_GRAMMAR == json_schema_grammar({"type": "object"})


def test_a_schema_the_converter_rejects_is_a_value_error_naming_the_part(smollm2):
    remote = {"type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}}
    with pytest.raises(ValueError, match=r"#/properties/a: unsupported \$ref"):
        json_schema_grammar(remote)
    with pytest.raises(ValueError, match=r"unsupported \$ref"):
        smollm2.generate(PROMPT, max_tokens=4, json_schema=remote)
    with pytest.raises(ValueError, match="not valid JSON"):
        json_schema_grammar('{"type": "object"')
    with pytest.raises(TypeError, match="dict or its JSON text"):
        json_schema_grammar(3)
    with pytest.raises(ValueError, match="not both"):
        smollm2.generate(PROMPT, max_tokens=4, json_schema=PERSON, grammar=COLOUR_GRAMMAR)


# ---------------------------------------------------------------------------------- log-probabilities


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    m = z[np.isfinite(z)].max()
    return z - (m + np.log(np.exp(z - m).sum()))


def _top(lp: np.ndarray, n: int) -> list[tuple[int, float]]:
    ids = [int(i) for i in np.argsort(-lp, kind="stable")[:n] if np.isfinite(lp[i])]
    return [(i, float(lp[i])) for i in ids]


def _assert_same_top(got: list[tuple[int, float]], want: list[tuple[int, float]], atol: float) -> None:
    assert len(got) == len(want)
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], atol=atol)
    assert [v for _, v in got] == sorted((v for _, v in got), reverse=True)
    # ids agree except where two log-probs are within the tolerance of each other
    for (gi, gv), (wi, wv) in zip(got, want):
        assert gi == wi or abs(gv - wv) <= atol, (got, want)


def test_no_log_probs_unless_asked(smollm2):
    s = smollm2.generate(PROMPT, max_tokens=2, layers="high").steps[0]
    assert s.top_logprobs == [] and s.dola_top_logprobs == [] and s.dola_logprob is None
    assert smollm2.score(PROMPT, " Blue.").top_tokens == []


def test_plain_top_logprobs_are_the_final_layers_log_softmax(smollm2):
    n = 5
    r = smollm2.generate(PROMPT, max_tokens=4, top_logprobs=n)
    want = _top(_log_softmax(smollm2.layer_logits(PROMPT, [smollm2.n_layers])[0]), n)
    step = r.steps[0]
    _assert_same_top(step.top_logprobs, want, atol=2e-4)
    # plain decoding without a penalty chooses from the final distribution itself
    _assert_same_top(step.dola_top_logprobs, want, atol=2e-4)
    for s in r.steps:
        assert s.token == s.dola_top_logprobs[0][0] == s.top_logprobs[0][0]  # greedy: the best
        assert s.dola_logprob == pytest.approx(s.mature_logprob, abs=1e-4)
        assert len(s.top_logprobs) == n


def test_dola_logprob_is_the_log_softmax_of_the_contrasted_scores(smollm2):
    plan = smollm2.resolve_layers("high")
    n = 4
    r = smollm2.generate(PROMPT, max_tokens=1, layers="high", top_logprobs=n)  # repetition penalty 1.2
    z = smollm2.layer_logits(PROMPT, list(plan.candidates) + [smollm2.n_layers])
    _, _, contrast = _core.kernels.dola_step(z[-1], z[:-1], 0.1)
    scores = _core.kernels.repetition_penalty(contrast, np.asarray(smollm2.tokenize(PROMPT), np.int32), 1.2)
    lp = _log_softmax(np.asarray(scores))
    step = r.steps[0]
    assert step.token == int(np.argmax(scores))
    assert step.dola_logprob == pytest.approx(lp[step.token], abs=2e-3)
    _assert_same_top(step.dola_top_logprobs, _top(lp, n), atol=2e-3)
    # the relative-top filter leaves few tokens: the list holds only those with a probability
    assert 1 <= len(step.dola_top_logprobs) <= n
    _assert_same_top(step.top_logprobs, _top(_log_softmax(z[-1]), n), atol=2e-4)


def test_sampled_dola_logprob_is_taken_before_temperature(smollm2):
    r = smollm2.generate(PROMPT, max_tokens=8, temperature=1.5, seed=11, top_logprobs=20)
    for s in r.steps:
        # plain, no penalty: the distribution drawn from, before temperature, is the mature one
        assert s.dola_logprob == pytest.approx(s.mature_logprob, abs=1e-4)
        assert dict(s.top_logprobs).get(s.token, s.mature_logprob) == pytest.approx(s.mature_logprob, abs=1e-5)


def test_with_a_grammar_the_dola_distribution_holds_only_allowed_tokens(smollm2):
    r = smollm2.generate(PROMPT, max_tokens=32, grammar=COLOUR_GRAMMAR, top_logprobs=5)
    answers = [f" It is {c} and" for c in ("red", "green", "purple")]
    checked = 0
    for i, s in enumerate(r.steps):
        before = smollm2.detokenize(r.tokens[:i])
        if before not in (" It is", " It is "):
            continue
        checked += 1  # before the colour: each token listed continues one of the three answers
        for t, _ in s.dola_top_logprobs:
            text = before + smollm2.detokenize([t])
            assert any(a.startswith(text) for a in answers), text
        # the mature distribution is the model's own, whatever the grammar allows
        assert s.top_logprobs[0][1] == pytest.approx(s.top_logprob, abs=1e-6)
    assert checked >= 1, r.text


def test_top_logprobs_is_in_0_to_20():
    with pytest.raises(ValueError, match="top_logprobs must be an integer in 0..20"):
        DecodeConfig(top_logprobs=21)


def test_score_reports_each_tokens_top_logprobs(smollm2):
    n = 3
    ids = smollm2.tokenize("The capital of France is Paris.")
    r = smollm2.score(ids[:4], ids[4:], top_logprobs=n)
    assert len(r.top_tokens) == len(ids) - 4
    for i, row in enumerate(r.top_tokens):
        want = _top(_log_softmax(smollm2.layer_logits(ids[:4 + i], [smollm2.n_layers])[0]), n)
        _assert_same_top(row, want, atol=2e-4)
        assert row[0][1] == pytest.approx(r.top_logprobs[i], abs=1e-6)


def test_every_token_of_a_text_but_the_first_can_be_scored(smollm2):
    ids = smollm2.tokenize("The capital of France is Paris.", add_special=False)
    r = smollm2.score(ids[:1], ids[1:], top_logprobs=1)
    assert r.continuation_tokens == ids[1:] and len(r.mature_logprobs) == len(ids) - 1
    for i in (0, len(ids) - 2):
        lp = _log_softmax(smollm2.layer_logits(ids[:i + 1], [smollm2.n_layers])[0])
        assert r.mature_logprobs[i] == pytest.approx(lp[ids[i + 1]], abs=2e-4)


# ---------------------------------------------------------------------------------- the command line


def _generate(*args: str, cwd) -> subprocess.CompletedProcess:
    # a real process: llama.cpp's parser writes to the process's stderr, not to Python's
    return subprocess.run([sys.executable, "-m", "dola_cpp", "generate", *args, "--threads", "1"], check=False, cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DOLA_CPP_DEBUG": "", "NO_COLOR": "1"})


def test_generate_with_a_json_schema_file(smollm2_path, tmp_path):
    (tmp_path / "person.json").write_text(json.dumps(PERSON))
    r = _generate(str(smollm2_path), "Describe a student called Ann as JSON.", "--json-schema", "person.json",
                  "-n", "64", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert schema_errors(json.loads(r.stdout), PERSON) == [], r.stdout


@pytest.mark.parametrize("option,text,reason", [
    ("--grammar", 'root ::= " Blue" | undefined-rule\n', r"--grammar bad\.txt: llama\.cpp cannot parse this grammar: Undefined rule identifier 'undefined-rule'$"),
    ("--json-schema", '{"type": "object", "properties": {"a": {"$ref": "https://example.com/a"}}}',
     r"--json-schema bad\.txt: JSON schema conversion failed: JSON schema error at #/properties/a: unsupported \$ref"),
    ("--json-schema", '{"type": ', r"--json-schema bad\.txt: the JSON schema is not valid JSON"),
])
def test_a_bad_grammar_or_schema_file_is_one_error_line(smollm2_path, tmp_path, option, text, reason):
    (tmp_path / "bad.txt").write_text(text)
    r = _generate(str(smollm2_path), "Hi", option, "bad.txt", "-n", "4", cwd=tmp_path)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert re.search(reason, lines[0].removeprefix("Error: ")), lines[0]


def test_generate_refuses_a_grammar_and_a_schema_together_or_a_missing_file(smollm2_path, tmp_path):
    (tmp_path / "g.gbnf").write_text('root ::= "x"')
    r = _generate(str(smollm2_path), "Hi", "--grammar", "g.gbnf", "--json-schema", "g.gbnf", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip() == "Error: give --grammar or --json-schema, not both"
    r = _generate(str(smollm2_path), "Hi", "--grammar", "missing.gbnf", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip() == "Error: --grammar missing.gbnf: cannot read it (No such file or directory)"
