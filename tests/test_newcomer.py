"""What a newcomer meets in the first hour: importing from the checkout, strict inputs, errors
in the terms of the layer they typed into, offline Hub references, streams that say how they
ended."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import dola_cpp
from dola_cpp import DecodeConfig, PromptTooLongError
from dola_cpp.cli._app import app


@pytest.fixture()
def cli():
    runner = CliRunner(env={"DOLA_CPP_DEBUG": None, "NO_COLOR": "1", "COLUMNS": "100"})
    return lambda *args, input=None: runner.invoke(app, [str(a) for a in args], input=input)


def error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code != 0 and lines, result.output
    assert "Traceback" not in result.output
    return lines[-1]


def test_the_default_chat_answers_the_first_question(cli, smollm2_path):
    """`dola-cpp run` as the README's first command types it: the default model, DoLa high, the
    command line's default variant (normed premature layers)."""
    result = cli("run", "--layers", "high", input="What is the capital of France?\n")
    assert result.exit_code == 0, result.output
    assert "Paris" in result.stdout


def test_importing_the_source_folder_says_what_to_do(tmp_path):
    src = Path(dola_cpp.__file__).parent
    shutil.copytree(src, tmp_path / "dola_cpp", ignore=shutil.ignore_patterns("_core*", "__pycache__"))
    # a new user's first move: python in the repository root, before (or instead of) installing
    # (-S: without site-packages, where an install or an editable install's finder would be)
    r = subprocess.run([sys.executable, "-S", "-c", "import dola_cpp"], cwd=tmp_path, capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: dola_cpp's compiled core (_core) is not in")
    assert "pip install ." in last and "run from another folder" in last


@pytest.mark.parametrize("spec, message", [
    ("1,,2", "empty entry between commas"),
    ("", "empty layer spec"),
    ("  ", "empty layer spec"),
    ("20,15", "premature layer 20 is above the mature layer 15"),
    ("14,20,15", "premature layer 20 is above the mature layer 15"),
    ("high,30", "not a layer spec"),
])
def test_layer_specs_that_cannot_mean_anything_are_refused(smollm2, spec, message):
    with pytest.raises(ValueError, match=message):
        smollm2.resolve_layers(spec)


@pytest.mark.parametrize("spec, message", [
    ("1,,2", "empty entry between commas"),
    ("", "empty layer spec"),
])
def test_cli_refuses_bad_layer_syntax_before_loading(cli, spec, message):
    result = cli("generate", "no-such-model.gguf", "hi", "--layers", spec)
    assert result.exit_code == 2 and message in result.output


def test_cli_layer_range_errors_carry_the_option_name(cli, smollm2_path):
    line = error_line(cli("generate", smollm2_path, "hi", "--layers", "30,15", "--threads", "1"))
    assert line.startswith("Error: --layers 30,15: premature layer 30 is above the mature layer 15")


def test_cli_says_when_the_context_was_rounded(cli, smollm2_path):
    result = cli("generate", smollm2_path, "Hi", "--ctx", "1", "-n", "2", "--threads", "1", "--layers", "none")
    assert result.exit_code == 0, result.output
    assert "note: llama.cpp made the context 256 tokens (--ctx 1 asked for 1)" in result.stderr


def test_pull_of_a_local_file_is_an_error(cli, smollm2_path):
    line = error_line(cli("pull", smollm2_path))
    assert "is a local path: there is nothing to pull" in line


def test_too_long_prompt_speaks_in_each_layers_terms(cli, smollm2_path, smollm2):
    with pytest.raises(PromptTooLongError, match="create the Model with a larger n_ctx") as e:
        smollm2.generate("word " * 2000, max_tokens=1)
    assert e.value.n_ctx == smollm2.n_ctx
    line = error_line(cli("generate", smollm2_path, "word " * 400, "--ctx", "256", "--threads", "1"))
    assert "use a larger --ctx (e.g. --ctx" in line and "n_ctx" not in line


def test_invalid_utf8_prompt_is_a_clear_error(cli, smollm2_path, smollm2):
    bad = b"caf\xe9 au lait".decode("utf-8", "surrogateescape")  # as Python decodes such argv bytes
    with pytest.raises(ValueError, match=r"the prompt is not valid UTF-8: character 3 is an undecodable byte"):
        smollm2.generate(bad, max_tokens=1)
    line = error_line(cli("generate", smollm2_path, bad, "--threads", "1"))
    assert "not valid UTF-8" in line and "incompatible function arguments" not in line


@pytest.mark.parametrize("method", ["generate", "stream"])
def test_misspelled_option_names_the_method(smollm2, method):
    with pytest.raises(TypeError, match=rf"^Model\.{method}\(\) got an unexpected keyword argument 'layer'$"):
        getattr(smollm2, method)("hi", max_tokens=2, layer="high")


def test_misspelled_config_field_suggests_the_right_one():
    with pytest.raises(TypeError, match=r"DecodeConfig has no field 'layer'; did you mean 'layers'\?"):
        DecodeConfig().replace(layer="high")


def test_stream_checks_its_arguments_at_the_call(smollm2):
    with pytest.raises(ValueError, match="max_tokens"):
        smollm2.stream("hi", max_tokens=-1)
    with pytest.raises(ValueError, match="out of range"):
        smollm2.stream("hi", layers="40,45")


def test_stream_says_how_it_ended(smollm2):
    s = smollm2.stream("Count from 1 to 100:", max_tokens=3, ignore_eos=True)
    assert "".join(s) and s.finish_reason == "length" and len(s.result().tokens) == 3
    s = smollm2.stream("Count from 1 to 100:", max_tokens=50, ignore_eos=True)
    first = next(s)
    smollm2.cancel()
    rest = list(s)
    assert s.finish_reason == "cancelled" and s.result().finish_reason == "cancelled"
    # cancelled between two tokens: the next one is never made, and what was shown is the answer
    assert len(s.result().tokens) == 1 and first + "".join(rest) == s.result().text
    # the control: the same stream, not cancelled, runs to its budget
    whole = smollm2.stream("Count from 1 to 100:", max_tokens=50, ignore_eos=True)
    assert "".join(whole) and whole.finish_reason == "length" and len(whole.result().tokens) == 50
    assert whole.result().tokens[:1] == s.result().tokens


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["HF_HUB_OFFLINE", "unreachable"])
def test_offline_hub_reference_fails_fast_and_says_why(tmp_path, env):
    """A process as a user runs it: one error line, at once (the hang guard is the timeout)."""
    r = subprocess.run([sys.executable, "-I", "-m", "dola_cpp.cli", "pull", "hf://someone/repo/model.gguf"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, DOLA_CPP_CACHE=str(tmp_path), **env))
    assert r.returncode == 1
    assert "hf://someone/repo/model.gguf is not in the cache and" in r.stderr
    assert ("HF_HUB_OFFLINE is set" if "HF_HUB_OFFLINE" in env else "cannot be reached") in r.stderr


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "unreachable"])
def test_offline_hub_reference_waits_for_nothing_but_one_probe(tmp_path, monkeypatch, offline):
    """What "fast" means, counted instead of timed: offline, no probe at all; unreachable, one
    probe bounded by HUB_PROBE_SECONDS; never a download (only the local-files lookup)."""
    from huggingface_hub import constants

    from dola_cpp import hub

    probes, downloads = [], []
    reachable = hub.reachable
    monkeypatch.setattr(hub, "reachable", lambda url, timeout: probes.append((url, timeout)) or reachable(url, timeout))
    import huggingface_hub

    real_download = huggingface_hub.hf_hub_download

    def download(**kwargs):
        downloads.append(kwargs.get("local_files_only", False))
        return real_download(**kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setenv("DOLA_CPP_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(OSError, match="is not in the cache and"):
        hub.hf_model_path("hf://someone/repo/model.gguf")
    assert probes == ([] if offline else [("http://127.0.0.1:9", hub.HUB_PROBE_SECONDS)])
    assert downloads == [True]  # the cache lookup only


def test_early_exit_string_with_one_value_decodes_from_that_layer(smollm2):
    """The DoLa repo's --early-exit-layers with one value: plain decoding from that layer (this
    crashed the interpreter: the layer was never captured)."""
    prompt = "The capital of France is"
    z = smollm2.layer_logits(prompt, layers=[20])[0]
    r = smollm2.generate(prompt, max_tokens=3, layers="20", repetition_penalty=1.0)
    assert r.tokens[0] == int(np.argmax(z)) and r.steps[0].premature_layer is None
    s = smollm2.score(prompt, " Paris", layers="20")
    ids = smollm2.tokenize(prompt)
    lp = z - (z.max() + np.log(np.exp(z - z.max()).sum()))
    assert s.continuation_tokens and s.token_scores[0] == pytest.approx(lp[s.continuation_tokens[0]], abs=1e-3)
    static = smollm2.generate(prompt, max_tokens=3, layers="15,20")
    assert static.steps[0].premature_layer == 15 and len(ids) > 0
