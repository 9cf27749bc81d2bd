"""The public Python API: :class:`Model`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from . import _core
from .batch import Batch
from .config import DecodeConfig, config_with
from .constrain import JsonSchema
from .layers import LayerPlan, LayerSpec, resolve_layers
from .prompts import Prompt, chat_ids, chat_messages, checked_utf8, render_chat
from .results import GenerationResult, ScoreResult
from .rpc import rpc_endpoints
from .sequence import Claim, SessionSequence
from .stream import Stream

_UNSET: Any = object()  # a keyword the caller did not pass: the config's value stands
# Model.generate's steps per call of the core's token loop (Ctrl-C and cancel() are noticed
# within a call too; up to this many chosen tokens beyond a cancelled answer's are decoded)
GENERATE_AHEAD = 16
# host memory (MiB) a batch keeps earlier prompts' KV cells in (Model.batch's cache_mib)
DEFAULT_CACHE_MIB = 1024


class PromptTooLongError(ValueError):
    """The prompt has more tokens than the context holds."""

    def __init__(self, n_tokens: int, n_ctx: int) -> None:
        super().__init__(f"the prompt has {n_tokens} tokens but the context holds {n_ctx}; "
                         f"create the Model with a larger n_ctx or shorten the prompt")
        self.n_tokens = n_tokens
        self.n_ctx = n_ctx


class Model:
    """A GGUF model loaded with llama.cpp, with one decoding context.

    ``Model.share()`` makes another context on the same weights (e.g. one per UI thread).
    Generation releases the GIL; ``cancel()`` from another thread, closing a ``stream()``, or
    Ctrl-C stops it promptly and leaves the model usable.

    ``n_ctx`` may be rounded up by llama.cpp (see ``model.n_ctx``). ``kv_type="f32"`` is the exact
    mode used for reference parity (F32 KV cache, no flash attention). ``capture=False`` creates a
    context without the layer-capture callback: plain llama.cpp decoding only (the benchmark's
    baseline).

    ``repack=False`` keeps every weight in ggml's plain layout (llama.cpp's ``--no-repack``): no
    AMX, CPU_REPACK or KleidiAI buffers. In a GPU build, the weights left on the CPU go to the
    GPU's pinned host memory (or stay mapped from the file) ahead of those layouts;
    ``no_host=True`` skips that, so they take the CPU's repacked layouts (llama.cpp's ``--no-host``).

    ``rpc``: ggml RPC servers (``"host:port"``, a list or a comma-separated string; start them
    with ``dola-cpp rpc-server``) that the offloaded layers (``n_gpu_layers``) are split across.
    If one stops answering, calls raise ``DolaError`` and this model cannot be used again. ``adaptive_threads`` (default) computes with fewer than
    ``n_threads`` threads while other processes keep cores busy (see ``threads_in_use``).
    """

    def __init__(
        self,
        path: Union[str, os.PathLike],
        n_ctx: int = 2048,
        n_threads: Optional[int] = None,
        n_gpu_layers: int = -1,
        *,
        n_batch: int = 512,
        kv_type: str = "f16",
        capture: bool = True,
        use_mmap: bool = True,
        repack: bool = True,
        no_host: bool = False,
        adaptive_threads: bool = True,
        rpc: Union[str, Sequence[str], None] = None,
        _weights: Optional[_core.Model] = None,
    ) -> None:
        self.path = Path(path)
        if _weights is None:
            if not self.path.exists():
                raise FileNotFoundError(f"model file not found: {self.path} (give a path to a .gguf file)")
            if self.path.is_dir():
                raise IsADirectoryError(f"{self.path} is a directory; give the path of a .gguf file")
            _weights = _core.Model(str(self.path), n_gpu_layers=int(n_gpu_layers), use_mmap=use_mmap,
                                   repack=bool(repack), rpc=rpc_endpoints(rpc), no_host=bool(no_host))
        if not 0 <= n_ctx < 2**31:
            raise ValueError(f"n_ctx must be in 0..{2**31 - 1} (0 = the model's training context), got {n_ctx}")
        if n_threads is not None and not 1 <= n_threads <= 512:
            raise ValueError(f"n_threads must be in 1..512, got {n_threads}")
        if not 1 <= n_batch < 2**31:
            raise ValueError(f"n_batch must be in 1..{2**31 - 1}, got {n_batch}")
        self._weights = _weights
        self._session = _core.Session(
            _weights, n_ctx=int(n_ctx), n_threads=int(n_threads or 0), n_batch=int(n_batch), kv_type=kv_type,
            capture=capture, adaptive_threads=bool(adaptive_threads),
        )
        self._kv_type = kv_type
        self._capture = capture
        self._claim = Claim()

    # ------------------------------------------------------------------ properties

    @property
    def n_layers(self) -> int:
        """Number of transformer blocks N (layer N = the final logits)."""
        return self._weights.n_layer

    @property
    def n_vocab(self) -> int:
        return self._weights.n_vocab

    @property
    def n_embd(self) -> int:
        return self._weights.n_embd

    @property
    def n_ctx(self) -> int:
        return self._session.n_ctx

    @property
    def n_threads(self) -> int:
        """The most threads this context computes with."""
        return self._session.n_threads

    @property
    def threads_in_use(self) -> int:
        """Threads the last decode used: fewer than ``n_threads`` while other processes keep
        cores busy (ggml's threads wait for each other at every graph node, so one thread on a
        contended core stalls them all)."""
        return self._session.threads_in_use

    @property
    def projection_backend(self) -> str:
        """Where the early-exit projection runs and which buffer type holds the output matrix
        ("" until a generation or ``layer_logits`` first needs it; plain decoding makes it only
        where dola-cpp's own kernel reads the output matrix)."""
        return self._session.projection_backend

    @property
    def eog_tokens(self) -> list[int]:
        """Every end-of-generation token of the GGUF (EOS, EOT, EOM, ...: llama.cpp's
        ``llama_vocab_is_eog``); generation ends at any of them."""
        return list(self._weights.eog_tokens)

    @property
    def uses_rpc(self) -> bool:
        """Whether layers live on RPC servers."""
        return self._weights.uses_rpc

    @property
    def n_ctx_train(self) -> int:
        return self._weights.n_ctx_train

    @property
    def architecture(self) -> str:
        return self._weights.architecture

    @property
    def tied_embeddings(self) -> bool:
        return self._weights.tied_embeddings

    @property
    def chat_template(self) -> str:
        return self._weights.chat_template

    @property
    def chat_template_supported(self) -> bool:
        """Whether the GGUF has a chat template that llama.cpp recognises (templates are matched
        against the formats llama.cpp knows, never executed)."""
        if not self.chat_template:
            return False
        try:
            self.apply_chat_template([{"role": "user", "content": "hi"}])
        except _core.Error:
            return False
        return True

    @property
    def description(self) -> str:
        return self._weights.description

    def metadata(self) -> dict[str, str]:
        return dict(self._weights.metadata())

    def share(self, n_ctx: Optional[int] = None, n_threads: Optional[int] = None) -> "Model":
        """Another context on the same loaded weights."""
        return Model(
            self.path,
            n_ctx=self.n_ctx if n_ctx is None else n_ctx,
            n_threads=n_threads or self._session.n_threads,
            kv_type=self._kv_type,
            capture=self._capture,
            adaptive_threads=self._session.adaptive_threads,
            _weights=self._weights,
        )

    # ------------------------------------------------------------------ tokens

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special`` adds BOS when the GGUF asks for it;
        ``parse_special`` makes special-token text (``<|im_end|>``) those tokens (False: text)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return list(self._weights.tokenize(checked_utf8(text), add_special, parse_special))

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        return self._weights.detokenize(np.asarray(list(tokens), dtype=np.int64), special).decode("utf-8", "replace")

    def check_token(self, token: int) -> None:
        """ValueError (the core's message) for an id outside the vocabulary."""
        self._weights.check_token(int(token))

    def check_grammar(self, grammar: str) -> None:
        """ValueError (``DolaError``, with llama.cpp's reason) when llama.cpp cannot decode this
        model with the GBNF text ``grammar`` (it does not parse, has no ``root`` rule, is
        left-recursive): what ``generate``/``stream`` raise for it."""
        if not isinstance(grammar, str):
            raise TypeError(f"grammar must be GBNF text (a str), got {type(grammar).__name__}")
        self._weights.check_grammar(grammar)

    def token_bytes(self, token: int) -> bytes:
        return self._weights.token_to_piece(int(token), False)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """Render ``[{"role": ..., "content": ...}]`` with the GGUF's chat template. llama.cpp matches
        the template against the formats it knows; the template text is never executed.
        Tokenizing the result parses special-token text inside the messages too: to generate
        from a chat, use :meth:`chat_tokens`."""
        return render_chat(self._weights, messages, add_generation_prompt)

    def chat_tokens(self, messages: Sequence[dict], template: Optional[bool] = None,
                    add_generation_prompt: bool = True) -> list[int]:
        """The token ids of a chat (``[{"role": ..., "content": ...}]``) ready for the answer.

        With the GGUF's chat template (``template`` None = when llama.cpp recognises it, True =
        required) only the template's markup is parsed for special tokens: message content is
        tokenized as text, so a message holding ``<|im_end|>`` cannot end its turn or forge
        another. Without one, a plain ``User: …`` / ``Assistant:`` transcript (stop it at
        :data:`dola_cpp.prompts.TRANSCRIPT_STOP`), all of it text."""
        messages = chat_messages(messages)
        use_template = self.chat_template_supported if template is None else template
        return chat_ids(self._weights, messages, use_template, add_generation_prompt)

    def _tokens(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        return list(self._weights.tokenize(text, add_special, parse_special))

    def _prompt_ids(self, prompt: Prompt, add_special: bool = True, parse_special: bool = True) -> list[int]:
        if isinstance(prompt, str):
            if prompt == "":
                raise ValueError("the prompt is empty")
            ids = self._tokens(checked_utf8(prompt, "prompt"), add_special, parse_special)
        else:
            arr = np.asarray(prompt)
            if arr.dtype.kind not in "iu" and arr.size:
                raise TypeError("a token-id prompt must contain integers")
            ids = [int(t) for t in arr.reshape(-1)]
        self.check_prompt(ids)
        return ids

    def check_prompt(self, ids: Sequence[int]) -> None:
        """Raise what decoding ``ids`` would: ValueError for no ids or one outside the vocabulary,
        PromptTooLongError when they leave no room in the context (the core's checks, run at the
        call rather than when decoding starts)."""
        try:
            self._session.check_prompt(ids)
        except _core.PromptTooLong as e:
            raise PromptTooLongError(e.n_tokens, e.n_ctx) from None

    # ------------------------------------------------------------------ layers

    def resolve_layers(self, layers: LayerSpec) -> LayerPlan:
        """What a layer spec ('high', 'low', [ints], '16,18,32') means for this model."""
        return resolve_layers(layers, self.n_layers, self.tied_embeddings)

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        prompt: Prompt,
        max_tokens: int = 256,
        *,
        config: Optional[DecodeConfig] = None,
        layers: LayerSpec = _UNSET,
        premature_norm: bool = _UNSET,
        relative_top: float = _UNSET,
        decoder: str = _UNSET,
        alpha: float = _UNSET,
        info_layer: Optional[int] = _UNSET,
        repetition_penalty: Optional[float] = _UNSET,
        eos_boost: float = _UNSET,
        temperature: float = _UNSET,
        top_k: int = _UNSET,
        top_p: float = _UNSET,
        min_p: float = _UNSET,
        seed: Optional[int] = _UNSET,
        dry_multiplier: float = _UNSET,
        dry_base: float = _UNSET,
        dry_allowed_length: int = _UNSET,
        dry_penalty_last_n: int = _UNSET,
        dry_sequence_breakers: Sequence[str] = _UNSET,
        frequency_penalty: float = _UNSET,
        presence_penalty: float = _UNSET,
        logit_bias: Mapping[int, float] = _UNSET,
        grammar: str = _UNSET,
        top_logprobs: int = _UNSET,
        json_schema: Optional[JsonSchema] = None,
        stop: Union[str, Sequence[str], None] = None,
        stop_loops: bool = False,
        ignore_eos: bool = False,
        add_special: bool = True,
        parse_special: bool = True,
        abstain_above: Optional[float] = None,
    ) -> GenerationResult:
        """Generate a completion (greedy unless ``temperature`` > 0).

        The decoding settings are a :class:`DecodeConfig` (``config``, default ``DecodeConfig()``:
        plain greedy decoding) with any of its fields given as keywords replacing the config's:
        ``layers``, ``premature_norm``, ``relative_top``, ``decoder`` ("dola" or "activation"),
        ``alpha``, ``info_layer``, ``repetition_penalty``, ``eos_boost``, ``temperature``,
        ``top_k``, ``top_p``, ``min_p``, ``seed``, ``dry_multiplier``, ``dry_base``,
        ``dry_allowed_length``, ``dry_penalty_last_n``, ``dry_sequence_breakers``,
        ``frequency_penalty``, ``presence_penalty``, ``logit_bias`` ({token id: bias}),
        ``grammar`` (GBNF text: the answer is text the grammar accepts, and ends where it is
        complete), ``top_logprobs`` (n: each step's ``top_logprobs``, ``dola_logprob`` and
        ``dola_top_logprobs``). ``json_schema`` (a dict or its JSON text) is a grammar made from a
        JSON schema (:func:`dola_cpp.json_schema_grammar`); not with ``grammar``. ``stop``: strings that end the answer (not
        included, even when they span tokens); ``stop_loops``: end with ``finish_reason="loop"``
        once the answer repeats a cycle of 3 or more tokens 4 times in a row (``dola_cpp.stream``);
        ``ignore_eos``: go on past end-of-generation
        tokens (every one the GGUF marks: EOS, EOT, ...); ``add_special``: BOS as the GGUF asks;
        ``parse_special``: a string prompt's special-token text (``<|im_end|>``) becomes those
        tokens, as a raw prompt written for the model expects (False: all of it is text). For
        chats with untrusted content use :meth:`chat_tokens`, which parses only the template's
        markup.

        Each step carries its ``risk`` and the result the answer's (``dola_cpp.risk``).
        ``abstain_above``: stop with ``finish_reason="abstained"`` (and the text so far) once the
        answer's running risk exceeds it (judged from the 4th token on, or when a shorter answer
        ends).
        """
        cfg = _config(config, layers=layers, premature_norm=premature_norm, relative_top=relative_top,
                      decoder=decoder, alpha=alpha, info_layer=info_layer,
                      repetition_penalty=repetition_penalty, eos_boost=eos_boost, temperature=temperature,
                      top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, dry_multiplier=dry_multiplier,
                      dry_base=dry_base, dry_allowed_length=dry_allowed_length, dry_penalty_last_n=dry_penalty_last_n,
                      dry_sequence_breakers=dry_sequence_breakers, frequency_penalty=frequency_penalty,
                      presence_penalty=presence_penalty, logit_bias=logit_bias, grammar=grammar,
                      top_logprobs=top_logprobs)
        cfg = config_with(cfg, json_schema)
        # nobody reads the pieces as they come: the core runs the token loop, GENERATE_AHEAD steps a call
        run = Stream(self._sequence(ahead=GENERATE_AHEAD), prompt, max_tokens, cfg, stop=stop, ignore_eos=ignore_eos,
                     add_special=add_special, parse_special=parse_special, abstain_above=abstain_above,
                     stop_loops=stop_loops)
        for _ in run:
            pass
        return run.result()

    def stream(
        self,
        prompt: Prompt,
        max_tokens: int = 256,
        *,
        config: Optional[DecodeConfig] = None,
        layers: LayerSpec = _UNSET,
        premature_norm: bool = _UNSET,
        relative_top: float = _UNSET,
        decoder: str = _UNSET,
        alpha: float = _UNSET,
        info_layer: Optional[int] = _UNSET,
        repetition_penalty: Optional[float] = _UNSET,
        eos_boost: float = _UNSET,
        temperature: float = _UNSET,
        top_k: int = _UNSET,
        top_p: float = _UNSET,
        min_p: float = _UNSET,
        seed: Optional[int] = _UNSET,
        dry_multiplier: float = _UNSET,
        dry_base: float = _UNSET,
        dry_allowed_length: int = _UNSET,
        dry_penalty_last_n: int = _UNSET,
        dry_sequence_breakers: Sequence[str] = _UNSET,
        frequency_penalty: float = _UNSET,
        presence_penalty: float = _UNSET,
        logit_bias: Mapping[int, float] = _UNSET,
        grammar: str = _UNSET,
        top_logprobs: int = _UNSET,
        json_schema: Optional[JsonSchema] = None,
        stop: Union[str, Sequence[str], None] = None,
        stop_loops: bool = False,
        ignore_eos: bool = False,
        add_special: bool = True,
        parse_special: bool = True,
        abstain_above: Optional[float] = None,
    ) -> "Stream":
        """Like :meth:`generate`, as an iterator of text pieces produced as they are decoded.

        The arguments are checked here, before the first piece. Closing the stream (or
        :meth:`cancel`) stops decoding; once it is exhausted, ``finish_reason`` says why it ended
        ("stop", "length", "abstained", "loop", "cancelled"), ``steps`` holds each token's diagnostics and ``result()``
        gives the whole result."""
        cfg = _config(config, layers=layers, premature_norm=premature_norm, relative_top=relative_top,
                      decoder=decoder, alpha=alpha, info_layer=info_layer,
                      repetition_penalty=repetition_penalty, eos_boost=eos_boost, temperature=temperature,
                      top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, dry_multiplier=dry_multiplier,
                      dry_base=dry_base, dry_allowed_length=dry_allowed_length, dry_penalty_last_n=dry_penalty_last_n,
                      dry_sequence_breakers=dry_sequence_breakers, frequency_penalty=frequency_penalty,
                      presence_penalty=presence_penalty, logit_bias=logit_bias, grammar=grammar,
                      top_logprobs=top_logprobs)
        cfg = config_with(cfg, json_schema)
        return Stream(self._sequence(), prompt, max_tokens, cfg, stop=stop, ignore_eos=ignore_eos,
                      add_special=add_special, parse_special=parse_special, abstain_above=abstain_above,
                      stop_loops=stop_loops)

    def batch(self, parallel: int = 4, *, n_threads: Optional[int] = None, n_batch: int = 512,
              cache_mib: float = DEFAULT_CACHE_MIB) -> Batch:
        """A :class:`~dola_cpp.batch.Batch`: ``parallel`` generations at once on one new llama.cpp
        context of these weights (continuous batching), each sequence ``n_ctx`` positions long;
        ``n_threads``: default all cores (fewer while other processes keep cores busy, as this
        model's ``adaptive_threads``). Its streams decode together on the batch's own thread.
        ``cache_mib``: host memory (MiB) for its prompt cache: the KV cells of a sequence about to
        be reused are saved there, and a later prompt that begins like a saved one (the next turn
        of a chat, a question asked again) starts from them instead of decoding that prefix again,
        with the same results; 0 turns it off (it is off anyway for recurrent, hybrid and
        sliding-window models)."""
        for name, value, low, high in (("parallel", parallel, 1, 256), ("n_batch", n_batch, 1, 2**31 - 1)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer in {low}..{high}, got {value!r}")
        if n_threads is not None and not 1 <= n_threads <= 512:
            raise ValueError(f"n_threads must be in 1..512, got {n_threads}")
        if isinstance(cache_mib, bool) or not isinstance(cache_mib, (int, float)) or not 0 <= cache_mib <= 2**20:
            raise ValueError(f"cache_mib must be a number of MiB in 0..1048576, got {cache_mib!r}")
        engine = _core.BatchEngine(self._weights, n_ctx=self.n_ctx, n_seq=parallel, n_threads=int(n_threads or 0),
                                   n_batch=n_batch, kv_type=self._kv_type, capture=self._capture,
                                   adaptive_threads=self._session.adaptive_threads, cache_mib=float(cache_mib))
        return Batch(engine, self._weights, self._prompt_ids, self.resolve_layers)

    def generate_batch(self, prompts: Sequence[Prompt], max_tokens: int = 256, *, parallel: Optional[int] = None,
                       configs: Optional[Sequence[DecodeConfig]] = None, **kwargs: Any) -> list[GenerationResult]:
        """Each prompt's :class:`GenerationResult` (as :meth:`generate` gives it), decoded together
        on one context of ``parallel`` sequences (default: as many as prompts, at most 8; more
        prompts wait their turn). ``configs``: one :class:`DecodeConfig` per prompt; otherwise
        ``config`` and :meth:`generate`'s keywords apply to every prompt."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of prompts, not one string")
        prompts = list(prompts)
        if not prompts:
            return []
        batch = self.batch(parallel or min(len(prompts), 8))
        return batch.generate(prompts, max_tokens, configs=configs, **kwargs)

    def cancel(self) -> None:
        """Stop the running generation (callable from any thread)."""
        self._claim.cancel()
        self._session.cancel()

    def clear_cache(self) -> None:
        """Forget the KV cache: the next call prefills its whole prompt (benchmarks use it to time
        prefill and decoding from a cold start)."""
        with self._claim:
            self._session.clear()

    # ------------------------------------------------------------------ analysis

    def layer_logits(self, prompt: Prompt, layers: Sequence[int], premature_norm: bool = False) -> np.ndarray:
        """Logits of each layer at the last prompt position, ``[len(layers), n_vocab]``. Layer N is
        the model's own logits; others are the raw hidden state through the output matrix
        (through the final norm first with ``premature_norm=True``)."""
        ids = self._prompt_ids(prompt)
        layers = [int(layer) for layer in layers]  # the core checks their range
        with self._claim:
            return self._session.layer_logits(ids, layers, premature_norm, False)

    def _project_final(self, prompt: Prompt, premature_norm: bool = True) -> np.ndarray:
        """Self-check: the last block's hidden state through our projection (≈ the logits)."""
        ids = self._prompt_ids(prompt)
        with self._claim:
            return self._session.layer_logits(ids, [self.n_layers], premature_norm, True)[0]

    def score(
        self,
        prefix: Prompt,
        continuation: Prompt,
        layers: LayerSpec = _UNSET,
        relative_top: float = 0.0,
        post_softmax: bool = False,
        premature_norm: bool = _UNSET,
        relative_top_value: float = -1000.0,
        *,
        decoder: str = _UNSET,
        alpha: float = _UNSET,
        info_layer: Optional[int] = _UNSET,
        config: Optional[DecodeConfig] = None,
        top_logprobs: int = 0,
    ) -> ScoreResult:
        """Teacher-forced score of ``continuation`` after ``prefix`` in one forward pass, as the DoLa
        repo's ``lm_score``: plain = sum of log-probs; DoLa = sum of
        ``log_softmax(z_N) - log_softmax(z_prem)`` with the premature layer chosen per position by
        JSD (optionally post-softmaxed and relative-top masked with ``relative_top_value``).

        Strings are tokenized as the repo does: ``tokens(prefix + continuation)`` split after
        ``len(tokens(prefix))``. Token-id lists are used as given. The prefix's KV cache is reused
        between calls that share it. ``layers``, ``premature_norm``, ``decoder``, ``alpha`` and
        ``info_layer`` may come from ``config`` (a :class:`DecodeConfig`); its sampling fields do
        not apply to scoring.

        ``decoder="activation"`` adds Activation Decoding's ``-alpha * H[y]`` to each token's
        score, with H over every position of prefix and continuation (the reference's
        ``lm_score``; its relative-top mask is computed there but not applied, so none is here).

        ``top_logprobs`` (0..20): each continuation token's ``top_tokens`` are the mature
        distribution's n most probable tokens there, as (id, log-prob). To score every token of a
        text but the first (which nothing predicts), give token ids: ``prefix=ids[:1]``,
        ``continuation=ids[1:]``; ``mature_logprobs`` are then log p(ids[i] | ids[:i]).
        """
        return self.score_batch(
            prefix, [continuation], layers, relative_top, post_softmax, premature_norm, relative_top_value,
            decoder=decoder, alpha=alpha, info_layer=info_layer, config=config, top_logprobs=top_logprobs,
        )[0]

    def score_batch(
        self,
        prefix: Prompt,
        continuations: Sequence[Prompt],
        layers: LayerSpec = _UNSET,
        relative_top: float = 0.0,
        post_softmax: bool = False,
        premature_norm: bool = _UNSET,
        relative_top_value: float = -1000.0,
        *,
        decoder: str = _UNSET,
        alpha: float = _UNSET,
        info_layer: Optional[int] = _UNSET,
        config: Optional[DecodeConfig] = None,
        top_logprobs: int = 0,
    ) -> list[ScoreResult]:
        """:meth:`score` of each of ``continuations`` after the same ``prefix`` (the answers of one
        question), with the same options, in one list. The prefix is decoded once; the
        continuations are decoded side by side in the same llama.cpp calls, as sequences of their
        own on the prefix's cached cells (shared, not recomputed). Each result equals its
        :meth:`score` up to float rounding (llama.cpp's attention sums over cache cells in another
        order when other sequences' cells lie between them)."""
        if isinstance(continuations, (str, bytes)):
            raise TypeError("continuations must be a list of strings or of token-id lists, not one string")
        texts = [self._score_ids(prefix, c) for c in continuations]
        if not texts:
            return []
        cfg = _config(config, layers=layers, premature_norm=premature_norm, decoder=decoder, alpha=alpha,
                      info_layer=info_layer, top_logprobs=top_logprobs)
        if cfg.grammar:  # scoring follows the given tokens: nothing to constrain
            cfg = cfg.replace(grammar="")
        plan = self.resolve_layers(cfg.dola.layers)
        params = cfg.to_core(plan, self.n_layers)
        with self._claim:
            self._session.configure(params)
            rs = self._session.score_batch([ids for ids, _ in texts], [n for _, n in texts], post_softmax,
                                           float(relative_top), float(relative_top_value))
        return [
            ScoreResult(
                score=float(r.total),
                token_scores=np.asarray(r.token_scores, dtype=np.float32),
                premature_layers=[None if layer < 0 else layer for layer in r.premature_layers],
                continuation_tokens=ids[n_prefix:],
                mature_logprobs=np.asarray(r.mature_logprobs, dtype=np.float32),
                top_logprobs=np.asarray(r.top_logprobs, dtype=np.float32),
                entropies=np.asarray(r.entropies, dtype=np.float32),
                jsd=np.asarray(r.jsd, dtype=np.float32),
                top_tokens=[[(int(t), float(lp)) for t, lp in row] for row in r.top_tokens],
            )
            for r, (ids, n_prefix) in zip(rs, texts)
        ]

    def _score_ids(self, prefix: Prompt, continuation: Prompt) -> tuple[list[int], int]:
        """The tokens of ``prefix + continuation`` and where the continuation begins, as the DoLa
        repo splits them (see :meth:`score`)."""
        if isinstance(prefix, str) != isinstance(continuation, str):
            raise TypeError("prefix and continuation must both be strings or both be token ids")
        if isinstance(prefix, str):
            if not continuation:
                raise ValueError("the continuation is empty")
            prefix_ids = self._prompt_ids(prefix)
            ids = self._prompt_ids(prefix + continuation)
        else:
            prefix_ids = self._prompt_ids(prefix)
            cont = [int(t) for t in np.asarray(continuation).reshape(-1)]
            if not cont:
                raise ValueError("the continuation is empty")
            ids = self._prompt_ids(prefix_ids + cont)
        n_prefix = len(prefix_ids)
        if n_prefix >= len(ids):
            raise ValueError("the continuation adds no tokens to the prefix")
        return ids, n_prefix

    # ------------------------------------------------------------------ internals

    def _sequence(self, ahead: int = 1) -> SessionSequence:
        """This context as the sequence of one generation, on the session the model holds now."""
        return SessionSequence(self._session, self._weights, self._claim, self._prompt_ids, self.resolve_layers,
                               ahead=ahead)

    def timings(self) -> dict:
        return self._session.timings()


def _config(config: Optional[DecodeConfig], **fields: Any) -> DecodeConfig:
    """``config`` (default: plain greedy) with the keywords the caller passed replacing its fields."""
    return config_with(config, **{k: v for k, v in fields.items() if v is not _UNSET})
