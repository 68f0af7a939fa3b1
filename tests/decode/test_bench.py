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
    from sparse_infer.bench.attention import bench_decode_methods

    methods = ("token_select", "token_select_reuse", "double_sparsity", "quest", "streaming")
    rows = bench_decode_methods(kv_lens=(512,), budget=64, heads=(4, 2), head_dim=16, methods=methods, repeats=1)
    assert [r["method"] for r in rows] == list(methods)
    for r in rows:
        assert r["kv_len"] == 512 and r["dense_ms"] > 0 and r["sparse_ms"] > 0 and r["bytes_read"] > 0
        if r["method"] in ("quest", "double_sparsity", "streaming"):
            assert r["bytes_read"] < r["dense_bytes"]
    assert rows[1]["reuse_rate"] is not None and rows[2]["reuse_rate"] is None


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
