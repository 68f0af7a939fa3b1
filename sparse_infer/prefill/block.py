"""Block-sparse prefill (FlexPrefill / XAttention style): keep the kv blocks that
carry the estimated attention mass of each query block.

Block scores come from mean-pooled q/k ("pooled") or from strided antidiagonal
sums ("antidiagonal", XAttention), then either the top `top_k` blocks or the
smallest set reaching `coverage` of the estimated mass are kept, always with the
sink and diagonal blocks. `dense_tail` > 0 makes the query blocks holding the last
`dense_tail` rows dense (common.dense_tail_blocks): a pooled estimate of the question's
block can miss the one kv block holding a needle.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sparse_infer.prefill.common import (
    Geometry, block_mask_to_index, dense_tail_blocks, group_mean, key_start, repeat_kv, sink_and_diagonal_blocks,
)


def _pad_to_blocks(x, geo: Geometry, queries: bool):
    """Zero-pad rows so they fill whole absolute blocks; returns (padded, row-valid mask)."""
    rows = x.shape[2]
    front = geo.q0 - geo.first * geo.bs if queries else 0
    total = (geo.nqb if queries else geo.nkb) * geo.bs
    back = total - rows - front
    valid = torch.zeros(total, dtype=torch.bool, device=x.device)
    valid[front:front + rows] = True
    return F.pad(x, (0, 0, front, back)), valid


def pooled_block_scores(query, key, geo: Geometry, scaling, key_valid_blocks):
    """(B, Hq, NQB, NKB) softmax over kv blocks of mean-pooled q·k."""
    b, h, _, d = query.shape
    qp, qvalid = _pad_to_blocks(query.float(), geo, True)
    kp, kvalid = _pad_to_blocks(key.float(), geo, False)
    qcount = qvalid.view(geo.nqb, geo.bs).sum(-1).clamp(min=1)
    kcount = kvalid.view(geo.nkb, geo.bs).sum(-1).clamp(min=1)
    qmean = qp.view(b, h, geo.nqb, geo.bs, d).sum(3) / qcount[:, None]
    kmean = kp.view(b, key.shape[1], geo.nkb, geo.bs, d).sum(3) / kcount[:, None]
    scores = qmean @ repeat_kv(kmean, h // key.shape[1]).transpose(-1, -2) * scaling
    allowed = geo.causal_blocks(query.device)[None, None] & key_valid_blocks[:, None, None, :]
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)


def antidiagonal_block_scores(query, key, geo: Geometry, scaling, key_valid_blocks, stride):
    """(B, Hq, NQB, NKB) block mass from strided antidiagonal sums (XAttention).

    Reshaping q with reversed strides against k with forward strides makes each
    reduced score the sum of `stride` entries along one antidiagonal, a cheap
    probe that sees both vertical and slash structure inside a block.
    """
    if geo.bs % stride:
        raise ValueError(f"block_size {geo.bs} must be a multiple of the antidiagonal stride {stride}")
    b, h, _, d = query.shape
    qp, qvalid = _pad_to_blocks(query.float(), geo, True)
    kp, kvalid = _pad_to_blocks(key.float(), geo, False)
    qr = torch.cat([qp[:, :, stride - 1 - i::stride] for i in range(stride)], dim=-1)
    kr = torch.cat([kp[:, :, i::stride] for i in range(stride)], dim=-1)
    scores = qr @ repeat_kv(kr, h // key.shape[1]).transpose(-1, -2) * (scaling / stride)
    per = geo.bs // stride
    qrow = (geo.first * geo.bs) // stride + torch.arange(qr.shape[2], device=query.device)
    kcol = torch.arange(kr.shape[2], device=query.device)
    allowed = kcol[None, :] <= qrow[:, None]
    allowed &= qvalid.view(-1, stride).any(-1)[:, None] & kvalid.view(-1, stride).any(-1)[None, :]
    allowed = allowed[None, None] & key_valid_blocks.repeat_interleave(per, -1)[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    mass = probs.view(b, h, geo.nqb, per, geo.nkb, per).sum((3, 5))
    return mass / mass.sum(-1, keepdim=True).clamp(min=1e-12)


def select_blocks(mass, *, top_k=None, coverage=None, nkb):
    """bool mask of the kept blocks per query block row."""
    order = mass.sort(-1, descending=True)
    if top_k is not None:
        keep_sorted = torch.arange(nkb, device=mass.device) < top_k.resolve(nkb)
        keep_sorted = keep_sorted.expand_as(mass)
    else:
        before = order.values.cumsum(-1) - order.values
        keep_sorted = before < coverage      # include the block that crosses the target
    keep = torch.zeros_like(keep_sorted)
    return keep.scatter(-1, order.indices, keep_sorted)


def block_index(query, key, rule, *, block_size, scaling, attention_mask=None, granularity="group", **_):
    batch, num_kv, n = key.shape[:3]
    geo = Geometry(query.shape[2], n, block_size)
    device = key.device
    p = rule.params
    start = key_start(attention_mask, batch, n, device)
    block_end = (torch.arange(geo.nkb, device=device) + 1) * block_size
    key_valid_blocks = block_end[None, :] > start[:, None]              # blocks holding a valid key
    if p["estimator"] == "antidiagonal":
        mass = antidiagonal_block_scores(query, key, geo, scaling, key_valid_blocks, p["stride"])
    else:
        mass = pooled_block_scores(query, key, geo, scaling, key_valid_blocks)
    mass = group_mean(mass, num_kv, granularity)
    keep = select_blocks(mass, top_k=p["top_k"], coverage=p["coverage"], nkb=geo.nkb)
    keep |= sink_and_diagonal_blocks(geo, start, 1)
    keep |= dense_tail_blocks(geo, p["dense_tail"], device)
    keep &= geo.causal_blocks(device)[None, None]
    return block_mask_to_index(keep, block_size)
