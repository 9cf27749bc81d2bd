"""The ``dola-cpp`` command line: commands through Typer's CliRunner, the chat's pieces and the
piped chat (in-process and as a subprocess). The chat in a real terminal: test_chat_terminal.py."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import dola_cpp
from dola_cpp.cli._app import app
from dola_cpp.cli._chat import Chat, Conversation, Exchange, risk_colour
from dola_cpp.cli._cli_utils import CLIError, Template, one_line, template_choice
from dola_cpp.cli._render import histogram, side_by_side, stats_line

# Short generations, one thread: the suite shares two cores with benchmarks.
FAST = ["--threads", "1"]
COMMANDS = ["run", "generate", "compare", "trace", "serve", "rpc-server", "info", "pull"]


@pytest.fixture()
def cli():
    """Invoke the app in-process (stdin is not a terminal there: the chat runs in batch mode)."""
    runner = CliRunner(env={"DOLA_CPP_DEBUG": None, "NO_COLOR": "1", "COLUMNS": "80"})

    def invoke(*args, input=None):
        return runner.invoke(app, [str(a) for a in args], input=input)

    return invoke


def single_error_line(result) -> str:
    """The one line a failed command prints (on stderr), checked to be one line and no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert "Traceback" not in result.output
    return lines[0]


# ---------------------------------------------------------------------------------- help


def test_root_help_lists_the_commands(cli):
    result = cli("--help")
    assert result.exit_code == 0
    for name in COMMANDS:
        assert re.search(rf"^\s+{name}\s", result.stdout, re.M), name
    assert "DOLA_CPP_DEBUG" in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_has_an_example(cli, command):
    result = cli(command, "--help")
    assert result.exit_code == 0
    assert "Examples:" in result.stdout
    assert f"$ dola-cpp {command}" in result.stdout


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"dola-cpp {dola_cpp.__version__}"


def test_package_exports_main():
    import dola_cpp.cli

    if getattr(dola_cpp.cli, "__file__", None) is None:
        pytest.skip("dola_cpp.cli is a namespace package in this editable install, made before "
                    "dola_cpp/cli/__init__.py existed: reinstall (pip install --no-build-isolation -ve .)")
    assert dola_cpp.cli.main is not None and dola_cpp.cli.app is app


# ---------------------------------------------------------------------------------- info


def test_info_shows_the_model_and_its_layer_sets(cli, smollm2_path):
    result = cli("info", smollm2_path)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert re.search(r"^architecture\s+llama$", out, re.M)
    assert re.search(r"^layers\s+30 blocks", out, re.M)
    assert re.search(r"^vocabulary\s+49152 tokens$", out, re.M)
    assert re.search(r"^quantization\s+Q4_1$", out, re.M)
    assert re.search(r"^context length\s+8192 tokens", out, re.M)
    assert re.search(r"^tied embeddings\s+yes$", out, re.M)
    assert re.search(r"^chat template\s+yes", out, re.M)
    assert "<|im_start|>" in out  # the template's first lines
    # tied embeddings: candidates start at 2 (transformers skips the embedding output)
    assert re.search(r"^--layers high\s+15,17,19,21,23,25,27,29 vs 30$", out, re.M)
    assert re.search(r"^--layers low\s+2,4,6,8,10,12,14 vs 30$", out, re.M)
    assert re.search(r"^--info-layer\s+24 \(Activation Decoding", out, re.M)


def test_info_json_matches_resolve_layers(cli, smollm2_path, smollm2):
    result = cli("info", smollm2_path, "--json")
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    for name in ("high", "low"):
        plan = smollm2.resolve_layers(name)
        assert facts["layers"][name] == {"candidates": list(plan.candidates), "mature": plan.mature}
    assert facts["n_layers"] == 30 and facts["n_vocab"] == 49152 and facts["tied_embeddings"] is True
    assert facts["chat_template_recognised"] is True


# ---------------------------------------------------------------------------------- generate


def test_generate_prints_the_completion(cli, smollm2_path):
    result = cli("generate", smollm2_path, "The capital of France is", "--template", "none", "--layers", "none",
                 "-n", 4, *FAST)
    assert result.exit_code == 0, result.output
    assert "Paris" in result.stdout
    assert result.stderr == ""


def test_generate_json_has_per_step_diagnostics(cli, smollm2_path):
    result = cli("generate", smollm2_path, "The capital of France is", "--template", "none", "-n", 6, "--json", *FAST)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    candidates = data["layers"]["candidates"]
    assert candidates == [15, 17, 19, 21, 23, 25, 27, 29] and data["layers"]["mature"] == 30
    assert data["repetition_penalty"] == 1.2
    assert 0 < len(data["tokens"]) <= 6
    assert [s["token"] for s in data["steps"]] == data["tokens"]
    assert "".join(s["piece"] for s in data["steps"]) == data["text"]
    for step in data["steps"]:
        assert step["premature_layer"] in candidates
        assert len(step["jsd"]) == len(candidates) and all(j >= 0 for j in step["jsd"])
        assert step["mature_logprob"] <= 0 and 0 < step["confidence"] <= 1
        assert step["entropy"] >= 0
    assert sum(data["layer_histogram"].values()) == len(data["tokens"])
    assert data["finish_reason"] in ("stop", "length")


def test_generate_premature_norm_changes_the_contrast(cli, smollm2_path):
    def steps(*extra):
        result = cli("generate", smollm2_path, "The capital of France is", "--template", "none", "-n", 4, "--json",
                     *extra, *FAST)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["steps"]

    raw, normed = steps("--raw"), steps()  # the command line normes premature layers by default
    assert [s["mature_logprob"] for s in raw][:1] == [s["mature_logprob"] for s in normed][:1]  # same mature layer
    assert [s["score"] for s in raw] != [s["score"] for s in normed]


@pytest.mark.parametrize("layers, decoder", [("none", "activation"), ("high", "activation_dola")])
def test_generate_json_with_activation_decoding(cli, smollm2_path, layers, decoder):
    result = cli("generate", smollm2_path, "The capital of France is", "--template", "none", "-n", 4, "--json",
                 "--decoder", "activation", "--layers", layers, "--alpha", "0.3", "--info-layer", "20", *FAST)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["decoder"] == decoder and data["alpha"] == 0.3 and data["info_layer"] == 20
    assert data["repetition_penalty"] == 1.2
    assert all(s["activation_entropy"] >= 0 for s in data["steps"])
    assert all((s["premature_layer"] is None) == (layers == "none") for s in data["steps"])


@pytest.mark.parametrize("args, message", [
    (["--info-layer", "30"], "Error: --info-layer: info_layer 30 is out of range: valid layers are 0..29"),
    (["--decoder", "sharp"], "Invalid value for '--decoder'"),
    (["--alpha", "-1"], "Invalid value for '--alpha'"),
])
def test_bad_activation_options_are_clear_errors(cli, smollm2_path, args, message):
    result = cli("generate", smollm2_path, "Hello", "--decoder", "activation", *args, "-n", 1, *FAST)
    assert result.exit_code in (1, 2)
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_generate_json_plain_has_no_premature_layers(cli, smollm2_path):
    result = cli("generate", smollm2_path, "Hello", "--template", "none", "--layers", "none", "-n", 3, "--json", *FAST)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["layers"]["candidates"] == [] and data["repetition_penalty"] == 1.0
    assert all(s["premature_layer"] is None and s["jsd"] == [] for s in data["steps"])


def test_low_repetition_penalty_is_a_one_line_note(cli, smollm2_path):
    # filterwarnings=error: a Python UserWarning escaping the CLI would fail this test
    result = cli("generate", smollm2_path, "Hello", "--rp", "1.0", "-n", 2, *FAST)
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("note: DoLa decoding is recommended with repetition_penalty >= 1.2")
    assert len(result.stderr.splitlines()) == 1


# ---------------------------------------------------------------------------------- errors


def test_missing_model_file_is_a_one_line_error(cli, tmp_path):
    result = cli("generate", tmp_path / "missing.gguf", "Hello")
    assert result.exit_code == 1
    assert single_error_line(result) == f"Error: model file not found: {tmp_path / 'missing.gguf'}"


def test_unknown_model_name_is_a_one_line_error(cli):
    result = cli("info", "no-such-model")
    assert result.exit_code == 1
    line = single_error_line(result)
    assert "'no-such-model' is neither a file nor a demo model name (smollm2, gemma3-270m)" in line


def test_not_a_gguf_file_is_a_one_line_error(cli, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_text("not a model\n")
    result = cli("info", bad)
    assert result.exit_code == 1
    assert "is not a GGUF model file" in single_error_line(result)


def test_debug_env_shows_the_traceback(tmp_path):
    runner = CliRunner(env={"DOLA_CPP_DEBUG": "1"})
    bad = tmp_path / "bad.gguf"
    bad.write_text("not a model\n")
    result = runner.invoke(app, ["info", str(bad)])
    assert result.exit_code == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("Error: ")


@pytest.mark.parametrize(
    "layers, code, message",
    [
        pytest.param("middle", 2, "'middle' is not a layer spec: use high, low, none", id="not-a-spec"),
        pytest.param("12,x", 2, "is not a layer spec", id="not-a-number"),
        pytest.param("99", 1, "Error: --layers 99: layer 99 is out of range: valid layers are 0..30", id="out-of-range"),
        pytest.param("16,30,30", 1, "layer 30 is both a premature candidate and the mature layer", id="mature-twice"),
    ],
)
def test_bad_layers_is_a_clear_error(cli, smollm2_path, layers, code, message):
    result = cli("generate", smollm2_path, "Hello", "--layers", layers, "-n", 1)
    assert result.exit_code == code
    assert message in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", ["generate", "compare"])
def test_empty_prompt_is_a_one_line_error(cli, smollm2_path, command):
    result = cli(command, smollm2_path, "  ")
    assert result.exit_code == 1
    assert single_error_line(result) == "Error: the prompt is empty"


def test_compare_with_plain_layers_shows_plain_and_activation(cli, smollm2_path):
    result = cli("compare", smollm2_path, "The capital of France is", "--template", "none", "--layers", "none",
                 "-n", 4, "--layout", "rows", *FAST)
    assert result.exit_code == 0, result.output
    titles = [line for line in result.stdout.splitlines() if line.startswith("── ")]
    assert [t.split(" (")[0] for t in titles] == ["── plain decoding", "── Activation Decoding"]


# ---------------------------------------------------------------------------------- pull


def test_pull_unknown_name_fails_cleanly(cli):
    result = cli("pull", "no-such-model")
    assert result.exit_code == 1
    line = single_error_line(result)
    assert "unknown model 'no-such-model'" in line and "smollm2" in line and "hf://" in line


def test_pull_malformed_hub_reference_fails_cleanly(cli):
    result = cli("pull", "hf://just-an-owner")
    assert result.exit_code == 1
    assert "is not of the form hf://owner/repo/file.gguf" in single_error_line(result)


def test_pull_cached_demo_model_prints_its_path(cli, smollm2_path):
    result = cli("pull", "smollm2")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(smollm2_path.resolve())


# ---------------------------------------------------------------------------------- compare


@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_compare_shows_plain_dola_and_activation_answers(cli, smollm2_path, layout):
    result = cli("compare", smollm2_path, "The capital of France is", "--template", "none", "-n", 4,
                 "--layout", layout, "--alpha", "0.7", "--info-layer", "20", *FAST)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Paris" in out
    if layout == "columns":  # COLUMNS=80: three 24-character columns
        lines = out.splitlines()
        assert lines[0].startswith("plain decoding") and lines[0].count(" │ ") == 2
        assert "│ DoLa (normed" in lines[0]
        assert all(len(line) <= 80 for line in lines)
        assert any(re.fullmatch(r"─+ │ ─+ │ ─+", line) for line in lines)
    else:
        titles = [line for line in out.splitlines() if line.startswith("── ")]
        assert len(titles) == 3
        assert titles[0].startswith("── plain decoding (repetition penalty 1.0)")
        assert titles[1].startswith("── DoLa (normed premature layers): layers 15,17,19,21,23,25,27,29 vs 30 (repetition penalty 1.2)")
        assert titles[2].startswith("── Activation Decoding (alpha 0.7, normed info layer 20) on plain decoding "
                                    "(repetition penalty 1.2)")


# ---------------------------------------------------------------------------------- piped chat


def test_run_with_piped_input_answers_each_line(cli, smollm2_path):
    # the second question only makes sense with the first exchange in the history
    result = cli("run", smollm2_path, "--layers", "none", "-n", 16, *FAST,
                 input="What is the capital of France?\n\nAnd of Germany?\n")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout
    assert "Paris" in lines[0] and "Berlin" in lines[1]
    assert ">>>" not in result.output and "tok/s" not in result.output


def test_run_piped_commands_and_multiline_block(cli, smollm2_path):
    script = "\n".join([
        "/set max_tokens 6",
        "/dola off",
        '"""',
        "Name a primary",
        "colour.",
        '"""',
        "/bye",
        "never asked",
    ]) + "\n"
    result = cli("run", smollm2_path, "-n", 200, *FAST, input=script)
    assert result.exit_code == 0, result.output
    assert len(result.stdout.strip().splitlines()) == 1  # one answer, then /bye
    assert "max_tokens = 6" in result.stderr and "plain decoding" in result.stderr


def test_run_piped_bad_command_exits_nonzero_but_goes_on(cli, smollm2_path):
    result = cli("run", smollm2_path, "--layers", "none", "-n", 8, *FAST,
                 input="/set layers 99\n/frobnicate\nWhat is the capital of France?\n")
    assert result.exit_code == 1
    assert "Error: layers 99: layer 99 is out of range" in result.stderr
    assert "Error: unknown command /frobnicate" in result.stderr
    assert "Paris" in result.stdout


def test_run_hints_premature_norm_once_when_raw_states_dominate(cli, smollm2_path):
    questions = "What is the capital of France?\nName three primary colors.\n"
    result = cli("run", smollm2_path, "--layers", "high", "--raw", "-n", 24, *FAST, input=questions)
    assert result.exit_code == 0, result.output
    assert result.stderr.count("was the premature layer for") == 1, result.stderr
    assert re.search(r"note: layer 29 was the premature layer for (9\d|100)% of tokens", result.stderr)
    result = cli("run", smollm2_path, "--layers", "high", "-n", 24, *FAST, input=questions)  # normed: the default
    assert result.exit_code == 0, result.output
    assert "premature layer for" not in result.stderr
    assert "Paris" in result.stdout


def test_run_without_template_uses_a_transcript(cli, smollm2_path):
    result = cli("run", smollm2_path, "--template", "none", "--layers", "none", "-n", 16, *FAST,
                 input="What is the capital of France?\n")
    assert result.exit_code == 0, result.output
    assert "Paris" in result.stdout and "User:" not in result.stdout


def test_run_piped_subprocess(smollm2_path, tmp_path):
    env = dict(os.environ, DOLA_CPP_CACHE=str(tmp_path))
    env.pop("DOLA_CPP_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "dola_cpp.cli", "run", str(smollm2_path), "--layers", "none", "-n", "16", *FAST],
        input="What is the capital of France?\nAnd of Germany?\n/bye\nnever asked\n",
        capture_output=True, text=True, timeout=300, env=env,
        cwd=tmp_path,  # not the source tree, whose dola_cpp/ has no compiled module
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stdout
    assert "Paris" in lines[0] and "Berlin" in lines[1]
    assert "\x1b[" not in proc.stdout and ">>>" not in proc.stdout
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr


@pytest.fixture(scope="session")
def no_template_path(smollm2_path, tmp_path_factory) -> Path:
    """SmolLM2 without its chat template, standing in for a base model such as gemma3-270m."""
    out = tmp_path_factory.mktemp("no-template") / "smollm2-no-template.gguf"
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", "--remove-metadata",
                    "tokenizer.chat_template", "--force", str(smollm2_path), str(out)], check=True, capture_output=True)
    return out


def test_run_without_a_chat_template_says_so_once(cli, no_template_path):
    result = cli("run", no_template_path, "--layers", "none", "-n", 12, *FAST,
                 input="What is the capital of France?\nAnd of Germany?\n")
    assert result.exit_code == 0, result.output
    assert result.stderr == "note: this model has no chat template; using a plain 'User: … / Assistant:' transcript\n"
    assert "Paris" in result.stdout and "User:" not in result.stdout


def test_model_without_a_chat_template(cli, no_template_path):
    result = cli("info", no_template_path)
    assert result.exit_code == 0, result.output
    assert re.search(r"^chat template\s+none", result.stdout, re.M)
    result = cli("generate", no_template_path, "Hello", "--template", "chat", "-n", 1)
    assert result.exit_code == 1
    assert "no chat template" in single_error_line(result)


# ---------------------------------------------------------------------------------- chat pieces


class _NoTemplate:
    chat_template = ""
    chat_template_supported = False


class _UnknownTemplate:
    chat_template = "{{ something llama.cpp has never seen }}"
    chat_template_supported = False


def test_template_fallback_is_announced():
    use, note = template_choice(_NoTemplate(), Template.auto)
    assert use is False and "no chat template" in note and "User:" in note
    use, note = template_choice(_UnknownTemplate(), Template.auto)
    assert use is False and "does not recognise" in note
    assert template_choice(_NoTemplate(), Template.none) == (False, None)
    for model in (_NoTemplate(), _UnknownTemplate()):
        with pytest.raises(CLIError, match="no chat template llama.cpp recognises"):
            template_choice(model, Template.chat)


def test_the_default_models_template_is_recognised(smollm2):
    assert smollm2.chat_template_supported
    assert template_choice(smollm2, Template.auto) == (True, None)


def test_transcript_format():
    conv = Conversation(_NoTemplate(), "Be brief.", use_template=False)
    text = conv.render("And Germany?", [Exchange("Capital of France?", "Paris.")])
    assert text == "Be brief.\n\nUser: Capital of France?\nAssistant: Paris.\nUser: And Germany?\nAssistant:"
    assert conv.stop == ["\nUser:"]


def test_conversation_drops_the_oldest_exchanges_to_fit(smollm2):
    conv = Conversation(smollm2, None, use_template=True)
    for i in range(3):
        conv.add(f"Question {i}?", f"Answer {i}.")
    keep_one = len(smollm2.tokenize(conv.render("Last?", conv.exchanges[2:])))
    text, ids, dropped = conv.prompt("Last?", budget=keep_one)
    assert ids == smollm2.tokenize(text)
    assert dropped == 2 and [e.user for e in conv.exchanges] == ["Question 2?"]
    assert "Question 2?" in text and "Question 1?" not in text
    with pytest.raises(CLIError, match="larger --ctx"):
        conv.prompt("word " * 200, budget=50)


def test_chat_set_commands_validate(smollm2):
    chat = Chat(smollm2, dola_cpp.DecodeConfig().replace(layers="high", premature_norm=True), interactive=False)
    assert chat.command("/set layers low") and chat.plan == smollm2.resolve_layers("low")
    assert chat.command("/set repetition_penalty 1.3") and chat.settings.repetition_penalty == 1.3
    assert chat.command("/set rp auto") and chat.settings.repetition_penalty is None
    assert chat.command("/set temperature 0.7") and chat.settings.temperature == 0.7
    assert chat.command("/set max-tokens 12") and chat.max_tokens == 12
    assert chat.command("/set premature_norm on") and chat.settings.dola.premature_norm
    assert chat.command("/set premature_norm off") and not chat.settings.dola.premature_norm
    assert chat.command("/dola off") and chat.plan.is_plain
    assert chat.command("/dola on") and chat.plan == smollm2.resolve_layers("low")
    assert chat.command("/set decoder activation") and chat.settings.decoder == "activation"
    assert chat.command("/set alpha 0.25") and chat.settings.activation.alpha == 0.25
    assert chat.command("/set info_layer 12") and chat.settings.activation.info_layer == 12
    assert chat.command("/set info_layer auto") and chat.settings.activation.info_layer is None
    assert "Activation Decoding (alpha 0.25, raw info layer 24) on DoLa" in chat._decoding()
    assert chat.command("/set decoder dola") and chat.settings.decoder == "dola"
    assert not chat.failed
    for bad in ("/set layers 99", "/set premature_norm maybe", "/set temperature hot", "/set top_p 2", "/set colour blue",
                "/dola maybe", "/set max_tokens 0", "/set top_k -1", "/set layer high", "/set decoder sharp",
                "/set alpha -1", "/set alpha x", "/set info_layer 30"):
        chat.failed = False
        assert chat.command(bad)  # reported, the chat goes on
        assert chat.failed, bad
    assert chat.plan == smollm2.resolve_layers("low")  # unchanged by the bad /set layers
    assert chat.command("/bye") is False


# ---------------------------------------------------------------------------------- rendering


def test_side_by_side_fits_the_width():
    text = side_by_side(("plain", "a " * 60), ("DoLa: layers 15,17 vs 30", "b " * 90), width=60)
    lines = text.splitlines()
    assert all(len(line) <= 60 for line in lines)
    assert all(" │ " in line or line.endswith(" │") for line in lines)
    assert lines[1].startswith("─" * 28)  # both texts start on the same row


def test_histogram_scales_to_the_most_chosen_layer():
    lines = histogram({15: 0, 17: 2, 29: 8}, width=8).splitlines()
    assert [line.split("│")[0].split()[-1] for line in lines] == ["15", "17", "29"]
    assert lines[2].split("│")[1].startswith("█" * 8)
    assert lines[1].split("│")[1].startswith("██ ")
    assert lines[2].rstrip().endswith("80.0%")


def test_stats_line_for_an_answer_interrupted_during_prefill():
    result = dola_cpp.GenerationResult(text="", tokens=[], steps=[], finish_reason="length", prompt_tokens=2810)
    assert stats_line(result, interrupted=True) == "interrupted while reading the prompt (2810 tokens)"


def test_one_line_error_messages():
    assert one_line(RuntimeError("could not download x:\nERROR: a\nERROR: No matching distribution")) == \
        "could not download x: … ERROR: No matching distribution"
    assert one_line(ValueError("")) == "ValueError"



# ---------------------------------------------------------------------------------- risk and traces


def test_generate_json_has_risk_and_eos_boost(cli, smollm2_path):
    result = cli("generate", smollm2_path, "What is the capital of France?", "--layers", "none", "-n", 12,
                 "--eos-boost", 4, "--json", *FAST)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["eos_boost"] == 4.0
    risks = [s["risk"] for s in data["steps"]]
    assert all(0 <= r <= 1 for r in risks) and data["risk"] == pytest.approx(sum(risks) / len(risks))


def test_generate_abstains_with_exit_status_3(cli, smollm2_path):
    args = ["generate", smollm2_path, "What is the capital of France?", "--layers", "none", "-n", 12, *FAST]
    result = cli(*args, "--abstain", 0.01)
    assert result.exit_code == 3 and result.stdout == ""
    assert re.match(r"abstained: the answer's risk reached 0\.\d\d \(> 0\.01\)", result.stderr)
    result = cli(*args, "--abstain", 1)
    assert result.exit_code == 0 and "Paris" in result.stdout
    result = cli(*args, "--abstain", 0)
    assert result.exit_code == 2 and "must be a risk in (0, 1]" in result.stderr


def test_run_piped_risk_display_and_abstaining(cli, smollm2_path):
    script = "\n".join(["What is the capital of France?", "/stats", "/set abstain 0.01", "Who are you?",
                        "/set abstain off", "/set show_risk off", "/set"])
    result = cli("run", smollm2_path, "--layers", "none", "-n", 16, "--show-risk", *FAST, input=script + "\n")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    # piped: the answers as plain text (no colours), the refusal in place of the second one
    assert "Paris" in lines[0] and "\x1b[" not in result.stdout
    assert lines[1].startswith("I'm not sure enough to answer that (risk 0.")
    assert re.search(r"last answer: \d+ tokens .* · risk 0\.\d\d", result.stderr)
    assert "[abstained: this question is not kept]" in result.stderr
    assert re.search(r"show_risk +off", result.stderr) and re.search(r"abstain +off", result.stderr)
    assert re.search(r"eos_boost +10\n", result.stderr)  # the chat's default (docs/decoders.md, "Answers that end")


def test_chat_show_risk_colours_tokens(smollm2, capsys):
    chat = Chat(smollm2, dola_cpp.DecodeConfig(), interactive=False, show_risk=True, max_tokens=12)
    chat.out.color = True  # as in a terminal
    chat.ask("What is the capital of France?")
    out = capsys.readouterr().out
    assert "Paris" in re.sub(r"\x1b\[[\d;]*m", "", out)
    colours = set(re.findall(r"\x1b\[(3[123])m", out))  # green, yellow, red
    assert colours and colours <= {"31", "32", "33"}
    # every token was coloured by its risk band: the answer line is coloured spans and the spaces
    # between them only, and each span's colour is a band of the tokens' risks (a span is a piece:
    # the text of the steps since the last one, coloured by the riskiest of them)
    answer = next(line for line in out.splitlines() if "Paris" in line)
    spans = re.findall(r"\x1b\[(3[123])m(.*?)\x1b\[0m", answer)
    outside = re.sub(r"\x1b\[3[123]m.*?\x1b\[0m", "", answer)
    assert spans and outside.strip() == "", repr(answer)
    code = {"green": "32", "yellow": "33", "red": "31"}
    bands = {code[risk_colour(step.risk)] for step in chat.last.steps}
    assert {colour for colour, _ in spans} <= bands
    assert code[risk_colour(max(step.risk for step in chat.last.steps))] in {colour for colour, _ in spans}
    assert "".join("".join(text for _, text in spans).split()) == "".join(chat.last.text.split())
    for step in chat.last.steps:
        assert 0 <= step.risk <= 1
    chat.show_risk = False
    chat.ask("What is the capital of France?")
    assert "\x1b[3" not in capsys.readouterr().out


@pytest.mark.parametrize("suffix", [".png", ".html"])
def test_trace_writes_a_picture(cli, smollm2_path, tmp_path, suffix):
    out = tmp_path / f"trace{suffix}"
    result = cli("trace", smollm2_path, "What is the capital of France?", "--out", out, "-n", 8, *FAST)
    assert result.exit_code == 0, result.output
    assert "tokens x 8 layers" in result.stdout
    data = out.read_bytes()
    if suffix == ".png":
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    else:
        text = data.decode()
        assert text.count(">■</td>") == int(re.search(r"\((\d+) tokens x", result.stdout).group(1))
        for layer in (15, 17, 29):
            assert f'<th class="lab">{layer}</th>' in text


@pytest.mark.parametrize("args, message", [
    (["--layers", "none"], "two or more candidate layers"),
    (["--layers", "15,30"], "two or more candidate layers"),
    (["--out", "trace.txt"], "write .png, .svg, .pdf or .html"),
])
def test_trace_bad_options_are_clear_errors(cli, smollm2_path, args, message):
    result = cli("trace", smollm2_path, "Hi", *args, *FAST)
    assert result.exit_code != 0 and message in result.output
