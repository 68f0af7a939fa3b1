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
when all of them reuse. Counters: state.counters["full_scorings"] / ["reuses"] count
those decisions.

Scoring (`scoring: int8`): scoring reads every key, and at long caches those reads are most
of the method's time. With int8, each key is ranked by its int8 copy (per key: codes
rint(k * 127 / max|k|) and the scale max|k| / 127, kept as side state, a quarter of K's fp32
bytes plus 4 bytes a key), and the query is quantized per head the same way: score =
(q codes . k codes) * q scale * k scale, the integer products exact. The chosen keys are attended
exactly, so only the choice can differ from `exact`, where two keys' scores are closer than
the rounding of their codes. It is a CPU setting: on CPUs the C kernel scores the codes with
8-bit dot products (AVX512-VNNI where present); on other devices the rule scores exactly, as a
GPU reads K at a bandwidth where int8 codes would save little and cost a conversion.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparse_infer.decode.common import (
    SELECTOR_LOCAL,
    SELECTOR_SINK,
    BudgetedSelector,
    GroupInputs,
    GrowBuffer,
    forced_and_eligible,
    grouped_scores,
    pad_indices,
    top_tokens,
    vote,
)
from sparse_infer.methods import BenchCase, Param, SideState, curve_at, register, resolve
from sparse_infer.params import PlanError


@dataclass
class TokenSelectState(SideState):
    kept_across_sequences = ("counters",)
    counters: dict = field(default_factory=lambda: {"full_scorings": 0, "reuses": 0})
    last_query: torch.Tensor | None = None     # (B, h) fp32 query each index head's selection was made for
    last_indices: torch.Tensor | None = None   # (B, Hi, K) that selection
    last_n: torch.Tensor | None = None         # (B, Hi) kv length when it was made
    codes: GrowBuffer | None = None            # scoring int8: (B, hk, n, D) int8 copy of K
    scales: GrowBuffer | None = None           # and its (B, hk, n, 1) fp32 scale per key


def quantize_keys(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """key (B, hk, m, D) -> int8 codes (B, hk, m, D) and fp32 scales (B, hk, m, 1), per key:
    codes rint(k * (127 / max|k|)), scale max|k| / 127 (a zero key: zeros). The fp32 operations
    are those of the C kernel (decode/double_sparsity.c), which writes the same bytes."""
    x = key.float()
    top = x.abs().amax(-1, keepdim=True)
    # a tensor over a tensor: `127.0 / top` is reciprocal(top) * 127 in torch, another rounding
    inv = torch.where(top > 0, torch.full_like(top, 127.0) / top, torch.zeros_like(top))
    return torch.round(x * inv).clamp_(-127, 127).to(torch.int8), top / 127.0


def int8_keys_stale(inp: GroupInputs, state: TokenSelectState) -> bool:
    """The held int8 copy cannot be extended: a new sequence, none yet, or a cache that did not grow."""
    return inp.fresh or state.codes is None or state.codes.length >= inp.n


def update_int8_keys(inp: GroupInputs, state: TokenSelectState) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 copy of the cache's keys: made from the whole K when stale, else extended by the
    keys appended since. Returns (codes, scales) views."""
    if int8_keys_stale(inp, state):
        codes, scales = quantize_keys(inp.key)
        state.codes, state.scales = GrowBuffer(codes), GrowBuffer(scales)
    else:
        codes, scales = quantize_keys(inp.key[:, :, state.codes.length: inp.n])
        state.codes.append(codes)
        state.scales.append(scales)
    return state.codes.view(), state.scales.view()


def _code_products(q8: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """q8 (B, hk, G, D) . codes (B, hk, n, D) -> (B, hk, G, n) fp32, exact integers.

    torch._int_mm reads the int8 codes as they are: converting the whole cache's codes to fp32
    every step cost 4x the product itself (7 x 64 by 16K codes: 0.38 ms against 0.10 ms). It
    is 2-D only, hence one call per (row, cache head). Where it is missing or not exact (see
    _int_mm_is_exact), the fp32 product of the codes gives the same integers (partial sums
    stay below 2^24 for head dims up to 1040)."""
    B, hk = codes.shape[:2]
    if codes.device.type == "cpu" and _int_mm_is_exact():
        out = torch.empty(B, hk, q8.shape[2], codes.shape[2], dtype=torch.int32)
        for b in range(B):
            for g in range(hk):
                torch._int_mm(q8[b, g], codes[b, g].transpose(0, 1), out=out[b, g])
        return out.float()
    return torch.matmul(q8.float(), codes.float().transpose(-1, -2))


_INT_MM_EXACT: bool | None = None


def _int_mm_is_exact() -> bool:
    """Whether this build's CPU torch._int_mm returns exact int32 products, checked once.

    On x86 CPUs without VNNI, oneDNN's int8 GEMM adds pairs of u8 x s8 products in 16 bits and
    saturates (127 x 127 rows of 64 gave 8,160 instead of 1,032,256): a wrong ranking, and one
    that differs from the C kernel's. The probe holds the products that saturate there (every
    code at +-127, both signs) and random codes, at the shapes decode uses."""
    global _INT_MM_EXACT
    if _INT_MM_EXACT is None:
        _INT_MM_EXACT = False
        if hasattr(torch, "_int_mm"):
            g = torch.Generator().manual_seed(0)
            try:
                exact = True
                for rows, dim in ((1, 64), (7, 64), (8, 128)):
                    q = torch.randint(-127, 128, (rows, dim), generator=g, dtype=torch.int8)
                    q[0] = 127
                    k = torch.randint(-127, 128, (40, dim), generator=g, dtype=torch.int8)
                    k[0], k[1] = 127, -127
                    got = torch._int_mm(q, k.transpose(0, 1))
                    exact &= torch.equal(got.long(), q.long() @ k.long().transpose(0, 1))
                _INT_MM_EXACT = bool(exact)
            except (RuntimeError, NotImplementedError):
                pass
    return _INT_MM_EXACT


def int8_scores(query: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, scaling: float, softcap):
    """q.k per query head from int8 codes of both: (B, hk, G, n) fp32. The scaled query is
    quantized per head as the keys are (quantize_keys); the integer dot products are exact in
    fp32 (every partial sum is an integer below 2^24 for head dims up to 1040), then times the
    query's scale and the key's, in that order: the bits the C kernel computes."""
    B, h, D = query.shape
    hk = codes.shape[1]
    q8, q_scale = quantize_keys((query.float() * scaling).view(B, hk, h // hk, D))
    s = _code_products(q8, codes) * q_scale * scales.transpose(-1, -2)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    return s


def score_and_select(inp: GroupInputs, rule, state: TokenSelectState) -> torch.Tensor:
    forced, eligible = forced_and_eligible(inp, rule.sink, rule.local)
    if rule.scoring == "int8" and inp.key.device.type == "cpu":
        per_head = int8_scores(inp.query, *update_int8_keys(inp, state), inp.scaling, inp.softcap)
    else:
        per_head = grouped_scores(inp.query, inp.key, inp.scaling, inp.softcap)
    scores = vote(per_head, inp.valid, inp.per_head)
    picked = top_tokens(scores, eligible, rule.budget.resolve(inp.n))
    return torch.cat([forced.expand(*picked.shape[:2], -1), picked], dim=-1)


def _cosine_per_index_head(inp: GroupInputs, previous: torch.Tensor) -> torch.Tensor:
    """Cosine(new query, query of the last selection) per query head, averaged per index head."""
    cos = torch.nn.functional.cosine_similarity(inp.query.float(), previous, dim=-1)   # (B, h)
    if inp.per_head:
        return cos
    return cos.view(cos.shape[0], inp.key.shape[1], -1).mean(-1)                     # (B, hk)


def select(inp: GroupInputs, rule, state: TokenSelectState) -> torch.Tensor:
    counters = state.counters
    if rule.reuse is None:
        counters["full_scorings"] += inp.query.shape[0] * inp.index_heads
        return score_and_select(inp, rule, state)
    if inp.fresh or state.last_query is None or state.last_query.shape != inp.query.shape:
        reuse = torch.zeros(inp.query.shape[0], inp.index_heads, dtype=torch.bool, device=inp.key.device)
    else:
        reuse = _cosine_per_index_head(inp, state.last_query) >= rule.reuse
    n_reuse = int(reuse.sum())
    counters["reuses"] += n_reuse
    counters["full_scorings"] += reuse.numel() - n_reuse

    reused = None
    if n_reuse:
        # old selection + the tokens appended since it was made (all newer than anything in it)
        since = state.last_n                                               # (B, Hi)
        width = inp.n - int(since.min())
        newest = torch.arange(inp.n - width, inp.n, device=inp.key.device).expand(*since.shape, -1)
        newest = newest.masked_fill(newest < since[..., None], -1)
        reused = torch.cat([state.last_indices, newest], dim=-1)
        if n_reuse == reuse.numel():
            return reused

    fresh = score_and_select(inp, rule, state)
    n_now = torch.full(reuse.shape, inp.n, dtype=torch.long, device=inp.key.device)
    if reused is None:
        state.last_query, state.last_indices, state.last_n = inp.query.float().clone(), fresh, n_now
        return fresh
    # mixed: keep the old selection where it is reused, the new one elsewhere
    width = max(fresh.shape[-1], reused.shape[-1], state.last_indices.shape[-1])
    out = torch.where(reuse[..., None], pad_indices(reused, width), pad_indices(fresh, width))
    qmask = reuse if inp.per_head else reuse.repeat_interleave(inp.groups, dim=1)
    state.last_query = torch.where(qmask[..., None], state.last_query, inp.query.float())
    state.last_indices = torch.where(reuse[..., None], pad_indices(state.last_indices, width),
                                     pad_indices(fresh, width))
    state.last_n = torch.where(reuse, state.last_n, n_now)
    return out


def select_and_attend_cpu(inp: GroupInputs, rule, state: TokenSelectState, value: torch.Tensor):
    """select() and the attention over its choice in one C call, for a step with no mask or one
    that hides a prefix of each row (inp.starts): Double Sparsity's kernel
    (decode/double_sparsity.c) with every channel, reading K itself (or its int8 codes) as its
    label cache, ranks keys by q.k (the group's summed softmaxes when shared), as select() does.
    None for the rules it does not cover: query reuse (it keeps the query history), softcap
    (the kernel ranks uncapped scores) and int8 scoring of head dims over 512 (its float sums
    of the codes' products would no longer be exact)."""
    # imported here: importing double_sparsity registers it, and methods register in the order
    # decode/__init__ lists them (the order plans and tables show)
    from sparse_infer.decode.double_sparsity import double_sparsity_decode_cpu

    B, hk, n, D = inp.key.shape
    if rule.reuse is not None or inp.softcap or (rule.scoring == "int8" and D > 512):
        return None
    state.counters["full_scorings"] += B * inp.index_heads
    every_channel = torch.arange(D, device=inp.key.device).expand(B, hk, D)
    labels, scales, fold_from = inp.key, None, n
    if rule.scoring == "int8":
        if int8_keys_stale(inp, state):
            update_int8_keys(inp, state)                 # a new sequence: codes of the whole K
        else:
            fold_from = state.codes.length               # rows [fold_from, n) are written by the call
            state.codes.ensure(n)
            state.scales.ensure(n)
        labels, scales = state.codes.data[:, :, :n], state.scales.data[:, :, :n, 0]
    result = double_sparsity_decode_cpu(inp.query, inp.key, value, labels, every_channel, sink=rule.sink,
                                        local=rule.local, budget=rule.budget.resolve(n), scaling=inp.scaling,
                                        index_heads=inp.index_heads, fold_from=fold_from, scales=scales,
                                        starts=inp.starts)
    if scales is not None:
        state.codes.length = state.scales.length = n
    return result


def _reuse(value, path):
    if value is None or value is False:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not -1 <= value <= 1:
        raise PlanError(path, f"must be a cosine-similarity threshold in [-1, 1] or null, got {value!r}")
    return float(value)


SCORINGS = ("exact", "int8")


def _scoring(value, path):
    if value not in SCORINGS:
        raise PlanError(path, f"must be one of {', '.join(SCORINGS)}, got {value!r}")
    return value


@register
class TokenSelect(BudgetedSelector):
    name = "token_select"
    label = "tok"
    params = {**BudgetedSelector.budget_params, "reuse": Param(_reuse, None),
              "scoring": Param(_scoring, "exact")}
    State = TokenSelectState
    select_and_attend_cpu = staticmethod(select_and_attend_cpu)
    search_priority = 1
    query_aware = True

    def select(self, inp, rule, state):
        return select(inp, rule, state)

    def search_curves(self, inputs, channels=None):
        # exact scores rank as the true attention does (summed per group when shared)
        exact = self.ranked_curve(inputs, inputs.group_sum(inputs.probs, inputs.groups) if inputs.shared else None)
        out = {(self.name,): exact[(self.name,)]}
        if {"scoring": "int8"} not in self.search_variants(getattr(inputs, "settings", None)):
            return out           # --no-int8-scoring: no variant reads the int8 curve
        approx = self._int8_ranking(inputs)
        if inputs.shared:
            approx = inputs.group_vote(approx, inputs.visible.expand(approx.shape[0], -1, -1), inputs.groups)
        out[(self.name + "_int8",)] = self.ranked_curve(inputs, approx)[(self.name,)]
        return out

    @staticmethod
    def _int8_ranking(inputs) -> torch.Tensor:
        """(Hq, dq, n) the scores `scoring: int8` ranks by, for the stand-in queries: the same
        int8_scores as decode, the dq queries of a head quantized one by one as decode does."""
        hq, dq, D = inputs.query.shape
        codes, scales = quantize_keys(inputs.key[None])                      # (1, Hkv, n, D)
        scores = int8_scores(inputs.query.reshape(1, hq * dq, D), codes, scales, inputs.scaling,
                             getattr(inputs, "softcap", None))
        return scores.reshape(hq, dq, -1)

    def search_variants(self, settings):
        return [{}, {"scoring": "int8"}] if getattr(settings, "int8_scoring", True) else [{}]

    def search_recall(self, curves, params, n):
        name = self.name + "_int8" if params.get("scoring") == "int8" else self.name
        return curve_at(curves[name], resolve(params["budget"], n))

    def search_cost(self, params, n, head_dim, channels):
        rows = resolve(params["budget"], n) + SELECTOR_SINK + SELECTOR_LOCAL
        if params.get("scoring") == "int8":
            # scores from int8 codes (D bytes a key, a quarter of an fp32 key) and a 4-byte scale,
            # then reads K and V of the chosen keys (fp32 cache assumed)
            return min(1.0, (head_dim + 4) / (8 * head_dim) + rows / n)
        # scores every key (reads all of K), then reads V of the chosen ones
        return min(1.0, 0.5 + rows / (2 * n))

    def bench_cases(self, budget):
        return [BenchCase(self.name, {"budget": budget}),
                BenchCase("token_select_int8", {"budget": budget, "scoring": "int8"}, "scoring=int8"),
                BenchCase("token_select_reuse", {"budget": budget, "reuse": 0.9}, "reuse=0.9")]

    def bytes_read(self, rule, n, rows, *, cache_heads, head_dim, elem_size, counters):
        # V of the selected rows; the scored keys only on a step that scored (a reused selection
        # reads none): all of K, or with int8 its codes and scales and then K of the selected rows
        selected = rows * head_dim * elem_size
        if counters.get("full_scorings", 0) == 0:
            return selected
        if rule.params["scoring"] == "int8":
            return 2 * selected + cache_heads * n * (head_dim + 4)
        return selected + cache_heads * n * head_dim * elem_size
