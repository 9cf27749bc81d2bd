"""The decode settings, one row each: the one table the settings' surfaces are made from.

Each :class:`Setting` names a field of :class:`~dola_cpp.config.DecodeConfig` (or of its
``dola``/``activation`` sub-config), its type, the library's default, its range and what it
means, and where it shows:

- ``DecodeConfig`` takes its defaults from here and checks its values against the ranges;
  ``to_core`` copies each setting that is not ``derived`` into its ``_core.DecodeParams`` member;
- ``cli``: the commands that have it as an option (``dola_cpp.cli._cli_utils.decode_options``
  makes the options), with that command's default and, where it differs, its help and names;
- ``chat``: the words the chat's ``/set`` takes for it;
- ``server``: the request field (``dola_cpp.server_schema`` makes the request schema);
- ``chat_default``: what the chat (``dola-cpp run``) and the server decode with unless told
  otherwise, where that differs from the library's default.

The table's order is the order of the options within a help panel and of the request's fields.
``tests/test_fields.py`` checks each surface against this table, ``_core.DecodeParams`` and
``Model.generate``/``stream`` included: a new setting is one row here, its member in
``csrc/dola-types.h`` (``decode_params``), the binding and ``_core.pyi``, the field in
``DecodeConfig`` and its keyword on ``Model.generate``/``stream``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

RECOMMENDED_REPETITION_PENALTY = 1.2
INT32_MAX = 2**31 - 1
DECODERS = ("dola", "activation")
# llama-server's: DRY does not follow a repeat across them
DRY_SEQUENCE_BREAKERS = ("\n", ":", '"', "*")
LOGIT_BIAS_MAX = 100.0  # OpenAI's: each bias in [-100, 100]

# What the chat (``dola-cpp run``) and the server decode with unless told otherwise, chosen with
# benchmarks/chat_defaults.py (docs/decoders.md, "Chat defaults"): premature layers through the final norm,
# an end-of-answer boost near the token budget, llama.cpp's DRY sampler against loops, and a stop
# when the answer repeats a cycle anyway.
CHAT_PREMATURE_NORM = True
CHAT_EOS_BOOST = 10.0
CHAT_DRY_MULTIPLIER = 0.8
CHAT_MAX_TOKENS = 512

# the command line's help panels (dola_cpp.cli._help.PANELS)
DECODING, SAMPLING, STOPPING = "Decoding", "Sampling", "Stopping"

_SAME = object()  # On(): the table's default


@dataclass(frozen=True)
class On:
    """How one command shows a setting: its default there (the table's unless given) and, where
    they differ from the table's, its help and option names."""

    default: Any = _SAME
    help: str = ""
    flags: tuple[str, ...] = ()


def on(*commands: str, default: Any = _SAME, help: str = "", flags: tuple[str, ...] = ()) -> dict[str, On]:
    """``Setting.cli`` for ``commands``, each showing the setting the same way."""
    return {c: On(default, help, flags) for c in commands}


@dataclass(frozen=True)
class Setting:
    """One decode setting (see the module's docstring)."""

    name: str  # the DecodeConfig field, the keyword of Model.generate/stream
    type: type  # a value's type: float, int, bool, str (a choice, or layers' text), tuple
    default: Any  # the library's (DecodeConfig's)
    help: str = ""  # what it does, as the command line's --help says it
    group: str = ""  # the DecodeConfig sub-config that holds it: "dola", "activation" or ""
    # the range DecodeConfig accepts (the command line's min/max; an open end is refused by
    # DecodeConfig itself, or by the command line's ``cli_check``)
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    int32: bool = False  # the core holds it in a C++ int: DecodeConfig bounds it by INT32_MAX
    rule: str = ""  # an integer's rule, as DecodeConfig's error message states it
    choices: tuple[str, ...] = ()
    none: str = ""  # None is a value: the word /set takes for it ("auto", "random")
    chat_default: Any = _SAME  # the chat's and the server's default, where it differs
    core: Optional[tuple[str, ...]] = None  # the _core.DecodeParams members it sets; None = its name's
    derived: bool = False  # to_core computes what it sets (else it copies the value, as its type)
    # the command line
    flags: tuple[str, ...] = ()
    panel: str = ""
    metavar: Optional[str] = None
    cli_check: str = ""  # checked by this callback (_cli_utils.CHECKS) instead of a min/max
    cli: Mapping[str, On] = field(default_factory=dict)  # command -> how it shows there
    chat: tuple[str, ...] = ()  # the /set words for it (its name first)
    server: str = ""  # the request field; "" = not in requests
    server_type: Any = None  # its type there, where a request writes it otherwise (layers: a list)
    openai: bool = False  # the request field is OpenAI's: OpenAI's bounds and default (None)

    @property
    def core_members(self) -> tuple[str, ...]:
        return (self.name,) if self.core is None else self.core

    def default_on(self, command: str) -> Any:
        """The default of ``command``'s option."""
        d = self.cli[command].default
        return self.default if d is _SAME else d

    @property
    def has_chat_default(self) -> bool:
        return self.chat_default is not _SAME

    @property
    def chat_value(self) -> Any:
        """What the chat and the server decode with unless told otherwise."""
        return self.default if self.chat_default is _SAME else self.chat_default


_ACTIVATION = ("run", "generate", "compare", "eval tfqa-mc", "eval factor")
_EVAL = ("eval tfqa-mc", "eval factor")
_ONE_SHOT_AND_CHAT = ("run", "generate")
_EVAL_NORM_HELP = ("--premature-norm applies the final norm to premature hidden states before projecting them "
                   "(logit lens); --raw projects the raw hidden state, as the DoLa repository's evaluations do.")

SETTINGS: tuple[Setting, ...] = (
    Setting(
        "layers", str, None, group="dola", core=("candidates", "mature"), derived=True,
        server_type=Union[str, list[int], None],
        help="Premature layers to contrast: high, low, none (plain decoding), or a list like 16,18,32 "
             "(last = mature layer; one value = plain decoding from that layer).",
        flags=("--layers", "-l"), panel=DECODING, metavar="LAYERS", cli_check="layers",
        cli={**on("run", "generate", "compare", default="high"),
             **on("trace", default="high", help="Candidate layers (two or more): high, low or a list like "
                                                "0,2,4,...,32 (last = mature)."),
             **on(*_EVAL, flags=("--layers",),
                  help="'high', 'low', 'none' or a layer string such as '16,18,32'. Default: none "
                       "(plain decoding), unless --early-exit-layers is given."),
             **on("eval selective", default="high", flags=("--layers",),
                  help="The DoLa mode's layers ('high', 'low' or a layer string).")},
        chat=("layers",), server="dola_layers"),
    Setting(
        "repetition_penalty", float, None, low=0.0, low_open=True, none="auto", derived=True,
        help=f"Repetition penalty. Default: {RECOMMENDED_REPETITION_PENALTY} with DoLa, 1.0 plain.",
        flags=("--repetition-penalty", "--rp"), panel=DECODING, cli_check="positive",
        cli=on("run", "generate", "compare", "trace"), chat=("repetition_penalty", "penalty", "rp"),
        server="repetition_penalty"),
    Setting(
        "premature_norm", bool, False, group="dola", chat_default=CHAT_PREMATURE_NORM,
        help="--premature-norm (the command line's default) applies the final norm to premature layers "
             "before projecting them (logit lens); --raw projects the raw hidden state as the DoLa "
             "paper, transformers and the Python API do. Why the default differs: docs/decoders.md, 'Chat defaults'.",
        flags=("--premature-norm/--raw",), panel=DECODING,
        cli={**on("run", default=CHAT_PREMATURE_NORM), **on("generate", "compare", "trace", default=True),
             **on(*_EVAL, "eval selective", help=_EVAL_NORM_HELP)},
        chat=("premature_norm",), server="premature_norm"),
    Setting("relative_top", float, 0.1, group="dola", low=0.0, high=1.0, high_open=True, server="relative_top"),
    Setting(
        "decoder", str, "dola", choices=DECODERS, core=("activation",), derived=True,
        help="dola: DoLa with --layers (plain decoding with --layers none); activation: Activation "
             "Decoding, on top of DoLa's contrast unless --layers none.",
        flags=("--decoder",), panel=DECODING, cli=on("run", "generate", *_EVAL), chat=("decoder",),
        server="decoder"),
    Setting(
        "alpha", float, 0.5, group="activation", low=0.0,
        help="Activation Decoding: weight of the sharpness (entropy) term.",
        flags=("--alpha",), panel=DECODING, cli=on(*_ACTIVATION), chat=("alpha",), server="alpha"),
    Setting(
        "info_layer", int, None, group="activation", low=0, rule="a layer number >= 0 or None (per model)",
        none="auto", derived=True,
        help="Activation Decoding: the layer whose activations over the context are measured "
             "(default: round(0.8 x layers), as the reference's 26 of 32; `dola-cpp info` shows it).",
        flags=("--info-layer",), panel=DECODING, cli=on(*_ACTIVATION), chat=("info_layer",), server="info_layer"),
    Setting(
        "eos_boost", float, 0.0, low=0.0, chat_default=CHAT_EOS_BOOST, core=(),  # the stream adds it
        help="Raise the end-of-answer tokens' scores from 80% of --max-tokens on, linearly up to this many nats "
             "at the limit, so answers end instead of being cut (0 = off).",
        flags=("--eos-boost",), panel=STOPPING, cli={**on("run", default=CHAT_EOS_BOOST), **on("generate")},
        chat=("eos_boost",), server="eos_boost"),
    Setting(
        "temperature", float, 0.0, low=0.0, help="Sampling temperature; 0 = greedy.",
        flags=("--temperature", "-t"), panel=SAMPLING, cli=on(*_ONE_SHOT_AND_CHAT), chat=("temperature",),
        server="temperature", openai=True),
    Setting(
        "top_k", int, 0, low=0, int32=True, rule=f"an integer >= 0 and <= {INT32_MAX} (0 = all tokens)",
        help="Sample from the k best tokens (0 = all).",
        flags=("--top-k",), panel=SAMPLING, cli=on(*_ONE_SHOT_AND_CHAT), chat=("top_k",), server="top_k"),
    Setting(
        "top_p", float, 1.0, low=0.0, high=1.0, low_open=True, help="Nucleus sampling threshold.",
        flags=("--top-p",), panel=SAMPLING, cli=on(*_ONE_SHOT_AND_CHAT), chat=("top_p",), server="top_p",
        openai=True),
    Setting("min_p", float, 0.0, low=0.0, high=1.0, server="min_p"),
    Setting(
        "seed", int, None, low=0, rule="an integer >= 0 or None (random)", none="random", derived=True,
        help="Random seed for sampling (default: random).",
        flags=("--seed",), panel=SAMPLING, cli=on(*_ONE_SHOT_AND_CHAT), chat=("seed",), server="seed", openai=True),
    Setting(
        "dry_multiplier", float, 0.0, low=0.0, chat_default=CHAT_DRY_MULTIPLIER,
        help="llama.cpp's DRY sampler: lower a token that would extend a repeat of the context by this times "
             "--dry-base to the power of the repeat's length beyond --dry-allowed-length (0 = off).",
        flags=("--dry-multiplier",), panel=SAMPLING, cli={**on("run", default=CHAT_DRY_MULTIPLIER), **on("generate")},
        chat=("dry_multiplier",), server="dry_multiplier"),
    Setting(
        "dry_base", float, 1.75, low=1.0, help="DRY's growth per repeated token.",
        flags=("--dry-base",), panel=SAMPLING, cli=on(*_ONE_SHOT_AND_CHAT), chat=("dry_base",), server="dry_base"),
    Setting(
        "dry_allowed_length", int, 2, low=0, int32=True, rule="an integer >= 0",
        help="Repeats up to this many tokens are not lowered by DRY.",
        flags=("--dry-allowed-length",), panel=SAMPLING, cli=on(*_ONE_SHOT_AND_CHAT), chat=("dry_allowed_length",),
        server="dry_allowed_length"),
    Setting(
        "dry_penalty_last_n", int, -1, low=-1, int32=True,
        rule="an integer >= -1 (-1 = the whole context, 0 = off)",
        help="Tokens DRY scans for repeats (-1 = the whole context, 0 = off).",
        flags=("--dry-penalty-last-n",), panel=SAMPLING, cli=on(*_ONE_SHOT_AND_CHAT), chat=("dry_penalty_last_n",),
        server="dry_penalty_last_n"),
    # strings of 1 to 40 bytes without NUL (DecodeConfig checks them): the Python API only
    Setting("dry_sequence_breakers", tuple, DRY_SEQUENCE_BREAKERS),
    Setting(
        "frequency_penalty", float, 0.0, low=-2.0, high=2.0,
        help="OpenAI's: lower a token's score by this for each time it occurs in the answer so far (the tokens "
             "generated, not the prompt); negative raises it.",
        flags=("--frequency-penalty",), panel=SAMPLING, cli=on(*_ONE_SHOT_AND_CHAT), chat=("frequency_penalty",),
        server="frequency_penalty", openai=True),
    Setting(
        "presence_penalty", float, 0.0, low=-2.0, high=2.0,
        help="OpenAI's: lower a token's score by this once if it occurs in the answer so far (the tokens "
             "generated, not the prompt); negative raises it.",
        flags=("--presence-penalty",), panel=SAMPLING, cli=on(*_ONE_SHOT_AND_CHAT), chat=("presence_penalty",),
        server="presence_penalty", openai=True),
    # OpenAI's {token id: bias in [-100, 100]} added to the scores last (DecodeConfig checks the
    # biases, the core the ids against the vocabulary): the Python API and the server only
    Setting("logit_bias", dict, {}, server="logit_bias", server_type=dict[int, float]),
    # GBNF text (llama.cpp's grammar format, start rule "root"; "" = none): the choice is limited to
    # the tokens it allows, after everything above (dola_cpp.constrain makes one from a JSON schema):
    # the Python API only (the server makes it from a request's response_format)
    Setting("grammar", str, ""),
    # the n most probable tokens each step (and each scored token) reports with their log-probs,
    # in the mature distribution and in the one the token was chosen from: the Python API only
    # (the server maps OpenAI's logprobs / top_logprobs to it)
    Setting("top_logprobs", int, 0, low=0, high=20, int32=True, rule="an integer in 0..20", core=("n_probs",)),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


def default(name: str) -> Any:
    """The library's default for the setting ``name``."""
    return BY_NAME[name].default


def for_command(command: str) -> list[Setting]:
    """The settings ``command`` (``"generate"``, ``"eval factor"``, ...) has as options, in the
    table's order."""
    return [s for s in SETTINGS if command in s.cli]


def in_group(group: str) -> list[Setting]:
    return [s for s in SETTINGS if s.group == group]


def chat_words() -> dict[str, Setting]:
    """Each word ``/set`` takes for a setting, and the setting."""
    return {word: s for s in SETTINGS for word in s.chat}


def served() -> list[Setting]:
    """The settings a request may give, in the table's order."""
    return [s for s in SETTINGS if s.server]
