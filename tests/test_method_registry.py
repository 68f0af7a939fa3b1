"""Adding a method is one class in one file: a toy decode selector ("last_k": the last `budget`
valid tokens), a toy prefill pattern ("recent_blocks": the last `blocks` kv blocks of every
query block) and a toy separable one ("recent_and_first": those blocks plus the first `cols`
keys as columns) are defined here, registered for the test and unregistered afterwards. The plan
schema, both dispatchers, the profiler search, the report and the decode benchmark then handle
them with no other edit."""
from __future__ import annotations

import ast
import contextlib
import inspect
from dataclasses import dataclass

import pytest
import torch

import sparse_infer
from sparse_infer.decode.common import forced_and_eligible
from sparse_infer.methods import (
    DECODE_SELECTORS, PREFILL_PATTERNS, DecodeSelector, Param, PrefillPattern, SideState, curve_at, fixed_size_ok,
    pow2_grid, register, unregister,
)
from sparse_infer.params import positive_int
from sparse_infer.plan import PlanError, load_plan
from sparse_infer.prefill.common import Geometry, block_mask_to_index, index_heads
from sparse_infer.runtime import runtime_for
from tests.conftest import tiny_model


# --------------------------------------------------------------------------- the toy methods
@dataclass
class LastKState(SideState):
    kept_across_sequences = ("steps",)
    steps: int = 0          # decode steps this part selected for (kept across sequences, like counters)


class LastK(DecodeSelector):
    """The last `budget` valid tokens of the cache."""

    name = "last_k"
    label = "last"
    params = {"budget": Param(positive_int)}
    State = LastKState

    def select(self, inp, rule, state):
        state.steps += 1
        forced, _ = forced_and_eligible(inp, 0, rule.budget)
        return forced

    def expected_rows(self, rule, n):
        return min(n, rule.budget)

    def search_grid(self, n):
        return [{"budget": b} for b in pow2_grid(16, max(n // 2, 64))]

    def search_cost(self, params, n, head_dim, channels):
        return min(1.0, params["budget"] / n)

    def search_curves(self, inputs, channels=None):
        """Mass of the b most recent visible keys, b = index + 1."""
        probs, span = inputs.probs, min(inputs.size, inputs.n)
        behind = inputs.pos[:, None] - torch.arange(span)[None, :]          # (dq, span): b-th newest key
        newest = probs.gather(-1, behind.clamp(min=0).expand(*probs.shape[:2], span))
        window = torch.where(behind >= 0, newest, 0.0)
        return {("last_k",): inputs.extend(window.cumsum(-1).mean(1), inputs.size)}

    def search_recall(self, curves, params, n):
        return curve_at(curves["last_k"], params["budget"])

    def search_combine(self, points, channel_list):
        if not fixed_size_ok({L: p["budget"] for L, p in points.items()}):
            return None
        return {"budget": max(p["budget"] for p in points.values())}


class RecentBlocks(PrefillPattern):
    """Each query block sees its last `blocks` causal kv blocks (its diagonal included)."""

    name = "recent_blocks"
    label = "recent"
    params = {"blocks": Param(positive_int, 2)}

    def build_index(self, query, key, rule, *, block_size, granularity="group", **_):
        geo = Geometry(query.shape[2], key.shape[2], block_size)
        diag = torch.arange(geo.first, geo.first + geo.nqb, device=key.device)
        kb = torch.arange(geo.nkb, device=key.device)
        keep = geo.causal_blocks(key.device) & (kb[None, :] > diag[:, None] - rule.blocks)
        heads = index_heads(query, key, granularity)
        return block_mask_to_index(keep.expand(key.shape[0], heads, -1, -1), block_size)

    def search_grid(self, n, block_size):
        return [{"blocks": b} for b in pow2_grid(1, max(n // block_size, 1))]

    def search_combine(self, points, longest, block_size):
        params = {"blocks": max(p["blocks"] for p in points.values())}
        return params, params


class RecentAndFirst(PrefillPattern):
    """The last `blocks` causal kv blocks of every query block plus the first `cols` keys as
    columns: blocks depend only on `blocks`, columns only on `cols`, so the profiler measures
    its grid separably. Counts its builds and search sessions."""

    name = "recent_and_first"
    label = "r+f"
    params = {"blocks": Param(positive_int), "cols": Param(positive_int)}
    search_evaluation = "separable"
    search_separable = ("blocks", "cols")
    builds: list = []
    sessions: list = []

    def build_index(self, query, key, rule, *, block_size, granularity="group", **kwargs):
        self.builds.append(dict(rule.params))
        index = RecentBlocks().build_index(query, key, rule, block_size=block_size, granularity=granularity)
        heads = index.kv_blocks.shape[1]
        cols = torch.arange(min(rule.cols, key.shape[2]), device=key.device)
        index.columns = cols.expand(key.shape[0], heads, -1).contiguous()
        return index

    @contextlib.contextmanager
    def search_session(self):
        self.sessions.append("open")
        yield
        self.sessions.append("closed")

    def search_grid(self, n, block_size):
        return [{"blocks": b, "cols": c} for b in (1, 2, 4) for c in (8, 32, 64)]


@pytest.fixture
def toys():
    register(LastK)
    register(RecentBlocks)
    try:
        yield
    finally:
        unregister("decode", "last_k")
        unregister("prefill", "recent_blocks")


@pytest.fixture
def separable_toy():
    register(RecentAndFirst)
    RecentAndFirst.builds.clear()
    RecentAndFirst.sessions.clear()
    try:
        yield
    finally:
        unregister("prefill", "recent_and_first")


def _plan(decode=None, prefill=None, **extra):
    raw = {"sparse_infer_plan": 1,
           "prefill": {"min_seq_len": 0, "block_size": 16, "default": prefill or {"pattern": "dense"}},
           "decode": {"min_kv_len": 0, "default": decode or {"method": "dense"}, **extra}}
    return raw


# --------------------------------------------------------------------------- plan schema
def test_registration_is_undone():
    assert "last_k" not in DECODE_SELECTORS and "recent_blocks" not in PREFILL_PATTERNS
    with pytest.raises(PlanError, match="unknown method 'last_k'"):
        load_plan(_plan({"method": "last_k", "budget": 8}))


def test_plan_schema_takes_the_toy_methods(toys):
    plan = load_plan(_plan({"method": "last_k", "budget": 8}, {"pattern": "recent_blocks"}))
    assert plan.decode.default.kind == "last_k" and plan.decode.default.budget == 8
    assert plan.prefill.default.params == {"blocks": 2}            # the declared default
    with pytest.raises(PlanError) as err:
        load_plan(_plan({"method": "dense"}, layers={3: {1: {"method": "last_k", "budget": -1}}}))
    assert str(err.value).startswith("decode.layers.3.1.budget: must be a positive integer")
    with pytest.raises(PlanError, match=r"^decode.default.budget: missing; method 'last_k' requires it"):
        load_plan(_plan({"method": "last_k"}))
    with pytest.raises(PlanError, match=r"^prefill.default.window: unknown key for pattern 'recent_blocks'; "
                                        r"allowed: blocks"):
        load_plan(_plan(prefill={"pattern": "recent_blocks", "window": 3}))
    with pytest.raises(PlanError, match="expected one of dense, streaming, token_select, double_sparsity, quest, "
                                        "layer_select, layer_reuse, last_k"):
        load_plan(_plan({"method": "first_k"}))


# --------------------------------------------------------------------------- dispatch inside generate
def _generate(model, ids, new=5):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, output_scores=True,
                              return_dict_in_generate=True)


def test_toy_selector_runs_in_generate_and_full_budget_equals_dense(toys):
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 60), generator=torch.Generator().manual_seed(0))
    dense = _generate(model, ids)
    sparse_infer.patch(model, _plan({"method": "last_k", "budget": 4096}))
    try:
        full = _generate(model, ids)
        runtimes = [runtime_for(m) for m in model.modules() if runtime_for(m) is not None]
        states = [rt.decode_state.groups[0] for rt in runtimes]
        assert all(isinstance(s, LastKState) and s.steps == 4 for s in states)   # steps after the prefill
        assert sparse_infer.get_stats(model)["decode_density"] == 1.0
    finally:
        sparse_infer.unpatch(model)
    assert torch.equal(full.sequences, dense.sequences)
    for x, y in zip(full.scores, dense.scores):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    sparse_infer.patch(model, _plan({"method": "last_k", "budget": 8}))
    try:
        _generate(model, ids)
        density = sparse_infer.get_stats(model)["decode_density"]
    finally:
        sparse_infer.unpatch(model)
    assert density < 0.2                                   # 8 of ~62 keys


def test_toy_pattern_runs_in_prefill_and_full_budget_equals_dense(toys):
    model = tiny_model("qwen2")
    ids = torch.randint(3, 128, (1, 70), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(ids).logits
        sparse_infer.patch(model, _plan(prefill={"pattern": "recent_blocks", "blocks": 64}), dense_above=1.0)
        try:
            full = model(ids).logits
            assert sparse_infer.get_stats(model)["layers"][0]["sparse_prefill_calls"] == 1
        finally:
            sparse_infer.unpatch(model)
        sparse_infer.patch(model, _plan(prefill={"pattern": "recent_blocks", "blocks": 1}), dense_above=1.0)
        try:
            model(ids)
            density = sparse_infer.get_stats(model)["prefill_density"]
        finally:
            sparse_infer.unpatch(model)
    torch.testing.assert_close(full, dense, atol=1e-5, rtol=1e-5)
    assert density < 0.5


# --------------------------------------------------------------------------- profiler and report
def _flat_curves(heads: int, length: int) -> dict:
    from sparse_infer.decode.quest import QUEST_PAGE
    from sparse_infer.decode.streaming import STREAMING_SINKS

    half = length // 2
    ones = torch.ones(heads, half, dtype=torch.float64)
    return {"token_select": ones, "token_select_int8": ones, "quest": ones[:, : half // QUEST_PAGE],
            "streaming": {s: ones for s in STREAMING_SINKS}, "last_k": ones}


def test_search_and_report_list_the_toy_methods(toys):
    from sparse_infer.profiler.report import decode_rule_density, plan_table, short_labels
    from sparse_infer.profiler.search import (
        SearchSettings, choose_decode, decode_candidates, decode_grid, make_rule, prefill_grid,
    )

    assert "last_k" in decode_candidates() and decode_grid(1024)["last_k"][0] == {"budget": 16}
    assert prefill_grid(1024, 64)["recent_blocks"][-1] == {"blocks": 16}
    # every head keeps all its attention in every candidate: the cheapest one wins, the toy's 16 tokens
    curves = {L: _flat_curves(2, L) for L in (1024, 2048)}
    choice = choose_decode(curves, [0, 1], 64, SearchSettings(), None)
    assert (choice.pattern, choice.params) == ("last_k", {"budget": 16})
    assert choice.rule("decode").key() == make_rule("last_k", {"budget": 16}, "decode").key()

    # its curve comes from its own hook: attention on the 3 newest keys is all kept from budget 3 on
    from sparse_infer.profiler.decode import CurveInputs, curve_entries

    n, dq = 100, 4
    probs = torch.zeros(2, dq, n)
    pos = torch.arange(n - dq, n)
    for i, p in enumerate(pos.tolist()):
        probs[:, i, p - 2: p + 1] = 1 / 3
    entries = curve_entries(CurveInputs(probs, pos, torch.randn(2, dq, 8), torch.randn(1, n, 8), scaling=1.0))
    assert {("token_select",), ("quest",), ("last_k",)} <= set(entries)
    torch.testing.assert_close(entries[("last_k",)][:, :4], torch.tensor([[1 / 3, 2 / 3, 1.0, 1.0]] * 2))

    assert short_labels()["last_k"] == "last" and short_labels()["recent_blocks"] == "recent"
    assert decode_rule_density(make_rule("last_k", {"budget": 64}, "decode"), 256) == 0.25
    plan = load_plan({**_plan({"method": "last_k", "budget": 64}, {"pattern": "recent_blocks"}),
                      "model": {"num_hidden_layers": 1, "num_attention_heads": 2}})
    table = plan_table(plan, [256])
    cells = [list(column.cells) for column in table.columns]
    assert cells[1][0] == "recent:2" and cells[3][0] == "last:2"
    assert cells[4][0] == "0.250"


def test_a_separable_toy_pattern_is_measured_from_one_build_per_budget(separable_toy):
    """3 x 3 grid points from 3 + 3 builds per granularity, each entry what the builder's own index
    gives, all inside the pattern's search session."""
    from sparse_infer.prefill import build_index
    from sparse_infer.profiler.search import evaluate_prefill_run, make_rule, measure_rules, params_key
    from sparse_infer.profiler.stats import attention_stats, index_head_density, index_recall, index_tail_recall

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(4, 256, 16, generator=g), torch.randn(2, 256, 16, generator=g)
    st = attention_stats(q, k, scaling=0.25, block_size=32)
    table = evaluate_prefill_run(q, k, st, scaling=0.25, granularities=("head", "group"))
    assert len(RecentAndFirst.builds) == 2 * (3 + 3)
    assert RecentAndFirst.sessions == ["open", "closed"]
    assert {b["blocks"] for b in RecentAndFirst.builds} == {1, 2, 4}
    RecentAndFirst.builds.clear()
    for gran in ("head", "group"):
        for params in RecentAndFirst().search_grid(256, 32):
            index = build_index(make_rule("recent_and_first", params), q[None], k[None], block_size=32,
                                scaling=0.25, granularity=gran)
            recall, tail, density = table[(gran, "recent_and_first", params_key(params))]
            torch.testing.assert_close(recall, index_recall(index, st), atol=1e-6, rtol=0)
            torch.testing.assert_close(tail, index_tail_recall(index, st), atol=1e-6, rtol=0)
            torch.testing.assert_close(density, index_head_density(index, 256, 4), atol=1e-6, rtol=0)
    rules = [make_rule("recent_and_first", {"blocks": 2, "cols": 8})] * 4
    measure_rules(rules, ["group"] * 4, q, k, st, scaling=0.25)
    assert RecentAndFirst.sessions == ["open", "closed"] * 2


def test_a_separable_pattern_must_name_its_params():
    class Unnamed(PrefillPattern):
        name = "unnamed"
        label = "u"
        search_evaluation = "separable"

    class Misspelt(PrefillPattern):
        name = "misspelt"
        label = "m"
        search_evaluation = "seperable"

    for cls in (Unnamed, Misspelt):
        with pytest.raises(ValueError, match=cls.name):
            register(cls)
        assert cls.name not in PREFILL_PATTERNS


def test_generic_modules_name_no_method():
    """The profiler search, the report, the profiler's layer analysis and decode curves, the
    decode benchmarks and the dispatchers loop over the registry: no registered method's name
    appears in them as a string, and none imports a method's own file."""
    import sparse_infer.bench.attention
    import sparse_infer.bench.decode
    import sparse_infer.decode.dispatch
    import sparse_infer.prefill.dispatch
    import sparse_infer.profiler.decode
    import sparse_infer.profiler.layer
    import sparse_infer.profiler.report
    import sparse_infer.profiler.search

    names = set(PREFILL_PATTERNS) | set(DECODE_SELECTORS)
    method_files = {type(m).__module__ for m in [*PREFILL_PATTERNS.values(), *DECODE_SELECTORS.values()]}
    # bench.attention's synthetic_index names its own stand-in shapes (an "a_shape" window, random
    # blocks) for timing the executors, not registered patterns; its decode part is checked
    modules = [sparse_infer.bench.decode, sparse_infer.decode.dispatch, sparse_infer.prefill.dispatch,
               sparse_infer.profiler.decode, sparse_infer.profiler.layer, sparse_infer.profiler.report,
               sparse_infer.profiler.search]
    sources = {m.__name__: inspect.getsource(m) for m in modules}
    bench = sparse_infer.bench.attention
    for fn in (bench.bench_cases, bench._case_plan, bench.bench_decode_methods):
        sources[f"{bench.__name__}.{fn.__name__}"] = inspect.getsource(fn)
    for where, source in sources.items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Constant):
                assert node.value not in names, f"{where}:{node.lineno} names {node.value!r}"
            if isinstance(node, ast.ImportFrom):
                assert node.module not in method_files, f"{where}:{node.lineno} imports {node.module}"
            if isinstance(node, ast.Import):
                assert not {a.name for a in node.names} & method_files, f"{where}:{node.lineno}"


def test_the_toy_selector_joins_the_decode_benchmark(toys):
    """A selector with a `budget` gets the default bench case and bytes model: K and V of its rows."""
    from sparse_infer.bench.attention import bench_cases, bench_decode_methods

    assert "last_k" in bench_cases(32)
    (row,) = bench_decode_methods(kv_lens=(256,), budget=32, heads=(4, 2), head_dim=16, methods=("last_k",),
                                  repeats=2)
    assert row["method"] == "last_k" and row["selected"] == 32.0 and row["reuse_rate"] is None
    assert row["bytes_read"] == 2 * (2 * 32) * 16 * 4          # K and V, 2 kv heads x 32 rows, fp32
