"""`plan reallocate`: the knapsack of `calibrate` run again on the trials a calibrated plan
records, at another target, with no model and no trial."""
import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sparse_infer.plan import load_plan, plan_from_dict
from sparse_infer.profiler.calibrate import (
    Calibration, CalibrateConfig, Trial, allocate, build_plan, calibration_from_plan, reallocate,
)
from sparse_infer.profiler.cli import app
from tests.conftest import tiny_model

LENGTH, WINDOW = 512, 32
WIDE = {"pattern": "a_shape", "sink": 64, "local": 256}
NARROW = {"pattern": "a_shape", "sink": 64, "local": 64}
DENSE_SECONDS = [1.0, 1.1, 0.9, 1.0]
# (layer, level) -> trial; levels 0-1 the rules, 2 and 3 head splits keeping 1 and 2 heads dense
TRIALS = {
    (0, 0): Trial(2e-4, 99.0, 0.7, 0.6), (0, 1): Trial(9e-4, 97.0, 0.4, 0.2),
    (1, 0): Trial(3e-3, 95.0, 0.8, 0.6),
    (1, 2): Trial(6e-4, 98.0, 0.9, 0.7, base_level=0, dense_heads=[1]),
    (1, 3): Trial(1e-4, 99.0, 0.95, 0.8, base_level=0, dense_heads=[1, 3]),
    (2, 0): Trial(1e-4, 99.5, 0.5, 0.5), (2, 1): Trial(4e-4, 98.5, 0.3, 0.2),
    (3, 1): Trial(5e-5, 99.8, 0.35, 0.2),
}
TARGET, FLOOR = 1e-3, 8e-4
DOCS_PLANS = Path(__file__).resolve().parents[2] / "docs" / "data" / "plans"


def _calibrated_plan(tmp_path, target=TARGET):
    config = CalibrateConfig(length=LENGTH, window=WINDOW, levels=(WIDE, NARROW), split_heads=(1, 2),
                             target_kl=target)
    levels = config.validate()
    choice, kl, seconds = allocate(DENSE_SECONDS, TRIALS, len(levels) + 2, target)
    base = plan_from_dict({"sparse_infer_plan": 1, "prefill": {"min_seq_len": 1, "default": {"pattern": "dense"}},
                           "decode": {"min_kv_len": 300, "default": {"method": "streaming", "sink": 4, "local": 64}}})
    model_config = tiny_model("llama", num_hidden_layers=len(DENSE_SECONDS)).config
    plan = build_plan(model_config, base, levels, Calibration(DENSE_SECONDS, TRIALS, target, FLOOR, choice, kl, seconds),
                      config, "sparse-infer calibrate tiny ...", "tiny", "base.yaml")
    path = tmp_path / "calibrated.yaml"
    plan.save(path)
    return load_plan(path), choice


def test_the_recorded_trials_read_back_as_they_were_measured(tmp_path):
    plan, _ = _calibrated_plan(tmp_path)
    config, levels, calibration = calibration_from_plan(plan)
    assert [r.to_yaml("pattern") for r in levels] == [{**WIDE, "dense_tail": WINDOW}, {**NARROW, "dense_tail": WINDOW}]
    assert config.split_heads == (1, 2) and config.length == LENGTH and config.window == WINDOW
    assert calibration.dense_seconds == DENSE_SECONDS and calibration.floor_kl == FLOOR
    assert set(calibration.trials) == set(TRIALS)
    for key, trial in TRIALS.items():
        got = calibration.trials[key]
        assert (got.kl, got.seconds, got.density, got.base_level, got.dense_heads) == \
            (trial.kl, trial.seconds, trial.density, trial.base_level, trial.dense_heads)
        assert math.isnan(got.top1), "top-1 is not recorded in the plan"


def test_at_its_own_target_the_plan_comes_back_and_at_others_it_is_the_knapsacks_choice(tmp_path):
    plan, choice = _calibrated_plan(tmp_path)
    again = reallocate(plan, target_kl=TARGET, command="cmd")
    assert again.to_dict()["prefill"] == plan.to_dict()["prefill"]
    assert again.to_dict()["decode"] == plan.to_dict()["decode"], "the other section is kept"
    assert again.profile["calibration"]["choice"] == plan.profile["calibration"]["choice"]
    assert again.profile["command"] == "cmd" and again.profile["decode_from"] == "base.yaml"
    for target in (2e-4, 5e-3):
        wider = reallocate(plan, target_kl=target)
        expected, kl, seconds = allocate(DENSE_SECONDS, TRIALS, 4, target)
        assert expected != choice
        cal = wider.profile["calibration"]
        assert cal["target_kl"] == target and cal["predicted_kl"] == pytest.approx(kl, abs=1e-8)
        assert cal["predicted_seconds"] == pytest.approx(seconds) and kl <= target
        assert cal["measured"] == plan.profile["calibration"]["measured"], "the trials are kept"
        # each layer runs what the knapsack chose: dense, a level, or a level with heads dense
        for layer, pick in enumerate(expected):
            rules = [wider.prefill.rule(layer, h).kind for h in range(4)]
            if pick is None:
                assert rules == ["dense"] * 4
            elif pick < 2:
                assert rules == ["a_shape"] * 4
            else:
                dense_heads = TRIALS[(layer, pick)].dense_heads
                assert rules == ["dense" if h in dense_heads else "a_shape" for h in range(4)]
    # a share of the recorded floor is the same as that target
    by_share = reallocate(plan, floor_share=2.5)
    assert by_share.profile["calibration"]["target_kl"] == pytest.approx(2.5 * FLOOR)
    assert by_share.to_dict()["prefill"] == reallocate(plan, target_kl=2.5 * FLOOR).to_dict()["prefill"]


def test_a_decode_calibration_comes_back_and_chooses_again():
    """Decode records (phase, tokens, min_kv_len, prefill_from) take the same path."""
    config = CalibrateConfig(length=LENGTH, window=WINDOW, phase="decode", tokens=8, target_kl=TARGET,
                             levels=({"method": "token_select", "budget": {"frac": 0.5}},
                                     {"method": "token_select", "budget": {"frac": 0.1}}))
    levels = config.validate()
    trials = {(0, 0): Trial(1e-4, 100.0, 0.02, 0.5), (0, 1): Trial(6e-4, 99.0, 0.01, 0.1),
              (1, 0): Trial(8e-4, 99.0, 0.02, 0.5), (2, 1): Trial(2e-4, 99.0, 0.012, 0.1)}
    dense = [0.03, 0.03, 0.03]
    choice, kl, seconds = allocate(dense, trials, 2, TARGET)
    base = plan_from_dict({"sparse_infer_plan": 1, "prefill": {"min_seq_len": 64, "default": {"pattern": "a_shape"}},
                           "decode": {"min_kv_len": 1, "default": {"method": "dense"}}})
    model_config = tiny_model("llama", num_hidden_layers=3).config
    plan = build_plan(model_config, base, levels, Calibration(dense, trials, TARGET, None, choice, kl, seconds),
                      config, "cmd", "tiny", "prefill.yaml")
    again = reallocate(plan, target_kl=TARGET)
    assert again.to_dict() == {**plan.to_dict(), "profile": again.profile}
    assert again.profile["prefill_from"] == "prefill.yaml" and again.decode.min_len == LENGTH
    assert again.profile["calibration"]["phase"] == "decode" and again.profile["calibration"]["tokens"] == 8
    wider = reallocate(plan, target_kl=1.0)
    assert wider.profile["calibration"]["choice"] == [2, 1, 2]          # each layer's fastest level
    assert wider.to_dict()["prefill"] == plan.to_dict()["prefill"]


def test_an_edited_threshold_is_kept(tmp_path):
    plan, _ = _calibrated_plan(tmp_path)
    plan.prefill.min_len = 300
    assert reallocate(plan, target_kl=5e-3).prefill.min_len == 300


@pytest.mark.parametrize("name", [
    "qwen2.5-0.5b", "smollm2-135m",
    # the frontier plans docs/RESULTS.md cites, and the record they were chosen from
    str(DOCS_PLANS / "qwen_calibrated_16k_split234_kl179.yaml"), str(DOCS_PLANS / "qwen_frontier_16k_kl286.yaml"),
    # recorded before levels got the window's dense tail: the levels must run as they were measured
    str(DOCS_PLANS / "smol_calibrated_8k.yaml"), str(DOCS_PLANS / "qwen_calibrated_8k.yaml"),
])
def test_the_shipped_plans_come_back_from_their_own_records(name):
    """The real records: at the recorded target the knapsack chooses the shipped prefill again
    (Qwen's record has head splits, SmolLM2's prefill threshold was edited after calibration)."""
    shipped = load_plan(name)
    again = reallocate(shipped, target_kl=shipped.profile["calibration"]["target_kl"])
    assert again.to_dict()["prefill"] == shipped.to_dict()["prefill"]
    assert again.to_dict()["decode"] == shipped.to_dict()["decode"]


HAND_WRITTEN = {"sparse_infer_plan": 1, "prefill": {"min_seq_len": 1, "default": {"pattern": "a_shape"}},
                "decode": {"min_kv_len": 1, "default": {"method": "dense"}}}


def test_split_layers_keep_the_granularity_their_trials_ran_with():
    """A record from before split layers shared their groups (`subgroup`) ran them per head."""
    old = load_plan(str(DOCS_PLANS / "qwen_calibrated_16k_split.yaml"))
    assert old.prefill.granularity == "group"
    again = reallocate(old, target_kl=2 * old.profile["calibration"]["target_kl"])
    assert again.prefill.granularity == "group"
    assert any(rule.kind == "dense" for layer in again.prefill.layers.values() for head, rule in layer.items()
               if head != "*"), "the wider target still takes a head split"


def test_plans_without_a_usable_record_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not written by `sparse-infer calibrate`"):
        reallocate(plan_from_dict(HAND_WRITTEN), target_kl=1e-3)
    plan, _ = _calibrated_plan(tmp_path)
    with pytest.raises(ValueError, match="--target-kl or --floor-share"):
        reallocate(plan)
    with pytest.raises(ValueError, match="--target-kl or --floor-share"):
        reallocate(plan, target_kl=1e-3, floor_share=2.0)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="--target-kl must be a positive number"):
            reallocate(plan, target_kl=bad)
    cut = plan.to_dict()
    cut["profile"]["calibration"]["measured"]["kl"][0] = cut["profile"]["calibration"]["measured"]["kl"][0][:2]
    with pytest.raises(ValueError, match=r"profile\.calibration\.measured\.kl must hold 2 list"):
        reallocate(plan_from_dict(cut), target_kl=1e-3)
    hand_edited = plan.to_dict()
    hand_edited["profile"]["calibration"]["measured"]["seconds"][0][2] = "0.5"
    with pytest.raises(ValueError, match=r"measured\.seconds\[0\]\[2\] must be a finite number"):
        reallocate(plan_from_dict(hand_edited), target_kl=1e-3)
    for bad in (None, 0, 3):                       # layer 1 has split trials
        wrong_level = plan.to_dict()
        wrong_level["profile"]["calibration"]["split"]["level"][1] = bad
        with pytest.raises(ValueError, match=r"split\.level\[1\] must be a level 1\.\.2"):
            reallocate(plan_from_dict(wrong_level), target_kl=1e-3)
    no_floor = plan.to_dict()
    no_floor["profile"]["calibration"]["bf16_floor_kl"] = None
    with pytest.raises(ValueError, match="records no bf16 floor"):
        reallocate(plan_from_dict(no_floor), floor_share=2.0)


def test_cli_writes_the_plan_and_refuses_to_overwrite(tmp_path):
    plan, _ = _calibrated_plan(tmp_path)
    src = str(tmp_path / "calibrated.yaml")
    out = tmp_path / "wider.yaml"
    runner = CliRunner()
    res = runner.invoke(app, ["plan", "reallocate", src, "--out", str(out), "--target-kl", "0.005"])
    assert res.exit_code == 0, res.output
    written = load_plan(out)
    assert written.to_dict()["prefill"] == reallocate(plan, target_kl=5e-3).to_dict()["prefill"]
    assert written.profile["command"] == f"sparse-infer plan reallocate {src} --out {out} --target-kl 0.005"
    before = out.read_text()
    res = runner.invoke(app, ["plan", "reallocate", src, "--out", str(out), "--target-kl", "0.0002"])
    assert res.exit_code == 1 and "exists; not overwritten" in res.output
    assert out.read_text() == before
    res = runner.invoke(app, ["plan", "reallocate", src, "--out", str(out), "--target-kl", "0.0002", "--force"])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load(out.read_text())["profile"]["calibration"]["target_kl"] == 2e-4
    hand = tmp_path / "hand.yaml"
    hand.write_text(yaml.safe_dump(HAND_WRITTEN))
    res = runner.invoke(app, ["plan", "reallocate", str(hand), "--out", str(tmp_path / "x.yaml"), "--target-kl", "0.001"])
    assert res.exit_code == 1 and "not written by `sparse-infer calibrate`" in res.output
    assert not (tmp_path / "x.yaml").exists()
