"""One generation as it runs: :class:`Stream`, an iterator of text pieces with the steps'
diagnostics and how it ended."""

from __future__ import annotations

import time
import warnings
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, Union

import numpy as np

from . import _core
from .config import DecodeConfig
from .results import GenerationResult, StepInfo
from .sequence import Answer

if TYPE_CHECKING:
    from .prompts import Prompt
    from .sequence import SequenceContext

_warned_penalty = False

# when an answer ends (the end-of-generation tokens, the budget, stop strings, abstaining, loops)
# and its text are the core's answer tracker's (dola-answer); its loop rule, for analyses and tests:
# loop_cycle(tokens, repeats=STOP_LOOP_REPEATS, runs=True) is the period of the loop ``tokens``
# ends with (0 = none): a cycle of LOOP_MIN_CYCLE..LOOP_MAX_CYCLE tokens repeated ``repeats``
# times in a row, or (``runs``) a period of 1 or 2 tokens over the last LOOP_RUN_SPAN tokens; an
# answer stopped for looping has the risk LOOP_RISK; abstain_above judges the running risk once
# ABSTAIN_MIN_TOKENS are in (or when the answer ends).
loop_cycle = _core.loop_cycle
LOOP_MIN_CYCLE, LOOP_MAX_CYCLE, STOP_LOOP_REPEATS, RUN_SPAN = (
    _core.LOOP_MIN_CYCLE, _core.LOOP_MAX_CYCLE, _core.STOP_LOOP_REPEATS, _core.LOOP_RUN_SPAN)
LOOP_RISK, ABSTAIN_MIN_TOKENS = _core.LOOP_RISK, _core.ABSTAIN_MIN_TOKENS


# what the generator yields once the prompt is in (start() waits for it; iteration skips it)
_STARTED: Any = object()


class PenaltyWarning(UserWarning):
    """DoLa ran with a repetition penalty below the recommended 1.2."""


class Stream:
    """One generation: an iterator of text pieces. ``steps`` grows as it runs; once it is
    exhausted, ``finish_reason`` and ``result()`` say how it ended. ``close()`` stops it.

    It decodes on ``sequence`` (:class:`~dola_cpp.sequence.SequenceContext`), which
    :meth:`dola_cpp.Model.stream` gives it."""

    def __init__(
        self,
        sequence: SequenceContext,
        prompt: Prompt,
        max_tokens: int,
        config: DecodeConfig,
        *,
        stop: Union[str, Sequence[str], None] = None,
        ignore_eos: bool = False,
        add_special: bool = True,
        parse_special: bool = True,
        abstain_above: Optional[float] = None,
        stop_loops: bool = False,
    ) -> None:
        global _warned_penalty
        if not isinstance(max_tokens, (int, np.integer)) or max_tokens < 0:
            raise ValueError(f"max_tokens must be a non-negative integer, got {max_tokens!r}")
        self.sequence = sequence
        self.ids = sequence.prompt_ids(prompt, add_special, parse_special)
        self.plan = sequence.resolve_layers(config.dola.layers)
        self.config = config
        self.params = config.to_core(self.plan, sequence.n_layers)
        if config.grammar:
            sequence.check_grammar(config.grammar)
        note = config.penalty_note(self.plan)
        if note and not _warned_penalty:
            _warned_penalty = True
            warnings.warn(note, PenaltyWarning, stacklevel=3)
        self.max_tokens = int(max_tokens)
        if isinstance(stop, str):
            stop = [stop]
        self.stop = [s for s in (stop or []) if s]
        # a grammar, once complete, allows only the end tokens: the answer ends at one regardless
        self.ignore_eos = ignore_eos and not config.grammar
        if abstain_above is not None:
            if isinstance(abstain_above, bool) or not isinstance(abstain_above, (int, float)) \
                    or not 0.0 < float(abstain_above) <= 1.0:
                raise ValueError(f"abstain_above must be a risk in (0, 1] or None, got {abstain_above!r}")
            abstain_above = float(abstain_above)
        self.abstain_above = abstain_above
        self.stop_loops = bool(stop_loops)
        self.loop = 0  # the cycle length the answer ended by repeating (finish_reason "loop")
        self._risk_sum = 0.0
        self.tokens: list[int] = []
        self.steps: list[StepInfo] = []
        self.text = ""
        self.finish_reason = "length"
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0
        self._begun = False
        self._iter = self._generate()

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> str:
        while True:
            piece = next(self._iter)
            if piece is not _STARTED:
                return piece

    def start(self) -> None:
        """Prefills the prompt now, without waiting for the first piece (a batch's sequence then
        decodes while the caller starts others); iterating afterwards goes on from there. Nothing
        once the stream has begun."""
        if self._begun:
            return
        try:
            piece = next(self._iter)
        except StopIteration:  # it ended before the prompt (max_tokens 0)
            return
        assert piece is _STARTED

    def close(self) -> None:
        self._iter.close()

    def result(self) -> GenerationResult:
        return GenerationResult(
            text=self.text,
            tokens=list(self.tokens),
            steps=list(self.steps),
            finish_reason=self.finish_reason,
            prompt_tokens=len(self.ids),
            prefill_seconds=self.prefill_seconds,
            decode_seconds=self.decode_seconds,
            layers=self.plan.candidates,
            mature_layer=None if self.plan.is_plain else self.plan.mature,
            decoder=self.config.decoder_name(self.plan),
            info_layer=None if self.params.info_layer < 0 else self.params.info_layer,
            risk=self.risk,
            loop=self.loop,
        )

    @property
    def risk(self) -> Optional[float]:
        """The answer's risk so far: the mean of its tokens' risks (None before the first), or
        LOOP_RISK once it was stopped for looping."""
        if self.loop:
            return LOOP_RISK
        return self._risk_sum / len(self.steps) if self.steps else None

    def _generate(self) -> Iterator[Any]:
        seq = self.sequence
        held = ""  # what an end now would still show (the step's held text)
        ended = False  # the answer's tracker ended it
        t0: Optional[float] = None  # start of decoding
        self._begun = True
        with seq.claim():
            try:
                if self.max_tokens == 0:
                    self.finish_reason = "length"
                    return
                seq.configure(self.params)
                budget = min(self.max_tokens, seq.n_ctx - len(self.ids) + 1)
                bonus = [self.config.eos_bonus(i, budget) for i in range(budget)] if self.config.eos_boost > 0 else []
                answer = Answer(self.max_tokens, self.ignore_eos, tuple(bonus), tuple(self.stop), self.abstain_above,
                                self.stop_loops)
                t_prefill = time.perf_counter()
                try:
                    seq.prefill(self.ids, answer)
                finally:  # also when Ctrl-C or cancel() stops the prefill
                    self.prefill_seconds = time.perf_counter() - t_prefill
                yield _STARTED
                t0 = time.perf_counter()
                asked = self.params.n_probs > 0
                info = self.params.info_layer >= 0
                while not ended:
                    if seq.cancelled():
                        self.finish_reason = "cancelled"
                        break
                    i = len(self.tokens)
                    st = seq.sample(bonus[i] if i < len(bonus) else 0.0)
                    if st.counted:
                        self._risk_sum += st.risk
                        self.tokens.append(st.token)
                        self.steps.append(
                            StepInfo(
                                token=st.token,
                                premature_layer=None if st.premature_layer < 0 else st.premature_layer,
                                jsd=st.jsd,
                                mature_logprob=st.mature_logprob,
                                score=st.score,
                                entropy=st.entropy,
                                activation_entropy=st.activation_entropy if info else None,
                                top_logprob=st.top_logprob,
                                risk=st.risk,
                                top_logprobs=list(zip(st.top_tokens, st.top_logprobs_mature)) if asked else [],
                                dola_logprob=float(st.dola_logprob) if asked else None,
                                dola_top_logprobs=list(zip(st.dola_top_tokens, st.dola_top_logprobs)) if asked else [],
                            )
                        )
                    held = st.held
                    if st.finish:
                        self.finish_reason, self.loop, ended = st.finish, st.loop, True
                    if st.piece:
                        self.text += st.piece
                        yield st.piece
                    if not ended:
                        seq.accept(st.token)
            except _core.Cancelled:
                self.finish_reason = "cancelled"
            except GeneratorExit:  # close(): the caller stopped it
                self.finish_reason = "cancelled"
                raise
            except KeyboardInterrupt:
                self.finish_reason = "interrupted"
                raise
            finally:
                self.decode_seconds = time.perf_counter() - t0 if t0 is not None else 0.0
            if not ended and held:  # stopped from outside: what was held back is shown
                self.text += held
                yield held
