"""The engine on the real default model (SmolLM2-135M-Instruct Q4_1)."""

import collections
import signal
import threading
import time

import numpy as np
import pytest

import dola_cpp
from dola_cpp import DolaError, Model
from dola_cpp.model import GENERATE_AHEAD

PROMPT = "Q: What is the capital of France?\nA:"


def test_model_properties(smollm2):
    assert smollm2.architecture == "llama"
    assert smollm2.n_layers == 30
    assert smollm2.n_vocab == 49152
    assert smollm2.tied_embeddings
    assert smollm2.n_ctx == 1024
    assert "im_start" in smollm2.chat_template


def test_generate_answers(smollm2):
    r = smollm2.generate(PROMPT, max_tokens=12)
    assert "Paris" in r.text
    assert 0 < len(r.tokens) <= 12
    assert r.text == smollm2.detokenize(r.tokens)
    assert r.prompt_tokens == len(smollm2.tokenize(PROMPT))
    assert all(s.premature_layer is None and s.jsd.size == 0 for s in r.steps)
    # greedy is deterministic, also when the KV cache is reused
    assert smollm2.generate(PROMPT, max_tokens=12).tokens == r.tokens


def test_prompt_as_token_ids_is_used_as_given(smollm2):
    ids = smollm2.tokenize(PROMPT)
    assert smollm2.generate(ids, max_tokens=8).tokens == smollm2.generate(PROMPT, max_tokens=8).tokens
    assert smollm2.generate(np.array(ids), max_tokens=8).tokens == smollm2.generate(PROMPT, max_tokens=8).tokens


def test_max_tokens_and_ignore_eos(smollm2):
    r = smollm2.generate(PROMPT, max_tokens=40, ignore_eos=True)
    assert len(r.tokens) == 40 and r.finish_reason == "length"
    assert smollm2.generate(PROMPT, max_tokens=0).tokens == []


def test_stops_at_end_of_turn(smollm2):
    chat = smollm2.apply_chat_template(
        [
            {"role": "system", "content": "You are a helpful AI assistant named SmolLM, trained by Hugging Face"},
            {"role": "user", "content": "Say hello."},
        ]
    )
    r = smollm2.generate(chat, max_tokens=200)
    assert r.finish_reason == "stop" and len(r.tokens) < 200
    assert "<|im_end|>" not in r.text


def test_stop_strings(smollm2):
    full = smollm2.generate(PROMPT, max_tokens=30, ignore_eos=True).text
    word = full.split()[1]
    r = smollm2.generate(PROMPT, max_tokens=30, ignore_eos=True, stop=[word])
    assert r.finish_reason == "stop"
    assert r.text == full[: full.index(word)]
    assert "".join(smollm2.stream(PROMPT, max_tokens=30, ignore_eos=True, stop=[word])) == r.text


def test_stream_pieces_concatenate_to_generate(smollm2):
    pieces = list(smollm2.stream(PROMPT, max_tokens=20, ignore_eos=True))
    assert len(pieces) > 3
    assert "".join(pieces) == smollm2.generate(PROMPT, max_tokens=20, ignore_eos=True).text


def test_sampling_is_seeded(smollm2):
    kw = dict(max_tokens=16, temperature=0.9, top_k=40, top_p=0.95, ignore_eos=True)
    a = smollm2.generate(PROMPT, seed=7, **kw)
    b = smollm2.generate(PROMPT, seed=7, **kw)
    c = smollm2.generate(PROMPT, max_tokens=16, temperature=1.5, seed=8, ignore_eos=True)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens
    # the seed alone changes the sample (the same settings otherwise), and a sample is not greedy
    samples = {tuple(smollm2.generate(PROMPT, seed=seed, **kw).tokens) for seed in (1, 2, 3, 4)}
    assert len(samples) > 1
    greedy = tuple(smollm2.generate(PROMPT, max_tokens=16, ignore_eos=True).tokens)
    assert samples - {greedy}


@pytest.mark.parametrize(
    "text",
    ["Hello, world!", "héllo wörld — naïve café", "日本語のテキスト", "emoji 🎉🦙 mix", "  leading spaces\n\ttabs"],
)
def test_tokenize_detokenize_round_trip(smollm2, text):
    ids = smollm2.tokenize(text, add_special=False)
    assert smollm2.detokenize(ids) == text


def test_multibyte_utf8_split_across_tokens_streams_whole_characters(smollm2):
    text = "🦙"
    ids = smollm2.tokenize(text, add_special=False)
    pieces = [smollm2.token_bytes(t) for t in ids]
    assert len(ids) > 1 and all(p != text.encode() for p in pieces)  # the emoji spans several tokens
    with pytest.raises(UnicodeDecodeError):
        pieces[0].decode("utf-8")
    # stream a prompt that makes the model repeat the emoji: no piece holds a broken character
    prompt = smollm2.tokenize("Repeat: 🦙🦙🦙🦙 🦙🦙🦙🦙 🦙🦙🦙🦙", add_special=False)
    stream = smollm2.stream(prompt + ids, max_tokens=12, ignore_eos=True)
    out = list(stream)
    assert "\ufffd" not in "".join(out)
    # the model did generate the emoji, as tokens that are not whole characters on their own
    assert "🦙" in "".join(out)
    generated = [smollm2.token_bytes(t) for t in stream.result().tokens]
    assert any(not _is_utf8(piece) for piece in generated)
    assert "".join(out) == b"".join(generated).decode("utf-8")


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_invalid_utf8_is_replaced_not_raised(smollm2):
    ids = smollm2.tokenize("🦙", add_special=False)
    head = smollm2.token_bytes(ids[0])
    assert not _is_utf8(head)
    text = smollm2.detokenize(ids[:1])
    assert text and set(text) == {"\ufffd"}  # replaced, not dropped
    assert text == head.decode("utf-8", "replace")
    # the valid text around the broken bytes stays
    cat = smollm2.tokenize(" cat", add_special=False)
    mixed = smollm2.detokenize(cat + ids[:1] + cat)
    assert mixed == (b" cat" + head + b" cat").decode("utf-8", "replace") and mixed.count("\ufffd") >= 1


# ------------------------------------------------------------------------------- bad input


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="model file not found"):
        Model("/nonexistent/model.gguf")


def test_not_a_gguf(tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_text("this is not a model")
    with pytest.raises(DolaError, match="not a GGUF model file"):
        Model(p)


def test_truncated_gguf(smollm2_path, tmp_path):
    p = tmp_path / "truncated.gguf"
    with open(smollm2_path, "rb") as f:
        p.write_bytes(f.read(5_000_000))
    with pytest.raises(DolaError, match="truncated"):
        Model(p)


def test_truncated_header(smollm2_path, tmp_path):
    p = tmp_path / "header.gguf"
    with open(smollm2_path, "rb") as f:
        p.write_bytes(f.read(2000))
    with pytest.raises(DolaError, match="malformed or truncated"):
        Model(p)


def test_prompt_longer_than_context(smollm2):
    m = smollm2.share(n_ctx=64)
    assert m.n_ctx >= 64  # llama.cpp may round the context up
    with pytest.raises(ValueError, match=f"context holds {m.n_ctx}"):
        m.generate("word " * (m.n_ctx + 10), max_tokens=4)
    assert m.generate(PROMPT, max_tokens=4).tokens  # still usable


def test_generation_stops_when_the_context_is_full(smollm2):
    m = smollm2.share(n_ctx=32)
    ids = m.tokenize("word " * (m.n_ctx - 5))
    r = m.generate(ids, max_tokens=100, ignore_eos=True)
    assert r.finish_reason == "length" and len(ids) + len(r.tokens) == m.n_ctx + 1


@pytest.mark.parametrize("bad", [-1, 2.5, "10"])
def test_bad_max_tokens(smollm2, bad):
    with pytest.raises(ValueError, match="max_tokens"):
        smollm2.generate(PROMPT, max_tokens=bad)


@pytest.mark.parametrize("ids", [[1, 2, 49152], [-1], [10**12]])
def test_token_ids_outside_vocabulary(smollm2, ids):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        smollm2.generate(ids, max_tokens=2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        smollm2.detokenize(ids)


@pytest.mark.parametrize("prompt", ["", []])
def test_empty_prompt(smollm2, prompt):
    with pytest.raises(ValueError, match="prompt is empty"):
        smollm2.generate(prompt, max_tokens=2)


@pytest.mark.parametrize(
    "option, message",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-3), "top_k"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(layers="4,99"), "valid layers are 0..30"),
        (dict(layers="high", relative_top=1.5), "relative_top"),
    ],
)
def test_bad_options(smollm2, option, message):
    with pytest.raises(ValueError, match=message):
        smollm2.generate(PROMPT, max_tokens=2, **option)


def test_bad_constructor_arguments(smollm2_path):
    with pytest.raises(ValueError, match="n_ctx"):
        Model(smollm2_path, n_ctx=-5)
    with pytest.raises(DolaError, match="kv cache type"):
        Model(smollm2_path, kv_type="f8")


# ------------------------------------------------------------------------------- interruption


class CountingSession:
    """A model's core session with its calls counted, so that a test can wait for tokens (not for
    a time) and count what ran after an interrupt. Installed as ``Model._session``."""

    def __init__(self, session) -> None:
        self._session = session
        self.calls: collections.Counter = collections.Counter()

    def __getattr__(self, name):
        attr = getattr(self._session, name)
        if not callable(attr):
            return attr

        def counted(*args, **kwargs):
            self.calls[name] += 1
            return attr(*args, **kwargs)

        return counted


@pytest.fixture
def counted(smollm2_path):
    """A fresh model (n_ctx 2048, n_batch 2048: one prefill call for a long prompt) whose session
    calls are counted."""
    m = Model(smollm2_path, n_ctx=2048, n_batch=2048)
    m._session = CountingSession(m._session)
    return m


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt, as in a terminal, whatever this process inherited: a process
    started in the background by a shell without job control has SIGINT ignored (and Python then
    installs no handler)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


class Interrupter:
    """Sends SIGINT to the main thread as soon as ``condition()`` holds (checked every millisecond),
    once; records the session's calls of ``call`` at that moment. A context manager: on leaving, the
    watch ends, so no signal can reach a later test."""

    def __init__(self, session: CountingSession, condition, call: str = "sample") -> None:
        self.session, self.condition, self.call = session, condition, call
        self.sent_at: int | None = None
        self._stop = threading.Event()
        self._main = threading.main_thread().ident
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            if self.condition():
                self.sent_at = self.session.calls[self.call]
                signal.pthread_kill(self._main, signal.SIGINT)
                return
            time.sleep(0.001)

    def __enter__(self) -> "Interrupter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def state(self) -> str:
        """For a failure message: what was sent, and how this process handles SIGINT now."""
        return (f"sent after {self.sent_at} {self.call} calls (None: never), now {self.session.calls[self.call]}, "
                f"SIGINT handler {signal.getsignal(signal.SIGINT)!r}, "
                f"blocked: {signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])}")


def test_ctrl_c_during_prefill(smollm2_path, ctrl_c_raises):
    """With DoLa only the prompt's last ubatch is captured (test_capture_callback_only_where_rows_are_
    captured): a prefill stopped by Ctrl-C never reached it, and nothing was sampled. One thread,
    ~1800 tokens in one call: seconds of prefill on any machine; the signal goes 0.25 s after the
    call began."""
    m = Model(smollm2_path, n_ctx=2048, n_batch=2048, n_threads=1)
    s = m._session = CountingSession(m._session)
    long_prompt = m.tokenize("The quick brown fox jumps over the lazy dog. " * 180)
    assert 3 * 512 < len(long_prompt) < 2048  # several ubatches in the one prefill call
    started = {}

    def in_prefill():
        if s.calls["prefill"] and "t" not in started:
            started["t"] = time.monotonic()
        return "t" in started and time.monotonic() - started["t"] > 0.25

    with Interrupter(s, in_prefill) as ctrl_c:
        try:
            m.generate(long_prompt, max_tokens=1, layers="high")
            pytest.fail("the generation was not interrupted: " + ctrl_c.state())
        except KeyboardInterrupt:
            pass
    # stopped inside the prefill: its last ubatch never ran, nothing was sampled
    assert s.timings()["n_captured_ubatches"] == 0 and s.timings()["n_prefill"] == 0
    assert ctrl_c.sent_at == 0 and s.calls["sample"] == 0
    # the model stays usable, and the whole prompt then runs through to the captured last ubatch
    m.generate(long_prompt, max_tokens=1, layers="high")
    assert s.timings()["n_captured_ubatches"] == 1 and s.timings()["n_prefill"] == len(long_prompt)
    assert "Paris" in m.generate(PROMPT, max_tokens=8).text


def _answer(model, how: str):
    """A long answer, by Model.generate (the core's token loop: session.run, GENERATE_AHEAD steps a
    call) or by a stream read to its end (session.sample, a step a call); what counts its calls."""
    if how == "generate":
        return model.generate(PROMPT, max_tokens=5000, ignore_eos=True)
    stream = model.stream(PROMPT, max_tokens=5000, ignore_eos=True)
    for _ in stream:
        pass
    return stream.result()


CALL = {"generate": "run", "stream": "sample"}
# the calls after which a test stops it: generate's second call of the loop, a stream's fifth step
STOP_AFTER = {"generate": 2, "stream": 5}


@pytest.mark.parametrize("how", list(CALL))
def test_ctrl_c_during_decode(counted, ctrl_c_raises, how):
    """Ctrl-C after the fifth step (generate: in its second call of the core's loop) stops the
    generation at the call in flight: none begins after it, and that one stops at its token."""
    s = counted._session
    call = CALL[how]
    with Interrupter(s, lambda: s.calls[call] >= STOP_AFTER[how], call) as ctrl_c:
        try:
            _answer(counted, how)
            pytest.fail("the generation was not interrupted: " + ctrl_c.state())
        except KeyboardInterrupt:
            pass
    assert s.calls[call] - ctrl_c.sent_at <= 1  # at most the call in flight, then it stopped
    if how == "generate":
        assert s.calls[call] == ctrl_c.sent_at  # the signal came inside a call: it ended there
        assert s.n_cached < len(counted.tokenize(PROMPT)) + GENERATE_AHEAD * s.calls[call]
    assert "Paris" in counted.generate(PROMPT, max_tokens=8).text


@pytest.mark.parametrize("how", list(CALL))
def test_cancel_from_another_thread(counted, how):
    s = counted._session
    call = CALL[how]
    out = {}

    def work():
        out["r"] = _answer(counted, how)

    t = threading.Thread(target=work)
    t.start()
    deadline = time.monotonic() + 300  # a hang guard, not a bound
    while s.calls[call] < STOP_AFTER[how] and t.is_alive() and time.monotonic() < deadline:
        time.sleep(0.001)
    at = s.calls[call]
    counted.cancel()
    t.join(timeout=300)
    assert not t.is_alive()
    r = out["r"]
    per_call = GENERATE_AHEAD if how == "generate" else 1
    assert r.finish_reason == "cancelled" and STOP_AFTER[how] <= at
    assert len(r.tokens) <= at * per_call < 5000
    assert s.calls[call] - at <= 1  # the call in flight at most
    assert "Paris" in counted.generate(PROMPT, max_tokens=8).text


def test_closing_a_stream_says_cancelled(smollm2):
    """docs/usage.md, "Threads and apps": "closing a stream ... stops it promptly ... (the stream's finish_reason is then
    "cancelled")"."""
    it = smollm2.stream(PROMPT, max_tokens=100, ignore_eos=True)
    next(it)
    next(it)
    it.close()
    assert len(it.result().tokens) < 100
    assert it.finish_reason == "cancelled" and it.result().finish_reason == "cancelled"


def test_closing_a_stream_frees_the_model(smollm2):
    it = smollm2.stream(PROMPT, max_tokens=100, ignore_eos=True)
    next(it)
    with pytest.raises(RuntimeError, match="already generating"):
        smollm2.generate(PROMPT, max_tokens=2)
    it.close()
    assert smollm2.generate(PROMPT, max_tokens=4).tokens


def test_a_stream_left_by_an_exception_in_the_loop_frees_the_model(smollm2):
    """Ctrl-C (or any exception) in the caller's loop body leaves the stream suspended, in a cycle
    with its generator: the next call on the model still runs."""
    import gc

    def consume():
        for n, _ in enumerate(smollm2.stream(PROMPT, max_tokens=100, ignore_eos=True)):
            if n == 2:
                raise KeyboardInterrupt  # raised in the loop body, not inside the stream

    gc.disable()  # the cycle must be collected by the claim, not by a collection that happens to run
    try:
        with pytest.raises(KeyboardInterrupt):
            consume()
        assert smollm2.generate(PROMPT, max_tokens=4).tokens
    finally:
        gc.enable()
    # a stream still referenced keeps its claim
    it = smollm2.stream(PROMPT, max_tokens=100, ignore_eos=True)
    next(it)
    with pytest.raises(RuntimeError, match="already generating"):
        smollm2.generate(PROMPT, max_tokens=2)
    it.close()


# ------------------------------------------------------------------------------- several models


def test_two_models_and_shared_weights(smollm2_path, smollm2):
    other = Model(smollm2_path, n_ctx=256)
    shared = smollm2.share(n_ctx=256)
    expected = smollm2.generate(PROMPT, max_tokens=10).tokens
    assert other.generate(PROMPT, max_tokens=10).tokens == expected
    assert shared.generate(PROMPT, max_tokens=10).tokens == expected


def test_threads_generate_concurrently(smollm2):
    a, b = smollm2.share(n_ctx=256, n_threads=1), smollm2.share(n_ctx=256, n_threads=1)
    expected = a.generate(PROMPT, max_tokens=30, ignore_eos=True).tokens
    results = {}

    def run(name, m):
        results[name] = m.generate(PROMPT, max_tokens=30, ignore_eos=True).tokens

    threads = [threading.Thread(target=run, args=(n, m)) for n, m in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {"a": expected, "b": expected}


def _longest_pause(step) -> tuple[float, float, int]:
    """Run ``step`` in another thread while this one ticks (sleeping 0.5 ms between ticks): the
    step's duration, the longest interval without a tick during it, and the ticks during it. A step
    that holds the GIL stops the ticks for its whole duration."""
    done = threading.Event()
    span = []

    def work():
        t0 = time.perf_counter()
        step()
        span.extend([t0, time.perf_counter()])
        done.set()

    ticks = []
    worker = threading.Thread(target=work)
    worker.start()
    while not done.is_set():
        ticks.append(time.perf_counter())
        time.sleep(0.0005)
    worker.join()
    t0, t1 = span
    inside = [t for t in ticks if t0 <= t <= t1]
    edges = [t0] + inside + [t1]
    return t1 - t0, max(b - a for a, b in zip(edges, edges[1:])), len(inside)


def test_a_long_core_call_does_not_hold_the_gil(smollm2):
    """One C++ call long enough to measure (the prefill of a 200-token prompt, on one thread): Python
    in another thread keeps running through it. The control, a C loop that keeps the GIL
    (``sum`` over a range), stops it for the whole call: the measurement would see a held GIL."""
    m = smollm2.share(n_ctx=512, n_threads=1)
    ids = m.tokenize("The quick brown fox jumps over the lazy dog. " * 20)
    assert len(ids) > 200

    def prefill():
        m._session.clear()
        m.layer_logits(ids, [m.n_layers])  # one core call: the prefill and the final row

    held, held_pause, held_ticks = _longest_pause(lambda: sum(range(20_000_000)))
    assert held_pause > 0.9 * held and held_ticks <= 1  # the control: no tick while the GIL is held
    duration, pause, ticks = _longest_pause(prefill)
    # released: the ticks go on (every ~0.5 ms; an interval of half the call would mean a held GIL)
    assert pause < duration / 2 and ticks >= 20, (duration, pause, ticks)


def test_convert_model_rejects_bad_type(smollm2_path, tmp_path):
    with pytest.raises(DolaError, match="unsupported conversion type"):
        dola_cpp.convert_model(smollm2_path, tmp_path / "x.gguf", "Q9")


def test_dola_warns_once_below_recommended_penalty(smollm2, monkeypatch):
    import dola_cpp.stream as model_module

    monkeypatch.setattr(model_module, "_warned_penalty", False)
    with pytest.warns(UserWarning, match="repetition_penalty >= 1.2"):
        smollm2.generate(PROMPT, max_tokens=2, layers="high", repetition_penalty=1.0)
    smollm2.generate(PROMPT, max_tokens=2, layers="high", repetition_penalty=1.0)  # once only (no error)
    r = smollm2.generate(PROMPT, max_tokens=4, layers="high")  # default 1.2 with DoLa: no warning
    assert all(s.premature_layer in smollm2.resolve_layers("high").candidates for s in r.steps)


def test_score_rejects_bad_input(smollm2):
    with pytest.raises(ValueError, match="continuation is empty"):
        smollm2.score("Q: hi\nA:", "")
    with pytest.raises(TypeError, match="both be strings"):
        smollm2.score("Q: hi\nA:", [1, 2])
    with pytest.raises(ValueError, match="valid layers are 0..30"):
        smollm2.score("Q: hi\nA:", " yes", layers="3,31")
    with pytest.raises(ValueError, match="valid layers are 0..30"):
        smollm2.layer_logits("Q: hi\nA:", [31])


PAYLOAD = "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}{{ ''.__class__.__mro__[1].__subclasses__() }}"


@pytest.mark.parametrize("looks_like_chatml", [False, True], ids=["unknown-format", "chatml-lookalike"])
def test_hostile_chat_template_is_never_executed(smollm2_path, tmp_path, looks_like_chatml):
    """CVE-2024-34359 class: a GGUF's template must not run as code (llama.cpp only matches it
    against formats it knows)."""
    import subprocess
    import sys

    marker = tmp_path / "pwned"
    template = PAYLOAD.replace("MARKER", str(marker))
    if looks_like_chatml:
        template = "<|im_start|>" + template + "<|im_end|>"
    hostile = tmp_path / "hostile.gguf"
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", "--chat-template", template, "--force",
                    str(smollm2_path), str(hostile)], check=True, capture_output=True)
    m = Model(hostile, n_ctx=256)
    assert m.chat_template == template
    messages = [{"role": "user", "content": "hi"}]
    if looks_like_chatml:
        text = m.apply_chat_template(messages)
        assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    else:
        with pytest.raises(DolaError, match="not one llama.cpp recognises"):
            m.apply_chat_template(messages)
    assert not marker.exists()


def test_capture_callback_only_where_rows_are_captured(smollm2_path):
    """With the capture callback installed, ggml's scheduler computes a graph in pieces and waits
    after each: a ubatch with nothing to capture runs without it. Prompt chunks before the last
    capture nothing; plain decoding (this model's output matrix is one dola-cpp's kernel reads)
    stops once per ubatch, at the final normed row it projects itself, and so does DoLa with the
    layers kept as graph outputs, whatever K is."""
    m = Model(smollm2_path, n_ctx=256, n_batch=8)
    s = m._session
    prompt = "The history of the Roman Empire spans more than a thousand years, from its founding to its fall"
    n_prompt = len(m.tokenize(prompt))
    assert n_prompt > 16  # at least three chunks of 8
    plain = m.generate(prompt, max_tokens=6, ignore_eos=True)
    # the prompt's last chunk, then each of the 5 decoded tokens
    assert s.timings()["n_captured_ubatches"] == 1 + 5
    assert s.timings()["n_capture_splits"] == 1 + 5
    s.reset_timings()
    s.clear()
    high = m.generate(prompt, max_tokens=6, ignore_eos=True, layers="high")
    assert s.timings()["n_captured_ubatches"] == 1 + 5
    k = len(m.resolve_layers("high").candidates)
    outputs = dola_cpp._core.capture_mode() == "outputs"
    assert s.timings()["n_capture_splits"] == (1 + 5) * (1 if outputs else k + 1)
    # normed premature rows join the fused final row too (normed on the host first)
    s.reset_timings()
    s.clear()
    m.generate(prompt, max_tokens=6, ignore_eos=True, layers="high", premature_norm=True)
    assert s.timings()["n_capture_splits"] == (1 + 5) * (1 if outputs else k + 1)
    s.reset_timings()
    s.clear()
    assert m.generate(prompt, max_tokens=6, ignore_eos=True).tokens == plain.tokens
    assert s.timings()["n_captured_ubatches"] == 1 + 5
    assert s.timings()["n_capture_splits"] == 1 + 5
    # Activation Decoding keeps llama.cpp's logits: its prompt chunks capture the context layer
    s.reset_timings()
    s.clear()
    m.generate(prompt, max_tokens=6, ignore_eos=True, decoder="activation")
    assert s.timings()["n_capture_splits"] == (0 if outputs else -(-n_prompt // 8) + 5)
    # scoring takes the mature logits from llama.cpp: with outputs, no stop at all
    s.reset_timings()
    m.score("The capital of France is", " Paris, a city on the Seine.", layers="high")
    n = s.timings()["n_captured_ubatches"]
    assert n >= 1
    assert s.timings()["n_capture_splits"] == (0 if outputs else n * k)
    # the same DoLa tokens as a context whose every ubatch is small enough to capture
    one = Model(smollm2_path, n_ctx=256, n_batch=256)
    assert one.generate(prompt, max_tokens=6, ignore_eos=True, layers="high").tokens == high.tokens


def test_layers_kept_as_graph_outputs_grow_within_bounds(smollm2_path):
    """With the layers kept as graph outputs, a layer llama.cpp's graphs were not made with has
    them reserved and rebuilt (tens of milliseconds on a GPU). Layers once kept stay kept while
    they are at most twice those wanted (plus two), so requests taking turns between two layer sets
    rebuild nothing after each set's first use; a sweep over single layers starts again from the
    layer wanted instead of keeping every layer's output. Tokens are those of a fresh context."""
    if dola_cpp._core.capture_mode() != "outputs":
        pytest.skip("the eval callback copies the layers here (no graph outputs to rebuild)")
    m = Model(smollm2_path, n_ctx=256)
    s = m._session
    prompt = "The capital of France is"
    rebuilt = []
    results = {}
    sweep = [[1], [3], [5], [7], [9], [11]]
    for layers in ["high", "low", "high", "low", None, "high"] + sweep + ["high"]:
        r = m.generate(prompt, max_tokens=4, ignore_eos=True, layers=layers)
        results.setdefault(str(layers), []).append(r.tokens)
        rebuilt.append(s.timings()["n_graph_rebuilds"])
    assert rebuilt[:6] == [1, 2, 2, 2, 2, 2], rebuilt
    # the sweep: each new layer is a rebuild, and "high" is no longer kept after it
    assert rebuilt[6:12] == [3, 4, 5, 6, 7, 8] and rebuilt[12] == 9, rebuilt
    for layers, runs in results.items():
        assert all(t == runs[0] for t in runs), layers
    fresh = Model(smollm2_path, n_ctx=256)
    assert fresh.generate(prompt, max_tokens=4, ignore_eos=True, layers="low").tokens == results["low"][0]


def test_metadata_strings_with_invalid_utf8_decode_with_replacement_characters(tmp_path):
    """A GGUF's strings are bytes from an untrusted file: invalid UTF-8 in them reads with U+FFFD
    (as Python's "replace" decodes it), in every string the model exposes, never an exception."""
    from dola_cpp.synthetic import write_llama_gguf

    marker, broken = b"MARKER1", b"ab\xff\xfe\xc3(z"  # the same length: the file's offsets hold
    assert len(marker) == len(broken)
    path = write_llama_gguf(tmp_path / "ok.gguf", metadata={
        "general.name": "name MARKER1 end", "general.description": "MARKER1",
        "tokenizer.chat_template": "{{ MARKER1 }}"})
    data = path.read_bytes()
    assert data.count(marker) == 3
    bad = tmp_path / "bad-utf8.gguf"
    bad.write_bytes(data.replace(marker, broken))
    m = Model(bad, n_ctx=64, n_threads=1)
    text = broken.decode("utf-8", "replace")
    assert "\ufffd" in text
    assert m.metadata()["general.name"] == f"name {text} end"
    assert m.metadata()["general.description"] == text
    assert m.chat_template == "{{ " + text + " }}"
    assert m.generate("the", max_tokens=2).tokens  # and the model works
