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

import math

import torch
import torch.nn.functional as F

from sparse_infer.methods import Param, PrefillPattern, register
from sparse_infer.params import PlanError, fraction, nonneg_int, parse_budget, positive_int
from sparse_infer.prefill.common import (
    Geometry, block_mask_to_index, dense_tail_blocks, group_mean, real_key_blocks, real_key_span, repeat_kv,
    coverage_keep, sink_and_diagonal_blocks,
)


def _pad_to_blocks(x, geo: Geometry, queries: bool):
    """Zero-pad rows so they fill whole absolute blocks; returns (padded, row-valid mask)."""
    rows = x.shape[2]
    front = geo.q0 - geo.first * geo.bs if queries else 0
    total = (geo.nqb if queries else geo.nkb) * geo.bs
    back = total - rows - front
    valid = torch.zeros(total, dtype=torch.bool, device=x.device)
    valid[front:front + rows] = True
    return (F.pad(x, (0, 0, front, back)) if front or back else x), valid


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


# score elements per chunk of the antidiagonal estimate: bounds its memory at long contexts
# (unchunked it is (N/stride)^2 floats per head: 15 GB for 14 heads at 128K, stride 8)
ANTIDIAGONAL_CHUNK_ELEMENTS = 1 << 24


def antidiagonal_block_scores(query, key, geo: Geometry, scaling, key_valid_blocks, stride):
    """(B, Hq, NQB, NKB) block mass from strided antidiagonal sums (XAttention).

    Reshaping q with forward strides against k with reversed strides makes each
    reduced score the sum of `stride` entries along one antidiagonal, a cheap
    probe that sees both vertical and slash structure inside a block. The reduced
    rows go in chunks of query blocks, each scored only against the keys it can see:
    that skips the masked upper half and bounds memory.
    """
    if geo.bs % stride:
        raise ValueError(f"block_size {geo.bs} must be a multiple of the antidiagonal stride {stride}")
    b, h, _, d = query.shape
    hk = key.shape[1]
    groups, per, sd = h // hk, geo.bs // stride, stride * d
    qp, qvalid = _pad_to_blocks(query.float(), geo, True)
    kp, kvalid = _pad_to_blocks(key.float(), geo, False)
    # sum_i q[r*s + s-1-i] . k[c*s + i] = sum_j q[r*s + j] . k[c*s + s-1-j]: reversing k (the
    # smaller tensor under GQA) leaves q a plain view. Heads of one kv group go side by side,
    # so that a chunk of rows is one contiguous (rows * groups, sd) matrix against its kv head.
    # (splitting dims is a view for any strides: models hand q over as a transposed (b, n, h, d))
    q_view = qp.unflatten(1, (hk, groups)).unflatten(3, (-1, stride)).permute(0, 1, 3, 2, 4, 5)
    qr = torch.mul(q_view, scaling / stride, out=torch.empty(q_view.shape, device=query.device, dtype=torch.float32))
    qr = qr.view(b, hk, -1, groups, sd)                                  # (b, hk, NQr, groups, sd)
    kr = kp.view(b, hk, -1, stride, d).flip(3).reshape(b, hk, -1, sd)   # (b, hk, NKr, sd)
    q_row_valid = qvalid.view(-1, stride).any(-1)
    k_col_valid = kvalid.view(-1, stride).any(-1)[None, :] & key_valid_blocks.repeat_interleave(per, -1)
    mass = torch.zeros(b, h, geo.nqb, geo.nkb, device=query.device)
    # about 8 chunks already skip ~44% of the score matrix (the upper half, less the diagonal
    # chunks); more only adds per-chunk overhead unless memory asks for smaller ones
    chunk = min(math.ceil(geo.nqb / 8), max(1, ANTIDIAGONAL_CHUNK_ELEMENTS // (b * h * per * geo.nkb * per)))
    lowest = torch.finfo(torch.float32).min
    for qb0 in range(0, geo.nqb, chunk):
        qb1 = min(qb0 + chunk, geo.nqb)
        kb = geo.first + qb1                    # kv blocks this chunk can see (causal)
        nq, r0, r1, kc = qb1 - qb0, qb0 * per, qb1 * per, kb * per
        rows = r1 - r0
        scores = qr[:, :, r0:r1].reshape(b, hk, rows * groups, sd) @ kr[:, :, :kc].transpose(-1, -2)
        qrow = geo.first * per + torch.arange(r0, r1, device=query.device)
        allowed = (torch.arange(kc, device=query.device)[None, :] <= qrow[:, None]) & q_row_valid[r0:r1, None]
        allowed = allowed[None] & k_col_valid[:, None, :kc]                       # (b, rows, kc)
        # lowest instead of -inf: a fully masked row (padding) gets finite values, zeroed below
        scores.view(b, hk, rows, groups, kc).masked_fill_(~allowed[:, None, :, None, :], lowest)
        probs = torch.softmax(scores, -1).view(b, hk, nq, per, groups, kb, per).sum(-1)
        probs *= allowed.any(-1).view(b, 1, nq, per, 1, 1)
        mass[:, :, qb0:qb1, :kb] = probs.sum(3).permute(0, 1, 3, 2, 4).reshape(b, h, nq, kb)
    return mass / mass.sum(-1, keepdim=True).clamp(min=1e-12)


def select_blocks(mass, *, top_k=None, coverage=None, nkb):
    """bool mask of the kept blocks per query block row."""
    if top_k is None:
        return coverage_keep(mass, coverage)
    order = mass.sort(-1, descending=True)
    keep_sorted = (torch.arange(nkb, device=mass.device) < top_k.resolve(nkb)).expand_as(mass)
    return torch.zeros_like(keep_sorted).scatter(-1, order.indices, keep_sorted)


def block_index(query, key, rule, *, block_size, scaling, attention_mask=None, granularity="group", **_):
    batch, num_kv, n = key.shape[:3]
    geo = Geometry(query.shape[2], n, block_size)
    device = key.device
    p = rule.params
    start, end = real_key_span(attention_mask, batch, geo.q_len, n, device)
    key_valid_blocks = real_key_blocks(geo, start, end)
    if p["estimator"] == "antidiagonal":
        mass = antidiagonal_block_scores(query, key, geo, scaling, key_valid_blocks, p["stride"])
    else:
        mass = pooled_block_scores(query, key, geo, scaling, key_valid_blocks)
    mass = group_mean(mass, num_kv, granularity)
    keep = select_blocks(mass, top_k=p["top_k"], coverage=p["coverage"], nkb=geo.nkb)
    keep |= sink_and_diagonal_blocks(geo, start, 1)
    keep |= dense_tail_blocks(geo, p["dense_tail"], end)[:, None]
    keep &= geo.causal_blocks(device)[None, None]
    return block_mask_to_index(keep, block_size)


def _estimator(value, path):
    if value not in ("pooled", "antidiagonal"):
        raise PlanError(path, f"must be 'pooled' or 'antidiagonal', got {value!r}")
    return value


BLOCK_COVERAGES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)   # the coverages the profiler tries


@register
class Block(PrefillPattern):
    name = "block"
    label = "blk"
    params = {
        "top_k": Param(parse_budget, None),     # number of kv blocks per query block
        "coverage": Param(fraction, None),      # or: smallest set reaching this estimated mass
        "estimator": Param(_estimator, "pooled"),
        "stride": Param(positive_int, 8),       # antidiagonal stride
        "dense_tail": Param(nonneg_int, 0),     # last rows of the call see every key
    }

    def check(self, params, path):
        if (params["top_k"] is None) == (params["coverage"] is None):
            raise PlanError(path, "pattern 'block' needs exactly one of top_k or coverage")

    def check_section(self, rule, path, section, layer):
        if rule.estimator == "antidiagonal" and section.block_size % rule.stride:
            raise PlanError(f"{path}.stride", f"the antidiagonal stride {rule.stride} must divide "
                                              f"prefill.block_size {section.block_size}")

    def build_index(self, query, key, rule, **kwargs):
        return block_index(query, key, rule, **kwargs)

    def search_grid(self, n, block_size):
        return [{"coverage": c} for c in BLOCK_COVERAGES]

    def search_overhead(self, n, block_size):
        return 1 / (block_size * block_size)    # pooled (n/bs)^2 block scores

    def search_combine(self, points, longest, block_size):
        params = {"coverage": max(p["coverage"] for p in points.values())}
        return params, params
