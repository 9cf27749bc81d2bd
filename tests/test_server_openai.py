"""The OpenAI surface real clients use: any model name, aliases, frequency and presence
penalties, logit_bias, and llama-server's /tokenize and /detokenize."""

import pytest

import dola_cpp

import openai

from dola_cpp.server import create_app
from test_server import Server, request

FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def weights(smollm2_path):
    return dola_cpp.Model(smollm2_path, n_ctx=512, n_threads=1)


@pytest.fixture(scope="module")
def server(weights):
    s = Server(create_app(weights, aliases=["gpt-4o-mini", "smol"]))
    yield s
    s.stop()


def test_any_model_name_is_answered_and_aliases_are_listed(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [FILE, "gpt-4o-mini", "smol"]
    assert client.models.retrieve("smol").id == "smol"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nonesuch")
    ask = [{"role": "user", "content": "What is the capital of France?"}]
    answers = {}
    for name in ("gpt-4o-mini", "some-model-nobody-serves", FILE):
        r = client.chat.completions.create(model=name, messages=ask, temperature=0, max_tokens=8)
        assert r.model == name
        answers[name] = r.choices[0].message.content
    assert len(set(answers.values())) == 1  # the one model answers them all
    r = request(server.url, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "model": "/etc/passwd"})
    assert r.status_code == 200 and r.json()["model"] == "/etc/passwd"


CHAT = {"messages": [{"role": "user", "content": "Count from 1 to 10."}], "max_tokens": 4}


@pytest.mark.parametrize("field", ["frequency_penalty", "presence_penalty"])
def test_the_penalties_take_openais_range(server, field):
    for value in (-2, -0.5, 0, 1.5, 2):
        r = request(server.url, "POST", "/v1/chat/completions", {**CHAT, field: value})
        assert r.status_code == 200, r.text
    for value in (2.5, -2.01):
        r = request(server.url, "POST", "/v1/chat/completions", {**CHAT, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def test_penalties_and_logit_bias_through_the_openai_client(server, weights):
    client = server.client()
    ask = [{"role": "user", "content": "Count from 1 to 10."}]
    plain = client.chat.completions.create(model=FILE, messages=ask, temperature=0, max_tokens=24)
    pen = client.chat.completions.create(model=FILE, messages=ask, temperature=0, max_tokens=24,
                                         frequency_penalty=2.0, presence_penalty=2.0)
    assert pen.choices[0].message.content != plain.choices[0].message.content
    forced = client.completions.create(model=FILE, prompt="Hi", max_tokens=1, logit_bias={"100": 100},
                                       extra_body={"dola_layers": "high"})
    assert forced.choices[0].text == weights.detokenize([100])
    first = weights.generate("Hi", max_tokens=1, layers="high", eos_boost=10.0, premature_norm=True,
                             dry_multiplier=0.8).steps[0].token
    banned = client.completions.create(model=FILE, prompt="Hi", max_tokens=1, logit_bias={str(first): -100},
                                       extra_body={"dola_layers": "high"})
    assert banned.choices[0].text != weights.detokenize([first])


@pytest.mark.parametrize("bias, message", [
    ({"1000000": 1}, "logit_bias: token id 1000000 is outside the vocabulary"),
    ({"5": 150}, "logit_bias values must be numbers in [-100, 100]"),
    ({"five": 1}, "logit_bias"),
])
def test_bad_logit_bias_is_a_400(server, bias, message):
    r = request(server.url, "POST", "/v1/chat/completions", {**CHAT, "logit_bias": bias})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["param"].startswith("logit_bias"), err


# ---------------------------------------------------------------------------- llama-server's /tokenize


def test_tokenize_and_detokenize_in_llama_servers_shapes(server, weights):
    text = "Hello <|im_end|> world"
    r = request(server.url, "POST", "/tokenize", {"content": text})
    assert r.status_code == 200, r.text
    ids = r.json()["tokens"]
    assert ids == weights.tokenize(text, add_special=False, parse_special=True)
    assert request(server.url, "POST", "/tokenize", {"content": text, "parse_special": False}).json()["tokens"] == \
        weights.tokenize(text, add_special=False, parse_special=False)
    assert request(server.url, "POST", "/tokenize", {"content": "Hi", "add_special": True}).json()["tokens"] == \
        weights.tokenize("Hi", add_special=True)
    pieces = request(server.url, "POST", "/tokenize", {"content": "Hi there", "with_pieces": True}).json()["tokens"]
    assert "".join(p["piece"] for p in pieces) == "Hi there" and all(isinstance(p["id"], int) for p in pieces)
    back = request(server.url, "POST", "/detokenize", {"tokens": ids})
    assert back.status_code == 200 and back.json() == {"content": text, "prompt": text}
    assert request(server.url, "POST", "/detokenize", {"tokens": []}).json()["content"] == ""


@pytest.mark.parametrize("path, body, message", [
    ("/detokenize", {"tokens": [1, 10**6]}, "token id 1000000 is outside the vocabulary"),
    ("/detokenize", {"tokens": [-1]}, "outside the vocabulary"),
    ("/detokenize", {"tokens": [10**30]}, "outside the vocabulary"),
    ("/detokenize", {"tokens": "1 2"}, "tokens"),
    ("/tokenize", {"content": 5}, "content"),
    ("/tokenize", {"text": "hi"}, "text"),
    ("/tokenize", {}, "content"),
    ("/tokenize", {"content": "a", "prompt": "b"}, "content"),
    ("/tokenize", {"content": "hi", "colour": 1}, "colour"),
    ("/tokenize", b"{not json", "JSON"),
])
def test_tokenize_and_detokenize_refuse_bad_bodies(server, path, body, message):
    r = request(server.url, "POST", path, body)
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def test_tokenize_is_behind_the_key_and_the_body_limit(weights):
    s = Server(create_app(weights.share(), api_key="s3cret", max_body=2048))
    try:
        for path, body in (("/tokenize", {"content": "hi"}), ("/detokenize", {"tokens": [1]})):
            assert request(s.url, "POST", path, body).status_code == 401
            ok = request(s.url, "POST", path, body, headers={"Authorization": "Bearer s3cret"})
            assert ok.status_code == 200, ok.text
        big = request(s.url, "POST", "/tokenize", {"content": "x" * 4096}, headers={"Authorization": "Bearer s3cret"})
        assert big.status_code == 413
    finally:
        s.stop()
