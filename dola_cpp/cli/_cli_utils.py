"""Shared pieces of the command line: the one user-facing error type and its handler, reusable
options, the penalty note, the chat-template choice, and model loading."""

from __future__ import annotations

import functools
import inspect
import os
import sys
import traceback
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, TypeVar, Union

import typer
from typer.core import TyperGroup

from .. import (
    DEMO_MODELS, DecodeConfig, DolaError, LayerPlan, Model, PenaltyWarning,
    PromptTooLongError, json_schema_grammar, resolve_model,
)
from ..layers import parse_layer_string
from ..settings import SETTINGS, Setting, for_command
from ._help import (  # noqa: F401  (the panels, for the commands' own options)
    PANEL_DECODING, PANEL_ENGINE, PANEL_OUTPUT, PANEL_PROMPT, PANEL_SAMPLING, PANEL_STOPPING, DolaCommand,
)

DEBUG_ENV = "DOLA_CPP_DEBUG"


class CLIError(Exception):
    """A problem to report to the user in one line (no traceback)."""


# Library errors that mean "bad input" rather than "bug": reported like a CLIError. OSError covers
# FileNotFoundError, IsADirectoryError, permissions and PyPI/Hub download failures. Anything else
# (RuntimeError included) is a bug and keeps its traceback.
USER_ERRORS = (CLIError, DolaError, ValueError, TypeError, OSError)


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


# The training context of the model this process loaded (load_model), for the prompt-too-long hint.
_loaded = {"n_ctx_train": 0}


def too_long_hint(n_tokens: int, n_ctx: int, n_ctx_train: int = 0) -> str:
    """What to do about a prompt of ``n_tokens`` in a context of ``n_ctx``: a larger --ctx, at
    most the model's training context ``n_ctx_train`` (0 = unknown), or a shorter prompt."""
    head = f"the prompt has {n_tokens} tokens but the context holds {n_ctx}"
    suggest = 1 << max(8, (n_tokens + 256).bit_length())
    if n_ctx_train > 0:
        if n_tokens >= n_ctx_train or n_ctx >= n_ctx_train:
            return f"{head} and the model was trained on {n_ctx_train}; shorten the prompt"
        suggest = min(suggest, n_ctx_train)
        return (f"{head}; use a larger --ctx (e.g. --ctx {suggest}; the model was trained on {n_ctx_train}) "
                f"or shorten the prompt")
    return f"{head}; use a larger --ctx (e.g. --ctx {suggest}) or shorten the prompt"


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line, in the command line's terms: multi-line messages
    (e.g. pip's stderr) keep their first and last lines."""
    if isinstance(error, PromptTooLongError):
        return too_long_hint(error.n_tokens, error.n_ctx, _loaded["n_ctx_train"])
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} … {lines[-1]}"


def report_error(error: BaseException) -> None:
    if debug_enabled():
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    typer.echo(f"Error: {one_line(error)}", err=True)


class DolaGroup(TyperGroup):
    """The top-level group: every command (sub-apps included) runs inside this ``invoke``, so
    this is the one place where user errors become a one-line message and exit code 1."""

    def invoke(self, ctx: Any) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PenaltyWarning)  # the commands print it as a note
                return super().invoke(ctx)
        except (typer.Exit, typer.Abort, BrokenPipeError):
            raise  # click's control flow (RuntimeError subclasses) and `| head`, which Typer handles
        except USER_ERRORS as e:
            report_error(e)
            raise typer.Exit(1) from None


def examples(*commands: str) -> str:
    """A help epilog listing example commands (``\\b`` keeps click from re-wrapping them)."""
    return "\b\nExamples:\n" + "\n".join(f"  $ {c}" for c in commands)


# ---------------------------------------------------------------------------------------- choices


class Template(str, Enum):
    """How a prompt is turned into model input."""

    auto = "auto"  # the GGUF's chat template when it has one llama.cpp knows, else none
    chat = "chat"  # the chat template, an error if the model has none
    none = "none"  # raw text (generate/compare) or a plain User:/Assistant: transcript (run)


# a setting's choices (settings.Setting.choices) as the enum its option takes: --decoder's Decoder
CHOICES = {s.name: Enum(s.name.title().replace("_", ""), {c: c for c in s.choices}, type=str)
           for s in SETTINGS if s.choices}
Decoder = CHOICES["decoder"]


class Layout(str, Enum):
    auto = "auto"
    columns = "columns"
    rows = "rows"


# ---------------------------------------------------------------------------------------- options

_MODEL_HELP = (
    "A .gguf path, hf://owner/repo/file.gguf, or a demo model name ("
    + ", ".join(DEMO_MODELS)
    + ")."
)


def check_layer_syntax(value: Optional[str]) -> Optional[str]:
    """Reject what can never be a layer spec before loading the model; ranges are checked
    against the model once it is loaded."""
    if value is not None:
        try:
            parse_layer_string(value)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
    return value


def _check_positive(value: Optional[float]) -> Optional[float]:
    if value is not None and value <= 0:
        raise typer.BadParameter(f"must be > 0 (1.0 = no penalty), got {value:g}")
    return value


def _check_risk(value: Optional[float]) -> Optional[float]:
    if value is not None and not 0.0 < value <= 1.0:
        raise typer.BadParameter(f"must be a risk in (0, 1], got {value:g}")
    return value


ModelArg = Annotated[Optional[str], typer.Argument(metavar="MODEL", show_default=False,
                                                   help=_MODEL_HELP + " Default: the default demo model.")]
ModelRequiredArg = Annotated[str, typer.Argument(metavar="MODEL", help=_MODEL_HELP, show_default=False)]
PromptArg = Annotated[str, typer.Argument(metavar="PROMPT", help="The prompt text.", show_default=False)]
StopLoopsOpt = Annotated[bool, typer.Option(
    "--stop-loops/--no-stop-loops", rich_help_panel=PANEL_STOPPING,
    help="End an answer that repeats a cycle of 3 or more tokens a third time in a row.")]
# The command line, the chat's /set max_tokens and the server all refuse a budget of 0 tokens.
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", "-n", min=1, rich_help_panel=PANEL_STOPPING,
                                           help="Most tokens to generate per answer.")]
AbstainOpt = Annotated[Optional[float], typer.Option(
    "--abstain", callback=lambda v: _check_risk(v), rich_help_panel=PANEL_STOPPING, show_default=False,
    help="Say it is not sure instead of answering when the answer's risk exceeds this (0-1).")]
SystemOpt = Annotated[Optional[str], typer.Option("--system", "-s", metavar="TEXT", rich_help_panel=PANEL_PROMPT,
                                                  help="System prompt (with the chat template).")]
TemplateOpt = Annotated[Template, typer.Option("--template", rich_help_panel=PANEL_PROMPT,
                                               help="auto: the model's chat template if it has one; "
                                                    "chat: require it; none: no template.")]
CtxOpt = Annotated[int, typer.Option("--ctx", "-c", min=0, rich_help_panel=PANEL_ENGINE,
                                     help="Context size in tokens (0 = the model's training context; beyond it "
                                          "answers degrade).")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", min=1, rich_help_panel=PANEL_ENGINE,
                                                   show_default=False, help="CPU threads (default: all cores).")]
GpuLayersOpt = Annotated[int, typer.Option("--gpu-layers", "-ngl", rich_help_panel=PANEL_ENGINE,
                                           help="Layers to offload to the GPU (-1 = all, 0 = none).")]
RepackOpt = Annotated[bool, typer.Option("--repack/--no-repack", rich_help_panel=PANEL_ENGINE,
                                         help="Let llama.cpp repack weights for this CPU (AMX, CPU_REPACK); "
                                              "--no-repack keeps ggml's plain layout.")]
RpcOpt = Annotated[Optional[str], typer.Option(
    "--rpc", metavar="HOST:PORT,...", rich_help_panel=PANEL_ENGINE, show_default=False,
    help="Offload layers to ggml RPC servers: host:port[,host:port] (start them with `dola-cpp rpc-server`).")]
ShowRiskOpt = Annotated[bool, typer.Option("--show-risk", rich_help_panel=PANEL_OUTPUT,
                                           help="Colour each token by its risk (low, medium, high).")]
JsonOpt = Annotated[bool, typer.Option("--json", rich_help_panel=PANEL_OUTPUT, help="Print JSON instead of text.")]
GrammarFileOpt = Annotated[Optional[Path], typer.Option(
    "--grammar", metavar="FILE", rich_help_panel=PANEL_OUTPUT, show_default=False,
    help="Constrain the answer to a GBNF grammar (llama.cpp's format, start rule root) read from FILE.")]
JsonSchemaFileOpt = Annotated[Optional[Path], typer.Option(
    "--json-schema", metavar="FILE", rich_help_panel=PANEL_OUTPUT, show_default=False,
    help="Constrain the answer to JSON that the JSON schema in FILE describes.")]


# ---------------------------------------------------------------------------------------- decode options

# The checks an option runs as its callback instead of a min/max (settings.Setting.cli_check).
CHECKS: dict[str, Callable[[Any], Any]] = {"layers": check_layer_syntax, "positive": _check_positive}

# A command's parameter ``decode: DecodeOptions = DECODE_OPTIONS`` is where decode_options puts
# the table's options; the command gets their values as one dict, by setting name.
DecodeOptions = dict[str, Any]
DECODE_OPTIONS: Any = object()
_F = TypeVar("_F", bound=Callable[..., Any])


def decode_option(setting: Setting, command: str) -> tuple[Any, Any]:
    """``setting`` as ``command``'s option: its annotation (``Annotated[type, typer.Option]``)
    and its default, both from the table (``dola_cpp.settings``)."""
    shown = setting.cli[command]
    default = setting.default_on(command)
    kind: Any = CHOICES.get(setting.name, setting.type)
    extra: dict[str, Any] = {}
    if setting.metavar:
        extra["metavar"] = setting.metavar
    if setting.cli_check:
        extra["callback"] = CHECKS[setting.cli_check]
    else:
        if setting.low is not None:
            extra["min"] = setting.type(setting.low)
        if setting.high is not None:
            extra["max"] = setting.type(setting.high)
    if default is None:
        kind, extra["show_default"] = Optional[kind], False
    elif setting.choices:
        default = kind(default)
    option = typer.Option(*(shown.flags or setting.flags), rich_help_panel=setting.panel,
                          help=shown.help or setting.help, **extra)
    return Annotated[kind, option], default


def decode_options(command: str) -> Callable[[_F], _F]:
    """Give ``command`` (its name on the command line: ``"generate"``, ``"eval factor"``) the
    table's options for it, in the place of its parameter ``decode``, which receives their
    values as a dict by setting name (an enum's value for ``--decoder``)."""
    settings = for_command(command)

    def wrap(fn: _F) -> _F:
        sig = inspect.signature(fn, eval_str=True)
        own = list(sig.parameters.values())
        at = [p.name for p in own].index("decode")
        made = []
        for s in settings:
            annotation, default = decode_option(s, command)
            made.append(inspect.Parameter(s.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default,
                                          annotation=annotation))
        params = own[:at] + made + own[at + 1:]

        @functools.wraps(fn)
        def run_command(**kwargs: Any) -> Any:
            decode = {s.name: kwargs.pop(s.name) for s in settings}
            decode = {k: v.value if isinstance(v, Enum) else v for k, v in decode.items()}
            return fn(**kwargs, decode=decode)

        run_command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        run_command.__annotations__ = {p.name: p.annotation for p in params}
        return run_command  # type: ignore[return-value]

    return wrap


# ---------------------------------------------------------------------------------------- settings


def note_penalty(config: DecodeConfig, plan: LayerPlan) -> None:
    """The library's repetition-penalty warning, as the command line's one-line note."""
    note = config.penalty_note(plan)
    if note:
        typer.echo(f"note: {note}", err=True)


# ---------------------------------------------------------------------------------------- constraints


def _read_text(path: Path, option: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"{option} {path}: cannot read it ({e.strerror if isinstance(e, OSError) else e})") from None


def constraint_grammar(model: Model, grammar_file: Optional[Path], json_schema_file: Optional[Path]) -> str:
    """The grammar ``--grammar FILE`` or ``--json-schema FILE`` gives ("" for neither), checked
    against the model: a file that cannot be read, a schema the converter cannot use and a grammar
    llama.cpp cannot parse are one line each, naming the option, the file and why."""
    if grammar_file is not None and json_schema_file is not None:
        raise CLIError("give --grammar or --json-schema, not both")
    if json_schema_file is not None:
        try:
            grammar = json_schema_grammar(_read_text(json_schema_file, "--json-schema"))
        except ValueError as e:
            raise CLIError(f"--json-schema {json_schema_file}: {_one_line(str(e))}") from None
        option, path = "--json-schema", json_schema_file
    elif grammar_file is not None:
        grammar, option, path = _read_text(grammar_file, "--grammar"), "--grammar", grammar_file
    else:
        return ""
    try:
        model.check_grammar(grammar)
    except ValueError as e:
        raise CLIError(f"{option} {path}: {_one_line(str(e))}") from None
    return grammar


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


# ---------------------------------------------------------------------------------------- loading


def model_path(ref: Optional[str]) -> Path:
    """Resolve a model reference, downloading demo models and Hub files (progress on stderr)."""
    path = resolve_model(ref, progress=lambda msg: typer.echo(msg, err=True))
    if not path.exists():
        if "/" in str(ref) or os.sep in str(ref) or str(ref).endswith(".gguf"):
            raise CLIError(f"model file not found: {path}")
        raise CLIError(f"{ref!r} is neither a file nor a demo model name ({', '.join(DEMO_MODELS)}); "
                       f"give a .gguf path or hf://owner/repo/file.gguf")
    return path


def load_model(ref: Optional[str], ctx: int = 2048, threads: Optional[int] = None, gpu_layers: int = -1,
               repack: bool = True, rpc: Optional[str] = None, kv_type: Optional[str] = None) -> Model:
    """The model for a command, with a note when llama.cpp changed the context size and a warning
    when the context is larger than the one the model was trained on."""
    extra = {} if kv_type is None else {"kv_type": kv_type}
    m = Model(model_path(ref), n_ctx=ctx, n_threads=threads, n_gpu_layers=gpu_layers, repack=repack, rpc=rpc,
              **extra)
    if ctx and m.n_ctx != ctx:
        typer.echo(f"note: llama.cpp made the context {m.n_ctx} tokens (--ctx {ctx} asked for {ctx})", err=True)
    _loaded["n_ctx_train"] = m.n_ctx_train
    warning = beyond_training_warning(m.n_ctx, m.n_ctx_train)
    if warning:
        typer.echo(f"warning: {warning}", err=True)
    return m


def beyond_training_warning(n_ctx: int, n_ctx_train: int) -> Optional[str]:
    """What a context larger than the model's training context means, or None."""
    if n_ctx_train <= 0 or n_ctx <= n_ctx_train:
        return None
    return (f"a context of {n_ctx} tokens is larger than the {n_ctx_train} the model was trained on; "
            f"answer quality degrades beyond {n_ctx_train} tokens of prompt and answer")


def decode_config(model: Model, **fields: Any) -> DecodeConfig:
    """A DecodeConfig from command-line values (an enum's value for ``decoder``), with the info
    layer checked against the loaded model."""
    if isinstance(fields.get("decoder"), Enum):
        fields["decoder"] = fields["decoder"].value
    config = DecodeConfig().replace(**fields)
    if config.uses_activation:
        try:
            config.activation.resolve_info_layer(model.n_layers)
        except ValueError as e:
            raise CLIError(f"--info-layer: {e}") from None
    return config


def layer_plan(model: Model, layers: str, label: str = "--layers") -> LayerPlan:
    """``--layers`` (or the chat's ``/set layers``) checked against the loaded model."""
    try:
        return model.resolve_layers(layers)
    except (ValueError, TypeError) as e:
        raise CLIError(f"{label} {layers}: {e}") from None


def template_choice(model: Model, template: Template) -> tuple[bool, Optional[str]]:
    """Whether to use the GGUF's chat template, and a note for the user when falling back."""
    if template is Template.none:
        return False, None
    if model.chat_template_supported:
        return True, None
    if template is Template.chat:
        raise CLIError("this model has no chat template llama.cpp recognises in its GGUF; use --template none")
    why = "has no chat template" if not model.chat_template else "has a chat template llama.cpp does not recognise"
    return False, f"this model {why}; using a plain 'User: … / Assistant:' transcript"


def prompt_text(model: Model, prompt: str, template: Template,
                system: Optional[str] = None) -> tuple[Union[str, list[int]], bool]:
    """The model input for a one-shot prompt and whether the chat template was applied: with it,
    token ids in which the prompt is text (``Model.chat_tokens``); without it, the prompt as it is
    (a raw prompt, whose special-token text is parsed)."""
    if not prompt.strip():
        raise CLIError("the prompt is empty")
    use_template, _ = template_choice(model, template)
    if use_template:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return model.chat_tokens(messages, template=True), True
    if system:
        typer.echo("note: --system needs the chat template; ignored", err=True)
    return prompt, False
