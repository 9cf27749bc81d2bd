"""``dola-cpp serve``: the OpenAI-compatible server, driven by the official ``openai`` client on
loopback, under load, with bad requests and with clients that go away."""

import concurrent.futures
import http.client
import json
import socket
import threading
import time

import pytest

import dola_cpp

import openai  # the test extra's: plain imports, so that a missing package fails the suite
import uvicorn

from dola_cpp.server import create_app

QUESTIONS = [
    "What is the capital of France?", "Who wrote Hamlet?", "What is 2 + 2?", "Name a planet.",
    "What colour is the sky?", "What is the largest ocean?", "Who painted the Mona Lisa?", "What is water made of?",
]


class Response:
    def __init__(self, r: http.client.HTTPResponse) -> None:
        self.status_code = r.status
        self.headers = {k.lower(): v for k, v in r.getheaders()}
        self.text = r.read().decode()

    def json(self):
        return json.loads(self.text)


def request(url: str, method: str = "GET", path: str = "/health", body=None, headers=None) -> Response:
    """One HTTP request with the standard library (raw bodies included)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        return Response(conn.getresponse())
    finally:
        conn.close()


class Server:
    """uvicorn serving ``app`` on a free loopback port, in a thread of this process."""

    def __init__(self, app) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"
        self.clients: list = []

    def client(self, **kw) -> "openai.OpenAI":
        c = openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)
        self.clients.append(c)  # closed with the server: no sockets left to the garbage collector
        return c

    def stop(self) -> None:
        for c in self.clients:
            c.close()
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def weights(smollm2_path):
    return dola_cpp.Model(smollm2_path, n_ctx=512, n_threads=1)


@pytest.fixture(scope="module")
def server(weights):
    s = Server(create_app(weights, parallel=4, max_queue=64))
    yield s
    s.stop()


class Recorder:
    """Installed as the server's batch's ``stream``: every generation on it must run to its budget
    (EOS ignored, no loop stop) unless it is cancelled, and is recorded; with ``gate``, a generation
    waits for it before starting (its sequence stays taken meanwhile)."""

    def __init__(self, batch: dola_cpp.batch.Batch, gate: threading.Event | None = None) -> None:
        self.real, self.gate, self.streams = batch.stream, gate, []
        batch.stream = self

    def __call__(self, *args, **kwargs):
        if self.gate is not None:
            assert self.gate.wait(timeout=300)
        kwargs["ignore_eos"] = True
        if "stop_loops" in kwargs:
            kwargs["stop_loops"] = False
        stream = self.real(*args, **kwargs)
        self.streams.append(stream)
        return stream

    def wait_for_tokens(self, n: int) -> None:
        """Until the latest generation has made ``n`` tokens (a hang guard, not a bound)."""
        deadline = time.monotonic() + 300
        while not (self.streams and len(self.streams[-1].steps) >= n):
            assert time.monotonic() < deadline, "the generation did not start"
            time.sleep(0.01)


def wait_until(predicate, what: str) -> None:
    """Poll ``predicate`` (a hang guard of 300 s, not a bound)."""
    deadline = time.monotonic() + 300
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def chat(client, question, **kw):
    return client.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1.gguf",
                                          messages=[{"role": "user", "content": question}], **kw)


# ---------------------------------------------------------------------------- the openai client


def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    health = request(server.url).json()
    assert health["status"] == "ok" and health["parallel"] == 4


def test_chat_plain_and_dola(server, weights):
    client = server.client()
    r = chat(client, "What is the capital of France?", temperature=0, max_tokens=24)
    assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # DoLa through extra_body: the same answer the library gives
    d = chat(client, "What is the capital of France?", temperature=0, max_tokens=16,
             extra_body={"dola_layers": "high", "premature_norm": True, "repetition_penalty": 1.2})
    prompt = weights.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ref = weights.generate(prompt, max_tokens=16, layers="high", premature_norm=True, repetition_penalty=1.2)
    assert d.choices[0].message.content == ref.text
    assert d.usage.completion_tokens == len(ref.tokens)


def test_chat_streaming_with_logprobs_and_risk(server):
    client = server.client()
    whole = chat(client, "Who wrote Hamlet?", temperature=0, max_tokens=20, logprobs=True,
                 extra_body={"risk": True})
    stream = chat(client, "Who wrote Hamlet?", temperature=0, max_tokens=20, stream=True,
                  stream_options={"include_usage": True}, logprobs=True, extra_body={"risk": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and "Shakespeare" in text
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    streamed_lp = [t.logprob for c in chunks if c.choices and c.choices[0].logprobs
                   for t in c.choices[0].logprobs.content]
    assert streamed_lp == pytest.approx([t.logprob for t in whole.choices[0].logprobs.content])
    assert all(lp <= 0 for lp in streamed_lp) and len(streamed_lp) == whole.usage.completion_tokens
    risk = whole.choices[0].model_extra["risk"]
    assert len(risk["tokens"]) == whole.usage.completion_tokens and 0 <= risk["answer"] <= 1
    assert risk["answer"] == pytest.approx(sum(risk["tokens"]) / len(risk["tokens"]))


def test_completions_and_stop(server):
    client = server.client()
    r = client.completions.create(model="SmolLM2-135M-Instruct.Q4_1.gguf", prompt="The capital of France is",
                                  max_tokens=12, temperature=0)
    full = r.choices[0].text
    assert "Paris" in full and r.choices[0].finish_reason in ("stop", "length")
    word = full.split()[1]
    s = client.completions.create(model="SmolLM2-135M-Instruct.Q4_1.gguf", prompt="The capital of France is",
                                  max_tokens=12, temperature=0, stop=[word], stream=True)
    text = "".join(c.choices[0].text for c in s)
    assert text == full[: full.index(word)]


def test_sampling_is_seeded(server):
    client = server.client()

    def story(**kw):
        return chat(client, "Tell me a story.", max_tokens=12, **kw).choices[0].message.content

    a = story(temperature=0.9, seed=5)
    assert a == story(temperature=0.9, seed=5)
    # the seed is used: another seed, another sample (of four, not all the same); and it samples
    samples = {story(temperature=0.9, seed=seed) for seed in (6, 7, 8, 9)} | {a}
    assert len(samples) > 1
    assert samples - {story(temperature=0)}


# ---------------------------------------------------------------------------- many clients


@pytest.mark.slow
def test_32_concurrent_streams_complete_and_match_alone(server):
    client = server.client(timeout=180)
    questions = [QUESTIONS[i % len(QUESTIONS)] + " " * (i // len(QUESTIONS)) for i in range(32)]
    kw = dict(temperature=0, max_tokens=12, extra_body={"dola_layers": "high", "premature_norm": True})
    alone = [chat(client, q, **kw).choices[0].message.content for q in questions]

    def one(q):
        stream = chat(client, q, stream=True, **kw)
        pieces, finish = [], None
        for c in stream:
            if c.choices:
                pieces.append(c.choices[0].delta.content or "")
                finish = c.choices[0].finish_reason or finish
        return "".join(pieces), finish

    seen = {"busy": 0, "waiting": 0}
    done = threading.Event()

    def watch():  # the server's own account of what runs at once
        while not done.is_set():
            h = request(server.url).json()
            seen["busy"], seen["waiting"] = max(seen["busy"], h["busy"]), max(seen["waiting"], h["waiting"])
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            results = list(pool.map(one, questions))
    finally:
        done.set()
        watcher.join()
    assert all(finish in ("stop", "length") for _, finish in results)
    assert [text for text, _ in results] == alone
    # the four contexts generated at once, and the others waited in the queue
    assert seen["busy"] == 4 and seen["waiting"] > 0, seen


COUNT = {"messages": [{"role": "user", "content": "Count to one thousand."}], "temperature": 0}


def test_a_full_queue_gets_503_with_retry_after(weights):
    app = create_app(weights.share(), parallel=1, max_queue=0)
    recorder = Recorder(app.state.pool.batch)
    s = Server(app)
    try:
        budget = 400
        busy = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
        busy.request("POST", "/v1/chat/completions", body=json.dumps({**COUNT, "max_tokens": budget, "stream": True}),
                     headers={"Content-Type": "application/json"})
        stream = busy.getresponse()
        assert stream.status == 200 and stream.readline().startswith(b"data: ")  # generating now
        r = request(s.url, "POST", "/v1/chat/completions", {**COUNT, "max_tokens": 4})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "server_busy"
        # the client goes away: its generation (which would run to its budget) is cancelled
        recorder.wait_for_tokens(3)
        busy.sock.shutdown(socket.SHUT_RDWR)
        busy.close()
        wait_until(lambda: not request(s.url).json()["busy"], "the context is free again")
        (gone,) = recorder.streams
        assert len(gone.tokens) < budget and gone.finish_reason != "length", (len(gone.tokens), gone.finish_reason)
        ok = request(s.url, "POST", "/v1/chat/completions", {**COUNT, "max_tokens": 4})
        assert ok.status_code == 200
    finally:
        s.stop()


def test_a_client_that_goes_away_cancels_its_whole_answer(weights):
    """The non-streaming path: the client closes its connection while the answer is generated."""
    app = create_app(weights.share(), parallel=1)
    recorder = Recorder(app.state.pool.batch)
    s = Server(app)
    try:
        budget = 400
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
        conn.request("POST", "/v1/chat/completions", body=json.dumps({**COUNT, "max_tokens": budget}),
                     headers={"Content-Type": "application/json"})
        recorder.wait_for_tokens(3)
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        wait_until(lambda: not request(s.url).json()["busy"], "the context is free again")
        (gone,) = recorder.streams
        assert len(gone.tokens) < budget and gone.finish_reason != "length", (len(gone.tokens), gone.finish_reason)
    finally:
        s.stop()


def test_streams_dropped_at_their_first_chunk_leave_every_sequence_free(weights):
    """A client that opens and drops 100 streams (and 32 at once after them): no sequence is
    leaked, /health says all are free, and the server keeps answering."""
    app = create_app(weights.share(), parallel=4, max_queue=32)
    s = Server(app)
    try:
        def drop() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
            conn.request("POST", "/v1/chat/completions", body=json.dumps({**COUNT, "max_tokens": 200, "stream": True}),
                         headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            assert r.status == 200 and r.readline().startswith(b"data: ")
            conn.sock.shutdown(socket.SHUT_RDWR)
            r.close()
            conn.close()

        for _ in range(100):
            drop()
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda _: drop(), range(32)))
        wait_until(lambda: request(s.url).json()["free"] == 4, "every sequence is free")
        assert request(s.url).json()["busy"] == 0
        wait_until(lambda: app.state.pool.batch.stats()["n_running"] == 0, "the engine runs nothing")
        ok = request(s.url, "POST", "/v1/chat/completions", {**COUNT, "max_tokens": 4})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
    finally:
        s.stop()


def test_the_queue_holds_four_per_context_by_default(weights):
    """create_app's default queue (and dola-cpp serve's without --queue): 4 x parallel requests may
    wait; the next gets 503. The one context is held (its generation waits for a gate) while the
    requests arrive."""
    gate = threading.Event()
    app = create_app(weights.share(), parallel=1)
    Recorder(app.state.pool.batch, gate=gate)
    s = Server(app)
    body = {**COUNT, "max_tokens": 2}
    try:
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            first = pool.submit(request, s.url, "POST", "/v1/chat/completions", body)
            wait_until(lambda: request(s.url).json()["busy"] == 1, "the context is taken")
            queued = [pool.submit(request, s.url, "POST", "/v1/chat/completions", body) for _ in range(4)]
            wait_until(lambda: request(s.url).json()["waiting"] == 4, "four requests wait")
            refused = request(s.url, "POST", "/v1/chat/completions", body)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_busy"
            gate.set()
            assert [f.result().status_code for f in [first, *queued]] == [200] * 5
    finally:
        gate.set()
        s.stop()


# ---------------------------------------------------------------------------- bad requests and safety


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"messages": [{"role": "user", "content": "hi"}], "colour": "blue"}, 400, "colour"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "dola_layers": "99"}, 400, "dola_layers"),
    ({"messages": [{"role": "user", "content": "hi"}], "dola_layers": "1,,2"}, 400, "dola_layers"),
    ({"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"messages": [{"role": "user", "content": "hi"}], "decoder": "magic"}, 400, "decoder"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 17}, 400, "n"),
    ({"messages": [{"role": "user", "content": "word " * 600}]}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({"messages": []}, 400, "messages"),
    ({}, 400, "messages"),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    r = request(server.url, "POST", "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["param"] == param
    # and the server goes on serving
    ok = request(server.url, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
    assert ok.status_code == 200


@pytest.mark.parametrize("path, field, value, neutral", [
    ("/v1/completions", "suffix", " and so on", None),
])
def test_openai_fields_without_an_implementation_are_refused_unless_neutral(server, path, field, value, neutral):
    """OpenAI fields dola-cpp does not implement: their neutral value is accepted (it asks for
    nothing), anything else is a 400 naming the field, never silently ignored."""
    base = ({"messages": [{"role": "user", "content": "hi"}]} if path.endswith("chat/completions")
            else {"prompt": "Hi"})
    base["max_tokens"] = 2
    r = request(server.url, "POST", path, {**base, field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field
    ok = request(server.url, "POST", path, {**base, field: neutral})
    assert ok.status_code == 200, ok.text


def test_completion_prompts_are_validated(server):
    for prompt, message in (([10**9], "outside the vocabulary"), ("", "empty"), (["a", ""], "empty"),
                            ([[1, 2], [10**9]], "outside the vocabulary"), ([], "empty")):
        r = request(server.url, "POST", "/v1/completions", {"prompt": prompt})
        assert r.status_code == 400 and message in r.json()["error"]["message"]


def test_api_key(weights):
    s = Server(create_app(weights.share(), api_key="s3cret"))
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        r = request(s.url, path="/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert [m.id for m in s.client(api_key="s3cret").models.list().data]
    finally:
        s.stop()


class ServeProcess:
    """`dola-cpp serve` as a user starts it, in a subprocess (outside the checkout), until SIGINT."""

    def __init__(self, smollm2_path, tmp_path, *args: str, env: dict | None = None, host: str = "127.0.0.1"):
        import os
        import subprocess
        import sys

        with socket.socket() as s:
            s.bind((host, 0))
            self.port = s.getsockname()[1]
        self.log = tmp_path / f"serve-{self.port}.log"
        self.url = f"http://{host}:{self.port}"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dola_cpp.cli", "serve", str(smollm2_path), "--host", host, "--port",
                 str(self.port), "--threads", "1", "--ctx", "512", *args], cwd=tmp_path, stdout=out,
                stderr=subprocess.STDOUT, env={**os.environ, "DOLA_CPP_DEBUG": "", **(env or {})})
        deadline = time.monotonic() + 300  # a hang guard: the model loads, then uvicorn starts
        while True:
            try:
                self.health = request(self.url)
                break
            except OSError:
                assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()
                time.sleep(0.2)

    def stop(self) -> int:
        """SIGINT, as Ctrl-C: the exit status (the process is killed if it does not exit)."""
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("dola-cpp serve did not stop on SIGINT:\n" + self.log.read_text()) from None


def assert_stopped_by_sigint(status: int, log) -> None:
    """uvicorn shuts down on SIGINT and then re-raises it: the exit status is 130 (128 + SIGINT, an
    interrupted command's), 0 if the command line handled it itself; never a crash."""
    text = log.read_text()
    assert status in (0, 130) and "Traceback" not in text, (status, text)


def test_cli_serve_subprocess(smollm2_path, tmp_path):
    """`dola-cpp serve` as a user starts it: binds 127.0.0.1, answers, and stops on SIGINT."""
    serve = ServeProcess(smollm2_path, tmp_path, "--parallel", "2", "--alias", "gpt-4o-mini,smol", "--alias", "x")
    try:
        assert serve.health.json()["parallel"] == 2
        with openai.OpenAI(base_url=serve.url + "/v1", api_key="none", max_retries=0) as client:
            assert [m.id for m in client.models.list().data] == [
                "SmolLM2-135M-Instruct.Q4_1.gguf", "gpt-4o-mini", "smol", "x"]
            r = chat(client, "What is the capital of France?", temperature=0, max_tokens=16,
                     extra_body={"dola_layers": "high", "premature_norm": True})
        assert "Paris" in r.choices[0].message.content
        log = serve.log.read_text()
        assert "serving SmolLM2-135M-Instruct.Q4_1.gguf on http://127.0.0.1:" in log
        assert "without --api-key" not in log  # this machine only: no warning
    finally:
        status = serve.stop()
    assert_stopped_by_sigint(status, serve.log)


def test_cli_serve_warns_beyond_this_machine_without_a_key_and_takes_the_key_from_the_environment(
        smollm2_path, tmp_path):
    """Listening on an address other than 127.0.0.1/localhost/::1 without a key prints a warning
    (127.0.0.2 is such an address, and still loopback: nothing is exposed). DOLA_CPP_API_KEY is
    the key when --api-key is not given: then no warning, and /v1/ requires it."""
    open_server = ServeProcess(smollm2_path, tmp_path, host="127.0.0.2")
    try:
        log = open_server.log.read_text()
        assert "note: listening on 127.0.0.2 without --api-key: anyone who can reach it can use it" in log
        assert request(open_server.url, path="/v1/models").status_code == 200
    finally:
        assert_stopped_by_sigint(open_server.stop(), open_server.log)
    keyed = ServeProcess(smollm2_path, tmp_path, host="127.0.0.2", env={"DOLA_CPP_API_KEY": "k3y-from-env"})
    try:
        assert "without --api-key" not in keyed.log.read_text()
        r = request(keyed.url, path="/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert request(keyed.url, path="/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert request(keyed.url, path="/v1/models", headers={"Authorization": "Bearer k3y-from-env"}).status_code == 200
    finally:
        assert_stopped_by_sigint(keyed.stop(), keyed.log)


def test_a_model_without_a_chat_template_gets_the_cli_transcript():
    """Gemma-3-270M's GGUF has no template llama.cpp recognises: chats become the CLI's
    'User: … / Assistant:' transcript and stop at the next turn, as `dola-cpp run` does."""
    gemma = dola_cpp.Model(dola_cpp.demo_model_path("gemma3-270m"), n_ctx=512, n_threads=1)
    assert not gemma.chat_template_supported
    s = Server(create_app(gemma))
    try:
        r = s.client().chat.completions.create(
            model="gemma-3-270m-q4_k_m.gguf", messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0, max_tokens=48)
        text = r.choices[0].message.content
        ref = gemma.generate("User: What is the capital of France?\nAssistant:", max_tokens=48, stop=["\nUser:"])
        assert text == ref.text and "User:" not in text and "Paris" in text
    finally:
        s.stop()
