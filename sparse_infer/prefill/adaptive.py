"""Adaptive prefill selection (after FlexPrefill): each head picks, for the input at hand, how
much of the context it needs, by a cumulative-attention threshold instead of a fixed budget.

Per index head, the exact attention of the last `last_q` real queries (as vertical_slash) is
compared with what mean-pooled q/k blocks predict for the same queries:

- where the pooled estimate is trustworthy (the Jensen-Shannon distance between the two block
  distributions is below `tau`), the head is **query-aware**: each query block keeps the
  smallest set of kv blocks whose pooled estimate reaches `gamma` of its mass (block pattern);
- otherwise the head is **vertical-slash**: it keeps as many key columns, and as many
  diagonals, as it takes for the largest of them to reach `gamma` of the exact last-query
  attention, each counted apart, the `sink` first columns and `local` nearest diagonals it
  always keeps counting first (their mass is part of the gamma they reach).

So budgets follow the input: a head that attends locally keeps a few diagonals whatever the
length, a retrieval head keeps the columns its question points at. Sink columns, the nearest
diagonals, the sink block and the diagonal block are always kept; `dense_tail` makes the last
rows of the call dense as in the other patterns.
"""
from __future__ import annotations

import torch

from sparse_infer.methods import Param, PrefillPattern, register
from sparse_infer.params import distance, fraction, nonneg_int, positive_int
from sparse_infer.prefill.block import pooled_block_scores, select_blocks
from sparse_infer.prefill.common import (
    Geometry, block_mask_to_index, coverage_keep, dense_tail_blocks, group_mean, real_key_blocks,
    real_key_span, sink_and_diagonal_blocks,
)
from sparse_infer.prefill.vertical_slash import (
    estimate_memo, last_query_attention, slash_sums, vertical_slash_blocks,
)


def js_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sqrt of the Jensen-Shannon divergence (nats) between distributions along the last dim."""
    p = p / p.sum(-1, keepdim=True).clamp(min=1e-12)
    q = q / q.sum(-1, keepdim=True).clamp(min=1e-12)
    m = 0.5 * (p + q)

    def kl(a, b):
        return torch.where(a > 0, a * (a.clamp(min=1e-30).log() - b.clamp(min=1e-30).log()), 0.0).sum(-1)

    return (0.5 * kl(p, m) + 0.5 * kl(q, m)).clamp(min=0).sqrt()


def coverage_count(mass: torch.Tensor, gamma: float, forced: torch.Tensor | None = None) -> torch.Tensor:
    """How many entries (last dim), largest first, it takes on top of the `forced` ones for the
    kept mass to reach `gamma` of the total: (...,) long. The forced entries' mass counts first,
    so a head whose sinks and nearest diagonals already hold `gamma` needs none more."""
    keep = coverage_keep(mass, gamma, forced)
    return keep.sum(-1) - (0 if forced is None else forced.expand_as(mass).sum(-1))


def adaptive_index(query, key, rule, *, block_size, scaling, attention_mask=None, granularity="group",
                   softcap=None, **_):
    batch, num_kv, n = key.shape[:3]
    geo = Geometry(query.shape[2], n, block_size)
    device = key.device
    p = rule.params
    gamma = p["gamma"]
    start, end = real_key_span(attention_mask, batch, geo.q_len, n, device)
    key_valid_blocks = real_key_blocks(geo, start, end)

    probs, rows = last_query_attention(query, key, scaling=scaling, attention_mask=attention_mask,
                                       last_q=p["last_q"], softcap=softcap, end=end)
    probs = group_mean(probs, num_kv, granularity)                      # (B, Hi, L, n)
    pooled = group_mean(pooled_block_scores(query, key, geo, scaling, key_valid_blocks), num_kv, granularity)
    hi = probs.shape[1]

    # the pooled estimate of the last real query block against what its rows really attend
    last_block = ((end - 1) // block_size - geo.first).clamp(0, geo.nqb - 1)      # (B,)
    estimated = pooled[torch.arange(batch, device=device), :, last_block]          # (B, Hi, NKB)
    exact = torch.zeros(batch, hi, probs.shape[2], geo.nkb * block_size, device=device)
    exact[..., :n] = probs
    exact = exact.view(batch, hi, probs.shape[2], geo.nkb, block_size).sum(-1).sum(2)
    query_aware = js_distance(exact, estimated) < p["tau"]                         # (B, Hi)

    # query-aware heads: per query block, the kv blocks reaching gamma of the pooled estimate
    blocks = select_blocks(pooled, coverage=gamma, nkb=geo.nkb) & query_aware[..., None, None]

    # vertical-slash heads: the fewest columns and diagonals that, with the sinks and nearest
    # diagonals always kept, reach gamma of the estimate rows' mass (each measured apart)
    vertical = probs.sum(2)                                                         # (B, Hi, n)
    slash = slash_sums(probs, rows, n)
    kpos = torch.arange(n, device=device)
    sink_columns = ((kpos >= start[:, None]) & (kpos < start[:, None] + p["sink"]))[:, None]   # (B, 1, n)
    local_diagonals = (kpos < p["local"])[None, None]
    num_vertical = torch.where(query_aware, 0, coverage_count(vertical, gamma, sink_columns))
    num_slash = torch.where(query_aware, 0, coverage_count(slash, gamma, local_diagonals))
    vs_blocks, columns = vertical_slash_blocks(vertical, slash, geo, start, sink=p["sink"], local=p["local"],
                                               num_vertical=num_vertical, num_slash=num_slash)
    blocks |= vs_blocks & ~query_aware[..., None, None]
    columns = torch.where(query_aware[..., None], torch.full_like(columns, -1), columns)

    blocks |= sink_and_diagonal_blocks(geo, start, 1)
    blocks |= dense_tail_blocks(geo, p["dense_tail"], end)[:, None]
    blocks &= geo.causal_blocks(device)[None, None]
    return block_mask_to_index(blocks, block_size, columns=columns.contiguous())


ADAPTIVE_GAMMAS = (0.9, 0.95, 0.98, 0.99)


@register
class Adaptive(PrefillPattern):
    name = "adaptive"
    label = "ada"
    params = {
        "gamma": Param(fraction, 0.9),         # attention mass each head keeps, per input
        "tau": Param(distance, 0.1),           # below: query-aware blocks; above: vertical-slash
        "last_q": Param(positive_int, 64),
        "sink": Param(nonneg_int, 64),         # first columns always kept (vertical-slash heads)
        "local": Param(nonneg_int, 64),        # nearest diagonals always kept (vertical-slash heads)
        "dense_tail": Param(nonneg_int, 0),    # last rows of the call see every key
    }

    def search_session(self):
        # every gamma of a prompt (and vertical_slash's budgets) asks for the same last-query estimate
        return estimate_memo()

    def build_index(self, query, key, rule, **kwargs):
        return adaptive_index(query, key, rule, **kwargs)

    def search_grid(self, n, block_size):
        return [{"gamma": g} for g in ADAPTIVE_GAMMAS]

    def search_overhead(self, n, block_size):
        # the last queries' exact attention plus the pooled block scores
        return 2 * self.params["last_q"].default / n + 1 / (block_size * block_size)

    def search_combine(self, points, longest, block_size):
        params = {"gamma": max(p["gamma"] for p in points.values())}
        return params, params
