"""End-to-end prefill benchmark harness on a tiny model: prompt of the exact length, dense row
first, and the sparse rows report the density the patched model actually computed."""
from sparse_infer.bench.prefill import bench_prefill_end_to_end, synthetic_prompt_ids
from sparse_infer.plan import preset


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


def test_named_plans_build_sparse_presets_and_pass_other_names(tiny_llama):
    from sparse_infer.bench.prefill import named_plans

    plans = named_plans(["a_shape", "block", "vertical_slash", "dense", "smollm2-135m"], tiny_llama.config)
    for name in ("a_shape", "block", "vertical_slash"):
        assert plans[name].prefill.min_len == 0                  # every benchmarked length runs sparse
        assert plans[name].prefill.default.kind == name
    assert plans["dense"] == "dense" and plans["smollm2-135m"] == "smollm2-135m"
