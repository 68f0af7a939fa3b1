"""Exact per-head attention statistics, computed blockwise, and the recall of an index against them.

The true attention of one layer is never held as an n x n map: it is computed one
head and one query block at a time (bs x n at most), and reduced on the fly to

  block_mass (Hq, NQB, NKB)  attention mass of each (query block, kv block) tile
  col_mass   (Hq, NQB, n)    attention mass each key receives from each query block
  col_total  (Hq, n)         column (vertical) mass summed over all queries
  diag_mass  (Hq, n)         mass per diagonal offset (query pos - key pos): slash lines
  last_probs (Hq, dq, n)     full attention rows of the last dq queries (decode statistics)

Those two reductions are enough to give the *exact* mass a BlockSparseIndex keeps:
its blocks take whole tiles of block_mass, and its columns add the col_mass of keys
that fall outside the blocks selected for that query block. The same formula with
uniform weights (pair counts) gives the exact density, so recall and cost are
measured on the very index the prefill executor would run.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from sparse_infer.kernels.index import BlockSparseIndex


@dataclass
class AttentionStats:
    """Blockwise reductions of one layer's exact attention on one prompt (batch 1)."""

    n: int
    block_size: int
    block_mass: torch.Tensor      # (Hq, NQB, NKB)
    col_mass: torch.Tensor        # (Hq, NQB, n)
    col_total: torch.Tensor       # (Hq, n)
    diag_mass: torch.Tensor       # (Hq, n)
    last_probs: torch.Tensor      # (Hq, dq, n)
    last_pos: torch.Tensor        # (dq,) absolute positions of those queries

    @property
    def num_heads(self) -> int:
        return self.block_mass.shape[0]

    @property
    def num_queries(self) -> int:
        return self.n

    @property
    def tail_rows(self) -> int:
        """Queries in the last query block."""
        return self.n - (math.ceil(self.n / self.block_size) - 1) * self.block_size


def _bool_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """transformers hands bool (sdpa) or additive float (eager) masks; stats want bool."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point():
        return mask > torch.finfo(mask.dtype).min / 2
    return mask.bool()


def attention_stats(query: torch.Tensor, key: torch.Tensor, *, scaling: float, block_size: int,
                    decode_queries: int = 64, mask: torch.Tensor | None = None,
                    softcap: float | None = None) -> AttentionStats:
    """Exact causal softmax attention of every head, reduced blockwise.

    query (Hq, n, D), key (Hkv, n, D) post-RoPE; mask None or bool/float broadcastable to
    (1|Hq, n, n) (padding, sliding windows), intersected with causality.
    """
    hq, n, _ = query.shape
    hkv = key.shape[0]
    groups = hq // hkv
    bs = block_size
    nkb = math.ceil(n / bs)
    mask = _bool_mask(mask)
    if mask is not None:
        mask = mask.reshape(-1, *mask.shape[-2:])[..., -n:, -n:]   # (1|Hq, n, n)
    dq = min(decode_queries, n)
    first_last = n - dq
    q32, k32 = query.float() * scaling, key.float()          # scaling folded into q once

    block_mass = torch.zeros(hq, nkb, nkb)
    col_mass = torch.zeros(hq, nkb, n)
    diag_mass = torch.zeros(hq, n)
    last_probs = torch.zeros(hq, dq, n)
    future = torch.ones(bs, bs, dtype=torch.bool).triu_(1)   # inside the diagonal block only
    for h in range(hq):
        kh = k32[h // groups]
        for j in range(nkb):
            r0, r1 = j * bs, min((j + 1) * bs, n)
            rows = r1 - r0
            # keys beyond r1 are all in the future of every row of this block: never computed
            s = q32[h, r0:r1] @ kh[:r1].T
            if softcap:
                s = softcap * torch.tanh(s / softcap)
            s[:, r0:].masked_fill_(future[:rows, :rows], float("-inf"))
            if mask is not None:
                s.masked_fill_(~mask[h if mask.shape[0] > 1 else 0, r0:r1, :r1], float("-inf"))
            p = torch.softmax(s, dim=-1)
            if mask is not None:
                p = p.nan_to_num_(0.0)                            # fully masked rows keep no mass
            colsum = p.sum(0)
            col_mass[h, j, :r1] = colsum
            kb = math.ceil(r1 / bs)
            block_mass[h, j, :kb] = torch.nn.functional.pad(colsum, (0, kb * bs - r1)).view(kb, bs).sum(-1)
            # diagonal offset o = (r0 + i) - key. Reversing the keys makes row i's offsets start
            # at column rows-1-i; a strided view with row stride W-1 realigns every row to o = 0.
            w = r1 + rows
            skew = torch.nn.functional.pad(p.flip(-1), (0, rows))
            diag_mass[h, :r1] += skew.as_strided((rows, r1), (w - 1, 1), rows - 1).sum(0)
            if r1 > first_last:
                lo = max(r0, first_last)
                last_probs[h, lo - first_last:r1 - first_last, :r1] = p[lo - r0:]
    col_total = col_mass.sum(1)
    return AttentionStats(n, bs, block_mass, col_mass, col_total, diag_mass, last_probs,
                          torch.arange(first_last, n))


def last_attention(query: torch.Tensor, key: torch.Tensor, *, scaling: float, decode_queries: int = 64,
                   mask: torch.Tensor | None = None, softcap: float | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Only the decode statistics of attention_stats: the exact attention rows (Hq, dq, n) of the
    last dq queries and their positions (dq,), without the blockwise prefill reductions (which
    cost a whole causal attention per head: the bulk of profiling a long prompt)."""
    hq, n, d = query.shape
    hkv = key.shape[0]
    mask = _bool_mask(mask)
    dq = min(decode_queries, n)
    pos = torch.arange(n - dq, n)
    # a group's query rows stacked against its one kv head: K is not copied per query head
    q = (query[:, n - dq:].float() * scaling).reshape(hkv, -1, d)
    s = (q @ key.float().transpose(-1, -2)).reshape(hq, dq, n)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    allowed = torch.arange(n)[None, :] <= pos[:, None]                     # causal
    if mask is not None:
        allowed = allowed & mask.reshape(-1, *mask.shape[-2:])[..., -n:, -n:][:, n - dq:]
    probs = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
    if mask is not None:
        probs = probs.nan_to_num_(0.0)                                     # fully masked rows keep no mass
    return probs, pos


# --------------------------------------------------------------------------- index geometry
def block_bitmap(index: BlockSparseIndex, n: int) -> torch.Tensor:
    """bool (Hi, NQB, NKB) of selected kv blocks (batch 1, full prefill: NQB == NKB)."""
    kvb = index.kv_blocks[0].long()
    nkb = math.ceil(n / index.block_size)
    bitmap = torch.zeros(*kvb.shape[:2], nkb + 1, dtype=torch.bool)
    ok = (kvb >= 0) & (kvb < nkb)
    bitmap.scatter_(-1, torch.where(ok, kvb, nkb), True)
    # causality removes every pair of a block right of the diagonal: it contributes nothing
    return bitmap[..., :nkb] & _causal_blocks(nkb)


@functools.lru_cache(maxsize=16)
def _causal_blocks(nkb: int) -> torch.Tensor:
    return torch.ones(nkb, nkb, dtype=torch.bool).tril()


def column_map(index: BlockSparseIndex, n: int) -> torch.Tensor | None:
    """bool (Hi, n) of the index's columns, or None."""
    if index.columns is None or index.columns.shape[-1] == 0:
        return None
    cols = index.columns[0].long()
    cmap = torch.zeros(cols.shape[0], n + 1, dtype=torch.bool)
    cmap.scatter_(-1, torch.where((cols >= 0) & (cols < n), cols, n), True)
    return cmap[:, :n]


def _per_q_head(x: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    return x if x.shape[0] == num_q_heads else x.repeat_interleave(num_q_heads // x.shape[0], 0)


def block_part(bitmap: torch.Tensor, block_mass: torch.Tensor) -> torch.Tensor:
    """(Hq,) mass of the selected blocks; block_mass (Hq|1, NQB, NKB)."""
    hq = max(block_mass.shape[0], bitmap.shape[0])
    return (block_mass * _per_q_head(bitmap, hq)).sum((-1, -2))


def column_gain(bitmap: torch.Tensor, col_mass: torch.Tensor, bs: int) -> torch.Tensor:
    """(Hq, n): mass each key would add as a column, i.e. from query blocks not already covering it."""
    hq = max(col_mass.shape[0], bitmap.shape[0])
    h_c, nqb, n = col_mass.shape
    nkb = bitmap.shape[-1]
    # per kv block k: (uncovered query blocks) @ (their column mass inside k), one batched matmul
    cm = torch.nn.functional.pad(col_mass, (0, nkb * bs - n)).view(h_c, nqb, nkb, bs).permute(0, 2, 1, 3)
    uncovered = (~_per_q_head(bitmap, hq)).to(col_mass.dtype).permute(0, 2, 1).unsqueeze(-2)  # (Hq, NKB, 1, NQB)
    return (uncovered @ cm).reshape(hq, nkb * bs)[:, :n]


def selected_mass(index: BlockSparseIndex, block_mass: torch.Tensor, col_mass: torch.Tensor,
                  n: int, last_block_only: bool = False) -> torch.Tensor:
    """(Hq,) exact mass of `block_mass`/`col_mass` inside the index's selected pairs
    (of the last query block only, with `last_block_only`)."""
    bitmap = block_bitmap(index, n)
    if last_block_only:
        bitmap, block_mass, col_mass = bitmap[:, -1:], block_mass[:, -1:], col_mass[:, -1:]
    total = block_part(bitmap, block_mass)
    cmap = column_map(index, n)
    if cmap is not None:
        gain = column_gain(bitmap, col_mass, index.block_size)
        total = total + (_per_q_head(cmap, gain.shape[0]) * gain).sum(-1)
    return total


@functools.lru_cache(maxsize=16)
def uniform_stats(n: int, bs: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Causal pair counts laid out like (block_mass, col_mass), and the total pair count.

    Weighting every causal pair by 1 turns 'selected mass' into 'selected pairs', so
    density comes from the same exact formula as recall.
    """
    nkb = math.ceil(n / bs)
    pos = torch.arange(n)
    qb = pos // bs
    # rows of query block j that see key c: |{p in block j : p >= c}|
    row_end = torch.clamp((torch.arange(nkb) + 1) * bs, max=n)
    row_start = torch.arange(nkb) * bs
    cnt = (row_end[:, None] - torch.maximum(row_start[:, None], pos[None, :])).clamp(min=0).float()
    blocks = torch.zeros(nkb, nkb)
    blocks.index_add_(1, qb, cnt)
    return blocks[None], cnt[None], n * (n + 1) / 2


def index_recall(index: BlockSparseIndex, stats: AttentionStats) -> torch.Tensor:
    """(Hq,) mean over queries of the true attention mass inside the index's pairs."""
    return selected_mass(index, stats.block_mass, stats.col_mass, stats.n) / stats.num_queries


def index_tail_recall(index: BlockSparseIndex, stats: AttentionStats) -> torch.Tensor:
    """(Hq,) the same over the last query block only: the question and answer tokens of a
    calibration prompt, where a head that is local elsewhere may have to look far back."""
    return selected_mass(index, stats.block_mass, stats.col_mass, stats.n, True) / stats.tail_rows


def index_head_density(index: BlockSparseIndex, n: int, num_q_heads: int) -> torch.Tensor:
    """(Hq,) fraction of causal pairs the index selects, per query head."""
    blocks, cols, total = uniform_stats(n, index.block_size)
    mass = selected_mass(index, blocks, cols, n)
    return _per_q_head(mass.reshape(-1, 1), num_q_heads).reshape(-1) / total


def channel_scores(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """(Hq, D) mean |q_d * k_d| over causal (query, key) pairs, exactly.

    |q_d k_d| = |q_d| |k_d|, so the causal sum is sum_i |q_id| * cumsum_j<=i |k_jd|.
    """
    hq, n, _ = query.shape
    groups = hq // key.shape[0]
    kcum = key.float().abs().cumsum(1).repeat_interleave(groups, 0)        # (Hq, n, D)
    return (query.float().abs() * kcum).sum(1) / (n * (n + 1) / 2)
