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
