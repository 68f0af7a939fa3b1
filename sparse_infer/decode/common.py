"""Pieces every decode selector shares: which keys may be chosen, top-k into index lists,
GQA score layout, a growable buffer for incremental side state, and grouped dense decode.

Shapes: B batch, h query heads of the group, hk key heads of the group, G = h // hk,
Hi = index heads (hk when the group shares one selection, h when each query head has its own),
n kv length. Index lists are int64 (B, Hi, K), -1 = unused slot (the executor contract).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from sparse_infer.methods import DecodeSelector, Param, budget_grid, combine_budget, curve_at, resolve
from sparse_infer.params import nonneg_int, parse_budget

NEG_INF = float("-inf")
# the always-kept tokens of the budgeted selectors by default; the profiler's recall curves
# assume them (sparse_infer.profiler.decode)
SELECTOR_SINK = 16
SELECTOR_LOCAL = 64


@dataclass
class GroupInputs:
    """One rule's slice of a decode step, as the selectors see it."""

    query: torch.Tensor            # (B, h, D), this step's query
    key: torch.Tensor              # (B, hk, n, D), whole cache after this step's update
    valid: torch.Tensor | None     # (B, Hi, n) bool, keys the mask lets this step see; None = all
    per_head: bool                 # True: one selection per query head (Hi = h); else per kv group (Hi = hk)
    scaling: float
    softcap: float | None
    fresh: bool                    # True: the cache is not the continuation of the one in the side state
    published: dict | None = None  # layer -> (kv length, first cache head, (B, S, K) token sets) of this step
    first_kv: int = 0              # the layer's cache head that key[:, 0] is
    # (B,) int64 when `valid` is a suffix [starts[b], n) of the keys for every head (left
    # padding, a sliding window): the fused C steps take that range; None otherwise
    starts: torch.Tensor | None = None

    @property
    def groups(self) -> int:
        return self.query.shape[1] // self.key.shape[1]

    @property
    def n(self) -> int:
        return self.key.shape[2]

    @property
    def index_heads(self) -> int:
        return self.query.shape[1] if self.per_head else self.key.shape[1]


@dataclass(frozen=True)
class KeyRange:
    """The keys left for scoring when nothing is masked: positions start <= t < stop (after
    the sinks, before the local window). Kept as two ints so that no (B, H, n) mask is built
    on every decode step."""

    start: int
    stop: int


def forced_and_eligible(inp: GroupInputs, sink: int, local: int):
    """Indices of the always-kept tokens (first `sink` and last `local` valid keys) and the
    keys left for scoring: a KeyRange when nothing is masked, else a bool (B, Hi, n) tensor."""
    B, Hi, n = inp.query.shape[0], inp.index_heads, inp.n
    device = inp.key.device
    if inp.valid is None:
        # no mask: sink and window are plain position ranges, no per-row work needed
        s = min(sink, n)
        lo = max(n - local, s)
        pos = torch.cat([torch.arange(s, device=device), torch.arange(lo, n, device=device)])
        return pos.view(1, 1, -1).expand(B, Hi, -1), KeyRange(s, lo)
    valid = inp.valid
    rank_front = valid.cumsum(-1)                              # 1-based rank among valid keys
    rank_back = valid.sum(-1, keepdim=True) - rank_front + 1
    forced_mask = valid & ((rank_front <= sink) | (rank_back <= local))
    k = min(sink + local, n)
    if k == 0:
        return torch.empty(B, Hi, 0, dtype=torch.long, device=device), valid.clone()
    # forced keys first: topk of the bool mask lists them (order irrelevant), the rest -> -1
    vals, forced = forced_mask.to(torch.uint8).topk(k, dim=-1)
    forced = forced.masked_fill(vals == 0, -1)
    return forced, valid & ~forced_mask


def top_tokens(scores: torch.Tensor, eligible, budget: int) -> torch.Tensor:
    """The `budget` best eligible keys per row of scores (B, Hi, n); slots with no eligible key -> -1.

    eligible: a KeyRange (top-k over that slice only) or a bool (B, Hi, n) tensor."""
    if isinstance(eligible, KeyRange):
        part = scores[..., eligible.start: eligible.stop]
        k = min(budget, part.shape[-1])
        vals, idx = part.topk(k, dim=-1, sorted=False)
        return (idx + eligible.start).masked_fill(vals == NEG_INF, -1)
    k = min(budget, scores.shape[-1])
    scores = scores.masked_fill(~eligible, NEG_INF)
    vals, idx = scores.topk(k, dim=-1, sorted=False)
    return idx.masked_fill(vals == NEG_INF, -1)


def pad_indices(idx: torch.Tensor, width: int) -> torch.Tensor:
    if idx.shape[-1] >= width:
        return idx
    pad = idx.new_full((*idx.shape[:-1], width - idx.shape[-1]), -1)
    return torch.cat([idx, pad], dim=-1)


def grouped_scores(query: torch.Tensor, key: torch.Tensor, scaling: float, softcap) -> torch.Tensor:
    """q.k per query head without repeating K for GQA: (B, hk, G, n), returned in fp32.

    The product runs in K's dtype (GPU matmuls accumulate in fp32 anyway) so that a bf16
    cache is not copied to fp32 on every step."""
    B, h, D = query.shape
    hk = key.shape[1]
    q = (query.to(key.dtype) * scaling).view(B, hk, h // hk, D)   # scale the query, not n scores
    s = torch.matmul(q, key.transpose(-1, -2)).float()
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    return s


def vote(scores: torch.Tensor, valid: torch.Tensor | None, per_head: bool) -> torch.Tensor:
    """Scores (B, hk, G, m) -> selection scores (B, Hi, m).

    Per head: the raw scores (top-k of a softmax is top-k of its logits). Per group: softmax
    per query head, summed over the group's heads, so every head's attention mass gets an
    equal say (a "soft vote") instead of letting the head with the largest logits decide.
    `valid` (B, Hi, m) excludes positions before the softmax.
    """
    B, hk, G, m = scores.shape
    if per_head:
        out = scores.reshape(B, hk * G, m)
        return out if valid is None else out.masked_fill(~valid, NEG_INF)
    if valid is not None:
        scores = scores.masked_fill(~valid[:, :, None], NEG_INF)
    probs = torch.softmax(scores, dim=-1)
    if valid is None:
        return probs.sum(2)
    out = probs.nan_to_num_(0.0).sum(2)                       # an all-masked row votes nothing
    return out.masked_fill(~valid, NEG_INF)


class GrowBuffer:
    """A (B, H, capacity, C) tensor filled along dim 2, grown in steps so that appending one
    token per decode step is an in-place write, not a copy of everything held so far."""

    def __init__(self, rows: torch.Tensor, chunk: int = 64):
        self.chunk = chunk
        self.length = rows.shape[2]
        self.data = rows.new_empty(*rows.shape[:2], self._capacity(self.length), rows.shape[3])
        self.data[:, :, : self.length] = rows

    def _capacity(self, length: int) -> int:
        # 1/8 headroom (at least a chunk), rounded to whole chunks: a copy every ~n/8 appends
        # (amortised O(1) per token) for at most ~1.15x the memory of the rows held
        return -(-(length + max(length // 8, self.chunk)) // self.chunk) * self.chunk

    def view(self) -> torch.Tensor:
        return self.data[:, :, : self.length]

    def ensure(self, length: int) -> None:
        if length > self.data.shape[2]:
            grown = self.data.new_empty(*self.data.shape[:2], self._capacity(length), self.data.shape[3])
            grown[:, :, : self.length] = self.data[:, :, : self.length]
            self.data = grown

    def append(self, rows: torch.Tensor) -> None:
        self.ensure(self.length + rows.shape[2])
        self.data[:, :, self.length: self.length + rows.shape[2]] = rows
        self.length += rows.shape[2]

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


def grouped_dense_decode(query, key, value, mask, scaling, softcap):
    """Dense one-query attention over the whole cache for a head subset, GQA kept without
    copying K/V: query (B, h, 1, D), key/value (B, hk, n, D), mask None or bool (B, 1|h, 1, n)."""
    if not softcap:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                              enable_gqa=key.shape[1] != query.shape[1])
    B, h = query.shape[:2]
    hk, n = key.shape[1], key.shape[2]
    G = h // hk
    s = grouped_scores(query[:, :, 0], key, scaling, softcap)          # (B, hk, G, n)
    if mask is not None:
        m = mask[:, :, 0]                                              # (B, 1|h, n)
        m = m.view(B, 1, 1, n) if m.shape[1] == 1 else m.view(B, hk, G, n)
        s = s.masked_fill(~m, NEG_INF)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    out = torch.matmul(p.to(value.dtype), value)                       # (B, hk, G, Dv)
    return out.view(B, h, 1, value.shape[-1]).to(query.dtype)


class BudgetedSelector(DecodeSelector):
    """A selector keeping the first `sink` and last `local` valid keys plus `budget` chosen ones;
    the profiler reads its recall from the curve named like the method."""

    # the parameters every budgeted selector takes (a subclass adds its own around them)
    budget_params: ClassVar[dict[str, Param]] = {
        "budget": Param(parse_budget),
        "sink": Param(nonneg_int, SELECTOR_SINK),
        "local": Param(nonneg_int, SELECTOR_LOCAL),
    }

    def selected_budget(self, rule, n: int) -> int:
        """Tokens the `budget` of a rule selects at length n (a selector choosing whole pages rounds up)."""
        return rule.params["budget"].resolve(n)

    def expected_rows(self, rule, n):
        return min(n, self.selected_budget(rule, n) + rule.params["sink"] + rule.params["local"])

    def search_grid(self, n):
        half = max(n // 2, 64)              # the recall curves stop at half the cache (layer.curve_size)
        return [{"budget": b} for b in budget_grid(16, half)]

    def search_recall(self, curves, params, n):
        return curve_at(curves[self.name], resolve(params["budget"], n))

    def search_combine(self, points, channel_list):
        return {"budget": combine_budget({L: p["budget"] for L, p in points.items()})}

    def ranked_curve(self, inputs, scores) -> dict:
        """The curve of keeping the `b` best rankable keys by `scores` (None: the true attention),
        plus the always-kept keys' mass."""
        curve = inputs.ranked_curve(inputs.probs, scores, inputs.rankable, inputs.size)
        return {(self.name,): curve + inputs.base_mass[:, None]}
