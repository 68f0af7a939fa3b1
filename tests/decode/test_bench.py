"""The end-to-end decode bench runs on a tiny model and reports one row per plan, dense first."""
import pytest

from sparse_infer.bench.decode import bench_decode_end_to_end
from tests.conftest import tiny_model


@pytest.mark.parametrize("cache", ["dynamic", "append"])
def test_bench_decode_end_to_end_rows(cache):
    plans = {
        "token_select": {"sparse_infer_plan": 1,
                         "decode": {"min_kv_len": 0, "default": {"method": "token_select", "budget": 100000}}},
        "quest": {"sparse_infer_plan": 1, "decode": {"min_kv_len": 0, "default": {"method": "quest", "budget": 32, "sink": 4, "local": 8}}},
    }
    result = bench_decode_end_to_end(tiny_model("llama"), prompt_len=96, new_tokens=4, plans=plans, cache=cache,
                                     rounds=2)
    rows = result["rows"]
    assert result["rounds"] == 2 and all(len(r["tokens_per_s_rounds"]) == 2 for r in rows)
    assert all(r["cache"] == cache for r in rows)
    assert [r["plan"] for r in rows] == ["dense", "token_select", "quest"]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert rows[0]["speedup"] == 1.0
    assert rows[1]["same_tokens"] == 1.0 and rows[1]["decode_density"] == pytest.approx(1.0)
    assert rows[2]["decode_density"] < 0.9 and rows[2]["state_bytes"] > 0


def test_bench_decode_methods_smoke():
    from sparse_infer.bench.attention import bench_cases, bench_decode_methods

    rows = bench_decode_methods(kv_lens=(512,), budget=64, heads=(4, 2), head_dim=16, repeats=1)
    # every registered selector's cases, in registration order
    assert [r["method"] for r in rows] == list(bench_cases(64)) == [
        "streaming", "token_select", "token_select_int8", "token_select_reuse", "double_sparsity", "quest",
        "layer_select"]
    by = {r["method"]: r for r in rows}
    for r in rows:
        assert r["kv_len"] == 512 and r["dense_ms"] > 0 and r["sparse_ms"] > 0 and r["bytes_read"] > 0
        if r["method"] in ("quest", "double_sparsity", "streaming"):
            assert r["bytes_read"] < r["dense_bytes"]
    assert by["layer_select"]["bytes_read"] == by["layer_select"]["dense_bytes"]   # it reads everything
    assert by["token_select_reuse"]["reuse_rate"] is not None and by["double_sparsity"]["reuse_rate"] is None
    assert by["token_select_reuse"]["note"] == "reuse=0.9, q drift 0.3" and by["token_select"]["note"] == ""
    # the one timed step sees 513 keys: token_select (which scored) read V of its 16 + 64 + 64 rows
    # per kv head and all of K; streaming K and V of its 8 + 56 rows (fp32, head_dim 16, 2 kv heads)
    assert by["token_select"]["selected"] == 144.0
    assert by["token_select"]["bytes_read"] == (2 * 144) * 16 * 4 + 2 * 513 * 16 * 4
    assert by["streaming"]["selected"] == 64.0 and by["streaming"]["bytes_read"] == 2 * (2 * 64) * 16 * 4
    # int8 scoring: K and V of the chosen rows, and every key's 16 codes and 4-byte scale
    assert by["token_select_int8"]["selected"] == 144.0 and by["token_select_int8"]["note"].startswith("scoring=int8")
    assert by["token_select_int8"]["bytes_read"] == 2 * (2 * 144) * 16 * 4 + 2 * 513 * (16 + 4)
    with pytest.raises(ValueError, match="unknown decode bench case.*no_such.*registered: streaming"):
        bench_decode_methods(kv_lens=(512,), budget=64, heads=(4, 2), head_dim=16, methods=("no_such",))


def test_every_budgeted_selector_has_a_bench_case_whose_plan_validates():
    from sparse_infer.bench.attention import _case_plan, bench_cases
    from sparse_infer.methods import DECODE_SELECTORS
    from sparse_infer.plan import plan_from_dict

    cases = bench_cases(2048)
    named = {name for name, _ in cases.values()}
    assert {m for m, s in DECODE_SELECTORS.items() if "budget" in s.params} <= named
    for label, (name, case) in cases.items():
        rule = plan_from_dict(_case_plan(name, case.params)).decode.default
        assert rule.kind == name and case.label == label
    streaming = plan_from_dict(_case_plan("streaming", cases["streaming"][1].params)).decode.default
    assert (streaming.sink, streaming.local) == (128, 1920)               # sink + window = the budget
    assert cases["token_select_reuse"][1].params == {"budget": 2048, "reuse": 0.9}


def test_bytes_read_models_match_a_hand_computation():
    """Two cache heads, 1000 keys of head_dim 64 in bf16, 300 selected rows per head."""
    from sparse_infer.methods import DECODE_SELECTORS
    from sparse_infer.profiler.search import make_rule

    def bytes_read(method, counters=None, **params):
        return DECODE_SELECTORS[method].bytes_read(make_rule(method, params, "decode"), 1000, 2 * 300,
                                                   cache_heads=2, head_dim=64, elem_size=2, counters=counters or {})

    rows_kv = 2 * 300 * 64 * 2          # K (or V) of the selected rows: 76800 bytes
    all_k = 2 * 1000 * 64 * 2           # all of K: 256000 bytes
    assert bytes_read("token_select", {"full_scorings": 2, "reuses": 0}, budget=256) == rows_kv + all_k
    assert bytes_read("token_select", {"full_scorings": 0, "reuses": 2}, budget=256, reuse=0.9) == rows_kv
    assert bytes_read("double_sparsity", channels=16, budget=256) == 2 * rows_kv + all_k / 4   # 16 of 64 channels
    assert bytes_read("double_sparsity", channels=[1, 5, 9], budget=256) == 2 * rows_kv + all_k * 3 / 64
    assert bytes_read("double_sparsity", channels=128, budget=256) == 2 * rows_kv + all_k   # at most all channels
    # quest: min and max keys of ceil(1000 / 16) = 63 pages per head
    assert bytes_read("quest", budget=256) == 2 * rows_kv + 2 * 2 * 63 * 64 * 2
    assert bytes_read("quest", budget=256, page=32) == 2 * rows_kv + 2 * 2 * 32 * 64 * 2
    assert bytes_read("streaming", sink=16, local=284) == 2 * rows_kv


def test_bench_decode_end_to_end_rejects_unknown_cache():
    with pytest.raises(ValueError, match="cache must be"):
        bench_decode_end_to_end(tiny_model("llama"), prompt_len=16, new_tokens=2, plans={}, cache="static")
    with pytest.raises(ValueError, match="rounds"):
        bench_decode_end_to_end(tiny_model("llama"), prompt_len=16, new_tokens=2, plans={}, rounds=0)


@pytest.mark.parametrize("method", ["quest", "double_sparsity", "token_select", "streaming"])
def test_decode_method_plan_validates_and_keeps_layer_0_dense(method):
    from sparse_infer.bench.decode import decode_method_plan
    from sparse_infer.runtime import group_heads
    from sparse_infer.plan import load_plan

    plan = load_plan(decode_method_plan(method, 512))
    assert plan.decode.min_len == 0
    assert [rule.kind for rule, _ in group_heads(plan.decode, 0, 4)] == ["dense"]
    (rule, heads), = group_heads(plan.decode, 1, 4)
    assert rule.kind == method and heads == [0, 1, 2, 3]
    if method != "streaming":
        assert rule.budget.resolve(100000) == 512


@pytest.fixture
def fake_benches(monkeypatch):
    """The micro-benchmarks replaced by canned rows, recording that they ran."""
    from sparse_infer.bench import attention

    ran = []
    prefill_row = {"n": 256, "pattern": "a_shape", "density": 0.5, "backend": "torch", "dense_ms": 1.0,
                   "sparse_ms": 0.5, "ratio": 2.0}
    decode_row = {"kv_len": 512, "budget": 64, "dense_ms": 1.0, "sparse_ms": 0.5, "ratio": 2.0}
    monkeypatch.setattr(attention, "bench_prefill_attention", lambda **k: ran.append("prefill") or [prefill_row])
    monkeypatch.setattr(attention, "bench_decode_attention", lambda **k: ran.append("decode") or [decode_row])
    monkeypatch.setattr(attention, "bench_decode_methods", lambda **k: ran.append("methods") or [])
    return ran


@pytest.mark.parametrize("command", ["prefill", "decode"])
def test_bench_json_is_checked_before_any_benchmark(tmp_path, fake_benches, command):
    """An unwritable or existing --json is refused before minutes of timing; a good one is written."""
    import json

    from typer.testing import CliRunner

    from sparse_infer.cli import app

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    res = CliRunner().invoke(app, ["bench", command, "--json", str(blocker / "rows.json")])
    assert res.exit_code == 2 and "--json" in res.output and fake_benches == []
    res = CliRunner().invoke(app, ["bench", command, "--json", str(blocker)])
    assert res.exit_code == 2 and "exists" in res.output and blocker.read_text() == "x" and fake_benches == []
    target = tmp_path / "new" / "rows.json"
    res = CliRunner().invoke(app, ["bench", command, "--json", str(target)])
    assert res.exit_code == 0, res.output
    assert json.loads(target.read_text())["attention"][0]["ratio"] == 2.0
    assert sorted(p.name for p in target.parent.iterdir()) == ["rows.json"]        # no temporary file left


def test_bench_prefill_refuses_a_plan_it_cannot_find_before_timing(fake_benches, monkeypatch):
    from typer.testing import CliRunner

    import sparse_infer
    from sparse_infer.cli import app

    monkeypatch.setattr(sparse_infer, "load_model", lambda *a, **k: pytest.fail("model loaded"), raising=False)
    res = CliRunner().invoke(app, ["bench", "prefill", "--model", "tiny", "--plans", "a_shape,no/such.yaml"])
    assert res.exit_code == 2 and "plan file not found" in res.output and fake_benches == []


def test_bench_decode_steps_rows():
    from sparse_infer.bench.decode import bench_decode_steps

    model = tiny_model("llama")
    ts = {"sparse_infer_plan": 1, "decode": {"min_kv_len": 0, "default": {"method": "token_select", "budget": 24}}}
    quest = {"sparse_infer_plan": 1, "decode": {"min_kv_len": 0, "default": {"method": "quest", "budget": 32}}}
    rows = bench_decode_steps(model, [200], [1, 2], {"token_select": ts, "quest": quest}, warmup=1, timed=2)
    assert [(r["batch"], r["plan"]) for r in rows] == [
        (b, p) for b in (1, 2) for p in ("dense", "no attention (bound)", "token_select", "quest")]
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    for r in rows:
        cache_bytes = 2 * config.num_hidden_layers * r["batch"] * config.num_key_value_heads * 200 * head_dim * 4
        assert r["step_ms"] > 0 and 0 <= r["attention_share"] <= 1
        assert r["kv_bytes"] == pytest.approx(r["decode_density"] * cache_bytes)
        if r["plan"] == "dense":
            assert r["ratio"] == 1.0 and r["decode_density"] == 1.0
    by_plan = {r["plan"]: r for r in rows if r["batch"] == 2}
    # a token budget of 24 of ~200 rows (+ sink and local): well under the whole cache
    assert 0 < by_plan["token_select"]["decode_density"] < 0.6
    assert by_plan["token_select"]["select_ms"] + by_plan["token_select"]["select_attend_ms"] > 0
    assert 0 < by_plan["quest"]["decode_density"] < 0.6
    assert by_plan["quest"]["select_ms"] + by_plan["quest"]["select_attend_ms"] > 0
    assert model.config._attn_implementation == "sdpa"      # the bound's zero attention is undone


def test_bench_decode_cli_step_table(fake_benches, monkeypatch):
    from typer.testing import CliRunner

    import sparse_infer
    from sparse_infer.cli import app

    res = CliRunner().invoke(app, ["bench", "decode", "--plans", "quest"])
    assert res.exit_code == 2 and "--plans needs --model" in res.output and fake_benches == []
    monkeypatch.setattr(sparse_infer, "load_model", lambda *a, **k: (tiny_model("llama"), None))
    res = CliRunner().invoke(app, ["bench", "decode", "--model", "tiny", "--kv-lens", "160", "--batch", "1,2",
                                   "--budget", "32", "--plans", "quest,token_select"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "decode step, tiny" in res.output and "no attention (bound)" in res.output
    assert res.output.count("token_select") >= 2          # one row per batch size


def test_bench_decode_steps_with_padding_takes_the_c_call_where_it_can():
    """--padding left-pads the odd rows of a batch under a mask: token_select still selects and
    attends in the C call (per-row starts), and so does Quest."""
    from sparse_infer.bench.decode import bench_decode_steps, padding_mask
    from sparse_infer.kernels import cpu_kernel_available

    assert padding_mask(1, 10, 3) is None and padding_mask(2, 10, 0) is None
    assert padding_mask(3, 5, 2).tolist() == [[1] * 5, [0, 0, 1, 1, 1], [1] * 5]
    with pytest.raises(ValueError, match="shorter than the cache"):
        padding_mask(2, 5, 5)
    model = tiny_model("llama")
    ts = {"sparse_infer_plan": 1, "decode": {"min_kv_len": 0, "default": {"method": "token_select", "budget": 24}}}
    quest = {"sparse_infer_plan": 1, "decode": {"min_kv_len": 0, "default": {"method": "quest", "budget": 32}}}
    rows = bench_decode_steps(model, [200], [2], {"token_select": ts, "quest": quest}, warmup=1, timed=2, padding=50)
    by_plan = {r["plan"]: r for r in rows}
    assert all(r["padding"] == 50 for r in rows)
    if cpu_kernel_available():
        assert by_plan["token_select"]["select_attend_ms"] > 0 and by_plan["token_select"]["select_ms"] == 0
        assert by_plan["quest"]["select_attend_ms"] > 0 and by_plan["quest"]["select_ms"] == 0
    assert 0 < by_plan["token_select"]["decode_density"] < 0.6
