"""One generation as it runs: :class:`Stream`, an iterator of text pieces with the steps'
diagnostics and how it ended."""

from __future__ import annotations

import codecs
import time
import warnings
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, Union

import numpy as np

from . import _core
from .config import DecodeConfig
from .results import GenerationResult, StepInfo
from .risk import token_risk
from .sequence import Answer

if TYPE_CHECKING:
    from .prompts import Prompt
    from .sequence import SequenceContext

_warned_penalty = False

# abstain_above judges the running risk once the answer has this many tokens (or when it ends)
ABSTAIN_MIN_TOKENS = 4

# A loop: the answer's last repeats * p tokens are one cycle of p >= LOOP_MIN_CYCLE tokens
# repeated, p its shortest period (cycles up to LOOP_MAX_CYCLE tokens are looked for). stop_loops
# ends an answer at a cycle's third time in a row, before it becomes a loop of four. Shorter
# periods (a token or two again and again: "!!!", "|---|---") are common in good text; they count
# only once they run for RUN_SPAN tokens.
LOOP_MIN_CYCLE, LOOP_MAX_CYCLE, STOP_LOOP_REPEATS, RUN_SPAN = 3, 64, 3, 32
# An answer stopped for looping is unreliable however confident each token was: its risk is this.
LOOP_RISK = 1.0


def _periodic(tokens: Sequence[int], p: int, span: int) -> bool:
    """Whether the last ``span`` tokens repeat with period ``p``."""
    n = len(tokens)
    return span <= n and all(tokens[n - 1 - i] == tokens[n - 1 - i - p] for i in range(span - p))


def loop_cycle(tokens: Sequence[int], repeats: int = STOP_LOOP_REPEATS, runs: bool = True) -> int:
    """The period of the loop ``tokens`` ends with (0 = none): a cycle of at least LOOP_MIN_CYCLE
    tokens repeated ``repeats`` times in a row, or (``runs``) a period of 1 or 2 tokens over the
    last RUN_SPAN tokens."""
    n = len(tokens)
    if runs:
        for p in range(1, LOOP_MIN_CYCLE):
            if _periodic(tokens, p, RUN_SPAN):
                return p
    for p in range(LOOP_MIN_CYCLE, min(LOOP_MAX_CYCLE, n // repeats) + 1):
        span = p * repeats
        if tokens[n - 1] == tokens[n - 1 - p] and _periodic(tokens, p, span):
            if any(_periodic(tokens, q, span) for q in range(1, LOOP_MIN_CYCLE)):
                continue  # a run of a shorter period, not a cycle of p
            return p
    return 0


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

    def _abstains(self, final: bool) -> bool:
        """Whether the running risk crossed ``abstain_above`` (judged once ABSTAIN_MIN_TOKENS are
        in, or at the end of a shorter answer)."""
        if self.abstain_above is None or not self.steps:
            return False
        if len(self.steps) < ABSTAIN_MIN_TOKENS and not final:
            return False
        return self.risk > self.abstain_above

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that could start a stop string."""
        keep = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), keep, -1):
                if s.startswith(text[-k:]):
                    keep = k
                    break
        return keep

    def _generate(self) -> Iterator[Any]:
        seq = self.sequence
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        emitted = 0
        cut: Optional[int] = None  # where a stop string cut the text
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
                t_prefill = time.perf_counter()
                try:
                    seq.prefill(self.ids, Answer(self.max_tokens, self.ignore_eos, tuple(bonus)))
                finally:  # also when Ctrl-C or cancel() stops the prefill
                    self.prefill_seconds = time.perf_counter() - t_prefill
                yield _STARTED
                t0 = time.perf_counter()
                for i in range(self.max_tokens):
                    if seq.cancelled():
                        self.finish_reason = "cancelled"
                        break
                    st = seq.sample(bonus[i] if i < len(bonus) else 0.0)
                    if not self.ignore_eos and seq.is_eog(st.token):
                        self.finish_reason = "abstained" if self._abstains(final=True) else "stop"
                        break
                    risk = token_risk(st.top_logprob)
                    self._risk_sum += risk
                    self.tokens.append(st.token)
                    asked = self.params.n_probs > 0
                    self.steps.append(
                        StepInfo(
                            token=st.token,
                            premature_layer=None if st.premature_layer < 0 else st.premature_layer,
                            jsd=st.jsd,
                            mature_logprob=st.mature_logprob,
                            score=st.score,
                            entropy=st.entropy,
                            activation_entropy=None if self.params.info_layer < 0 else st.activation_entropy,
                            top_logprob=st.top_logprob,
                            risk=risk,
                            top_logprobs=list(zip(st.top_tokens, st.top_logprobs_mature)) if asked else [],
                            dola_logprob=float(st.dola_logprob) if asked else None,
                            dola_top_logprobs=list(zip(st.dola_top_tokens, st.dola_top_logprobs)) if asked else [],
                        )
                    )
                    self.text += decoder.decode(seq.piece(st.token))
                    cut = self._find_stop(emitted)
                    if cut is not None:
                        self.text = self.text[:cut]
                        self.finish_reason = "abstained" if self._abstains(final=True) else "stop"
                        break
                    if self.stop_loops:
                        self.loop = loop_cycle(self.tokens)
                        if self.loop:
                            self.finish_reason = "loop"
                            break
                    if self._abstains(final=False):
                        self.finish_reason = "abstained"
                        break
                    safe = len(self.text) - self._held_back(self.text[emitted:])
                    if safe > emitted:
                        piece, emitted = self.text[emitted:safe], safe
                        yield piece
                    if i + 1 == self.max_tokens:
                        break
                    if seq.n_cached >= seq.n_ctx:
                        self.finish_reason = "length"
                        break
                    seq.accept(st.token)
                else:
                    self.finish_reason = "length"
                if self.finish_reason == "length" and self._abstains(final=True):
                    self.finish_reason = "abstained"
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
            if cut is None:
                self.text += decoder.decode(b"", final=True)
            if len(self.text) > emitted:
                yield self.text[emitted:]

    def _find_stop(self, emitted: int) -> Optional[int]:
        if not self.stop:
            return None
        longest = max(len(s) for s in self.stop)
        start = max(0, emitted - longest)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

