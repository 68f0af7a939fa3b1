"""The attention function registered with transformers' AttentionInterface.

transformers calls ``sparse_attention_forward(module, q, k, v, mask, ...)`` for every
attention layer once the model's implementation is "sparse_infer". It finds the
layer's plan in a side table keyed by the module (nothing is written onto the
model), then dispatches: prefill (q > 1) to the layer's patterns and the
block-sparse executor, decode (q == 1) to the decode selectors, and everything
the plan does not cover (short inputs, dense heads, non-causal modules) to the
implementation the model had before patching, so those outputs are unchanged.
"""
from __future__ import annotations

import sys
import threading
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sparse_infer.plan import Plan, Rule

IMPLEMENTATION = "sparse_infer"


@dataclass
class LayerStats:
    prefill_calls: int = 0
    sparse_prefill_calls: int = 0
    selected_pairs: float = 0.0      # (query, key) pairs computed in sparse prefill calls (dense heads: all)
    causal_pairs: float = 0.0        # pairs dense causal attention would compute for the same heads
    decode_calls: int = 0
    sparse_decode_calls: int = 0
    decode_selected: float = 0.0
    decode_total: float = 0.0


@dataclass
class LayerRuntime:
    plan: Plan
    layer_idx: int
    num_heads: int
    num_kv_heads: int
    dense_fn: object                    # the pre-patch attention function
    dense_mask: str = "bool"            # the mask dense_fn expects: one of DENSE_MASKS
    backend: str = "auto"
    dense_above: float | str = "auto"    # see kernels.registry.DENSE_ABOVE
    stats: LayerStats = field(default_factory=LayerStats)
    decode_state: dict = field(default_factory=dict)   # selectors' side state (see sparse_infer.decode)
    prefill_groups: list = field(default_factory=list)  # [(Rule, [q heads])], computed once
    decode_groups: list = field(default_factory=list)


_RUNTIME: "weakref.WeakKeyDictionary[torch.nn.Module, LayerRuntime]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def runtime_for(module) -> LayerRuntime | None:
    return _RUNTIME.get(module)


def set_runtime(module, runtime: LayerRuntime | None) -> None:
    with _LOCK:
        if runtime is None:
            _RUNTIME.pop(module, None)
        else:
            _RUNTIME[module] = runtime


def group_heads(section, layer_idx: int, num_heads: int) -> list[tuple[Rule, list[int]]]:
    """Heads of one layer grouped by identical rule, so each rule runs once over its heads."""
    groups: dict[tuple, tuple[Rule, list[int]]] = {}
    for head in range(num_heads):
        rule = section.rule(layer_idx, head)
        groups.setdefault(rule.key(), (rule, []))[1].append(head)
    return list(groups.values())


# What the pre-patch attention function expects as its mask. The mask function registered for
# sparse_infer is sdpa_mask (bool, True = attend), which returns None for a plain causal call so
# that no (q, n) mask is built; SDPA then runs is_causal. Eager and flex functions read None as
# "attend everything", so they get the mask their own implementation would have built.
#   "bool":  SDPA-style; None means causal
#   "float": eager-style additive mask (0 / dtype min), always materialized for q > 1
#   "flex":  a FlexAttention BlockMask
DENSE_MASKS = ("bool", "float", "flex")


def eager_fallback(module):
    """The model file's own eager_attention_forward (transformers keeps one per architecture)."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward, "bool"
    return fn, "float"


def _to_float_mask(mask: torch.Tensor | None, dtype) -> torch.Tensor | None:
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.where(mask, torch.zeros((), dtype=dtype, device=mask.device),
                       torch.full((), torch.finfo(dtype).min, dtype=dtype, device=mask.device))


def _to_bool_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None or mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2 if mask.is_floating_point() else mask.bool()


def _causal_bool_mask(batch: int, q_len: int, n: int, device) -> torch.Tensor:
    """(B, 1, q, n) bool: the queries are the last q_len of n keys (what None stands for)."""
    causal = torch.ones(q_len, n, dtype=torch.bool, device=device).tril(n - q_len)
    return causal[None, None].expand(batch, 1, -1, -1)


# FlexAttention masks built for the dense fallback, so the layers of one forward (which all get
# the same mask tensor) build the BlockMask once: key -> (weak reference to the source mask, BlockMask)
_FLEX_MASKS: dict = {}


def _flex_block_mask(mask: torch.Tensor | None, batch: int, q_len: int, n: int, device):
    """The BlockMask transformers' flex_attention_mask would build for this bool mask (None: causal)."""
    key = (("causal", batch, q_len, n, str(device)) if mask is None
           else ("mask", id(mask), mask._version, tuple(mask.shape)))
    held = _FLEX_MASKS.get(key)
    if held is not None and (mask is None or held[0]() is mask):
        return held[1]
    from transformers.masking_utils import flex_attention_mask

    if mask is None:
        offset = n - q_len
        mask_mod = lambda b, h, q, kv: kv <= q + offset                 # noqa: E731
    else:
        full = mask.bool().expand(batch, 1, q_len, n)
        mask_mod = lambda b, h, q, kv: full[b, 0, q, kv]                # noqa: E731
    block_mask = flex_attention_mask(batch, q_len, n, mask_function=mask_mod, device=device)
    if len(_FLEX_MASKS) >= 4:
        _FLEX_MASKS.clear()
    _FLEX_MASKS[key] = ((lambda: None) if mask is None else weakref.ref(mask), block_mask)
    return block_mask


def _dense(rt: LayerRuntime, module, query, key, value, attention_mask, **kwargs):
    if rt.dense_mask != "bool" and not _is_block_mask(attention_mask):
        batch, q_len, n = query.shape[0], query.shape[2], key.shape[2]
        if rt.dense_mask == "flex":
            if attention_mask is not None or q_len > 1:
                attention_mask = _flex_block_mask(_to_bool_mask(attention_mask), batch, q_len, n, query.device)
        else:
            if attention_mask is None and q_len > 1:
                attention_mask = _causal_bool_mask(batch, q_len, n, query.device)
            attention_mask = _to_float_mask(attention_mask, query.dtype)
    return rt.dense_fn(module, query, key, value, attention_mask, **kwargs)


def _is_block_mask(mask) -> bool:
    return mask is not None and not torch.is_tensor(mask)


def _dense_subset(query, key, value, mask, scaling, softcap):
    """Dense causal attention over a subset of heads (query heads map 1:1 or G:1 onto key heads)."""
    from sparse_infer.kernels.index import dense_masked_attention
    q_len, n = query.shape[2], key.shape[2]
    if softcap:
        causal = torch.ones(q_len, n, dtype=torch.bool, device=query.device).tril(n - q_len)
        full = causal[None, None] if mask is None else causal[None, None] & mask
        return dense_masked_attention(query, key, value, full, scaling, softcap=softcap)
    groups = query.shape[1] // key.shape[1]
    if mask is None and q_len == n:
        # plain causal prefill: no (n, n) mask (SDPA would turn it into an n^2 float tensor: GBs at 32K)
        # and no copy of K/V per query head
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                              enable_gqa=groups > 1)
    if groups > 1:
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    if mask is None:                                   # chunked prefill: queries are the last q_len keys
        causal = torch.ones(q_len, n, dtype=torch.bool, device=query.device).tril(n - q_len)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=causal, scale=scaling)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.nan_to_num(0.0)


def _causal_pairs(q_len: int, n: int) -> float:
    """(query, key) pairs causal attention computes for one head: the queries are the last q_len of n keys."""
    return q_len * (n - q_len) + q_len * (q_len + 1) / 2


def heads_of(mask: torch.Tensor | None, heads: list[int]) -> torch.Tensor | None:
    """The rows of a (B, 1|H, ...) mask for the given heads (a shared mask is kept as it is)."""
    if mask is None or mask.shape[1] == 1 or heads == list(range(mask.shape[1])):
        return mask
    return mask[:, heads]


def _head_subsets(heads: list[int], num_heads: int, num_kv: int):
    """Index tensors for running a subset of query heads while keeping GQA sharing when possible."""
    groups = num_heads // num_kv
    kv_of = [h // groups for h in heads]
    whole = sorted(set(kv_of))
    if len(heads) == len(whole) * groups:          # the subset is made of whole GQA groups
        return heads, whole
    return heads, kv_of                             # one key head per query head


def _decode_attention():
    # imported on first use (sparse_infer.decode imports this module); an import statement in
    # the per-token path would cost a lookup on every layer of every step
    global _DECODE_ATTENTION
    if _DECODE_ATTENTION is None:
        from sparse_infer.decode import decode_attention
        # torch.compile runs the sparse paths as they are, between graphs: their index sizes
        # depend on the data (.item(), top-k counts) and the C kernel reads raw pointers,
        # which tracing cannot follow (it crashed the process). The rest of the model compiles.
        _DECODE_ATTENTION = torch.compiler.disable(decode_attention)
    return _DECODE_ATTENTION


_DECODE_ATTENTION = None


def sparse_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    rt = runtime_for(module)
    if rt is None:
        raise RuntimeError(
            f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) uses the 'sparse_infer' attention "
            "implementation but has no plan: call sparse_infer.patch(model, plan) on the model that owns it"
        )
    q_len, n = query.shape[2], key.shape[2]
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    causal = getattr(module, "is_causal", True) and kwargs.get("is_causal", True) is not False
    mask_ok = attention_mask is None or attention_mask.shape[-1] == n
    if not causal or not mask_ok or (module.training and dropout > 0):
        return _dense(rt, module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if q_len == 1:
        rt.stats.decode_calls += 1
        out = _decode_attention()(rt, module, query, key, value, _to_bool_mask(attention_mask), scaling, kwargs)
        if out is None:
            return _dense(rt, module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        rt.stats.sparse_decode_calls += 1
        return out.transpose(1, 2).contiguous(), None
    rt.stats.prefill_calls += 1
    section = rt.plan.prefill
    if n < section.min_len or all(rule.kind == "dense" for rule, _ in rt.prefill_groups):
        pairs = query.shape[0] * query.shape[1] * _causal_pairs(q_len, n)
        rt.stats.selected_pairs += pairs
        rt.stats.causal_pairs += pairs
        return _dense(rt, module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    rt.stats.sparse_prefill_calls += 1
    out = sparse_prefill(rt, query, key, value, _to_bool_mask(attention_mask), scaling, kwargs.get("softcap"))
    return out.transpose(1, 2).contiguous(), None


def resolve_dense_above(dense_above, backend: str, tensor, phase: str = "prefill") -> dict:
    """See sparse_infer.kernels.dispatch.resolve_dense_above (imported on use: importing the
    executors imports triton, which must wait for TRITON_INTERPRET to be set on CPU machines)."""
    from sparse_infer.kernels.dispatch import resolve_dense_above as resolve
    return resolve(dense_above, backend, tensor, phase)


def __getattr__(name):
    # DENSE_ABOVE: the registry's table itself (same dict; where it was measured is explained there)
    if name == "DENSE_ABOVE":
        from sparse_infer.kernels.registry import DENSE_ABOVE
        return DENSE_ABOVE
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@torch.compiler.disable    # see _decode_attention
def sparse_prefill(rt: LayerRuntime, query, key, value, mask, scaling, softcap=None):
    """Run each rule of the layer over its heads; returns (B, Hq, q, D).

    Heads of dense rules, and heads whose index selects more than `dense_above`
    of the causal pairs, are collected and run as one dense call at the end.
    """
    from sparse_infer.kernels.dispatch import block_sparse_attention
    from sparse_infer.kernels.index import BlockSparseIndex, index_head_density
    from sparse_infer.prefill import build_index

    section = rt.plan.prefill
    num_heads, num_kv = query.shape[1], key.shape[1]
    if len(rt.prefill_groups) == 1:
        parts = [(rt.prefill_groups[0][0], list(range(num_heads)), list(range(num_kv)))]
    else:
        parts = [(rule, *_head_subsets(heads, num_heads, num_kv)) for rule, heads in rt.prefill_groups]
    out = query.new_empty(query.shape[0], num_heads, query.shape[2], value.shape[-1])
    q_len, n = query.shape[2], key.shape[2]
    per_head_pairs = query.shape[0] * _causal_pairs(q_len, n)
    dense_above = resolve_dense_above(rt.dense_above, rt.backend, query)
    dense_heads: list[int] = []
    for rule, heads, kv_heads in parts:
        if rule.kind == "dense":
            dense_heads += heads
            continue
        whole = len(heads) == num_heads and len(kv_heads) == num_kv
        q = query if whole else query[:, heads]
        k = key if whole else key[:, kv_heads]
        v = value if whole else value[:, kv_heads]
        m = heads_of(mask, heads)
        granularity = section.granularity if k.shape[1] < q.shape[1] else "head"
        index = build_index(rule, q, k, block_size=section.block_size, scaling=scaling,
                            attention_mask=m, granularity=granularity, softcap=softcap)
        density = index_head_density(index, q_len, n)                       # per index head
        per_index = len(heads) // index.num_index_heads                     # query heads per index head
        limit = dense_above["group" if per_index > 1 else "head"]
        too_dense = (density > limit).repeat_interleave(per_index).tolist()
        if any(too_dense):
            keep = [i for i, d in enumerate(too_dense) if not d]
            dense_heads += [h for h, d in zip(heads, too_dense) if d]
            if not keep:
                continue
            # drop whole index heads; a kept GQA index head keeps all its query heads
            keep_index = sorted({i // per_index for i in keep})
            index = BlockSparseIndex(index.block_size, index.kv_blocks[:, keep_index],
                                     None if index.columns is None else index.columns[:, keep_index])
            density = density[keep_index]
            heads = [heads[i] for i in keep]
            shared = q.shape[1] // k.shape[1]
            # per-group index: keep its kv heads; per-head index: one kv head per kept query head
            kv_keep = keep_index if per_index > 1 else [i // shared for i in keep]
            q, k, v = q[:, keep], k[:, kv_keep], v[:, kv_keep]
            m = heads_of(m, keep)
            whole = False
        res = block_sparse_attention(q, k, v, index, scaling=scaling, attention_mask=m,
                                     softcap=softcap, backend=rt.backend)
        rt.stats.selected_pairs += float(density.sum()) * per_index * per_head_pairs
        rt.stats.causal_pairs += len(heads) * per_head_pairs
        if whole:
            out = res.to(out.dtype)
        else:
            out[:, heads] = res.to(out.dtype)
    if dense_heads:
        dense_heads.sort()
        heads, kv_heads = _head_subsets(dense_heads, num_heads, num_kv)
        whole = len(heads) == num_heads
        res = _dense_subset(query if whole else query[:, heads], key if whole else key[:, kv_heads],
                            value if whole else value[:, kv_heads], heads_of(mask, heads), scaling, softcap)
        rt.stats.selected_pairs += len(heads) * per_head_pairs
        rt.stats.causal_pairs += len(heads) * per_head_pairs
        if whole:
            out = res.to(out.dtype)
        else:
            out[:, heads] = res.to(out.dtype)
    return out


def get_stats(model) -> dict:
    """Measured density per layer since patching (or the last reset_stats)."""
    runtimes = list(_iter_runtimes(model))
    layers = {}
    for rt in runtimes:
        s = rt.stats
        layers[rt.layer_idx] = {
            "prefill_calls": s.prefill_calls, "sparse_prefill_calls": s.sparse_prefill_calls,
            "prefill_density": s.selected_pairs / s.causal_pairs if s.causal_pairs else None,
            "decode_calls": s.decode_calls, "sparse_decode_calls": s.sparse_decode_calls,
            "decode_density": s.decode_selected / s.decode_total if s.decode_total else None,
        }

    def ratio(num: str, den: str):
        total = sum(getattr(rt.stats, den) for rt in runtimes)
        return sum(getattr(rt.stats, num) for rt in runtimes) / total if total else None

    return {"layers": layers, "prefill_density": ratio("selected_pairs", "causal_pairs"),
            "decode_density": ratio("decode_selected", "decode_total")}


def reset_stats(model) -> None:
    for rt in _iter_runtimes(model):
        rt.stats = LayerStats()


def _iter_runtimes(model):
    for module in model.modules():
        rt = runtime_for(module)
        if rt is not None:
            yield rt
