"""One layer's analysis: captured q/k of every calibration prompt -> a choice per head."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from sparse_infer.methods import DECODE_SELECTORS
from sparse_infer.profiler.decode import CurveInputs, curve_entries, group_sum, retrieval_hits
from sparse_infer.profiler.search import (
    DENSE_CHOICE, HeadReport, MeanTable, SearchSettings, choose_decode, decide_prefill, decode_cost_factor, decode_costs,
    decode_recall,
    evaluate_prefill_run, measure_rules, runtime_granularity,
)
from sparse_infer.profiler.stats import attention_stats, channel_scores, last_attention


@dataclass
class LayerRun:
    """One prompt's post-RoPE q/k at one layer (batch dimension dropped)."""

    length: int                         # nominal profiling length this prompt belongs to
    query: torch.Tensor                 # (Hq, n, D)
    key: torch.Tensor                   # (Hkv, n, D)
    scaling: float
    mask: torch.Tensor | None = None
    softcap: float | None = None
    input_ids: torch.Tensor | None = None
    answer_positions: list[int] = field(default_factory=list)
    needle_span: tuple[int, int] | None = None


def curve_size(length: int) -> int:
    """Decode budgets are searched up to half the cache; more than that is left to dense."""
    return max(1, length // 2)


def _curves_at(table: MeanTable) -> dict:
    """Mean curves as the selectors' search_recall reads them: {name: curve} for (name,) entries,
    {name: {key: curve}} for (name, key) entries."""
    out = {}
    for key in table.sums:
        if len(key) == 1:
            out[key[0]] = table.get(key)
        else:
            out.setdefault(key[0], {})[key[1]] = table.get(key)
    return out


def _answer_rows(run: LayerRun, last_pos: torch.Tensor) -> list[int]:
    """Rows of the decode queries that produce the run's answer tokens (the copying ones)."""
    first, dq = int(last_pos[0]), last_pos.shape[0]
    return [t - 1 - first for t in run.answer_positions if 0 <= t - 1 - first < dq]


def _answer_inputs(run: LayerRun, last_probs, last_pos, shared: bool, settings=None) -> CurveInputs | None:
    rows = _answer_rows(run, last_pos)
    if run.needle_span is None or not rows:
        return None
    return CurveInputs(last_probs[:, rows], last_pos[rows], run.query[:, last_pos[rows]], run.key,
                       scaling=run.scaling, size=curve_size(run.length), shared=shared, settings=settings,
                       softcap=run.softcap)


def _min_curves(a, b):
    """Per head and budget, the lower of two recall curves (nested like _curves_at's output)."""
    if isinstance(a, dict):
        return {k: _min_curves(a[k], b[k]) for k in a}
    return torch.minimum(a, b)


def _top_share(x: torch.Tensor, total: float) -> torch.Tensor:
    k = max(1, x.shape[-1] // 100)
    return x.topk(k, dim=-1).values.sum(-1) / total


def analyze_layer(runs: list[LayerRun], settings: SearchSettings, *, block_size: int | None = None,
                  decode_queries: int = 32, on_run: Callable[[int], None] | None = None,
                  prefill: bool = True) -> list[HeadReport]:
    """Gather exact statistics over `runs` and pick each head's prefill pattern and decode method.
    prefill=False: decode only (every head's prefill stays dense, its statistics are not taken)."""
    bs = block_size or settings.block_size
    hq, _, head_dim = runs[0].query.shape
    hkv = runs[0].key.shape[0]
    grans = ("head", "group") if hq > hkv else ("head",)
    G = hq // hkv
    shared = settings.decode_granularity == "group" and G > 1     # one decode selection per kv head
    prefill_tables: dict[int, MeanTable] = {}
    decode_tables: dict[int, MeanTable] = {}
    # the answer-copying queries only: needed when a retrieval head may take a selector
    answer_tables: dict[int, MeanTable] = {}
    answer_curves = not settings.retrieval_dense
    chan = torch.zeros(hq, head_dim)
    hits, copies = torch.zeros(hq), 0
    vshare, sshare = torch.zeros(hq), torch.zeros(hq)
    kept = []
    for i, run in enumerate(runs):
        dq = max(decode_queries, 2 + len(run.answer_positions))
        if prefill:
            stats = attention_stats(run.query, run.key, scaling=run.scaling, block_size=bs, decode_queries=dq,
                                    mask=run.mask, softcap=run.softcap)
            entries = evaluate_prefill_run(run.query, run.key, stats, scaling=run.scaling, granularities=grans,
                                           mask=run.mask, softcap=run.softcap, length=run.length)
            prefill_tables.setdefault(run.length, MeanTable()).add(entries)
            last_probs, last_pos = stats.last_probs, stats.last_pos
            vshare += _top_share(stats.col_total, stats.n)
            sshare += _top_share(stats.diag_mass, stats.n)
        else:
            stats = None
            last_probs, last_pos = last_attention(run.query, run.key, scaling=run.scaling, decode_queries=dq,
                                                  mask=run.mask, softcap=run.softcap)
        q_last = run.query[:, last_pos]
        curves = CurveInputs(last_probs, last_pos, q_last, run.key, scaling=run.scaling,
                             size=curve_size(run.length), shared=shared, settings=settings, softcap=run.softcap)
        decode_tables.setdefault(run.length, MeanTable()).add(curve_entries(curves))
        answer = _answer_inputs(run, last_probs, last_pos, shared, settings) if answer_curves else None
        if answer is not None:
            answer_tables.setdefault(run.length, MeanTable()).add(curve_entries(answer))
        chan += channel_scores(run.query, run.key)
        if run.needle_span is not None and run.answer_positions:
            h, c = retrieval_hits(last_probs, last_pos, run.input_ids, run.answer_positions, run.needle_span)
            hits += h
            copies += c
        # kept for the Double Sparsity curves (channels need every run first) and to verify the final rules
        kept.append((last_probs, last_pos, stats))
        if on_run:
            on_run(i)

    # Double Sparsity: the r channels carrying the largest mean |q_d k_d| per head, or per
    # group when the group shares one label cache and one selection
    r = min(settings.channels, head_dim)
    if shared:
        chan = group_sum(chan, G)
    channels = chan.topk(r, dim=-1).indices.sort(-1).values
    for run, (last_probs, last_pos, _) in zip(runs, kept):
        curves = CurveInputs(last_probs, last_pos, run.query[:, last_pos], run.key, scaling=run.scaling,
                             size=curve_size(run.length), shared=shared, settings=settings, softcap=run.softcap)
        decode_tables[run.length].add(curve_entries(curves, channels))
        answer = _answer_inputs(run, last_probs, last_pos, shared, settings) if answer_curves else None
        if answer is not None:
            answer_tables[run.length].add(curve_entries(answer, channels))

    # prefill: choose, then verify each head at the granularity it will really run with
    lengths = sorted({run.length for run in runs})
    choices = decide_prefill(prefill_tables, hq, hkv, settings) if prefill else [DENSE_CHOICE] * hq
    rec = {L: torch.ones(hq) for L in lengths}
    tail = {L: torch.ones(hq) for L in lengths}
    den = {L: torch.ones(hq) for L in lengths}
    while prefill:
        rules = [c.rule() for c in choices]
        grans_rt = runtime_granularity(rules, hkv)
        rec = {L: torch.zeros(hq) for L in prefill_tables}
        tail = {L: torch.ones(hq) for L in prefill_tables}          # minimum over samples
        den = {L: torch.zeros(hq) for L in prefill_tables}
        cnt = {L: 0 for L in prefill_tables}
        for run, (_, _, stats) in zip(runs, kept):
            r_, t_, d_ = measure_rules(rules, grans_rt, run.query, run.key, stats, scaling=run.scaling,
                                       mask=run.mask, softcap=run.softcap)
            rec[run.length] += r_
            tail[run.length] = torch.minimum(tail[run.length], t_)
            den[run.length] += d_
            cnt[run.length] += 1
        rec = {L: v / cnt[L] for L, v in rec.items()}
        den = {L: v / cnt[L] for L, v in den.items()}
        failing = [h for h in range(hq) if choices[h].pattern != "dense"
                   and any(min(float(rec[L][h]), float(tail[L][h])) < settings.target_recall for L in rec)]
        if not failing:
            break
        for h in failing:
            choices[h] = DENSE_CHOICE

    decode_at = {L: _curves_at(t) for L, t in decode_tables.items()}
    answer_at = {L: _curves_at(t) for L, t in answer_tables.items()}
    retrieval = hits / copies if copies else torch.zeros(hq)
    factor = decode_cost_factor(settings, hq, hkv)
    is_retrieval = [bool(copies) and float(retrieval[h]) >= settings.retrieval_threshold for h in range(hq)]
    decisions = {}
    for members in ([list(range(j * G, (j + 1) * G)) for j in range(hkv)] if shared else [[h] for h in range(hq)]):
        retrieval_group = any(is_retrieval[h] for h in members)
        if retrieval_group and settings.retrieval_dense:
            # a retrieval head keeps the whole cache; in a shared group the others read it
            # anyway, so selecting for them would only add work
            dec = DENSE_CHOICE
        else:
            curves = decode_at
            if retrieval_group and set(answer_at) == set(decode_at):
                # the mean over all decode queries can hide the few that copy the answer: a
                # retrieval head's selector must keep the target on those as well
                curves = {L: _min_curves(decode_at[L], answer_at[L]) for L in decode_at}
            dec = choose_decode(curves, members, head_dim, settings, channels[members[0]].tolist(), factor,
                                query_aware_only=retrieval_group)
        decisions.update({h: dec for h in members})
    reports = []
    for h in range(hq):
        chans = channels[h].tolist()
        dec = decisions[h]
        d_rec, d_cost = {}, {}
        for L, curves in decode_at.items():
            if dec.pattern == "dense":
                d_rec[L], d_cost[L] = 1.0, 1.0
            else:
                d_rec[L] = float(decode_recall(curves, dec.pattern, dec.params, L)[h])
                d_cost[L] = min(1.0, float(decode_costs(L, head_dim, settings.channels)[dec.pattern](dec.params))
                                * factor)
        reports.append(HeadReport(
            prefill=choices[h], decode=dec,
            prefill_recall={L: float(v[h]) for L, v in rec.items()},
            prefill_tail_recall={L: float(v[h]) for L, v in tail.items()},
            prefill_density={L: float(v[h]) for L, v in den.items()},
            decode_recall=d_rec, decode_cost=d_cost,
            retrieval_score=float(retrieval[h]),
            # the calibrated channels, for a method that was chosen with them
            channels=chans if getattr(DECODE_SELECTORS.get(dec.pattern), "search_needs_channels", False) else None,
            vertical_share=float(vshare[h] / len(runs)), slash_share=float(sshare[h] / len(runs)),
        ))
    return reports
