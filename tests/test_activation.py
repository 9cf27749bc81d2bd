"""Activation Decoding (hkust-nlp/Activation_Decoding): the streamed entropy kernel, parity with a
torch computation of the reference's formulas on the F32 SmolLM2, the context cache, and the
settings' checks. Tolerances as in test_reference.py."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import dola_cpp
from dola_cpp import _core
from dola_cpp.layers import default_info_layer


def numpy_position_entropy(z):
    z = np.asarray(z, dtype=np.float64)
    p = np.exp(z - z.max(0))
    p /= p.sum(0)
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(0)


# ---------------------------------------------------------------------------------- the kernel


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_position_entropy_streams_to_the_exact_entropy(chunk):
    rng = np.random.default_rng(0)
    # rising maxima across chunks exercise the running rescale; wide logits its range
    z = (rng.standard_normal((300, 513)) * 8 + np.linspace(0, 40, 300)[:, None]).astype(np.float32)
    ours = _core.kernels.position_entropy(z, chunk=chunk, n_threads=2)
    np.testing.assert_allclose(ours, numpy_position_entropy(z), atol=2e-5, rtol=1e-5)


def test_position_entropy_extremes():
    z = np.zeros((50, 6), dtype=np.float32)
    z[:, 1] = -1e4
    z[7, 2] = 1e4          # one position dominates: H = 0
    z[:, 3] = 3e4          # all equal and huge: H = log P
    z[::2, 4] = -1e30      # half the positions vanish: log(P/2)
    H = _core.kernels.position_entropy(z, chunk=8)
    np.testing.assert_allclose(H, [np.log(50), np.log(50), 0.0, np.log(50), np.log(25), np.log(50)], atol=1e-5)
    assert np.all(np.isfinite(H))
    one = _core.kernels.position_entropy(z[:1])
    np.testing.assert_array_equal(one, np.zeros(6, dtype=np.float32))


# ------------------------------------------------------------------------------ the settings


def test_default_info_layer_is_the_references_share_of_depth():
    assert default_info_layer(32) == 26  # the reference's Llama-2-7B setting
    assert default_info_layer(30) == 24
    assert default_info_layer(18) == 14
    assert default_info_layer(1) == 0


def test_activation_settings_are_checked_before_decoding(smollm2):
    N = smollm2.n_layers
    with pytest.raises(ValueError, match=f"info_layer {N} is out of range: valid layers are 0..{N - 1}"):
        smollm2.generate("Hi", max_tokens=2, decoder="activation", info_layer=N)
    with pytest.raises(ValueError, match="info_layer must be a layer number"):
        smollm2.stream("Hi", decoder="activation", info_layer=-1)
    with pytest.raises(ValueError, match="alpha must be a finite number, got nan"):
        smollm2.generate("Hi", max_tokens=2, decoder="activation", alpha=float("nan"))
    with pytest.raises(ValueError, match="decoder must be one of dola, activation"):
        smollm2.generate("Hi", max_tokens=2, decoder="activaton")
    with pytest.raises(TypeError, match="did you mean 'alpha'"):
        dola_cpp.DecodeConfig().replace(alpah=0.5)


def test_results_name_the_decoder_and_carry_the_tokens_entropy(smollm2):
    r = smollm2.generate("The capital of France is", max_tokens=4, decoder="activation")
    assert r.decoder == "activation" and r.info_layer == default_info_layer(smollm2.n_layers)
    assert all(s.activation_entropy is not None and s.activation_entropy >= 0 for s in r.steps)
    d = smollm2.generate("The capital of France is", max_tokens=4, layers="high", decoder="activation")
    assert d.decoder == "activation_dola" and all(s.premature_layer is not None for s in d.steps)
    p = smollm2.generate("The capital of France is", max_tokens=4)
    assert p.decoder == "plain" and p.info_layer is None
    assert all(s.activation_entropy is None for s in p.steps)


# ---------------------------------------------------------------------- parity with the reference

PROMPTS = [
    "Q: What is the capital of Australia?\nA:",
    "The theory of general relativity was developed by",
]


def close(a, b):
    return abs(a - b) <= max(1e-3, 5e-5 * abs(b))


@pytest.fixture(scope="module")
def torch_reference():
    import torch_reference  # imports torch (the test extra)

    return torch_reference


@pytest.mark.reference
@pytest.mark.parametrize("alpha,info_layer,relative_top", [(0.5, None, 0.1), (2.0, 12, 0.1), (0.5, None, 0.0)],
                         ids=["default", "layer12", "unfiltered"])
@pytest.mark.parametrize("prompt", PROMPTS, ids=["capital", "relativity"])
def test_activation_greedy_matches_reference(f32_model, hf_model, torch_reference, prompt, alpha, info_layer,
                                             relative_top):
    """With the relative-top filter H is computed for the filtered entries only (from their
    output rows); unfiltered, for the whole vocabulary (every position through the projection)."""
    ids = f32_model.tokenize(prompt)
    layer = default_info_layer(f32_model.n_layers) if info_layer is None else info_layer
    ref_tokens, ref_scores, _, H = torch_reference.activation_generate(
        hf_model, ids, 20, layer, alpha, relative_top=relative_top, repetition_penalty=1.2)
    r = f32_model.generate(ids, max_tokens=20, decoder="activation", alpha=alpha, info_layer=info_layer,
                           relative_top=relative_top, ignore_eos=True)
    assert r.info_layer == layer
    assert r.tokens == ref_tokens
    bad = [(i, s.score, ref) for i, (s, ref) in enumerate(zip(r.steps, ref_scores)) if not close(s.score, ref)]
    assert not bad
    for s in r.steps:
        assert abs(s.activation_entropy - float(H[s.token])) <= 1e-4 + 1e-4 * float(H[s.token])


@pytest.mark.reference
@pytest.mark.filterwarnings("ignore::dola_cpp.PenaltyWarning")
@pytest.mark.parametrize("prompt", PROMPTS, ids=["capital", "relativity"])
def test_activation_dola_greedy_matches_reference(f32_model, hf_model, torch_reference, prompt):
    """The reference's activation_dola subtracts the premature layer's raw logits where DoLa
    subtracts their log-softmax: our scores are its scores plus that step's logsumexp, and the
    tokens are the same (without a repetition penalty, whose sign rule sees the shift)."""
    ids = f32_model.tokenize(prompt)
    plan = f32_model.resolve_layers("high")
    ref_tokens, ref_scores, shifts, _ = torch_reference.activation_generate(
        hf_model, ids, 20, default_info_layer(f32_model.n_layers), 0.5, candidates=plan.candidates)
    r = f32_model.generate(ids, max_tokens=20, layers="high", decoder="activation", repetition_penalty=1.0,
                           ignore_eos=True)
    assert r.tokens == ref_tokens
    bad = [(i, s.score, ref + sh) for i, (s, ref, sh) in enumerate(zip(r.steps, ref_scores, shifts))
           if not close(s.score, ref + sh)]
    assert not bad


@pytest.mark.reference
@pytest.mark.parametrize("layers,relative_top,post_softmax", [
    (None, 0.0, False), ("high", 0.0, False), ("high", 0.1, True)], ids=["activation", "dola", "dola-rt-post"])
def test_activation_score_matches_lm_score(f32_model, hf_model, torch_reference, layers, relative_top, post_softmax):
    prefix = "Q: Who wrote Hamlet?\nA:"
    answers = [" William Shakespeare wrote Hamlet.", " Christopher Marlowe."]
    plan = f32_model.resolve_layers(layers)
    for answer in answers:
        ids = f32_model.tokenize(prefix + answer)
        n_prefix = len(f32_model.tokenize(prefix))
        out = torch_reference.forward(hf_model, ids)
        ref = torch_reference.activation_lm_score(
            hf_model, out, ids, n_prefix, info_layer=12, alpha=0.5, candidates=plan.candidates,
            relative_top=relative_top, post_softmax=post_softmax)
        ours = f32_model.score(prefix, answer, layers=layers, relative_top=relative_top, post_softmax=post_softmax,
                               decoder="activation", info_layer=12, alpha=0.5)
        assert close(ours.score, ref), (answer, ours.score, ref)


# ------------------------------------------------------------------------------ the context cache
# With an F32 KV cache, so that a prefix read from the cache and one decoded again give the same
# numbers (with F16, llama.cpp's attention differs between long and short batches: see eval).


@pytest.fixture(scope="module")
def exact(smollm2_path):
    return dola_cpp.Model(smollm2_path, n_ctx=1024, kv_type="f32")


def test_a_prompt_that_extends_the_last_one_gets_the_same_entropy_as_a_fresh_context(exact):
    """The chat's case: the next prompt holds the last prompt and answer; H must cover all its
    positions although most of them come from the KV cache."""
    fresh = exact.share()
    first = "Q: What is the capital of France?\nA:"
    r1 = exact.generate(first, max_tokens=8, decoder="activation")
    second = first + r1.text + "\nQ: And of Italy?\nA:"
    warm = exact.generate(second, max_tokens=8, decoder="activation")
    cold = fresh.generate(second, max_tokens=8, decoder="activation")
    assert warm.tokens == cold.tokens
    np.testing.assert_allclose([s.activation_entropy for s in warm.steps],
                               [s.activation_entropy for s in cold.steps], rtol=1e-5, atol=1e-6)
    # switching the info layer or the projection rebuilds H for the same prompt
    for kw in (dict(info_layer=10), dict(premature_norm=True)):
        again = exact.generate(second, max_tokens=4, decoder="activation", **kw)
        ref = fresh.share().generate(second, max_tokens=4, decoder="activation", **kw)
        assert again.tokens == ref.tokens
        np.testing.assert_allclose([s.activation_entropy for s in again.steps],
                                   [s.activation_entropy for s in ref.steps], rtol=1e-5, atol=1e-6)


def test_scores_that_share_a_prefix_equal_fresh_scores(exact):
    prefix = "Q: What is the largest planet?\nA:"
    kw = dict(decoder="activation", layers="high", premature_norm=True)
    warm = [exact.score(prefix, a, **kw) for a in (" Jupiter.", " Saturn.", " Jupiter.")]
    cold = [exact.share().score(prefix, a, **kw) for a in (" Jupiter.", " Saturn.")]
    assert warm[0].score == pytest.approx(cold[0].score, abs=1e-4)
    assert warm[1].score == pytest.approx(cold[1].score, abs=1e-4)
    assert warm[2].score == pytest.approx(warm[0].score, abs=1e-4)
    # the entropy term is there (normed early exits give SmolLM2 non-zero H; raw ones ~0, see
    # docs/decoders.md, "Activation Decoding"): the score without it is higher
    plain = exact.score(prefix, " Jupiter.", layers="high", premature_norm=True)
    assert plain.score > warm[0].score + 0.1


def test_questions_after_a_shared_primer_score_as_in_a_fresh_context(exact):
    """TruthfulQA's case: every question follows the same few-shot primer, so the entropy
    statistics of the primer are kept and reused; the scores must not depend on that."""
    primer = "Q: What is the boiling point of water?\nA: 100 degrees Celsius.\n\n" * 3
    kw = dict(decoder="activation", premature_norm=True)
    calls = [(primer + "Q: Who wrote Hamlet?\nA:", a) for a in (" Shakespeare.", " Marlowe.")]
    calls += [(primer + "Q: What is the largest planet?\nA:", a) for a in (" Jupiter.", " Mars.")]
    calls += [(primer + "Q: Who painted the Mona Lisa?\nA:", " Leonardo da Vinci.")]
    calls += [(primer + "Q: Who wrote Hamlet?\nA:", " Shakespeare.")]
    warm = [exact.score(p, a, **kw).score for p, a in calls]
    cold = [exact.share().score(p, a, **kw).score for p, a in calls]
    np.testing.assert_allclose(warm, cold, rtol=1e-5, atol=1e-4)


def test_long_prompt_runs_in_bounded_memory(smollm2_path, tmp_path):
    """H needs the info layer's logits at every position (here 1500 x 49152 floats = 295 MB):
    they stream through, so peak memory grows by far less."""
    code = textwrap.dedent(f"""
        import resource, dola_cpp
        m = dola_cpp.Model({str(smollm2_path)!r}, n_ctx=2048)
        ids = [m.tokenize("x")[-1]] + m.tokenize(" the cat sat on the mat." * 300, add_special=False)[:1499]
        m.generate(ids, max_tokens=1)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        r = m.generate(ids[:-1] + [ids[0]], max_tokens=2, decoder="activation")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(len(ids), (after - before) // 1024)
    """)
    # outside the checkout, which would shadow the installed package
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    n, grew_mb = map(int, out.stdout.split())
    assert n == 1500
    assert grew_mb < 60, f"peak RSS grew by {grew_mb} MB for a {n}-token prompt"
