"""Results are never lost or mixed: stored results are not replaced, --resume checks the weights,
the plans' content and the dtype, plan names are unique, one run writes a results directory at a
time, and outputs that cannot be written are refused before the model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml
from typer.testing import CliRunner

from sparse_infer.eval import cli, results, ruler, runner
from sparse_infer.eval.cli import eval_app
from sparse_infer.eval.errors import EvalError
from sparse_infer.eval.outputs import LOCK_FILE

from .conftest import make_tiny_llama

cli_runner = CliRunner()


def ruler_args(plan, out, *extra):
    return ["ruler", "tiny", "--plan", plan, "--lengths", "512", "--tasks", "vt", "--samples", "1",
            "--out", str(out), *extra]


def text(res) -> str:
    return " ".join(res.output.split())


# --------------------------------------------------------------------------- stored results


def test_existing_results_are_refused_without_resume(tmp_path, fake_load, fast_generation):
    out = tmp_path / "run"
    res = cli_runner.invoke(eval_app, ruler_args("dense", out))
    assert res.exit_code == 0, res.output
    before = (out / "results.json").read_text()
    res = cli_runner.invoke(eval_app, ruler_args("vertical_slash", out))
    assert res.exit_code == 2
    assert "already holds results; add --resume to continue them" in text(res)
    assert "or choose another --out" in text(res)
    assert (out / "results.json").read_text() == before
    assert fake_load == ["tiny"] and len(fast_generation) == 1           # refused before loading


def test_needle_existing_results_are_refused_without_resume(tmp_path, fake_load, fast_generation):
    args = ["needle", "tiny", "--plan", "dense", "--lengths", "512", "--depths", "50", "--out", str(tmp_path)]
    assert cli_runner.invoke(eval_app, args).exit_code == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    res = cli_runner.invoke(eval_app, [*args, "--depths", "0,50"])
    assert res.exit_code == 2 and "--resume" in text(res)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    res = cli_runner.invoke(eval_app, [*args, "--depths", "0,50", "--resume"])
    assert res.exit_code == 0, res.output
    assert len(fast_generation) == 2


def test_resume_refuses_other_weights(tmp_path, fake_load, fast_generation):
    """Same model name, same shape, other weights: the fingerprint tells them apart."""
    res = cli_runner.invoke(eval_app, ruler_args("dense", tmp_path))
    assert res.exit_code == 0, res.output
    before = (tmp_path / "results.json").read_text()
    fake_load.seed = 1
    res = cli_runner.invoke(eval_app, ruler_args("dense", tmp_path, "--samples", "2", "--resume"))
    assert res.exit_code == 2 and "was run with other weights" in text(res)
    assert (tmp_path / "results.json").read_text() == before and len(fast_generation) == 1
    fake_load.seed = 0
    res = cli_runner.invoke(eval_app, ruler_args("dense", tmp_path, "--samples", "2", "--resume"))
    assert res.exit_code == 0, res.output
    assert len(fast_generation) == 2


def _plan_file(path, model, **prefill):
    from sparse_infer.presets import preset

    plan = preset("vertical_slash", model.config, min_seq_len=128).to_document()
    plan["prefill"]["default"].update(prefill)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def test_resume_checks_the_plan_content_not_its_path(tmp_path, fake_load, fast_generation, tokenizer):
    model = make_tiny_llama(tokenizer)
    plan = _plan_file(tmp_path / "plans" / "mine.yaml", model, sink=16)
    out = tmp_path / "run"
    res = cli_runner.invoke(eval_app, ruler_args(str(plan), out))
    assert res.exit_code == 0, res.output
    stored = results.load_results(out)["plans"]["mine"]
    assert len(stored["plan_sha256"]) == 64
    # the same content from another path (a moved or copied file) continues the run
    moved = tmp_path / "elsewhere" / "mine.yaml"
    moved.parent.mkdir()
    moved.write_text(plan.read_text())
    res = cli_runner.invoke(eval_app, ruler_args(str(moved), out, "--samples", "2", "--resume"))
    assert res.exit_code == 0, res.output
    assert len(fast_generation) == 2
    # the same path edited in place is another plan
    _plan_file(plan, model, sink=32)
    before = (out / "results.json").read_text()
    res = cli_runner.invoke(eval_app, ruler_args(str(plan), out, "--samples", "3", "--resume"))
    assert res.exit_code == 2 and "holds another plan under the name 'mine'" in text(res)
    assert (out / "results.json").read_text() == before and len(fast_generation) == 2


def test_resume_into_results_without_fingerprints_is_refused_and_merge_still_works(
        tmp_path, fake_load, fast_generation):
    """Directories written before the fingerprints existed cannot be checked: --resume into them
    is refused (before the model loads) with the way on, and `eval merge` still takes them."""
    old, new = tmp_path / "old", tmp_path / "new"
    res = cli_runner.invoke(eval_app, ruler_args("vertical_slash", old, "--compare", "dense"))
    assert res.exit_code == 0, res.output
    legacy = json.loads((old / "results.json").read_text())
    del legacy["model"]["weights_sha256"]
    for entry in legacy["plans"].values():
        del entry["plan_sha256"]
    (old / "results.json").write_text(json.dumps(legacy))
    loads = len(fake_load)
    res = cli_runner.invoke(eval_app, ruler_args("vertical_slash", old, "--compare", "dense", "--samples", "2",
                                            "--resume"))
    assert res.exit_code == 2
    assert "does not record the fingerprint of the model's weights, plan 'dense', plan 'vertical_slash'" in text(res)
    assert "run into another --out and combine the two with `sparse-infer eval merge`" in text(res)
    assert len(fake_load) == loads
    res = cli_runner.invoke(eval_app, ruler_args("vertical_slash", new, "--compare", "dense", "--tasks", "niah_single_1"))
    assert res.exit_code == 0, res.output
    merged = tmp_path / "merged"
    res = cli_runner.invoke(eval_app, ["merge", str(old), str(new), "--out", str(merged)])
    assert res.exit_code == 0, res.output
    doc = results.load_results(merged)
    assert {r["task"] for r in doc["plans"]["vertical_slash"]["records"]} == {"vt", "niah_single_1"}
    # part of the records is unchecked, so the merged file claims no fingerprint
    assert "weights_sha256" not in doc["model"]
    assert all("plan_sha256" not in entry for entry in doc["plans"].values())


def test_merge_checks_weights_and_plan_fingerprints(tmp_path, fake_load, fast_generation):
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli_runner.invoke(eval_app, ruler_args("dense", a)).exit_code == 0
    fake_load.seed = 1
    assert cli_runner.invoke(eval_app, ruler_args("dense", b, "--tasks", "niah_single_1")).exit_code == 0
    res = cli_runner.invoke(eval_app, ["merge", str(a), str(b), "--out", str(tmp_path / "m")])
    assert res.exit_code == 2 and "were run with different weights" in text(res)
    assert not (tmp_path / "m").exists()
    # fingerprints all present and equal: they are kept in the merged file
    fake_load.seed = 0
    c = tmp_path / "c"
    assert cli_runner.invoke(eval_app, ruler_args("dense", c, "--tasks", "niah_single_1")).exit_code == 0
    res = cli_runner.invoke(eval_app, ["merge", str(a), str(c), "--out", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    merged = results.load_results(tmp_path / "m")
    assert merged["model"]["weights_sha256"] == results.load_results(a)["model"]["weights_sha256"]
    assert merged["plans"]["dense"]["plan_sha256"] == results.plan_fingerprint(None)


# --------------------------------------------------------------------------- plan names


def test_plans_that_would_share_a_name_are_refused(tmp_path, fake_load, fast_generation, tokenizer):
    dense_file = _plan_file(tmp_path / "other" / "dense.yaml", make_tiny_llama(tokenizer))
    res = cli_runner.invoke(eval_app, ruler_args(str(dense_file), tmp_path / "o", "--compare", "dense"))
    assert res.exit_code == 2
    assert "would both be stored under the name 'dense'" in text(res)
    assert fake_load == [] and not (tmp_path / "o").exists()
    other = tmp_path / "b" / "vs.yaml"
    other.parent.mkdir()
    other.write_text(dense_file.read_text())
    mine = tmp_path / "a" / "vs.yaml"
    mine.parent.mkdir()
    mine.write_text(dense_file.read_text())
    with pytest.raises(EvalError, match="under the name 'vs'"):
        cli.build_plans(str(mine), str(other))
    # the same plan asked for twice is one plan, run once
    assert cli.build_plans("dense", "dense") == {"dense": None}
    assert cli.build_plans(str(mine), str(mine)) == {"vs": str(mine)}


# --------------------------------------------------------------------------- one writer


def _hold_lock(directory):
    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_a_second_eval_on_a_locked_out_is_refused(tmp_path, fake_load, fast_generation):
    out = tmp_path / "run"
    assert cli_runner.invoke(eval_app, ruler_args("dense", out)).exit_code == 0
    before = (out / "results.json").read_text()
    fd = _hold_lock(out)                                   # another run holds the directory
    try:
        res = cli_runner.invoke(eval_app, ruler_args("dense", out, "--samples", "2", "--resume"))
        assert res.exit_code == 2 and f"another run is writing to {out}" in text(res)
        assert "choose another --out" in text(res)
        res = cli_runner.invoke(eval_app, ["merge", str(out), "--out", str(out)])
        assert res.exit_code == 2 and "another run is writing" in text(res)
    finally:
        os.close(fd)
    assert (out / "results.json").read_text() == before and fake_load == ["tiny"]
    res = cli_runner.invoke(eval_app, ruler_args("dense", out, "--samples", "2", "--resume"))
    assert res.exit_code == 0, res.output                  # released: the run continues


def test_lock_is_held_for_the_whole_run_against_another_process(tmp_path, tokenizer, tiny_llama, monkeypatch):
    """While run_eval generates, a second process cannot take the directory."""
    seen = []

    def generate_one(model, tok, prompt, max_new_tokens):
        probe = textwrap.dedent(f"""
            import fcntl, os, sys
            fd = os.open({str(tmp_path / LOCK_FILE)!r}, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                sys.exit(3)
        """)
        seen.append(subprocess.run([sys.executable, "-c", probe]).returncode)
        return "x", 1

    monkeypatch.setattr(runner, "generate_one", generate_one)
    samples = ruler.generate_samples(tokenizer, ["vt"], [512], 2, seed=0)
    runner.run_eval(tiny_llama, tokenizer, samples, {"dense": None}, tmp_path, progress=False)
    assert seen == [3, 3]
    assert not (tmp_path / LOCK_FILE).exists()             # let go and removed: nothing stray in runs/


def test_temporary_files_have_names_of_their_own(tmp_path, tokenizer, tiny_llama, fast_generation):
    """A leftover or another writer's `results.json.tmp` is neither used nor clobbered, and no
    temporary file is left behind."""
    (tmp_path / "results.json.tmp").mkdir()
    samples = ruler.generate_samples(tokenizer, ["vt"], [512], 1, seed=0)
    runner.run_eval(tiny_llama, tokenizer, samples, {"dense": None}, tmp_path, progress=False)
    assert len(results.load_results(tmp_path)["plans"]["dense"]["records"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.json.tmp"]


# --------------------------------------------------------------------------- unwritable outputs


def test_unwritable_out_fails_before_the_model_loads(tmp_path, fake_load, fast_generation):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    for args in (ruler_args("dense", blocker / "out"),
                 ["needle", "tiny", "--plan", "dense", "--lengths", "512", "--out", str(blocker / "out")]):
        res = cli_runner.invoke(eval_app, args)
        assert res.exit_code == 2 and f"cannot write --out {blocker / 'out'}" in text(res)
    res = cli_runner.invoke(eval_app, ruler_args("dense", blocker))                 # --out is a file
    assert res.exit_code == 2 and f"cannot write --out {blocker}" in text(res)
    res = cli_runner.invoke(eval_app, ["merge", str(tmp_path), "--out", str(blocker / "m")])
    assert res.exit_code == 2 and "cannot write --out" in text(res)
    assert fake_load == [] and blocker.read_text() == "not a directory"


# --------------------------------------------------------------------------- fingerprints


def test_weights_fingerprint_sees_every_weight(tokenizer):
    import torch

    a, b = make_tiny_llama(tokenizer), make_tiny_llama(tokenizer)
    assert results.weights_fingerprint(a) == results.weights_fingerprint(b)
    with torch.no_grad():
        b.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3                   # one weight of one layer
    assert results.weights_fingerprint(a) != results.weights_fingerprint(b)
    assert results.weights_fingerprint(a) != results.weights_fingerprint(a.to(torch.bfloat16))


def test_plan_fingerprint_is_the_content(tiny_llama):
    from sparse_infer.plan import load_plan
    from sparse_infer.presets import preset

    one = preset("vertical_slash", tiny_llama.config)
    two = preset("vertical_slash", tiny_llama.config)
    two.profile["created"] = "1999-01-01"              # how it was made is not what it does
    assert results.plan_fingerprint(one) == results.plan_fingerprint(two)
    assert results.plan_fingerprint(load_plan(one.to_dict())) == results.plan_fingerprint(one)
    three = preset("vertical_slash", tiny_llama.config, min_seq_len=1024)
    assert results.plan_fingerprint(three) != results.plan_fingerprint(one)
    assert results.plan_fingerprint(None) != results.plan_fingerprint(preset("dense", tiny_llama.config))


def test_a_refused_run_leaves_no_directory_behind(tmp_path, fake_load, fast_generation):
    """--out is made before the model loads; when the run is then refused (a length the model
    cannot take), the empty directory it made is removed again."""
    out = tmp_path / "new" / "run"
    res = cli_runner.invoke(eval_app, ruler_args("dense", out, "--lengths", "8192"))
    assert res.exit_code == 2 and "max_position_embeddings" in text(res)
    assert fake_load == ["tiny"] and not out.exists()
