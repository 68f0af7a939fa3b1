"""Prefill dispatch (q > 1): run each rule of a layer over its heads with the block-sparse executor.

For every rule of the layer (rt.prefill_groups) the rule's registered pattern builds a
BlockSparseIndex (sparse_infer.prefill.build_index); heads of dense rules, and heads whose
index selects more than `dense_above` of their causal pairs, are collected and run as one
dense call at the end.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sparse_infer.methods import DENSE
from sparse_infer.prefill import build_index
from sparse_infer.runtime import LayerRuntime, causal_mask, causal_pairs, heads_of


def _dense_subset(query, key, value, mask, scaling, softcap):
    """Dense causal attention over a subset of heads (query heads map 1:1 or G:1 onto key heads)."""
    from sparse_infer.kernels.index import dense_masked_attention
    q_len, n = query.shape[2], key.shape[2]
    if softcap:
        causal = causal_mask(q_len, n, query.device)
        full = causal[None, None] if mask is None else causal[None, None] & mask
        return dense_masked_attention(query, key, value, full, scaling, softcap=softcap)
    groups = query.shape[1] // key.shape[1]
    if mask is None and q_len == n:
        # plain causal prefill: no (n, n) mask (SDPA would turn it into an n^2 float tensor: GBs at 32K)
        # and no copy of K/V per query head
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                              enable_gqa=groups > 1)
    if groups > 1:
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    if mask is None:                                   # chunked prefill: queries are the last q_len keys
        causal = causal_mask(q_len, n, query.device)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=causal, scale=scaling)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.nan_to_num(0.0)


def _head_subsets(heads: list[int], num_heads: int, num_kv: int):
    """Index tensors for running a subset of query heads while keeping GQA sharing when possible."""
    groups = num_heads // num_kv
    kv_of = [h // groups for h in heads]
    whole = sorted(set(kv_of))
    if len(heads) == len(whole) * groups:          # the subset is made of whole GQA groups
        return heads, whole
    return heads, kv_of                             # one key head per query head


def _head_parts(heads: list[int], num_heads: int, num_kv: int, share_partial: bool) -> list[tuple[list, list]]:
    """The calls (query heads, their key heads) that run one rule's `heads`.

    Heads that make whole GQA groups run as one call sharing their key heads. Otherwise, without
    `share_partial`, every head runs with its own copy of its key head (whole groups too). With
    it (plan granularity "subgroup") each group's share of the heads keeps its key head: one
    call per count of such heads, so every call maps the same number of query heads onto each
    of its key heads.
    """
    groups = num_heads // num_kv
    if not share_partial or groups == 1:
        return [_head_subsets(heads, num_heads, num_kv)]
    of_kv: dict[int, list[int]] = {}
    for h in sorted(heads):
        of_kv.setdefault(h // groups, []).append(h)
    by_count: dict[int, list[int]] = {}
    for kv, members in of_kv.items():
        by_count.setdefault(len(members), []).append(kv)
    return [([h for kv in kvs for h in of_kv[kv]], kvs) for _, kvs in sorted(by_count.items(), reverse=True)]


# torch.compile runs the sparse paths as they are, between graphs: index sizes depend on the
# data, which tracing cannot follow. The rest of the model compiles.
@torch.compiler.disable
def sparse_prefill(rt: LayerRuntime, query, key, value, mask, scaling, softcap=None):
    """Run each rule of the layer over its heads; returns (B, Hq, q, D).

    Heads of dense rules, and heads whose index selects more than `dense_above`
    of the causal pairs, are collected and run as one dense call at the end.
    """
    # the executors are imported on use: importing them imports triton, which must wait for
    # TRITON_INTERPRET to be set on CPU machines
    from sparse_infer.kernels.dispatch import block_sparse_attention, prefill_needs, resolve_dense_above
    from sparse_infer.kernels.registry import group_limit
    from sparse_infer.kernels.index import BlockSparseIndex, index_head_density

    section = rt.plan.prefill
    num_heads, num_kv = query.shape[1], key.shape[1]
    if len(rt.prefill_groups) == 1:
        parts = [(rt.prefill_groups[0][0], list(range(num_heads)), list(range(num_kv)))]
    else:
        share = section.granularity == "subgroup"
        parts = [(rule, *part) for rule, heads in rt.prefill_groups
                 for part in _head_parts(heads, num_heads, num_kv, share)]
    out = query.new_empty(query.shape[0], num_heads, query.shape[2], value.shape[-1])
    q_len, n = query.shape[2], key.shape[2]
    per_head_pairs = query.shape[0] * causal_pairs(q_len, n)
    dense_above = resolve_dense_above(rt.dense_above, rt.backend, query, needs=prefill_needs(None, mask, softcap))
    dense_heads: list[int] = []
    for rule, heads, kv_heads in parts:
        if rule.kind == DENSE:
            dense_heads += heads
            continue
        whole = len(heads) == num_heads and len(kv_heads) == num_kv
        q = query if whole else query[:, heads]
        k = key if whole else key[:, kv_heads]
        v = value if whole else value[:, kv_heads]
        m = heads_of(mask, heads)
        # a call whose key heads each serve several query heads estimates per group unless the
        # plan asks for one index per head
        granularity = "head" if k.shape[1] == q.shape[1] or section.granularity == "head" else "group"
        started = rt.clock(q) if rt.timed else 0.0
        index = build_index(rule, q, k, block_size=section.block_size, scaling=scaling,
                            attention_mask=m, granularity=granularity, softcap=softcap)
        if rt.timed:
            rt.stats.estimate_s += rt.clock(q) - started
        density = index_head_density(index, q_len, n)                       # per index head
        per_index = len(heads) // index.num_index_heads                     # query heads per index head
        limit = group_limit(dense_above["group"], per_index) if per_index > 1 else dense_above["head"]
        too_dense = (density > limit).repeat_interleave(per_index).tolist()
        if any(too_dense):
            keep = [i for i, d in enumerate(too_dense) if not d]
            dense_heads += [h for h, d in zip(heads, too_dense) if d]
            if not keep:
                continue
            # drop whole index heads; a kept GQA index head keeps all its query heads
            keep_index = sorted({i // per_index for i in keep})
            index = BlockSparseIndex(index.block_size, index.kv_blocks[:, keep_index],
                                     None if index.columns is None else index.columns[:, keep_index])
            density = density[keep_index]
            heads = [heads[i] for i in keep]
            shared = q.shape[1] // k.shape[1]
            # per-group index: keep its kv heads; per-head index: one kv head per kept query head
            kv_keep = keep_index if per_index > 1 else [i // shared for i in keep]
            q, k, v = q[:, keep], k[:, kv_keep], v[:, kv_keep]
            m = heads_of(m, keep)
            whole = False
        started = rt.clock(q) if rt.timed else 0.0
        res = block_sparse_attention(q, k, v, index, scaling=scaling, attention_mask=m,
                                     softcap=softcap, backend=rt.backend)
        if rt.timed:
            rt.stats.sparse_s += rt.clock(q) - started
        rt.stats.selected_pairs += float(density.sum()) * per_index * per_head_pairs
        rt.stats.causal_pairs += len(heads) * per_head_pairs
        if whole:
            out = res.to(out.dtype)
        else:
            out[:, heads] = res.to(out.dtype)
    if dense_heads:
        dense_heads.sort()
        heads, kv_heads = _head_subsets(dense_heads, num_heads, num_kv)
        whole = len(heads) == num_heads
        started = rt.clock(query) if rt.timed else 0.0
        res = _dense_subset(query if whole else query[:, heads], key if whole else key[:, kv_heads],
                            value if whole else value[:, kv_heads], heads_of(mask, heads), scaling, softcap)
        if rt.timed:
            rt.stats.dense_s += rt.clock(query) - started
        rt.stats.selected_pairs += len(heads) * per_head_pairs
        rt.stats.causal_pairs += len(heads) * per_head_pairs
        if whole:
            out = res.to(out.dtype)
        else:
            out[:, heads] = res.to(out.dtype)
    return out
