"""Plan files: everything that would fail or mislead later is refused on load and by `plan check`,
with a one-line message naming the YAML path or the file; shipped plans are whole and findable."""
import copy

import pytest
import yaml
from typer.testing import CliRunner

from sparse_infer.cli import app
from sparse_infer.plan import (PlanError, load_plan, plan_from_dict, shipped_plan_names, shipped_plan_path,
                               write_plan_text)
from tests.test_plan import GOOD


def _check(target) -> tuple[int, list[str]]:
    res = CliRunner().invoke(app, ["plan", "check", str(target)])
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    return res.exit_code, res.output.strip().splitlines()


def _refused(target, *words):
    """Refused by load_plan with a PlanError and by `plan check` with exit 1 and one line."""
    with pytest.raises(PlanError) as err:
        load_plan(target)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    code, lines = _check(target)
    assert code == 1 and len(lines) == 1, lines
    assert lines[0] == f"invalid plan: {message}"
    return message


def _hand_written(tmp_path, text: str, name="plan.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


HAND = """sparse_infer_plan: 1
prefill:
  min_seq_len: 4096
  default: {pattern: a_shape, sink: 64, local: 512}
decode:
  min_kv_len: 4096
  default: {method: dense}
"""


def test_hand_written_plan_without_profile_needs_no_marker(tmp_path):
    plan = load_plan(_hand_written(tmp_path, HAND))
    assert plan.prefill.default.kind == "a_shape"
    assert _check(tmp_path / "plan.yaml") == (0, [f"ok {tmp_path / 'plan.yaml'}"])


@pytest.mark.parametrize("text, words", [
    # PyYAML keeps the last of two equal keys without a word
    (HAND.replace("  default: {method: dense}", "  default: {method: dense}\n  default: {method: streaming}"),
     ["decode.default: duplicate key (lines 7 and 8)"]),
    (HAND.replace("local: 512}", "local: 512, local: 4}"), ["prefill.default.local: duplicate key"]),
    (HAND + "prefill: {default: {pattern: dense}}\n", ["prefill: duplicate key"]),
    # a section cut off (or left out) would silently run dense
    (HAND.split("decode:")[0], ["decode: missing in", "cut short"]),
    (HAND.split("decode:")[0] + "decode:\n", ["decode: missing in"]),
    ("sparse_infer_plan: true\n" + HAND.split("\n", 1)[1], ["sparse_infer_plan: must be 1", "True"]),
    (HAND.replace("min_seq_len: 4096", "block_size: 65536"), ["prefill.block_size", "1024"]),
    (HAND.replace("{pattern: a_shape, sink: 64, local: 512}", "{pattern: block, top_k: 1e21}"),
     ["prefill.default.top_k", "positive integer (at most 16777216)"]),
    (HAND.replace("{pattern: a_shape, sink: 64, local: 512}",
                  "{pattern: block, coverage: 0.9, estimator: antidiagonal, stride: 48}"),
     ["prefill.default.stride: the antidiagonal stride 48 must divide prefill.block_size 64"]),
    (HAND.replace("{method: dense}", "{method: double_sparsity, budget: 8, channels: [x]}"),
     ["decode.default.channels", "['x']"]),     # brackets in a message are printed, not taken as markup
    (HAND + "complete: true\nprofile: {}\n", ["complete: must be the last key"]),
    ("[" * 10000 + "]" * 10000, ["nesting deeper than 64 levels"]),
    ("prefill: [unclosed\n", ["is not valid YAML", "line 2"]),
    ("- 1\n- 2\n", ["a plan must be a YAML mapping"]),
], ids=["duplicate-section-key", "duplicate-in-flow-mapping", "duplicate-top-level", "no-decode", "empty-decode",
        "version-true", "block-size-65536", "top-k-1e21", "stride", "channels-markup", "marker-not-last",
        "deep-nesting", "bad-yaml", "not-a-mapping"])
def test_bad_files_are_refused_in_one_line(tmp_path, text, words):
    _refused(_hand_written(tmp_path, text), *words)


def test_directory_and_non_utf8_file_are_refused_in_one_line(tmp_path):
    _refused(tmp_path, "is a directory")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(HAND.replace("a_shape", "a_shape  # caf\xe9").encode("latin-1"))
    _refused(bad, "is not UTF-8 text (byte 0xe9")


PROFILED = "qwen2.5-0.5b"          # a shipped profiler output: its prefill section has many per-layer rules


def _profiled_text() -> str:
    return shipped_plan_path(PROFILED).read_text()


def test_shipped_plans_end_with_the_marker_and_read_back_exactly():
    from sparse_infer.profiler.profile import plan_yaml

    assert shipped_plan_names() == ["qwen2.5-0.5b", "smollm2-135m"]
    for name in shipped_plan_names():
        text = shipped_plan_path(name).read_text()
        assert text.endswith("\ncomplete: true\n")
        assert list(yaml.safe_load(text))[-1] == "complete"
        plan = load_plan(name)
        assert plan_yaml(plan).endswith("\ncomplete: true\n")
    assert shipped_plan_path("../README") is None and shipped_plan_path("smollm2-135m.yaml") is None


def test_a_profiled_plan_cut_anywhere_is_refused(tmp_path):
    """A profiler output cut mid-write (at a line end inside a layer mapping, or mid-line) never
    loads as a smaller plan: without the final `complete: true` it is refused."""
    text = _profiled_text()
    lines = text.splitlines(keepends=True)
    prefill_at = next(i for i, line in enumerate(lines) if line.startswith("prefill:"))
    decode_at = next(i for i, line in enumerate(lines) if line.startswith("decode:"))
    assert decode_at - prefill_at > 40                      # enough layer lines to cut inside
    # cut at line ends inside the prefill layers (valid YAML: fewer layers, no decode section),
    # after the last section, and at byte offsets throughout
    cuts = [sum(len(x) for x in lines[:i]) for i in range(prefill_at + 7, len(lines) - 1, 37)]
    cuts += list(range(50, len(text) - 1, len(text) // 23))
    for cut in cuts:
        path = _hand_written(tmp_path, text[:cut], name=f"cut{cut}.yaml")
        with pytest.raises(PlanError) as err:
            load_plan(path)
        assert "\n" not in str(err.value)
    # a cut inside the last section, reported by plan check with the field to add
    inside = sum(len(x) for x in lines[:decode_at + 3])
    message = _refused(_hand_written(tmp_path, text[:inside]), "complete: missing", "cut short")
    assert "profile section" in message
    assert load_plan(_hand_written(tmp_path, text, name="whole.yaml")).to_dict() == load_plan(PROFILED).to_dict()


def test_the_marker_in_a_hand_written_plan_is_checked_too(tmp_path):
    load_plan(_hand_written(tmp_path, HAND + "complete: true\n"))
    _refused(_hand_written(tmp_path, HAND + "complete: false\n", name="f.yaml"), "complete: must be true")


def test_save_writes_the_marker_atomically_and_never_overwrites(tmp_path, monkeypatch):
    import os

    plan = plan_from_dict(copy.deepcopy(GOOD))
    path = plan.save(tmp_path / "p.yaml")
    assert list(yaml.safe_load(path.read_text()))[-1] == "complete"
    (tmp_path / "plain.txt").write_text("")
    assert path.stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777   # as open() makes it
    (tmp_path / "plain.txt").unlink()
    written = path.read_text()
    with pytest.raises(FileExistsError, match="not overwritten"):
        plan.save(path)
    assert path.read_text() == written
    # a write that fails part way leaves the old file whole and no temp file behind
    def broken_fsync(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        write_plan_text(path, "sparse_infer_plan: 1\n", overwrite=True)
    with pytest.raises(OSError, match="No space"):
        write_plan_text(tmp_path / "new.yaml", "sparse_infer_plan: 1\n")
    monkeypatch.undo()
    assert path.read_text() == written and not (tmp_path / "new.yaml").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]
    plan.save(path, overwrite=True)
    assert path.read_text() == written
    with pytest.raises(FileNotFoundError, match=f"directory {tmp_path / 'no'} does not exist"):
        plan.save(tmp_path / "no" / "p.yaml")


def test_plan_check_with_an_unreadable_model_is_one_line(tmp_path):
    res = CliRunner().invoke(app, ["plan", "check", "smollm2-135m", "--model", str(tmp_path / "nothing")])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert "cannot read the config of model" in res.output


def test_plan_show_refuses_in_one_line_too(tmp_path):
    res = CliRunner().invoke(app, ["plan", "show", str(tmp_path)])
    assert res.exit_code == 1 and res.output.strip().splitlines() == [f"invalid plan: {tmp_path} is a directory, "
                                                                      f"not a plan file"], res.output


def test_plan_show_of_a_plan_for_any_model_asks_for_the_shape(tmp_path):
    """A plan with no model section (written by hand for any model) has no layer count to lay its
    rules out by: `plan show` says so in one line and takes the shape from --heads / --layers."""
    path = tmp_path / "any.yaml"
    path.write_text("sparse_infer_plan: 1\nprefill: {default: {pattern: dense}}\n"
                    "decode:\n  min_kv_len: 0\n  default: {method: token_select, budget: {frac: 0.1}, scoring: int8}\n")
    res = CliRunner().invoke(app, ["plan", "show", str(path)])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert "--heads and --layers" in res.output
    res = CliRunner().invoke(app, ["plan", "show", str(path), "--heads", "14", "--layers", "3"], terminal_width=200)
    assert res.exit_code == 0, res.output
    rows = [line for line in res.output.splitlines() if "tok:14" in line]
    assert len(rows) == 3 and all("0.102" in line for line in rows)       # 1638 + 80 of 16384 cached tokens


def test_thresholds_may_exceed_the_count_bound():
    """min_seq_len / min_kv_len are only compared with lengths: 2**30 means 'never sparse'."""
    raw = copy.deepcopy(GOOD)
    raw["prefill"]["min_seq_len"] = 1 << 30
    raw["decode"]["min_kv_len"] = 1 << 40
    plan = plan_from_dict(raw)
    assert plan.prefill.min_len == 1 << 30 and plan.decode.min_len == 1 << 40
    raw["decode"]["min_kv_len"] = True
    with pytest.raises(PlanError, match="^decode.min_kv_len: must be a non-negative integer"):
        plan_from_dict(raw)


def test_nested_aliases_load_in_linear_time(tmp_path):
    """Anchors may name a repeated rule; nine levels of ten aliases each (10**9 paths) are walked once each."""
    import time

    levels = ["l0: &l0 [1, 2]"] + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 10)]
    rule = "{method: token_select, budget: 64}"
    text = ("sparse_infer_plan: 1\nprofile:\n" + "".join(f"  {line}\n" for line in levels)
            + f"prefill: {{default: {{pattern: dense}}}}\ndecode:\n  default: &rule {rule}\n"
            + "  layers: {1: {0: *rule}}\ncomplete: true\n")
    start = time.perf_counter()
    plan = load_plan(_hand_written(tmp_path, text))
    assert time.perf_counter() - start < 5
    assert plan.decode.rule(1, 0) == plan.decode.default


def test_plan_check_with_a_model_bounds_channels_by_its_head_dim(tmp_path):
    from tests.conftest import tiny_config

    tiny_config("llama").save_pretrained(tmp_path / "m")          # head_dim 16
    path = _hand_written(tmp_path, HAND.replace("{method: dense}", "{method: double_sparsity, budget: 8, channels: 17}"))
    assert _check(path)[0] == 0                                  # no head_dim to check against
    res = CliRunner().invoke(app, ["plan", "check", str(path), "--model", str(tmp_path / "m")])
    assert res.exit_code == 1 and res.output.strip().splitlines() == [
        "invalid plan: decode.default.channels: 17 channels exceed the model's head_dim 16"], res.output


def test_every_plan_the_docs_cite_loads():
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parent.parent / "docs" / "data" / "plans").glob("*.yaml"))
    assert files, "docs/data/plans holds the plans docs/RESULTS.md and docs/PROFILER.md cite"
    for path in files:
        plan = load_plan(path)
        assert plan.prefill is not None and plan.decode is not None, path
