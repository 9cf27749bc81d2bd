"""Parity with transformers 4.51.3 (the reference DoLa implementation) on an F32 copy of SmolLM2.

Prompts go in as token ids. llama.cpp runs in exact mode (F32 KV cache, no flash attention).
Scores of raw-layer contrasts reach |s| ~ 500, where float32 matmul reduction order alone moves
torch's own result by ~1e-3; the tolerance is 1e-3 absolute or 5e-5 relative, whichever is larger.
"""

import numpy as np
import pytest

import torch  # the test extra's: a plain import, so that a missing package fails the suite
import torch_reference

pytestmark = pytest.mark.reference

PROMPTS = [
    "Q: What is the capital of Australia?\nA:",
    "The theory of general relativity was developed by",
]
MODES = ["high", "low", [0, 8, 16], [12]]


def close(a, b):
    return abs(a - b) <= max(1e-3, 5e-5 * abs(b))


@pytest.mark.parametrize("prompt", PROMPTS, ids=["capital", "relativity"])
def test_plain_greedy_matches_transformers(f32_model, hf_model, prompt):
    ids = f32_model.tokenize(prompt)
    out = hf_model.generate(
        torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=24,
        do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0,
    )
    hf_tokens = out.sequences[0, len(ids):].tolist()
    r = f32_model.generate(ids, max_tokens=24, ignore_eos=True)
    assert r.tokens == hf_tokens
    for i, t in enumerate(hf_tokens):
        assert close(r.steps[i].score, float(out.scores[i][0, t]))


@pytest.mark.parametrize("layers", MODES, ids=["high", "low", "list", "single"])
@pytest.mark.parametrize("prompt", PROMPTS, ids=["capital", "relativity"])
def test_dola_greedy_matches_transformers(f32_model, hf_model, prompt, layers):
    ids = f32_model.tokenize(prompt)
    out = hf_model.generate(
        torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=24,
        do_sample=False, dola_layers=layers, repetition_penalty=1.2, output_scores=True,
        return_dict_in_generate=True, pad_token_id=0,
    )
    hf_tokens = out.sequences[0, len(ids):].tolist()
    r = f32_model.generate(ids, max_tokens=24, layers=layers, repetition_penalty=1.2, ignore_eos=True)
    assert r.tokens == hf_tokens
    bad = [
        (i, r.steps[i].score, float(out.scores[i][0, t]))
        for i, t in enumerate(hf_tokens)
        if not close(r.steps[i].score, float(out.scores[i][0, t]))
    ]
    assert not bad
    candidates = f32_model.resolve_layers(layers).candidates
    assert all(s.premature_layer in candidates for s in r.steps)
    if len(candidates) > 1:
        assert all(s.jsd.shape == (len(candidates),) for s in r.steps)


def hf_hidden_logits(hf_model, ids):
    with torch.no_grad():
        out = hf_model(torch.tensor([ids]), output_hidden_states=True)
    head = hf_model.get_output_embeddings()
    return out, head


def test_layer_logits_match_lm_head_of_hidden_states(f32_model, hf_model):
    ids = f32_model.tokenize(PROMPTS[0])
    layers = [0, 2, 15, 29, 30]
    ours = f32_model.layer_logits(ids, layers)
    out, head = hf_hidden_logits(hf_model, ids)
    for row, j in zip(ours, layers):
        ref = out.logits[0, -1] if j == 30 else head(out.hidden_states[j][0, -1])
        ref = ref.detach().numpy()
        assert np.max(np.abs(row - ref)) <= 1e-3 + 1e-5 * np.max(np.abs(ref))


def test_projection_of_normed_final_state_reproduces_logits(smollm2):
    """Self-check of the early-exit path on the quantized model: the last block's output through
    the final norm and our projection equals llama.cpp's own logits."""
    ids = smollm2.tokenize(PROMPTS[1])
    logits = smollm2.layer_logits(ids, [smollm2.n_layers])[0]
    projected = smollm2._project_final(ids, premature_norm=True)
    np.testing.assert_allclose(projected, logits, atol=1e-3 * np.max(np.abs(logits)))
    assert np.argmax(projected) == np.argmax(logits)
    raw = smollm2._project_final(ids, premature_norm=False)
    assert np.max(np.abs(raw - logits)) > 1.0  # and the raw state is really different


@pytest.mark.parametrize(
    "layers, relative_top, post_softmax",
    [
        (None, 0.0, False),
        ("16,18,20,22,30", 0.0, False),  # dynamic, TruthfulQA settings
        ("high", 0.1, True),  # dynamic, FACTOR settings
        ("8,30", 0.0, False),  # static
        ("4,20", 0.1, True),  # static with a mature layer other than N
    ],
    ids=["vanilla", "dynamic-tfqa", "dynamic-factor", "static", "static-early-mature"],
)
def test_score_matches_lm_score(f32_model, hf_model, layers, relative_top, post_softmax):
    prefix = "Q: What is the capital of Australia?\nA:"
    for answer in [" Canberra is the capital of Australia.", " Sydney."]:
        r = f32_model.score(prefix, answer, layers=layers, relative_top=relative_top, post_softmax=post_softmax)
        ids = f32_model.tokenize(prefix + answer)
        n_prefix = len(f32_model.tokenize(prefix))
        plan = f32_model.resolve_layers(layers)
        ref, chosen = torch_reference.lm_score(hf_model, torch_reference.forward(hf_model, ids), ids, n_prefix,
                                               list(plan.candidates), plan.mature, relative_top, post_softmax)
        assert close(r.score, ref), (r.score, ref)
        assert r.continuation_tokens == ids[n_prefix:]
        if plan.candidates:
            assert r.premature_layers == chosen
        else:
            assert r.premature_layers == [None] * len(r.continuation_tokens)


def test_score_reuses_the_prefix_cache(f32_model):
    prefix = "Q: What is the capital of Australia?\nA:"
    a = f32_model.score(prefix, " Canberra.", layers="high")
    f32_model._session.clear()
    b = f32_model.score(prefix, " Canberra.", layers="high")
    assert a.score == pytest.approx(b.score, abs=1e-4)
    assert a.premature_layers == b.premature_layers
