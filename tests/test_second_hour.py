"""What a new user meets after the first answer: one token-budget rule on every command, docs
and help pages in the project's own words, the install as the README states it, help pages
grouped by what the options control, and the edges of --ctx, the error class and the config
messages."""

import re
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import dola_cpp
from dola_cpp import DecodeConfig, DolaConfig, _core
from dola_cpp.cli._app import app
from dola_cpp.cli._chat import Chat, Conversation
from dola_cpp.cli._cli_utils import (
    PANEL_SAMPLING, CLIError, DolaCommand, beyond_training_warning, too_long_hint,
)
from dola_cpp.cli._help import range_in_words, value_name

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--threads", "1"]


@pytest.fixture()
def cli():
    runner = CliRunner(env={"DOLA_CPP_DEBUG": None, "NO_COLOR": "1", "COLUMNS": "100"})

    def invoke(*args, input=None):
        return runner.invoke(app, [str(a) for a in args], input=input)

    return invoke


def _help(cli, *command: str) -> str:
    result = cli(*command, "--help")
    assert result.exit_code == 0, result.output
    return result.stdout


def _sections(page: str) -> dict[str, str]:
    """A help page's sections (``Decoding options:`` …) and their text, without the examples."""
    parts = re.split(r"^(\S[^\n]*):\n", page.split("\n  Examples:")[0], flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


# every command and sub-command with a help page
COMMANDS = [["run"], ["generate"], ["compare"], ["trace"], ["serve"], ["info"], ["rpc-server"], ["pull"],
            ["eval"], ["eval", "tfqa-mc"], ["eval", "factor"], ["eval", "selective"]]


# ------------------------------------------------------------------ one token-budget rule


@pytest.mark.parametrize("command", ["generate", "compare", "trace"])
def test_a_budget_of_zero_tokens_is_refused_before_loading(cli, command):
    result = cli(command, "no-such-model", "Hi", "--max-tokens", "0")
    assert result.exit_code == 2
    assert "'--max-tokens'" in result.stderr and "1" in result.stderr.splitlines()[-1]
    assert "Traceback" not in result.output and result.stdout == ""


def test_the_chat_refuses_a_zero_budget_too(cli, smollm2):
    assert cli("run", "no-such-model", "-n", "0").exit_code == 2
    chat = Chat(smollm2, DecodeConfig(), interactive=False)
    assert chat.command("/set max_tokens 0") and chat.failed and chat.max_tokens != 0


def test_a_budget_of_one_token_generates_one(cli, smollm2_path):
    result = cli("generate", smollm2_path, "The capital of France is", "--template", "none", "--layers", "none",
                 "-n", "1", "--json", *FAST)
    assert result.exit_code == 0, result.output
    assert '"tokens": [' in result.stdout and len(re.findall(r'"token": \d+', result.stdout)) == 1


# ------------------------------------------------------------------ words a user can resolve

# phrases that speak of how the project was made rather than of the project
_UNRESOLVABLE = re.compile(r"\bseed 0\d\d\b|\bseed 0\d\d's|this session|earlier sessions|the issue's|\bissues? #\d+"
                           r"|lent a device|no GPU this", re.I)


def _docs() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "dola_cpp").rglob("*.py"))]
    files += sorted(p for p in (ROOT / "benchmarks").glob("*") if p.suffix in (".py", ".md", ".sh"))
    return [p for p in files if p.exists()]


def test_docs_and_code_speak_of_the_project_only():
    assert (ROOT / "README.md").exists()
    found = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
             for p in _docs() for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
             if _UNRESOLVABLE.search(line)]
    assert not found, "\n".join(found)


def test_help_pages_speak_of_the_project_only(cli):
    for command in COMMANDS:
        assert not _UNRESOLVABLE.search(_help(cli, *command)), command


# ------------------------------------------------------------------ install


def test_the_venv_is_ignored_by_git():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for path in (".venv/", ".venv/bin/python"):
        r = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "--no-index", path])
        assert r.returncode == 0, f"{path} is not ignored"


def test_the_readme_installs_once_and_states_the_measured_time():
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"^```bash\n(.*?)^```", readme, re.S | re.M)[1]
    installs = [line for line in first_block.splitlines() if "pip install" in line and not line.startswith("#")]
    assert installs
    for line in installs:  # each install is a whole recipe from a new venv: none builds the wheel a second time
        assert line.startswith("python3 -m venv") and line.count("pip install") == 1, line
    assert "≈2 minutes" not in readme
    flat = " ".join(readme.split())
    stated = re.search(r"Measured on a fresh checkout in a new venv \(\d{4}-\d\d-\d\d, 2-core AMD EPYC VM\): "
                       r"`pip install '\.\[test\]'` took \d+ min \d+ s.{0,40}; `pip install \.` took \d+ min \d+ s", flat)
    assert stated, "the README states the measured install times with their date and machine"


# ------------------------------------------------------------------ help pages


@pytest.mark.parametrize("command, panels", [
    ("run", {"Decoding options": ["--layers", "--premature-norm / --raw", "--decoder", "--alpha", "--info-layer",
                                  "--repetition-penalty"],
             "Sampling options": ["--temperature", "--top-k", "--top-p", "--seed"],
             "Stopping options": ["--max-tokens", "--eos-boost", "--abstain"],
             "Prompt options": ["--system", "--template"],
             "Engine options": ["--ctx", "--threads", "--gpu-layers", "--repack / --no-repack", "--rpc"],
             "Output options": ["--show-risk"]}),
    ("generate", {"Decoding options": ["--layers", "--decoder"],
                  "Sampling options": ["--temperature", "--seed"],
                  "Stopping options": ["--max-tokens", "--eos-boost", "--abstain", "--stop"],
                  "Prompt options": ["--system", "--template"],
                  "Engine options": ["--ctx", "--threads", "--gpu-layers", "--rpc"],
                  "Output options": ["--json"]}),
])
def test_run_and_generate_group_their_options(cli, command, panels):
    sections = _sections(_help(cli, command))
    titles = [t for t in sections if t.endswith("options")]
    assert titles[:len(panels)] == list(panels), titles  # in this order, one block each
    for title, options in panels.items():
        for option in options:
            assert re.search(rf"(^|, |\s){re.escape(option)}\b", sections[title], re.M), (title, option)
            others = [t for t in titles if t != title and re.search(rf"\s{re.escape(option)}\b", sections[t])]
            assert not others, (option, others)


def test_usage_lines_and_values_read_as_words(cli):
    assert "Usage: dola-cpp generate [OPTIONS] MODEL PROMPT\n" in _help(cli, "generate")
    assert "Usage: dola-cpp run [OPTIONS] [MODEL]\n" in _help(cli, "run")
    for command in COMMANDS:
        page = _help(cli, *command)
        for typer_notation in ("{model}", "{prompt}", "<str>", "<int", "<float", "range>", "x>=", "<=x", "[0, )"):
            assert typer_notation not in page, (command, typer_notation)
    page = _help(cli, "generate")
    assert re.search(r"^\s+MODEL\s+A \.gguf path", page, re.M)
    flat = " ".join(page.split())  # as read, whatever the wrapping
    assert "-n, --max-tokens N Most tokens to generate per answer. [default: 256; at least 1]" in flat
    assert "--top-p X Nucleus sampling threshold. [default: 1.0; 0 to 1]" in flat


def test_the_command_list_gives_whole_sentences(cli):
    page = _help(cli)
    commands = page.split("Commands:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert len(commands) >= 9
    for line in commands:
        name, summary = line.split(None, 1)
        assert summary.endswith(".") and not summary.endswith("..."), line
    eval_page = _help(cli, "eval")
    for line in eval_page.split("Commands:\n", 1)[1].strip().splitlines():
        assert line.rstrip().endswith(".") and not line.rstrip().endswith("..."), line


def test_eval_tfqa_mc_has_raw_and_shows_its_layers_default(cli, tmp_path):
    sections = _sections(_help(cli, "eval", "tfqa-mc"))
    decoding = sections["Decoding options"]
    assert "--premature-norm / --raw" in decoding and "[default: raw]" in decoding
    assert re.search(r"--layers LAYERS\s+.*Default: none\s+\(plain decoding\)", decoding, re.S)
    # --raw is an option there (the data error comes after the options were parsed)
    for flag in ("--raw", "--premature-norm"):
        result = cli("eval", "tfqa-mc", "no-such-model", flag, "--data", tmp_path / "missing.csv")
        assert "No such option" not in result.output and result.exit_code == 1, result.output


def test_a_panel_is_one_argument_away():
    """A new option joins a panel with ``rich_help_panel=`` alone."""
    toy = typer.Typer(rich_markup_mode=None)

    @toy.command(cls=DolaCommand)
    def sample(dry_like: float = typer.Option(0.0, "--dry-like", rich_help_panel=PANEL_SAMPLING, help="A knob."),
               other: int = typer.Option(1, "--other", help="Another.")) -> None:
        pass

    @toy.command()
    def unused() -> None:
        pass

    result = CliRunner(env={"COLUMNS": "100"}).invoke(toy, ["sample", "--help"])
    assert result.exit_code == 0, result.output
    sections = _sections(result.stdout)
    assert "--dry-like X" in sections["Sampling options"] and "--dry-like" not in sections["Options"]
    assert "--other N" in sections["Options"]


@pytest.mark.parametrize("text, words", [
    ("x>=0", "at least 0"), ("x>=0.0", "at least 0"), ("x>=1", "at least 1"), ("x<=5", "at most 5"),
    ("0.0<=x<=1.0", "0 to 1"), ("1<=x<=65535", "1 to 65535"), ("0<x<=1", "more than 0, at most 1"),
    ("x>=0.001", "at least 0.001"), ("default: 3", None),
])
def test_ranges_in_words(text, words):
    assert range_in_words(text) == words


@pytest.mark.parametrize("typed, name", [
    ("<int range>", "N"), ("INTEGER RANGE", "N"), ("<float>", "X"), ("FLOAT RANGE", "X"), ("<str>", "TEXT"),
    ("TEXT", "TEXT"), ("<auto|chat|none>", "auto|chat|none"), ("[auto|chat|none]", "auto|chat|none"),
    ("<path>", "PATH"),
])
def test_value_names(typed, name):
    assert value_name(typed) == name


def test_python_m_dola_cpp_is_the_command_line(tmp_path):
    env = {"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path), "NO_COLOR": "1"}
    r = subprocess.run([sys.executable, "-m", "dola_cpp", "--version"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"dola-cpp {dola_cpp.__version__}"
    r = subprocess.run([sys.executable, "-m", "dola_cpp", "pull", "no-such-model"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("Error: unknown model 'no-such-model'"), r.stderr


# ------------------------------------------------------------------ smaller edges


def test_a_context_beyond_the_training_context_warns(cli, smollm2_path, smollm2):
    n_train = smollm2.n_ctx_train
    assert n_train > 0
    result = cli("generate", smollm2_path, "Hi", "--ctx", 2 * n_train, "-n", 1, "--layers", "none", *FAST)
    assert result.exit_code == 0, result.output
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and f"larger than the {n_train} the model was trained on" in warning[0], result.stderr
    assert "degrades" in warning[0]
    quiet = cli("generate", smollm2_path, "Hi", "--ctx", 512, "-n", 1, "--layers", "none", *FAST)
    assert quiet.exit_code == 0 and "warning:" not in quiet.stderr, quiet.stderr


def test_beyond_training_warning():
    assert beyond_training_warning(8192, 8192) is None and beyond_training_warning(2048, 8192) is None
    assert beyond_training_warning(100000, 0) is None  # a model that does not say
    assert "larger than the 8192" in beyond_training_warning(100000, 8192)


def test_too_long_hint_suggests_at_most_the_training_context():
    assert too_long_hint(3000, 1024, 8192).endswith(
        "use a larger --ctx (e.g. --ctx 4096; the model was trained on 8192) or shorten the prompt")
    assert "e.g. --ctx 8192;" in too_long_hint(7000, 4096, 8192)  # not 8192 rounded up to 16384
    beyond = too_long_hint(9000, 1024, 8192)
    assert "--ctx" not in beyond and beyond.endswith("the model was trained on 8192; shorten the prompt")
    assert "--ctx" not in too_long_hint(9000, 8192, 8192)
    assert too_long_hint(3000, 1024).endswith("use a larger --ctx (e.g. --ctx 4096) or shorten the prompt")


def test_the_prompt_too_long_error_names_the_training_context(cli, smollm2_path, smollm2):
    n_train = smollm2.n_ctx_train
    result = cli("generate", smollm2_path, "word " * 600, "--ctx", 256, "--template", "none", *FAST)
    line = result.stderr.strip().splitlines()[-1]
    assert result.exit_code == 1 and line.startswith("Error: the prompt has "), result.output
    assert f"the model was trained on {n_train}" in line and "--ctx 1024" in line
    result = cli("generate", smollm2_path, "word " * (n_train + 10), "--ctx", 256, "--template", "none", *FAST)
    line = result.stderr.strip().splitlines()[-1]
    assert line.endswith(f"the model was trained on {n_train}; shorten the prompt"), line


def test_the_chat_suggests_at_most_the_training_context(smollm2):
    conv = Conversation(smollm2, None, use_template=True)
    with pytest.raises(CLIError, match=rf"larger --ctx \(at most {smollm2.n_ctx_train}, the model's training"):
        conv.prompt("word " * 200, budget=50)


def test_core_errors_are_dola_errors_by_name(tmp_path):
    assert _core.Error is dola_cpp.DolaError and issubclass(dola_cpp.DolaError, ValueError)
    assert f"{dola_cpp.DolaError.__module__}.{dola_cpp.DolaError.__qualname__}" == "dola_cpp.DolaError"
    assert f"{dola_cpp.Cancelled.__module__}.{dola_cpp.Cancelled.__qualname__}" == "dola_cpp.Cancelled"
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 60)
    with pytest.raises(dola_cpp.DolaError) as e:
        dola_cpp.Model(bad)
    assert traceback.format_exception_only(type(e.value), e.value)[0].startswith("dola_cpp.DolaError: ")
    assert repr(e.value).startswith("DolaError(")
    r = subprocess.run([sys.executable, "-c", f"import dola_cpp; dola_cpp.Model({str(bad)!r})"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("dola_cpp.DolaError: "), r.stderr
    assert "_core.Error" not in r.stderr


@pytest.mark.parametrize("changes, message", [
    ({"temperature": -1}, "temperature must be >= 0, got -1"),
    ({"eos_boost": -0.5}, "eos_boost must be >= 0, got -0.5"),
    ({"repetition_penalty": 0}, "repetition_penalty must be > 0, got 0"),
    ({"alpha": -1}, "alpha must be >= 0, got -1"),
    ({"temperature": float("inf")}, "temperature must be a finite number, got inf"),
    ({"alpha": float("nan")}, "alpha must be a finite number, got nan"),
    ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
    ({"relative_top": 1.0}, "relative_top must be in [0, 1), got 1.0"),
])
def test_config_messages_state_the_bound(changes, message):
    with pytest.raises(ValueError) as e:
        DecodeConfig().replace(**changes)
    assert str(e.value) == message
    assert ", )" not in str(e.value)


def test_no_config_message_has_an_open_ended_interval():
    for name in ("temperature", "eos_boost", "repetition_penalty", "alpha"):
        with pytest.raises(ValueError) as e:
            DecodeConfig().replace(**{name: -2})
        assert re.fullmatch(rf"{name} must be >=? 0, got -2", str(e.value)), str(e.value)
    with pytest.raises(ValueError, match=r"^relative_top must be in \[0, 1\), got -1$"):
        DolaConfig(relative_top=-1)
