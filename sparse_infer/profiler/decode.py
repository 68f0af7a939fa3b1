"""Decode-time statistics: recall curves of each KV selector on the last queries of a prompt.

A decode step is one query over the whole cache, so the profiler uses the last `dq`
prompt queries (for needle prompts: the queries that copy the answer) as stand-ins
and asks, per head, how much of their true attention each selector keeps (each registered
selector's `search_curves` hook computes its curves from a CurveInputs; the built-in ones):

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

import torch

from sparse_infer.decode.common import SELECTOR_LOCAL, SELECTOR_SINK
from sparse_infer.methods import DECODE_SELECTORS


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


class CurveInputs:
    """One prompt's stand-in decode queries, as a selector's `search_curves` hook reads them.

    probs (Hq, dq, n) exact attention of the queries at `pos` (dq,); query (Hq, dq, D); key
    (Hkv, n, D). Curves run up to `size` ranked keys (default n): budgets beyond it are not
    considered (selecting more than that share of the cache is left to dense decode). `shared`:
    one selection per GQA group (see the module docstring). `rankable` are the keys a budgeted
    selector ranks (visible, outside the default sink and local window), `base_mass` (Hq,) the
    attention those always-kept keys hold. The helpers below are what the built-in hooks use."""

    def capped(self, scores: torch.Tensor) -> torch.Tensor:
        """Scaled scores as the runtime caps them before a group's vote (softcap * tanh(s / softcap))."""
        return self.softcap * torch.tanh(scores / self.softcap) if self.softcap else scores

    ranked_curve = staticmethod(_ranked_curve)
    extend = staticmethod(_extend)
    group_sum = staticmethod(group_sum)
    group_vote = staticmethod(group_vote)

    def __init__(self, probs: torch.Tensor, pos: torch.Tensor, query: torch.Tensor, key: torch.Tensor, *,
                 scaling: float, size: int | None = None, shared: bool = False, settings=None,
                 softcap: float | None = None):
        self.probs, self.pos, self.query, self.key, self.scaling = probs, pos, query, key, scaling
        # the model's logit softcap: the selectors that cap their scores before the group's vote
        # (token_select, quest) are ranked capped here too
        self.softcap = softcap
        # the search settings (None: every variant), so a hook skips curves no variant will read
        self.settings = settings
        self.n = probs.shape[-1]
        self.size = size or self.n
        self.groups = probs.shape[0] // key.shape[0]
        self.shared = shared and self.groups > 1
        base, self.visible = _base_mask(pos, self.n, SELECTOR_SINK, SELECTOR_LOCAL)
        self.rankable = self.visible & ~base
        self.base_mass = (probs * base).sum(-1).mean(-1)


def curve_entries(inputs: CurveInputs, channels: torch.Tensor | None = None) -> dict:
    """{(method, ...): curve} of every registered selector for one prompt. Selectors that need
    calibrated channels (search_needs_channels) answer only when `channels` (Hq, r) is given."""
    entries = {}
    for method in DECODE_SELECTORS.values():
        if method.search_needs_channels == (channels is not None):
            entries.update(method.search_curves(inputs, channels))
    return entries


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
