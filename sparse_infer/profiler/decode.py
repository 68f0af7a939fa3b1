"""Decode-time statistics: recall curves of each KV selector on the last queries of a prompt.

A decode step is one query over the whole cache, so the profiler uses the last `dq`
prompt queries (for needle prompts: the queries that copy the answer) as stand-ins
and asks, per head, how much of their true attention each selector keeps:

  streaming       {sink, local}       fixed sinks + recent window
  token_select    {budget}            exact top-budget keys (oracle ranking)
  quest           {page, budget}      top pages by the Quest upper bound sum_d max(q_d*min_d, q_d*max_d)
  double_sparsity {channels, budget}  top keys by q.k restricted to the calibrated channels

Every budgeted selector also keeps its `sink` first and `local` last tokens (the plan
defaults), and ranks only the keys outside them; budget counts the ranked keys.
Results are *curves* (mean recall after the b best keys, for every b), so a budget
resolved at any length is evaluated exactly, not snapped to a grid.

`shared=True` ranks as the runtime does when a whole GQA group shares one selection
(sparse_infer.decode.common.vote): each head's scores go through its own softmax and are
summed over the group, and every head of the group is scored on that one ranking. Then
each head's curve is what it really keeps, and one selection per kv head is what decode
reads (a per-head selection is gathered once per query head, so it costs G times its
share of the traffic against dense, which reads each kv head once for the whole group).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sparse_infer.decode.common import SELECTOR_LOCAL, SELECTOR_SINK
from sparse_infer.decode.quest import QUEST_PAGE
from sparse_infer.decode.streaming import STREAMING_SINKS
from sparse_infer.methods import curve_at  # noqa: F401 - re-exported: read by the methods' search_recall


@dataclass
class DecodeCurves:
    """Per head (rows) recall curves of one prompt, averaged over its last queries."""

    n: int
    base: torch.Tensor                    # (Hq,) mass of sink + local tokens kept by every selector
    token_select: torch.Tensor            # (Hq, n) recall after the b best extra keys, b = index + 1
    quest: torch.Tensor                   # (Hq, npages) after the k best extra pages
    double_sparsity: torch.Tensor | None  # (Hq, n), once channels are known
    streaming: dict = field(default_factory=dict)   # sink -> (Hq, n): recall with window w = index + 1


def _base_mask(pos: torch.Tensor, n: int, sink: int, local: int) -> tuple[torch.Tensor, torch.Tensor]:
    keys = torch.arange(n)[None, :]
    visible = keys <= pos[:, None]
    base = visible & ((keys < sink) | (keys > pos[:, None] - local))
    return base, visible


def _ranked_curve(probs: torch.Tensor, scores: torch.Tensor | None, rankable: torch.Tensor,
                  size: int) -> torch.Tensor:
    """(Hq, size) mean over queries of the true mass of the b highest-`scores` rankable keys
    (b = 1..size); scores None ranks by the true attention itself (an oracle top-k)."""
    gained = torch.where(rankable, probs, 0.0)
    k = min(size, probs.shape[-1])
    if scores is None:
        top = gained.topk(k, dim=-1).values
    else:
        order = scores.masked_fill(~rankable, float("-inf")).topk(k, dim=-1).indices
        top = gained.gather(-1, order)
    curve = top.cumsum(-1).mean(1)
    return _extend(curve, size)


def _extend(curve: torch.Tensor, size: int) -> torch.Tensor:
    """Past the last key nothing more can be gained: repeat the last value up to `size`."""
    if curve.shape[-1] >= size:
        return curve[..., :size]
    return torch.cat([curve, curve[..., -1:].expand(*curve.shape[:-1], size - curve.shape[-1])], -1)


def group_sum(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(Hq, ...) per-head values -> their sum over the `groups` heads of each kv head, repeated for each head."""
    return x.view(x.shape[0] // groups, groups, *x.shape[1:]).sum(1).repeat_interleave(groups, 0)


def group_vote(scores: torch.Tensor, allowed: torch.Tensor, groups: int) -> torch.Tensor:
    """(Hq, dq, m) per-head scores -> the group's soft vote, repeated for each of its heads:
    softmax per head over the `allowed` (dq, m) items, summed over the `groups` heads of a kv head."""
    probs = torch.softmax(scores.float().masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    return group_sum(probs, groups)


def decode_curves(probs: torch.Tensor, pos: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                  *, scaling: float, size: int | None = None, shared: bool = False) -> DecodeCurves:
    """probs (Hq, dq, n) exact attention of the queries at `pos`; query (Hq, dq, D); key (Hkv, n, D).

    Curves run up to `size` ranked keys (default n): budgets beyond it are not considered
    (selecting more than that share of the cache is left to dense decode). `shared`: one
    selection per GQA group (see the module docstring)."""
    hq, dq, n = probs.shape
    size = size or n
    groups = hq // key.shape[0]
    base, visible = _base_mask(pos, n, SELECTOR_SINK, SELECTOR_LOCAL)
    rankable = visible & ~base
    base_mass = (probs * base).sum(-1).mean(-1)
    # token_select's scores are exact, so its ranking is the true attention (summed per group)
    oracle = group_sum(probs, groups) if shared and groups > 1 else None
    token_select = _ranked_curve(probs, oracle, rankable, size) + base_mass[:, None]

    # Quest: page bounds from per-page channel min/max
    page = QUEST_PAGE
    npages = math.ceil(n / page)
    kpad = torch.nn.functional.pad(key.float(), (0, 0, 0, npages * page - n), value=float("nan"))
    kpages = kpad.view(key.shape[0], npages, page, -1)
    kmax = kpages.nan_to_num(float("-inf")).amax(2).repeat_interleave(groups, 0)
    kmin = kpages.nan_to_num(float("inf")).amin(2).repeat_interleave(groups, 0)
    q = query.float()
    bound = q.clamp(min=0) @ kmax.transpose(-1, -2) + q.clamp(max=0) @ kmin.transpose(-1, -2)
    # as in sparse_infer.decode.quest: a page competes only if it holds a key that is neither
    # forced (sink/local) nor in the future
    page_ok = torch.nn.functional.pad(rankable, (0, npages * page - n)).view(dq, npages, page).any(-1)
    if shared and groups > 1:
        bound = group_vote(bound * scaling, page_ok, groups)
    page_mass = torch.nn.functional.pad(torch.where(rankable, probs, 0.0), (0, npages * page - n))
    page_mass = page_mass.view(hq, dq, npages, page).sum(-1)
    quest = _ranked_curve(page_mass, bound, page_ok.expand(hq, -1, -1), math.ceil(size / page)) + base_mass[:, None]

    streaming = {}
    keys = torch.arange(n)
    span = min(size, n)
    # the key at distance t behind the query (window w keeps t < w)
    behind = pos[:, None] - keys[None, :span]                             # (dq, span)
    ok = behind >= 0
    for sink in STREAMING_SINKS:
        sink_mass = (probs[..., :sink] * (keys[:sink][None, :] <= pos[:, None])).sum(-1)
        mid = probs.masked_fill((keys < sink)[None, None, :], 0.0)
        window = torch.where(ok, mid.gather(-1, behind.clamp(min=0).expand(hq, dq, span)), 0.0)
        streaming[sink] = _extend((window.cumsum(-1) + sink_mass[..., None]).mean(1), size)
    return DecodeCurves(n, base_mass, token_select, quest, None, streaming)


def double_sparsity_curve(probs: torch.Tensor, pos: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                          channels: torch.Tensor, size: int | None = None, *, scaling: float = 1.0,
                          shared: bool = False) -> torch.Tensor:
    """(Hq, size) recall curve ranking keys by q.k over `channels` (Hq, r) only, plus sink/local.

    `shared`: one selection per GQA group, from the group's soft vote (the heads of a group
    must then have the same channels, as one label cache per kv head serves them)."""
    hq, dq, n = probs.shape
    groups = hq // key.shape[0]
    base, visible = _base_mask(pos, n, SELECTOR_SINK, SELECTOR_LOCAL)
    rankable = visible & ~base
    k = key.float().repeat_interleave(groups, 0)                             # (Hq, n, D)
    qc = query.float().gather(-1, channels[:, None, :].expand(hq, dq, -1))
    kc = k.gather(-1, channels[:, None, :].expand(hq, n, -1))
    approx = qc @ kc.transpose(-1, -2)
    if shared and groups > 1:
        approx = group_vote(approx * scaling, visible.expand(hq, -1, -1), groups)
    base_mass = (probs * base).sum(-1).mean(-1)
    return _ranked_curve(probs, approx, rankable, size or n) + base_mass[:, None]


def retrieval_hits(probs: torch.Tensor, pos: torch.Tensor, input_ids: torch.Tensor,
                   answer_positions: list[int], needle_span: tuple[int, int]) -> tuple[torch.Tensor, int]:
    """Retrieval-head hits (Wu et al., 2024) with the answer teacher-forced.

    The query at t - 1 produces answer token ids[t]; a head scores a hit when its
    argmax attention lands inside the needle on a token equal to ids[t], i.e. it is
    the head copying the needle. Returns (hits per head, number of copyable tokens).
    """
    ids = input_ids.reshape(-1)
    first = int(pos[0])
    lo, hi = needle_span
    needle_tokens = set(ids[lo:hi].tolist())
    hits = torch.zeros(probs.shape[0])
    count = 0
    for t in answer_positions:
        row = t - 1 - first
        token = int(ids[t])
        if row < 0 or token not in needle_tokens:
            continue
        count += 1
        top = probs[:, row].argmax(-1)
        hits += ((top >= lo) & (top < hi) & (ids[top] == token)).float()
    return hits, count
