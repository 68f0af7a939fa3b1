"""Per-head search: the cheapest prefill pattern and decode method that keep the target recall.

Candidates come from the registered methods (sparse_infer.methods): each pattern's and
selector's search hooks give its grid, cost and how to combine lengths. Prefill candidates
are built with the project's own pattern builders (sparse_infer.prefill.build_index) on the
captured q/k, and scored with the exact blockwise recall/density of sparse_infer.profiler.stats,
so what is measured is what the executor will run. Decode candidates are read from the
recall curves of sparse_infer.profiler.decode through each selector's search_recall.

Lengths: every statistic is gathered at two (or more) lengths. A fixed token count
that suffices at every length is written as an int; one that has to grow is
written as {frac, min} (frac from the longest length, min from the shorter ones).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field

import torch

from sparse_infer.methods import DECODE_SELECTORS, PREFILL_PATTERNS
from sparse_infer.plan import Rule, parse_rule
from sparse_infer.prefill import build_index
from sparse_infer.profiler.stats import (
    AttentionStats, block_bitmap, block_part, column_gain, column_map, index_head_density, index_recall,
    index_tail_recall, uniform_stats,
)

@dataclass(frozen=True)
class SearchSettings:
    target_recall: float = 0.95
    block_size: int = 64
    # a sparse choice must cost less than this share of dense, else the head stays dense:
    # below it, index building and gathering overheads eat the saving
    dense_cutoff: float = 0.8
    decode_cutoff: float = 0.8
    # a rule shared by a whole GQA group lets the executor load each K/V block once per
    # group; accept it when it costs at most this much more than per-head rules
    group_slack: float = 0.1
    retrieval_threshold: float = 0.1
    channels: int = 16
    # decode selections: one per GQA group ("group", soft vote of the group's heads, one
    # rule for the group) or one per query head ("head", priced at G x its own share of the
    # traffic: it is gathered once per query head, dense reads each kv head once)
    decode_granularity: str = "group"
    # token_select may rank keys by int8 codes (a CPU setting: the cost model is the CPU
    # kernel's, which reads a quarter of K's fp32 bytes to score); off for plans meant for GPUs
    int8_scoring: bool = True
    # a retrieval head (it copies from the context) keeps the whole cache; False lets it take a
    # query-aware selector (never streaming) whose curves keep the target on the copying queries
    retrieval_dense: bool = True


def params_key(params: dict) -> tuple:
    return tuple(sorted(params.items()))


def make_rule(pattern: str, params: dict, section: str = "prefill") -> Rule:
    name_key = "pattern" if section == "prefill" else "method"
    return parse_rule({name_key: pattern, **params}, f"profiler.{pattern}", section)


# --------------------------------------------------------------------------- prefill grid
def prefill_grid(n: int, bs: int) -> dict[str, list[dict]]:
    return {name: pattern.search_grid(n, bs) for name, pattern in PREFILL_PATTERNS.items()}


def estimate_overhead(pattern: str, n: int, bs: int) -> float:
    """Estimation work as a share of dense causal attention (~n^2/2 scores)."""
    method = PREFILL_PATTERNS.get(pattern)
    return 0.0 if method is None else method.search_overhead(n, bs)


def evaluate_prefill_run(query: torch.Tensor, key: torch.Tensor, stats: AttentionStats, *, scaling: float,
                         granularities=("head",), mask=None, softcap=None, length: int | None = None) -> dict:
    """Recall and density per q head of every grid candidate on one prompt.

    Returns {(granularity, pattern, params_key): (recall, tail recall, density)}, each (Hq,):
    recall over all queries, over the last query block (see stats.index_tail_recall), and
    the share of causal pairs computed.
    The grid follows the nominal `length` (a prompt may be a few tokens shorter), so
    every prompt of one length fills the same table entries.
    """
    n, bs = stats.n, stats.block_size
    hq = query.shape[0]
    q4, k4 = query[None], key[None]
    m4 = None if mask is None else mask.reshape(1, -1, *mask.shape[-2:])
    ublocks, ucols, total_pairs = uniform_stats(n, bs)
    grid = prefill_grid(length or n, bs)
    out = {}

    def build(pattern, params, gran):
        return build_index(make_rule(pattern, params), q4, k4, block_size=bs, scaling=scaling,
                           attention_mask=m4, granularity=gran, softcap=softcap)

    # how each pattern's grid is measured (its `search_evaluation`):
    #   "static"     the index ignores q/k: one bitmap per (n, bs, params), built once and cached
    #   "build"      one build per grid point and granularity
    #   "separable"  two budgets, kv blocks depending only on one and columns only on the other,
    #                so k^2 points come from 2k builds (_evaluate_separable)
    for name, pattern in PREFILL_PATTERNS.items():
        if pattern.search_evaluation != "static":
            continue
        for params in grid[name]:
            bitmap, density = _static_index(name, params_key(params), n, bs, hq)
            entry = (block_part(bitmap, stats.block_mass) / stats.num_queries,
                     block_part(bitmap[:, -1:], stats.block_mass[:, -1:]) / stats.tail_rows, density)
            for gran in granularities:
                out[(gran, name, params_key(params))] = entry
    with search_sessions():
        for gran in granularities:
            for name, pattern in PREFILL_PATTERNS.items():
                evaluation = pattern.search_evaluation
                if evaluation == "build":
                    for params in grid[name]:
                        index = build(name, params, gran)
                        out[(gran, name, params_key(params))] = (
                            index_recall(index, stats), index_tail_recall(index, stats),
                            index_head_density(index, n, hq))
                elif evaluation == "separable":
                    out.update(_evaluate_separable(build, name, grid[name], gran, stats, hq, n, bs, ublocks, ucols,
                                                   total_pairs))
    return out


def _evaluate_separable(build, name, grid, gran, stats, hq, n, bs, ublocks, ucols, total_pairs) -> dict:
    """A grid crossing a blocks budget and a columns budget (PrefillPattern.search_separable): the
    index of a grid point is the union of the kv blocks built for its blocks budget and the
    columns built for its columns budget, each built once with the other budget at its smallest
    grid value (the cheapest build; what it selects there is not used)."""
    blocks_key, columns_key = PREFILL_PATTERNS[name].search_separable
    least = {k: min(p[k] for p in grid) for k in (blocks_key, columns_key)}

    def blocks_of(params):          # the build whose kv blocks are those of `params`
        return params_key({**params, columns_key: least[columns_key]})

    def columns_of(params):         # the build whose columns are those of `params`
        return params_key({**params, blocks_key: least[blocks_key]})

    per_blocks, per_columns = {}, {}
    for params in grid:
        b, c = blocks_of(params), columns_of(params)
        if b not in per_blocks:
            bitmap = block_bitmap(build(name, dict(b), gran), n)
            tail = bitmap[:, -1:]
            per_blocks[b] = (block_part(bitmap, stats.block_mass), column_gain(bitmap, stats.col_mass, bs),
                             block_part(tail, stats.block_mass[:, -1:]),
                             column_gain(tail, stats.col_mass[:, -1:], bs),
                             block_part(bitmap, ublocks), column_gain(bitmap, ucols, bs))
        if c not in per_columns:
            cmap = column_map(build(name, dict(c), gran), n)
            cmap = torch.zeros(1, n, dtype=torch.bool) if cmap is None else cmap
            per_columns[c] = cmap.repeat_interleave(hq // cmap.shape[0], 0)
    out = {}
    for params in grid:
        bmass, gain, tmass, tgain, upairs, ugain = per_blocks[blocks_of(params)]
        cmap = per_columns[columns_of(params)]
        recall = (bmass + (cmap * gain).sum(-1)) / stats.num_queries
        tail = (tmass + (cmap * tgain).sum(-1)) / stats.tail_rows
        pairs = upairs.repeat_interleave(hq // upairs.shape[0], 0) + (
            cmap * ugain.repeat_interleave(hq // ugain.shape[0], 0)).sum(-1)
        out[(gran, name, params_key(params))] = (recall, tail, pairs / total_pairs)
    return out


@functools.lru_cache(maxsize=512)
def _static_index(pattern: str, key: tuple, n: int, bs: int, num_heads: int):
    """(bitmap (1, NQB, NKB), density (Hq,)) of a pattern whose index ignores q/k values."""
    dummy = torch.empty(1, 1, 1, 1).expand(1, 1, n, 1)
    index = build_index(make_rule(pattern, dict(key)), dummy, dummy, block_size=bs, scaling=1.0,
                        granularity="head")
    density = index_head_density(index, n, 1).expand(num_heads).clone()
    return block_bitmap(index, n), density


@contextlib.contextmanager
def search_sessions():
    """Every registered pattern's search_session, held while one prompt is measured."""
    with contextlib.ExitStack() as stack:
        for pattern in PREFILL_PATTERNS.values():
            stack.enter_context(pattern.search_session())
        yield


class MeanTable:
    """Running means (and minimums) of per-head tensors under hashable keys."""

    def __init__(self):
        self.sums: dict = {}
        self.mins: dict = {}
        self.counts: dict = {}

    def add(self, entries: dict):
        for key, value in entries.items():
            value = value if isinstance(value, tuple) else (value,)
            if key in self.sums:
                self.sums[key] = tuple(a + b for a, b in zip(self.sums[key], value))
                self.mins[key] = tuple(torch.minimum(a, b) for a, b in zip(self.mins[key], value))
                self.counts[key] += 1
            else:
                self.sums[key] = tuple(v.clone() for v in value)
                self.mins[key] = tuple(v.clone() for v in value)
                self.counts[key] = 1

    def get(self, key):
        """Mean over the added entries (a tuple when tuples were added)."""
        out = tuple(v / self.counts[key] for v in self.sums[key])
        return out if len(out) > 1 else out[0]

    def minimum(self, key):
        out = self.mins[key]
        return out if len(out) > 1 else out[0]

    def __contains__(self, key):
        return key in self.sums


@dataclass
class Choice:
    pattern: str
    params: dict                    # YAML parameters (budgets may be {frac, min})
    cost: float                     # estimated share of dense work at the longest length
    granularity: str = "head"

    def rule(self, section: str = "prefill") -> Rule:
        return make_rule(self.pattern, self.params, section)

    def to_yaml(self, section: str = "prefill") -> dict:
        name_key = "pattern" if section == "prefill" else "method"
        return {name_key: self.pattern, **self.params}


DENSE_CHOICE = Choice("dense", {}, 1.0)


def _best_point(table: MeanTable, n: int, bs: int, gran: str, pattern: str, heads, target: float):
    """Cheapest grid point of `pattern` that keeps the target on every head in `heads`:
    recall averaged over queries and samples, and over the last query block (question and
    answer) of every sample, since one missed retrieval there costs the answer."""
    best = None
    for params in prefill_grid(n, bs)[pattern]:
        key = (gran, pattern, params_key(params))
        recall, _, density = table.get(key)
        tail = table.minimum(key)[1]
        if bool((recall[heads] >= target).all()) and bool((tail[heads] >= target).all()):
            cost = float(density[heads].mean()) + estimate_overhead(pattern, n, bs)
            if best is None or cost < best[1] - 1e-12:
                best = (params, cost)
    return best


def choose_prefill(tables: dict[int, MeanTable], heads: list[int], gran: str, settings: SearchSettings) -> Choice:
    """Cheapest pattern (with budgets combined over lengths) for the head set, or dense."""
    lengths = sorted(tables)
    longest, bs = lengths[-1], settings.block_size
    best = DENSE_CHOICE
    for pattern, method in PREFILL_PATTERNS.items():
        points = {}
        for L in lengths:
            found = _best_point(tables[L], L, bs, gran, pattern, heads, settings.target_recall)
            if found is None:
                break
            points[L] = found[0]
        if len(points) != len(lengths):
            continue
        combined = method.search_combine(points, longest, bs)
        if combined is None:
            continue
        params, lookup = combined
        density = tables[longest].get((gran, pattern, params_key(lookup)))[-1]
        cost = float(density[heads].mean()) + estimate_overhead(pattern, longest, bs)
        if cost < best.cost - 1e-12:
            best = Choice(pattern, params, cost, gran)
    if best.cost >= settings.dense_cutoff:
        return DENSE_CHOICE
    return best


def decide_prefill(tables: dict[int, MeanTable], num_heads: int, num_kv: int,
                   settings: SearchSettings) -> list[Choice]:
    """Per q head choice; a whole GQA group shares one rule when that is nearly as cheap."""
    groups = num_heads // num_kv
    if groups == 1:
        return [choose_prefill(tables, [h], "head", settings) for h in range(num_heads)]
    out: list[Choice] = []
    for g in range(num_kv):
        heads = list(range(g * groups, (g + 1) * groups))
        shared = choose_prefill(tables, heads, "group", settings)
        single = [choose_prefill(tables, [h], "head", settings) for h in heads]
        if settings.group_slack == float("inf") or \
                shared.cost * len(heads) <= sum(c.cost for c in single) * (1 + settings.group_slack):
            out.extend(Choice(shared.pattern, dict(shared.params), shared.cost, "group") for _ in heads)
        else:
            out.extend(single)
    return out


def runtime_granularity(rules: list[Rule], num_kv: int) -> list[str]:
    """The estimate granularity each head gets at run time (mirrors prefill.dispatch.sparse_prefill
    under `granularity: group`, which the profiler's plans use).

    Heads sharing an identical rule are run together; their index is estimated per GQA
    group only when that set is made of whole groups, otherwise per head.
    """
    num_heads = len(rules)
    groups = num_heads // num_kv
    if groups == 1:
        return ["head"] * num_heads
    members: dict[tuple, list[int]] = {}
    for h, rule in enumerate(rules):
        members.setdefault(rule.key(), []).append(h)
    out = ["head"] * num_heads
    for heads in members.values():
        if len(heads) == len({h // groups for h in heads}) * groups:
            for h in heads:
                out[h] = "group"
    return out


def measure_rules(rules: list[Rule], grans: list[str], query, key, stats: AttentionStats, *, scaling,
                  mask=None, softcap=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact (recall, tail recall, density) per head of the final rules, each at its run-time granularity."""
    hq = query.shape[0]
    recall, tail, density = torch.ones(hq), torch.ones(hq), torch.ones(hq)
    m4 = None if mask is None else mask.reshape(1, -1, *mask.shape[-2:])
    done: dict = {}
    with search_sessions():
        for h, (rule, gran) in enumerate(zip(rules, grans)):
            if rule.kind == "dense":
                continue
            key_ = (rule.key(), gran)
            if key_ not in done:
                index = build_index(rule, query[None], key[None], block_size=stats.block_size, scaling=scaling,
                                    attention_mask=m4, granularity=gran, softcap=softcap)
                done[key_] = (index_recall(index, stats), index_tail_recall(index, stats),
                              index_head_density(index, stats.n, hq))
            recall[h], tail[h], density[h] = (v[h] for v in done[key_])
    return recall, tail, density


# --------------------------------------------------------------------------- decode
def decode_costs(n: int, head_dim: int, channels: int) -> dict:
    """Share of the dense decode K/V traffic (2*n*D values) each method reads: {method: params -> cost}."""
    return {name: (lambda p, _m=method: _m.search_cost(p, n, head_dim, channels))
            for name, method in DECODE_SELECTORS.items()}


def decode_recall(curves: dict, method: str, params: dict, n: int) -> torch.Tensor:
    """(Hq,) recall of a decode rule from mean curves at length n."""
    return DECODE_SELECTORS[method].search_recall(curves, params, n)


def decode_grid(n: int) -> dict[str, list[dict]]:
    return {name: method.search_grid(n) for name, method in DECODE_SELECTORS.items()}


def decode_candidates() -> list[str]:
    """The selectors the search tries, in the order ties are broken (lowest search_priority first)."""
    return sorted(DECODE_SELECTORS, key=lambda name: DECODE_SELECTORS[name].search_priority)


def decode_cost_factor(settings: SearchSettings, num_heads: int, num_kv_heads: int) -> int:
    """How many times its own share of a kv head's traffic one decode selection costs against dense."""
    return num_heads // num_kv_heads if settings.decode_granularity == "head" else 1


def _cheapest_rule(method, variant: dict, curves: dict[int, dict], heads: list[int], head_dim: int,
                   settings: SearchSettings, channel_list) -> Choice | None:
    """The cheapest params of one method variant keeping the target recall for `heads` at every
    length, combined across lengths into one rule; None when some length has none."""
    lengths = sorted(curves)
    points = {}
    for L in lengths:
        found = None
        for grid_params in method.search_grid(L):
            params = {**grid_params, **variant}
            if float(method.search_recall(curves[L], params, L)[heads].min()) >= settings.target_recall:
                cost = method.search_cost(params, L, head_dim, settings.channels)
                if found is None or cost < found[1] - 1e-12:
                    found = (params, cost)
        if found is None:
            return None
        points[L] = found[0]
    params = method.search_combine(points, channel_list)
    if params is None:
        return None
    params = {**params, **variant}
    return Choice(method.name, params, method.search_cost(params, lengths[-1], head_dim, settings.channels))


def choose_decode(curves: dict[int, dict], heads: int | list[int], head_dim: int, settings: SearchSettings,
                  channel_list: list[int] | None, cost_factor: int = 1, query_aware_only: bool = False) -> Choice:
    """The cheapest decode rule under which every head of `heads` (one head, or a GQA group
    sharing one selection, read from shared curves) keeps the target recall at every length."""
    heads = [heads] if isinstance(heads, int) else list(heads)
    best = DENSE_CHOICE
    for name in decode_candidates():
        method = DECODE_SELECTORS[name]
        if not method.search_available(channel_list) or (query_aware_only and not method.query_aware):
            continue
        for variant in method.search_variants(settings):
            found = _cheapest_rule(method, variant, curves, heads, head_dim, settings, channel_list)
            if found is not None and found.cost < best.cost - 1e-12:
                best = found
    if best.cost * cost_factor >= settings.decode_cutoff:
        return DENSE_CHOICE
    return best


@dataclass
class HeadReport:
    """What the profiler measured for one head (kept for the summary and the plan's profile section)."""

    prefill: Choice
    decode: Choice
    prefill_recall: dict = field(default_factory=dict)     # length -> recall of the final rule
    prefill_tail_recall: dict = field(default_factory=dict)  # over the last query block, worst sample
    prefill_density: dict = field(default_factory=dict)
    decode_recall: dict = field(default_factory=dict)
    decode_cost: dict = field(default_factory=dict)
    retrieval_score: float = 0.0
    channels: list[int] | None = None
    vertical_share: float = 0.0     # share of mass on the top 1% columns (diagnostic)
    slash_share: float = 0.0        # share of mass on the top 1% diagonals (diagnostic)
