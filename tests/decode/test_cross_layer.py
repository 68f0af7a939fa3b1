"""Cross-layer reuse (layer_select / layer_reuse): the selecting layer is exact and publishes
the reference top-k of its summed attention; reusing layers read that set within the step;
full budgets equal dense through generate (batches, padding, windows, softcap); plans that
could reuse a set not chosen before them are refused."""
import pytest
import torch
import torch.nn.functional as F

import sparse_infer
from sparse_infer.decode.common import GroupInputs
from sparse_infer.decode.cross_layer import LayerReuse, attend_and_select
from sparse_infer.params import PlanError
from sparse_infer.plan import Rule, plan_from_dict
from tests.conftest import tiny_model
from tests.decode.test_generate import NEW, assert_same, generate, generate_patched, ids_of

LAYERS = 4


def reuse_plan(budget, *, source=1, layers=None, granularity="group", scope="layer"):
    """Layer 0 dense, `source` selects, every later layer reuses its set (the default)."""
    entries = {at: {"*": {"method": "dense"}} for at in range(source)}
    entries[source] = {"*": {"method": "layer_select", "budget": budget, "sink": 4, "local": 8, "scope": scope}}
    entries.update(layers or {})
    return {"sparse_infer_plan": 1, "prefill": {"min_seq_len": 100000},
            "decode": {"min_kv_len": 0, "granularity": granularity,
                       "default": {"method": "layer_reuse", "from_layer": source}, "layers": entries}}


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma2", "mistral", "gemma3"])
def deep_model(request):
    return tiny_model(request.param, num_hidden_layers=LAYERS)


@pytest.mark.parametrize("scope", ["layer", "kv_head"])
def test_full_budget_equals_dense(deep_model, scope):
    ids = ids_of(1, 130, 0)
    dense = generate(deep_model, ids)
    sparse, stats = generate_patched(deep_model, reuse_plan(100000, scope=scope), ids)
    assert_same(sparse, dense)
    for layer in range(2, LAYERS):
        assert stats["layers"][layer]["sparse_decode_calls"] == NEW - 1
    assert stats["decode_density"] == pytest.approx(1.0)


@pytest.mark.parametrize("scope", ["layer", "kv_head"])
@pytest.mark.parametrize("granularity", ["group", "head"])
def test_full_budget_batch_left_padding_equals_dense(granularity, scope):
    model = tiny_model("qwen2", num_hidden_layers=LAYERS)
    ids = ids_of(2, 120, 1)
    attn = torch.ones_like(ids)
    attn[1, :37] = 0
    ids[1, :37] = 0
    dense = generate(model, ids, attn)
    # a partial group too: heads 0 and 1 of layer 2 reuse per head, the others dense
    plan = reuse_plan(100000, granularity=granularity, scope=scope,
                      layers={2: {0: {"method": "layer_reuse", "from_layer": 1},
                                  1: {"method": "layer_reuse", "from_layer": 1}, "*": {"method": "dense"}}})
    sparse_infer.patch(model, plan)
    try:
        sparse = generate(model, ids, attn)
    finally:
        sparse_infer.unpatch(model)
    assert_same(sparse, dense)


@pytest.mark.parametrize("scope, sets", [("layer", 1), ("kv_head", 2)])
def test_small_budget_reads_only_the_set(scope, sets):
    model = tiny_model("llama", num_hidden_layers=LAYERS)
    ids = ids_of(2, 150, 2)
    sparse_infer.patch(model, reuse_plan(16, scope=scope))
    try:
        generate(model, ids)
        stats = sparse_infer.get_stats(model)
        rt = next(r for r in sparse_infer.runtime.iter_runtimes(model) if r.layer_idx == 3)
        n, first_kv, chosen = rt.shared["selections"][1]     # the last step's set, left for inspection
    finally:
        sparse_infer.unpatch(model)
    assert chosen.shape == (2, sets, 4 + 8 + 16) and first_kv == 0
    assert n == 150 + NEW - 1
    assert stats["layers"][1]["decode_density"] == pytest.approx(1.0)
    # every step: 28 rows of a cache of 150..154 (the first generated token comes from prefill)
    steps = range(150, 150 + NEW - 1)
    expected = sum(28 for _ in steps) / sum(n + 1 for n in steps)
    for layer in (2, 3):
        assert stats["layers"][layer]["decode_density"] == pytest.approx(expected)


def _reference_set(query, key, valid, rule, scaling, heads):
    """Sinks, window and top `budget` of attention summed over `heads`, by plain loops: {row: set}."""
    B, h, _ = query.shape
    hk, n = key.shape[1], key.shape[2]
    sets = []
    for b in range(B):
        ok = valid[b] if valid is not None else torch.ones(n, dtype=torch.bool)
        where = ok.nonzero().flatten().tolist()
        forced = set(where[: rule.sink]) | set(where[len(where) - rule.local:])
        total = torch.zeros(n)
        for head in heads:
            s = (query[b, head] @ key[b, head // (h // hk)].T) * scaling
            total += torch.softmax(s.masked_fill(~ok, float("-inf")), -1)
        rest = [t for t in where if t not in forced]
        rest.sort(key=lambda t: -float(total[t]))
        sets.append(forced | set(rest[: rule.budget.resolve(n)]))
    return sets


@pytest.mark.parametrize("scope", ["layer", "kv_head"])
@pytest.mark.parametrize("masked", [False, True])
def test_attend_and_select_matches_reference(masked, scope):
    torch.manual_seed(0)
    B, h, hk, n, D = 2, 6, 2, 300, 32
    query, key, value = torch.randn(B, h, D), torch.randn(B, hk, n, D), torch.randn(B, hk, n, D)
    valid = None
    if masked:
        valid = torch.ones(B, n, dtype=torch.bool)
        valid[1, :70] = False                                     # left padding of row 1
    rule = plan_from_dict(reuse_plan(40, scope=scope)).decode.rule(1, 0)
    inp = GroupInputs(query=query, key=key, valid=None if valid is None else valid[:, None].expand(B, hk, n),
                      per_head=False, scaling=D ** -0.5, softcap=None, fresh=True)
    out, chosen = attend_and_select(inp, rule, value)
    mask = None if valid is None else valid[:, None, None]
    dense = F.scaled_dot_product_attention(query[:, :, None], key, value, attn_mask=mask, scale=D ** -0.5,
                                           enable_gqa=True)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    groups = [range(h)] if scope == "layer" else [range(j * 3, j * 3 + 3) for j in range(hk)]
    assert chosen.shape[:2] == (B, len(groups))
    for row, heads in enumerate(groups):
        for b, want in enumerate(_reference_set(query, key, valid, rule, D ** -0.5, heads)):
            got = [t for t in chosen[b, row].tolist() if t >= 0]
            assert len(got) == len(set(got)) == 4 + 8 + 40
            assert set(got) == want


def test_reuse_takes_only_a_set_of_this_step():
    rule = Rule("layer_reuse", {"from_layer": 1})
    key = torch.zeros(1, 2, 50, 8)
    chosen = torch.arange(10).view(1, 1, 10)

    def inp(published, first_kv=0, per_head=False):
        return GroupInputs(query=torch.zeros(1, 4, 8), key=key, valid=None, per_head=per_head, scaling=1.0,
                           softcap=None, fresh=False, published=published, first_kv=first_kv)

    selector = LayerReuse()
    assert torch.equal(selector.select(inp({1: (50, 0, chosen)}), rule, None), chosen.expand(1, 2, 10))
    assert selector.select(inp({1: (49, 0, chosen)}), rule, None) is None          # an older step's
    assert selector.select(inp({1: (50, 0, chosen.expand(3, 1, 10))}), rule, None) is None   # another batch
    assert selector.select(inp({}), rule, None) is None
    assert selector.select(inp(None), rule, None) is None
    # one set per cache head: a part reads its own cache heads' sets (per query head: repeated)
    per_kv = torch.arange(40).view(1, 4, 10)                     # sets of cache heads 0..3
    assert torch.equal(selector.select(inp({1: (50, 0, per_kv)}, first_kv=1), rule, None), per_kv[:, 1:3])
    assert torch.equal(selector.select(inp({1: (50, 0, per_kv)}, first_kv=2, per_head=True), rule, None),
                       per_kv[:, 2:4].repeat_interleave(2, dim=1))
    assert selector.select(inp({1: (50, 0, per_kv)}, first_kv=3), rule, None) is None   # head 4 has none


def test_no_published_set_runs_dense(monkeypatch):
    """A reusing layer whose selecting layer published nothing this step reads everything."""
    from sparse_infer.decode.cross_layer import LayerSelect

    model = tiny_model("llama", num_hidden_layers=LAYERS)
    ids = ids_of(1, 120, 3)
    dense = generate(model, ids)
    real = LayerSelect.attend
    monkeypatch.setattr(LayerSelect, "attend", lambda self, *a: (real(self, *a)[0], None))
    sparse, stats = generate_patched(model, reuse_plan(8), ids)
    assert_same(sparse, dense)
    assert stats["decode_density"] == pytest.approx(1.0)


def test_a_set_larger_than_dense_above_runs_dense(monkeypatch):
    from sparse_infer.kernels import registry

    model = tiny_model("llama", num_hidden_layers=LAYERS)
    ids = ids_of(1, 120, 4)
    for executor in ("torch", "cpu"):
        monkeypatch.setitem(registry.DENSE_ABOVE, executor, {"head": 1.0, "group": 1.0, "decode": 0.5})
    sparse_infer.patch(model, reuse_plan(80))                  # 92 of ~120 rows: over half
    try:
        generate(model, ids)
        over = sparse_infer.get_stats(model)
        sparse_infer.reset_stats(model)
        sparse_infer.patch(model, reuse_plan(20))              # 32 rows: under
        generate(model, ids)
        under = sparse_infer.get_stats(model)
    finally:
        sparse_infer.unpatch(model)
    assert over["layers"][2]["decode_density"] == pytest.approx(1.0)
    assert under["layers"][2]["decode_density"] < 0.3


@pytest.mark.parametrize("layers, default, message", [
    ({2: {"*": {"method": "layer_reuse", "from_layer": 2}}}, None, "must be an earlier layer than 2"),
    ({2: {"*": {"method": "layer_reuse", "from_layer": 0}}}, None, "layer 0 has no layer_select rule"),
    ({}, {"method": "layer_reuse", "from_layer": 1}, "would run in layer 0"),
    ({0: {0: {"method": "layer_select", "budget": 8}, "*": {"method": "dense"}}}, None,
     "per-head rules beside a layer_select rule"),
    ({0: {0: {"method": "dense"}}}, {"method": "layer_select", "budget": 8}, "layer 0 has per-head rules"),
])
def test_plans_reusing_what_is_not_chosen_before_are_refused(layers, default, message):
    raw = reuse_plan(64)
    raw["decode"]["layers"] = {1: raw["decode"]["layers"][1], **layers}
    if default is not None:
        raw["decode"]["default"] = default
    else:
        raw["decode"]["default"] = {"method": "dense"}
    with pytest.raises(PlanError, match=message):
        plan_from_dict(raw)


def test_bad_plan_leaves_model_untouched():
    model = tiny_model("llama", num_hidden_layers=LAYERS)
    raw = reuse_plan(64)
    raw["decode"]["layers"][3] = {"*": {"method": "layer_reuse", "from_layer": 3}}
    with pytest.raises(PlanError, match=r"decode\.layers\.3\.\*\.from_layer"):
        sparse_infer.patch(model, raw)
    assert not sparse_infer.is_patched(model)
