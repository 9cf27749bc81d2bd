"""DoLa on every CPU buffer type llama.cpp may put the output matrix in.

llama.cpp moves weights into the CPU backend's extra buffer types (AMX on Sapphire Rapids and
later, CPU_REPACK on x86 with AVX2 and on ARM, KleidiAI on ARM) in layouts that only those buffer
types' own kernels read. The early-exit projection must give the same logits there as with the
plain layout (``repack=False``), for one row (decoding), several (DoLa's candidates, batched) and
many (``score``), and plain decoding of multi-token batches must run (the AMX crash)."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dola_cpp
from dola_cpp import Model, _core
from dola_cpp.synthetic import write_llama_gguf
from skip_policy import gpu_backends

# The output-matrix type that each extra buffer type takes in this llama.cpp (repack: Q4_0 on
# x86 AVX2 and ARM; AMX: Q4_0/Q4_1/Q8_0 and K-quants; KleidiAI: Q4_0).
OUTPUT_TYPE = {"AMX": "Q8_0", "CPU_REPACK": "Q4_0", "KLEIDIAI": "Q4_0"}
AVAILABLE = set(_core.cpu_extra_buffer_types())
PROMPT = "the capital of France is Paris. the capital of"


def _why_absent(buft: str) -> str:
    if buft == "AMX":
        return f"this machine offers no AMX buffer type (AMX {_core.amx_build_note()}; needs amx_int8 in /proc/cpuinfo)"
    if buft == "KLEIDIAI":
        return "this build has no KleidiAI buffer type (ARM only, -DGGML_CPU_KLEIDIAI=ON)"
    return f"this build and CPU offer no {buft} buffer type (offered: {sorted(AVAILABLE) or 'none'})"


# each buffer type is the hardware feature its tests need: where the machine is expected to have it
# (CPU_REPACK on x86 with AVX2, tests/skip_policy.py), CI refuses the skip
@pytest.fixture(scope="module", params=[pytest.param(b, marks=pytest.mark.hardware(b), id=b.lower())
                                        for b in sorted(OUTPUT_TYPE)])
def model_pair(request, tmp_path_factory):
    buft = request.param
    if buft not in AVAILABLE:
        pytest.skip(_why_absent(buft))
    path = write_llama_gguf(tmp_path_factory.mktemp(buft) / "m.gguf", n_layer=6, n_embd=64, n_head=4, n_ff=128,
                            n_vocab=512, output_type=OUTPUT_TYPE[buft], seed=11)
    # n_gpu_layers=0 and no_host: the CPU's buffer types, also in a GPU build (which would otherwise
    # offload, and keep the CPU's weights in its host buffer type ahead of them)
    repacked = Model(path, n_ctx=256, n_threads=2, repack=True, n_gpu_layers=0, no_host=True)
    plain = Model(path, n_ctx=256, n_threads=2, repack=False, n_gpu_layers=0)
    # every comparison below is vacuous unless the weights really took the layout
    repacked.layer_logits(PROMPT, layers=[3])
    assert f"in {buft}]" in repacked.projection_backend, repacked.projection_backend
    return buft, repacked, plain


def test_output_matrix_lands_in_the_extra_buffer_type(model_pair):
    buft, repacked, plain = model_pair
    repacked.layer_logits(PROMPT, layers=[3])
    plain.layer_logits(PROMPT, layers=[3])
    assert f"in {buft}]" in repacked.projection_backend
    assert re.search(r" in CPU(_Mapped)?\]$", plain.projection_backend), plain.projection_backend


@pytest.mark.parametrize("premature_norm", [False, True], ids=["raw", "normed"])
def test_projection_matches_the_plain_layout(model_pair, premature_norm):
    buft, repacked, plain = model_pair
    layers = [0, 2, 3, 4, 5, 6]  # five projected rows (padded to 8) and the final logits
    a = repacked.layer_logits(PROMPT, layers=layers, premature_norm=premature_norm)
    b = plain.layer_logits(PROMPT, layers=layers, premature_norm=premature_norm)
    assert a.shape == b.shape == (len(layers), repacked.n_vocab)
    # both layouts' kernels quantize the activations to Q8 the same way and add the same int8 block
    # products: only the float32 order of the block sums differs (1.3e-7 of the largest logit on an
    # AVX2 EPYC with CPU_REPACK)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())
    one_a = repacked.layer_logits(PROMPT, layers=[4], premature_norm=premature_norm)
    np.testing.assert_allclose(one_a[0], b[3], rtol=0, atol=1e-5 * np.abs(b[3]).max())


@pytest.mark.parametrize("layers", [None, "high", "2,6"], ids=["plain", "high", "static"])
def test_generation_matches_the_plain_layout(model_pair, layers):
    buft, repacked, plain = model_pair
    a = repacked.generate(PROMPT, max_tokens=12, layers=layers, ignore_eos=True)
    b = plain.generate(PROMPT, max_tokens=12, layers=layers, ignore_eos=True)
    assert a.tokens == b.tokens
    if layers is not None:
        assert [s.premature_layer for s in a.steps] == [s.premature_layer for s in b.steps]


@pytest.mark.parametrize("layers", [None, "high"], ids=["activation", "activation_dola"])
def test_activation_decoding_matches_the_plain_layout(model_pair, layers):
    """A repacked output matrix cannot be read row by row: H then comes from projecting every
    position (the streamed path); the plain layout reads the rows it needs. Same answers."""
    buft, repacked, plain = model_pair
    kw = dict(max_tokens=12, layers=layers, decoder="activation", premature_norm=True, ignore_eos=True)
    a, b = repacked.generate(PROMPT, **kw), plain.generate(PROMPT, **kw)
    assert a.tokens == b.tokens
    # generation's H: the same sums in another order (2.4e-7 nats measured)
    np.testing.assert_allclose([s.activation_entropy for s in a.steps], [s.activation_entropy for s in b.steps],
                               rtol=0, atol=1e-5)
    sa = repacked.score("the capital of France is", " Paris.", decoder="activation", premature_norm=True)
    sb = plain.score("the capital of France is", " Paris.", decoder="activation", premature_norm=True)
    # scoring's H on the repacked layout comes from the streamed path (float32 running max, S and W
    # over every position) and on the plain one from the rows it needs: alpha * H differs by up to
    # ~1e-3 nats (8.7e-4 measured)
    np.testing.assert_allclose(sa.token_scores, sb.token_scores, rtol=0, atol=2e-3)


def test_score_matches_the_plain_layout(model_pair):
    buft, repacked, plain = model_pair
    a = repacked.score("the capital of France is", " Paris. the capital of France is Paris.", layers="high")
    b = plain.score("the capital of France is", " Paris. the capital of France is Paris.", layers="high")
    assert a.premature_layers == b.premature_layers
    # the projections' block-sum order only (1e-6 measured on scores of |x| <= 5)
    np.testing.assert_allclose(a.token_scores, b.token_scores, rtol=0, atol=1e-5)


@pytest.fixture()
def kernel_switch(monkeypatch):
    def model(mode: str, path, **kw) -> Model:
        monkeypatch.setenv("DOLA_CPP_KERNEL", mode)
        return Model(path, n_ctx=256, n_threads=2, **kw)
    return model


@pytest.mark.hardware("KERNELS")
def test_our_q8_0_kernel_matches_ggml(kernel_switch, smollm2_path):
    """SmolLM2's tied output matrix is Q8_0 in plain host memory: our kernel and ggml's must agree,
    for the row counts DoLa uses."""
    layers = [2, 15, 17, 19, 21, 23, 25, 27, 29]
    ours = kernel_switch("on", smollm2_path)  # the setting is read when the projection is first needed
    a = ours.layer_logits(PROMPT, layers=layers)
    if "dola-cpp's q8_0 kernel" not in ours.projection_backend:
        pytest.skip(f"this build has no projection kernels (needs AVX2): {ours.projection_backend}")
    ggml = kernel_switch("off", smollm2_path)
    b = ggml.layer_logits(PROMPT, layers=layers)
    assert "dola-cpp" not in ggml.projection_backend
    # the same Q8_0 activations and int8 block products as ggml's; the float32 sums' order may
    # differ with the kernel (AVX2, VNNI): bitwise equal on an AVX2 EPYC
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())
    assert ours.generate(PROMPT, max_tokens=8, layers="high").tokens == \
        ggml.generate(PROMPT, max_tokens=8, layers="high").tokens


@pytest.mark.hardware("KERNELS")
@pytest.mark.parametrize("qtype", ["Q6_K", "Q4_K", "F16", "BF16"])
def test_our_kernels_match_ggml_per_output_type(kernel_switch, tmp_path, qtype):
    """The output matrix types of common GGUFs (Q6_K in most Q4_K_M / Q5_K_M files, Q4_K, F16,
    BF16), on a small model with that output type: our kernel's layer logits, DoLa's fused final
    row and the greedy tokens equal ggml's. Q4_K is read in ggml's plain layout (repack=False:
    repacked, ggml's own kernels for that layout do the projection)."""
    path = write_llama_gguf(tmp_path / f"out-{qtype}.gguf", n_layer=4, n_embd=256, n_head=4, n_ff=512, n_vocab=1200,
                            output_type=qtype, seed=3)
    ours = kernel_switch("on", path, repack=False)
    a = ours.layer_logits(PROMPT, layers=[1, 2, 3])
    if "dola-cpp's" not in ours.projection_backend:
        pytest.skip(f"this build has no projection kernels (needs AVX2): {ours.projection_backend}")
    assert f"dola-cpp's {qtype.lower()} kernel" in ours.projection_backend.lower()
    ggml = kernel_switch("off", path, repack=False)
    b = ggml.layer_logits(PROMPT, layers=[1, 2, 3])
    assert "dola-cpp" not in ggml.projection_backend
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * np.abs(b).max())
    # DoLa's mature row is computed by the kernel with the candidates (the graph stops before
    # llama.cpp's own LM head): its log-probabilities and tokens are those of ggml's
    ra = ours.generate(PROMPT, max_tokens=12, layers=[0, 2], ignore_eos=True)
    rb = ggml.generate(PROMPT, max_tokens=12, layers=[0, 2], ignore_eos=True)
    assert ra.tokens == rb.tokens
    np.testing.assert_allclose([s.mature_logprob for s in ra.steps], [s.mature_logprob for s in rb.steps], rtol=0, atol=1e-4)
    np.testing.assert_allclose([s.jsd for s in ra.steps], [s.jsd for s in rb.steps], rtol=0, atol=1e-5)


def test_kernel_setting_is_checked(kernel_switch, smollm2_path):
    m = kernel_switch("sometimes", smollm2_path)
    with pytest.raises(dola_cpp.DolaError, match="DOLA_CPP_KERNEL must be auto, on or off"):
        m.generate(PROMPT, max_tokens=1, layers="high")


def _device_parity(tokens: int = 8) -> subprocess.CompletedProcess:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "device_parity.py"
    return subprocess.run([sys.executable, str(script), "--tokens", str(tokens)], capture_output=True, text=True,
                          timeout=300)


def test_device_parity_script_runs():
    """benchmarks/device_parity.py is what a GPU machine runs (benchmarks/device_check.sh). On a
    build without a GPU it runs every placement on the CPU and says so: a check of the script, not
    of a device (test_device_parity is that)."""
    r = _device_parity()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| all offloaded |" in r.stdout and "| half offloaded |" in r.stdout
    assert r.stdout.count("| the same") == 3, r.stdout  # continuous batching as each request alone
    cpu_only = "(no GPU in this build or machine: every placement ran on the CPU)" in r.stdout
    assert cpu_only == (not gpu_backends()), r.stdout


@pytest.mark.hardware("GPU")
def test_device_parity():
    """DoLa with all, half and none of the layers on the GPU gives the CPU's tokens, layers, JSD
    and scores."""
    if not gpu_backends():
        pytest.skip("no second device: this build has no GPU backend")
    r = _device_parity(tokens=16)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "every placement ran on the CPU" not in r.stdout, r.stdout
    assert r.stdout.count("| yes |") == 3, r.stdout


def _dola_run(path, monkeypatch, mode, **kw):
    monkeypatch.setenv("DOLA_CPP_DEVICE_CONTRAST", mode)  # read when the projection is first needed
    m = Model(path, n_ctx=512, n_threads=2)
    out = [m.generate(PROMPT, max_tokens=20, ignore_eos=True, layers=layers, **kw) for layers in ("high", "low")]
    return m, out


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "seed": 3}, {"relative_top": 0.0}],
                         ids=["greedy", "sampled", "no-relative-top"])
def test_contrast_on_the_projection_backend_matches_the_host(smollm2_path, monkeypatch, sampling):
    """DOLA_CPP_DEVICE_CONTRAST=on runs the contrast graph a GPU runs (log-softmax of every row, the
    JSD per candidate) on the CPU backend, and brings back only the JSD values and two rows: the
    same tokens, layers, JSD and scores as the host kernels."""
    m_dev, dev = _dola_run(smollm2_path, monkeypatch, "on", **sampling)
    assert m_dev.projection_backend.endswith("(DoLa's contrast there too)")
    m_host, host = _dola_run(smollm2_path, monkeypatch, "off", **sampling)
    assert "contrast there" not in m_host.projection_backend
    for d, h in zip(dev, host):
        assert d.tokens == h.tokens
        assert [s.premature_layer for s in d.steps] == [s.premature_layer for s in h.steps]
        np.testing.assert_allclose(np.stack([s.jsd for s in d.steps]), np.stack([s.jsd for s in h.steps]),
                                   rtol=1e-4, atol=1e-8)
        np.testing.assert_allclose([s.score for s in d.steps], [s.score for s in h.steps], rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose([s.mature_logprob for s in d.steps], [s.mature_logprob for s in h.steps],
                                   atol=1e-4)
        np.testing.assert_allclose([s.entropy for s in d.steps], [s.entropy for s in h.steps], rtol=1e-4, atol=1e-5)


def test_contrast_on_the_projection_backend_leaves_other_decoding_to_the_host(smollm2_path, monkeypatch):
    """Static DoLa (one candidate), premature_norm (rows normed on the host) and Activation Decoding keep
    the host kernels; their results do not depend on the setting."""
    results = {}
    for mode in ("on", "off"):
        monkeypatch.setenv("DOLA_CPP_DEVICE_CONTRAST", mode)
        m = Model(smollm2_path, n_ctx=512, n_threads=2)
        results[mode] = [m.generate(PROMPT, max_tokens=8, ignore_eos=True, **kw).tokens
                         for kw in ({"layers": [15]}, {"layers": "high", "premature_norm": True},
                                    {"layers": "high", "decoder": "activation"})]
    assert results["on"] == results["off"]


def test_device_contrast_setting_is_checked(smollm2_path, monkeypatch):
    monkeypatch.setenv("DOLA_CPP_DEVICE_CONTRAST", "sometimes")
    m = Model(smollm2_path, n_ctx=256)
    with pytest.raises(dola_cpp.DolaError, match="DOLA_CPP_DEVICE_CONTRAST must be auto, on or off"):
        m.generate("x", max_tokens=1, layers="high")
