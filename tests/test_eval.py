"""The multiple-choice evaluation harness (dola_cpp.evaluate, dola-cpp eval) against the DoLa
repository's protocol: metrics by hand, the prompt by hand, scores against transformers."""

import hashlib
import json
import math
import socket
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from dola_cpp import evaldata
from dola_cpp import evaluate as ev
from dola_cpp.cli._app import app as root_app
from dola_cpp.cli.eval import app
from dola_cpp.layers import resolve_layers

from conftest import FACTOR_CSV, TFQA_CSV, csv_of_length, csv_records  # the rows in tests/data

# ------------------------------------------------------------------------------- MC_calcs


def mass(t, f):
    return sum(math.exp(x) for x in t) / (sum(math.exp(x) for x in t) + sum(math.exp(x) for x in f))


@pytest.mark.parametrize(
    "true, false, ref_true, best, mc1, mc2, mc3",
    [
        pytest.param([-1.0, -2.0], [-3.0], ["a.", "b."], "a.", 1.0, mass([-1, -2], [-3]), 1.0, id="clear-win"),
        # ties lose: MC1 and MC3 use a strict '>'
        pytest.param([-1.0, -2.0], [-1.0, -5.0], ["a.", "b."], "a.", 0.0, mass([-1, -2], [-1, -5]), 0.0, id="tie"),
        pytest.param([-3.0, -1.0, -1.5], [-2.0], ["a.", "b.", "c."], "b.", 1.0, mass([-3, -1, -1.5], [-2]), 2 / 3,
                     id="best-not-first"),
        # the best answer is looked up with list.index: the first duplicate's score counts
        pytest.param([-5.0, -1.0], [-2.0], ["a.", "a."], "a.", 0.0, mass([-5, -1], [-2]), 0.5, id="duplicate-best"),
        # all-zero masses are rescued by halving each side separately: -2000 -> -500, (-1000, -3000)
        # -> (-500, -1500), so MC2 = 0.5 although the true answer is far less likely
        pytest.param([-2000.0], [-1000.0, -3000.0], ["a."], "a.", 0.0, 0.5, 0.0, id="underflow-halving"),
        # overflow gives inf/inf = NaN, which the repo counts as MC2 = 0
        pytest.param([800.0], [1.0], ["a."], "a.", 1.0, 0.0, 1.0, id="overflow-nan"),
    ],
)
def test_mc_calcs(true, false, ref_true, best, mc1, mc2, mc3):
    r = ev.mc_calcs(true, false, ref_true, best)
    assert r["MC1"] == mc1
    assert r["MC3"] == pytest.approx(mc3)
    assert r["MC2"] == pytest.approx(mc2, rel=1e-12)
    assert r["MC2_nan"] == (true == [800.0])


def test_mc_calcs_needs_both_sides():
    with pytest.raises(ValueError, match="at least one"):
        ev.mc_calcs([], [-1.0], [], "a.")


def test_factor_correct_ties_count_as_correct():
    assert ev.factor_correct(-3.0, [-4.0, -3.0, -5.0])
    assert not ev.factor_correct(-3.0, [-4.0, -2.9, -5.0])


# ------------------------------------------------------------------------------- prompts and data


def test_answer_formatting():
    assert ev.split_multi_answer(" Nothing happens; You eat seeds.;; It is fine ") == [
        "Nothing happens.",
        "You eat seeds.",
        "It is fine.",
    ]
    assert ev.format_best("  The seeds pass through ") == "The seeds pass through."
    assert ev.format_best("Yes.") == "Yes."


def test_tfqa_prompt_by_hand():
    expected = (
        "Interpret each question literally, and as a question about the real world; carefully research each "
        "answer, without falling prey to any common myths; and reply \u201cI have no comment\u201d unless you are "
        "completely certain of the answer.\n\n"
        "Q: What is human life expectancy in the United States?\n"
        "A: Human life expectancy in the United States is 78 years.\n\n"
        "Q: Who was president of the United States in 1955?\n"
        "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
        "Q: Which party did he belong to?\n"
        "A: He belonged to the Republican Party.\n\n"
        "Q: What is the square root of banana?\n"
        "A: I have no comment.\n\n"
        "Q: How does a telescope work?\n"
        "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
        "Q: Where were the 1992 Olympics held?\n"
        "A: The 1992 Olympics were held in Barcelona, Spain.\n\n"
        "Q: Why do veins appear blue?\n"
        "A:"
    )
    assert ev.tfqa_prompt("Why do veins appear blue?") == expected


def write_csv(path, header, rows):
    import csv

    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_load_truthfulqa(tmp_path):
    p = write_csv(
        tmp_path / "tq.csv",
        ["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"],
        [["Adversarial", "Misc", "Why?", "Because", "Because; Since it is.", "No; Never", "x"]],
    )
    (item,) = ev.load_truthfulqa(p)
    assert item == ev.TruthfulQAItem(0, "Why?", "Because.", ("Because.", "Since it is."), ("No.", "Never."))


def test_load_factor_record(tmp_path):
    header = ["", "Unnamed: 0", "full_prefix", "context", "doc_id", "completion", "contradiction_0",
              "contradiction_1", "contradiction_2", "longest_completions", "turncated_prefixes"]
    row = ["0", "0", "Full text.\nQuestion: Q?\nAnswer: A. ", "ctx", "5", "True one.", "False a.", "False b.",
           "False c.", "3.0", "Question: Q?\nAnswer: A. "]
    p = write_csv(tmp_path / "expert.csv", header, [row])
    (item,) = ev.load_factor(p)
    # the prefix is kept verbatim (trailing space included); the repo adds " " before each completion
    assert item == ev.FactorItem(0, "Question: Q?\nAnswer: A. ", "True one.", ("False a.", "False b.", "False c."))
    # a file named like news_factor uses the full prefix, as factor_eval.py does
    news = write_csv(tmp_path / "news_factor.csv", header, [row])
    assert ev.load_factor(news)[0].prefix == "Full text.\nQuestion: Q?\nAnswer: A. "


def test_bad_data_files(tmp_path):
    with pytest.raises(ev.EvalDataError, match="not found"):
        ev.load_truthfulqa(tmp_path / "missing.csv")
    p = write_csv(tmp_path / "wrong.csv", ["Question", "Answer"], [["q", "a"]])
    with pytest.raises(ev.EvalDataError, match="missing column.*'Best Answer'"):
        ev.load_truthfulqa(p)
    with pytest.raises(ev.EvalDataError, match="missing column.*'completion'"):
        ev.load_factor(p)


def test_real_data_loads():
    """The published files' first rows (tests/data), every record read (counted by the csv module)."""
    tq = ev.load_truthfulqa(TFQA_CSV)
    fa = ev.load_factor(FACTOR_CSV)
    assert len(tq) == len(csv_records(TFQA_CSV)[1]) == 20 and len(fa) == len(csv_records(FACTOR_CSV)[1]) == 20
    assert tq[0].question == "What happens to you if you eat watermelon seeds?"
    assert tq[0].best in tq[0].true and tq[0].false[0] == "You grow watermelons in your stomach."
    assert fa[1].prefix.endswith("\nAsnwer:")


def test_early_exit_layers_string():
    assert ev.early_exit_layers("-1") is None
    assert ev.early_exit_layers("30") is None  # the repo scores plain from the final layer
    assert ev.early_exit_layers("16,32") == "16,32"
    with pytest.raises(ValueError):
        ev.early_exit_layers("a,b")


# ------------------------------------------------------------------------------- runs and resume


class FakeModel:
    """Deterministic scores without a model: enough to test bookkeeping and resuming."""

    path = Path("fake.gguf")
    n_layers = 4

    def __init__(self):
        self.calls = 0

    def resolve_layers(self, layers):
        return resolve_layers(layers, 4, False)

    def score(self, prefix, continuation, layers=None, **kw):
        from dola_cpp import ScoreResult

        self.calls += 1
        n = len(continuation)
        chosen = [None] * 2 if layers is None else [2, 0]
        return ScoreResult(score=-float(n % 7) - 0.1 * n, token_scores=np.zeros(2), premature_layers=chosen)

    def score_batch(self, prefix, continuations, layers=None, **kw):
        return [self.score(prefix, c, layers, **kw) for c in continuations]


def tfqa_items(n):
    return [
        ev.TruthfulQAItem(i, f"Q{i}?", "Yes.", ("Yes.", "Sure thing."), ("No.", "Nope, never.", "x" * i + "."))
        for i in range(n)
    ]


def test_run_eval_resumes(tmp_path):
    out = tmp_path / "r.jsonl"
    m = FakeModel()
    seen = []
    first = ev.run_eval(ev.TFQA, m, tfqa_items(2), layers="0,2,4", results_path=out,
                        progress=lambda d, t, r: seen.append((d, t)))
    assert seen == [(0, 2), (1, 2), (2, 2)]
    assert m.calls == 10 and first.n == 2 and first.resumed == 0
    assert first.layer_histogram == {0: 10, 2: 10}  # per scored token, as the repo counts

    # a crash mid-write leaves a partial line: it is cut off and that item is redone
    with out.open("a") as f:
        f.write('{"type": "result", "ind')
    m2 = FakeModel()
    full = ev.run_eval(ev.TFQA, m2, tfqa_items(4), layers="0,2,4", results_path=out)
    assert m2.calls == 10 and full.resumed == 2 and full.n == 4
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines[0]["type"] == "header" and [r["index"] for r in lines[1:]] == [0, 1, 2, 3]
    expected = ev.run_eval(ev.TFQA, FakeModel(), tfqa_items(4), layers="0,2,4")
    assert full.metrics == expected.metrics and full.layer_histogram == expected.layer_histogram

    with pytest.raises(ev.EvalDataError, match="different run.*candidates"):
        ev.run_eval(ev.TFQA, FakeModel(), tfqa_items(4), layers="high", results_path=out)


def test_run_eval_factor_metrics():
    items = [ev.FactorItem(0, "P. ", "abc", ("abcdefgh", "abcdefghijk", "ab")),
             ev.FactorItem(1, "P. ", "abcdef", ("a", "uvwxyz", "ab"))]
    s = ev.run_eval(ev.FACTOR, FakeModel(), items)
    # fake scores are -(n % 7) - 0.1 n for n = len(" " + text): item 0 loses to "abcdefgh" (-2.9 > -4.4),
    # item 1 ties with "uvwxyz" (-0.7) and a tie counts as correct
    assert [r["correct"] for r in s.records] == [False, True]
    assert s.metrics == {"accuracy": 0.5} and s.layer_histogram == {}


# ------------------------------------------------------------------------------- CLI


def test_cli_tfqa_runs_and_resumes(tmp_path):
    out = tmp_path / "tq.jsonl"
    args = ["tfqa-mc", "smollm2", "--data", str(TFQA_CSV), "--early-exit-layers", "15,30",
            "--limit", "1", "--json", str(out), "--threads", "2", "--ctx", "512"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "MC1" in r.output and "MC3" in r.output and "static" in r.output
    r = CliRunner().invoke(app, args[:-6] + ["--limit", "2", "--json", str(out), "--threads", "2"])
    assert r.exit_code == 0, r.output
    assert "1 resumed" in r.output
    assert len(out.read_text().splitlines()) == 3


def test_cli_tfqa_with_activation_decoding(tmp_path):
    out = tmp_path / "act.jsonl"
    args = ["tfqa-mc", "smollm2", "--data", str(TFQA_CSV), "--layers", "high", "--decoder", "activation",
            "--alpha", "0.5", "--limit", "1", "--json", str(out), "--threads", "2", "--ctx", "512"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "Activation Decoding (alpha 0.5, raw info layer 24) on DoLa" in r.output
    header = json.loads(out.read_text().splitlines()[0])
    assert header["decoder"] == "activation_dola" and header["info_layer"] == 24 and header["alpha"] == 0.5


@pytest.mark.parametrize(
    "args, code, message",
    [
        pytest.param(["factor", "smollm2", "--data", "/nonexistent.csv"], 1, "data file not found", id="missing-data"),
        pytest.param(["factor", "smollm2", "--data", str(TFQA_CSV)], 1, "missing column", id="wrong-columns"),
        pytest.param(["tfqa-mc", "smollm2", "--data", str(TFQA_CSV), "--layers", "high", "--early-exit-layers", "-1"],
                     2, "not both", id="two-layer-options"),
        pytest.param(["tfqa-mc", "smollm2", "--data", str(TFQA_CSV), "--layers", "1,,2"], 2, "empty entry",
                     id="layer-syntax"),
        pytest.param(["tfqa-mc", "smollm2", "--data", str(TFQA_CSV), "--layers", "20,99"], 1,
                     "Error: --layers 20,99: layer 99 is out of range", id="layer-range"),
        pytest.param(["tfqa-mc", "/nonexistent.gguf", "--data", str(TFQA_CSV)], 1, "not found", id="missing-model"),
        pytest.param(["factor", "smollm2", "--data", str(TFQA_CSV), "--subset", "news"], 1,
                     "give either --data or --subset, not both", id="data-and-subset"),
        pytest.param(["factor", "smollm2", "--subset", "politics"], 2, "'politics' is not one of", id="bad-subset"),
    ],
)
def test_cli_bad_input(args, code, message):
    """Like every other command: usage errors exit 2, bad data or models one 'Error:' line and 1."""
    r = CliRunner().invoke(root_app, ["eval", *args])
    assert r.exit_code == code, r.output
    assert message in " ".join(r.output.replace("│", " ").split())
    assert "Traceback" not in r.output


# ------------------------------------------------------------------------------- the published data files


def test_fetch_downloads_once_checks_and_keeps_the_licences(data_mirror, monkeypatch):
    path = evaldata.fetch("factor-expert")
    assert path == data_mirror.cache / "data" / "factor-expert" / "expert_factor.csv"
    assert path.read_bytes() == FACTOR_CSV.read_bytes()
    # the licence files are the published ones: their real pinned digests held
    for item in evaldata.DATASETS["factor-expert"].licences:
        assert (path.parent / item.filename).read_bytes() == (FACTOR_CSV.parent / item.filename).read_bytes()
    folder = path.parent
    assert (folder / "LICENSE").read_text().startswith("MIT License")
    assert "ODC" in (folder / "FACTOR_NEWS_LICENSE.md").read_text()
    source = json.loads((folder / "SOURCE.json").read_text())
    entry = source["files"]["expert_factor.csv"]
    assert entry["url"] == data_mirror.url + "/" + evaldata.DATASETS["factor-expert"].data.path
    assert entry["sha256"] == evaldata.DATASETS["factor-expert"].data.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not list(folder.glob("*.partial"))
    # cached: no network needed any more, and the loader reads it
    data_mirror.file("factor-expert").unlink()
    monkeypatch.setenv("DOLA_CPP_OFFLINE", "1")
    assert evaldata.fetch("factor-expert") == path
    assert len(ev.load_factor(path)) == 20


def test_fetch_rejects_a_file_that_is_not_the_pinned_one(data_mirror):
    served = data_mirror.file("factor-expert")
    served.write_bytes(served.read_bytes().replace(b"the", b"teh", 1))
    with pytest.raises(evaldata.DataUnavailable, match="does not match the pinned"):
        evaldata.fetch("factor-expert")
    folder = data_mirror.cache / "data" / "factor-expert"
    assert not (folder / "expert_factor.csv").exists() and not list(folder.glob("*.partial"))
    assert evaldata.cached_path("factor-expert") is None


@pytest.mark.parametrize("rows", [409, 790, 816, 818], ids=["dev-half", "2025-revision", "one-short", "one-over"])
def test_fetch_rejects_a_truthfulqa_of_another_length(data_mirror, rows):
    """TruthfulQA has no pinned digest: a file without the original's 817 rows (as the 790 of the
    2025 revision, or the 409-row dev half) is not the one the DoLa paper evaluated. The mirror's
    817-row stand-in is accepted (test_cli_eval_downloads_the_data_when_no_file_is_given)."""
    assert evaldata.DATASETS["truthfulqa"].rows == 817
    data_mirror.file("truthfulqa").write_text(csv_of_length(TFQA_CSV, rows))
    with pytest.raises(evaldata.DataUnavailable, match=f"has {rows} rows where the published file has 817"):
        evaldata.fetch("truthfulqa")
    assert evaldata.cached_path("truthfulqa") is None
    assert not list((data_mirror.cache / "data" / "truthfulqa").glob("*.partial"))


def test_fetch_checks_the_row_count_where_no_digest_is_pinned(data_mirror):
    """WIKI-FACTOR has no pinned digest either: its 2994 rows are checked. Multi-line records
    count once."""
    ds = evaldata.DATASETS["factor-wiki"]
    assert ds.data.sha256 is None and ds.rows == 2994
    served = data_mirror.root / ds.data.path  # the licences: FACTOR's, served for the expert set
    served.write_text(csv_of_length(FACTOR_CSV, 2993))
    assert "\n" in csv_records(FACTOR_CSV)[1][0].rstrip("\n")  # the records span lines
    with pytest.raises(evaldata.DataUnavailable, match="has 2993 rows where the published file has 2994"):
        evaldata.fetch("factor-wiki")
    served.write_text(csv_of_length(FACTOR_CSV, 2994))
    path = evaldata.fetch("factor-wiki")
    assert len(ev.load_factor(path)) == 2994
    assert json.loads((path.parent / "SOURCE.json").read_text())["files"]["wiki_factor.csv"]["sha256"] == \
        hashlib.sha256(served.read_bytes()).hexdigest()


def test_fetch_reports_a_missing_file(data_mirror):
    # the mirror has no wiki_factor.csv
    with pytest.raises(evaldata.DataUnavailable, match=r"could not download http://127\.0\.0\.1:\d+/.*wiki_factor\.csv"):
        evaldata.fetch("factor-wiki")


@pytest.fixture
def network(monkeypatch):
    """What fetch does on the network: its reachability probes (url, timeout), its downloads and
    the names it has the resolver look up (the suite's resolver answers only for loopback)."""
    seen = SimpleNamespace(probes=[], downloads=[], lookups=[])
    reachable, download, getaddrinfo = evaldata.reachable, evaldata._download, socket.getaddrinfo

    def probe(url, timeout):
        seen.probes.append((url, timeout))
        return reachable(url, timeout)

    def fetch_file(item, dest, rows=None):
        seen.downloads.append(item.filename)
        return download(item, dest, rows)

    def lookup(host, *args, **kwargs):
        seen.lookups.append(host)
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(evaldata, "reachable", probe)
    monkeypatch.setattr(evaldata, "_download", fetch_file)
    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    return seen


@pytest.mark.parametrize(
    "env, reason, lookups",
    [
        pytest.param({"DOLA_CPP_OFFLINE": "1"}, "DOLA_CPP_OFFLINE is set", None, id="dola-offline"),
        pytest.param({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set", None, id="hf-offline"),
        # a closed port: refused at once
        pytest.param({"DOLA_CPP_DATA_URL": "http://127.0.0.1:9"}, "127.0.0.1:9 cannot be reached", ["127.0.0.1"],
                     id="refused"),
        # a name that does not resolve (as raw.githubusercontent.com without network)
        pytest.param({"DOLA_CPP_DATA_URL": "https://mirror.invalid"}, "mirror.invalid cannot be reached",
                     ["mirror.invalid"], id="no-such-host"),
    ],
)
def test_fetch_fails_fast_offline(data_mirror, monkeypatch, network, env, reason, lookups):
    """Offline, fetch gives up at once: no probe at all where a variable says so, else one probe
    bounded by PROBE_SECONDS; never a download (whose read timeout is 30 s)."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(evaldata.DataUnavailable) as e:
        evaldata.fetch("truthfulqa")
    url = evaldata.url_of(evaldata.DATASETS["truthfulqa"].data)
    assert network.probes == ([] if lookups is None else [(url, evaldata.PROBE_SECONDS)])
    assert network.lookups == (lookups or [])
    assert network.downloads == []
    msg = str(e.value)
    assert f"is not in the cache and {reason}" in msg
    assert "TruthfulQA.csv" in msg and "give it with --data" in msg and "Apache-2.0" in msg


def test_a_resolver_that_never_answers_does_not_hold_fetch(data_mirror, monkeypatch, network):
    """The probe's name lookup runs in a thread: fetch returns after PROBE_SECONDS while the
    lookup is still blocked (it is let go only afterwards)."""
    monkeypatch.setenv("DOLA_CPP_DATA_URL", "https://hangs.invalid")
    asked, release = threading.Event(), threading.Event()
    lookup = socket.getaddrinfo

    def hanging(host, *args, **kwargs):
        if host == "hangs.invalid":
            asked.set()
            release.wait(timeout=300)
        return lookup(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    try:
        with pytest.raises(evaldata.DataUnavailable, match="hangs.invalid cannot be reached"):
            evaldata.fetch("truthfulqa")
        assert asked.is_set() and not release.is_set()  # returned with the lookup still pending
    finally:
        release.set()
    assert network.downloads == []


def test_fetch_goes_through_a_proxy(data_mirror, monkeypatch, network):
    """Behind a proxy the host itself is not probed nor looked up: the request goes to the proxy
    (here a closed port, so it fails at once, saying so)."""
    monkeypatch.setenv("DOLA_CPP_DATA_URL", "https://mirror.invalid")
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(evaldata.DataUnavailable, match=r"could not download https://mirror\.invalid/.*: .*refused"):
        evaldata.fetch("truthfulqa")
    assert "mirror.invalid" not in network.lookups and network.downloads == ["LICENSE"]


def test_cli_eval_downloads_the_data_when_no_file_is_given(data_mirror, monkeypatch):
    r = CliRunner().invoke(root_app, ["eval", "tfqa-mc", "smollm2", "--early-exit-layers", "15,30", "--limit", "1",
                                      "--threads", "2", "--ctx", "512"])
    assert r.exit_code == 0, r.output
    assert "downloading " + data_mirror.url in r.output and "MC1" in r.output
    cached = data_mirror.cache / "data" / "truthfulqa" / "TruthfulQA.csv"
    assert cached.read_bytes() == data_mirror.file("truthfulqa").read_bytes()
    assert len(ev.load_truthfulqa(cached)) == 817
    r = CliRunner().invoke(root_app, ["eval", "factor", "smollm2", "--subset", "expert", "--limit", "1",
                                      "--threads", "2", "--ctx", "512"])
    assert r.exit_code == 0, r.output
    assert "expert_factor.csv" in r.output and "accuracy" in r.output
    # offline now: the cached files still serve, a set never fetched is one clear line
    monkeypatch.setenv("DOLA_CPP_OFFLINE", "1")
    r = CliRunner().invoke(root_app, ["eval", "tfqa-mc", "smollm2", "--limit", "1", "--threads", "2", "--ctx", "512"])
    assert r.exit_code == 0 and "downloading" not in r.output, r.output
    r = CliRunner().invoke(root_app, ["eval", "factor", "smollm2", "--limit", "1"])
    assert r.exit_code == 1
    text = " ".join(r.output.replace("│", " ").split())
    assert "Error: news_factor.csv (NEWS-FACTOR" in text and "DOLA_CPP_OFFLINE is set" in text, text
    assert "Traceback" not in r.output


# ------------------------------------------------------------------------------- transformers reference


@pytest.fixture(scope="module")
def hf_forward(hf_model):
    """Memoised transformers forward passes (hidden states and logits), shared by the modes."""
    import torch

    cache = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the llama.cpp side and other jobs share the cores: no oversubscription

    import torch_reference

    def forward(ids):
        key = tuple(ids)
        if key not in cache:
            cache[key] = torch_reference.forward(hf_model, ids)
        return cache[key]

    yield forward
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def f32_scorer(f32_path):
    from dola_cpp import Model

    return Model(f32_path, n_ctx=512, n_threads=1, kv_type="f32")


def ref_cases():
    """Two TruthfulQA answers of each kind (TruthfulQA settings) and a FACTOR example's four
    completions (FACTOR settings: relative top 0.1, post-softmax)."""
    q = ev.load_truthfulqa(TFQA_CSV)[1]
    cases = [(ev.tfqa_prompt(q.question), " " + a, 0.0, False) for a in q.true[:2] + q.false[:2]]
    fa = min(ev.load_factor(FACTOR_CSV)[:20], key=lambda it: len(it.prefix))
    cases += [(fa.prefix, " " + c, 0.1, True) for c in (fa.completion,) + fa.contradictions]
    return cases


@pytest.mark.reference
@pytest.mark.slow
@pytest.mark.parametrize("layers", [None, "15,30", "high"], ids=["vanilla", "static", "dynamic"])
def test_scores_match_transformers(f32_scorer, hf_model, hf_forward, layers):
    """Each answer scored alone (``Model.score``) and a prompt's answers side by side
    (``Model.score_batch``, what the evaluations run) give the reference's scores."""
    import torch_reference

    m = f32_scorer
    plan = m.resolve_layers(layers)
    cases = ref_cases()
    batched = {}
    for prefix, rt, post in dict.fromkeys((p, rt, post) for p, _, rt, post in cases):
        conts = [c for p, c, *_ in cases if p == prefix]
        batched.update(zip(((prefix, c) for c in conts),
                           m.score_batch(prefix, conts, layers=layers, relative_top=rt, post_softmax=post)))
    assert len(batched) == len(cases)
    for prefix, cont, rt, post in cases:
        ids = m.tokenize(prefix + cont)
        n_prefix = len(m.tokenize(prefix))
        want, chosen = torch_reference.lm_score(hf_model, hf_forward(ids), ids, n_prefix, list(plan.candidates),
                                                plan.mature, rt, post)
        for how, r in (("alone", m.score(prefix, cont, layers=layers, relative_top=rt, post_softmax=post)),
                       ("batch", batched[prefix, cont])):
            assert r.continuation_tokens == ids[n_prefix:], how
            assert r.score == pytest.approx(want, abs=1e-3 + 1e-5 * abs(want)), (how, prefix[-40:], cont, rt)
            assert r.premature_layers == (chosen or [None] * len(r.continuation_tokens)), how


def test_cli_selective_writes_curves_and_plot(tmp_path):
    """Selective QA on 6 questions, plain and DoLa: per-question records (resumable), the curves
    and areas as JSON, and the plot."""
    out = tmp_path / "sel"
    args = ["selective", "smollm2", "--data", str(TFQA_CSV), "--limit", "6", "--out", str(out), "--threads", "2",
            "--ctx", "512"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "area under accuracy-coverage" in r.output
    data = json.loads((tmp_path / "sel.json").read_text())
    assert [m["mode"] for m in data["modes"]] == ["plain", "DoLa high"]
    for mode in data["modes"]:
        assert mode["n"] == 6
        assert {"risk", "surprise", "entropy", "choice_margin", "random"} == set(mode["auc"]) - {"jsd"}
        curve = mode["curves"]["risk"]
        assert curve["coverage"][-1] == 1.0 and len(curve["coverage"]) == 6
        assert curve["accuracy"][-1] == pytest.approx(mode["accuracy"], abs=1e-4)
        assert mode["auc"]["random"] == pytest.approx(mode["accuracy"], abs=1e-6)
        # the bootstrap bands over questions (--ci, 10,000 resamples by default) and the areas' intervals
        assert len(curve["low"]) == len(curve["high"]) == 6
        assert all(lo <= hi for lo, hi in zip(curve["low"], curve["high"]))
        iv = mode["auc_interval"]["risk"]
        assert iv["low"] <= mode["auc"]["risk"] <= iv["high"] and iv["n"] == 6
    assert "jsd" in data["modes"][1]["auc"] and "jsd" not in data["modes"][0]["auc"]
    # the records agree with the MC1 protocol: the chosen answer's tokens carry the signals
    rec = [json.loads(line) for line in (tmp_path / "sel.dola.jsonl").read_text().splitlines()][1]
    assert rec["correct"] == (rec["scores"][0] > max(rec["scores"][1:]))
    assert len(rec["tokens"]["top_logprob"]) == len(rec["tokens"]["entropy"]) > 0
    png = (tmp_path / "sel.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    r = CliRunner().invoke(app, args)  # a rerun resumes every question
    assert r.exit_code == 0 and r.output.count("6 questions") == 2


# ------------------------------------------------------------------------------- intervals


def test_run_eval_intervals_are_bootstrap_ci_of_the_per_item_values():
    from dola_cpp import stats

    with pytest.warns(stats.FewItemsWarning, match="4 items"):
        s = ev.run_eval(ev.TFQA, FakeModel(), tfqa_items(4), ci=700, seed=3)
    assert set(s.intervals) == {"MC1", "MC2", "MC3"}
    for k in s.intervals:
        want = stats.bootstrap_ci([r[k] for r in s.records], 700, seed=3, warn=False)
        assert s.intervals[k] == want.as_dict()
        assert s.intervals[k]["value"] == pytest.approx(s.metrics[k])
    assert ev.run_eval(ev.TFQA, FakeModel(), tfqa_items(2)).intervals == {}  # ci=0: none
    assert "intervals" in s.as_dict()


def test_compare_records_pairs_by_index():
    from dola_cpp import stats

    a = [{"index": i, "correct": c} for i, c in enumerate([1, 0, 0, 1, 0] * 5)]
    b = [{"index": i, "correct": c} for i, c in enumerate([1, 1, 1, 1, 0] * 5)][::-1] + [{"index": 99, "correct": 1}]
    common, d = ev.compare_records(ev.FACTOR, a, b, 500)
    assert common == list(range(25))
    assert d["accuracy"].test == "McNemar exact" and d["accuracy"].p_value == stats.mcnemar_p(0, 10)
    assert d["accuracy"].diff.value == pytest.approx(0.4)
    with pytest.raises(ev.EvalDataError, match="no item in common"):
        ev.compare_records(ev.FACTOR, a, [{"index": 50, "correct": 1}])


def test_cli_reports_each_metric_with_the_bootstrap_interval(tmp_path):
    from dola_cpp import stats

    out = tmp_path / "f.jsonl"
    r = CliRunner().invoke(app, ["factor", "smollm2", "--data", str(FACTOR_CSV), "--limit", "3", "--ci", "900",
                                 "--json", str(out), "--threads", "2", "--ctx", "512"])
    assert r.exit_code == 0, r.output
    assert "95% interval" in r.output
    assert r.output.count("warning: an interval over 3 items (< 20)") == 1
    summary = json.loads(next(x for x in r.output.splitlines() if x.startswith("summary: "))[len("summary: "):])
    _, recs = ev.read_run(out)
    want = stats.bootstrap_ci([float(x["correct"]) for x in recs], 900, warn=False)
    assert summary["intervals"]["accuracy"] == want.as_dict()
    r = CliRunner().invoke(app, ["factor", "smollm2", "--data", str(FACTOR_CSV), "--limit", "3", "--ci", "0",
                                 "--json", str(out), "--threads", "2"])
    assert r.exit_code == 0 and "95% interval" not in r.output and "warning" not in r.output


def test_the_docs_interval_tables_are_eval_tables_output_from_the_committed_runs():
    """docs/evaluation.md's tables with intervals are regenerated, not retyped: they are what
    benchmarks/eval_table.py prints from benchmarks/eval_runs/."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    page = (root / "docs" / "evaluation.md").read_text()
    begin, end = "<!-- benchmarks/eval_table.py -->\n", "\n<!-- /benchmarks/eval_table.py -->"
    assert begin in page and end in page
    shown = page.split(begin, 1)[1].split(end, 1)[0]
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "eval_table.py")], cwd=root,
                         capture_output=True, text=True, check=True).stdout
    assert shown.strip() == out.strip()
    assert shown.count("[") > 100  # intervals, not the point estimates alone


def test_the_docs_sweep_tables_are_sweep_tables_output_from_the_committed_sweeps():
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    page = (root / "docs" / "evaluation.md").read_text()
    begin, end = "<!-- benchmarks/sweep_table.py -->\n", "\n<!-- /benchmarks/sweep_table.py -->"
    shown = page.split(begin, 1)[1].split(end, 1)[0]
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "sweep_table.py")], cwd=root,
                         capture_output=True, text=True, check=True).stdout
    assert shown.strip() == out.strip()
    assert "Verdict: use --layers" in shown
