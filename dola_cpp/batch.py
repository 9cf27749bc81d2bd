"""Many generations on one llama.cpp context: continuous batching.

A :class:`Batch` holds ``parallel`` sequences of one context (each with a KV cache of its own) on
a model's weights. Its engine decodes on a thread of its own, with no Python in the loop: each
step, one llama.cpp call carries the next token of every running generation, the prompts of those
that joined are decoded in chunks in the same step, and the captured layers of all of them go
through the output matrix in one projection. A
generation joins at the engine's next step and leaves when it ends; more than ``parallel`` wait
their turn. Each keeps its own decoder settings (plain, DoLa with its own layers, Activation
Decoding), premature-layer choices, penalty history, sampler and seed, so its tokens are the ones
it would get alone.

    batch = model.batch(parallel=4)
    results = batch.generate(["Q: Who wrote Hamlet?\\nA:", "Q: What is DNA?\\nA:"], 32, layers="high")
    for piece in batch.stream("Q: Why is the sky blue?\\nA:", 32):  # several may run at once
        print(piece, end="")

:meth:`dola_cpp.Model.generate_batch` runs a list of prompts this way.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence, Union

from . import _core
from .config import DecodeConfig, config_with
from .constrain import JsonSchema
from .results import GenerationResult
from .sequence import Answer
from .stream import Stream

if TYPE_CHECKING:
    from .layers import LayerPlan, LayerSpec
    from .prompts import Prompt

# how long a wait for the engine lasts before a stream looks at its cancellation (and Python at
# its signals: Ctrl-C)
_POLL_MS = 100


class Batch:
    """``parallel`` generations at once on one llama.cpp context of a model's weights (see the
    module's documentation); :meth:`dola_cpp.Model.batch` makes one. Each sequence holds the
    model's ``n_ctx`` positions. Thread-safe: streams may run on different threads."""

    def __init__(self, engine: _core.BatchEngine, vocab: _core.Model,
                 prompt_ids: Callable[[Prompt, bool, bool], list[int]],
                 resolve_layers: Callable[[LayerSpec], LayerPlan]) -> None:
        self._engine = engine
        self._vocab = vocab
        self._prompt_ids = prompt_ids
        self._resolve_layers = resolve_layers

    @property
    def parallel(self) -> int:
        return self._engine.n_seq

    @property
    def n_ctx(self) -> int:
        """Positions each sequence holds."""
        return self._engine.n_ctx

    @property
    def n_threads(self) -> int:
        return self._engine.n_threads

    def stats(self) -> dict[str, Any]:
        """The engine's counters: running and queued generations, llama.cpp calls and the tokens
        they carried, tokens chosen, projections (and the steps whose final logits came from one:
        the sequence's final normed row through the output matrix, with its layers' rows, as alone,
        in calls whose every sequence fuses; of those, the DoLa steps whose contrast ran where the
        projection did, a GPU: ``n_device_contrasts``), milliseconds decoding and choosing, and the prompt
        cache's hits, the prompt tokens they spared, its bytes and entries (:meth:`Model.batch`'s
        ``cache_mib``)."""
        return dict(self._engine.stats())

    def stream(self, prompt: Prompt, max_tokens: int = 256, *, config: Optional[DecodeConfig] = None,
               json_schema: Optional[JsonSchema] = None, stop: Union[str, Sequence[str], None] = None,
               stop_loops: bool = False, ignore_eos: bool = False, add_special: bool = True,
               parse_special: bool = True, abstain_above: Optional[float] = None, **settings: Any) -> Stream:
        """:meth:`dola_cpp.Model.stream` on a sequence of this batch: the same arguments and
        results. It joins the engine at its first piece (or ``start()``) and leaves it when it
        ends or is closed."""
        cfg = config_with(config, json_schema, **settings)
        return Stream(BatchSequence(self._engine, self._vocab, self._prompt_ids, self._resolve_layers), prompt, max_tokens, cfg, stop=stop, ignore_eos=ignore_eos,
                      add_special=add_special, parse_special=parse_special, abstain_above=abstain_above,
                      stop_loops=stop_loops)

    def generate(self, prompts: Sequence[Prompt], max_tokens: int = 256, *,
                 configs: Optional[Sequence[DecodeConfig]] = None, **kwargs: Any) -> list[GenerationResult]:
        """Each prompt's :class:`GenerationResult`, in order, decoded together. ``configs``: one
        :class:`DecodeConfig` per prompt (each prompt its own settings); otherwise ``config`` and
        the keywords of :meth:`stream` apply to all."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of prompts, not one string")
        prompts = list(prompts)
        if configs is not None:
            configs = list(configs)
            if len(configs) != len(prompts):
                raise ValueError(f"configs has {len(configs)} entries for {len(prompts)} prompts")
            if "config" in kwargs:
                raise ValueError("give config or configs, not both")
            streams = [self.stream(p, max_tokens, config=c, **kwargs) for p, c in zip(prompts, configs)]
        else:
            streams = [self.stream(p, max_tokens, **kwargs) for p in prompts]
        return drain(streams)


def drain(streams: Sequence[Stream]) -> list[GenerationResult]:
    """Runs streams of one batch to their ends (started together, read in turns) and returns
    their results; closes them all if one fails."""
    try:
        for s in streams:
            s.start()
        running: list[Iterator[str]] = list(streams)
        while running:
            for s in list(running):
                try:
                    next(s)
                except StopIteration:
                    running.remove(s)
        return [s.result() for s in streams]
    finally:
        for s in streams:
            s.close()


class BatchSequence:
    """One generation's sequence of a :class:`Batch`: the engine decodes it ahead of its stream,
    which takes the steps as they come (the :class:`~dola_cpp.sequence.SequenceContext` of a
    batch)."""

    def __init__(self, engine: _core.BatchEngine, vocab: _core.Model,
                 prompt_ids: Callable[[Prompt, bool, bool], list[int]],
                 resolve_layers: Callable[[LayerSpec], LayerPlan]) -> None:
        self._engine = engine
        self._vocab = vocab
        self._prompt_ids = prompt_ids
        self._resolve_layers = resolve_layers
        self._params: Optional[_core.DecodeParams] = None
        self._id: Optional[int] = None
        self._n_cached = 0
        self._cancelled = threading.Event()
        self._claimed = threading.Lock()

    @property
    def n_layers(self) -> int:
        return self._vocab.n_layer

    @property
    def n_ctx(self) -> int:
        return self._engine.n_ctx

    @property
    def n_cached(self) -> int:
        return self._n_cached

    def prompt_ids(self, prompt: Prompt, add_special: bool, parse_special: bool) -> list[int]:
        return self._prompt_ids(prompt, add_special, parse_special)

    def resolve_layers(self, layers: LayerSpec) -> LayerPlan:
        return self._resolve_layers(layers)

    def claim(self) -> "BatchSequence":
        return self

    def __enter__(self) -> None:
        if not self._claimed.acquire(blocking=False):
            raise RuntimeError("this stream is already running")

    def __exit__(self, *exc: Any) -> None:
        # the engine forgets the request: its sequence goes to the next one
        if self._id is not None:
            self._engine.release(self._id)
            self._id = None
        self._claimed.release()

    def cancel(self) -> None:
        self._cancelled.set()

    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def check_grammar(self, grammar: str) -> None:
        self._vocab.check_grammar(grammar)

    def configure(self, params: _core.DecodeParams) -> None:
        self._params = params

    def prefill(self, ids: list[int], answer: Answer) -> None:
        if self._params is None:
            raise RuntimeError("configure the sequence before its prefill")
        rules = answer.core_rules()
        self._id = self._engine.submit(ids, self._params, rules.pop("max_tokens"), rules.pop("ignore_eos"),
                                       list(answer.eos_bonus), **rules)
        self._n_cached = len(ids)

    def sample(self, eos_bonus: float) -> _core.Step:
        if self._id is None:
            raise RuntimeError("no outputs to sample from: prefill a prompt first")
        while True:
            if self._cancelled.is_set():
                raise _core.Cancelled("decoding was interrupted")
            event = self._engine.next(self._id, _POLL_MS)
            if event is None:
                continue
            kind, value = event
            if kind == "step":
                return value
            if kind == "failed":
                raise _core.Error(value)
            raise RuntimeError("the engine ended this sequence before its answer did")

    def accept(self, token: int) -> None:
        # the engine already decodes the token it chose
        self._n_cached += 1
