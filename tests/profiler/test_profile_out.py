"""`profile --out`: the destination is checked before any model is loaded, an existing plan is
never replaced without --force, and the file appears whole or not at all."""
import pytest
from typer.testing import CliRunner

from sparse_infer.plan import load_plan
from sparse_infer.profiler.cli import app
from tests.conftest import tiny_model
from tests.profiler.helpers import char_tokenizer

FAST = ["--seq-len", "1024", "--samples", "1", "--target-recall", "0.6", "--no-progress"]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the profiler gets as far as loading a model."""
    import sparse_infer.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")
    monkeypatch.setattr(sparse_infer.models, "load_model", refuse)


def _one_line_error(res) -> str:
    assert res.exit_code == 1, res.output + repr(res.exception)
    lines = res.output.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_existing_out_is_refused_before_profiling(tmp_path, no_model_load):
    out = tmp_path / "plan.yaml"
    out.write_text("a plan from an eight-hour run\n")
    line = _one_line_error(CliRunner().invoke(app, ["profile", "some-model", "--out", str(out), *FAST]))
    assert "exists; not overwritten (pass --force to replace it)" in line
    assert out.read_text() == "a plan from an eight-hour run\n"


@pytest.mark.parametrize("where, words", [
    ("missing/plan.yaml", "does not exist; create it first"),
    (".", "is a directory"),
    ("afile/plan.yaml", "afile is not a directory"),
])
def test_unwritable_out_is_refused_before_profiling(tmp_path, no_model_load, where, words):
    (tmp_path / "afile").write_text("")
    line = _one_line_error(CliRunner().invoke(app, ["profile", "some-model", "--out", str(tmp_path / where), *FAST]))
    assert words in line
    assert not (tmp_path / "missing").exists()


def test_a_block_size_the_plan_would_refuse_is_refused_before_profiling(tmp_path, no_model_load):
    res = CliRunner().invoke(app, ["profile", "some-model", "--out", str(tmp_path / "p.yaml"), *FAST,
                                   "--block-size", "2048"])
    assert res.exit_code != 0 and "power of two from 16 to 1024" in res.output


def test_force_replaces_atomically_and_a_failed_run_writes_nothing(tmp_path, monkeypatch):
    d = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    out = tmp_path / "plan.yaml"
    out.write_text("old\n")
    res = CliRunner().invoke(app, ["profile", str(d), "--out", str(out), "--force", *FAST])
    assert res.exit_code == 0, res.output + repr(res.exception)
    plan = load_plan(out, tiny_model("llama").config)
    assert out.read_text().endswith("\ncomplete: true\n") and plan.profile["samples"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.yaml", "tiny"]     # no temp file left

    # a plan text that does not read back whole (here: cut before its last line) is not written at all
    import importlib

    profile_module = importlib.import_module("sparse_infer.profiler.profile")   # the package re-exports profile()

    whole = profile_module.plan_yaml
    monkeypatch.setattr(profile_module, "plan_yaml", lambda plan: whole(plan).rsplit("complete:", 1)[0])
    fresh = tmp_path / "fresh.yaml"
    res = CliRunner().invoke(app, ["profile", str(d), "--out", str(fresh), *FAST])
    assert res.exit_code == 1 and "complete: missing" in res.output, res.output + repr(res.exception)
    assert not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.yaml", "tiny"]
