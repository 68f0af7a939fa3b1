"""Quest: query-aware page selection from per-page key bounds.

The cache is cut into pages of `page` tokens. For each page the element-wise min and max
of its keys are kept (B, Hkv, pages, D) each, so for any key k of the page and any q,
q.k = sum_d q_d k_d <= sum_d max(q_d min_d, q_d max_d) = q+ . max + q- . min
(q+ / q- the positive / negative parts of q): an upper bound from two small matmuls.
Pages are ranked by that bound (per query head; a GQA group sums per-head softmaxes of the
bounds), and the best pages, up to `budget` tokens (rounded up to whole pages), are read
in full, plus the first `sink` and last `local` valid tokens.

Side state is built once per sequence from the full K (masked keys, e.g. left padding,
left out of the bounds) and then kept incrementally: each decode step only folds the new
key into the last, partial page, or opens a new page.

On CPUs, a step with no mask, or one hiding a prefix of each row (left padding), runs the choice
and its attention in one C call: quest.c, beside this file (quest_decode_cpu).
"""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import torch

from sparse_infer.decode.common import (
    NEG_INF, SELECTOR_LOCAL, SELECTOR_SINK, BudgetedSelector, GroupInputs, GrowBuffer, KeyRange, forced_and_eligible,
    vote,
)
from sparse_infer.decode.fused_cpu import check_fused_step, fused_argtypes, fused_step, starts_arg
from sparse_infer.kernels.cpu_decode import refuse_unsupported
from sparse_infer.methods import Param, SideState, budget_grid, curve_at, register, resolve
from sparse_infer.params import positive_int

QUEST_PAGE = 16     # the default page, and the page the profiler's recall curves use


@dataclass
class PageBoundsState(SideState):
    kmin: GrowBuffer | None = None     # (B, hk, pages, D) per-page element-wise key minimum
    kmax: GrowBuffer | None = None     # ... and maximum
    n: int | None = None               # kv length the bounds cover


def page_bounds_from_keys(key: torch.Tensor, page: int, valid: torch.Tensor | None = None):
    """(kmin, kmax), each (B, hk, ceil(n / page), D), over the keys `valid` (B, hk, n) allows.
    A page without any allowed key gets min = max = 0 (it is never selected anyway)."""
    B, hk, n, D = key.shape
    pages = -(-n // page)
    pad = pages * page - n
    k = key
    if valid is None and pad:
        valid = torch.ones(B, hk, n, dtype=torch.bool, device=key.device)
    if valid is not None:
        valid = torch.nn.functional.pad(valid, (0, pad)).view(B, hk, pages, page, 1)
    k = torch.nn.functional.pad(key, (0, 0, 0, pad)).view(B, hk, pages, page, D)
    if valid is None:
        return k.amin(3), k.amax(3)
    big = torch.finfo(key.dtype).max
    kmin = k.masked_fill(~valid, big).amin(3)
    kmax = k.masked_fill(~valid, -big).amax(3)
    empty = ~valid.any(3)
    return kmin.masked_fill(empty, 0), kmax.masked_fill(empty, 0)


def upper_bounds(query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """max over keys of each page of q.k, bounded above: query (B, h, D) -> (B, hk, G, pages) fp32."""
    B, h, D = query.shape
    hk = kmin.shape[1]
    q = query.to(kmin.dtype).view(B, hk, h // hk, D)
    return (torch.matmul(q.clamp(min=0), kmax.transpose(-1, -2)).float()
            + torch.matmul(q.clamp(max=0), kmin.transpose(-1, -2)).float())


def update_bounds(inp: GroupInputs, rule, state: PageBoundsState):
    """Rebuild the page bounds for a new sequence, else fold the new key(s) into the last pages."""
    page, n = rule.page, inp.n
    held = state.n
    if inp.fresh or held is None or held >= n:
        kv_valid = inp.valid
        if kv_valid is not None and kv_valid.shape[1] != inp.key.shape[1]:
            kv_valid = kv_valid.view(kv_valid.shape[0], inp.key.shape[1], -1, n).any(2)
        kmin, kmax = page_bounds_from_keys(inp.key, page, kv_valid)
        # one row per page: grow a few pages at a time
        state.kmin, state.kmax, state.n = GrowBuffer(kmin, 8), GrowBuffer(kmax, 8), n
        return
    kmin, kmax = state.kmin, state.kmax
    for pos in range(held, n):                      # one iteration per decode step
        row = inp.key[:, :, pos: pos + 1]
        p = pos // page
        if pos % page == 0:                         # first key of a new page
            kmin.append(row)
            kmax.append(row)
        else:
            torch.minimum(kmin.data[:, :, p: p + 1], row, out=kmin.data[:, :, p: p + 1])
            torch.maximum(kmax.data[:, :, p: p + 1], row, out=kmax.data[:, :, p: p + 1])
    state.n = n


def select(inp: GroupInputs, rule, state: PageBoundsState) -> torch.Tensor:
    update_bounds(inp, rule, state)
    page, n = rule.page, inp.n
    B, Hi = inp.query.shape[0], inp.index_heads
    pages = -(-n // page)
    forced, eligible = forced_and_eligible(inp, rule.sink, rule.local)
    # a page competes only if it still has a token that is neither forced nor masked out
    if isinstance(eligible, KeyRange):
        first = torch.arange(pages, device=inp.key.device) * page
        page_eligible = ((first < eligible.stop) & (first + page > eligible.start)).expand(B, Hi, pages)
    else:
        padded = torch.nn.functional.pad(eligible, (0, pages * page - n))
        page_eligible = padded.view(B, Hi, pages, page).any(-1)
    bounds = upper_bounds(inp.query, state.kmin.view(), state.kmax.view()) * inp.scaling
    if inp.softcap:
        bounds = inp.softcap * torch.tanh(bounds / inp.softcap)       # monotone: keeps the bound's order
    scores = vote(bounds, page_eligible, inp.per_head)
    k = min(-(-rule.budget.resolve(n) // page), pages)
    vals, top = scores.topk(k, dim=-1, sorted=False)                 # (B, Hi, k)
    tokens = (top[..., None] * page + torch.arange(page, device=top.device)).view(B, Hi, k * page)
    keep = (vals != NEG_INF).repeat_interleave(page, dim=-1)
    # drop the page's tokens that are forced, masked out or past the end
    if isinstance(eligible, KeyRange):
        keep &= (tokens >= eligible.start) & (tokens < eligible.stop)
    else:
        keep &= (tokens < n) & padded.gather(-1, tokens.clamp(max=pages * page - 1))
    picked = tokens.masked_fill(~keep, -1)
    return torch.cat([forced.expand(B, Hi, -1), picked], dim=-1)


_BOUNDS = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]     # a page bound, strides b h page
_QUEST_ARGS = fused_argtypes(side=[*_BOUNDS, *_BOUNDS, ctypes.c_void_p],         # kmin, kmax, starts
                             sizes=[ctypes.c_int64] * 4)                         # page sink local budget_pages


def quest_decode_cpu(query, key, value, kmin, kmax, *, page: int, sink: int, local: int, budget: int,
                     scaling: float, softcap=None, index_heads: int, fold_from: int | None = None,
                     starts: torch.Tensor | None = None):
    """Quest's page choice and the attention over it in one C call (quest.c), for a step with no
    mask or one hiding a prefix of each row (`starts`).

    query (B, h, D); key/value (B, hk, n, D); kmin/kmax (B, hk, ceil(n / page), D) page bounds
    in key's dtype (update_bounds). index_heads: hk for one selection per GQA group, h for one
    per query head. Chooses what select() chooses (the sinks, the local window, and the best
    pages up to `budget` tokens by upper bound, or by the group's summed softmaxes of it) and
    attends to exactly those keys. Returns (out (B, h, 1, D), keys read (B, index_heads)).

    fold_from: the bounds hold keys [0, fold_from) only; keys [fold_from, n) are folded into
    them first, in place (a page that starts there is written whole). None: they hold all n.

    starts: int64 (B,) or None: batch row b sees only the keys [starts[b], n) (left padding, a
    sliding window); its sinks are that range's first keys, as select() has them. The bounds are
    select()'s: built under the mask when the sequence starts (keys hidden then are left out, keys
    a window hides later stay in), then folded step by step."""
    B, _, D = query.shape
    hk, n = key.shape[1], key.shape[2]
    pages = -(-n // page)
    check_fused_step(query, key, index_heads, fold_from)
    if tuple(kmin.shape) != (B, hk, pages, D) or kmax.shape != kmin.shape:
        raise ValueError(f"page bounds must be (B, hk, {pages}, D), got {tuple(kmin.shape)}")
    refuse_unsupported(query, key, value, kmin, kmax)
    return fused_step("quest_decode_rows", _QUEST_ARGS, query, key, value,
                      (kmin.data_ptr(), kmin.stride(0), kmin.stride(1), kmin.stride(2),
                       kmax.data_ptr(), kmax.stride(0), kmax.stride(1), kmax.stride(2), starts_arg(starts, B, n)),
                      (page, sink, local, -(-budget // page)), index_heads=index_heads, fold_from=fold_from,
                      scaling=scaling, softcap=softcap,
                      bad_sizes=f"the CPU kernel takes head dims up to 1024, got {D}")


def select_and_attend_cpu(inp: GroupInputs, rule, state: PageBoundsState, value: torch.Tensor):
    """select() and the attention over its choice in one C call (quest_decode_cpu), for a step
    with no mask or one hiding a prefix of each row (inp.starts): no index tensors, one pass over
    the bounds, one over the chosen rows. Returns (out (B, h, 1, D), keys read per index row (B, Hi))."""
    page, n = rule.page, inp.n
    pages = -(-n // page)
    held = state.n
    if inp.fresh or held is None or held >= n:
        update_bounds(inp, rule, state)          # a new sequence: bounds from the whole K
        held = n
    kmin, kmax = state.kmin, state.kmax
    for bounds in (kmin, kmax):                  # the C call folds keys [held, n) in, new pages too
        bounds.ensure(pages)
    result = quest_decode_cpu(inp.query, inp.key, value, kmin.data[:, :, :pages], kmax.data[:, :, :pages],
                              page=page, sink=rule.sink, local=rule.local, budget=rule.budget.resolve(n),
                              scaling=inp.scaling, softcap=inp.softcap, index_heads=inp.index_heads,
                              fold_from=held, starts=inp.starts)
    kmin.length = kmax.length = pages            # only once the new rows are written
    state.n = n
    return result


@register
class Quest(BudgetedSelector):
    name = "quest"
    label = "quest"
    params = {"page": Param(positive_int, QUEST_PAGE), **BudgetedSelector.budget_params}
    State = PageBoundsState
    select_and_attend_cpu = staticmethod(select_and_attend_cpu)
    search_priority = 2
    query_aware = True

    def select(self, inp, rule, state):
        return select(inp, rule, state)

    def selected_budget(self, rule, n):
        page = rule.params["page"]
        return -(-rule.params["budget"].resolve(n) // page) * page     # whole pages

    def search_grid(self, n):
        half = max(n // 2, 64)              # the recall curves stop at half the cache (layer.curve_size)
        # whole pages only: a budget between two is read as the larger (selected_budget)
        return [{"page": QUEST_PAGE, "budget": b} for b in budget_grid(QUEST_PAGE, half) if b % QUEST_PAGE == 0]

    def search_cost(self, params, n, head_dim, channels):
        # reads per-page min and max keys, then K/V of the chosen pages
        return min(1.0, 1 / params["page"] + (math.ceil(resolve(params["budget"], n) / params["page"])
                                              * params["page"] + SELECTOR_SINK + SELECTOR_LOCAL) / n)

    def search_curves(self, inputs, channels=None):
        """Pages ranked by their upper bound from per-page channel min/max (QUEST_PAGE pages)."""
        probs, key, rankable = inputs.probs, inputs.key, inputs.rankable
        hq, dq, n = probs.shape
        page = QUEST_PAGE
        npages = math.ceil(n / page)
        kpad = torch.nn.functional.pad(key.float(), (0, 0, 0, npages * page - n), value=float("nan"))
        kpages = kpad.view(key.shape[0], npages, page, -1)
        kmax = kpages.nan_to_num(float("-inf")).amax(2).repeat_interleave(inputs.groups, 0)
        kmin = kpages.nan_to_num(float("inf")).amin(2).repeat_interleave(inputs.groups, 0)
        q = inputs.query.float()
        bound = q.clamp(min=0) @ kmax.transpose(-1, -2) + q.clamp(max=0) @ kmin.transpose(-1, -2)
        # as in select: a page competes only if it holds a key that is neither forced (sink/local)
        # nor in the future
        page_ok = torch.nn.functional.pad(rankable, (0, npages * page - n)).view(dq, npages, page).any(-1)
        if inputs.shared:
            bound = inputs.group_vote(inputs.capped(bound * inputs.scaling), page_ok, inputs.groups)
        page_mass = torch.nn.functional.pad(torch.where(rankable, probs, 0.0), (0, npages * page - n))
        page_mass = page_mass.view(hq, dq, npages, page).sum(-1)
        curve = inputs.ranked_curve(page_mass, bound, page_ok.expand(hq, -1, -1), math.ceil(inputs.size / page))
        return {("quest",): curve + inputs.base_mass[:, None]}

    def search_recall(self, curves, params, n):
        return curve_at(curves["quest"], math.ceil(resolve(params["budget"], n) / params["page"]))

    def search_combine(self, points, channel_list):
        return {"page": QUEST_PAGE, **super().search_combine(points, channel_list)}

    def bytes_read(self, rule, n, rows, *, cache_heads, head_dim, elem_size, counters):
        # every page's min and max keys, then K and V of the selected rows
        selected = rows * head_dim * elem_size
        return 2 * selected + 2 * cache_heads * -(-n // rule.page) * head_dim * elem_size
