"""The two ways layer outputs leave llama.cpp's graph (csrc/dola-capture.h): kept as graph outputs
and read after the graph (builds with the allocation hook), or copied by the eval callback as the
graph runs. They must give the same results."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import dola_cpp
from dola_cpp import _core


@pytest.mark.hardware("linux")
def test_capture_mode_is_outputs_on_linux():
    """GNU-style linkers get the graph-allocation hook; without it a Linux build would silently
    fall back to a split and a wait per captured layer. (The suite runs without the caller's
    DOLA_CPP_CAPTURE: conftest.py.)"""
    if not sys.platform.startswith("linux"):
        pytest.skip(f"'outputs' is expected on Linux; here: {_core.capture_mode()!r}")
    assert "DOLA_CPP_CAPTURE" not in os.environ
    assert _core.capture_mode() == "outputs"


PROBE = """
import json, sys
import dola_cpp
smol, gemma = sys.argv[1], sys.argv[2]
out = {"mode": dola_cpp._core.capture_mode()}
prompt = "The history of the Roman Empire spans more than a thousand years, from its founding to its fall"
m = dola_cpp.Model(smol, n_ctx=256, n_batch=8)  # a prompt in several chunks
for layers in ("high", "low", [15], [0, 30]):
    out[f"tokens {layers}"] = m.generate(prompt, max_tokens=8, ignore_eos=True, layers=layers).tokens
out["tokens activation"] = m.generate(prompt, max_tokens=8, ignore_eos=True, decoder="activation").tokens
out["tokens activation+high"] = m.generate(prompt, max_tokens=8, ignore_eos=True, layers="high",
                                           decoder="activation").tokens
for layers in ("high", [0, 12]):
    r = m.score("The capital of France is", " Paris, a city on the Seine.", layers=layers, relative_top=0.1)
    out[f"layers {layers}"] = r.premature_layers
    out[f"values score {layers}"] = [r.score] + r.token_scores.tolist() + r.jsd.tolist()
r = m.score("The capital of France is", " Paris, a city on the Seine.", decoder="activation")
out["values score activation"] = [r.score] + r.token_scores.tolist()
out["values layer_logits"] = m.layer_logits(prompt, [0, 7, 29, 30])[:, :512].tolist()
g = dola_cpp.Model(gemma, n_ctx=256, n_batch=8)
out["values gemma layer_logits"] = g.layer_logits(prompt, [0, 9, 18])[:, :512].tolist()  # 0: a later node
out["tokens gemma high"] = g.generate(prompt, max_tokens=8, ignore_eos=True, layers="high").tokens
print(json.dumps(out))
"""


def _probe(script, mode: str, *models) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "DOLA_CPP_CAPTURE"}
    if mode == "callback":
        env["DOLA_CPP_CAPTURE"] = "callback"
    r = subprocess.run([sys.executable, "-I", str(script), *map(str, models)], env=env, capture_output=True,
                       text=True, timeout=600, cwd=script.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out.pop("mode") == mode
    return out


@pytest.mark.hardware("linux")
def test_capture_modes_agree(smollm2_path, tmp_path):
    """The same tokens, scores, JSD, chosen layers and layer logits, for every decoder, on SmolLM2
    and on Gemma (whose layer 0 is the scaled embedding, a node after the embedding)."""
    if _core.capture_mode() != "outputs":
        pytest.skip("this build has only the callback capture (no graph-allocation hook)")
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    models = (smollm2_path, dola_cpp.demo_model_path("gemma3-270m"))
    a, b = _probe(script, "outputs", *models), _probe(script, "callback", *models)
    assert a.keys() == b.keys()
    for key in a:
        if key.startswith("values"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5, err_msg=key)
        else:
            assert a[key] == b[key], key


SPLITS = """
import json, sys
import dola_cpp
m = dola_cpp.Model(sys.argv[1], n_ctx=256, n_batch=8)
s = m._session
prompt = "The history of the Roman Empire spans more than a thousand years, from its founding to its fall"
m.generate(prompt, max_tokens=6, ignore_eos=True, layers="high")
out = {"mode": dola_cpp._core.capture_mode(), "k": len(m.resolve_layers("high").candidates),
       "generate": dict(s.timings())}
s.reset_timings()
m.score("The capital of France is", " Paris, a city on the Seine.", layers="high")
out["score"] = dict(s.timings())
print(json.dumps(out))
"""


@pytest.mark.hardware("linux")
@pytest.mark.parametrize("mode", ["outputs", "callback"])
def test_stops_per_token_in_each_mode(smollm2_path, tmp_path, mode):
    """docs/design.md's count of graph stops: with the layers kept as outputs, one per captured ubatch
    (at the fused final row); with the eval callback (DOLA_CPP_CAPTURE=callback, also on Linux),
    K + 1: one after each of the K candidate layers and one at the final row. Scoring takes the
    final logits from llama.cpp: no stop with outputs, K per ubatch with the callback."""
    if _core.capture_mode() != "outputs":
        pytest.skip("this build has only the callback capture (no graph-allocation hook)")
    script = tmp_path / "splits.py"
    script.write_text(SPLITS)
    out = _probe(script, mode, smollm2_path)
    k, gen, score = out["k"], out["generate"], out["score"]
    assert k == 8
    assert gen["n_captured_ubatches"] == 1 + 5  # the prompt's last chunk, then each decoded token
    per_token = 1 if mode == "outputs" else k + 1
    assert gen["n_capture_splits"] == gen["n_captured_ubatches"] * per_token
    assert score["n_captured_ubatches"] >= 1
    assert score["n_capture_splits"] == (0 if mode == "outputs" else k * score["n_captured_ubatches"])
