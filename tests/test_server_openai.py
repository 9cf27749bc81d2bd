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
