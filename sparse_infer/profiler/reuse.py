"""Cross-layer reuse chosen by decode calibration: which layers select a token set for later ones.

`layer_select` attends the whole cache exactly and publishes its top tokens; a later
`layer_reuse` layer attends only those tokens and selects nothing (sparse_infer/decode/
cross_layer.py). Whether that pays depends on how much of a layer's attention the set of an
earlier layer holds, which differs by model and layer. Calibration decides it in three steps:

1. overlap: one dense, teacher-forced pass over the calibration continuation with exact
   attention kept; for every pair of layers S < L, the share of L's attention (mean over
   heads and steps) that falls on the tokens S would publish under the reuse rule. Each
   layer's candidate source is the earlier layer whose set holds the most of it;
2. a trial per layer L: L reuses its candidate source S (S runs `layer_select`, every other
   layer dense), measured like the other decode trials (KL over the decode steps, L's
   seconds a step) plus S's seconds as a selecting layer;
3. allocation: selecting layers are added greedily while the knapsack (own levels, reuse of a
   selecting layer, or dense per layer) finds a faster plan within the KL target; a selecting
   layer runs exact attention (KL 0) at its measured selecting cost.
"""
from __future__ import annotations

import copy
import statistics
from typing import Any, Sequence

import torch

from sparse_infer.plan import Rule


def published_sets(probs: torch.Tensor, rule: Rule, kv_heads: int) -> torch.Tensor:
    """What each layer would publish from its attention `probs` (layers, Hq, n) of one step:
    bool (layers, sets, n), one set per layer (scope "layer") or per cache head ("kv_head"):
    the first `sink` and last `local` tokens and the `budget` most attended others, attention
    summed over the set's heads (as layer_select ranks them)."""
    layers, hq, n = probs.shape
    if rule.params["scope"] == "layer":
        votes = probs.sum(1, keepdim=True)
    else:
        votes = probs.view(layers, kv_heads, hq // kv_heads, n).sum(2)
    sink = min(rule.params["sink"], n)
    lo = max(n - rule.params["local"], sink)
    keep = torch.zeros_like(votes, dtype=torch.bool)
    keep[..., :sink] = True
    keep[..., lo:] = True
    k = min(rule.params["budget"].resolve(n), lo - sink)
    if k > 0:
        keep.scatter_(-1, votes[..., sink:lo].topk(k, dim=-1).indices + sink, True)
    return keep


def held_mass(probs: torch.Tensor, sets: torch.Tensor) -> torch.Tensor:
    """(sources, layers): the share of layer L's attention `probs` (layers, Hq, n) on the set
    source S published (`sets`, (sources, 1 or Hkv, n)), mean over L's heads; cache head j of
    L reads set j of S when there is one per cache head."""
    layers, hq, n = probs.shape
    per_set = sets.shape[1]
    grouped = probs.view(layers, per_set, hq // per_set, n)
    return torch.einsum("lsgn,tsn->tl", grouped, sets.to(probs.dtype)) / hq


@torch.no_grad()
def overlap(model: Any, prefilled, continuation: Sequence[int], rule: Rule, batch: int = 1) -> torch.Tensor:
    """(layers, layers) M[S, L]: the share of layer L's exact decode attention that falls on the
    set layer S publishes, mean over heads and over the teacher-forced steps of `continuation`
    (fed after a copy of the dense `prefilled` cache). The diagonal is each layer's own set.
    NaN where S and L cache different lengths (a sliding-window layer beside a full one): a
    layer reuses only a set over its own keys (LayerReuse.select). `batch`: the rows of
    `prefilled` (copies of one prompt); row 0 is read."""
    device = next(model.parameters()).device
    kv_heads = model.config.num_key_value_heads
    cache = copy.deepcopy(prefilled)
    previous = model.config._attn_implementation
    total = None
    model.set_attn_implementation("eager")       # the only implementation that returns attention
    try:
        for token in continuation[:-1]:
            out = model(input_ids=torch.tensor([[token]] * batch, device=device), cache=cache, use_cache=True,
                        output_attentions=True)
            per_layer = [a[0, :, -1].float().cpu() for a in out.attentions]     # (Hq, n) each
            layers = len(per_layer)
            mass = torch.full((layers, layers), float("nan"))
            by_length: dict[int, list[int]] = {}
            for idx, probs in enumerate(per_layer):
                by_length.setdefault(probs.shape[-1], []).append(idx)
            for idxs in by_length.values():
                probs = torch.stack([per_layer[i] for i in idxs])
                at = torch.tensor(idxs)
                mass[at[:, None], at[None, :]] = held_mass(probs, published_sets(probs, rule, kv_heads))
            total = mass if total is None else total + mass
    finally:
        model.set_attn_implementation(previous)
    return total / max(len(continuation) - 1, 1)


def best_sources(matrix: torch.Tensor) -> list[int | None]:
    """Per layer L, the earlier layer S whose set holds the most of L's attention; None for layer
    0 and for a layer no earlier layer caches the same keys of (NaN in `matrix`)."""
    sources: list[int | None] = [None]
    for layer in range(1, matrix.shape[0]):
        column = matrix[:layer, layer]
        fits = ~column.isnan()
        sources.append(int(column.nan_to_num(float("-inf")).argmax()) if fits.any() else None)
    return sources


def selecting_seconds(trials: dict, reuse_level: int) -> dict[int, float]:
    """Each source layer's seconds a step as a selecting layer: the median over the reuse trials
    (key level `reuse_level`) it was the source of."""
    runs: dict[int, list[float]] = {}
    for (_, level), t in trials.items():
        if level == reuse_level and t.source is not None and t.source_seconds is not None:
            runs.setdefault(t.source, []).append(t.source_seconds)
    return {source: statistics.median(v) for source, v in runs.items()}


def allocate_with_reuse(dense_seconds: Sequence[float], trials: dict, levels: int,
                        target_kl: float) -> tuple[list[int | None], list[int], float, float]:
    """Own levels, reuse or dense per layer, with the selecting layers chosen greedily.

    `trials[(L, levels)]` are the reuse trials (their `source`, `source_seconds`). A layer
    chosen to select runs layer_select: KL 0 at its selecting seconds (the median over the
    trials it was the source of), no other option. Selecting layers are added one at a time,
    the one that lowers the knapsack's seconds most, while any does; one that ends with no
    reusing layer is dropped. Returns (choice: None dense | level | `levels` = reuse, the
    selecting layers, predicted KL, predicted seconds)."""
    from sparse_infer.profiler.calibrate import allocate

    reuse = levels
    select_seconds = selecting_seconds(trials, reuse)

    def solve(selecting: frozenset[int]):
        seconds = list(dense_seconds)
        for s in selecting:
            seconds[s] = select_seconds[s]
        kept = {key: t for key, t in trials.items()
                if key[0] not in selecting and (key[1] != reuse or t.source in selecting)}
        choice, kl, total = allocate(seconds, kept, levels + 1, target_kl)
        return choice, kl, total

    selecting: frozenset[int] = frozenset()
    best = solve(selecting)
    while True:
        tries = [(solve(selecting | {s}), s) for s in sorted(select_seconds) if s not in selecting]
        if not tries:
            break
        (result, s) = min(tries, key=lambda item: item[0][2])
        if result[2] >= best[2]:
            break
        selecting, best = selecting | {s}, result
    while True:     # a selecting layer whose readers moved to a later one only costs time
        used = {trials[(layer, c)].source for layer, c in enumerate(best[0]) if c == reuse}
        idle = selecting - used
        if not idle:
            break
        selecting = selecting - idle
        best = solve(selecting)
    choice, kl, total = best
    return choice, sorted(selecting), kl, total
