"""Cross-layer reuse chosen by decode calibration (`calibrate --phase decode --reuse`): the sets
the profiler reasons about are the ones layer_select publishes, a reuse trial's KL is that of
the same plan decoded fresh, a set covering the cache costs nothing, the greedy choice of
selecting layers is the least time within the target, and the CLI writes a plan that runs."""
import itertools
import json

import pytest
import torch
from typer.testing import CliRunner

import sparse_infer
from sparse_infer.decode.common import GroupInputs
from sparse_infer.decode.cross_layer import attend_and_select
from sparse_infer.eval.fidelity import compare, decode_logprobs, next_token_logprobs, prose_prompt
from sparse_infer.plan import load_plan, parse_rule
from sparse_infer.profiler.calibrate import CalibrateConfig, Trial, _layer_plan, allocate, decode_prompt, run_trials
from sparse_infer.profiler.cli import app
from sparse_infer.profiler.reuse import allocate_with_reuse, best_sources, held_mass, published_sets
from tests.conftest import tiny_model
from tests.profiler.helpers import char_tokenizer
from tests.profiler.test_calibrate import DECODE, FEW_KEYS, LENGTH, TOKENS

SELECT_FEW = {"budget": 16, "sink": 4, "local": 4}
SELECT_ALL = {"budget": {"frac": 1.0}}


def _select_rule(raw):
    return parse_rule({"method": "layer_select", **raw}, "reuse", "decode")


@pytest.mark.parametrize("scope", ["layer", "kv_head"])
def test_published_sets_are_the_sets_layer_select_publishes(scope):
    torch.manual_seed(0)
    layers, hq, hk, n, d = 3, 6, 2, 300, 32
    rule = _select_rule({**SELECT_FEW, "budget": 40, "scope": scope})
    query, key = torch.randn(layers, hq, d), torch.randn(layers, hk, n, d)
    scores = torch.einsum("lhd,lhnd->lhn", query, key.repeat_interleave(hq // hk, 1)) * d ** -0.5
    sets = published_sets(torch.softmax(scores, -1), rule, hk)
    assert sets.shape == (layers, 1 if scope == "layer" else hk, n)
    for layer in range(layers):
        inp = GroupInputs(query=query[layer][None], key=key[layer][None], valid=None, per_head=False,
                          scaling=d ** -0.5, softcap=None, fresh=True)
        _, chosen = attend_and_select(inp, rule, key[layer][None])
        for row in range(sets.shape[1]):
            want = {t for t in chosen[0, row].tolist() if t >= 0}
            assert set(sets[layer, row].nonzero().flatten().tolist()) == want


def test_held_mass_reads_each_cache_heads_own_set():
    probs = torch.zeros(2, 4, 10)                 # 2 layers, 4 heads (2 cache heads), 10 keys
    probs[:, :, 0] = 0.25
    probs[:, :, 5] = 0.75
    sets = torch.zeros(2, 2, 10, dtype=torch.bool)
    sets[0, 0, 5] = True                          # layer 0: cache head 0 keeps key 5, head 1 nothing
    sets[1, :, 0] = True                          # layer 1: both keep key 0
    mass = held_mass(probs, sets)
    # layer L's heads 0-1 read set 0 of the source, heads 2-3 set 1
    assert torch.allclose(mass, torch.tensor([[0.375, 0.375], [0.25, 0.25]]))
    one_set = held_mass(probs, sets[:, :1])      # scope "layer": every head reads the one set
    assert torch.allclose(one_set, torch.tensor([[0.75, 0.75], [0.25, 0.25]]))


def test_best_sources_are_the_earlier_layer_holding_most():
    m = torch.tensor([[1.0, 0.9, 0.5, 0.2], [0.0, 1.0, 0.7, 0.3], [0.0, 0.0, 1.0, 0.25], [0, 0, 0, 1.0]])
    assert best_sources(m) == [None, 0, 1, 1]


def test_reuse_trials_equal_a_fresh_patched_decode_and_a_whole_cache_set_costs_nothing(tiny):
    model, tok = tiny
    scored = decode_prompt(model, prose_prompt(tok, LENGTH, 0, seed=1), TOKENS)
    positions = list(range(LENGTH, LENGTH + TOKENS - 1))
    reference = next_token_logprobs(model, scored.input_ids, positions)
    for raw, cheap in ((SELECT_ALL, True), (SELECT_FEW, False)):
        config = CalibrateConfig(**DECODE, levels=(FEW_KEYS,), reuse=raw)
        rules = config.validate()
        _, trials = run_trials(model, scored, rules, config, target_kl=1.0, progress=False)
        reuse = {layer: t for (layer, level), t in trials.items() if level == 1}
        assert sorted(reuse) == [1, 2] and all(t.source is not None and t.source < layer for layer, t in reuse.items())
        assert all(t.source_seconds > 0 and 0 < t.held <= 1.0 + 1e-6 for t in reuse.values())
        if cheap:
            # the set is the whole cache: it holds all attention and reuse is exact
            assert all(t.held == pytest.approx(1.0, abs=1e-5) and t.kl < 1e-6 for t in reuse.values())
            continue
        assert all(t.held < 0.9 and t.density < 0.2 for t in reuse.values())
        for layer, t in reuse.items():
            plan = _layer_plan(model.config, config.reuse_rule(), layer, 64, "decode", reuse_from=t.source)
            sparse_infer.patch(model, plan)
            try:
                fresh = decode_logprobs(model, scored.input_ids[:LENGTH], scored.input_ids[LENGTH:])
            finally:
                sparse_infer.unpatch(model)
            assert compare(reference, fresh, positions, scored)["kl"] == pytest.approx(t.kl, rel=1e-4, abs=1e-9)
        assert max(t.kl for t in reuse.values()) > 1e-5, "reusing a few keys should cost some KL"
    assert not sparse_infer.is_patched(model)


def _reuse_trial(kl, seconds, source, source_seconds):
    return Trial(kl, 100.0, seconds, 0.1, source=source, source_seconds=source_seconds, held=0.9)


def _brute_force(dense, trials, levels, target):
    """Least seconds over every choice of selecting layers and per-layer option."""
    best = (float("inf"), None)
    n = len(dense)
    sources = sorted({t.source for (_, v), t in trials.items() if v == levels})
    for k in range(len(sources) + 1):
        for selecting in itertools.combinations(sources, k):
            select_s = {s: [t.source_seconds for (_, v), t in trials.items() if v == levels and t.source == s][0]
                        for s in selecting}
            options = []
            for layer in range(n):
                if layer in selecting:
                    options.append([(None, 0.0, select_s[layer])])
                    continue
                opts = [(None, 0.0, dense[layer])]
                for v in range(levels + 1):
                    t = trials.get((layer, v))
                    if t is not None and (v < levels or t.source in selecting):
                        opts.append((v, t.kl, t.seconds))
                options.append(opts)
            for combo in itertools.product(*options):
                if sum(o[1] for o in combo) <= target + 1e-12:
                    best = min(best, (sum(o[2] for o in combo), tuple(selecting)))
    return best


def test_allocate_with_reuse_chooses_selecting_layers_only_where_they_pay():
    dense = [1.0] * 5
    # one own level (a little faster, some KL); reuse much faster, its source costs 1.3 as selecting
    trials = {(layer, 0): Trial(4e-4, 99.0, 0.8, 0.2) for layer in range(5)}
    trials.update({(layer, 1): _reuse_trial(1e-4, 0.3, 1, 1.3) for layer in (2, 3, 4)})
    choice, selecting, kl, seconds = allocate_with_reuse(dense, trials, 1, 1e-3)
    assert selecting == [1] and choice[1] is None and [choice[i] for i in (2, 3, 4)] == [1, 1, 1]
    assert kl <= 1e-3 and seconds == pytest.approx(_brute_force(dense, trials, 1, 1e-3)[0])
    # reuse whose KL spends the target buys nothing: no selecting layer, the plain knapsack
    costly = {**trials, **{(layer, 1): _reuse_trial(2e-3, 0.3, 1, 1.3) for layer in (2, 3, 4)}}
    choice, selecting, kl, seconds = allocate_with_reuse(dense, costly, 1, 1e-3)
    plain = allocate(dense, {k: t for k, t in costly.items() if k[1] == 0}, 1, 1e-3)
    assert selecting == [] and 1 not in choice and (choice, kl, seconds) == plain
    # one reusing layer does not pay for a selecting layer that costs more than it saves
    single = {**trials, **{(layer, 1): _reuse_trial(1e-4, 0.3, layer - 1, 1.9) for layer in (2, 3, 4)}}
    assert allocate_with_reuse(dense, single, 1, 1e-3)[1] == []


@pytest.mark.parametrize("seed", range(6))
def test_allocate_with_reuse_matches_brute_force_on_random_trials(seed):
    import random
    rng = random.Random(seed)
    n = 5
    dense = [rng.uniform(0.8, 1.2) for _ in range(n)]
    trials = {(layer, 0): Trial(rng.uniform(0, 6e-4), 99.0, rng.uniform(0.6, 1.0), 0.2) for layer in range(n)}
    for layer in range(1, n):
        trials[(layer, 1)] = _reuse_trial(rng.uniform(0, 6e-4), rng.uniform(0.2, 0.6), rng.randrange(layer),
                                          rng.uniform(1.0, 1.6))
    # a source's selecting seconds are one figure (the median of its trials): make them agree
    by_source = {}
    for key, t in list(trials.items()):
        if key[1] == 1:
            t.source_seconds = by_source.setdefault(t.source, t.source_seconds)
    choice, selecting, kl, seconds = allocate_with_reuse(dense, trials, 1, 1e-3)
    assert kl <= 1e-3 + 1e-12
    for layer, c in enumerate(choice):
        if c == 1:
            assert trials[(layer, 1)].source in selecting
    # greedy over selecting layers: never worse than no reuse, and close to trying every subset
    # (over 200 such draws: equal in 197, at most 1.4% slower; the knapsack also rounds KLs up)
    assert seconds <= allocate(dense, {k: t for k, t in trials.items() if k[1] == 0}, 1, 1e-3)[2] + 1e-9
    best, _ = _brute_force(dense, trials, 1, 1e-3)
    assert best - 1e-9 <= seconds <= best * 1.02


@pytest.mark.parametrize("reuse, message", [
    ({"budget": 16}, "needs --phase decode"),
    ({"method": "quest", "budget": 16}, "--reuse.method must be layer_select"),
    ({"budget": 16, "scope": "head"}, "scope"),
    ("0.1", "must be a mapping"),
])
def test_bad_reuse_settings_are_refused(reuse, message):
    settings = dict(length=LENGTH, block_size=64, reuse=reuse)
    if "phase" not in message:
        settings.update(phase="decode", tokens=TOKENS)
    with pytest.raises(ValueError, match=message):
        CalibrateConfig(**settings).validate()


def test_cli_calibrates_reuse_and_records_each_layers_choice(tiny_dir, tmp_path):
    out = tmp_path / "reuse.yaml"
    args = ["calibrate", str(tiny_dir), "--out", str(out), "--phase", "decode", "--tokens", str(TOKENS),
            "--length", str(LENGTH), "--target-kl", "1e-3", "--level", json.dumps(FEW_KEYS),
            "--reuse", json.dumps(SELECT_FEW), "--batch", "2", "--no-progress"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    plan = load_plan(out)
    cal = plan.profile["calibration"]
    reuse = cal["reuse"]
    assert reuse["rule"] == {"method": "layer_select", **SELECT_FEW}
    # whether reuse pays is the tiny model's timing noise; build_plan's select/reuse entries are
    # tested with fixed figures below
    assert reuse["source"][0] is None and all(s is not None for s in reuse["source"][1:])
    assert "--reuse" in plan.profile["command"] and "--batch 2" in plan.profile["command"]
    assert cal["batch"] == 2
    assert "calibration at decode after 512 tokens (12 steps), batch 2" in " ".join(res.output.split())
    for layer, pick in enumerate(cal["choice"]):
        rule = plan.decode.rule(layer, 0)
        if pick == "select":
            assert layer in reuse["selecting"] and rule.kind == "layer_select"
        elif pick == "reuse":
            assert rule.kind == "layer_reuse" and rule.params["from_layer"] == reuse["source"][layer]
            assert rule.params["from_layer"] in reuse["selecting"]
        else:
            assert rule.kind == "dense" if pick == 0 else rule.to_yaml("method") == cal["levels"][pick - 1]
    # the reuse figures are kept for every layer that had a trial
    assert len(reuse["kl"]) == len(cal["choice"]) and reuse["kl"][0] is None


@pytest.mark.parametrize("covers_cache", [True, False])
def test_a_reuse_plan_as_built_runs_in_generate(tiny, covers_cache):
    """build_plan's select/reuse entries patch and generate: with sets covering the cache the
    tokens are dense's; with a few keys the reusing layer reads only its source's set."""
    from sparse_infer.plan import plan_from_dict
    from sparse_infer.profiler.calibrate import Calibration, build_plan

    model, tok = tiny
    config = CalibrateConfig(**DECODE, levels=(FEW_KEYS,), reuse=SELECT_ALL if covers_cache else SELECT_FEW)
    levels = config.validate()
    trials = {(0, 0): Trial(1e-4, 99.0, 0.5, 0.1), (2, 1): _reuse_trial(0.0, 0.2, 1, 1.2)}
    calibration = Calibration([1.0] * 3, trials, 1e-3, None, [None, None, 1], 0.0, 2.4, selecting=[1])
    base = plan_from_dict({"sparse_infer_plan": 1, "prefill": {"min_seq_len": 100000}})
    plan = build_plan(model.config, base, levels, calibration, config, None, "tiny")
    assert plan.profile["calibration"]["choice"] == [0, "select", "reuse"]
    assert plan.profile["calibration"]["reuse"]["select_seconds"] == {1: 1.2}
    assert plan.decode.rule(1, 0).kind == "layer_select" and plan.decode.rule(2, 0).params["from_layer"] == 1
    from sparse_infer.profiler.report import calibration_table
    assert calibration_table(plan).row_count == 3
    plan = plan_from_dict({**plan.to_dict(), "decode": {**plan.to_dict()["decode"], "min_kv_len": 1}})
    ids = torch.tensor([prose_prompt(tok, 200, 0, seed=2).input_ids])
    dense = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                           pad_token_id=0)
    sparse_infer.patch(model, plan)
    try:
        sparse_infer.reset_stats(model)
        patched = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=8, pad_token_id=0)
        stats = sparse_infer.get_stats(model)["layers"]
    finally:
        sparse_infer.unpatch(model)
    assert patched.shape == dense.shape and stats[2]["decode_calls"] == 7
    if covers_cache:
        assert torch.equal(patched, dense)
    else:
        # layer 2 read layer 1's set (sinks, window and 16 keys of ~200), not the whole cache
        assert stats[2]["decode_density"] < 0.2 and stats[1]["decode_density"] == 1.0


def test_sliding_window_layers_reuse_only_layers_of_their_own_length():
    """gemma2 alternates sliding-window and full layers: past the window their caches differ, and
    a layer can only read a set over its own keys, so the overlap pairs only layers of a kind."""
    from sparse_infer.profiler.calibrate import _DecodeTrials
    from sparse_infer.profiler.reuse import overlap

    model = tiny_model("gemma2", num_hidden_layers=4)
    tok = char_tokenizer()
    config = CalibrateConfig(**DECODE, levels=(FEW_KEYS,), reuse=SELECT_FEW)
    config.validate()
    scored = decode_prompt(model, prose_prompt(tok, LENGTH, 0, seed=1), TOKENS)
    trials = _DecodeTrials(model, scored, config)
    matrix = overlap(model, trials.prefilled, trials.continuation, config.reuse_rule())
    kinds = [getattr(model.config, "layer_types", None) or [None] * 4][0]
    assert len(set(kinds)) == 2, kinds
    for s_, l_ in itertools.product(range(4), range(4)):
        assert matrix[s_, l_].isnan() == (kinds[s_] != kinds[l_])
    sources = best_sources(matrix)
    assert sources[1] is None or kinds[sources[1]] == kinds[1]
    for layer, src in enumerate(sources[1:], 1):
        if src is not None:
            assert src < layer and kinds[src] == kinds[layer]
    _, done = run_trials(model, scored, [parse_rule(FEW_KEYS, "l", "decode")], config, target_kl=1.0, progress=False)
    reused = {layer for (layer, level) in done if level == 1}
    assert reused == {layer for layer, src in enumerate(sources) if src is not None}
    assert all(done[(layer, 1)].density < 0.5 for layer in reused), "each reused a set, none ran dense"


def test_decode_trials_at_a_batch_time_the_batch_and_keep_one_rows_kl(tiny):
    """--batch B decodes B copies of the prompt: the trials' KL, density and reuse sources are
    those of one row, the seconds those of the batch."""
    model, tok = tiny
    scored = decode_prompt(model, prose_prompt(tok, LENGTH, 0, seed=1), TOKENS)
    results = {}
    for batch in (1, 3):
        config = CalibrateConfig(**DECODE, levels=(FEW_KEYS,), reuse=SELECT_FEW, batch=batch)
        rules = config.validate()
        results[batch] = run_trials(model, scored, rules, config, target_kl=1.0, progress=False)[1]
    one, three = results[1], results[3]
    assert set(one) == set(three)
    for key, t in one.items():
        assert three[key].kl == pytest.approx(t.kl, rel=1e-3, abs=1e-8)
        assert three[key].density == pytest.approx(t.density)
        assert three[key].source == t.source and three[key].held == pytest.approx(t.held, abs=1e-5)
    assert "--batch 3" in CalibrateConfig(**DECODE, batch=3).command("tiny", "out.yaml")


@pytest.mark.parametrize("settings, message", [
    (dict(length=LENGTH, block_size=64, phase="decode", batch=0), "--batch must be a positive integer"),
    (dict(length=LENGTH, block_size=64, batch=2), "--batch .* needs --phase decode"),
])
def test_bad_batch_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        CalibrateConfig(**settings).validate()
