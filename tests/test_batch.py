"""Continuous batching (dola_cpp.batch): many generations on one context give what each gives
alone, for every decoder and any mix of them, with generations joining, leaving and being
cancelled mid-way, and the engine really carrying several sequences per llama.cpp call."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import dola_cpp
from dola_cpp import DecodeConfig, Model
from dola_cpp.model import PromptTooLongError

PROMPTS = [
    "Q: What is the capital of France?\nA:",
    "Q: Who wrote Hamlet?\nA:",
    "Q: Why is the sky blue?\nA:",
    "Q: What is the largest ocean on Earth?\nA:",
    "Q: How many legs does a spider have?\nA:",
    "Q: What is photosynthesis?\nA:",
]

# one of each decoder set-up, with the settings that give each sequence its own state
CONFIGS = {
    "plain": DecodeConfig(),
    "dola-high": DecodeConfig().replace(layers="high", repetition_penalty=1.2),
    "dola-static": DecodeConfig().replace(layers=[8]),
    "dola-low-normed": DecodeConfig().replace(layers="low", premature_norm=True),
    "activation": DecodeConfig().replace(decoder="activation", layers=None),
    "activation-dola": DecodeConfig().replace(decoder="activation", layers="high"),
    "sampled": DecodeConfig().replace(layers="high", temperature=0.8, top_k=40, seed=7),
    "penalties-logprobs": DecodeConfig().replace(frequency_penalty=0.5, presence_penalty=0.3, top_logprobs=3),
}

N_TOKENS = 16


@pytest.fixture(scope="module")
def model(smollm2_path) -> Model:
    return Model(smollm2_path, n_ctx=512)


@pytest.fixture(scope="module")
def alone(model):
    """Each (prompt, config) generated alone on the model's own context."""
    cache = {}

    def get(prompt: str, name: str):
        if (prompt, name) not in cache:
            cache[prompt, name] = model.generate(prompt, N_TOKENS, config=CONFIGS[name])
        return cache[prompt, name]

    return get


def assert_same(batched, alone, what):
    assert batched.tokens == alone.tokens, what
    assert batched.text == alone.text, what
    assert batched.finish_reason == alone.finish_reason, what
    assert batched.decoder == alone.decoder and batched.layers == alone.layers, what
    for a, b in zip(batched.steps, alone.steps):
        assert a.premature_layer == b.premature_layer, what
        np.testing.assert_allclose(a.jsd, b.jsd, rtol=1e-5, atol=1e-5, err_msg=what)
        np.testing.assert_allclose(a.score, b.score, rtol=1e-5, atol=1e-5, err_msg=what)
        np.testing.assert_allclose(a.mature_logprob, b.mature_logprob, rtol=1e-5, atol=1e-5, err_msg=what)
        assert [t for t, _ in a.top_logprobs] == [t for t, _ in b.top_logprobs], what


@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_decoder_in_a_batch_gives_what_it_gives_alone(model, alone, name):
    results = model.generate_batch(PROMPTS[:4], N_TOKENS, config=CONFIGS[name])
    for prompt, r in zip(PROMPTS, results):
        assert_same(r, alone(prompt, name), f"{name}: {prompt!r}")


def test_a_mix_of_decoders_in_one_batch_gives_what_each_gives_alone(model, alone):
    names = list(CONFIGS)
    pairs = [(PROMPTS[i % len(PROMPTS)], names[i]) for i in range(len(names))]
    batch = model.batch(parallel=len(pairs))
    results = batch.generate([p for p, _ in pairs], N_TOKENS, configs=[CONFIGS[n] for _, n in pairs])
    for (prompt, name), r in zip(pairs, results):
        assert_same(r, alone(prompt, name), f"{name}: {prompt!r}")
    stats = batch.stats()
    # one llama.cpp call carried several sequences, and the DoLa rows of a step went through the
    # output matrix together (once per norm: two projections at most per call)
    assert stats["n_decoded_tokens"] >= 3 * stats["n_decodes"], stats
    assert stats["n_projections"] <= 2 * stats["n_decodes"], stats
    assert stats["n_steps"] >= sum(len(r.tokens) for r in results)


@pytest.mark.parametrize("name", ["plain", "dola-high", "dola-low-normed"])
def test_sequences_fuse_their_final_rows_as_alone(model, alone, name):
    """Each step's final logits come from dola-cpp's projection of the sequence's final normed row
    (with its premature rows, raw or normed, for DoLa; plain decoding where dola-cpp's kernel reads
    the output matrix, as on this model's Q8_0 one) instead of llama.cpp's output matrix, in calls
    of one sequence and of several, as a session does alone: the same scores to the bit. A call
    that carries a sequence which cannot fuse (Activation Decoding) takes llama.cpp's logits for
    all of its rows."""
    batch = model.batch(parallel=2)
    results = batch.generate(PROMPTS[:2], N_TOKENS, config=CONFIGS[name])
    for prompt, r in zip(PROMPTS, results):
        a = alone(prompt, name)
        assert r.tokens == a.tokens
        assert [s.score for s in r.steps] == [s.score for s in a.steps]
        assert [s.mature_logprob for s in r.steps] == [s.mature_logprob for s in a.steps]
    stats = batch.stats()
    assert stats["n_decoded_tokens"] > stats["n_decodes"], stats  # calls of two sequences
    assert stats["n_fused"] == stats["n_steps"] >= sum(len(r.tokens) for r in results), stats
    batch.generate(PROMPTS[:2], N_TOKENS, configs=[CONFIGS[name], CONFIGS["activation"]])
    assert batch.stats()["n_fused"] < stats["n_fused"] + N_TOKENS, batch.stats()


def fused_and_unfused(path, monkeypatch, alone, batched, n_tokens):
    """(prompt, config) pairs generated alone on a model's own context and together in one batch,
    each n_tokens long, as the engine fuses final rows and again with DOLA_CPP_NO_FUSE=1 (the
    final logits from llama.cpp's LM head): the pairs of results, after checking that every batch
    step fused the first time and none the second, with the same tokens and scores within 2e-4."""

    def run() -> tuple[list, int]:  # (the results, the batch's fused steps)
        m = Model(path, n_ctx=512)
        batch = m.batch(len(batched))
        got = [m.generate(p, n_tokens, config=c, ignore_eos=True) for p, c in alone]
        got += batch.generate([p for p, _ in batched], n_tokens, configs=[c for _, c in batched], ignore_eos=True)
        return got, batch.stats()["n_fused"]

    fused, n_fused = run()
    monkeypatch.setenv("DOLA_CPP_NO_FUSE", "1")
    unfused, n_unfused = run()
    assert n_fused >= len(batched) * n_tokens and n_unfused == 0
    for a, b in zip(fused, unfused):
        assert a.tokens == b.tokens
        np.testing.assert_allclose([s.score for s in a.steps], [s.score for s in b.steps], atol=2e-4)
    return list(zip(fused, unfused))


def test_fused_plain_logits_are_llama_cpps(smollm2_path, monkeypatch):
    """Plain decoding's logits from dola-cpp's projection of the final normed row are llama.cpp's
    own (its output matrix, DOLA_CPP_NO_FUSE=1) to float rounding (on an AVX-512 CPU, to the bit),
    alone and in a batch."""
    config = CONFIGS["penalties-logprobs"]
    for a, b in fused_and_unfused(smollm2_path, monkeypatch, [(PROMPTS[2], config)], [(p, config) for p in PROMPTS[:3]], 24):
        np.testing.assert_allclose([s.mature_logprob for s in a.steps], [s.mature_logprob for s in b.steps], atol=2e-4)
        for x, y in zip(a.steps, b.steps):
            assert [t for t, _ in x.top_logprobs] == [t for t, _ in y.top_logprobs]


def test_fused_dola_gives_what_the_unfused_path_gives(smollm2_path, monkeypatch):
    """DoLa's fused step (the premature rows, normed on the host when asked, and the final normed
    row through the output matrix in one projection) gives the tokens, premature layers and
    scores of the unfused path (the premature rows projected alone, normed in the projection when
    asked, and llama.cpp's own final logits: DOLA_CPP_NO_FUSE=1), alone and in a batch."""
    pairs = [(PROMPTS[3 + i], CONFIGS[n]) for i, n in enumerate(["dola-high", "dola-low-normed"])]
    alone = [(PROMPTS[3], c) for _, c in pairs]
    for a, b in fused_and_unfused(smollm2_path, monkeypatch, alone, pairs, 16):
        assert [s.premature_layer for s in a.steps] == [s.premature_layer for s in b.steps]
        np.testing.assert_allclose([s.jsd for s in a.steps], [s.jsd for s in b.steps], atol=2e-4)


def test_the_contrast_where_the_projection_runs_gives_what_it_gives_alone(smollm2_path, monkeypatch):
    """DOLA_CPP_DEVICE_CONTRAST=on (what a GPU does by default): the DoLa sequences of a step (two
    candidates or more, raw premature rows) go through one contrast graph on the projection's
    backend, here the CPU's, each candidate against its own sequence's mature row, and bring back
    only their JSD, entropies and two rows each; the others (static, normed, Activation, plain)
    take the host's. Each gives what it gives alone with the same setting (the session's
    one-sequence graph), to float rounding."""
    monkeypatch.setenv("DOLA_CPP_DEVICE_CONTRAST", "on")  # read when the projection is first needed
    m = Model(smollm2_path, n_ctx=512)
    names = ["dola-high", "sampled", "plain", "dola-low-normed", "dola-static", "activation-dola", "dola-high"]
    configs = [CONFIGS[n].replace(layers="low") if i == len(names) - 1 else CONFIGS[n] for i, n in enumerate(names)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    alone = [m.generate(p, N_TOKENS, config=c, ignore_eos=True) for p, c in zip(prompts, configs)]
    batch = m.batch(parallel=len(names))
    got = batch.generate(prompts, N_TOKENS, configs=configs, ignore_eos=True)
    for name, r, a in zip(names, got, alone):
        assert_same(r, a, name)
        np.testing.assert_allclose([s.entropy for s in r.steps], [s.entropy for s in a.steps], rtol=1e-5, atol=1e-6)
    stats = batch.stats()
    # dola-high, sampled and dola-low: every step of theirs, and no other
    assert stats["n_device_contrasts"] == 3 * N_TOKENS, stats
    monkeypatch.setenv("DOLA_CPP_DEVICE_CONTRAST", "off")
    host = Model(smollm2_path, n_ctx=512).batch(parallel=len(names))
    for name, r, h in zip(names, got, host.generate(prompts, N_TOKENS, configs=configs, ignore_eos=True)):
        assert r.tokens == h.tokens and [s.premature_layer for s in r.steps] == [s.premature_layer for s in h.steps]
        np.testing.assert_allclose([s.score for s in r.steps], [s.score for s in h.steps], rtol=1e-4, atol=1e-3)
    assert host.stats()["n_device_contrasts"] == 0


def test_generations_join_and_leave_mid_way(model, alone):
    batch = model.batch(parallel=3)
    first = batch.stream(PROMPTS[0], N_TOKENS, config=CONFIGS["dola-high"])
    pieces = [next(first), next(first)]
    # a second joins while the first is answering, a third is cancelled after two pieces
    second = batch.stream(PROMPTS[1], N_TOKENS, config=CONFIGS["activation"])
    third = batch.stream(PROMPTS[2], N_TOKENS, config=CONFIGS["plain"])
    next(third), next(third)
    third.close()
    assert third.finish_reason == "cancelled"
    rest = dola_cpp.batch.drain([first, second])
    assert "".join(pieces) + first.text[len("".join(pieces)):] == first.text
    assert_same(rest[0], alone(PROMPTS[0], "dola-high"), "joined first")
    assert_same(rest[1], alone(PROMPTS[1], "activation"), "joined second")
    # the cancelled sequence's place serves the next generation, which is unchanged by it
    assert_same(batch.generate([PROMPTS[2]], N_TOKENS, config=CONFIGS["plain"])[0], alone(PROMPTS[2], "plain"),
                "after a cancelled one")


def test_more_generations_than_sequences_wait_their_turn(model, alone):
    batch = model.batch(parallel=2)
    results = batch.generate(PROMPTS, N_TOKENS, config=CONFIGS["dola-high"])
    for prompt, r in zip(PROMPTS, results):
        assert_same(r, alone(prompt, "dola-high"), prompt)
    assert batch.stats()["n_running"] == 0 and batch.stats()["n_queued"] == 0


def test_streams_on_threads_and_a_cancel_from_another_thread(model, alone):
    batch = model.batch(parallel=4)
    out: dict[int, object] = {}

    def run(i: int) -> None:
        s = batch.stream(PROMPTS[i], N_TOKENS, config=CONFIGS["dola-high"])
        for _ in s:
            pass
        out[i] = s.result()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    victim = batch.stream(PROMPTS[3], 200, config=CONFIGS["plain"], ignore_eos=True)
    next(victim)
    victim.sequence.cancel()  # what a server does when its client goes away
    assert list(victim) == [] or victim.finish_reason == "cancelled"
    assert victim.finish_reason == "cancelled" and len(victim.tokens) < 200
    for t in threads:
        t.join(timeout=120)
    for i in range(3):
        assert_same(out[i], alone(PROMPTS[i], "dola-high"), PROMPTS[i])


def test_the_prompt_cache_restores_earlier_prompts_as_alone(model, alone):
    """A sequence's cells are saved when another prompt takes it; a prompt that begins like a saved
    one (asked again, or a chat's next turn) starts from those cells, in whichever sequence is free,
    and gets what it gets alone, to the bit. Activation Decoding rebuilds its rows from its own
    sequence, so it never starts from the cache, and its answers stay what they are alone."""
    for name in ("dola-high", "plain"):
        batch = model.batch(parallel=2)
        batch.generate(PROMPTS[:2], N_TOKENS, config=CONFIGS[name])
        batch.generate(PROMPTS[2:4], N_TOKENS, config=CONFIGS[name])  # both sequences saved, then taken
        before = batch.stats()  # (the fourth prompt starts from the first's "Q: What is the")
        assert before["cache_entries"] >= 2 and before["n_cache_hits"] == 1, before
        again = batch.generate([PROMPTS[1], PROMPTS[0]], N_TOKENS, config=CONFIGS[name])
        for prompt, r in zip([PROMPTS[1], PROMPTS[0]], again):
            a = alone(prompt, name)
            assert_same(r, a, f"{name}, from the cache: {prompt!r}")
            assert [s.score for s in r.steps] == [s.score for s in a.steps]
        stats = batch.stats()
        n_prompt = [len(model.tokenize(p)) for p in PROMPTS[:2]]
        assert stats["n_cache_hits"] - before["n_cache_hits"] == 2, stats
        assert stats["n_cache_tokens"] - before["n_cache_tokens"] == sum(n_prompt) - 2, stats
    # a chat's next turn: its previous prompt and answer come from the cache
    follow = PROMPTS[0] + again[1].text + "\nQ: And of Germany?\nA:"
    batch.generate(PROMPTS[4:6], N_TOKENS)
    before = batch.stats()["n_cache_tokens"]
    r = batch.generate([follow], N_TOKENS)[0]
    assert r.tokens == model.generate(follow, N_TOKENS).tokens
    assert batch.stats()["n_cache_tokens"] - before >= n_prompt[0] + len(again[1].tokens) - 2
    # Activation Decoding: saved, never restored
    batch = model.batch(parallel=1)
    for prompt in (PROMPTS[0], PROMPTS[1], PROMPTS[0]):
        assert_same(batch.generate([prompt], N_TOKENS, config=CONFIGS["activation"])[0],
                    alone(prompt, "activation"), prompt)
    assert batch.stats()["cache_entries"] >= 1 and batch.stats()["n_cache_hits"] == 0


def test_the_prompt_cache_keeps_to_its_budget(model):
    """Least recently used entries go beyond the budget; an entry larger than the budget is never
    kept; 0 keeps nothing. Bad budgets are refused."""
    sizes = {}
    for mib in (0, 0.5, 1.5, 1024):
        batch = model.batch(parallel=1, cache_mib=mib)
        for p in PROMPTS:
            batch.generate([p], N_TOKENS)
        stats = batch.stats()
        assert stats["cache_bytes"] <= mib * 2**20
        sizes[mib] = stats["cache_entries"]
        # the most recent evicted prompt comes back from the cache wherever one fits
        batch.generate([PROMPTS[-2]], N_TOKENS)
        assert batch.stats()["n_cache_hits"] - stats["n_cache_hits"] == (1 if sizes[mib] else 0), (mib, batch.stats())
    # an entry of these prompts and answers is ~0.6 MiB: none fits in 0.5, a few in 1.5, all in 1024
    assert sizes[0] == sizes[0.5] == 0 and 1 <= sizes[1.5] < sizes[1024] == len(PROMPTS) - 1, sizes
    for bad in (-1, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="cache_mib"):
            model.batch(parallel=1, cache_mib=bad)


def test_stops_budgets_and_grammars_end_answers_as_alone(model):
    cases = [
        dict(stop=["."], max_tokens=40),
        dict(stop_loops=True, max_tokens=40, config=DecodeConfig().replace(layers="high")),
        dict(max_tokens=3),
        dict(json_schema={"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
             max_tokens=24),
        dict(max_tokens=24, config=DecodeConfig().replace(eos_boost=10.0)),
    ]
    batch = model.batch(parallel=len(cases))
    streams = [batch.stream(PROMPTS[i], **kw) for i, kw in enumerate(cases)]
    for i, (kw, r) in enumerate(zip(cases, dola_cpp.batch.drain(streams))):
        kw = dict(kw)
        expected = model.generate(PROMPTS[i], kw.pop("max_tokens"), **kw)
        assert (r.tokens, r.text, r.finish_reason) == (expected.tokens, expected.text, expected.finish_reason), kw


def test_bad_requests_are_refused_before_they_join(model):
    batch = model.batch(parallel=2)
    with pytest.raises(ValueError, match="premature layer"):
        batch.stream(PROMPTS[0], 8, layers=[99])
    with pytest.raises(PromptTooLongError):
        batch.stream(list(range(1, 600)), 8)
    with pytest.raises(ValueError, match="empty"):
        batch.stream("", 8)
    with pytest.raises(ValueError, match="configs has 1 entries for 2 prompts"):
        batch.generate(PROMPTS[:2], 8, configs=[DecodeConfig()])
    with pytest.raises(ValueError, match="parallel"):
        model.batch(parallel=0)
    with pytest.raises(TypeError, match="not one string"):
        model.generate_batch("one prompt", 8)
    # nothing of the refused ones is left running
    assert batch.stats()["n_running"] == 0 and batch.stats()["n_queued"] == 0
    assert batch.generate([PROMPTS[0]], 4)[0].tokens == model.generate(PROMPTS[0], 4).tokens


def test_a_sequence_that_fails_mid_way_ends_alone(tmp_path):
    """A token whose embedding is NaN poisons only the sequence that holds it (each sequence attends
    to its own cache): that one raises, the others give what they give alone."""
    import gguf

    from dola_cpp.synthetic import write_llama_gguf

    path = write_llama_gguf(tmp_path / "m.gguf", n_layer=4)
    m = Model(path, n_ctx=64)
    poison = m.tokenize("the", add_special=False)[-1]
    reader = gguf.GGUFReader(path, "r+")
    next(t for t in reader.tensors if t.name == "token_embd.weight").data[poison] = np.nan
    del reader
    m = Model(path, n_ctx=64)
    prompts = ["a b c", "b a", "c c a"]
    alone = [m.generate(p, 6, layers=[2], ignore_eos=True) for p in prompts]
    batch = m.batch(parallel=3)
    streams = [batch.stream(p, 6, layers=[2], ignore_eos=True) for p in prompts]
    bad = batch.stream("a the b", 6, layers=[2], ignore_eos=True)
    for s in [*streams, bad]:
        s.start()
    with pytest.raises(dola_cpp.DolaError, match="non-finite logits"):
        list(bad)
    for a, b in zip(dola_cpp.batch.drain(streams), alone):
        assert a.tokens == b.tokens
    assert batch.stats()["n_running"] == 0


def test_gemma_in_a_batch_of_four_is_exact_in_the_plain_layout(gemma_path):
    """Another architecture (sliding-window layers, a 262144 vocabulary): four DoLa sequences of
    a batch give bitwise what each gives alone, with the weights in ggml's plain layout (llama.cpp's
    repacked layouts compute four rows together, rounding otherwise)."""
    m = Model(gemma_path, n_ctx=256, repack=False)
    prompts = PROMPTS[:4]
    alone = []
    for p in prompts:
        m.clear_cache()  # each from a fresh cache, as a sequence of the batch starts
        alone.append(m.generate(p, 8, layers="high"))
    for a, b in zip(m.generate_batch(prompts, 8, layers="high"), alone):
        assert a.tokens == b.tokens
        assert [s.mature_logprob for s in a.steps] == [s.mature_logprob for s in b.steps]
        assert [s.premature_layer for s in a.steps] == [s.premature_layer for s in b.steps]
    # sliding-window layers keep only their window's cells: no prompt cache
    batch = m.batch(parallel=1)
    batch.generate(prompts[:2], 4)
    assert batch.stats()["cache_entries"] == 0
