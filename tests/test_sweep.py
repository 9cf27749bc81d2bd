"""dola-cpp eval sweep (dola_cpp.sweep): the paper's buckets, the validation/test split, the
choice and its test against plain decoding, resuming, the JSON, the plot, the cache that
``dola-cpp info`` reads, and the one-line errors; with the demo SmolLM2 on a few TruthfulQA
rows from tests/data."""

import json
import re

import pytest
from typer.testing import CliRunner

from dola_cpp import evaluate as ev
from dola_cpp import stats
from dola_cpp import sweep as sw
from dola_cpp.cli._app import app as root_app

from conftest import FACTOR_CSV, TFQA_CSV

# ------------------------------------------------------------------------------- buckets and split


@pytest.mark.parametrize("n, tied, want", [
    (30, True, [(2, 7), (8, 15), (16, 23), (24, 29)]),  # SmolLM2: starts at 2 (tied embeddings)
    (32, False, [(0, 7), (8, 15), (16, 23), (24, 31)]),  # LLaMA-7B's 32 layers in quarters
    (18, True, [(2, 3), (4, 7), (8, 11), (12, 15), (16, 17)]),  # Gemma-3-270M: round(4.5) = 4
])
def test_default_buckets_are_contiguous_quarters_of_even_layers(n, tied, want):
    got = sw.default_buckets(n, tied)
    assert got == want
    for (a, b), (c, _) in zip(got, got[1:]):
        assert b + 1 == c  # contiguous, no overlap
    assert all(b < n for _, b in got)
    assert all(sw.bucket_candidates(a, b) and all(j % 2 == 0 for j in sw.bucket_candidates(a, b)) for a, b in got)


def test_settings_are_plain_low_high_and_the_buckets():
    named = {"low": [2, 4], "high": [15, 17]}
    s = sw.sweep_settings(30, True, [(2, 7), (24, 29)], named.__getitem__)
    assert [x.name for x in s] == ["plain", "low", "high", "bucket-2-7", "bucket-24-29"]
    assert s[0].spec is None and s[0].layers == "none"
    assert s[3].candidates == (2, 4, 6) and s[3].layers == "2,4,6,30" and s[4].layers == "24,26,28,30"
    assert ev.get_task(ev.TFQA)  # the layer strings are what --layers takes: candidates then mature
    from dola_cpp.layers import resolve_layers
    assert resolve_layers(s[3].layers, 30, True).candidates == (2, 4, 6)


@pytest.mark.parametrize("text, message", [
    ("0-7,6-10", "0-7 and 6-10 overlap"),
    ("0-7,8-30", "layer 30 is out of range: premature layers are 0..29"),
    ("0-7,x", "'x' is not a range"),
    ("7-3", "ends before it starts"),
    ("3", "has no even layer"),
    ("0-7,,8-9", "give ranges"),
])
def test_parse_buckets_refuses_bad_ranges(text, message):
    with pytest.raises(sw.SweepError, match=re.escape(message)):
        sw.parse_buckets(text, 30)


def test_parse_buckets():
    assert sw.parse_buckets("0-15, 16-29", 30) == [(0, 15), (16, 29)]
    assert sw.parse_buckets("8", 30) == [(8, 8)]


def test_split_is_disjoint_deterministic_and_seeded():
    items = ev.load_truthfulqa(TFQA_CSV)
    val, test = sw.split_items(items, 0.5, seed=0)
    ids_v, ids_t = {i.index for i in val}, {i.index for i in test}
    assert not ids_v & ids_t and ids_v | ids_t == {i.index for i in items}
    assert len(val) == len(test) == 10
    again = sw.split_items(items, 0.5, seed=0)
    assert [i.index for i in again[0]] == [i.index for i in val]
    assert [i.index for i in sw.split_items(items, 0.5, seed=1)[0]] != [i.index for i in val]
    import numpy as np
    assert ids_v == {int(i) for i in np.random.default_rng(0).permutation(20)[:10]}  # the documented rule
    v3, t3 = sw.split_items(items, 0.3)
    assert len(v3) == 6 and len(t3) == 14
    with pytest.raises(sw.SweepError, match="leaves the test split empty"):
        sw.split_items(items[:2], 0.9)
    with pytest.raises(sw.SweepError, match="leaves the validation split empty"):
        sw.split_items(items[:2], 0.1)
    with pytest.raises(sw.SweepError, match="fraction in"):
        sw.split_items(items, 1.0)


# ------------------------------------------------------------------------------- a real sweep

ARGS = ["--data", str(TFQA_CSV), "--limit", "6", "--buckets", "2-7,16-23", "--threads", "2", "--ctx", "512",
        "--ci", "2000"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "s"
    first = CliRunner().invoke(root_app, ["eval", "sweep", "smollm2", *ARGS, "--out", str(out)])
    files = {p.name: p.read_text() for p in out.glob("*.jsonl")}
    files[sw.SWEEP_JSON] = (out / sw.SWEEP_JSON).read_text() if (out / sw.SWEEP_JSON).exists() else ""
    second = CliRunner().invoke(root_app, ["eval", "sweep", "smollm2", *ARGS, "--out", str(out)])
    return out, first, files, second


def test_sweep_scores_each_setting_on_validation_and_the_choice_on_test(swept):
    out, first, files, _ = swept
    assert first.exit_code == 0, first.output
    data = json.loads(files[sw.SWEEP_JSON])  # the first run's
    assert data["task"] == "tfqa-mc" and data["metric"] == "MC1" and data["n_items"] == 6
    assert data["buckets"] == [[2, 7], [16, 23]]
    val, test = data["split"]["validation"], data["split"]["test"]
    assert len(val) == len(test) == 3 and not set(val) & set(test)
    names = [row["name"] for row in data["settings"]]
    assert names == ["plain", "low", "high", "bucket-2-7", "bucket-16-23"]
    chosen = next(r for r in data["settings"] if r["name"] == data["chosen"])
    # the choice: the best validation MC1, ties to the earlier setting
    best = max(r["validation"]["metrics"]["MC1"] for r in data["settings"])
    first_best = next(r for r in data["settings"] if r["validation"]["metrics"]["MC1"] == best)
    assert chosen is first_best or chosen["name"] == first_best["name"]
    for row in data["settings"]:
        v = row["validation"]
        assert v["n"] == 3 and v["scored"] == 3 and set(v["intervals"]) == {"MC1", "MC2", "MC3"}
        # the run file holds the validation items (and the test items for plain and the choice)
        header, recs = ev.read_run(out / f"{row['name']}.jsonl")
        on_test = row["name"] in ("plain", data["chosen"])
        assert {r["index"] for r in recs} == set(val) | (set(test) if on_test else set())
        assert (row["test"] is not None) == on_test
        assert header["candidates"] == row["candidates"]
        # the intervals are stats.bootstrap_ci of the split's per-item values
        by = {r["index"]: r for r in recs}
        ci = stats.bootstrap_ci([by[i]["MC1"] for i in sorted(val)], 2000, warn=False)
        assert v["intervals"]["MC1"] == ci.as_dict()
    rec = data["recommendation"]
    assert rec["layers"] == chosen["layers"] and rec["metric"] == "MC1"
    d = data["test_difference"]["MC1"]
    assert d["test"] == "McNemar exact" and data["test_difference"]["MC2"]["test"] == "paired bootstrap"
    assert rec["distinguishable"] == (d["distinguishable"] and data["chosen"] != "plain")
    # the output: the warning in one line, the table, the plot, the --layers to use
    assert first.output.count("warning: an interval over 3 items (< 20)") == 1
    assert "Traceback" not in first.output
    assert f"--layers {rec['layers']}" in first.output
    assert ("not distinguishable from zero" in first.output) != rec["distinguishable"] or data["chosen"] == "plain"
    png = (out / sw.SWEEP_PNG).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_rerun_rescores_nothing(swept):
    out, first, files, second = swept
    assert second.exit_code == 0, second.output
    data = json.loads((out / sw.SWEEP_JSON).read_text())
    assert all(r["validation"]["scored"] == 0 and (r["test"] is None or r["test"]["scored"] == 0)
               for r in data["settings"])
    assert {p.name: p.read_text() for p in out.glob("*.jsonl")} == {k: v for k, v in files.items()
                                                                    if k.endswith(".jsonl")}  # not a line added
    assert first.output.split("\n")[-2] == second.output.split("\n")[-2]  # the same verdict


def test_an_interrupted_sweep_resumes(tmp_path, swept):
    """A setting's file cut short: only its missing items are scored again."""
    out, _, files, _ = swept
    for name, text in files.items():
        if not name.endswith(".jsonl"):
            continue
        lines = text.splitlines(keepends=True)
        (tmp_path / name).write_text("".join(lines[:-1]) if name == "low.jsonl" else text)
    r = CliRunner().invoke(root_app, ["eval", "sweep", "smollm2", *ARGS, "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / sw.SWEEP_JSON).read_text())
    scored = {row["name"]: row["validation"]["scored"] for row in data["settings"]}
    assert scored == {"plain": 0, "low": 1, "high": 0, "bucket-2-7": 0, "bucket-16-23": 0}


def test_info_shows_the_last_sweep(swept, smollm2_path):
    out, _, _, _ = swept
    data = json.loads((out / sw.SWEEP_JSON).read_text())
    assert data["sha256"] == sw.model_sha256(smollm2_path)
    r = CliRunner().invoke(root_app, ["info", "smollm2"])
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.startswith("last sweep (tfqa-mc)"))
    assert f"--layers {data['recommendation']['layers']}" in line
    facts = json.loads(CliRunner().invoke(root_app, ["info", "smollm2", "--json"]).stdout)
    assert facts["sweeps"]["tfqa-mc"]["recommendation"] == data["recommendation"]


def test_eval_compare_pairs_two_runs(swept):
    out, _, _, _ = swept
    chosen = json.loads((out / sw.SWEEP_JSON).read_text())["chosen"]
    other = next(n for n in ("low", "high", "bucket-2-7") if n != chosen)  # scored on validation only
    a, b = out / "plain.jsonl", out / f"{other}.jsonl"
    r = CliRunner().invoke(root_app, ["eval", "compare", str(a), str(b), "--ci", "500", "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    (_, ra), (_, rb) = ev.read_run(a), ev.read_run(b)
    common, diffs = ev.compare_records(ev.TFQA, ra, rb, 500, warn=False)
    assert got["n"] == len(common) == 3 and got["only_a"] == 3  # plain also has the test items
    for k, d in diffs.items():
        assert got["metrics"][k]["difference"] == d.as_dict()
    assert got["metrics"]["MC1"]["difference"]["test"] == "McNemar exact"
    r = CliRunner().invoke(root_app, ["eval", "compare", str(a), str(b), "--ci", "500"])
    assert r.exit_code == 0 and "B − A" in r.output and "3 only in A" in r.output


@pytest.mark.parametrize("args, message", [
    (["--buckets", "0-7,6-10"], "Error: --buckets: 0-7 and 6-10 overlap"),
    (["--buckets", "2-7,24-31"], "Error: --buckets: layer 31 is out of range"),
    (["--split", "0.9", "--limit", "2"], "Error: --split 0.9 of 2 items leaves the test split empty"),
    (["--metric", "accuracy"], "Error: --metric accuracy: tfqa-mc reports MC1, MC2, MC3"),
])
def test_sweep_bad_input_is_one_error_line(tmp_path, args, message):
    base = ["eval", "sweep", "smollm2", "--data", str(TFQA_CSV), "--limit", "4", "--out", str(tmp_path / "o")]
    r = CliRunner().invoke(root_app, base + args)
    assert r.exit_code == 1, r.output
    assert message in r.output and "Traceback" not in r.output
    assert len([x for x in r.output.splitlines() if x.startswith("Error:")]) == 1
    assert not (tmp_path / "o").exists()  # nothing scored


def test_compare_refuses_runs_of_different_tasks(tmp_path, swept):
    out, _, _, _ = swept
    other = tmp_path / "f.jsonl"
    other.write_text(json.dumps({"type": "header", "task": "factor", "data": FACTOR_CSV.name}) + "\n")
    r = CliRunner().invoke(root_app, ["eval", "compare", str(out / "plain.jsonl"), str(other)])
    assert r.exit_code == 1 and "different tasks" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(root_app, ["eval", "compare", str(out / "plain.jsonl"), str(tmp_path / "none.jsonl")])
    assert r.exit_code == 1 and "results file not found" in r.output
