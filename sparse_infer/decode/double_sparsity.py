"""Double Sparsity: approximate q.k from a few "label" channels, then exact attention on the top keys.

A handful of channels of each head carry most of q.k (outlier channels), so
q[c] . k[c] over r channels ranks keys almost like the full product while reading r/D of K.
Those r channels of every cached key are kept in a compact label cache (B, Hkv, n, r),
~r/D of K's memory, appended to in place as tokens arrive (one row per decode step).

Channels (`channels` in the plan):
  * a list of channel indices: used for every kv head of the rule (offline calibrated);
  * an int r: chosen per batch row and kv head when a sequence's side state is (re)built, normally at its
    first decode step, from the prefill: importance[d] = mean |q_d| over the group's query
    heads at that step x mean |k_d| over the valid cached keys; the r largest are kept for
    the rest of the sequence (the label cache is laid out for them). r >= head_dim keeps all.
Selection then follows token_select (soft vote over the group, `budget` best plus sinks
and the local window), with approximate scores.

On CPUs, a step with no mask, or one hiding a prefix of each row (left padding, a sliding
window), runs the choice and its attention in one C call: double_sparsity.c,
beside this file (double_sparsity_decode_cpu).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from sparse_infer.decode.common import (
    SELECTOR_LOCAL, SELECTOR_SINK, BudgetedSelector, GroupInputs, GrowBuffer, forced_and_eligible, top_tokens, vote,
)
from sparse_infer.decode.fused_cpu import check_fused_step, fused_argtypes, fused_step, starts_arg
from sparse_infer.kernels.cpu_decode import refuse_unsupported
from sparse_infer.methods import Param, SideState, register, resolve
from sparse_infer.params import PlanError, bounded, is_int, positive_int


@dataclass
class LabelCacheState(SideState):
    channels: torch.Tensor | None = None    # (B, hk, r) label channels of the sequence
    labels: GrowBuffer | None = None        # (B, hk, n, r) those channels of every cached key


def choose_channels(query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor | None, r: int) -> torch.Tensor:
    """(B, hk, r) channel indices per batch row and kv head, from this step's query (B, h, D)
    and the cached keys (B, hk, n, D). Per row, so a batch row gets the channels it would get alone."""
    B, h, D = query.shape
    hk = key.shape[1]
    q_mag = query.float().abs().view(B, hk, h // hk, D).mean(2)                       # (B, hk, D)
    k_abs = key.float().abs()
    if valid is None:
        k_mag = k_abs.mean(2)
    else:
        # valid is per index head; a key counts if any head of its group may see it
        kv_valid = valid.view(B, hk, -1, valid.shape[-1]).any(2) if valid.shape[1] != hk else valid
        w = kv_valid.float()[..., None]
        k_mag = (k_abs * w).sum(2) / w.sum(2).clamp_min(1.0)
    return (q_mag * k_mag).topk(min(r, D), dim=-1).indices.sort(-1).values


def labels_of(key: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """The label channels of key rows: key (B, hk, m, D), channels (B, hk, r) -> (B, hk, m, r)."""
    B, hk, m, _ = key.shape
    return key.gather(-1, channels[:, :, None, :].expand(B, hk, m, -1))


def update_label_cache(inp: GroupInputs, rule, state: LabelCacheState) -> GrowBuffer:
    """Rebuild the label cache from the full K for a new sequence, else append this step's keys."""
    cache = state.labels
    n = inp.n
    if inp.fresh or cache is None or cache.length >= n:
        if isinstance(rule.channels, int):
            channels = choose_channels(inp.query, inp.key, inp.valid, rule.channels)
        else:
            channels = torch.tensor(rule.channels, device=inp.key.device).expand(*inp.key.shape[:2], -1)
        state.channels = channels.contiguous()
        cache = state.labels = GrowBuffer(labels_of(inp.key, state.channels))
    else:
        cache.append(labels_of(inp.key[:, :, cache.length: n], state.channels))
    return cache


def approximate_scores(query: torch.Tensor, labels: torch.Tensor, channels: torch.Tensor, scaling: float):
    """q[c] . label over the r channels: query (B, h, D), labels (B, hk, n, r), channels (B, hk, r)
    -> (B, hk, G, n) fp32."""
    B, h, D = query.shape
    hk = labels.shape[1]
    q = (query.to(labels.dtype) * scaling).view(B, hk, h // hk, D)      # scale the query, not n scores
    q_lab = q.gather(-1, channels[:, :, None, :].expand(B, hk, h // hk, -1))
    return torch.matmul(q_lab, labels.transpose(-1, -2)).float()             # cache dtype: no fp32 copy


def select(inp: GroupInputs, rule, state: LabelCacheState) -> torch.Tensor:
    cache = update_label_cache(inp, rule, state)
    forced, eligible = forced_and_eligible(inp, rule.sink, rule.local)
    scores = vote(approximate_scores(inp.query, cache.view(), state.channels, inp.scaling), inp.valid,
                  inp.per_head)
    picked = top_tokens(scores, eligible, rule.budget.resolve(inp.n))
    return torch.cat([forced.expand(*picked.shape[:2], -1), picked], dim=-1)


_DS_ARGS = fused_argtypes(
    side=[ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,     # labels, strides b h n
          ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,                     # channels, strides b h
          ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,                     # int8 label scales or NULL
          ctypes.c_void_p],                                                    # first visible key per row or NULL
    sizes=[ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64])      # r sink local budget


def double_sparsity_decode_cpu(query, key, value, labels, channels, *, sink: int, local: int, budget: int,
                               scaling: float, softcap=None, index_heads: int, fold_from: int | None = None,
                               scales: torch.Tensor | None = None, starts: torch.Tensor | None = None):
    """Double Sparsity's key choice and the attention over it in one C call (double_sparsity.c),
    for a step with no mask or one hiding a prefix of each row (`starts`).

    query (B, h, D); key/value (B, hk, n, D); labels (B, hk, n, r), the label cache in key's
    dtype (its rows [fold_from, n) are written here: label[t][c] = key[t][channels[c]]);
    channels int64 (B, hk, r). index_heads: hk for one selection per GQA group, h for one per
    query head. Chooses what select() chooses (the sinks, the local window and the `budget` best
    keys by approximate score, or by the group's summed softmaxes of it) and attends to exactly
    those keys. Returns (out (B, h, 1, D), keys read (B, index_heads)).

    scales: fp32 (B, hk, n) for int8 labels (token_select's `scoring: int8`, see quantize_keys in
    decode/token_select.py): the call writes rows [fold_from, n) of both, and a label's score is
    its scale times the dot product with its codes.

    starts: int64 (B,) or None: batch row b sees only the keys [starts[b], n) (a left-padding or
    sliding-window mask); the sinks are then that range's first keys, as select() has them."""
    B, _, D = query.shape
    hk, n = key.shape[1], key.shape[2]
    check_fused_step(query, key, index_heads, fold_from)
    r = channels.shape[-1]
    if tuple(labels.shape) != (B, hk, n, r) or tuple(channels.shape) != (B, hk, r):
        raise ValueError(f"labels must be (B, hk, n, r) = {(B, hk, n, r)} and channels (B, hk, r), "
                         f"got {tuple(labels.shape)} and {tuple(channels.shape)}")
    if channels.dtype != torch.int64 or channels.stride(-1) != 1:
        raise ValueError("channels must be int64 with unit last stride")
    if scales is None:
        refuse_unsupported(query, key, value, labels)
        scale_args = (None, 0, 0)
    else:
        refuse_unsupported(query, key, value)
        if labels.dtype != torch.int8 or labels.stride(-1) != 1:
            raise ValueError("int8 labels (with scales) must be int8 with unit last stride")
        if tuple(scales.shape) != (B, hk, n) or scales.dtype != torch.float32 or scales.stride(-1) != 1:
            raise ValueError(f"scales must be float32 (B, hk, n) = {(B, hk, n)} with unit last stride, "
                             f"got {scales.dtype} {tuple(scales.shape)}")
        scale_args = (scales.data_ptr(), scales.stride(0), scales.stride(1))
    return fused_step("ds_decode_rows", _DS_ARGS, query, key, value,
                      (labels.data_ptr(), labels.stride(0), labels.stride(1), labels.stride(2),
                       channels.data_ptr(), channels.stride(0), channels.stride(1), *scale_args,
                       starts_arg(starts, B, n)),
                      (r, sink, local, budget), index_heads=index_heads, fold_from=fold_from,
                      scaling=scaling, softcap=softcap,
                      bad_sizes=f"the CPU kernel takes head dims up to 1024 and 1 <= r <= D, got D={D}, r={r}")


def select_and_attend_cpu(inp: GroupInputs, rule, state: LabelCacheState, value: torch.Tensor):
    """select() and the attention over its choice in one C call (double_sparsity_decode_cpu),
    for a step with no mask or one that hides a prefix of each row (inp.starts); the C call also
    writes this step's label rows. Returns (out (B, h, 1, D), keys read per index row (B, Hi))."""
    n = inp.n
    cache = state.labels
    if inp.fresh or cache is None or cache.length >= n:
        cache = update_label_cache(inp, rule, state)          # a new sequence: labels from the whole K
        held = n
    else:
        held = cache.length
        cache.ensure(n)                                       # rows [held, n) are written by the call
    result = double_sparsity_decode_cpu(inp.query, inp.key, value, cache.data[:, :, :n], state.channels,
                                        sink=rule.sink, local=rule.local, budget=rule.budget.resolve(n),
                                        scaling=inp.scaling, softcap=inp.softcap, index_heads=inp.index_heads,
                                        fold_from=held, starts=inp.starts)
    cache.length = n
    return result


def _channels(value, path):
    if is_int(value):
        return positive_int(value, path)
    if isinstance(value, list) and value and all(is_int(c) and c >= 0 for c in value):
        for i, c in enumerate(value):
            bounded(c, f"{path}.{i}")
        if len(set(value)) != len(value):
            raise PlanError(path, "channel indices must be distinct")
        return list(value)
    raise PlanError(path, f"must be a channel count or a non-empty list of channel indices, got {value!r}")


@register
class DoubleSparsity(BudgetedSelector):
    name = "double_sparsity"
    label = "DS"
    params = {"channels": Param(_channels, 16), **BudgetedSelector.budget_params}
    State = LabelCacheState
    select_and_attend_cpu = staticmethod(select_and_attend_cpu)
    search_priority = 3
    query_aware = True

    def check_head_dim(self, rule, path, head_dim, where):
        """The channels read of each key: a count or indices within head_dim."""
        chans = rule.channels
        if isinstance(chans, list):
            if max(chans) >= head_dim:
                raise PlanError(f"{path}.channels", f"channel index {max(chans)} out of range: {where} is "
                                                    f"{head_dim}")
        elif chans > head_dim:
            raise PlanError(f"{path}.channels", f"{chans} channels exceed {where} {head_dim}")

    def select(self, inp, rule, state):
        return select(inp, rule, state)

    search_needs_channels = True

    def search_curves(self, inputs, channels=None):
        """Keys ranked by q.k over `channels` (Hq, r) only; when shared, by the group's soft vote (the
        heads of a group then have the same channels, as one label cache per kv head serves them)."""
        hq, dq, n = inputs.probs.shape
        k = inputs.key.float().repeat_interleave(inputs.groups, 0)                # (Hq, n, D)
        qc = inputs.query.float().gather(-1, channels[:, None, :].expand(hq, dq, -1))
        kc = k.gather(-1, channels[:, None, :].expand(hq, n, -1))
        approx = qc @ kc.transpose(-1, -2)
        if inputs.shared:
            # uncapped even under a softcap: select() and the C kernel vote on uncapped approximations
            approx = inputs.group_vote(approx * inputs.scaling, inputs.visible.expand(hq, -1, -1), inputs.groups)
        return self.ranked_curve(inputs, approx)

    def search_available(self, channel_list):
        return channel_list is not None         # needs the profiler's calibrated channels

    def search_cost(self, params, n, head_dim, channels):
        # reads `channels` of D of every key (label cache), then K/V of the chosen keys
        return min(1.0, channels / (2 * head_dim) + (resolve(params["budget"], n) + SELECTOR_SINK + SELECTOR_LOCAL) / n)

    def search_combine(self, points, channel_list):
        return {"channels": list(channel_list), **super().search_combine(points, channel_list)}

    def bytes_read(self, rule, n, rows, *, cache_heads, head_dim, elem_size, counters):
        # the label cache (r of D channels of every key), then K and V of the selected rows
        r = len(rule.channels) if isinstance(rule.channels, list) else min(rule.channels, head_dim)
        selected = rows * head_dim * elem_size
        return 2 * selected + cache_heads * n * head_dim * elem_size * r / head_dim
