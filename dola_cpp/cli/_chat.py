"""The terminal chat behind ``dola-cpp run``.

Each turn re-sends the whole conversation; the engine reuses the longest common token prefix of
its KV cache, so only the new turn is prefilled. An answer stopped with Ctrl-C is dropped
together with its question: the conversation stays a clean alternation of complete turns.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from typing import Any, Callable, Optional

import typer

from .. import DecodeConfig, GenerationResult, LayerPlan, Model
from ..prompts import TRANSCRIPT_STOP, transcript_prompt
from ..risk import RISK_BANDS, RISK_FORMULA
from ..hub import cache_dir
from ..settings import Setting, chat_words
from ._cli_utils import CLIError, Template, layer_plan, one_line, template_choice
from ._input import Interrupted, LineReader, discard_typeahead, line_reader
from ._render import describe_config, describe_plan, histogram, stats_line

MULTILINE = '"""'
SET_WORDS = chat_words()  # /set's words for the decode settings (dola_cpp.settings)

HELP = f"""\
Commands:
  /set                         show the settings
  /set layers high|low|none|16,18,32
  /set repetition_penalty X    (auto = 1.2 with DoLa, 1.0 plain or with DRY)
  /set premature_norm on|off   (final norm on premature layers: logit lens)
  /set decoder dola|activation (activation: Activation Decoding, on DoLa unless layers none)
  /set alpha X | info_layer N|auto   (Activation Decoding's weight and layer)
  /set temperature X           (0 = greedy)
  /set max_tokens N
  /set eos_boost X             (nats; ends answers as the token limit nears; 0 = off)
  /set dry_multiplier X        (llama.cpp's DRY sampler against repeats; 0 = off; also
                                dry_base, dry_allowed_length, dry_penalty_last_n)
  /set frequency_penalty X | presence_penalty X  (OpenAI's, -2..2, over the answer so far)
  /set stop_loops on|off       (end an answer that repeats a cycle of tokens)
  /set show_risk on|off        (colour each token by its risk)
  /set abstain X|off           (say "not sure" instead of an answer riskier than X)
  /set top_k K | top_p P | seed N|random
  /set system TEXT             (nothing after it removes the system prompt)
  /dola on|off                 DoLa decoding on, or plain decoding
  /clear                       forget the conversation
  /stats                       speed, the answer's risk and the premature-layer histogram
  /bye                         exit (also /exit, Ctrl-D)
  /help                        this help
  {MULTILINE}                          start or end a multi-line message
Ctrl-C stops an answer (the question and partial answer are forgotten);
at an empty prompt it exits."""



def risk_colour(risk: float) -> str:
    return "green" if risk < RISK_BANDS[0] else "yellow" if risk < RISK_BANDS[1] else "red"


@dataclasses.dataclass
class Exchange:
    user: str
    assistant: str


class Conversation:
    """The turns so far and how they become one prompt: the GGUF's chat template, or a plain
    ``User: …`` / ``Assistant: …`` transcript for models without one."""

    def __init__(self, model: Model, system: Optional[str], use_template: bool) -> None:
        self.model = model
        self.system = system
        self.use_template = use_template
        self.exchanges: list[Exchange] = []

    @property
    def stop(self) -> list[str]:
        return [] if self.use_template else [TRANSCRIPT_STOP]

    def messages(self, user: str, exchanges: list[Exchange]) -> list[dict]:
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for ex in exchanges:
            messages += [{"role": "user", "content": ex.user}, {"role": "assistant", "content": ex.assistant}]
        return messages + [{"role": "user", "content": user}]

    def render(self, user: str, exchanges: list[Exchange]) -> str:
        messages = self.messages(user, exchanges)
        return self.model.apply_chat_template(messages) if self.use_template else transcript_prompt(messages)

    def prompt(self, user: str, budget: int) -> tuple[str, list[int], int]:
        """The prompt for ``user``'s message within ``budget`` tokens, dropping the oldest
        exchanges when needed: its text, its token ids (what the user and the model said is text,
        never markup: ``Model.chat_tokens``) and how many exchanges were dropped."""
        for dropped in range(len(self.exchanges) + 1):
            kept = self.exchanges[dropped:]
            ids = self.model.chat_tokens(self.messages(user, kept), template=self.use_template)
            n = len(ids)
            if n <= budget:
                if dropped:
                    del self.exchanges[:dropped]
                return self.render(user, kept), ids, dropped
        n_train = self.model.n_ctx_train
        if n_train > 0 and self.model.n_ctx >= n_train:
            raise CLIError(f"this message needs {n} tokens but only {budget} fit in the context (with room for the "
                           f"answer), which is already the {n_train} the model was trained on; send a shorter message")
        larger = f"a larger --ctx (at most {n_train}, the model's training context)" if n_train > 0 else "a larger --ctx"
        raise CLIError(f"this message needs {n} tokens but only {budget} fit in the context "
                       f"(with room for the answer); start the chat with {larger}")

    def add(self, user: str, assistant: str) -> None:
        self.exchanges.append(Exchange(user, assistant))

    def clear(self) -> None:
        self.exchanges.clear()


class Output:
    """Where the chat writes: in a terminal, answers and status on stdout with colours; piped,
    only answers on stdout and everything else on stderr, without colours."""

    def __init__(self, interactive: bool) -> None:
        self.interactive = interactive
        self.color = interactive and not os.environ.get("NO_COLOR")

    def _style(self, text: str, **style) -> str:
        return typer.style(text, **style) if self.color else text

    def piece(self, text: str, risk: Optional[float] = None) -> None:
        """Answer text; with ``risk``, coloured by its band (plain text without colours)."""
        if risk is not None and self.color:
            text = typer.style(text, fg=risk_colour(risk))
        typer.echo(text, nl=False, color=self.color or None)

    def legend(self) -> None:
        bands = [typer.style(f"{name} risk", fg=colour) if self.color else f"{name} risk" for name, colour in
                 (("low", "green"), ("medium", "yellow"), ("high", "red"))]
        edges = " · ".join(f"{b} {e}" for b, e in zip(bands, (f"< {RISK_BANDS[0]:g}", f"< {RISK_BANDS[1]:g}",
                                                                f">= {RISK_BANDS[1]:g}")))
        self.status(f"token colours: {edges} (risk = {RISK_FORMULA}, how unsure the model is at that token)")

    def newline(self) -> None:
        typer.echo("")

    def status(self, text: str) -> None:
        typer.echo(self._style(text, dim=True), err=not self.interactive, color=self.color or None)

    def status_inline(self, text: str) -> None:
        """A status line that the next clear_line() removes (terminal only)."""
        typer.echo(self._style(text, dim=True), nl=False, color=self.color or None)

    def clear_line(self) -> None:
        typer.echo("\r\x1b[K", nl=False)

    def note(self, text: str) -> None:
        typer.echo(self._style(text, fg="yellow"), err=not self.interactive, color=self.color or None)

    def error(self, text: str) -> None:
        typer.echo(self._style(f"Error: {text}", fg="red"), err=True, color=self.color or None)

    def prompt(self, continuation: bool = False) -> str:
        if not self.interactive:
            return ""
        return self._style("... " if continuation else ">>> ", bold=True)


class Chat:
    def __init__(self, model: Model, settings: DecodeConfig, max_tokens: int = 256, system: Optional[str] = None,
                 template: Template = Template.auto, interactive: bool = True, show_risk: bool = False,
                 abstain: Optional[float] = None, stop_loops: bool = True) -> None:
        self.model = model
        self.out = Output(interactive)
        use_template, self.template_note = template_choice(model, template)
        self.conversation = Conversation(model, system, use_template)
        self.settings = settings
        self.max_tokens = max_tokens
        self.show_risk = show_risk
        self.abstain = abstain
        self.stop_loops = stop_loops
        self.plan = self._plan(settings.dola.layers)
        self._dola_layers = settings.dola.layers if not self.plan.is_plain else "high"
        self.last: Optional[GenerationResult] = None
        self.last_interrupted = False
        self.session_hist: Counter[int] = Counter()
        self.session_tokens = 0
        self.session_seconds = 0.0
        self.answers = 0
        self.failed = False
        self._eof = False
        self._norm_hint_shown = False

    # ------------------------------------------------------------------ loop

    def repl(self, reader: Optional[LineReader] = None) -> int:
        """Chat until /bye, Ctrl-D, Ctrl-C at an empty prompt or the end of piped input. Returns
        the exit code: 0, or 1 when a piped turn failed."""
        reader = reader or line_reader(self.out.interactive, cache_dir() / "chat_history")
        self._banner()
        try:
            while not self._eof:
                try:
                    text = self._read_message(reader)
                except EOFError:
                    break
                except Interrupted as e:
                    if e.had_text:
                        continue
                    break
                if text is None or not text.strip():
                    continue
                if text.lstrip().startswith("/"):
                    if not self.command(text.strip()):
                        break
                else:
                    try:
                        self.ask(text.strip())
                    except KeyboardInterrupt:  # before decoding started, e.g. while tokenizing
                        self.out.newline()
                        self.out.status("[interrupted]")
        finally:
            reader.close()
        return 1 if self.failed and not self.out.interactive else 0

    def _read_message(self, reader: LineReader) -> Optional[str]:
        """One user message; a line starting with three double quotes opens a block that runs
        to the line ending with them. Ctrl-C inside a block discards it."""
        line = reader.read(self.out.prompt())
        stripped = line.strip()
        if not stripped.startswith(MULTILINE):
            return line
        rest = stripped[len(MULTILINE):]
        if rest.endswith(MULTILINE) and len(rest) >= len(MULTILINE):
            return rest[: -len(MULTILINE)]
        lines = [rest] if rest else []
        while True:
            try:
                line = reader.read(self.out.prompt(continuation=True))
            except Interrupted:
                return None
            except EOFError:
                self._eof = True
                break
            if line.rstrip().endswith(MULTILINE):
                lines.append(line.rstrip()[: -len(MULTILINE)])
                break
            lines.append(line)
        return "\n".join(lines)

    def _banner(self) -> None:
        if self.template_note:
            self.out.note(f"note: {self.template_note}")
        note = self.settings.penalty_note(self.plan)
        if note:
            self.out.note(f"note: {note}")
        if not self.out.interactive:
            return
        m = self.model
        self.out.status(f"{m.path.name} ({m.architecture}, {m.n_layers} layers) · {self._decoding()}")
        self.out.status(f"Type /help for commands, {MULTILINE} for multi-line input, /bye or Ctrl-D to exit.")
        if self.show_risk:
            self.out.legend()

    def _decoding(self) -> str:
        return (f"{describe_config(self.settings, self.plan, self.model.n_layers)} · "
                f"repetition penalty {self.settings.penalty(self.plan)}")

    # ------------------------------------------------------------------ answers

    def ask(self, text: str) -> Optional[GenerationResult]:
        """Answer one message, streaming it; None when it failed."""
        budget = self.model.n_ctx - min(self.max_tokens, self.model.n_ctx // 2)
        try:
            _, ids, dropped = self.conversation.prompt(text, budget)
            # the ids, not the text: tokenized once per turn
            run = self.model.stream(ids, self.max_tokens, config=self.settings, stop=self.conversation.stop,
                                    abstain_above=self.abstain, stop_loops=self.stop_loops)
        except (CLIError, ValueError, TypeError, OSError) as e:
            self._fail(e)
            return None
        if dropped:
            self.out.note(f"note: dropped the {dropped} oldest exchange(s) to fit the context")
        interrupted = False
        started = False
        pending = ""  # trailing whitespace, shown only once more text follows: answers print stripped
        seen = 0  # steps already shown
        held: list[tuple[str, Optional[float]]] = []  # the answer, while abstaining may still drop it
        if self.abstain is not None and self.out.interactive:
            self.out.status_inline("(answering only if the risk stays at most "
                                   f"{self.abstain:g}; /set abstain off to stream)")
        try:
            for piece in run:
                if not started:
                    piece = piece.lstrip()
                    started = bool(piece)
                chunk = pending + piece
                shown = chunk.rstrip()
                pending = chunk[len(shown):]
                # a piece is the text of the steps since the last one: coloured by the riskiest
                risk = max((s.risk for s in run.steps[seen:]), default=None) if self.show_risk else None
                seen = len(run.steps)
                if not shown:
                    continue
                if self.abstain is not None:
                    held.append((shown, risk))
                else:
                    self.out.piece(shown, risk)
        except KeyboardInterrupt:
            interrupted = True
        except (ValueError, OSError) as e:
            self.out.newline()
            self._fail(e)
            return None
        finally:
            run.close()  # releases the model when Ctrl-C landed in our code rather than in the engine
        result = run.result()
        if self.abstain is not None and self.out.interactive:
            self.out.clear_line()
        abstained = result.finish_reason == "abstained"
        if abstained:
            self.out.piece(f"I'm not sure enough to answer that (risk {result.risk:.2f} > {self.abstain:g}).")
        else:
            for text_piece, risk in held:
                self.out.piece(text_piece, risk)
        self.out.newline()
        if self.out.interactive and discard_typeahead():
            self.out.note("note: what you typed while the answer was streaming was discarded; "
                          "type your next message at the prompt")
        if interrupted:
            self.out.status("[interrupted: this question and the partial answer are not kept]")
        elif abstained:
            self.out.status("[abstained: this question is not kept]")
        else:
            self.conversation.add(text, result.text.strip())
        self._record(result, interrupted)
        if self.out.interactive:
            self.out.status(stats_line(result, interrupted))
        self._maybe_hint_premature_norm(result)
        return result

    def _maybe_hint_premature_norm(self, result: GenerationResult) -> None:
        """Once per chat: when dynamic DoLa on raw hidden states keeps choosing the candidate next
        to the mature layer, that layer's large raw activations dominate the contrast (both demo
        models do this) and answers often read badly; the logit-lens variant is the usual remedy."""
        cands = self.plan.candidates
        if self._norm_hint_shown or self.settings.dola.premature_norm or len(cands) < 2 or len(result.steps) < 8:
            return
        hist = result.layer_histogram()
        top = max(hist, key=hist.get, default=None)
        share = hist.get(top, 0) / len(result.steps)
        if top == max(cands) and share >= 0.9:
            self._norm_hint_shown = True
            self.out.note(
                f"note: layer {top} was the premature layer for {share:.0%} of tokens: on this model the raw "
                "late-layer states dominate the contrast, which often garbles answers. "
                "/set premature_norm on (the logit-lens variant, the command line's default) usually reads "
                "better; --raw follows the paper."
            )

    def _record(self, result: GenerationResult, interrupted: bool) -> None:
        self.last, self.last_interrupted = result, interrupted
        self.answers += 1
        self.session_tokens += len(result.tokens)
        self.session_seconds += result.decode_seconds
        for s in result.steps:
            if s.premature_layer is not None:
                self.session_hist[s.premature_layer] += 1

    def _fail(self, error: BaseException) -> None:
        self.failed = True
        self.out.error(one_line(error))

    # ------------------------------------------------------------------ commands

    def command(self, line: str) -> bool:
        """Run a /command; False means exit."""
        name, _, arg = line[1:].partition(" ")
        name, arg = name.lower(), arg.strip()
        handlers: dict[str, Callable[[str], Optional[bool]]] = {
            "help": self._cmd_help, "?": self._cmd_help,
            "set": self._cmd_set,
            "dola": self._cmd_dola,
            "clear": self._cmd_clear,
            "stats": self._cmd_stats,
        }
        if name in ("bye", "exit", "quit"):
            return False
        handler = handlers.get(name)
        if handler is None:
            self._fail(CLIError(f"unknown command /{name}; /help lists the commands"))
            return True
        try:
            handler(arg)
        except (CLIError, ValueError, TypeError) as e:
            self._fail(e)
        return True

    def _cmd_help(self, arg: str) -> None:
        self.out.status(HELP)

    def _cmd_clear(self, arg: str) -> None:
        self.conversation.clear()
        self.out.status("conversation cleared")

    def _cmd_dola(self, arg: str) -> None:
        if arg.lower() in ("on", "1", "true"):
            self._apply(layers=self._dola_layers)
        elif arg.lower() in ("off", "0", "false"):
            self._apply(layers="none")
        elif arg:
            raise CLIError("use /dola on or /dola off")
        self.out.status(self._decoding())

    def _cmd_stats(self, arg: str) -> None:
        if self.last is None:
            self.out.status("no answers yet")
            return
        self.out.status(f"last answer: {stats_line(self.last, self.last_interrupted)}")
        if self.last.mature_layer is not None:
            self.out.status(histogram(self.last.layer_histogram()))
        speed = self.session_tokens / self.session_seconds if self.session_seconds > 0 else 0.0
        self.out.status(f"session: {self.answers} answer(s), {self.session_tokens} tokens, {speed:.1f} tok/s")
        if self.session_hist:
            self.out.status(histogram(dict(self.session_hist)))

    def _cmd_set(self, arg: str) -> None:
        if not arg:
            self._show_settings()
            return
        key, _, value = arg.partition(" ")
        key, value = key.lower().replace("-", "_"), value.strip()
        if key == "system":
            self.conversation.system = value or None
            self.out.status("system prompt set" if value else "system prompt removed")
            return
        if not value:
            raise CLIError(f"/set {key} needs a value")
        if key == "max_tokens":  # at least 1, as on the command line and in the server
            max_tokens = _number(key, value, int)
            if max_tokens < 1:
                raise CLIError(f"max_tokens must be at least 1, got {value}")
            self.max_tokens = max_tokens
        elif key in SET_WORDS:  # a decode setting (dola_cpp.settings): DecodeConfig checks its value
            setting = SET_WORDS[key]
            self._apply(**{setting.name: _setting_value(setting, key, value)})
        elif key == "show_risk":
            self.show_risk = _on_off(key, value)
            if self.show_risk:
                self.out.legend()
        elif key == "abstain":
            if value.lower() == "off":
                self.abstain = None
            else:
                risk = _number(key, value, float)
                if not 0.0 < risk <= 1.0:
                    raise CLIError(f"abstain takes a risk in (0, 1] or off, got {value}")
                self.abstain = risk
        elif key == "stop_loops":
            self.stop_loops = _on_off(key, value)
        else:
            raise CLIError(f"unknown setting {key!r}; /set without arguments lists them")
        if key not in ("show_risk", "abstain", "stop_loops"):
            self.out.status(f"{key} = {value} · {self._decoding()}")
        else:
            self.out.status(f"{key} = {value}")

    def _show_settings(self) -> None:
        s, plan = self.settings, self.plan
        penalty = "auto" if s.repetition_penalty is None else f"{s.repetition_penalty:g}"
        rows = [
            ("layers", f"{s.dola.layers} ({describe_plan(plan, self.model.n_layers, s.dola.premature_norm)})"),
            ("repetition_penalty", f"{penalty} (now {s.penalty(plan)})"),
            ("premature_norm", "on" if s.dola.premature_norm else "off"),
            ("decoder", s.decoder_name(plan)),
            ("alpha", f"{s.activation.alpha:g}"),
            ("info_layer", f"{'auto' if s.activation.info_layer is None else s.activation.info_layer} "
                           f"(now {s.activation.resolve_info_layer(self.model.n_layers)})"),
            ("temperature", f"{s.temperature:g}"),
            ("top_k", str(s.top_k)),
            ("top_p", f"{s.top_p:g}"),
            ("seed", "random" if s.seed is None else str(s.seed)),
            ("max_tokens", str(self.max_tokens)),
            ("eos_boost", f"{s.eos_boost:g}"),
            ("dry_multiplier", f"{s.dry_multiplier:g} (base {s.dry_base:g}, allowed length {s.dry_allowed_length}, "
                               f"last {'all' if s.dry_penalty_last_n < 0 else s.dry_penalty_last_n})"),
            ("penalties", f"frequency {s.frequency_penalty:g}, presence {s.presence_penalty:g}"),
            ("stop_loops", "on" if self.stop_loops else "off"),
            ("show_risk", "on" if self.show_risk else "off"),
            ("abstain", "off" if self.abstain is None else f"{self.abstain:g}"),
            ("system", repr(self.conversation.system) if self.conversation.system else "(none)"),
            ("format", "chat template" if self.conversation.use_template else "User:/Assistant: transcript"),
        ]
        self.out.status("\n".join(f"  {k:<19} {v}" for k, v in rows))

    def _apply(self, **changes) -> None:
        """Replace settings fields (DecodeConfig checks the values) and re-resolve the layers."""
        settings = self.settings.replace(**changes)
        plan = self._plan(settings.dola.layers)
        try:
            settings.activation.resolve_info_layer(self.model.n_layers)
        except ValueError as e:
            raise CLIError(str(e)) from None
        self.settings, self.plan = settings, plan
        if not plan.is_plain:
            self._dola_layers = settings.dola.layers
        note = settings.penalty_note(plan)
        if note and ("layers" in changes or "repetition_penalty" in changes):
            self.out.note(f"note: {note}")

    def _plan(self, layers: str) -> LayerPlan:
        return layer_plan(self.model, layers, label="layers")


def _on_off(key: str, value: str) -> bool:
    if value.lower() not in ("on", "off"):
        raise CLIError(f"/set {key} takes on or off")
    return value.lower() == "on"


def _setting_value(setting: Setting, key: str, value: str) -> Any:
    """The text of ``/set key value`` as the setting's value: its word for None (``auto``), on or
    off, a choice (in lower case), a number, or the text itself (layers)."""
    if setting.none and value.lower() == setting.none:
        return None
    if setting.type is bool:
        return _on_off(key, value)
    if setting.choices:
        return value.lower()
    if setting.type in (int, float):
        return _number(key, value, setting.type)
    return value


def _number(key: str, value: str, kind: type):
    """The text of a /set value as a number; its range is DecodeConfig's to check."""
    try:
        return kind(value)
    except ValueError:
        raise CLIError(f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None
