"""Cross-layer reuse of one token selection per step (position-persistent sparse attention,
as in TidalDecode): a few layers choose, the layers after them read what was chosen.

    layer_select   attends the whole cache (exactly, as dense does) and, from the same scores,
                   publishes the `budget` tokens with the most attention summed over the
                   rule's heads (plus the first `sink` and last `local` valid ones)
    layer_reuse    attends only the tokens layer `from_layer` published in this step

The top tokens of neighbouring layers overlap strongly, so a layer that reuses a set pays no
selection at all: it only reads the chosen rows of K and V. With `scope: layer` one set serves
every head of the reusing layer (heads of different layers do not correspond, positions do);
with `scope: kv_head` cache head j of a reusing layer reads the set of cache head j.

The decode dispatcher keeps the sets (rt.shared["selections"], one dict per patched model):
a selecting layer drops its entry at the start of every step and publishes anew, and a layer
reuses only an entry of the same step (same kv length and batch), so a set never outlives its
step. A reusing layer that finds no set (its selecting layer ran dense this step) runs dense.
"""
from __future__ import annotations

import torch

from sparse_infer.decode.common import (
    NEG_INF,
    BudgetedSelector,
    GroupInputs,
    forced_and_eligible,
    grouped_scores,
    top_tokens,
)
from sparse_infer.methods import DecodeSelector, Param, register
from sparse_infer.params import PlanError, nonneg_int

SELECT = "layer_select"
REUSE = "layer_reuse"


def _layer_rules(section, layer: int) -> list:
    """Every rule one layer of a section can use: its explicit ones, and the default unless '*' covers it."""
    entry = section.layers.get(layer) or {}
    return list(entry.values()) + ([] if "*" in entry else [section.default])


def attend_and_select(inp: GroupInputs, rule, value: torch.Tensor):
    """Exact attention over the whole cache, and the token sets from the same scores.

    Returns (out (B, h, 1, Dv), indices (B, S, K): S = 1 set for the layer (scope "layer") or
    one per cache head of the part (scope "kv_head"), -1 = unused)."""
    B, h, _ = inp.query.shape
    hk, n = inp.key.shape[1], inp.n
    scores = grouped_scores(inp.query, inp.key, inp.scaling, inp.softcap)      # (B, hk, G, n) fp32
    valid_any = None
    if inp.valid is not None:
        allowed = inp.valid.view(B, hk, h // hk, n) if inp.per_head else inp.valid[:, :, None]
        scores = scores.masked_fill(~allowed, NEG_INF)
        valid_any = inp.valid.any(1, keepdim=True)                              # (B, 1, n)
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)                     # an all-masked row reads 0
    out = torch.matmul(probs.to(value.dtype), value).view(B, h, 1, value.shape[-1])
    # the sinks, the window, and the most attended tokens: attention summed over the heads of
    # the layer (or of each cache head's group), so each head's mass counts equally
    if rule.scope == "layer":
        sets = GroupInputs(query=inp.query[:, :1], key=inp.key[:, :1], valid=valid_any, per_head=True,
                           scaling=inp.scaling, softcap=inp.softcap, fresh=inp.fresh)
        votes = probs.sum((1, 2))[:, None]                                      # (B, 1, n)
        valid = valid_any
    else:
        valid = None if inp.valid is None else inp.valid.view(B, hk, -1, n).any(2)
        sets = GroupInputs(query=inp.query, key=inp.key, valid=valid, per_head=False,
                           scaling=inp.scaling, softcap=inp.softcap, fresh=inp.fresh)
        votes = probs.sum(2)                                                    # (B, hk, n)
    forced, eligible = forced_and_eligible(sets, rule.sink, rule.local)
    if valid is not None:
        votes = votes.masked_fill(~valid, NEG_INF)
    picked = top_tokens(votes, eligible, rule.budget.resolve(n))
    return out, torch.cat([forced.expand(*picked.shape[:2], -1), picked], dim=-1)


SCOPES = ("layer", "kv_head")


def _scope(value, path):
    if value not in SCOPES:
        raise PlanError(path, f"must be one of {', '.join(SCOPES)}, got {value!r}")
    return value


@register
class LayerSelect(BudgetedSelector):
    name = SELECT
    label = "lsel"
    # "layer": one set for all heads; "kv_head": one per cache head, read by the same cache head
    # of the reusing layers (as TidalDecode does per head)
    params = {**BudgetedSelector.budget_params, "scope": Param(_scope, "layer")}
    # the dispatcher calls attend() instead of select(): the layer reads everything, exactly
    attends_whole_cache = True

    def attend(self, inp, rule, state, value):
        return attend_and_select(inp, rule, value)

    def check_section(self, rule, path, section, layer):
        # one selection per layer and step: the rule runs as one part over every head
        reached = [layer] if layer is not None else [at for at, entry in section.layers.items() if "*" not in entry]
        for at in reached:
            entry = section.layers.get(at) or {}
            if any(h != "*" for h in entry) and any(r.kind == SELECT for r in _layer_rules(section, at)):
                raise PlanError(path, f"layer {at} has per-head rules beside a {SELECT} rule; a {SELECT} "
                                      f"rule covers the whole layer (as its '*' rule or the default)")

    def density(self, rule, n):
        return 1.0

    def search_grid(self, n):
        # the per-head search has no place for it: its worth is the overlap with later layers
        # (benchmarks/cross_layer_overlap.py), not a head's own recall
        return []


@register
class LayerReuse(DecodeSelector):
    name = REUSE
    label = "reuse"
    params = {"from_layer": Param(nonneg_int)}

    def select(self, inp, rule, state):
        """The set layer `from_layer` published in this step, for each index head; None when
        there is none (then the dispatcher runs this part dense)."""
        entry = (inp.published or {}).get(rule.from_layer)
        if entry is None:
            return None
        n, first_kv, indices = entry
        if n != inp.n or indices.shape[0] != inp.query.shape[0] or indices.device != inp.key.device:
            return None
        if indices.shape[1] == 1:                                  # one set for the layer
            return indices.expand(-1, inp.index_heads, -1)
        # a set per cache head: this part's cache heads must all have one
        start = inp.first_kv - first_kv
        hk = inp.key.shape[1]
        if start < 0 or start + hk > indices.shape[1]:
            return None
        rows = indices[:, start: start + hk]
        return rows.repeat_interleave(inp.groups, dim=1) if inp.per_head else rows

    def expected_rows(self, rule, n):
        return None                  # the selecting layer's set decides; checked once it is known

    def density(self, rule, n):
        return float("nan")          # that of the rule it reuses, which this rule does not hold

    def check_section(self, rule, path, section, layer):
        source = rule.from_layer
        if layer is None:
            # the default reaches every layer without a '*' rule; none of those may come at or
            # before the layer it reuses (which runs first in a step)
            early = [at for at in range(source + 1) if "*" not in (section.layers.get(at) or {})]
            if early:
                raise PlanError(f"{path}.from_layer",
                                f"as the default this rule would run in layer {early[0]}, which is not after "
                                f"layer {source}; give layers 0..{source} a '*' rule")
        elif source >= layer:
            raise PlanError(f"{path}.from_layer", f"must be an earlier layer than {layer} (got {source}): "
                                                  f"a layer reuses a set chosen before it in the same step")
        if not any(r.kind == SELECT for r in _layer_rules(section, source)):
            raise PlanError(f"{path}.from_layer", f"layer {source} has no {SELECT} rule to reuse")

    def bench_cases(self, budget):
        return []                    # needs a selecting layer before it: timed in whole steps (bench decode)
