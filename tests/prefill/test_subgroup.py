"""Prefill granularity "subgroup": a rule's heads in a GQA group that keeps some heads dense (a
head-split layer) still share the group's K/V and one index. Each call is checked against a torch
reference built from the same pattern's index over the same heads, and a full-budget plan against
dense inside generate."""
import pytest
import torch

import sparse_infer
from sparse_infer.bench.layer import layer_runtime
from sparse_infer.kernels.index import dense_masked_attention, index_to_mask
from sparse_infer.plan import PlanError, parse_rule, plan_from_dict
from sparse_infer.prefill import build_index
from sparse_infer.prefill.dispatch import _head_parts, sparse_prefill
from tests.conftest import tiny_model

HEADS, KV, N, D, BS = 6, 2, 1024, 32, 32
NARROW = {"pattern": "vertical_slash", "vertical": 32, "slash": 8, "last_q": 32, "sink": 32, "local": 32}


def test_head_parts_share_partial_groups_in_calls_of_equal_counts():
    every = list(range(14))
    # Qwen2.5-0.5B's layout: 14 query heads on 2 key heads
    assert _head_parts([h for h in every if h not in (8, 13)], 14, 2, True) == \
        [(list(range(7)), [0]), ([7, 9, 10, 11, 12], [1])]
    assert _head_parts([h for h in every if h not in (1, 13)], 14, 2, True) == \
        [([0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [0, 1])]
    assert _head_parts(every, 14, 2, True) == [(every, [0, 1])]
    # without sharing, a partial group's heads each take their own copy of the key head
    assert _head_parts([0, 2, 3, 4, 5], 6, 2, False) == [([0, 2, 3, 4, 5], [0, 0, 1, 1, 1])]
    assert _head_parts([0, 2], 4, 4, True) == [([0, 2], [0, 2])]               # no GQA


def _plan(granularity, dense_heads, rule=NARROW, layers=1):
    return plan_from_dict({
        "sparse_infer_plan": 1,
        "prefill": {"min_seq_len": 1, "block_size": BS, "granularity": granularity, "default": {"pattern": "dense"},
                    "layers": {layer: {"*": dict(rule), **{h: {"pattern": "dense"} for h in dense_heads}}
                               for layer in range(layers)}},
        "decode": {"min_kv_len": 1, "default": {"method": "dense"}}})


def _reference(q, k, v, scaling, calls, dense_heads):
    """Each (query heads, key heads, granularity) call as masked attention over the pattern's own
    index; the dense heads causal."""
    rule = parse_rule(NARROW, "test", "prefill")
    out = torch.empty_like(q)
    for heads, kv, granularity in calls:
        index = build_index(rule, q[:, heads], k[:, kv], block_size=BS, scaling=scaling, granularity=granularity)
        mask = index_to_mask(index, N, N, len(heads))
        out[:, heads] = dense_masked_attention(q[:, heads], k[:, kv], v[:, kv], mask, scaling)
    for h in dense_heads:
        causal = torch.ones(N, N, dtype=torch.bool).tril()
        out[:, [h]] = dense_masked_attention(q[:, [h]], k[:, [h // (HEADS // KV)]], v[:, [h // (HEADS // KV)]],
                                             causal, scaling)
    return out


@pytest.mark.parametrize("dense_heads, calls", [
    # head 1 dense: group 0 keeps 2 sparse heads, group 1 all 3 -> two calls, each one index a group
    ((1,), [([3, 4, 5], [1]), ([0, 2], [0])]),
    # heads 1 and 4 dense: 2 sparse heads in each group -> one call over both key heads
    ((1, 4), [([0, 2, 3, 5], [0, 1])]),
])
def test_subgroup_runs_one_index_per_partial_group_as_the_reference(dense_heads, calls):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, HEADS, N, D, generator=g)
    k, v = torch.randn(1, KV, N, D, generator=g), torch.randn(1, KV, N, D, generator=g)
    scaling = D ** -0.5
    sparse_heads = [h for h in range(HEADS) if h not in dense_heads]
    assert _head_parts(sparse_heads, HEADS, KV, True) == calls

    outs = {}
    for granularity in ("subgroup", "group"):
        rt = layer_runtime(_plan(granularity, dense_heads), 0, HEADS, KV, dense_above=1.0)
        outs[granularity] = sparse_prefill(rt, q, k, v, None, scaling)
        assert rt.stats.selected_pairs < rt.stats.causal_pairs            # the sparse heads ran sparse
    shared = _reference(q, k, v, scaling, [(h, kv, "group") for h, kv in calls], dense_heads)
    torch.testing.assert_close(outs["subgroup"], shared, atol=1e-5, rtol=1e-5)
    # "group" runs a rule's heads per head (each its own index and key copy) once they are not
    # whole groups, as before
    per_head = [(sparse_heads, [h // (HEADS // KV) for h in sparse_heads], "head")]
    torch.testing.assert_close(outs["group"], _reference(q, k, v, scaling, per_head, dense_heads),
                               atol=1e-5, rtol=1e-5)
    partial_rows = [h for heads, kv in calls if len(heads) < len(kv) * (HEADS // KV) for h in heads]
    assert not torch.allclose(outs["subgroup"][:, partial_rows], outs["group"][:, partial_rows], atol=1e-4), \
        "a shared index differs from per-head ones on a data-dependent rule"


def test_subgroup_with_a_full_budget_generates_as_dense():
    """Batch 2, the second row left-padded: the masks reach every call of the split layer."""
    model = tiny_model("llama", num_attention_heads=HEADS, num_key_value_heads=KV)
    full = {"pattern": "vertical_slash", "vertical": 100000, "slash": 100000, "last_q": 16}
    ids = torch.randint(3, 128, (2, 300), generator=torch.Generator().manual_seed(1))
    attn = torch.ones_like(ids)
    attn[1, :40], ids[1, :40] = 0, 0
    with torch.no_grad():
        dense_logits = model(ids, attention_mask=attn).logits
        dense_out = model.generate(ids, attention_mask=attn, max_new_tokens=6, do_sample=False)
        sparse_infer.patch(model, _plan("subgroup", (1,), full, layers=2), dense_above=1.0)
        try:
            logits = model(ids, attention_mask=attn).logits
            stats = sparse_infer.get_stats(model)
            out = model.generate(ids, attention_mask=attn, max_new_tokens=6, do_sample=False)
        finally:
            sparse_infer.unpatch(model)
    assert stats["layers"][0]["sparse_prefill_calls"] == 1
    valid = attn.bool()
    torch.testing.assert_close(logits[valid], dense_logits[valid], atol=1e-5, rtol=1e-5)
    assert torch.equal(out, dense_out)


def test_subgroup_is_a_prefill_granularity_only():
    plan = _plan("subgroup", (1,))
    assert plan.prefill.granularity == "subgroup" and plan.to_dict()["prefill"]["granularity"] == "subgroup"
    with pytest.raises(PlanError, match="decode.granularity"):
        plan_from_dict({"sparse_infer_plan": 1, "prefill": {"min_seq_len": 1},
                        "decode": {"min_kv_len": 1, "granularity": "subgroup"}})
    with pytest.raises(PlanError, match="prefill.granularity.*'subgroup'"):
        plan_from_dict({"sparse_infer_plan": 1, "prefill": {"min_seq_len": 1, "granularity": "kv"}})


def test_subgroup_runs_dense_the_index_heads_above_dense_above():
    """Heads 1 and 4 dense leave one call of two index heads (one a group); with dense_above
    between their densities the denser group's heads run dense, the other keeps its index."""
    from sparse_infer.kernels.index import index_head_density

    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, HEADS, N, D, generator=g)
    k, v = torch.randn(1, KV, N, D, generator=g), torch.randn(1, KV, N, D, generator=g)
    scaling = D ** -0.5
    sparse_heads = [0, 2, 3, 5]
    rule = parse_rule(NARROW, "test", "prefill")
    index = build_index(rule, q[:, sparse_heads], k, block_size=BS, scaling=scaling, granularity="group")
    density = index_head_density(index, N, N).tolist()
    assert abs(density[0] - density[1]) > 0.02
    denser = int(density[1] > density[0])
    rt = layer_runtime(_plan("subgroup", (1, 4)), 0, HEADS, KV, dense_above=sum(density) / 2)
    out = sparse_prefill(rt, q, k, v, None, scaling)

    kept = [h for h in sparse_heads if h // (HEADS // KV) != denser]
    reference = _reference(q, k, v, scaling, [], [1, 4] + [h for h in sparse_heads if h not in kept])
    mask = index_to_mask(index, N, N, len(sparse_heads))
    rows = [sparse_heads.index(h) for h in kept]
    reference[:, kept] = dense_masked_attention(q[:, kept], k[:, [1 - denser]], v[:, [1 - denser]],
                                                mask[:, rows], scaling)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    # the kept group's pairs are its index's, the rest count as dense
    assert rt.stats.selected_pairs / rt.stats.causal_pairs == pytest.approx(
        (4 + 2 * density[1 - denser]) / HEADS, rel=1e-6)
