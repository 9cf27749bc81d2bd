"""What one generation decodes on: a sequence of positions in a context.

A :class:`~dola_cpp.stream.Stream` runs a generation through :class:`SequenceContext` alone, never
through the :class:`~dola_cpp.Model` that made it: the model hands it a :class:`SessionSequence`
(its one llama.cpp context, used whole, decoding when the stream asks), and a
:class:`~dola_cpp.batch.Batch` (one context shared by several generations at once) hands each its
own :class:`~dola_cpp.batch.BatchSequence`, which its engine decodes ahead of the stream.
"""

from __future__ import annotations

import gc
import threading
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ContextManager, Optional, Protocol

from . import _core

if TYPE_CHECKING:
    from .layers import LayerPlan, LayerSpec
    from .prompts import Prompt


@dataclass(frozen=True)
class Answer:
    """What may follow a prefill, and when it ends: at most ``max_tokens`` tokens (and no more than
    the context holds), at an end-of-generation token unless ``ignore_eos``, before a ``stop``
    string, when the running risk exceeds ``abstain_above`` (None: never), at a loop with
    ``stop_loops``; ``eos_bonus[i]`` is added to the end tokens' scores when choosing token ``i``
    (0 past its end). The core's answer tracker applies it (``_core.AnswerText``): the sequence
    reports each step's text and end with the step."""

    max_tokens: int
    ignore_eos: bool
    eos_bonus: tuple[float, ...] = ()
    stop: tuple[str, ...] = ()
    abstain_above: Optional[float] = None
    stop_loops: bool = False

    def core_rules(self) -> dict:
        """The tracker's keyword arguments."""
        return dict(max_tokens=self.max_tokens, ignore_eos=self.ignore_eos, stop=list(self.stop),
                    abstain_above=self.abstain_above or 0.0, stop_loops=self.stop_loops)


class SequenceContext(Protocol):
    """The operations a generation needs from the sequence it decodes."""

    @property
    def n_layers(self) -> int:
        """The model's transformer blocks (layer ``n_layers`` = the final logits)."""

    @property
    def n_ctx(self) -> int:
        """Positions the sequence can hold."""

    @property
    def n_cached(self) -> int:
        """Positions it holds now (prompt and accepted tokens)."""

    def prompt_ids(self, prompt: Prompt, add_special: bool, parse_special: bool) -> list[int]:
        """The prompt's token ids, checked against the vocabulary and ``n_ctx``."""

    def resolve_layers(self, layers: LayerSpec) -> LayerPlan:
        """What a layer spec means for the model."""

    def claim(self) -> ContextManager[None]:
        """Held while the generation runs: a second one at once is an error, and a cancellation
        left from an earlier one is dropped on entry."""

    def cancelled(self) -> bool:
        """Whether the generation holding the claim was asked to stop."""

    def check_grammar(self, grammar: str) -> None:
        """ValueError when the model's vocabulary cannot be decoded with this GBNF grammar (it does
        not parse, has no ``root`` rule, ...): what ``configure`` would raise, before it."""

    def configure(self, params: _core.DecodeParams) -> None:
        """The decoder, layers and sampling settings for what follows."""

    def prefill(self, ids: list[int], answer: Answer) -> None:
        """Run the prompt (reusing whatever prefix of it is already cached) for ``answer``."""

    def sample(self, eos_bonus: float) -> _core.Step:
        """The next token and its diagnostics, with what the answer makes of it (``piece``,
        ``finish``, ``held``, ``counted``, ``risk``, ``loop``); ``eos_bonus`` is added to
        end-of-generation scores."""

    def accept(self, token: int) -> None:
        """Append ``token`` to the sequence, computing the next position."""


class Claim:
    """One call at a time on a context (a second concurrent one gets a clear error), and the
    cancellation of the call that holds it. A context manager: entering claims, leaving releases."""

    def __init__(self) -> None:
        self._busy = threading.Lock()
        self._cancelled = threading.Event()

    def __enter__(self) -> None:
        if not self._busy.acquire(blocking=False):
            # A stream abandoned mid-way (an exception, Ctrl-C included, in the loop over it) holds
            # the claim until the cycle between it and its generator is collected: collect it now.
            gc.collect()
            if not self._busy.acquire(blocking=False):
                raise RuntimeError(
                    "this Model is already generating (an unfinished stream?); close it, or use Model.share() "
                    "for a second context on the same weights"
                )
        self._cancelled.clear()

    def __exit__(self, *exc) -> None:
        self._busy.release()

    def cancel(self) -> None:
        self._cancelled.set()

    def is_cancelled(self) -> bool:
        return self._cancelled.is_set()


class SessionSequence:
    """A whole llama.cpp context (session) as one generation's sequence, with the model's vocabulary,
    the context's claim, and the model's prompt checks and layer plans.

    ``ahead`` > 1: the core runs the token loop (sample, the answer's verdict, accept) that many
    steps at a time without the GIL, and the stream takes the steps from there; 1 (a stream
    whose reader sees each piece at once): a step when the stream asks for it."""

    def __init__(
        self,
        session: _core.Session,
        vocab: _core.Model,
        claim: Claim,
        prompt_ids: Callable[[Prompt, bool, bool], list[int]],
        resolve_layers: Callable[[LayerSpec], LayerPlan],
        ahead: int = 1,
    ) -> None:
        self._session = session
        self._vocab = vocab
        self._claim = claim
        self._prompt_ids = prompt_ids
        self._resolve_layers = resolve_layers
        self._ahead_steps = max(1, ahead)
        self._answer: Optional[_core.AnswerText] = None
        self._eos_bonus: list[float] = []
        self._ready: deque[_core.Step] = deque()  # steps the core's loop made, not yet taken
        self._n_steps = 0
        self._decoded = False  # the last step's token was decoded by the core's loop

    @property
    def n_layers(self) -> int:
        return self._vocab.n_layer

    @property
    def n_ctx(self) -> int:
        return self._session.n_ctx

    @property
    def n_cached(self) -> int:
        return self._session.n_cached

    def prompt_ids(self, prompt: Prompt, add_special: bool, parse_special: bool) -> list[int]:
        return self._prompt_ids(prompt, add_special, parse_special)

    def resolve_layers(self, layers: LayerSpec) -> LayerPlan:
        return self._resolve_layers(layers)

    def claim(self) -> Claim:
        return self._claim

    def cancelled(self) -> bool:
        return self._claim.is_cancelled()

    def check_grammar(self, grammar: str) -> None:
        self._vocab.check_grammar(grammar)

    def configure(self, params: _core.DecodeParams) -> None:
        self._session.configure(params)

    def prefill(self, ids: list[int], answer: Answer) -> None:
        self._answer = _core.AnswerText(self._vocab, n_prompt=len(ids), n_ctx=self._session.n_ctx,
                                        **answer.core_rules())
        self._eos_bonus = list(answer.eos_bonus)
        self._ready.clear()
        self._n_steps = 0
        self._decoded = False
        self._session.prefill(ids)

    def sample(self, eos_bonus: float) -> _core.Step:
        if self._answer is None:
            raise RuntimeError("no outputs to sample from: prefill a prompt first")
        if self._ahead_steps > 1:
            if not self._ready:
                self._ready.extend(self._session.run(self._answer, self._eos_bonus, self._n_steps, self._ahead_steps))
            step = self._ready.popleft()
            self._decoded = True
        else:
            step = self._session.sample(eos_bonus)
            self._answer.add(step)
        self._n_steps += 1
        return step

    def accept(self, token: int) -> None:
        if self._decoded:  # the core's loop decoded it
            self._decoded = False
            return
        self._session.accept(token)
