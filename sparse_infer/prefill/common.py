"""Block geometry and helpers shared by the prefill patterns.

Query blocks are aligned to absolute positions (see docs/ARCHITECTURE.md), so the
diagonal kv block of query block j is ``first_query_block + j``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparse_infer.kernels.index import BlockSparseIndex


@dataclass(frozen=True)
class Geometry:
    q_len: int
    n: int
    bs: int

    @property
    def q0(self) -> int:            # absolute position of the first query
        return self.n - self.q_len

    @property
    def first(self) -> int:         # absolute block id of the first query block
        return self.q0 // self.bs

    @property
    def nqb(self) -> int:
        return math.ceil(self.n / self.bs) - self.first

    @property
    def nkb(self) -> int:
        return math.ceil(self.n / self.bs)

    def query_block_ranges(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Absolute [start, end) of each query block's rows."""
        a = torch.arange(self.first, self.first + self.nqb, device=device)
        start = torch.clamp(a * self.bs, min=self.q0)
        end = torch.clamp((a + 1) * self.bs, max=self.n)
        return start, end

    def causal_blocks(self, device) -> torch.Tensor:
        """bool (NQB, NKB): kv block at or before the query block's diagonal."""
        diag = torch.arange(self.first, self.first + self.nqb, device=device)
        return torch.arange(self.nkb, device=device)[None, :] <= diag[:, None]


def real_key_span(attention_mask: torch.Tensor | None, batch: int, q_len: int, n: int, device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """[start, end) of the real (non-padding) keys per batch row: (B,), (B,) long.

    Read from which keys any row may attend, not from one row: on a sliding-window layer
    the last row starts at n - window, which is the window, not padding. A key in the call's
    own span is real when its own row attends it (every window holds the diagonal; a pad key
    is masked for all rows, left or right padding alike); an earlier (cached) key when any
    row attends it. A row with no real key gets the whole range.
    """
    if attention_mask is None:
        return (torch.zeros(batch, dtype=torch.long, device=device),
                torch.full((batch,), n, dtype=torch.long, device=device))
    mask = attention_mask[:, 0, -q_len:, -n:].bool()
    if mask.shape[0] != batch:
        mask = mask.expand(batch, -1, -1)
    q0 = n - q_len
    rows = torch.arange(q_len, device=device)
    valid = mask[:, rows, rows + q0]                                    # (B, q_len): the diagonal
    if q0:
        valid = torch.cat([mask[:, :, :q0].any(1), valid], dim=1)
    has_any = valid.any(-1)
    first = valid.to(torch.int8).argmax(-1)
    last = n - 1 - valid.flip(-1).to(torch.int8).argmax(-1)
    start = torch.where(has_any, first, torch.zeros_like(first)).long()
    end = torch.where(has_any, last + 1, torch.full_like(last, n)).long()
    return start, end


def real_key_blocks(geo: Geometry, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """bool (B, NKB): kv blocks holding at least one real key of [start, end) (left and right padding)."""
    block_start = torch.arange(geo.nkb, device=start.device) * geo.bs
    return (block_start[None, :] + geo.bs > start[:, None]) & (block_start[None, :] < end[:, None])


def index_heads(query: torch.Tensor, key: torch.Tensor, granularity: str) -> int:
    return key.shape[1] if granularity == "group" else query.shape[1]


def group_mean(x: torch.Tensor, num_kv_heads: int, granularity: str) -> torch.Tensor:
    """Average per-q-head statistics over each GQA group when estimating per group."""
    if granularity != "group":
        return x
    b, h = x.shape[:2]
    return x.reshape(b, num_kv_heads, h // num_kv_heads, *x.shape[2:]).mean(2)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def block_mask_to_index(block_mask: torch.Tensor, bs: int, columns: torch.Tensor | None = None) -> BlockSparseIndex:
    """bool (B, Hi, NQB, NKB) -> padded ascending kv block lists (-1 = unused slot)."""
    nkb = block_mask.shape[-1]
    ids = torch.arange(nkb, device=block_mask.device)
    keyed = torch.where(block_mask, ids, nkb)
    width = max(int(block_mask.sum(-1).max().item()) if block_mask.numel() else 0, 1)
    chosen = keyed.sort(-1).values[..., :width]
    chosen = torch.where(chosen == nkb, torch.full_like(chosen, -1), chosen)
    return BlockSparseIndex(block_size=bs, kv_blocks=chosen.long().contiguous(), columns=columns)


def coverage_keep(mass: torch.Tensor, coverage: float, forced: torch.Tensor | None = None) -> torch.Tensor:
    """bool like `mass`: the fewest entries (last dim), largest first, whose mass reaches
    `coverage` of the total, with the `forced` entries (kept whatever their mass) counted
    first. The entry that crosses the target is kept; a coverage of 1 keeps every entry,
    also those whose mass rounds to nothing in the running sum."""
    if coverage >= 1:
        return torch.ones_like(mass, dtype=torch.bool)
    target = coverage * mass.sum(-1, keepdim=True)
    if forced is not None:
        forced = forced.expand_as(mass)
        target = target - (mass * forced).sum(-1, keepdim=True)
        mass = mass.masked_fill(forced, 0.0)
    order = mass.sort(-1, descending=True)
    before = order.values.cumsum(-1) - order.values
    keep = torch.zeros_like(mass, dtype=torch.bool).scatter(-1, order.indices, before < target)
    return keep if forced is None else keep | forced


def sink_and_diagonal_blocks(geo: Geometry, start: torch.Tensor, sink_tokens: int) -> torch.Tensor:
    """bool (B, 1, NQB, NKB): blocks holding the first `sink_tokens` valid keys, plus the diagonal."""
    device = start.device
    kb = torch.arange(geo.nkb, device=device)
    lo = start // geo.bs
    hi = (start + max(sink_tokens, 1) - 1) // geo.bs
    sink = (kb[None, :] >= lo[:, None]) & (kb[None, :] <= hi[:, None]) if sink_tokens > 0 else torch.zeros(
        start.shape[0], geo.nkb, dtype=torch.bool, device=device)
    diag = torch.arange(geo.first, geo.first + geo.nqb, device=device)
    diag_mask = kb[None, :] == diag[:, None]
    return (sink[:, None, :] | diag_mask[None]) [:, None] & geo.causal_blocks(device)[None, None]


def dense_tail_blocks(geo: Geometry, tail: int, end: torch.Tensor) -> torch.Tensor:
    """bool (B, NQB, NKB): every causal block for the query blocks holding each row's last `tail` real rows.

    Those rows carry the question of a long prompt. A pattern that keeps only local or
    estimated blocks can leave them unable to reach a fact in the middle of the context.
    `end` (B,) is one past each batch row's last real key (real_key_span): with right
    padding the question sits before the pad rows, not at the end of the call.
    """
    device = end.device
    if tail <= 0:
        return torch.zeros(end.shape[0], geo.nqb, geo.nkb, dtype=torch.bool, device=device)
    qstart, qend = geo.query_block_ranges(device)
    rows = (qend[None, :] > (end - tail)[:, None]) & (qstart[None, :] < end[:, None])     # (B, NQB)
    return rows[:, :, None] & geo.causal_blocks(device)[None]
