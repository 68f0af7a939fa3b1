"""`sparse-infer eval ruler|needle` through typer's CliRunner, with load_model faked to a tiny model."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sparse_infer.eval import cli, results, runner
from sparse_infer.eval.cli import eval_app, parse_list
from sparse_infer.eval.errors import EvalError

cli_runner = CliRunner()


def test_parse_list():
    assert parse_list("4096,8192") == [4096, 8192]
    assert parse_list("4k, 8K") == [4096, 8192]
    assert parse_list("0,10,...,100", float) == [float(x) for x in range(0, 101, 10)]
    assert parse_list("0,25,…,100") == [0, 25, 50, 75, 100]
    for bad in ("", "a,b", "10,...,20", "0,10,..."):
        with pytest.raises(EvalError):
            parse_list(bad)


def test_build_plans():
    assert cli.build_plans("vertical_slash", "dense") == {"dense": None, "vertical_slash": "vertical_slash"}
    assert list(cli.build_plans("plans/my.yaml", None)) == ["my"]
    assert cli.build_plans("dense", "none") == {"dense": None}


def ruler_args(plan, out, *extra):
    """`eval ruler` on the fake tiny model at 512 tokens; later options override earlier ones."""
    return ["ruler", "tiny", "--plan", plan, "--lengths", "512", "--out", str(out), *extra]


def test_ruler_command(tmp_path, fake_load, fast_generation):
    out = tmp_path / "run"
    args = [
        "ruler",
        "tiny",
        "--plan",
        "vertical_slash",
        "--compare",
        "dense",
        "--lengths",
        "512",
        "--tasks",
        "niah_single_1,niah_single_2",
        "--samples",
        "2",
        "--out",
        str(out),
        "--seed",
        "1",
    ]
    res = cli_runner.invoke(eval_app, args)
    assert res.exit_code == 0, res.output
    assert fake_load == ["tiny"]
    assert len(fast_generation) == 2 * 2 * 2  # plans x tasks x samples
    doc = json.loads((out / "results.json").read_text())
    assert list(doc["plans"]) == ["dense", "vertical_slash"]
    assert "Δ vertical_slash" in res.output and "results.json" in res.output
    # --resume with everything done generates nothing more.
    res = cli_runner.invoke(eval_app, [*args, "--resume"])
    assert res.exit_code == 0, res.output
    assert len(fast_generation) == 8


def test_ruler_with_data_file(tmp_path, fake_load, fast_generation):
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps({"input": f"Question {i}?", "answers": ["x"]}) for i in range(3)))
    out = tmp_path / "qa"
    res = cli_runner.invoke(eval_app, ruler_args("dense", out, "--data", str(data), "--samples", "2"))
    assert res.exit_code == 0, res.output
    recs = json.loads((out / "results.json").read_text())["plans"]["dense"]["records"]
    assert [r["task"] for r in recs] == ["qa", "qa"]  # no synthetic tasks unless --tasks is given


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tasks", "niah_single_9"], "unknown task"),
        (["--lengths", "8192"], "max_position_embeddings"),
        (["--plan", "no_such_plan"], "plan file not found"),
        (["--data", "missing.jsonl"], "data file not found"),
    ],
)
def test_ruler_errors(tmp_path, fake_load, fast_generation, extra, message):
    res = cli_runner.invoke(eval_app, ruler_args("vertical_slash", tmp_path, "--tasks", "vt", *extra))
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert not fast_generation


def test_ruler_interrupt_message(tmp_path, fake_load, monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "generate_one", interrupt)
    res = cli_runner.invoke(eval_app, ruler_args("dense", tmp_path, "--tasks", "vt", "--samples", "1"))
    assert res.exit_code == 130
    assert "--resume" in res.output


def test_needle_default_plan_is_the_shipped_one():
    from sparse_infer.plan import CONFIGS_DIR

    assert cli.default_plan_for("smollm2-135m") == str(CONFIGS_DIR / "smollm2-135m.yaml")
    with pytest.raises(EvalError, match="no plan ships for model 'no-such-model'.*give --plan"):
        cli.default_plan_for("no-such-model")


def test_needle_defaults(tmp_path, fake_load, fast_generation, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the fake loader returns a tiny model, which the shipped 30-layer SmolLM2 plan rightly
    # rejects: stand a preset in for the shipped plan (it is stored under the model's name)
    monkeypatch.setattr(cli, "default_plan_for", lambda model: "vertical_slash")
    fake_load.max_positions = 8192          # the default grid reaches SmolLM2's context
    res = cli_runner.invoke(eval_app, ["needle", "--out", "nd"])
    assert res.exit_code == 0, res.output
    assert fake_load == [cli.DEFAULT_NEEDLE_MODEL]
    saved = json.loads((tmp_path / "nd" / "needle.json").read_text())
    assert saved["lengths"] == [2048, 4096, 8000] and saved["depths"] == [0.0, 50.0, 100.0]
    assert list(saved["plans"]) == ["dense", cli.DEFAULT_NEEDLE_MODEL]
    assert len(fast_generation) == 2 * 3 * 3
    assert (tmp_path / "nd" / "needle.png").is_file()
    assert "needle.png" in res.output.replace("\n", "")
    # the canned answer is the same under both plans: no cell changes, so every length is within
    out = " ".join(res.output.split())
    for length in (2048, 4096, 8000):
        assert f"at {length}: Δ +0.0 points (95% interval +0.0 … +0.0; 3 samples, 0 lower, 0 higher" in out


def test_needle_without_a_shipped_plan_fails_before_loading(tmp_path, fake_load, fast_generation):
    """No plan named and none ships for the model: an error naming the choices, not a preset
    run in its place (and stored under the model's name)."""
    res = cli_runner.invoke(eval_app, ["needle", str(tmp_path), "--out", str(tmp_path / "nd")])
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert "no plan ships for model" in text and "give --plan" in text and "vertical_slash" in text
    assert "smollm2-135m" in text                                  # the shipped plans are listed
    assert fake_load == [] and not fast_generation and not (tmp_path / "nd").exists()


@pytest.mark.parametrize("command", ["ruler", "needle"])
def test_a_named_plan_that_is_not_found_fails_before_loading(tmp_path, fake_load, fast_generation, command):
    args = ruler_args("missing/plan.yaml", tmp_path / "o", "--tasks", "vt") if command == "ruler" else [
        "needle", "tiny", "--plan", "missing/plan.yaml", "--lengths", "512", "--out", str(tmp_path / "o")]
    res = cli_runner.invoke(eval_app, args)
    assert res.exit_code == 2 and "plan file not found: 'missing/plan.yaml'" in " ".join(res.output.split())
    assert fake_load == [] and not (tmp_path / "o").exists()
    res = cli_runner.invoke(eval_app, [*args, "--compare", "missing/base.yaml"])
    assert res.exit_code == 2 and "missing/base.yaml" in " ".join(res.output.split())
    assert fake_load == []


def test_needle_explicit_grid(tmp_path, fake_load, fast_generation):
    res = cli_runner.invoke(
        eval_app,
        [
            "needle",
            "tiny",
            "--plan",
            "a_shape",
            "--compare",
            "none",
            "--lengths",
            "512",
            "--depths",
            "0,25,...,100",
            "--out",
            str(tmp_path),
        ],
    )
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "needle.json").read_text())
    assert list(saved["plans"]) == ["a_shape"]
    assert len(saved["plans"]["a_shape"]["scores"]) == 5


def test_needle_prints_prefill_times(tmp_path, fake_load):
    """Generated for real: the table, the per-plan lines and needle.json carry prefill seconds,
    and each length compares the plan's prefill with dense's."""
    res = cli_runner.invoke(eval_app, ["needle", "tiny", "--plan", "vertical_slash", "--lengths", "256,512",
                                       "--depths", "0,100", "--out", str(tmp_path)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "needle.json").read_text())
    out = " ".join(res.output.split())
    assert "prefill s dense" in out and "prefill s vertical_slash" in out and "vertical_slash × vs dense" in out
    for name, entry in saved["plans"].items():
        mean = entry["prefill_seconds_mean"]
        assert mean > 0 and f"{name}: mean score {entry['mean']:.1f}, mean prefill " in out
    for length in (256, 512):
        assert f"prefill at {length} tokens: dense " in out
    assert out.count(" vs dense)") == 2


def test_no_shipped_plan_is_an_error_not_a_preset(monkeypatch, tmp_path):
    import sparse_infer.plan as plan_mod

    monkeypatch.setattr(plan_mod, "CONFIGS_DIR", tmp_path)          # a package that ships no plan
    with pytest.raises(EvalError, match="no plan ships for model 'smollm2-135m' \\(plans ship for: none\\)"):
        cli.default_plan_for("smollm2-135m")
    # a model given by path is never taken for a shipped plan's name
    monkeypatch.undo()
    with pytest.raises(EvalError, match="no plan ships"):
        cli.default_plan_for("somewhere/smollm2-135m")


def test_merge_split_runs_equals_one_run(tmp_path, fake_load, fast_generation):
    """Dense and a plan run apart, the plan itself split by --tasks: merged, the records and the
    table are those of one run that does it all."""
    def records(doc):
        return {name: sorted((r["id"], r["input_sha1"], r["prediction"], r["score"]) for r in e["records"])
                for name, e in doc["plans"].items()}

    base = ["--tasks", "niah_single_1,vt", "--samples", "2"]
    whole = tmp_path / "whole"
    res = cli_runner.invoke(eval_app, ruler_args("vertical_slash", whole, "--compare", "dense", *base))
    assert res.exit_code == 0, res.output
    # both plans get the same canned answer, so ruler --compare reports every sample equal
    assert "vertical_slash: every answer scores as dense's (4 samples in common)" in " ".join(res.output.split())
    parts = [("dense", "niah_single_1,vt"), ("vertical_slash", "niah_single_1"), ("vertical_slash", "vt")]
    for i, (plan, tasks) in enumerate(parts):
        res = cli_runner.invoke(eval_app, ruler_args(plan, tmp_path / f"part{i}", *base, "--tasks", tasks))
        assert res.exit_code == 0, res.output
    merged = tmp_path / "merged"
    res = cli_runner.invoke(eval_app, ["merge", *(str(tmp_path / f"part{i}") for i in range(3)), "--out", str(merged),
                                       "--tolerance", "0"])
    assert res.exit_code == 0, res.output
    assert "vertical_slash" in res.output and "niah_single_1" in res.output
    # no answer differs, so the interval is a point and even a zero tolerance is met
    assert ("(95% interval +0.0 … +0.0; 4 samples, 0 lower, 0 higher, sign test p=1): within 0 of dense"
            in " ".join(res.output.split()))
    got, want = results.load_results(merged), results.load_results(whole)
    assert records(got) == records(want)
    strip = [{k: v for k, v in row.items() if "density" not in k} for row in got["summary"]]
    assert sorted(map(repr, strip)) == sorted(repr({k: v for k, v in row.items() if "density" not in k})
                                              for row in want["summary"])


def test_merge_refuses_conflicts(tmp_path, fake_load, fast_generation):
    a, b = tmp_path / "a", tmp_path / "b"
    for out, seed in ((a, "0"), (b, "1")):
        res = cli_runner.invoke(eval_app, ruler_args("dense", out, "--tasks", "vt", "--samples", "1", "--seed", seed))
        assert res.exit_code == 0, res.output
    res = cli_runner.invoke(eval_app, ["merge", str(a), str(b), "--out", str(tmp_path / "m")])
    assert res.exit_code == 2 and "different prompt" in res.output
    assert not (tmp_path / "m" / "results.json").exists()
    before = (b / "results.json").read_text()
    res = cli_runner.invoke(eval_app, ["merge", str(a), "--out", str(b)])          # b is not a source
    assert res.exit_code == 2 and "not one of the sources" in res.output
    assert (b / "results.json").read_text() == before
    doc = json.loads(before)
    doc["plans"]["dense"]["plan"] = "something else"
    doc["plans"]["dense"]["plan_sha256"] = "0" * 64                # other content under the same name
    (b / "results.json").write_text(json.dumps(doc))
    res = cli_runner.invoke(eval_app, ["merge", str(a), str(b), "--out", str(tmp_path / "m")])
    assert res.exit_code == 2 and "plan 'dense'" in res.output
    res = cli_runner.invoke(eval_app, ["merge", str(tmp_path / "missing"), "--out", str(tmp_path / "m")])
    assert res.exit_code == 2 and "no results.json" in res.output


def test_merge_takes_only_the_named_plans_of_a_source(tmp_path, fake_load, fast_generation):
    """DIR:NAME keeps only that plan of DIR: the dense records of an old run beside a new run of
    a plan whose name the old run used for another plan."""
    old, new = tmp_path / "old", tmp_path / "new"
    res = cli_runner.invoke(eval_app, ruler_args("vertical_slash", old, "--compare", "dense", "--tasks", "vt",
                                                 "--samples", "1"))
    assert res.exit_code == 0, res.output
    res = cli_runner.invoke(eval_app, ruler_args("vertical_slash", new, "--tasks", "vt", "--samples", "1"))
    assert res.exit_code == 0, res.output
    doc = json.loads((new / "results.json").read_text())
    doc["plans"]["vertical_slash"]["plan"] = "a re-profiled plan"
    doc["plans"]["vertical_slash"]["plan_sha256"] = "0" * 64
    (new / "results.json").write_text(json.dumps(doc))
    merged = tmp_path / "m"
    res = cli_runner.invoke(eval_app, ["merge", str(old), str(new), "--out", str(merged)])
    assert res.exit_code == 2 and "plan 'vertical_slash'" in res.output      # the clash, without a filter
    res = cli_runner.invoke(eval_app, ["merge", f"{old}:dense", str(new), "--out", str(merged)])
    assert res.exit_code == 0, res.output
    got = results.load_results(merged)
    assert set(got["plans"]) == {"dense", "vertical_slash"}
    assert got["plans"]["vertical_slash"]["plan"] == "a re-profiled plan"
    assert got["plans"]["dense"]["records"] == results.load_results(old)["plans"]["dense"]["records"]
    res = cli_runner.invoke(eval_app, ["merge", f"{old}:dense,a_shape", "--out", str(tmp_path / "m2")])
    assert res.exit_code == 2 and "plan 'a_shape'" in " ".join(res.output.split())


def test_merge_common_keeps_the_samples_every_plan_finished(tmp_path, fake_load, fast_generation):
    """Runs still under way: dense has finished more samples than the plan. --common compares
    them on the prompts both have; without it each plan keeps all of its own."""
    dense, plan = tmp_path / "dense", tmp_path / "plan"
    res = cli_runner.invoke(eval_app, ruler_args("dense", dense, "--tasks", "niah_single_1,vt", "--samples", "2"))
    assert res.exit_code == 0, res.output
    res = cli_runner.invoke(eval_app, ruler_args("vertical_slash", plan, "--tasks", "niah_single_1", "--samples", "1"))
    assert res.exit_code == 0, res.output
    res = cli_runner.invoke(eval_app, ["merge", str(dense), str(plan), "--out", str(tmp_path / "all")])
    assert res.exit_code == 0, res.output
    assert len(results.load_results(tmp_path / "all")["plans"]["dense"]["records"]) == 4
    res = cli_runner.invoke(eval_app, ["merge", str(dense), str(plan), "--common", "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    got = results.load_results(tmp_path / "c")
    ids = {name: [r["id"] for r in entry["records"]] for name, entry in got["plans"].items()}
    assert ids["dense"] == ids["vertical_slash"] == [r["id"] for r in results.load_results(plan)["plans"]["vertical_slash"]["records"]]
    assert "vertical_slash: every answer scores as dense's (1 sample in common)" in " ".join(res.output.split())
    assert {(row["plan"], row["task"], row["n"]) for row in got["summary"]} == {
        ("dense", "niah_single_1", 1), ("vertical_slash", "niah_single_1", 1)}
    other = tmp_path / "other"
    res = cli_runner.invoke(eval_app, ruler_args("a_shape", other, "--tasks", "vt", "--samples", "1"))
    assert res.exit_code == 0, res.output
    res = cli_runner.invoke(eval_app, ["merge", str(plan), str(other), "--common", "--out", str(tmp_path / "none")])
    assert res.exit_code == 2 and "no sample is finished under every plan" in " ".join(res.output.split())
    assert not (tmp_path / "none" / "results.json").exists()


def test_dtype_is_recorded_and_guards_resume_and_merge(tmp_path, fake_load, fast_generation):
    """--dtype loads the model in that dtype and results.json says so; resuming or merging
    across dtypes is refused (files from before the field count as float32)."""
    bf16, fp32 = tmp_path / "bf16", tmp_path / "fp32"
    res = cli_runner.invoke(eval_app, ruler_args("dense", bf16, "--tasks", "vt", "--samples", "1", "--dtype", "bfloat16"))
    assert res.exit_code == 0, res.output
    assert results.load_results(bf16)["model"]["dtype"] == "bfloat16"
    before = (bf16 / "results.json").read_text()
    res = cli_runner.invoke(eval_app, ruler_args("dense", bf16, "--tasks", "vt", "--samples", "2", "--resume"))
    assert res.exit_code == 2 and "was run in bfloat16, now float32" in " ".join(res.output.split())
    assert (bf16 / "results.json").read_text() == before
    res = cli_runner.invoke(eval_app, ruler_args("dense", fp32, "--tasks", "vt", "--samples", "1"))
    assert res.exit_code == 0, res.output
    res = cli_runner.invoke(eval_app, ["merge", str(fp32), str(bf16), "--out", str(tmp_path / "m")])
    assert res.exit_code == 2 and "do not go in one table" in " ".join(res.output.split())
    legacy = json.loads((fp32 / "results.json").read_text())
    del legacy["model"]["dtype"]                                  # written before the field existed
    (fp32 / "results.json").write_text(json.dumps(legacy))
    res = cli_runner.invoke(eval_app, ruler_args("dense", fp32, "--tasks", "vt", "--samples", "2", "--resume"))
    assert res.exit_code == 0, res.output
    loads = len(fake_load)
    res = cli_runner.invoke(eval_app, ruler_args("dense", tmp_path / "x", "--dtype", "float64"))
    assert res.exit_code == 2 and "--dtype must be one of" in " ".join(res.output.split())
    assert len(fake_load) == loads                                # refused before loading the model
