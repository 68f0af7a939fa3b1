"""run_eval on tiny random-weight models: results.json, resume, interrupts, validation, table."""

from __future__ import annotations

import json
import re

import pytest
from rich.console import Console

from sparse_infer.eval import compare, results, ruler, runner, tables
from sparse_infer.eval.errors import EvalError

from .conftest import make_tiny_llama


@pytest.fixture(scope="module")
def samples(tokenizer):
    out = ruler.generate_samples(tokenizer, ["niah_single_1", "vt"], [512, 768], 1, seed=0)
    for s in out:
        s["max_new_tokens"] = 4  # random weights: the text does not matter, only the plumbing
    return out


def _console_text(table) -> str:
    console = Console(width=200, record=True)
    console.print(table)
    return console.export_text()


def test_run_eval_dense_and_sparse(tmp_path, tokenizer, tiny_llama, samples, sparse_plan):
    import sparse_infer

    rows = runner.run_eval(
        tiny_llama, tokenizer, samples, {"dense": None, "sparse": sparse_plan}, tmp_path, progress=False
    )
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["version"] == 1 and doc["model"]["max_position_embeddings"] == 4096
    assert list(doc["plans"]) == ["dense", "sparse"]
    assert doc["plans"]["dense"]["plan"] is None
    assert doc["plans"]["sparse"]["plan"]["prefill"]["default"]["pattern"] == "vertical_slash"
    for name in ("dense", "sparse"):
        recs = doc["plans"][name]["records"]
        assert [r["id"] for r in recs] == [s["id"] for s in samples]
        for r in recs:
            assert "input" not in r and len(r["input_sha1"]) == 40
            assert r["score"] in (0.0, 100.0) or 0 <= r["score"] <= 100
            assert isinstance(r["prediction"], str) and 0 < r["new_tokens"] <= 4
            # the prefill, timed apart, is part of the whole generate call
            assert 0 < r["prefill_seconds"] < r["seconds"]
    # The patch layer measured the sparse prefill; dense has no stats.
    assert all(0 < r["stats"]["prefill_density"] < 1 for r in doc["plans"]["sparse"]["records"])
    assert all("stats" not in r for r in doc["plans"]["dense"]["records"])
    assert {(r["plan"], r["length"], r["task"]) for r in rows} == {
        (p, L, t) for p in ("dense", "sparse") for L in (512, 768) for t in ("niah_single_1", "vt")
    }
    assert all(r["n"] == 1 for r in rows)
    assert rows == doc["summary"]
    assert not sparse_infer.is_patched(tiny_llama)  # left dense afterwards
    text = _console_text(tables.render_table(rows))
    assert "dense" in text and "Δ sparse" in text and "average" in text and "niah_single_1" in text
    assert all(r["prefill_seconds"] > 0 for r in rows)
    assert "prefill s dense" in text and "prefill s sparse" in text and "sparse × vs dense" in text


def test_dense_only_needs_no_patch_layer(tmp_path, tokenizer, tiny_llama, samples, capsys):
    rows = runner.run_eval(tiny_llama, tokenizer, samples[:2], {"dense": None}, tmp_path, progress=True)
    assert [r["plan"] for r in rows] == ["dense", "dense"]
    # captured output is not a terminal: one progress line per finished sample, for logs
    lines = [ln for ln in capsys.readouterr().out.splitlines() if re.match(r"\d+/2 ", ln)]
    records = json.loads((tmp_path / results.RESULTS_FILE).read_text())["plans"]["dense"]["records"]
    assert len(lines) == 2
    for i, (line, rec) in enumerate(zip(lines, records), 1):
        assert line.startswith(f"{i}/2 dense {rec['task']} @{rec['length']}: score {rec['score']:.1f}, ")
        assert re.search(r"elapsed \d+:\d\d:\d\d, ETA \d+:\d\d:\d\d$", line)
    assert lines[-1].endswith("ETA 0:00:00")


def test_resume_skips_done_samples(tmp_path, tokenizer, tiny_llama, samples, monkeypatch):
    calls = []
    real = runner.generate_one

    def counting(model, tok, prompt, n):
        calls.append(prompt)
        return real(model, tok, prompt, n)

    monkeypatch.setattr(runner, "generate_one", counting)
    runner.run_eval(tiny_llama, tokenizer, samples[:2], {"dense": None}, tmp_path, progress=False)
    assert len(calls) == 2
    rows = runner.run_eval(tiny_llama, tokenizer, samples, {"dense": None}, tmp_path, resume=True, progress=False)
    assert len(calls) == len(samples)  # only the two new ones ran
    recs = json.loads((tmp_path / "results.json").read_text())["plans"]["dense"]["records"]
    assert sorted(r["id"] for r in recs) == sorted(s["id"] for s in samples)
    assert sum(r["n"] for r in rows) == len(samples)
    # Without --resume the stored results are refused, not replaced, and the way on is named.
    before = (tmp_path / "results.json").read_text()
    with pytest.raises(EvalError, match="already holds results; add --resume to continue them .* or choose another"):
        runner.run_eval(tiny_llama, tokenizer, samples[:1], {"dense": None}, tmp_path, progress=False)
    assert (tmp_path / "results.json").read_text() == before
    assert len(calls) == len(samples)


def test_interrupt_keeps_finished_samples(tmp_path, tokenizer, tiny_llama, samples, monkeypatch):
    real = runner.generate_one
    calls = []

    def flaky(model, tok, prompt, n):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(model, tok, prompt, n)

    monkeypatch.setattr(runner, "generate_one", flaky)
    with pytest.raises(KeyboardInterrupt):
        runner.run_eval(tiny_llama, tokenizer, samples, {"dense": None}, tmp_path, progress=False)
    recs = json.loads((tmp_path / "results.json").read_text())["plans"]["dense"]["records"]
    assert len(recs) == 2
    monkeypatch.setattr(runner, "generate_one", real)
    runner.run_eval(tiny_llama, tokenizer, samples, {"dense": None}, tmp_path, resume=True, progress=False)
    recs = json.loads((tmp_path / "results.json").read_text())["plans"]["dense"]["records"]
    assert len(recs) == len(samples)


def test_the_prefill_clock_times_generates_first_forward(tokenizer, tiny_llama, samples):
    """generate's first call of the model is the whole prompt: that call is what the clock times,
    and its hooks are gone afterwards, also when generation fails."""
    import torch

    from sparse_infer.eval.prompts import encode

    seen = []
    probe = tiny_llama.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        with runner.timing_prefill(tiny_llama) as clock:
            _, n_new = runner.generate_one(tiny_llama, tokenizer, samples[0]["input"], 4)
    finally:
        probe.remove()
    assert seen[0] == len(encode(tokenizer, samples[0]["input"])) and set(seen[1:]) <= {1}
    assert clock.calls == len(seen) == n_new and clock.seconds > 0
    assert not tiny_llama._forward_pre_hooks and not tiny_llama._forward_hooks
    with pytest.raises(RuntimeError), runner.timing_prefill(tiny_llama):
        tiny_llama(torch.zeros((1, 8), dtype=torch.long))
        raise RuntimeError("generation failed")
    assert not tiny_llama._forward_pre_hooks and not tiny_llama._forward_hooks
    with runner.timing_prefill(object()) as clock:   # no torch module: nothing to time
        pass
    assert clock.seconds is None


def test_no_forward_records_no_prefill_time(tmp_path, tokenizer, tiny_llama, samples, fast_generation):
    """A stand-in for generate_one runs no forward: no prefill time is recorded, and the only
    forward is the short warm-up before the first sample."""
    seen = []
    probe = tiny_llama.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        rows = runner.run_eval(tiny_llama, tokenizer, samples, {"dense": None}, tmp_path, progress=False)
    finally:
        probe.remove()
    assert seen == [16] and len(fast_generation) == len(samples)
    recs = json.loads((tmp_path / results.RESULTS_FILE).read_text())["plans"]["dense"]["records"]
    assert len(recs) == len(samples) and all("prefill_seconds" not in r for r in recs)
    assert all("prefill_seconds" not in r for r in rows)
    assert [c.header for c in tables.render_table(rows).columns] == ["length", "task", "n", "dense"]


def test_results_without_prefill_times_resume_and_merge(tmp_path, tokenizer, tiny_llama, samples):
    """A results.json written before prefill times were recorded resumes; its records stay
    without one, and the summary and the table average only the records that have one."""
    from sparse_infer.eval import merge

    out = tmp_path / "old"
    runner.run_eval(tiny_llama, tokenizer, samples[:1], {"dense": None}, out, progress=False)
    old = json.loads((out / results.RESULTS_FILE).read_text())
    for rec in old["plans"]["dense"]["records"]:
        del rec["prefill_seconds"]
    old["summary"] = [{k: v for k, v in row.items() if k != "prefill_seconds"} for row in old["summary"]]
    (out / results.RESULTS_FILE).write_text(json.dumps(old))
    rows = runner.run_eval(tiny_llama, tokenizer, samples, {"dense": None}, out, resume=True, progress=False)
    recs = json.loads((out / results.RESULTS_FILE).read_text())["plans"]["dense"]["records"]
    assert recs[0] == old["plans"]["dense"]["records"][0]                  # kept as it was
    assert all(r["prefill_seconds"] > 0 for r in recs[1:]) and len(recs) == len(samples)
    by_key = {(r["length"], r["task"]): r for r in rows}
    first = samples[0]
    assert "prefill_seconds" not in by_key[(first["length"], first["task"])]
    assert sum("prefill_seconds" in r for r in rows) == len(samples) - 1
    text = _console_text(tables.render_table(rows))
    assert "prefill s dense" in text
    merged = merge.merge_results([out], tmp_path / "merged")
    assert merged["summary"] == rows


def test_render_table_prefill_columns():
    """Prefill seconds per plan and each plan's speed against the baseline, only when timed."""
    rows = [
        {"plan": "dense", "length": 4096, "task": "vt", "score": 100.0, "n": 2, "prefill_seconds": 2.0},
        {"plan": "vs", "length": 4096, "task": "vt", "score": 100.0, "n": 2, "prefill_density": 0.5,
         "prefill_seconds": 0.5},
        {"plan": "dense", "length": 4096, "task": "cwe", "score": 50.0, "n": 2, "prefill_seconds": 4.0},
        {"plan": "vs", "length": 4096, "task": "cwe", "score": 50.0, "n": 2, "prefill_density": 0.5},
    ]
    table = tables.render_table(rows)
    assert [c.header for c in table.columns] == [
        "length", "task", "n", "dense", "vs", "Δ vs", "density vs", "prefill s dense", "prefill s vs",
        "vs × vs dense"]
    lines = [line for line in _console_text(table).splitlines() if "│" in line]
    vt, cwe, average = ([c.strip() for c in line.split("│")[1:-1]] for line in lines)
    assert vt[-3:] == ["2", "0.5", "4.00"]           # dense 2 s, the plan 0.5 s: 4x as fast
    assert cwe[-3:] == ["4", "-", "-"]               # the plan untimed here
    assert average[-3:] == ["3", "-", "-"]           # no average over part of the tasks
    untimed = [{k: v for k, v in r.items() if k != "prefill_seconds"} for r in rows]
    assert [c.header for c in tables.render_table(untimed).columns] == [
        "length", "task", "n", "dense", "vs", "Δ vs", "density vs"]


def test_resume_rejects_other_prompts(tmp_path, tokenizer, tiny_llama, samples):
    runner.run_eval(tiny_llama, tokenizer, samples[:1], {"dense": None}, tmp_path, progress=False)
    other = ruler.generate_samples(tokenizer, ["niah_single_1"], [512], 1, seed=7)
    with pytest.raises(EvalError, match="different prompt"):
        runner.run_eval(tiny_llama, tokenizer, other, {"dense": None}, tmp_path, resume=True, progress=False)


@pytest.fixture
def no_generation(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("validation must happen before any generation")

    monkeypatch.setattr(runner, "generate_one", fail)


def test_length_above_max_positions(tmp_path, tokenizer, samples, no_generation):
    model = make_tiny_llama(tokenizer, max_position_embeddings=640)
    with pytest.raises(EvalError, match=r"768 exceed the model's max_position_embeddings \(640\)"):
        runner.run_eval(model, tokenizer, samples, {"dense": None}, tmp_path, progress=False)
    assert not (tmp_path / "results.json").exists()


def test_unknown_task(tmp_path, tokenizer, tiny_llama, samples, no_generation):
    bad = [dict(samples[0], task="niah_single_9", metric=None, id=None)]
    with pytest.raises(EvalError, match="unknown task 'niah_single_9'"):
        runner.run_eval(tiny_llama, tokenizer, bad, {"dense": None}, tmp_path, progress=False)


def test_plan_for_another_model(tmp_path, tokenizer, tiny_llama, samples, no_generation):
    import sparse_infer.plan as plan_mod
    from sparse_infer import presets

    other = make_tiny_llama(tokenizer)
    other.config.num_hidden_layers = 3
    foreign = presets.preset("vertical_slash", other.config).to_dict()
    with pytest.raises(plan_mod.PlanError, match="another model"):
        runner.run_eval(tiny_llama, tokenizer, samples, {"dense": None, "foreign": foreign}, tmp_path, progress=False)
    with pytest.raises(plan_mod.PlanError, match="not found"):
        runner.run_eval(tiny_llama, tokenizer, samples, {"x": "no_such_plan"}, tmp_path, progress=False)


def test_render_table_diff_and_order():
    rows = [
        {"plan": "dense", "length": 8192, "task": "vt", "score": 80.0, "n": 2},
        {"plan": "vs", "length": 8192, "task": "vt", "score": 60.0, "n": 2, "prefill_density": 0.25},
        {"plan": "dense", "length": 4096, "task": "vt", "score": 100.0, "n": 2},
        {"plan": "vs", "length": 4096, "task": "vt", "score": 100.0, "n": 2, "prefill_density": 0.5},
        {"plan": "dense", "length": 4096, "task": "niah_single_1", "score": 50.0, "n": 2},
        {"plan": "vs", "length": 4096, "task": "niah_single_1", "score": 75.0, "n": 2, "prefill_density": 0.5},
    ]
    table = tables.render_table(rows)
    assert [c.header for c in table.columns] == ["length", "task", "n", "dense", "vs", "Δ vs", "density vs"]
    text = _console_text(table)
    lines = [line for line in text.splitlines() if "│" in line]
    assert "niah_single_1" in lines[0] and "+25.0" in lines[0]
    assert "average" in lines[2] and "75.0" in lines[2] and "87.5" in lines[2] and "+12.5" in lines[2]
    assert "8192" in lines[3] and "-20.0" in lines[3] and "25%" in lines[3]


def test_changed_answers_pairs_samples_by_prompt():
    """Swaps that leave the average unchanged are listed; a sample whose prompt differs (same id,
    other input_sha1) or that only one plan finished is not compared."""
    def rec(sid, score, sha="s"):
        return {"id": sid, "score": score, "input_sha1": sha + sid}

    doc = {"plans": {
        "vs": {"records": [rec("vt/8192/0", 0.0), rec("vt/8192/1", 100.0), rec("vt/8192/2", 40.0, sha="x"),
                           rec("cwe/8192/0", 50.0)]},
        "dense": {"records": [rec("vt/8192/0", 100.0), rec("vt/8192/1", 0.0), rec("vt/8192/2", 40.0),
                              rec("cwe/8192/0", 50.0), rec("cwe/8192/1", 10.0)]},
        "same": {"records": [rec("cwe/8192/0", 50.0)]},
    }}
    base, changes = compare.changed_answers(doc)
    assert base == "dense"
    assert changes["vs"] == {"common": 3, "lower": [("vt/8192/0", 100.0, 0.0)],
                             "higher": [("vt/8192/1", 0.0, 100.0)], "other_prompt": 1}
    assert changes["same"] == {"common": 1, "lower": [], "higher": [], "other_prompt": 0}
    lines = compare.describe_changes(base, changes)
    assert lines[0].startswith("vs: 2 of 3 samples score differently from dense: 1 lower, 1 higher")
    assert "vt/8192/0 100→0" in lines[0] and "vt/8192/1 0→100" in lines[0] and "1 sample with the same id but another prompt" in lines[0]
    assert lines[1] == "same: every answer scores as dense's (1 sample in common)"
    base, changes = compare.changed_answers(doc, baseline="vs")
    assert base == "vs" and changes["dense"]["lower"] == [("vt/8192/1", 100.0, 0.0)]


def test_eval_runs_the_plan_as_written(tmp_path, tokenizer, tiny_llama, samples, sparse_plan, monkeypatch):
    # even where patch's "auto" would run every head dense on this machine, the eval measures the plan
    from sparse_infer.kernels import registry

    monkeypatch.setitem(registry.DENSE_ABOVE, "torch", {"head": 1e-6, "group": 1e-6, "decode": 1e-6})
    runner.run_eval(tiny_llama, tokenizer, samples[:1], {"sparse": sparse_plan}, tmp_path, progress=False)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["plans"]["sparse"]["records"][0]["stats"]["prefill_density"] < 1
