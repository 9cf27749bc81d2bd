"""The server's choices and scores: n samples with derived seeds, several prompts per completion,
echo with logprobs (the request lm-evaluation-harness's local-completions model sends for
log-likelihoods), server-side defaults, /metrics, /v1/models' meta, and the tokenizer endpoints
lm-evaluation-harness's remote tokenizer reads."""

import math

import pytest

import dola_cpp

from dola_cpp.server import create_app
from test_server import Server, request

FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
STORY = [{"role": "user", "content": "Tell me a story."}]


@pytest.fixture(scope="module")
def weights(smollm2_path):
    return dola_cpp.Model(smollm2_path, n_ctx=512, n_threads=1)


@pytest.fixture(scope="module")
def server(weights):
    s = Server(create_app(weights))
    yield s
    s.stop()


# ---------------------------------------------------------------------------- n and seed


def test_n_samples_are_seeded_and_differ(server):
    client = server.client()

    def ask(**kw):
        return client.chat.completions.create(model=FILE, messages=STORY, max_tokens=10, **kw)

    r = ask(n=4, temperature=0.9, seed=11)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) > 1  # each choice has its own seed
    assert [c.message.content for c in ask(n=4, temperature=0.9, seed=11).choices] == texts  # and reproducible
    assert texts[0] == ask(temperature=0.9, seed=11).choices[0].message.content  # choice 0 uses the seed itself
    assert [c.message.content for c in ask(n=4, temperature=0.9, seed=12).choices] != texts
    assert 4 <= r.usage.completion_tokens <= 40 and r.usage.prompt_tokens == ask().usage.prompt_tokens
    greedy = ask(n=3, temperature=0)
    assert len({c.message.content for c in greedy.choices}) == 1


@pytest.mark.parametrize("dola", [{}, {"dola_layers": "high"}])
def test_n_streamed_chunks_carry_their_index(server, dola):
    client = server.client()
    whole = client.chat.completions.create(model=FILE, messages=STORY, max_tokens=8, n=3, temperature=0.9,
                                           seed=3, extra_body=dola)
    chunks = list(client.chat.completions.create(model=FILE, messages=STORY, max_tokens=8, n=3, temperature=0.9,
                                                 seed=3, stream=True, stream_options={"include_usage": True},
                                                 extra_body=dola))
    texts: dict[int, str] = {}
    finished = []
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
            if ch.finish_reason:
                finished.append(ch.index)
    assert sorted(finished) == [0, 1, 2]
    assert [texts[i] for i in range(3)] == [c.message.content for c in whole.choices]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_times_max_tokens_beyond_the_context_names_n(server):
    r = request(server.url, "POST", "/v1/chat/completions", {"messages": STORY, "n": 8, "max_tokens": 100})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
    assert "8" in r.json()["error"]["message"]
    for n in (0, 17):
        r = request(server.url, "POST", "/v1/chat/completions", {"messages": STORY, "n": n})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
    r = request(server.url, "POST", "/v1/completions", {"prompt": "Once", "n": 16, "max_tokens": 2, "temperature": 1})
    assert r.status_code == 200 and [c["index"] for c in r.json()["choices"]] == list(range(16))


def test_several_prompts_in_one_completion(server, weights):
    prompts = ["The capital of France is", "Water is made of"]
    r = request(server.url, "POST", "/v1/completions", {"prompt": prompts, "max_tokens": 4, "n": 2})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    for i, p in enumerate(prompts):
        alone = request(server.url, "POST", "/v1/completions", {"prompt": p, "max_tokens": 4}).json()
        assert choices[2 * i]["text"] == choices[2 * i + 1]["text"] == alone["choices"][0]["text"]
    ids = [weights.tokenize(p) for p in prompts]
    r = request(server.url, "POST", "/v1/completions", {"prompt": ids, "max_tokens": 4})
    assert [c["text"] for c in r.json()["choices"]] == [choices[0]["text"], choices[2]["text"]]
    assert r.json()["usage"]["prompt_tokens"] == sum(len(i) for i in ids)


# ---------------------------------------------------------------------------- echo: scoring a prompt


def harness_request(ids: list[int], **extra) -> dict:
    """What lm-evaluation-harness's local-completions sends for a log-likelihood (tokenized)."""
    return {"model": "smollm2", "prompt": [ids], "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True, **extra}


def harness_parse(out: dict, ctxlen: int) -> tuple[float, bool]:
    """lm-evaluation-harness's parse_logprobs for one choice."""
    choice = sorted(out["choices"], key=lambda c: c["index"])[0]
    values = choice["logprobs"]["token_logprobs"][ctxlen:-1]
    tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
    return sum(values), all(v == max(t.values()) for v, t in zip(values, tops))


@pytest.mark.parametrize("answer, greedy", [(" Paris.", True), (" Lyon, the city of lights.", False)])
def test_the_harness_request_scores_a_continuation_as_model_score(server, weights, answer, greedy):
    context = weights.tokenize("The capital of France is", add_special=False)
    whole = weights.tokenize("The capital of France is" + answer, add_special=False)
    r = request(server.url, "POST", "/v1/completions", harness_request(whole))
    assert r.status_code == 200, r.text
    out = r.json()
    lp = out["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(whole) + 1  # the prompt's tokens and the one generated, even if it ends
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert out["choices"][0]["text"].startswith(weights.detokenize(whole))
    total, is_greedy = harness_parse(out, len(context))
    ref = weights.score(context, whole[len(context):])
    assert total == pytest.approx(ref.score, abs=1e-3)
    assert is_greedy == greedy
    # each prompt token's value is log p(token | the tokens before it)
    per_token = weights.score(whole[:1], whole[1:])
    assert lp["token_logprobs"][1:len(whole)] == pytest.approx(list(per_token.mature_logprobs), abs=1e-4)


def test_the_harness_request_with_dola_gives_model_scores_dola_scores(server, weights):
    context = weights.tokenize("Q: Who wrote Hamlet?\nA:", add_special=False)
    whole = weights.tokenize("Q: Who wrote Hamlet?\nA: William Shakespeare", add_special=False)
    out = request(server.url, "POST", "/v1/completions", harness_request(whole, dola_layers="high")).json()
    total, _ = harness_parse(out, len(context))
    # the server's DoLa decodes with the chat's premature_norm unless told otherwise
    ref = weights.score(context, whole[len(context):], layers="high", premature_norm=True)
    plain = weights.score(context, whole[len(context):])
    assert total == pytest.approx(ref.score, abs=1e-3) and not math.isclose(ref.score, plain.score, abs_tol=0.1)
    lp = out["choices"][0]["logprobs"]
    assert sum(lp["model_token_logprobs"][len(context):-1]) == pytest.approx(plain.score, abs=1e-3)
    raw = request(server.url, "POST", "/v1/completions",
                  harness_request(whole, dola_layers="high", premature_norm=False)).json()
    ref_raw = weights.score(context, whole[len(context):], layers="high")
    assert harness_parse(raw, len(context))[0] == pytest.approx(ref_raw.score, abs=1e-3)


def test_echo_with_max_tokens_0_scores_only_the_prompt(server, weights):
    prompt = "The capital of France is Paris"
    r = request(server.url, "POST", "/v1/completions", {"prompt": prompt, "echo": True, "logprobs": 3,
                                                          "max_tokens": 0})
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    ids = weights.tokenize(prompt)
    assert c["text"] == prompt and c["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 0
    lp = c["logprobs"]
    assert [weights.tokenize(t, add_special=False) for t in lp["tokens"]] == [[t] for t in ids]
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(len(ids))]
    assert all(len(t) == 3 for t in lp["top_logprobs"][1:])
    assert all(v <= max(t.values()) + 1e-6 for v, t in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]))
    # echo without logprobs: the text only; max_tokens 0 is the completions endpoint's alone
    r = request(server.url, "POST", "/v1/completions", {"prompt": prompt, "echo": True, "max_tokens": 0})
    assert r.json()["choices"][0]["text"] == prompt and r.json()["choices"][0]["logprobs"] is None
    r = request(server.url, "POST", "/v1/chat/completions", {"messages": STORY, "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_streamed_echo_sends_the_prompt_first(server):
    client = server.client()
    chunks = list(client.completions.create(model=FILE, prompt="The capital of France is", max_tokens=4, echo=True,
                                            logprobs=1, stream=True))
    text = "".join(c.choices[0].text for c in chunks)
    whole = client.completions.create(model=FILE, prompt="The capital of France is", max_tokens=4, echo=True,
                                      logprobs=1)
    assert text == whole.choices[0].text and text.startswith("The capital of France is")
    streamed = [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    expected = whole.choices[0].logprobs.token_logprobs
    assert streamed[0] is None and expected[0] is None and len(streamed) == len(expected)
    assert streamed[1:] == pytest.approx(expected[1:], abs=1e-5)


# ---------------------------------------------------------------------------- server defaults


def test_a_server_default_applies_where_the_request_leaves_a_field_out(weights):
    s = Server(create_app(weights.share(), defaults={"dola_layers": "high"}))
    try:
        ask = {"prompt": "Q: Who wrote Hamlet?\nA:", "max_tokens": 12}
        got = request(s.url, "POST", "/v1/completions", ask).json()["choices"][0]["text"]
        ref = weights.generate("Q: Who wrote Hamlet?\nA:", max_tokens=12, layers="high", premature_norm=True,
                               eos_boost=10.0, dry_multiplier=0.8, stop_loops=True)
        assert got == ref.text
        plain = request(s.url, "POST", "/v1/completions", {**ask, "dola_layers": None}).json()["choices"][0]["text"]
        ref_plain = weights.generate("Q: Who wrote Hamlet?\nA:", max_tokens=12, eos_boost=10.0, dry_multiplier=0.8,
                                     stop_loops=True)
        assert plain == ref_plain.text
    finally:
        s.stop()
    with pytest.raises(ValueError, match="dola_layers"):
        create_app(weights.share(), defaults={"dola_layers": "99"})
    with pytest.raises(ValueError, match="not a decode setting"):
        create_app(weights.share(), defaults={"colour": "blue"})


# ---------------------------------------------------------------------------- /metrics, /v1/models, tokenizers


def test_metrics_count_requests_tokens_and_decoders(weights):
    s = Server(create_app(weights.share()))
    try:
        r = request(s.url, "POST", "/v1/chat/completions", {"messages": STORY, "max_tokens": 5, "n": 2})
        used = r.json()["usage"]
        request(s.url, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 3, "dola_layers": "high"})
        request(s.url, "POST", "/v1/chat/completions", {"messages": STORY, "n": 99})
        text = request(s.url, "GET", "/metrics").text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                values[key] = float(value)
        assert values['dola_cpp_requests_total{endpoint="/v1/chat/completions",status="200"}'] == 1
        assert values['dola_cpp_requests_total{endpoint="/v1/chat/completions",status="400"}'] == 1
        assert values['dola_cpp_requests_total{endpoint="/v1/completions",status="200"}'] == 1
        assert values['dola_cpp_generations_total{decoder="plain"}'] == 2
        assert values['dola_cpp_generations_total{decoder="dola"}'] == 1
        assert values["dola_cpp_generated_tokens_total"] == used["completion_tokens"] + \
            values['dola_cpp_decoder_tokens_total{decoder="dola"}']
        assert values["dola_cpp_prompt_tokens_total"] >= used["prompt_tokens"] + 1
        assert values["dola_cpp_contexts"] == 1 and values["dola_cpp_contexts_busy"] == 0
        assert values["dola_cpp_requests_waiting"] == 0
        # the batch's llama.cpp calls: at least one per generated token of the longest choice, each
        # carrying at least one token, and time spent in them
        calls = values["dola_cpp_llama_calls_total"]
        assert 5 <= calls <= values["dola_cpp_llama_call_tokens_total"] and values["dola_cpp_llama_call_seconds_total"] > 0
        assert "# TYPE dola_cpp_requests_total counter" in text and "# TYPE dola_cpp_llama_calls_total counter" in text
        # the chat's cells, saved when the completion took their sequence, serve it again
        assert values["dola_cpp_prompt_cache_entries"] >= 1 and values["dola_cpp_prompt_cache_bytes"] > 0
        again = request(s.url, "POST", "/v1/chat/completions", {"messages": STORY, "max_tokens": 5}).json()
        values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                  for line in request(s.url, "GET", "/metrics").text.splitlines() if line and not line.startswith("#")}
        assert values["dola_cpp_prompt_cache_hits_total"] == 1
        assert values["dola_cpp_prompt_cache_tokens_total"] == again["usage"]["prompt_tokens"] - 1
    finally:
        s.stop()


def test_models_give_the_context_size(server, weights):
    card = server.client().models.list().data[0]
    meta = card.model_extra["meta"]
    assert card.id == FILE and card.owned_by == "dola-cpp"
    assert meta["n_ctx"] == weights.n_ctx == 512 and meta["n_ctx_train"] == weights.n_ctx_train
    assert meta["n_vocab"] == weights.n_vocab and meta["n_layer"] == weights.n_layers
    assert meta["size"] == weights.path.stat().st_size


def test_the_tokenizer_endpoints_in_vllms_shapes(server, weights):
    text = "Q: Who wrote Hamlet?\nA: William"
    r = request(server.url, "POST", "/tokenize", {"prompt": text, "add_special_tokens": False})
    assert r.json()["tokens"] == weights.tokenize(text, add_special=False)
    back = request(server.url, "POST", "/detokenize", {"tokens": r.json()["tokens"]}).json()
    assert back["prompt"] == text
    info = request(server.url, "GET", "/tokenizer_info").json()
    assert info["eos_token"] == weights.detokenize(weights.eog_tokens[:1], special=True)


def test_the_cli_takes_a_default_dola_layers_and_refuses_a_bad_one(monkeypatch, weights):
    from typer.testing import CliRunner

    from dola_cpp.cli import serve as serve_cli
    from dola_cpp.cli._app import app as cli_app

    made = {}

    def create_app_spy(*args, **kwargs):
        made.update(kwargs)
        raise SystemExit(0)  # stop before serving

    monkeypatch.setattr(serve_cli, "load_model", lambda *args: weights)
    r = CliRunner().invoke(cli_app, ["serve", "--dola-layers", "99"])
    assert r.exit_code != 0 and "--dola-layers" in r.output and "Traceback" not in r.output, r.output
    monkeypatch.setattr("dola_cpp.server.create_app", create_app_spy)
    r = CliRunner().invoke(cli_app, ["serve", "--dola-layers", "high"])
    assert r.exit_code == 0 and made["defaults"] == {"dola_layers": "high"}, r.output
