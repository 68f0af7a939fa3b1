"""Exact token selection: score every cached key with this step's query, keep the best.

Scores are exact q.k over the whole cache (this reads all of K, so it saves the V reads
and the softmax/PV work, not the K reads). For a GQA group sharing one selection, each
query head's scores go through its own softmax and the probabilities are summed over the
group (soft vote). The `budget` best eligible keys are kept on top of the first `sink`
and last `local` valid keys.

Reuse (`reuse: <cosine threshold>`): consecutive decode queries are often nearly the same
direction, and then so is their top-k. When the new query's cosine similarity to the query
that made the last selection (mean over the heads of the index head's group) is at least
the threshold, the old selection plus every token appended since is used instead of
scoring again. Decisions are per (batch row, index head); the scoring pass is skipped only
when all of them reuse. Counters: state["counters"]["full_scorings"] / ["reuses"] count
those decisions.
"""
from __future__ import annotations

import torch

from sparse_infer.decode.common import (
    GroupInputs,
    forced_and_eligible,
    grouped_scores,
    pad_indices,
    top_tokens,
    vote,
)


def score_and_select(inp: GroupInputs, rule) -> torch.Tensor:
    forced, eligible = forced_and_eligible(inp, rule.sink, rule.local)
    scores = vote(grouped_scores(inp.query, inp.key, inp.scaling, inp.softcap), inp.valid, inp.per_head)
    picked = top_tokens(scores, eligible, rule.budget.resolve(inp.n))
    return torch.cat([forced.expand(*picked.shape[:2], -1), picked], dim=-1)


def _cosine_per_index_head(inp: GroupInputs, previous: torch.Tensor) -> torch.Tensor:
    """Cosine(new query, query of the last selection) per query head, averaged per index head."""
    cos = torch.nn.functional.cosine_similarity(inp.query.float(), previous, dim=-1)   # (B, h)
    if inp.per_head:
        return cos
    return cos.view(cos.shape[0], inp.key.shape[1], -1).mean(-1)                     # (B, hk)


def select(inp: GroupInputs, rule, state: dict) -> torch.Tensor:
    counters = state.setdefault("counters", {"full_scorings": 0, "reuses": 0})
    if rule.reuse is None:
        counters["full_scorings"] += inp.query.shape[0] * inp.index_heads
        return score_and_select(inp, rule)
    last = state.get("last")
    if inp.fresh or last is None or last["query"].shape != inp.query.shape:
        reuse = torch.zeros(inp.query.shape[0], inp.index_heads, dtype=torch.bool, device=inp.key.device)
    else:
        reuse = _cosine_per_index_head(inp, last["query"]) >= rule.reuse
    n_reuse = int(reuse.sum())
    counters["reuses"] += n_reuse
    counters["full_scorings"] += reuse.numel() - n_reuse

    reused = None
    if n_reuse:
        # old selection + the tokens appended since it was made (all newer than anything in it)
        since = last["n"]                                                  # (B, Hi)
        width = inp.n - int(since.min())
        newest = torch.arange(inp.n - width, inp.n, device=inp.key.device).expand(*since.shape, -1)
        newest = newest.masked_fill(newest < since[..., None], -1)
        reused = torch.cat([last["indices"], newest], dim=-1)
        if n_reuse == reuse.numel():
            return reused

    fresh = score_and_select(inp, rule)
    n_now = torch.full(reuse.shape, inp.n, dtype=torch.long, device=inp.key.device)
    if reused is None:
        state["last"] = {"query": inp.query.float().clone(), "indices": fresh, "n": n_now}
        return fresh
    # mixed: keep the old selection where it is reused, the new one elsewhere
    width = max(fresh.shape[-1], reused.shape[-1], last["indices"].shape[-1])
    out = torch.where(reuse[..., None], pad_indices(reused, width), pad_indices(fresh, width))
    qmask = reuse if inp.per_head else reuse.repeat_interleave(inp.groups, dim=1)
    state["last"] = {
        "query": torch.where(qmask[..., None], last["query"], inp.query.float()),
        "indices": torch.where(reuse[..., None], pad_indices(last["indices"], width), pad_indices(fresh, width)),
        "n": torch.where(reuse, last["n"], n_now),
    }
    return out
