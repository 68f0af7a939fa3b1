"""Vertical-slash prefill (MInference): important columns plus important diagonals.

The last `last_q` queries are scored against every key; their attention,
summed per column, ranks the vertical lines, and summed per diagonal offset,
ranks the slash lines. Columns are executed as a column list, diagonals are
converted to the (at most two) kv blocks each one crosses per query block.
`dense_tail` > 0 makes the query blocks holding the last `dense_tail` rows dense
(common.dense_tail_blocks): the budgets are ranked by those rows' own attention, but a
small budget can still leave the question unable to reach the fact it asks for.
"""
from __future__ import annotations

import contextlib
import math
from contextvars import ContextVar

import torch

from sparse_infer.methods import Param, PrefillPattern, combine_budget, pow2_grid, register, resolve, snap
from sparse_infer.params import nonneg_int, parse_budget, positive_int
from sparse_infer.prefill.common import (
    Geometry, block_mask_to_index, dense_tail_blocks, group_mean, real_key_span, repeat_kv, sink_and_diagonal_blocks,
)


# the memo of estimate_memo() while one is open, else None
_ESTIMATES: ContextVar[dict | None] = ContextVar("last_query_estimates", default=None)


@contextlib.contextmanager
def estimate_memo():
    """Within the block, last_query_attention computes each distinct estimate once.

    The estimate does not depend on the budgets, yet it is most of a build's cost, and the
    profiler builds one prompt's index for many budgets (and for the patterns sharing this
    estimate). Repeated calls get a copy of the first result, so indexes are exactly what
    the builders produce. Nested blocks share the outermost memo."""
    if _ESTIMATES.get() is not None:
        yield
        return
    token = _ESTIMATES.set({})
    try:
        yield
    finally:
        _ESTIMATES.reset(token)


def _signature(t: torch.Tensor | None):
    return None if t is None else (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device)


def last_query_attention(query, key, *, scaling, attention_mask=None, last_q=64, softcap=None, end=None):
    """Softmax attention of each batch row's last `last_q` real queries over all keys.

    Returns fp32 probabilities (B, Hq, L, n) and the rows' absolute positions (B, L). `end`
    (B,) is one past each row's last real key (real_key_span): with right padding the last
    real queries sit before the pad rows. A batch row with fewer than L real queries in the
    call gets zero weight on the missing ones.
    """
    memo = _ESTIMATES.get()
    if memo is None:
        return _last_query_attention(query, key, scaling=scaling, attention_mask=attention_mask, last_q=last_q,
                                     softcap=softcap, end=end)
    sig = (_signature(query), _signature(key), _signature(attention_mask), scaling, last_q, softcap,
           None if end is None else tuple(end.tolist()))
    if sig not in memo:
        result = _last_query_attention(query, key, scaling=scaling, attention_mask=attention_mask, last_q=last_q,
                                       softcap=softcap, end=end)
        # the inputs are held with the result: while they live, their addresses in `sig` stay theirs
        memo[sig] = ((query, key, attention_mask), result)
    return tuple(t.clone() for t in memo[sig][1])


def _last_query_attention(query, key, *, scaling, attention_mask, last_q, softcap, end):
    batch, n, q_len = key.shape[0], key.shape[2], query.shape[2]
    last = min(last_q, q_len)
    q0 = n - q_len
    groups = query.shape[1] // key.shape[1]
    device = key.device
    if end is None or bool((end == n).all()):
        rows = torch.arange(n - last, n, device=device).expand(batch, -1)
        row_ok = None
        qs = query[:, :, -last:].float()
        row_mask = None if attention_mask is None else attention_mask[:, :, -last:, -n:].bool()
    else:
        rows = end[:, None] - last + torch.arange(last, device=device)[None, :]      # (B, L)
        row_ok = rows >= q0
        rows = torch.where(row_ok, rows, torch.full_like(rows, q0))
        local = rows - q0
        qs = query.gather(2, local[:, None, :, None].expand(-1, query.shape[1], -1, query.shape[-1])).float()
        m = attention_mask[:, :, -q_len:, -n:].bool().expand(batch, -1, -1, -1)     # (B, 1|Hq, q, n)
        row_mask = m.gather(2, local[:, None, :, None].expand(-1, m.shape[1], -1, n))
    scores = qs @ repeat_kv(key.float(), groups).transpose(-1, -2) * scaling
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    allowed = torch.arange(n, device=device)[None, None, :] <= rows[:, :, None]      # (B, L, n)
    if row_ok is not None:
        allowed = allowed & row_ok[:, :, None]
    allowed = allowed[:, None]
    if row_mask is not None:
        allowed = allowed & row_mask
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0), rows


def slash_sums(probs: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """(B, Hi, n): the attention mass of each diagonal (offset = row - key) over the estimate rows."""
    batch, hi = probs.shape[:2]
    offsets = rows[:, :, None] - torch.arange(n, device=probs.device)  # (B, L, n) diagonal offset per (row, key)
    offsets = torch.where(offsets >= 0, offsets, torch.full_like(offsets, n))  # future keys -> dump bin
    slash = torch.zeros(batch, hi, n + 1, device=probs.device)
    slash.scatter_add_(-1, offsets.reshape(batch, 1, -1).expand(-1, hi, -1), probs.reshape(batch, hi, -1))
    return slash[..., :n]


def _top_entries(scores: torch.Tensor, count, forced: int, n: int):
    """Indices of the `count + forced` largest entries (last dim) and which of them are kept.

    `count` is an int (every head keeps as many) or a (B, Hi) tensor (each head its own)."""
    if isinstance(count, int):
        top = scores.topk(min(count + forced, n), dim=-1).indices
        return top, None
    total = (count + forced).clamp(max=n)
    top = scores.topk(max(int(total.max()), 1), dim=-1).indices
    kept = torch.arange(top.shape[-1], device=top.device) < total[..., None]
    return top, kept


def vertical_slash_blocks(vertical, slash, geo: Geometry, start, *, sink: int, local: int, num_vertical,
                          num_slash):
    """Kept kv blocks (B, Hi, NQB, NKB) and columns (B, Hi, C; -1 = unused) for the largest
    `num_vertical` columns and `num_slash` diagonals (ints, or (B, Hi) tensors: one count per
    head), with the first `sink` real keys and the `local` nearest diagonals always on top."""
    n, device = vertical.shape[-1], vertical.device
    # sinks and the nearest diagonals are always kept, whatever the estimate says
    kpos = torch.arange(n, device=device)
    sink_cols = (kpos[None, :] >= start[:, None]) & (kpos[None, :] < start[:, None] + sink)
    vertical = vertical.masked_fill(sink_cols[:, None], float("inf"))
    slash = slash.clone()
    slash[..., :local] = float("inf")

    # the forced sinks / local diagonals come on top of the budgets, not out of them
    columns, columns_kept = _top_entries(vertical, num_vertical, sink, n)
    if columns_kept is not None:
        columns = torch.where(columns_kept, columns, torch.full_like(columns, -1))
    columns = columns.sort(-1).values
    diagonals, diagonals_kept = _top_entries(slash, num_slash, local, n)   # (B, Hi, S)
    return _diagonal_blocks(diagonals, diagonals_kept, geo), columns.long()


def _crossed_blocks(diagonals, kept, geo: Geometry, qstart, qend):
    """bool (B, Hi, len(qstart), NKB): the kv blocks each diagonal crosses within the rows
    [qstart, qend) of each query block (at most two per block)."""
    lo_key = qstart[None, None, :, None] - diagonals[:, :, None, :]
    hi_key = qend[None, None, :, None] - 1 - diagonals[:, :, None, :]
    valid = hi_key >= 0
    if kept is not None:
        valid = valid & kept[:, :, None, :]
    lo_blk = torch.clamp(lo_key, min=0) // geo.bs
    hi_blk = torch.clamp(hi_key, min=0) // geo.bs
    dump = geo.nkb                                                      # invalid crossings land here
    batch, hi = diagonals.shape[:2]
    blocks = torch.zeros(batch, hi, qstart.shape[0], geo.nkb + 1, dtype=torch.bool, device=diagonals.device)
    ones = torch.ones_like(lo_blk, dtype=torch.bool)
    blocks.scatter_(-1, torch.where(valid, lo_blk, dump), ones)
    blocks.scatter_(-1, torch.where(valid, hi_blk, dump), ones)
    return blocks[..., :dump]


def _diagonal_blocks(diagonals, kept, geo: Geometry):
    """bool (B, Hi, NQB, NKB): the kv blocks the kept diagonals cross in each query block.

    In a whole query block J, the diagonal at offset d = a * bs + r crosses kv blocks J - a and,
    when r > 0, J - a - 1: which blocks are crossed depends only on J - kv block. So the
    diagonals reduce to a set of block offsets per head, expanded once over the block grid
    (NQB x NKB work, not NQB x diagonals). A partial first or last query block (chunked
    prefill, a length not a multiple of the block) may cross fewer: its rows are done directly.
    """
    batch, hi = diagonals.shape[:2]
    nkb, device = geo.nkb, diagonals.device
    a, r = diagonals // geo.bs, diagonals % geo.bs
    ok = torch.ones_like(diagonals, dtype=torch.bool) if kept is None else kept
    crossed = torch.zeros(batch, hi, nkb + 1, dtype=torch.bool, device=device)   # index nkb: dump
    crossed.scatter_(-1, torch.where(ok & (a < nkb), a, nkb), True)
    crossed.scatter_(-1, torch.where(ok & (r > 0) & (a + 1 < nkb), a + 1, nkb), True)
    diag = torch.arange(geo.first, geo.first + geo.nqb, device=device)
    offset = diag[:, None] - torch.arange(nkb, device=device)[None, :]            # (NQB, NKB)
    blocks = crossed[..., offset.clamp(min=0)] & (offset >= 0)
    qstart, qend = geo.query_block_ranges(device)
    partial = [j for j in {0, geo.nqb - 1} if qend[j] - qstart[j] < geo.bs]
    if partial:
        rows = torch.tensor(sorted(partial), device=device)
        blocks[:, :, rows] = _crossed_blocks(diagonals, kept, geo, qstart[rows], qend[rows])
    return blocks


def vertical_slash_index(query, key, rule, *, block_size, scaling, attention_mask=None, granularity="group",
                         softcap=None, **_):
    batch, num_kv, n = key.shape[:3]
    geo = Geometry(query.shape[2], n, block_size)
    device = key.device
    p = rule.params
    start, end = real_key_span(attention_mask, batch, geo.q_len, n, device)
    probs, rows = last_query_attention(query, key, scaling=scaling, attention_mask=attention_mask,
                                       last_q=p["last_q"], softcap=softcap, end=end)
    probs = group_mean(probs, num_kv, granularity)                     # (B, Hi, L, n)
    blocks, columns = vertical_slash_blocks(probs.sum(2), slash_sums(probs, rows, n), geo, start,
                                            sink=p["sink"], local=p["local"],
                                            num_vertical=p["vertical"].resolve(n), num_slash=p["slash"].resolve(n))
    blocks = blocks | sink_and_diagonal_blocks(geo, start, 0)
    blocks |= dense_tail_blocks(geo, p["dense_tail"], end)[:, None]
    blocks &= geo.causal_blocks(device)[None, None]
    return block_mask_to_index(blocks, block_size, columns=columns.contiguous())


VS_LAST_Q = 64          # estimate rows (the plan default)
VS_MIN = 16             # smallest vertical/slash budget the profiler tries (the builder adds its sink
                        # columns and local diagonals on top of the budgets)


@register
class VerticalSlash(PrefillPattern):
    name = "vertical_slash"
    label = "VS"
    params = {
        "vertical": Param(parse_budget),
        "slash": Param(parse_budget),
        "last_q": Param(positive_int, VS_LAST_Q),
        "sink": Param(nonneg_int, 64),    # first columns always kept
        "local": Param(nonneg_int, 64),   # nearest diagonals always kept
        "dense_tail": Param(nonneg_int, 0),    # last rows of the call see every key
    }
    # blocks depend only on the slash budget and columns only on the vertical one, so the
    # search measures k^2 budget pairs from 2k builds
    search_evaluation = "separable"
    search_separable = ("slash", "vertical")

    def search_session(self):
        return estimate_memo()              # every budget pair of a prompt asks for the same estimate

    def build_index(self, query, key, rule, **kwargs):
        return vertical_slash_index(query, key, rule, **kwargs)

    def search_grid(self, n, block_size):
        half = max(n // 2, block_size)
        return [{"vertical": v, "slash": s} for v in pow2_grid(VS_MIN, half) for s in pow2_grid(VS_MIN, half)]

    def search_overhead(self, n, block_size):
        return 2 * VS_LAST_Q / n            # last_q rows scored against all n keys

    def search_combine(self, points, longest, block_size):
        params = {k: combine_budget({L: p[k] for L, p in points.items()}) for k in ("vertical", "slash")}
        grid = pow2_grid(VS_MIN, max(longest // 2, block_size))
        return params, {k: snap(resolve(v, longest), grid) for k, v in params.items()}

    def expected_density(self, rule, n, block_size, measured):
        """The measured density (at the nearest profiled length) scaled by how the token budget
        grows; without measurements, contiguous columns and diagonals."""
        if measured:
            L = min(measured, key=lambda x: abs(math.log(x / n)))
            scale = (_row_tokens(rule, n) / n) / (_row_tokens(rule, L) / L)
            return min(1.0, measured[L] * scale)
        p = rule.params
        cols = min(n, p["vertical"].resolve(n) + p["sink"])
        diag_blocks = math.ceil((p["slash"].resolve(n) + p["local"]) / block_size) + 1
        return min(1.0, cols / n + diag_blocks * block_size / (n / 2))


def _row_tokens(rule, n: int) -> float:
    """Keys per query row a vertical_slash rule spends at length n (columns + diagonals)."""
    p = rule.params
    return min(n, p["vertical"].resolve(n) + p["sink"]) + min(n, p["slash"].resolve(n) + p["local"])
