"""``Model.score_batch``: several continuations of one prefix scored side by side in one context
(the prefix decoded once, each continuation a sequence of its own on its cells) give what
``Model.score`` gives for each alone, for every decoder; groups, calls and the cache's sequences
are split and freed as the context requires."""

import numpy as np
import pytest

import dola_cpp
from conftest import TFQA_CSV
from dola_cpp import evaluate as ev

# llama.cpp sums attention over the cache's cells in another order when other sequences' cells lie
# between a continuation's own, and the projection's matmul sees other row counts: float rounding
# (measured on the F32 SmolLM2: up to 8e-6 a token for plain scores, 4e-4 for DoLa's raw
# premature layers). The reference tests allow 1e-3 against transformers.
TOL = 1e-3

DECODERS = {
    "plain": {},
    "static": dict(layers="15,30"),
    "high": dict(layers="high"),
    "high-factor": dict(layers="high", relative_top=0.1, post_softmax=True),
    "low-normed": dict(layers="low", premature_norm=True),
    "activation": dict(decoder="activation"),
    "activation-high": dict(layers="high", decoder="activation"),
    "top-logprobs": dict(layers="high", top_logprobs=3),
}


@pytest.fixture(scope="module")
def question():
    item = ev.load_truthfulqa(TFQA_CSV)[1]
    return ev.tfqa_prompt(item.question), [" " + a for a in item.true + item.false]


def assert_same(alone, batch):
    assert len(alone) == len(batch)
    for a, b in zip(alone, batch):
        assert b.continuation_tokens == a.continuation_tokens
        np.testing.assert_allclose(b.token_scores, a.token_scores, rtol=0, atol=TOL)
        assert b.score == pytest.approx(a.score, abs=TOL * len(a.token_scores))
        assert b.premature_layers == a.premature_layers
        np.testing.assert_allclose(b.mature_logprobs, a.mature_logprobs, rtol=0, atol=TOL)
        np.testing.assert_allclose(b.entropies, a.entropies, rtol=0, atol=TOL)
        np.testing.assert_allclose(b.jsd, a.jsd, rtol=0, atol=TOL)
        assert [[t for t, _ in row] for row in b.top_tokens] == [[t for t, _ in row] for row in a.top_tokens]


@pytest.mark.parametrize("decoder", DECODERS)
def test_a_questions_answers_side_by_side_equal_each_alone(f32_model, question, decoder):
    prompt, answers = question
    kw = DECODERS[decoder]
    alone = [f32_model.score(prompt, a, **kw) for a in answers]
    assert_same(alone, f32_model.score_batch(prompt, answers, **kw))
    # the answers differ: a batch that gave every answer the first one's score would fail above
    assert len({round(r.score, 3) for r in alone}) > 1


def test_prefixes_that_tokenize_apart_are_scored_as_alone(f32_model):
    # "Fr" + "ance" is one token: the texts' prefix tokens differ from the prefix's own, so each
    # text recomputes from where they part (the repo splits tokens(prefix + continuation) after
    # len(tokens(prefix)))
    prefix = "The capital of Fr"
    conts = ["ance is Paris.", "ench Guiana is Cayenne.", "iesland is Leeuwarden."]
    heads = {tuple(f32_model.tokenize(prefix + c)[: len(f32_model.tokenize(prefix))]) for c in conts}
    assert len(heads) == len(conts)  # the case under test
    for kw in ({}, dict(layers="high"), dict(decoder="activation")):
        assert_same([f32_model.score(prefix, c, **kw) for c in conts], f32_model.score_batch(prefix, conts, **kw))


def test_token_ids_more_texts_than_sequences_and_calls_split_by_the_context(f32_path):
    # n_ctx 512, n_batch 8 (fewer rows a call than sequences): 20 texts (a call takes up to 15), continuations of 40-154
    # tokens (several llama.cpp calls per group, groups cut by the cells left beside the prefix)
    m = dola_cpp.Model(f32_path, n_ctx=512, n_batch=8, kv_type="f32")
    prefix = m.tokenize("Q: Tell me a story.\nA:")
    base = m.tokenize(" Once upon a time, in a village by the sea, there lived an old fisherman and his three "
                      "daughters, who mended nets and sang songs about the storms of winter.")
    conts = [(base * 5)[: 40 + 6 * k] for k in range(20)]
    for kw in ({}, dict(layers="high")):
        alone = [m.score(prefix, c, **kw) for c in conts]
        assert_same(alone, m.score_batch(prefix, conts, **kw))
        # again: the texts' cells were freed (a leak would fill the context)
        assert_same(alone, m.score_batch(prefix, conts, **kw))
    # the session's own sequence still holds the prefix: generation from it equals a fresh model's
    fresh = dola_cpp.Model(f32_path, n_ctx=512, n_batch=8, kv_type="f32")
    assert m.generate(prefix, max_tokens=8).tokens == fresh.generate(prefix, max_tokens=8).tokens


def test_refusals(f32_model):
    prompt = "Q: What is 2 + 2?\nA:"
    assert f32_model.score_batch(prompt, []) == []
    with pytest.raises(TypeError, match="not one string"):
        f32_model.score_batch(prompt, " Four.")
    with pytest.raises(ValueError, match="empty"):
        f32_model.score_batch(prompt, [" Four.", ""])
    with pytest.raises(TypeError, match="both"):
        f32_model.score_batch(prompt, [" Four.", [1, 2]])
    with pytest.raises(ValueError):
        f32_model.score_batch(f32_model.tokenize(prompt), [[1, 2], [f32_model.n_vocab + 5]])
    # nothing was decoded for the refused calls: the model still scores as before
    assert_same([f32_model.score(prompt, " Four.")], f32_model.score_batch(prompt, [" Four."]))


def test_texts_that_begin_alike_decode_their_common_tokens_once(f32_model):
    # answers sharing their first words, one the beginning of another, one given twice: each token
    # at a position after the same tokens is one row of the calls, and each text's scores are still
    # its own
    prompt = "Q: What is the capital of France?\nA:"
    answers = [" The capital of France is Paris.", " The capital of France is Lyon.", " The capital of France",
               " The capital of France is Paris.", " Paris.", " It is Paris, of course."]
    n_prefix = len(f32_model.tokenize(prompt))
    texts = [f32_model.tokenize(prompt + a)[n_prefix:] for a in answers]
    for kw in ({}, dict(layers="high"), dict(decoder="activation", layers="high"), dict(top_logprobs=2)):
        # rows: every distinct beginning of a text that predicts another of its tokens (Activation
        # Decoding's entropy also covers each text's last position)
        last = 1 if kw.get("decoder") == "activation" else 0
        rows = {tuple(t[:k]) for t in texts for k in range(1, len(t) + last)}
        assert len(rows) < sum(len(t) - 1 + last for t in texts) - 8  # the case under test: much is shared
        alone = [f32_model.score(prompt, a, **kw) for a in answers]
        before = f32_model.timings()["n_score_rows"]
        batch = f32_model.score_batch(prompt, answers, **kw)
        assert f32_model.timings()["n_score_rows"] - before == len(rows)
        assert_same(alone, batch)
        assert batch[0].score == batch[3].score and batch[0].score != batch[1].score
