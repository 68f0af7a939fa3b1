"""End-to-end prefill benchmark harness on a tiny model: prompt of the exact length, dense row
first, and the sparse rows report the density the patched model actually computed."""
import pytest

from sparse_infer.bench.prefill import bench_prefill_end_to_end, synthetic_prompt_ids
from sparse_infer.presets import preset


def test_prompt_has_exact_length_and_no_short_period(tokenizer):
    ids = synthetic_prompt_ids(tokenizer, 1500)[0]
    assert ids.shape == (1500,)
    assert not all(ids[i] == ids[i + 256] for i in range(200))   # not a repeated passage
    assert synthetic_prompt_ids(tokenizer, 1500).equal(ids[None])


def test_bench_rows(tiny_llama, tokenizer):
    plan = preset("a_shape", tiny_llama.config, min_seq_len=0)
    plan.prefill.default.params.update(sink=64, local=128)
    rows = bench_prefill_end_to_end(tiny_llama, tokenizer, [1024], {"a_shape": plan})
    assert [r["plan"] for r in rows] == ["dense", "a_shape"]
    assert rows[0]["ratio"] == 1.0 and rows[0]["density"] == 1.0
    # the preset keeps layer 0 of 2 dense: the whole-model density is (1 + layer 1's) / 2
    assert (1 + 0.05) / 2 < rows[1]["density"] < (1 + 0.6) / 2 and rows[1]["seconds"] > 0
    assert tiny_llama.config._attn_implementation == "sdpa"        # left unpatched
    # fidelity against dense from the same run: a sparse layer moves the distributions
    assert rows[0]["kl"] == 0.0 and rows[0]["top1"] == 100.0
    assert rows[1]["kl"] > 1e-5 and 0.0 <= rows[1]["top1"] <= 100.0


def test_full_budget_plan_scores_dense_fidelity(tiny_llama, tokenizer):
    plan = preset("block", tiny_llama.config, min_seq_len=0)
    plan.prefill.default.params.update(coverage=1.0, top_k=None)
    rows = bench_prefill_end_to_end(tiny_llama, tokenizer, [600], {"all": plan}, window=64)
    assert rows[1]["density"] == 1.0
    # heads run through another dense call than the unpatched model's: fp32 rounding only
    assert rows[1]["kl"] < 1e-6 and rows[1]["top1"] == 100.0


def test_detail_splits_each_layers_attention_time(tiny_llama, tokenizer):
    plan = preset("a_shape", tiny_llama.config, min_seq_len=0)
    plan.prefill.default.params.update(sink=64, local=128)
    rows = bench_prefill_end_to_end(tiny_llama, tokenizer, [1024], {"a_shape": plan}, detail=True)
    dense, sparse = rows
    assert sorted(dense["layers"]) == sorted(sparse["layers"]) == [0, 1]
    # the all-dense plan: every layer's time is dense time
    for t in dense["layers"].values():
        assert t["dense"] > 0 and t["estimate"] == 0 and t["sparse"] == 0 and t["density"] == 1.0
    # the preset keeps layer 0 dense; layer 1 builds an index and runs the executor
    assert sparse["layers"][0]["dense"] > 0 and sparse["layers"][0]["sparse"] == 0
    layer1 = sparse["layers"][1]
    assert layer1["estimate"] > 0 and layer1["sparse"] > 0 and layer1["density"] < 0.6
    assert layer1["attention"] == pytest.approx(layer1["estimate"] + layer1["sparse"] + layer1["dense"])
    for row in rows:
        # the dense row's breakdown comes from its own forwards, not the timed unpatched one
        assert 0 < row["other_s"] < row["forward_s"]
    # timing is switched off with the patch: a later patch of the same model records no seconds
    import sparse_infer
    sparse_infer.patch(tiny_llama, plan)
    try:
        assert all("prefill_seconds" not in layer for layer in sparse_infer.get_stats(tiny_llama)["layers"].values())
    finally:
        sparse_infer.unpatch(tiny_llama)


def test_named_plans_build_sparse_presets_and_pass_other_names(tiny_llama):
    from sparse_infer.bench.prefill import named_plans

    plans = named_plans(["a_shape", "block", "vertical_slash", "dense", "smollm2-135m"], tiny_llama.config)
    for name in ("a_shape", "block", "vertical_slash"):
        assert plans[name].prefill.min_len == 0                  # every benchmarked length runs sparse
        assert plans[name].prefill.default.kind == name
    assert plans["dense"] == "dense" and plans["smollm2-135m"] == "smollm2-135m"


def test_cli_prints_fidelity_and_the_layer_detail(tiny_llama, tokenizer, monkeypatch):
    from typer.testing import CliRunner

    import sparse_infer
    from sparse_infer.bench import attention
    from sparse_infer.cli import app

    monkeypatch.setattr(attention, "bench_prefill_attention", lambda **k: [])
    monkeypatch.setattr(sparse_infer, "load_model", lambda *a, **k: (tiny_llama, tokenizer))
    res = CliRunner().invoke(app, ["bench", "prefill", "--model", "tiny", "--model-lengths", "600",
                                   "--plans", "a_shape", "--detail"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "kl" in res.output and "top1" in res.output
    assert "per layer at n=600" in res.output and "rest of the model" in res.output
