"""Edge cases on tiny random-weight GGUFs written with gguf-py (dola_cpp.synthetic)."""

import gguf
import numpy as np
import pytest

from dola_cpp import DolaError, Model
from dola_cpp.synthetic import write_llama_gguf


def weights(path) -> dict[str, np.ndarray]:
    return {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize(
    "n_layer, tied, low, high",
    [
        # transformers' _dola_decoding: start = 0 untied; tied: 2 if N > 2, 1 if N == 2, else 0
        (1, False, [0], [0]),
        (1, True, [0], [0]),
        (2, True, [1], [1]),
        (4, False, [0], [2]),
        (6, True, [2], [3, 5]),
    ],
)
def test_layer_sets_and_generation_on_small_depths(tmp_path, n_layer, tied, low, high):
    m = Model(write_llama_gguf(tmp_path / "m.gguf", n_layer=n_layer, tied=tied), n_ctx=64)
    assert m.n_layers == n_layer and m.tied_embeddings == tied
    assert list(m.resolve_layers("low").candidates) == low
    assert list(m.resolve_layers("high").candidates) == high
    for spec, cands in (("low", low), ("high", high)):
        r = m.generate("the capital of France", max_tokens=6, layers=spec, ignore_eos=True)
        assert len(r.tokens) == 6
        assert all(s.premature_layer in cands for s in r.steps)


@pytest.mark.parametrize("tied", [False, True])
def test_layer_zero_is_the_embedding_row_through_the_output_matrix(tmp_path, tied):
    path = write_llama_gguf(tmp_path / "m.gguf", tied=tied, seed=3)
    m = Model(path, n_ctx=64)
    w = weights(path)
    ids = m.tokenize("the capital of France")
    got = m.layer_logits(ids, [0])[0]
    out = w["token_embd.weight"] if tied else w["output.weight"]
    want = out @ w["token_embd.weight"][ids[-1]]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_gqa_and_odd_sizes_run(tmp_path):
    m = Model(write_llama_gguf(tmp_path / "m.gguf", n_layer=3, n_embd=48, n_head=6, n_head_kv=2, n_ff=40), n_ctx=64)
    r = m.generate("the a of", max_tokens=5, layers=[0, 1, 2], ignore_eos=True)
    assert len(r.tokens) == 5 and all(s.jsd.shape == (3,) for s in r.steps)
    s = m.score("the", " capital of France", layers=[0, 1, 2])
    assert len(s.token_scores) == len(s.premature_layers) > 0


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_weights_raise_instead_of_emitting_garbage(tmp_path, value):
    path = write_llama_gguf(tmp_path / "m.gguf")
    reader = gguf.GGUFReader(path, "r+")
    next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight").data[...] = value
    del reader
    m = Model(path, n_ctx=64)
    for layers in (None, "high"):
        with pytest.raises(DolaError, match="non-finite logits"):
            m.generate("the a", max_tokens=2, layers=layers)
    with pytest.raises(DolaError, match="non-finite logits"):
        m.score("the", " a")
    # the model stays usable for the next call
    with pytest.raises(DolaError, match="non-finite logits"):
        m.generate("the", max_tokens=1)


def test_random_bytes_stream_as_text(tmp_path):
    """A byte-level vocabulary with random weights emits invalid UTF-8: it becomes U+FFFD."""
    m = Model(write_llama_gguf(tmp_path / "m.gguf", seed=5), n_ctx=256)
    r = m.generate("the", max_tokens=120, ignore_eos=True, temperature=1.0, seed=1)
    assert "".join(m.stream("the", max_tokens=120, ignore_eos=True, temperature=1.0, seed=1)) == r.text
    assert "\ufffd" in r.text


def test_context_options_are_validated(tmp_path):
    path = write_llama_gguf(tmp_path / "m.gguf")
    for kwargs, message in (
        (dict(n_ctx=2**40), "n_ctx must be in"),
        (dict(n_ctx=-1), "n_ctx must be in"),
        (dict(n_threads=0), "n_threads must be in 1..512"),
        (dict(n_threads=100000), "n_threads must be in 1..512"),  # ggml's thread pool used to segfault
        (dict(n_batch=0), "n_batch must be in"),
    ):
        with pytest.raises(ValueError, match=message):
            Model(path, **kwargs)
    m = Model(path, n_ctx=64)
    from dola_cpp import _core

    with pytest.raises(DolaError, match="n_threads must be at most 512"):
        _core.Session(m._weights, n_ctx=64, n_threads=513)


def test_share_keeps_the_capture_setting(tmp_path):
    m = Model(write_llama_gguf(tmp_path / "m.gguf"), n_ctx=64, capture=False)
    for model in (m, m.share()):
        assert len(model.generate("the a", max_tokens=2).tokens) == 2
        with pytest.raises(DolaError, match="without layer capture"):
            model.generate("the a", max_tokens=2, layers="high")
