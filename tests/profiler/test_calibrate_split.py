"""Head-split calibration (`calibrate --split-heads`): at the layers the levels leave dense, a
level runs on all heads but the few whose output it changes most. The head ranking is checked
against each head's own change, the trials against whole patched forwards, and the plan as
built against dense in generate."""
import json

import pytest
import torch
from typer.testing import CliRunner

import sparse_infer
from sparse_infer.eval.fidelity import compare, next_token_logprobs, prose_prompt, scored_positions
from sparse_infer.plan import load_plan, plan_from_dict
from sparse_infer.profiler.calibrate import (
    Calibration, CalibrateConfig, Trial, _layer_plan, _PrefillTrials, _run_split_trials, allocate, build_plan,
    run_trials)
from sparse_infer.profiler.cli import app
from sparse_infer.profiler.report import calibration_table

LENGTH, WINDOW, HEADS = 512, 32, 4
COVERS_ALL = {"pattern": "a_shape", "sink": 64, "local": 4096}
NARROW = {"pattern": "a_shape", "sink": 64, "local": 64, "dense_tail": 0}
# as written: patch's break-even would run a partial group's heads dense where the whole layer's
# index stays sparse, and the ranking test compares the two
CONFIG = dict(length=LENGTH, window=WINDOW, block_size=64, dense_above=1.0)


@pytest.fixture(scope="module")
def recorded(tiny):
    model, tok = tiny
    prompt = prose_prompt(tok, LENGTH, 0, seed=1)
    config = CalibrateConfig(**CONFIG, levels=(NARROW,))
    return _PrefillTrials(model, prompt, config), config.validate()[0]


def _projection_output(model, trials, layer, plan):
    """o_proj's output at `layer` in a whole forward with `plan` patched (None: dense)."""
    got = {}
    hook = model.model.layers[layer].self_attn.o_proj.register_forward_hook(
        lambda m, a, out: got.__setitem__("y", out.detach().clone()))
    try:
        if plan is not None:
            sparse_infer.patch(model, plan, dense_above=1.0)
        next_token_logprobs(model, trials.prompt.input_ids, trials.positions)
    finally:
        hook.remove()
        sparse_infer.unpatch(model)
    return got["y"]


@pytest.mark.parametrize("layer", [0, 2])
def test_head_errors_are_each_heads_own_change_of_the_projected_output(tiny, recorded, layer):
    """Only head h sparse changes o_proj's output by head h's term alone: its squared norm is
    what head_errors gives h (with every head sparse at once)."""
    model, _ = tiny
    trials, narrow = recorded
    errors = trials.head_errors(layer, narrow)
    assert len(errors) == HEADS and min(errors) > 0
    dense = _projection_output(model, trials, layer, None)
    for head in range(HEADS):
        others_dense = [h for h in range(HEADS) if h != head]
        alone = _projection_output(model, trials, layer,
                                   _layer_plan(model.config, narrow, layer, 64, dense_heads=others_dense))
        assert float((alone - dense).double().pow(2).sum()) == pytest.approx(errors[head], rel=1e-4)
    covers = CalibrateConfig(**CONFIG, levels=(COVERS_ALL,)).validate()[0]
    assert max(trials.head_errors(layer, covers)) < 1e-6 * max(errors), "a rule covering every pair changes nothing"
    assert not sparse_infer.is_patched(model)
    for mod in model.model.layers:
        assert "forward" not in vars(mod) and not mod._forward_hooks and not mod._forward_pre_hooks
        assert not mod.self_attn.o_proj._forward_pre_hooks


def test_split_trials_keep_the_worst_heads_dense_and_equal_a_whole_forward(tiny, recorded):
    model, tok = tiny
    trials_obj, narrow = recorded
    prompt = trials_obj.prompt
    config = CalibrateConfig(**CONFIG, levels=(NARROW,), split_heads=(1, 2))
    rules = config.validate()
    # a target nothing fits: every layer is left dense, so every layer gets its split trials
    _, trials = run_trials(model, prompt, rules, config, target_kl=1e-12, progress=False)
    assert set(trials) == {(layer, level) for layer in range(3) for level in range(3)}
    positions = scored_positions(prompt, WINDOW)
    reference = next_token_logprobs(model, prompt.input_ids, positions)
    for layer in range(3):
        errors = trials_obj.head_errors(layer, narrow)
        worst = sorted(range(HEADS), key=lambda h: -errors[h])
        one, two = trials[(layer, 1)], trials[(layer, 2)]
        assert one.base_level == two.base_level == 0
        assert one.dense_heads == [worst[0]] and two.dense_heads == sorted(worst[:2])
        assert trials[(layer, 0)].density < two.density < 1.0
        for t in (one, two):
            sparse_infer.patch(model, _layer_plan(model.config, narrow, layer, 64, dense_heads=t.dense_heads),
                               dense_above=1.0)
            try:
                whole = next_token_logprobs(model, prompt.input_ids, positions)
            finally:
                sparse_infer.unpatch(model)
            assert compare(reference, whole, positions, prompt)["kl"] == pytest.approx(t.kl, rel=1e-5, abs=1e-10)


def test_split_trials_run_where_the_levels_leave_a_layer_dense_or_spend_much_of_the_target(recorded):
    trials_obj, narrow = recorded
    config = CalibrateConfig(**CONFIG, levels=(NARROW,), split_heads=(1,))

    def split(kl_of_layer_1):
        done = {(0, 0): Trial(1.0, 50.0, 0.5, 0.3),              # too costly: left dense, split
                (1, 0): Trial(kl_of_layer_1, 99.0, 0.5, 0.3),     # fits and is faster: kept sparse
                (2, 0): Trial(1.0, 50.0, 0.9, 1.0)}              # ran every head dense: nothing to split
        _run_split_trials(trials_obj, trials_obj.prompt, [narrow], config, done, [1.0, 1.0, 1.0], 1e-3,
                          lambda: None, False, None)
        return done

    # a sparse layer spending less than SPLIT_SPARSE_SHARE (1/8) of the target is not split
    done = split(1e-4)
    assert set(done) == {(0, 0), (1, 0), (2, 0), (0, 1)}
    assert done[(0, 1)].base_level == 0 and len(done[(0, 1)].dense_heads) == 1
    # one spending more is, on its chosen level
    done = split(2e-4)
    assert set(done) == {(0, 0), (1, 0), (2, 0), (0, 1), (1, 1)}
    assert done[(1, 1)].base_level == 0 and len(done[(1, 1)].dense_heads) == 1
    # a split recorded on another base level (a resume at another target) is measured again
    stale = Trial(9.0, 1.0, 9.0, 0.9, base_level=3, dense_heads=[0])
    done = {(0, 0): Trial(1.0, 50.0, 0.5, 0.3), (1, 0): Trial(1e-4, 99.0, 0.5, 0.3),
            (2, 0): Trial(1.0, 50.0, 0.9, 1.0), (0, 1): stale}
    _run_split_trials(trials_obj, trials_obj.prompt, [narrow], config, done, [1.0, 1.0, 1.0], 1e-3,
                      lambda: None, False, None)
    assert done[(0, 1)] is not stale and done[(0, 1)].base_level == 0 and done[(0, 1)].kl < 9.0


def test_the_knapsack_takes_a_split_and_the_plan_runs_it_as_dense_in_generate(tiny):
    model, tok = tiny
    config = CalibrateConfig(**CONFIG, levels=(COVERS_ALL, NARROW), split_heads=(1, 3))
    levels = config.validate()
    trials = {(0, 1): Trial(5e-3, 90.0, 0.4, 0.3),
              (0, 2): Trial(2e-4, 99.0, 0.6, 0.5, base_level=0, dense_heads=[2]),      # the cheapest that fits
              (0, 3): Trial(1e-4, 99.5, 0.9, 0.8, base_level=0, dense_heads=[0, 2, 3]),
              (1, 1): Trial(1e-4, 99.0, 0.5, 0.3)}
    choice, kl, seconds = allocate([1.0, 1.0, 1.0], trials, len(levels) + 2, 1e-3)
    assert choice == [2, 1, None] and kl == pytest.approx(3e-4) and seconds == pytest.approx(2.1)
    base = plan_from_dict({"sparse_infer_plan": 1, "prefill": {"min_seq_len": 1, "default": {"pattern": "dense"}},
                           "decode": {"min_kv_len": 1, "default": {"method": "dense"}}})
    plan = build_plan(model.config, base, levels, Calibration([1.0] * 3, trials, 1e-3, None, choice, kl, seconds),
                      config, "cmd", "tiny")
    assert [plan.prefill.rule(0, h).kind for h in range(HEADS)] == ["a_shape", "a_shape", "dense", "a_shape"]
    assert plan.prefill.rule(0, 0).to_yaml("pattern") == {**COVERS_ALL, "dense_tail": WINDOW}
    assert plan.prefill.rule(1, 3).to_yaml("pattern") == NARROW and plan.prefill.rule(2, 0).kind == "dense"
    cal = plan.profile["calibration"]
    assert cal["choice"] == [{"level": 1, "dense_heads": [2]}, 2, 0]
    assert cal["split"]["heads"] == [1, 3] and cal["split"]["level"] == [1, None, None]
    assert cal["split"]["dense_heads"] == [[[2], None, None], [[0, 2, 3], None, None]]
    assert cal["split"]["kl"][1][0] == 1e-4 and cal["split"]["seconds"][0][0] == 0.6
    table = calibration_table(plan)
    assert table.row_count == 3
    assert list(table.columns[1].cells)[0].endswith(", heads 2 dense") and list(table.columns[2].cells)[0] == "2.00e-04"

    # the plan as written (its split layer covers every pair on its sparse heads) generates as dense
    from sparse_infer.runtime import set_timing

    plan.prefill.layers.pop(1)
    ids = torch.tensor([prose_prompt(tok, 600, 0, seed=2).input_ids])
    dense_out = model.generate(ids, max_new_tokens=8, do_sample=False)
    sparse_infer.patch(model, plan, dense_above=1.0)
    try:
        set_timing(model, True)
        split_out = model.generate(ids, max_new_tokens=8, do_sample=False)
        seconds = sparse_infer.get_stats(model)["layers"][0]["prefill_seconds"]
    finally:
        sparse_infer.unpatch(model)
    assert torch.equal(dense_out, split_out)
    assert seconds["sparse"] > 0 and seconds["dense"] > 0, "layer 0 ran its level on three heads, one dense"


def _args(tiny_dir, out, *extra):
    return ["calibrate", str(tiny_dir), "--out", str(out), "--length", str(LENGTH), "--window", str(WINDOW),
            "--target-kl", "1e-9", "--level", "{pattern: a_shape, sink: 64, local: 64}", "--as-written",
            "--no-progress", *extra]


def test_cli_records_split_trials_and_resume_keeps_the_level_trials(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "split.yaml"
    res = CliRunner().invoke(app, _args(tiny_dir, out, "--split-heads", "1,2"))
    assert res.exit_code == 0, res.output + repr(res.exception)
    plan = load_plan(out)
    cal = plan.profile["calibration"]
    assert cal["split"]["heads"] == [1, 2] and plan.profile["command"].endswith("--split-heads 1,2 --target-kl 1e-09 "
                                                                                "--as-written")
    # the split layers keep their groups' K/V shared, as the trials ran
    assert plan.prefill.granularity == "subgroup"
    record = json.loads((tmp_path / "split.yaml.trials.json").read_text())
    assert record["split_heads"] == [1, 2] and record["split_granularity"] == "subgroup"
    splits = [row for row in record["trials"] if row["level"] >= 1]
    assert len(splits) == 6 and all(len(row["dense_heads"]) == row["level"] for row in splits)

    first = {(row["layer"], len(row["dense_heads"])): row for row in splits}

    # another --split-heads keeps the level trials and the splits of a K it asks for again, and
    # measures only the new K
    measured = []
    real_run = _PrefillTrials.run
    monkeypatch.setattr(_PrefillTrials, "run", lambda self, p, first=0: measured.append(first) or real_run(self, p, first))
    again = CliRunner().invoke(app, _args(tiny_dir, out, "--split-heads", "2,3", "--resume", "--force"))
    assert again.exit_code == 0, again.output + repr(again.exception)
    record = json.loads((tmp_path / "split.yaml.trials.json").read_text())
    assert record["split_heads"] == [2, 3]
    assert sorted((row["layer"], row["level"]) for row in record["trials"]) == \
        [(layer, level) for layer in range(3) for level in (0, 1, 2)]
    for row in record["trials"]:
        if row["level"] == 1:
            assert row == {**first[(row["layer"], 2)], "level": 1}, "K=2's trials kept, as level 1 now"
    # the reference forward, K=3's untimed warm-up on the last layer and one trial per layer
    assert measured == [0, 2, 0, 1, 2]


def test_resume_measures_again_the_split_trials_of_another_split_granularity(tiny_dir, tmp_path, monkeypatch):
    """Split trials recorded before a split layer's heads shared their groups' K/V ran another
    executor layout: resume keeps the level trials and runs the splits again."""
    out = tmp_path / "split.yaml"
    res = CliRunner().invoke(app, _args(tiny_dir, out, "--split-heads", "1"))
    assert res.exit_code == 0, res.output + repr(res.exception)
    path = tmp_path / "split.yaml.trials.json"
    record = json.loads(path.read_text())
    del record["split_granularity"]
    path.write_text(json.dumps(record))
    measured = []
    real_run = _PrefillTrials.run
    monkeypatch.setattr(_PrefillTrials, "run", lambda self, p, first=0: measured.append(first) or real_run(self, p, first))
    again = CliRunner().invoke(app, _args(tiny_dir, out, "--split-heads", "1", "--resume", "--force"))
    assert again.exit_code == 0, again.output + repr(again.exception)
    # the reference forward, the untimed warm-up on the last layer and one split trial per layer
    assert measured == [0, 2, 0, 1, 2]
    assert json.loads(path.read_text())["split_granularity"] == "subgroup"


@pytest.mark.parametrize("settings, message", [
    (dict(split_heads=(0,)), "--split-heads must be positive head counts"),
    (dict(split_heads=(2, 2)), "--split-heads lists a count twice"),
    (dict(split_heads=(1,), phase="decode"), "needs --phase prefill"),
])
def test_bad_split_heads_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        CalibrateConfig(**settings).validate()


def test_split_heads_beyond_the_models_heads_or_not_numbers_are_refused(tiny_dir, tmp_path):
    res = CliRunner().invoke(app, _args(tiny_dir, tmp_path / "p.yaml", "--split-heads", "4"))
    assert res.exit_code != 0 and "at most 3 can be kept dense" in res.output and not (tmp_path / "p.yaml").exists()
    res = CliRunner().invoke(app, _args(tiny_dir, tmp_path / "p.yaml", "--split-heads", "one"))
    assert res.exit_code != 0 and "--split-heads must be comma-separated" in res.output


def test_split_layouts_are_the_calls_the_runtime_makes():
    """Split trials are warmed up once per layout of calls, as the runtime forms them
    (Qwen2.5-0.5B's 14 query heads on 2 key heads): two dense heads in one group leave calls of
    7 and 5 heads, one in each group one call of 12."""
    from sparse_infer.profiler.calibrate import _split_layout
    from tests.conftest import tiny_config

    qwen = tiny_config("llama", num_attention_heads=14, num_key_value_heads=2)
    assert _split_layout(qwen, [8, 13]) == ((7, 1), (5, 1))
    assert _split_layout(qwen, [1, 13]) == ((12, 2),)
    assert _split_layout(qwen, [0, 2]) == _split_layout(qwen, [9, 12]) == ((7, 1), (5, 1))
