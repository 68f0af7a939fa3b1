"""A-shape (StreamingLLM-style) prefill: attention sinks plus a local window.

Block granular: a query block keeps the blocks holding the first `sink` valid
keys and every block that any of its rows reaches within `local` positions.

`dense_tail` > 0 lets the query blocks holding the last `dense_tail` rows of the
call see every key (common.dense_tail_blocks): with only a local window the question
at the end of a prompt cannot reach the middle (RULER at SmolLM2 8K: -10.5 points
without the tail). They are a few blocks, so the cost is small.
"""
from __future__ import annotations

import torch

from sparse_infer.methods import Param, PrefillPattern, fixed_size_ok, register, window_grid
from sparse_infer.params import nonneg_int, positive_int
from sparse_infer.prefill.common import (
    Geometry, block_mask_to_index, dense_tail_blocks, index_heads, real_key_span, sink_and_diagonal_blocks,
)


def a_shape_index(query, key, rule, *, block_size, attention_mask=None, granularity="group", **_):
    batch, n = key.shape[0], key.shape[2]
    geo = Geometry(query.shape[2], n, block_size)
    device = key.device
    start, end = real_key_span(attention_mask, batch, geo.q_len, n, device)
    blocks = sink_and_diagonal_blocks(geo, start, rule.params["sink"])
    qstart, _ = geo.query_block_ranges(device)
    # earliest key any row of the block sees within the window: first row minus (local - 1)
    lo = torch.clamp(qstart - rule.params["local"] + 1, min=0) // block_size
    kb = torch.arange(geo.nkb, device=device)
    local = (kb[None, :] >= lo[:, None]) & geo.causal_blocks(device)
    local = local[None] | dense_tail_blocks(geo, rule.params["dense_tail"], end)
    blocks = blocks | local[:, None]
    hi = index_heads(query, key, granularity)
    return block_mask_to_index(blocks.expand(batch, hi, -1, -1), block_size)


@register
class AShape(PrefillPattern):
    """Sinks plus a local window; the index ignores q/k values, so the profiler builds it once per length."""

    name = "a_shape"
    label = "A"
    params = {"sink": Param(positive_int, 128), "local": Param(positive_int, 1024),
              "dense_tail": Param(nonneg_int, 0)}      # last rows of the call see every key
    # the index depends only on positions: the search and the report build it once per length
    search_evaluation = "static"

    def build_index(self, query, key, rule, **kwargs):
        return a_shape_index(query, key, rule, **kwargs)

    def search_grid(self, n, block_size):
        half = max(n // 2, block_size)
        return [{"sink": s, "local": w} for s in (block_size, 2 * block_size) for w in window_grid(block_size, half)]

    def search_combine(self, points, longest, block_size):
        # a window that must widen in proportion to the length is not a local head:
        # its need would outgrow any fixed window past the profiled lengths
        if not fixed_size_ok({L: p["local"] for L, p in points.items()}):
            return None
        params = {k: max(p[k] for p in points.values()) for k in ("sink", "local")}
        return params, params
