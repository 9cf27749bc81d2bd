"""Gemma-3-270M (gemma3 arch: tied and sqrt(n_embd)-scaled embeddings, 262144-token vocabulary)."""

import numpy as np
import pytest

import dola_cpp


@pytest.fixture(scope="module")
def gemma():
    return dola_cpp.Model(dola_cpp.demo_model_path("gemma3-270m"), n_ctx=512)


def test_gemma_properties(gemma):
    assert (gemma.architecture, gemma.n_layers, gemma.n_vocab, gemma.tied_embeddings) == ("gemma3", 18, 262144, True)
    assert gemma.resolve_layers("high").candidates == (9, 11, 13, 15, 17)
    assert gemma.resolve_layers("low").candidates == (2, 4, 6, 8)
    assert gemma.tokenize("Hi")[0] == 2  # the GGUF asks for BOS


@pytest.mark.parametrize("layers", ["high", "low", "0,9,18", "4,18"])
def test_gemma_dola_generates(gemma, layers):
    ids = gemma.tokenize("The capital of France is")
    r = gemma.generate(ids, max_tokens=12, layers=layers, ignore_eos=True)
    plan = gemma.resolve_layers(layers)
    assert len(r.tokens) == 12 and r.text.strip()
    assert all(s.premature_layer in plan.candidates for s in r.steps)
    assert all(np.isfinite(s.score) and s.mature_logprob <= 0 for s in r.steps)


def test_gemma_projection_self_check(gemma):
    ids = gemma.tokenize("The largest planet in the solar system is")
    logits = gemma.layer_logits(ids, [gemma.n_layers])[0]
    projected = gemma._project_final(ids, premature_norm=True)
    np.testing.assert_allclose(projected, logits, atol=1e-3 * np.max(np.abs(logits)))


def test_gemma_layer_zero_is_the_scaled_embedding(gemma):
    """Layer 0 is inp_scaled (embedding * sqrt(640)), not the raw embedding: through the tied
    output matrix, the token's own logit is sqrt(640) * |e|^2."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    ids = gemma.tokenize("The capital of France is")
    z0 = gemma.layer_logits(ids, [0])[0]
    tensor = next(t for t in GGUFReader(str(gemma.path)).tensors if t.name == "token_embd.weight")
    row = dequantize(np.asarray(tensor.data[ids[-1]]), tensor.tensor_type).reshape(-1).astype(np.float64)
    assert int(np.argmax(z0)) == ids[-1]
    assert z0[ids[-1]] == pytest.approx(np.sqrt(640) * row @ row, rel=2e-2)  # Q8_0 activations
