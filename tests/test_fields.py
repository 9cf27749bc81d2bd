"""The decode settings' table (``dola_cpp.settings``) against every surface that shows a setting:
``DecodeConfig`` and its checks, the core's ``DecodeParams`` (the running extension) and its stub,
``Model.generate``/``stream``, each command's options, the chat's ``/set`` and the server's
request schema. A surface made from the table is checked for what it was made into; one written
beside it (``Model``'s keywords, the stub) for agreeing with it. The checkers are also run on a
surface made to disagree, so that one that can no longer fail is noticed."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import typing
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from dola_cpp import DecodeConfig, Model, _core
from dola_cpp import model as model_module
from dola_cpp.cli._app import app as cli_app
from dola_cpp.cli._chat import HELP, SET_WORDS, Chat
from dola_cpp.cli._cli_utils import decode_options
from dola_cpp.cli._help import PANELS
from dola_cpp.config import ActivationConfig, DolaConfig
from dola_cpp.layers import LayerPlan
from dola_cpp.settings import BY_NAME, DECODERS, INT32_MAX, SETTINGS, Setting, for_command, served
from dola_cpp.synthetic import write_llama_gguf

ROOT = Path(__file__).resolve().parent.parent
N_LAYER = 4


def _value_of(config: DecodeConfig, s: Setting):
    return getattr(getattr(config, s.group) if s.group else config, s.name)


def _other(s: Setting):
    """A valid value of ``s`` other than its default."""
    if s.type is bool:
        return not s.default
    if s.choices:
        return next(c for c in s.choices if c != s.default)
    if s.type is tuple:
        return ("x", "yz")
    if s.type is dict:
        return {1: 2.5}
    if s.name == "layers":
        return "low"
    if s.name == "grammar":
        return 'root ::= "yes" | "no"'

    low = 0.0 if s.low is None else s.low
    if s.type is int:
        return int(low) + 1
    return low + 0.25 if s.high is None or low + 0.25 < s.high else (low + s.high) / 2


# ---------------------------------------------------------------------------------- the table


def test_the_table_holds_decode_configs_fields_with_their_defaults():
    own = [f.name for f in dataclasses.fields(DecodeConfig) if f.name not in ("dola", "activation")]
    for group, names in (("dola", [f.name for f in dataclasses.fields(DolaConfig)]),
                         ("activation", [f.name for f in dataclasses.fields(ActivationConfig)]), ("", own)):
        assert sorted(s.name for s in SETTINGS if s.group == group) == sorted(names), group
    config = DecodeConfig()
    for s in SETTINGS:
        assert _value_of(config, s) == s.default, s.name
    assert BY_NAME["decoder"].choices == DECODERS


def test_each_setting_shown_on_the_command_line_says_how():
    for s in SETTINGS:
        assert bool(s.cli) == bool(s.flags) == bool(s.help) == bool(s.panel), s.name
        if s.cli:
            assert s.panel in PANELS, s.name
        assert not s.chat or s.chat[0] == s.name, s.name


# ---------------------------------------------------------------------------------- the core


def _core_members() -> set[str]:
    return {a for a in dir(_core.DecodeParams()) if not a.startswith("_")}


def test_every_setting_maps_to_members_of_the_cores_decode_params():
    members = _core_members()
    for s in SETTINGS:
        assert set(s.core_members) <= members, (s.name, s.core_members)
    # and each member is some setting's (candidates and mature: the layer plan's)
    assert set().union(*(s.core_members for s in SETTINGS)) == members


def test_the_stub_declares_every_member_of_decode_params():
    stub = (ROOT / "dola_cpp" / "_core.pyi").read_text()
    block = stub[re.search(r"^class DecodeParams\b.*:$", stub, re.M).start():]
    block = block[:block.index("\nclass ")]
    declared = set(re.findall(r"^    (\w+): ", block, re.M))
    assert declared == _core_members()


def test_to_core_copies_each_setting_the_core_takes_as_it_is():
    copied = [s for s in SETTINGS if not s.derived and s.core_members]
    values = {s.name: _other(s) for s in copied}
    p = DecodeConfig().replace(**values).to_core(LayerPlan((1, 2), N_LAYER), N_LAYER)
    for s in copied:
        got, want = getattr(p, s.core_members[0]), values[s.name]
        if s.type is float:
            assert got == pytest.approx(want, rel=1e-6), s.name
        else:
            assert got == (list(want) if s.type is tuple else want), s.name


def test_decode_config_refuses_what_each_range_excludes():
    def refused(name, value) -> bool:
        try:
            DecodeConfig().replace(**{name: value})
        except (ValueError, TypeError):
            return True
        return False

    for s in SETTINGS:
        if s.low is not None:
            step = 1 if s.type is int else 1e-6
            assert refused(s.name, s.type(s.low - step)), s.name
            assert refused(s.name, s.type(s.low)) == s.low_open, s.name
            assert not refused(s.name, s.type(s.low + step)), s.name
        if s.high is not None:
            assert refused(s.name, s.high + 1e-6), s.name
            assert refused(s.name, s.high) == s.high_open, s.name
        if s.type is int:
            assert refused(s.name, 1.5), s.name
            assert refused(s.name, INT32_MAX + 1) == s.int32, s.name
        if s.none:
            assert not refused(s.name, None), s.name
        assert not refused(s.name, _other(s)), s.name


# ---------------------------------------------------------------------------------- Model


@pytest.mark.parametrize("method", [Model.generate, Model.stream])
def test_model_takes_each_setting_as_a_keyword(method):
    params = inspect.signature(method).parameters
    keywords = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is model_module._UNSET}
    assert keywords == set(BY_NAME), f"not in the table: {keywords - set(BY_NAME)}; not keywords: {set(BY_NAME) - keywords}"
    # unset, each is the config's value, and the default config's are the table's
    assert params["config"].default is None


# ---------------------------------------------------------------------------------- the command line


def _commands(group, path=()) -> dict:
    out = {}
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            out.update(_commands(command, path + (name,)))
        else:
            out[" ".join(path + (name,))] = command
    return out


def _flags(s: Setting, command: str) -> tuple[list[str], list[str]]:
    opts, secondary = [], []
    for decl in s.cli[command].flags or s.flags:
        first, _, second = decl.partition("/")
        opts.append(first)
        if second:
            secondary.append(second)
    return opts, secondary


def cli_mismatches(commands: dict) -> list[str]:
    """Where ``commands`` (name -> click command) differ from the table's options for them."""
    found = []
    for name, command in commands.items():
        params = {p.name: p for p in command.params}
        for s in SETTINGS:
            if name not in s.cli:
                if s.name in params:
                    found.append(f"{name}: {s.name} is an option, but not in the table's commands for it")
                continue
            p = params.get(s.name)
            if p is None:
                found.append(f"{name}: no option for {s.name}")
                continue
            default = p.default.value if hasattr(p.default, "value") else p.default
            want = {"opts": _flags(s, name)[0], "secondary": _flags(s, name)[1], "default": s.default_on(name),
                    "help": s.cli[name].help or s.help, "panel": s.panel, "metavar": s.metavar,
                    "min": None if s.cli_check or s.low is None else s.low,
                    "max": None if s.cli_check or s.high is None else s.high}
            got = {"opts": list(p.opts), "secondary": list(p.secondary_opts), "default": default, "help": p.help,
                   "panel": p.rich_help_panel, "metavar": p.metavar, "min": p.min, "max": p.max}
            for key in want:
                if got[key] != want[key]:
                    found.append(f"{name} {s.name}: {key} is {got[key]!r}, the table says {want[key]!r}")
            if s.cli_check and p.callback is None:
                found.append(f"{name} {s.name}: no callback for its check {s.cli_check!r}")
    return found


def test_each_command_has_the_tables_options_for_it():
    commands = _commands(typer.main.get_command(cli_app))
    assert {c for s in SETTINGS for c in s.cli} <= set(commands)
    assert cli_mismatches(commands) == []


def test_the_command_line_checker_finds_an_option_unlike_the_table():
    commands = _commands(typer.main.get_command(cli_app))
    alpha = next(p for p in commands["generate"].params if p.name == "alpha")
    alpha.min = 0.1
    top_k = next(p for p in commands["run"].params if p.name == "top_k")
    top_k.default = 5
    commands["info"].params.append(next(p for p in commands["generate"].params if p.name == "seed"))
    assert sorted(cli_mismatches(commands)) == [
        "generate alpha: min is 0.1, the table says 0.0",
        "info: seed is an option, but not in the table's commands for it",
        "run top_k: default is 5, the table says 0",
    ]


def test_an_option_outside_its_range_is_a_usage_error():
    runner = CliRunner()
    for s in SETTINGS:
        for command in s.cli:
            if s.low is None or command.startswith("eval"):  # eval's need no second run: the same options
                continue
            flag = _flags(s, command)[0][0]
            args = command.split() + ["missing.gguf"] + (["prompt"] if command != "run" else [])
            # below the range (an open end the option's callback refuses; without one DecodeConfig
            # does, once the model is loaded)
            for below in [s.type(s.low - 1)] + ([s.low] if s.cli_check and s.low_open else []):
                result = runner.invoke(cli_app, args + [flag, str(below)])
                assert result.exit_code == 2, (command, s.name, below, result.output)
            # in range, the options are fine and the command goes on to the missing model
            result = runner.invoke(cli_app, args + [flag, str(_other(s))])
            assert result.exit_code == 1 and "model file not found" in result.output, (command, s.name, result.output)


def test_a_command_gets_the_options_values_by_setting_name():
    toy = typer.Typer()
    got = {}

    @toy.command()
    @decode_options("generate")
    def sample(first: int = 1, decode: dict = None, last: str = "z") -> None:
        got.update(decode, first=first, last=last)

    result = CliRunner().invoke(toy, ["--alpha", "0.7", "--decoder", "activation", "--raw", "--first", "2"])
    assert result.exit_code == 0, result.output
    expected = {s.name: s.default_on("generate") for s in for_command("generate")}
    assert got == {**expected, "alpha": 0.7, "decoder": "activation", "premature_norm": False, "first": 2,
                   "last": "z"}


# ---------------------------------------------------------------------------------- the chat's /set


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Model:
    path = write_llama_gguf(tmp_path_factory.mktemp("fields") / "m.gguf", n_layer=N_LAYER)
    return Model(path, n_ctx=256, n_threads=1)


def _set_texts(s: Setting) -> list[tuple[str, object]]:
    """Texts ``/set`` takes for ``s`` and the value each means."""
    if s.type is bool:
        return [("on", True), ("OFF", False)]
    if s.choices:
        return [(c.upper(), c) for c in s.choices]
    texts = [(str(_other(s)), _other(s))]
    if s.none:
        texts.append((s.none.upper(), None))
    return texts


def test_set_takes_each_chat_setting(tiny):
    assert {s.name for s in SET_WORDS.values()} == {s.name for s in SETTINGS if s.chat}
    for s in SETTINGS:
        if s.chat:
            assert s.name in HELP, s.name
    chat = Chat(tiny, DecodeConfig().replace(layers="high"), interactive=False)
    for word, s in SET_WORDS.items():
        for text, value in _set_texts(s):
            assert chat.command(f"/set {word} {text}") and not chat.failed, (word, text)
            assert _value_of(chat.settings, s) == value, (word, text)
        if s.low is not None:
            before = chat.settings
            chat.command(f"/set {word} {s.type(s.low - 1)}")
            assert chat.failed and chat.settings == before, word
            chat.failed = False


# ---------------------------------------------------------------------------------- the server


def _bounds(field) -> dict:
    found = {}
    for m in field.metadata:
        for key in ("ge", "gt", "le", "lt"):
            if getattr(m, key, None) is not None:
                found[key] = getattr(m, key)
    return found


def schema_mismatches(request: type) -> list[str]:
    """Where the request model ``request`` differs from the table's fields."""
    found = []
    fields = request.model_fields
    for s in served():
        f = fields.get(s.server)
        if f is None:
            found.append(f"no field {s.server}")
            continue
        bounds = _bounds(f)
        args = typing.get_args(f.annotation)
        if s.openai:  # OpenAI's default and upper bound; the lower bound is the table's too
            low = bounds.get("gt" if s.low_open else "ge")
            want = {"default": None if f.default is None else s.default, "low": s.low,
                    "high": bounds.get("le") if s.high is None else s.high}
            got = {"default": f.default, "low": low, "high": bounds.get("le")}
        else:  # the table's default (None: the chat's), integers bounded by the core's int
            want = {"default": None if s.has_chat_default else s.default,
                    "bounds": {"ge": s.low, "le": INT32_MAX} if s.type is int else {}}
            got = {"default": f.default, "bounds": bounds}
        if s.choices:
            want["choices"], got["choices"] = s.choices, typing.get_args(f.annotation)
        want["optional"], got["optional"] = f.default is None, type(None) in args
        for key in want:
            if got[key] != want[key]:
                found.append(f"{s.server}: {key} is {got[key]!r}, the table says {want[key]!r}")
    return found


def test_the_request_schema_has_the_tables_fields():
    pytest.importorskip("fastapi")
    from dola_cpp.server import ChatRequest, CompletionRequest

    assert schema_mismatches(ChatRequest) == []
    assert schema_mismatches(CompletionRequest) == []


def test_the_schema_checker_finds_a_field_unlike_the_table():
    pytest.importorskip("fastapi")
    from pydantic import Field, create_model

    from dola_cpp.server import CommonRequest

    broken = create_model("Broken", __base__=CommonRequest, top_k=(int, Field(0, ge=1, le=INT32_MAX)),
                          alpha=(float, 0.25))
    assert schema_mismatches(broken) == ["alpha: default is 0.25, the table says 0.5",
                                         "top_k: bounds is {'ge': 1, 'le': 2147483647}, the table says "
                                         "{'ge': 0, 'le': 2147483647}"]


def test_a_request_decodes_with_each_setting_it_gives_and_the_chats_defaults_for_the_others(tiny):
    pytest.importorskip("fastapi")
    from dola_cpp import server

    config = server._config(tiny, server.ChatRequest(messages=[{"role": "user", "content": "Hi"}],
                                                     dola_layers="high"))
    for s in served():
        if s.name != "layers":
            assert _value_of(config, s) == s.chat_value, s.name
    given = {s.name: _other(s) for s in served()}
    given["decoder"] = "dola"  # activation would need an info layer in range: the default's is
    body = server.ChatRequest(messages=[{"role": "user", "content": "Hi"}],
                              **{s.server: given[s.name] for s in served()})
    config = server._config(tiny, body)
    for s in served():
        got = _value_of(config, s)
        assert (math.isclose(got, given[s.name]) if s.type is float else got == given[s.name]), s.name
