"""Decode selection through model.generate on tiny random models: full budgets equal dense,
left padding and batches work, side state never leaks between generate calls, the Double
Sparsity label cache equals a recomputation, and query-similarity reuse skips scorings."""
import copy
from types import SimpleNamespace

import pytest
import torch

import sparse_infer
from sparse_infer.decode import decode_counters, decode_state_bytes, reset_decode_state
from sparse_infer.decode.double_sparsity import labels_of
from sparse_infer.runtime import runtime_for
from sparse_infer.kernels import cpu_kernel_available
from tests.conftest import tiny_model

FULL = {
    "streaming": {"method": "streaming", "sink": 4, "local": 100000},
    "token_select": {"method": "token_select", "budget": 100000, "sink": 4, "local": 8},
    "token_select_reuse": {"method": "token_select", "budget": 100000, "reuse": 0.3},
    "token_select_int8": {"method": "token_select", "budget": 100000, "scoring": "int8"},
    "token_select_int8_reuse": {"method": "token_select", "budget": 100000, "scoring": "int8", "reuse": 0.3},
    "double_sparsity": {"method": "double_sparsity", "channels": 4, "budget": 100000},
    "quest": {"method": "quest", "page": 16, "budget": 100000},
}
SPARSE = {
    "streaming": {"method": "streaming", "sink": 4, "local": 24},
    "token_select": {"method": "token_select", "budget": 24, "sink": 4, "local": 8},
    "token_select_reuse": {"method": "token_select", "budget": 24, "sink": 4, "local": 8, "reuse": 0.5},
    "token_select_int8": {"method": "token_select", "budget": 24, "sink": 4, "local": 8, "scoring": "int8"},
    "token_select_int8_reuse": {"method": "token_select", "budget": 24, "sink": 4, "local": 8, "scoring": "int8",
                                "reuse": 0.5},
    "double_sparsity": {"method": "double_sparsity", "channels": 4, "budget": 24, "sink": 4, "local": 8},
    "quest": {"method": "quest", "page": 8, "budget": 24, "sink": 4, "local": 8},
}
NEW = 6


def plan_for(rule, mixed=True):
    layers = {1: {0: {"method": "dense"}}} if mixed else {}
    return {"sparse_infer_plan": 1, "prefill": {"min_seq_len": 100000},
            "decode": {"min_kv_len": 0, "default": copy.deepcopy(rule), "layers": layers}}


def ids_of(b, n, seed):
    return torch.randint(3, 128, (b, n), generator=torch.Generator().manual_seed(seed))


def generate(model, ids, attention_mask=None, new=NEW):
    with torch.no_grad():
        return model.generate(ids, attention_mask=attention_mask, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, output_scores=True, return_dict_in_generate=True)


def generate_patched(model, plan, ids, attention_mask=None):
    """generate under `plan`, then unpatch: (output, get_stats of that run)."""
    sparse_infer.patch(model, plan)
    try:
        return generate(model, ids, attention_mask), sparse_infer.get_stats(model)
    finally:
        sparse_infer.unpatch(model)


def assert_same(a, b, atol=1e-5):
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(x, y, atol=atol, rtol=atol)


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma2", "mistral", "gemma3", "phi3"])
def arch_model(request):
    return request.param, tiny_model(request.param)


@pytest.mark.parametrize("method", list(FULL))
def test_full_budget_equals_dense(arch_model, method):
    _, model = arch_model
    ids = ids_of(1, 130, 0)
    dense = generate(model, ids)
    sparse, stats = generate_patched(model, plan_for(FULL[method]), ids)
    assert_same(sparse, dense)
    assert stats["layers"][1]["sparse_decode_calls"] == NEW - 1
    assert stats["decode_density"] == pytest.approx(1.0)


@pytest.mark.parametrize("method", list(FULL))
def test_full_budget_batch_left_padding_equals_dense(method):
    model = tiny_model("qwen2")
    ids = ids_of(2, 120, 1)
    attn = torch.ones_like(ids)
    attn[1, :37] = 0
    ids[1, :37] = 0
    dense = generate(model, ids, attn)
    sparse_infer.patch(model, plan_for(FULL[method]))
    try:
        sparse = generate(model, ids, attn)
    finally:
        sparse_infer.unpatch(model)
    assert_same(sparse, dense)


@pytest.mark.parametrize("method", list(SPARSE))
def test_sparse_budget_batch_rows_match_single_rows(method):
    """Per-row selections: a left-padded batch gives each row what it gets alone."""
    model = tiny_model("llama")
    # padding of 32 = whole Quest pages, whose boundaries are absolute cache positions
    a, b = ids_of(1, 100, 2), ids_of(1, 68, 3)
    sparse_infer.patch(model, plan_for(SPARSE[method]))
    try:
        alone = [generate(model, a), generate(model, b)]
        ids = torch.zeros(2, 100, dtype=torch.long)
        attn = torch.zeros_like(ids)
        ids[0], attn[0] = a[0], 1
        ids[1, 32:], attn[1, 32:] = b[0], 1
        both = generate(model, ids, attn)
    finally:
        sparse_infer.unpatch(model)
    assert torch.equal(both.sequences[0, 100:], alone[0].sequences[0, 100:])
    assert torch.equal(both.sequences[1, 100:], alone[1].sequences[0, 68:])
    for step, (x, y0, y1) in enumerate(zip(both.scores, alone[0].scores, alone[1].scores)):
        torch.testing.assert_close(x[0], y0[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(x[1], y1[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", list(SPARSE))
def test_no_stale_state_between_generate_calls(method):
    """Second prompt chosen to look like a continuation: its kv length at the first decode
    step is exactly one more than the first call's last, and its first and last tokens are
    the tokens at those cache rows in the first call (so layer-0 keys there are identical)."""
    first = ids_of(1, 90, 4)
    plan = plan_for(SPARSE[method])

    shared = tiny_model("llama")
    sparse_infer.patch(shared, plan)
    out_first = generate(shared, first)
    last_row = first.shape[1] + NEW - 2                      # last cache row the first call processed
    second = ids_of(1, last_row + 1, 5)
    second[0, 0], second[0, -1] = first[0, 0], out_first.sequences[0, last_row]
    out_shared = [out_first, generate(shared, second)]
    fresh_out = []
    for prompt in (first, second):
        model = tiny_model("llama")
        sparse_infer.patch(model, plan)
        fresh_out.append(generate(model, prompt))
    for a, b in zip(out_shared, fresh_out):
        assert_same(a, b, atol=1e-6)
    dense = generate(tiny_model("llama"), second)
    assert sparse_infer.get_stats(shared)["decode_density"] < 0.8
    if method != "streaming":
        # the budget is really sparse: the output differs from dense somewhere
        assert any(not torch.allclose(x, y, atol=1e-4) for x, y in zip(out_shared[1].scores, dense.scores))


def test_double_sparsity_label_cache_matches_recomputed():
    model = tiny_model("qwen2")
    for channels in (5, [1, 3, 8, 15]):
        sparse_infer.patch(model, plan_for({"method": "double_sparsity", "channels": channels, "budget": 16,
                                            "sink": 2, "local": 4}, mixed=False))
        try:
            out = generate(model, ids_of(2, 500, 6), new=12)
            cache = out.cache
            for layer_idx, layer in enumerate(cache.layers):
                rt = next(runtime_for(m) for m in model.modules()
                          if runtime_for(m) is not None and runtime_for(m).layer_idx == layer_idx)
                st = rt.decode_state.groups[0]
                keys = layer.keys
                assert st.labels.length == keys.shape[2]
                assert torch.equal(st.labels.view(), labels_of(keys, st.channels))
                if isinstance(channels, list):
                    assert st.channels.tolist() == [[channels] * keys.shape[1]] * keys.shape[0]
            assert decode_counters(model)["rebuilds"] == 2       # once per layer, then incremental
            # label cache ~ r/D of K (plus growth headroom)
            r = channels if isinstance(channels, int) else len(channels)
            k_bytes = sum(layer.keys.numel() * layer.keys.element_size() for layer in cache.layers)
            ratio = decode_state_bytes(model, detail=True)["double_sparsity"] / k_bytes
            assert r / 16 <= ratio <= 1.2 * r / 16
        finally:
            sparse_infer.unpatch(model)


def test_reuse_threshold_one_equals_no_reuse_and_reuse_saves_scorings():
    model = tiny_model("llama")
    ids = ids_of(1, 120, 7)
    base = SPARSE["token_select"]
    results, counts = {}, {}
    for name, reuse in (("off", None), ("never", 1.0), ("on", 0.5)):
        # the torch executor for all three: without reuse the CPU executor would take the fused
        # C call, whose float rounding differs from select() + executor
        sparse_infer.patch(model, plan_for(dict(base, reuse=reuse), mixed=False), backend="torch")
        try:
            results[name] = generate(model, ids, new=10)
            counts[name] = decode_counters(model)
        finally:
            sparse_infer.unpatch(model)
    assert_same(results["never"], results["off"], atol=0)
    assert counts["never"]["reuses"] == 0
    assert counts["never"]["full_scorings"] == counts["off"]["full_scorings"]
    assert counts["on"]["reuses"] > 0
    assert counts["on"]["full_scorings"] < counts["off"]["full_scorings"]
    assert counts["on"]["full_scorings"] + counts["on"]["reuses"] == counts["off"]["full_scorings"]


def test_reset_and_state_bytes():
    model = tiny_model("llama")
    sparse_infer.patch(model, plan_for(SPARSE["quest"]))
    try:
        generate(model, ids_of(1, 64, 8))
        by_kind = decode_state_bytes(model, detail=True)
        assert by_kind["quest"] > 0 and by_kind["fingerprint"] > 0
        reset_decode_state(model)
        assert decode_state_bytes(model) == 0
    finally:
        sparse_infer.unpatch(model)


@pytest.mark.parametrize("executor,in_place_share", [("torch", 0.0), ("torch", 100.0), ("cpu", 0.0)])
@pytest.mark.parametrize("granularity", ["head", "group"])
def test_mixed_layer_parts_in_one_call_equal_separate_calls(monkeypatch, executor, in_place_share, granularity):
    # a layer mixing methods: the CPU executors attend all its sparse parts in one call. The
    # torch one gathers (share 100) or reads each cache head in place under a mask of the
    # selections (share 0); the C kernel always reads the selected rows in place, never the
    # masked whole cache. Per-part calls give the same result. Per head: partial GQA groups,
    # one index row per query head. Per group: whole groups, one shared row per cache head,
    # read once for the group's query heads.
    import importlib

    import sparse_infer.decode.dispatch as decode

    if executor == "cpu" and not cpu_kernel_available():
        pytest.skip("no C compiler: the C decode kernel is not built here")
    kernels = importlib.import_module("sparse_infer.kernels.sparse_decode")   # the package re-exports a function of that name
    cpu_kernel = importlib.import_module("sparse_infer.kernels.cpu_decode")

    model = tiny_model("llama")                     # 4 query heads, 2 kv heads
    # token_select with reuse: its select() path (without, it would take its fused C call)
    if granularity == "head":
        rules = {0: SPARSE["quest"], 1: SPARSE["token_select_reuse"], 2: SPARSE["streaming"],
                 3: {"method": "dense"}}
    else:
        rules = {0: SPARSE["quest"], 1: SPARSE["quest"], 2: SPARSE["token_select_reuse"],
                 3: SPARSE["token_select_reuse"]}
    monkeypatch.setattr(decode, "IN_PLACE_SHARE", in_place_share)
    in_place = []
    real_in_place = decode._selection_mask
    monkeypatch.setattr(decode, "_selection_mask", lambda *a: in_place.append(1) or real_in_place(*a))
    read_rows = []                                  # (query heads, index rows) of each executor call
    module, name = (kernels, "sparse_decode_torch") if executor == "torch" else (cpu_kernel, "sparse_decode_cpu")
    real_executor = getattr(module, name)
    monkeypatch.setattr(module, name, lambda q, k, v, idx, **kw: read_rows.append((q.shape[1], idx.shape[1]))
                        or real_executor(q, k, v, idx, **kw))
    plan = {"sparse_infer_plan": 1, "prefill": {"min_seq_len": 100000},
            "decode": {"min_kv_len": 0, "granularity": granularity, "default": SPARSE["streaming"],
                       "layers": {layer: copy.deepcopy(rules) for layer in range(2)}}}
    ids = ids_of(2, 90, seed=21)
    backend = "torch" if executor == "torch" else "auto"
    sparse_infer.patch(model, plan, backend=backend)
    merged = generate(model, ids)
    sparse_infer.unpatch(model)
    assert bool(in_place) == (executor == "torch" and in_place_share == 0.0)
    assert bool(read_rows) == (executor == "cpu" or in_place_share != 0.0)
    # a shared selection is one row for two heads. The C path runs Quest's (and Double
    # Sparsity's) choice and attention in a call of its own (quest_decode_cpu), so its heads are
    # not in the merged call.
    if executor == "torch":
        expected = {(3, 3)} if granularity == "head" else {(4, 2)}
    else:
        expected = {(2, 2)} if granularity == "head" else {(2, 1)}
    assert set(read_rows) <= expected
    merged_calls = len(read_rows)
    monkeypatch.setattr(decode, "MERGE_PARTS", False)                # one executor call per part
    read_rows.clear()
    sparse_infer.patch(model, plan, backend=backend)
    separate = generate(model, ids)
    sparse_infer.unpatch(model)
    if executor == "cpu" and granularity == "group":
        assert len(read_rows) == merged_calls          # one non-Quest part: nothing to merge
    else:
        assert len(read_rows) > merged_calls
    assert_same(merged, separate)


def test_auto_dense_above_runs_cache_heads_dense_when_selections_cover_too_much(monkeypatch):
    # per-query-head selections of 40+12 rows on a ~200-row cache, two query heads per cache
    # head: 104 rows > a third of the cache, so with "auto" every head decodes dense
    from sparse_infer.kernels import registry

    for executor in ("torch", "cpu"):
        monkeypatch.setitem(registry.DENSE_ABOVE, executor, {"head": 1.0, "group": 1.0, "decode": 1 / 3})
    model = tiny_model("llama")
    ids = ids_of(1, 200, seed=31)
    heavy = dict(SPARSE["token_select"], budget=40)
    plan = plan_for(heavy, mixed=False)
    plan["decode"]["granularity"] = "head"
    reference = generate(model, ids)
    sparse_infer.patch(model, plan)
    switched = generate(model, ids)
    assert sparse_infer.get_stats(model)["decode_density"] == 1.0
    sparse_infer.unpatch(model)
    sparse_infer.patch(model, plan, dense_above=1.0)         # as written: really sparse
    planned = generate(model, ids)
    assert sparse_infer.get_stats(model)["decode_density"] < 0.9
    sparse_infer.unpatch(model)
    assert_same(switched, reference)
    # a light rule (8 + 12 rows per head, 40 per cache head) stays sparse under "auto"
    light = plan_for(dict(SPARSE["token_select"], budget=8), mixed=False)
    light["decode"]["granularity"] = "head"
    sparse_infer.patch(model, light)
    generate(model, ids)
    assert sparse_infer.get_stats(model)["decode_density"] < 0.5
    sparse_infer.unpatch(model)
    assert not torch.equal(planned.sequences, switched.sequences) or any(
        not torch.allclose(x, y, atol=1e-5) for x, y in zip(planned.scores, switched.scores))


def test_parts_over_limit_counts_per_head_selections_once_per_query_head():
    from sparse_infer.decode.dispatch import _layer_layouts, _parts_over_limit
    from sparse_infer.runtime import DecodeState, group_heads
    from sparse_infer.plan import load_plan

    plan = load_plan({"sparse_infer_plan": 1, "decode": {
        "min_kv_len": 0, "granularity": "head", "default": {"method": "streaming", "sink": 4, "local": 28},
        "layers": {0: {0: {"method": "quest", "page": 8, "budget": 20, "sink": 0, "local": 0}}}}})
    rt = SimpleNamespace(plan=plan, decode_groups=group_heads(plan.decode, 0, 4), decode_state=DecodeState())
    layouts = _layer_layouts(rt, 4, 2)                   # 4 query heads on 2 cache heads
    on_kv = {pi: kv.start for pi, (_, _, kv, _) in enumerate(layouts)}
    # cache head 0: quest head 0 (20 rounded up to 24 rows) + streaming head 1 (32) = 56 rows;
    # cache head 1: streaming heads 2 and 3, 32 rows each = 64 rows
    assert _parts_over_limit(layouts, 4, 2, 200, 0.3) == {pi for pi, kv in on_kv.items() if kv == 1}
    assert _parts_over_limit(layouts, 4, 2, 200, 0.25) == set(on_kv)
    assert _parts_over_limit(layouts, 4, 2, 200, 0.5) == set()


def test_decode_density_counts_layers_the_plan_leaves_dense():
    """A layer whose decode rules are all dense is read whole: the model's measured density
    counts it as 1, as prefill counts its dense layers."""
    model = tiny_model("llama")
    ids = ids_of(1, 200, seed=33)
    light = plan_for(dict(SPARSE["token_select"], budget=8), mixed=False)
    sparse_infer.patch(model, light)
    generate(model, ids)
    everywhere = sparse_infer.get_stats(model)
    sparse_infer.unpatch(model)
    light["decode"]["layers"] = {0: {"*": {"method": "dense"}}}
    sparse_infer.patch(model, light)
    generate(model, ids)
    layer0_dense = sparse_infer.get_stats(model)
    sparse_infer.unpatch(model)
    assert layer0_dense["layers"][0]["decode_density"] == 1.0
    assert layer0_dense["layers"][1]["decode_density"] == pytest.approx(everywhere["layers"][1]["decode_density"])
    # two layers, equal cache sizes: the model's density is the mean of the two
    assert layer0_dense["decode_density"] == pytest.approx((1 + everywhere["layers"][1]["decode_density"]) / 2)
