"""Calibration by measured KL: the knapsack, the per-layer trials (replayed layers change
nothing, a rule that covers everything costs no KL), resume, and the CLI on a tiny model."""
import itertools
import json
import math
import random
import statistics

import pytest
import torch
from typer.testing import CliRunner

import sparse_infer
from sparse_infer.eval.fidelity import compare, next_token_logprobs, prose_prompt, scored_positions
from sparse_infer.plan import load_plan, parse_rule
from sparse_infer.profiler.calibrate import CalibrateConfig, Trial, _layer_plan, allocate, run_trials
from sparse_infer.profiler.cli import app
from tests.conftest import tiny_model

LENGTH, WINDOW = 512, 32
COVERS_ALL = {"pattern": "a_shape", "sink": 64, "local": 4096}         # every causal block
NARROW = {"pattern": "a_shape", "sink": 64, "local": 64, "dense_tail": 0}
NARROW_TAIL_UNSET = {"pattern": "a_shape", "sink": 64, "local": 64}      # calibrate gives it the window
CONFIG = dict(length=LENGTH, window=WINDOW, block_size=64)


def _brute_force(dense, trials, levels, target, resolution):
    unit = target / resolution
    best = (math.inf, None)
    options = [[None] + [v for v in range(levels) if (layer, v) in trials] for layer in range(len(dense))]
    for pick in itertools.product(*options):
        units = sum(math.ceil(trials[(i, c)].kl / unit - 1e-9) for i, c in enumerate(pick) if c is not None)
        if units > resolution:
            continue
        seconds = sum(dense[i] if c is None else trials[(i, c)].seconds for i, c in enumerate(pick))
        best = min(best, (seconds, pick), key=lambda x: x[0])
    return best


@pytest.mark.parametrize("seed", range(8))
def test_allocate_is_the_least_time_within_the_target(seed):
    rng = random.Random(seed)
    layers, levels, target, resolution = 5, 3, 1.0, 400
    dense = [rng.uniform(1, 2) for _ in range(layers)]
    trials = {}
    for layer in range(layers):
        for level in range(levels):
            if rng.random() < 0.85:            # some trials skipped
                trials[(layer, level)] = Trial(rng.uniform(0, 0.6), 100.0, dense[layer] * rng.uniform(0.2, 1.1), 0.5)
    choice, kl, seconds = allocate(dense, trials, levels, target, resolution)
    best_seconds, _ = _brute_force(dense, trials, levels, target, resolution)
    assert seconds == pytest.approx(best_seconds)
    assert kl <= target
    assert kl == pytest.approx(sum(trials[(i, c)].kl for i, c in enumerate(choice) if c is not None))
    assert seconds == pytest.approx(sum(dense[i] if c is None else trials[(i, c)].seconds
                                        for i, c in enumerate(choice)))


def test_allocate_keeps_dense_where_nothing_fits_or_nothing_is_faster():
    dense = [1.0, 1.0, 1.0]
    trials = {(0, 0): Trial(2.0, 90.0, 0.1, 0.1),       # too much KL
              (1, 0): Trial(0.0, 100.0, 1.5, 1.0),      # free but slower than dense
              (2, 0): Trial(0.5, 99.0, 0.4, 0.3)}
    choice, kl, seconds = allocate(dense, trials, 1, target_kl=1.0)
    assert choice == [None, None, 0] and kl == 0.5 and seconds == pytest.approx(2.4)
    # a level whose heads all ran dense is dense plus its estimate, whatever one timing said
    trials[(1, 0)] = Trial(0.0, 100.0, 0.9, 1.0)
    assert allocate(dense, trials, 1, target_kl=1.0)[0] == [None, None, 0]


@pytest.mark.parametrize("levels, message", [
    (({"pattern": "nope"},), "--level 1.pattern"),
    ((NARROW, {"pattern": "adaptive", "gama": 0.9},), "--level 2.gama"),
    (({"pattern": "adaptive", "gamma": 1.5},), "--level 1.gamma"),
    (({"pattern": "dense"},), "dense is always an option"),
    ((NARROW, COVERS_ALL, dict(NARROW)), "--level 1 and --level 3 are the same rule"),
    ((), "at least one level"),
])
def test_bad_levels_are_refused_naming_the_field(levels, message):
    with pytest.raises(ValueError, match=message):
        CalibrateConfig(levels=levels).validate()


def test_levels_that_name_no_dense_tail_get_the_scored_window():
    rules = CalibrateConfig(window=256, levels=(NARROW_TAIL_UNSET, {**NARROW, "local": 128})).validate()
    assert rules[0].params["dense_tail"] == 256 and "dense_tail" in rules[0].explicit
    assert rules[1].params["dense_tail"] == 0, "a dense tail the level names is kept"
    assert all(rule.params["dense_tail"] == 512 for rule in CalibrateConfig(window=512).validate())


@pytest.mark.parametrize("field, value, message", [
    ("window", 0, "--window"), ("window", 8192, "--window"), ("target_kl", -1.0, "--target-kl"),
    ("floor_share", 0.0, "--floor-share"), ("length", 64, "--length"), ("min_seq_len", 0, "--min-seq-len"),
])
def test_bad_settings_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        CalibrateConfig(**{field: value}).validate()
    with pytest.raises(ValueError, match="not both"):
        CalibrateConfig(target_kl=1e-3, floor_share=1.0).validate()


def _prompt(tok):
    return prose_prompt(tok, LENGTH, 0, seed=1)


def _rules(*raws):
    return [parse_rule(r, f"levels[{i}]", "prefill") for i, r in enumerate(raws)]


def test_trials_replay_equals_a_whole_forward_and_full_cover_costs_nothing(tiny):
    model, tok = tiny
    prompt = _prompt(tok)
    config = CalibrateConfig(**CONFIG, levels=(COVERS_ALL, NARROW))
    rules = config.validate()
    dense_s, trials = run_trials(model, prompt, rules, config, target_kl=1.0, progress=False)
    assert len(dense_s) == 3 and all(s > 0 for s in dense_s)
    assert set(trials) == {(layer, level) for layer in range(3) for level in range(2)}
    for layer in range(3):
        # fp32 rounding of the log-probs alone: eager against SDPA attention on this model gives 1.7e-8
        assert trials[(layer, 0)].kl < 1e-6 and trials[(layer, 0)].density == pytest.approx(1.0)
        assert trials[(layer, 1)].density < 0.6
    assert max(trials[(layer, 1)].kl for layer in range(3)) > 1e-5, "a narrow window should cost some KL"

    # layers before L replayed from the dense run (they do not run again) ...
    calls = []
    handle = model.model.layers[0].self_attn.register_forward_hook(lambda *a: calls.append(1))
    try:
        run_trials(model, prompt, rules[1:], CalibrateConfig(**CONFIG, levels=(NARROW,)), target_kl=1.0,
                   progress=False)
    finally:
        handle.remove()
    # layer 0 runs in the warm-up, the reference, the patched dense timing and the trial at layer 0 only
    # (the level's warm-up and the trials at layers 1 and 2 replay it)
    assert len(calls) == 4
    # ... and give the same KL as running the whole model
    positions = scored_positions(prompt, WINDOW)
    reference = next_token_logprobs(model, prompt.input_ids, positions)
    for layer in (1, 2):
        sparse_infer.patch(model, _layer_plan(model.config, rules[1], layer, 64), dense_above="auto")
        try:
            whole = next_token_logprobs(model, prompt.input_ids, positions)
        finally:
            sparse_infer.unpatch(model)
        assert compare(reference, whole, positions, prompt)["kl"] == pytest.approx(trials[(layer, 1)].kl, rel=1e-5,
                                                                                    abs=1e-10)
    assert not sparse_infer.is_patched(model)


def test_a_tail_covering_the_window_measures_only_what_later_rows_read(tiny):
    """At the last layer nothing reads the sparse rows but their own logits: with the window's
    rows dense the trial's KL is exactly 0 (up to fp32 rounding); without the tail it is not."""
    model, tok = tiny
    prompt = _prompt(tok)
    config = CalibrateConfig(**CONFIG, levels=(NARROW_TAIL_UNSET, NARROW))
    rules = config.validate()
    _, trials = run_trials(model, prompt, rules, config, target_kl=1.0, progress=False)
    assert trials[(2, 0)].kl < 1e-6 and trials[(2, 0)].density < 0.75, "sparse rows, none in the window"
    assert trials[(2, 1)].kl > 1e-5
    assert trials[(0, 0)].kl > 1e-6, "earlier layers still reach the window through the K/V they write"


def test_sparser_levels_of_a_pattern_are_skipped_where_a_denser_one_spent_the_target(tiny):
    model, tok = tiny
    other_pattern = {"pattern": "adaptive", "gamma": 0.5}
    config = CalibrateConfig(**CONFIG, levels=(NARROW, {"pattern": "a_shape", "sink": 64, "local": 32}, other_pattern))
    _, trials = run_trials(model, _prompt(tok), config.validate(), config, target_kl=1e-12, progress=False)
    assert set(trials) == {(layer, level) for layer in range(3) for level in (0, 2)}, \
        "NARROW exceeds a 1e-12 target everywhere: the sparser a_shape is skipped, adaptive is still tried"


def test_trials_resume_from_their_record_and_refuse_another_setup(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    prompt = _prompt(tok)
    config = CalibrateConfig(**CONFIG, levels=(NARROW,))
    rules = config.validate()
    record = tmp_path / "plan.yaml.trials.json"
    _, first = run_trials(model, prompt, rules, config, target_kl=1.0, record=record, progress=False)
    assert len(json.loads(record.read_text())["trials"]) == 3

    dense_first = json.loads(record.read_text())["dense_runs"]

    calls = []
    real_patch = sparse_infer.patch
    monkeypatch.setattr(sparse_infer, "patch", lambda *a, **k: calls.append(a) or real_patch(*a, **k))
    dense_again, again = run_trials(model, prompt, rules, config, target_kl=1.0, record=record, resume=True,
                                    progress=False)
    assert again == first and calls == []
    assert dense_again == [statistics.median(dense_first[str(i)]) for i in range(3)]

    # a record cut short: only the missing trials run (plus the level's untimed warm-up)
    doc = json.loads(record.read_text())
    doc["trials"] = doc["trials"][:1]
    record.write_text(json.dumps(doc))
    _, partial = run_trials(model, prompt, rules, config, target_kl=1.0, record=record, resume=True, progress=False)
    assert len(calls) == 1 + 2 and set(partial) == set(first) and partial[(0, 0)] == first[(0, 0)]

    other = CalibrateConfig(**CONFIG, levels=(COVERS_ALL,))
    with pytest.raises(ValueError, match="another levels .*'local': 64.*now .*'local': 4096"):
        run_trials(model, prompt, other.validate(), other, target_kl=1.0, record=record, resume=True, progress=False)


def test_a_failing_trial_leaves_no_hook_replay_or_patch_behind(tiny, monkeypatch):
    model, tok = tiny
    config = CalibrateConfig(**CONFIG, levels=(NARROW,))

    def broken(*args, **kwargs):
        raise RuntimeError("trial failed")

    monkeypatch.setattr("sparse_infer.eval.fidelity.compare", broken)
    with pytest.raises(RuntimeError, match="trial failed"):
        run_trials(model, _prompt(tok), config.validate(), config, target_kl=1.0, progress=False)
    assert not sparse_infer.is_patched(model)
    for layer in model.model.layers:
        assert "forward" not in vars(layer)
        assert not layer._forward_hooks and not layer._forward_pre_hooks


def test_build_plan_writes_the_chosen_rules_and_missing_figures():
    from sparse_infer.plan import plan_from_dict
    from sparse_infer.profiler.calibrate import Calibration, build_plan

    config = CalibrateConfig(**CONFIG, levels=(COVERS_ALL, NARROW))
    levels = config.validate()
    model_config = tiny_model("llama", num_hidden_layers=3).config
    trials = {(0, 0): Trial(0.0, 100.0, 0.9, 1.0), (1, 1): Trial(2e-4, 99.0, 0.4, None), (2, 0): Trial(1e-3, 98.0, 0.9, 0.9)}
    calibration = Calibration([1.0, 1.0, 1.0], trials, 1e-3, 5e-4, [0, 1, None], 2e-4, 2.3)
    base = plan_from_dict({"sparse_infer_plan": 1, "prefill": {"min_seq_len": 4096, "default": {"pattern": "dense"}},
                           "decode": {"min_kv_len": 300, "default": {"method": "streaming", "sink": 4, "local": 64}}})
    plan = build_plan(model_config, base, levels, calibration, config, "cmd", "tiny")
    assert [plan.prefill.rule(layer, h).to_yaml("pattern") for layer in range(3) for h in (0, 3)] == \
        [{**COVERS_ALL, "dense_tail": WINDOW}] * 2 + [NARROW, NARROW, {"pattern": "dense"}, {"pattern": "dense"}]
    cal = plan.profile["calibration"]
    assert cal["levels"] == [{**COVERS_ALL, "dense_tail": WINDOW}, NARROW], "the levels as they ran"
    assert cal["choice"] == [1, 2, 0] and cal["bf16_floor_kl"] == 5e-4 and plan.profile["command"] == "cmd"
    assert cal["measured"]["density"] == [[1.0, None, 0.9], [None, None, None]]
    assert cal["measured"]["kl"] == [[0.0, None, 0.001], [None, 0.0002, None]]
    assert plan.decode.default.kind == "streaming" and plan.prefill.min_len == LENGTH
    from sparse_infer.profiler.report import calibration_table
    assert calibration_table(plan).row_count == 3


def _calibrate_args(tiny_dir, out, *extra):
    return ["calibrate", str(tiny_dir), "--out", str(out), "--length", str(LENGTH), "--window", str(WINDOW),
            "--target-kl", "1e-3", "--level", "{pattern: a_shape, sink: 64, local: 4096}",
            "--level", "{pattern: a_shape, sink: 64, local: 64}", "--no-progress", *extra]


def test_cli_writes_a_plan_of_the_chosen_rules(tiny_dir, tmp_path):
    out = tmp_path / "cal.yaml"
    res = CliRunner().invoke(app, _calibrate_args(tiny_dir, out, "--min-seq-len", "256"))
    assert res.exit_code == 0, res.output + repr(res.exception)
    plan = load_plan(out, tiny_model("llama", num_hidden_layers=3).config)
    cal = plan.profile["calibration"]
    assert cal["length"] == LENGTH and cal["target_kl"] == 1e-3 and cal["bf16_floor_kl"] is None
    assert len(cal["choice"]) == 3 and cal["predicted_kl"] <= 1e-3
    assert plan.prefill.min_len == 256 and plan.decode.default.kind == "dense"
    for layer, pick in enumerate(cal["choice"]):
        rule = plan.prefill.rule(layer, 0)
        if pick == 0:
            assert rule.kind == "dense"
        else:
            assert rule.to_yaml("pattern") == cal["levels"][pick - 1]
            assert cal["measured"]["kl"][pick - 1][layer] <= 1e-3
    assert plan.profile["command"] == (f"sparse-infer calibrate {tiny_dir} --out {out} --length 512 --window 32 "
                                       "--seed 1 --level '{\"pattern\": \"a_shape\", \"sink\": 64, \"local\": 4096}' "
                                       "--level '{\"pattern\": \"a_shape\", \"sink\": 64, \"local\": 64}' "
                                       "--target-kl 0.001 --min-seq-len 256")
    assert (tmp_path / "cal.yaml.trials.json").exists()
    assert "calibration at 512 tokens" in res.output

    # never overwritten silently; the trials of a run are reused only when asked
    again = CliRunner().invoke(app, _calibrate_args(tiny_dir, out))
    assert again.exit_code == 1 and "exists" in again.output
    out.unlink()
    again = CliRunner().invoke(app, _calibrate_args(tiny_dir, out))
    assert again.exit_code == 1 and "--resume" in again.output and not out.exists()
    resumed = CliRunner().invoke(app, _calibrate_args(tiny_dir, out, "--min-seq-len", "256", "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert load_plan(out).profile["calibration"]["choice"] == cal["choice"]


def test_cli_refuses_a_bad_level_before_loading_the_model(tmp_path):
    res = CliRunner().invoke(app, ["calibrate", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "p.yaml"),
                                   "--level", "{pattern: adaptive, gamma: 2}"])
    assert res.exit_code != 0 and "--level 1.gamma" in res.output
    res = CliRunner().invoke(app, ["calibrate", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "p.yaml"),
                                   "--level", "[1, 2]"])
    assert res.exit_code != 0 and "must be a mapping" in res.output
    assert not (tmp_path / "p.yaml").exists()


def test_cli_keeps_the_decode_section_of_its_base(tiny_dir, tmp_path):
    base = tmp_path / "base.yaml"
    base_plan = sparse_infer.plan.plan_from_dict({
        "sparse_infer_plan": 1, "prefill": {"min_seq_len": 4096, "default": {"pattern": "dense"}},
        "decode": {"min_kv_len": 300, "default": {"method": "streaming", "sink": 4, "local": 64}}})
    base_plan.save(base)
    out = tmp_path / "cal.yaml"
    res = CliRunner().invoke(app, _calibrate_args(tiny_dir, out, "--base", str(base)))
    assert res.exit_code == 0, res.output
    plan = load_plan(out)
    assert plan.decode.default.kind == "streaming" and plan.decode.min_len == 300
    assert plan.profile["decode_from"] == str(base)
    assert plan.prefill.min_len == LENGTH


def test_the_default_target_is_the_bf16_floor_of_the_calibration_prompt_and_is_cached(tiny, tmp_path):
    from sparse_infer.eval.fidelity import FloorCache
    from sparse_infer.eval.results import weights_fingerprint
    from sparse_infer.profiler.calibrate import calibrate_model

    model, tok = tiny
    cache = tmp_path / "floor.json"
    config = CalibrateConfig(**CONFIG, levels=(NARROW,), floor_share=0.5)
    plan, calibration = calibrate_model(model, tok, config, name="tiny", floor_cache=cache, progress=False)
    key = FloorCache.key(weights_fingerprint(model), _prompt(tok), WINDOW)
    floor = json.loads(cache.read_text())[key]["kl"]
    assert floor > 0 and calibration.floor_kl == floor and calibration.target_kl == pytest.approx(0.5 * floor)
    assert plan.profile["calibration"]["bf16_floor_kl"] == floor
    assert next(model.parameters()).dtype == torch.float32      # the bf16 copy is apart


# ---------------------------------------------------------------------------- decode

TOKENS = 12
COVER_CACHE = {"method": "token_select", "budget": {"frac": 1.0}}
FEW_KEYS = {"method": "token_select", "budget": 8, "sink": 4, "local": 4}
DECODE = dict(length=LENGTH, block_size=64, phase="decode", tokens=TOKENS)


@pytest.mark.parametrize("settings, message", [
    (dict(phase="both"), "--phase"), (dict(phase="decode", tokens=1), "--tokens"),
    (dict(phase="decode", levels=({"pattern": "a_shape"},)), "--level 1.method"),
    (dict(phase="decode", levels=({"method": "token_select", "budget": 0},)), "--level 1.budget"),
])
def test_bad_decode_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        CalibrateConfig(**settings).validate()


def test_decode_trials_equal_a_patched_decode_and_a_full_budget_costs_nothing(tiny):
    """Decode trials crop one dense prefill's cache and decode the continuation teacher-forced with
    the level on one layer: the KL equals that of a fresh patched decode (eval fidelity's decode
    measure), a budget covering the cache costs nothing, a few keys cost some KL."""
    from sparse_infer.eval.fidelity import decode_logprobs
    from sparse_infer.profiler.calibrate import decode_prompt

    model, tok = tiny
    config = CalibrateConfig(**DECODE, levels=(COVER_CACHE, FEW_KEYS))
    rules = config.validate()
    scored = decode_prompt(model, _prompt(tok), TOKENS)
    assert len(scored.input_ids) == LENGTH + TOKENS and scored.answer_positions == []
    dense_s, trials = run_trials(model, scored, rules, config, target_kl=1.0, progress=False)
    assert len(dense_s) == 3 and all(0 < s < 1 for s in dense_s)          # seconds per step
    positions = list(range(LENGTH, LENGTH + TOKENS - 1))
    reference = next_token_logprobs(model, scored.input_ids, positions)
    for layer in range(3):
        assert trials[(layer, 0)].kl < 1e-6 and trials[(layer, 0)].density == pytest.approx(1.0)
        assert trials[(layer, 1)].density < 0.2
        sparse_infer.patch(model, _layer_plan(model.config, rules[1], layer, 64, "decode"))
        try:
            fresh = decode_logprobs(model, scored.input_ids[:LENGTH], scored.input_ids[LENGTH:])
        finally:
            sparse_infer.unpatch(model)
        assert compare(reference, fresh, positions, scored)["kl"] == pytest.approx(trials[(layer, 1)].kl, rel=1e-4,
                                                                                  abs=1e-9)
    assert max(trials[(layer, 1)].kl for layer in range(3)) > 1e-5, "a few keys should cost some KL"
    assert not sparse_infer.is_patched(model)


def test_cli_calibrates_decode_and_keeps_the_prefill_of_its_base(tiny_dir, tmp_path):
    base = tmp_path / "base.yaml"
    sparse_infer.plan.plan_from_dict({
        "sparse_infer_plan": 1, "prefill": {"min_seq_len": 300, "default": {"pattern": "a_shape"}},
        "decode": {"min_kv_len": 300, "default": {"method": "streaming", "sink": 4, "local": 64}}}).save(base)
    out = tmp_path / "dec.yaml"
    res = CliRunner().invoke(app, ["calibrate", str(tiny_dir), "--out", str(out), "--phase", "decode", "--tokens",
                                   str(TOKENS), "--length", str(LENGTH), "--target-kl", "1e-3", "--base", str(base),
                                   "--level", json.dumps(COVER_CACHE), "--level", json.dumps(FEW_KEYS),
                                   "--no-progress"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    plan = load_plan(out)
    cal = plan.profile["calibration"]
    assert cal["phase"] == "decode" and cal["tokens"] == TOKENS and plan.profile["prefill_from"] == str(base)
    assert plan.prefill.default.kind == "a_shape" and plan.prefill.min_len == 300
    assert plan.decode.min_len == LENGTH and plan.decode.granularity == "group"
    for layer, pick in enumerate(cal["choice"]):
        rule = plan.decode.rule(layer, 0)
        assert rule.kind == "dense" if pick == 0 else rule.to_yaml("method") == cal["levels"][pick - 1]
    assert cal["predicted_kl"] <= 1e-3
    assert "--phase decode --tokens 12" in plan.profile["command"] and "--window" not in plan.profile["command"]
    assert "calibration at decode after 512 tokens (12 steps)" in res.output


def test_the_decode_target_is_the_floor_eval_fidelity_caches_for_decode(tiny, tmp_path):
    from sparse_infer.eval.fidelity import FloorCache
    from sparse_infer.eval.results import weights_fingerprint
    from sparse_infer.profiler.calibrate import calibrate_model, decode_prompt

    model, tok = tiny
    cache = tmp_path / "floor.json"
    config = CalibrateConfig(**DECODE, levels=(FEW_KEYS,))
    plan, calibration = calibrate_model(model, tok, config, name="tiny", floor_cache=cache, progress=False)
    key = FloorCache.key(weights_fingerprint(model), decode_prompt(model, _prompt(tok), TOKENS), f"decode{TOKENS}")
    floor = json.loads(cache.read_text())[key]["kl"]
    assert floor > 0 and calibration.target_kl == floor and plan.decode.min_len == LENGTH
