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
import weakref

import torch

from sparse_infer.decode.dispatch import decode_attention
from sparse_infer.methods import DENSE
from sparse_infer.prefill.dispatch import sparse_prefill
from sparse_infer.runtime import LayerRuntime, causal_mask, causal_pairs, runtime_for

IMPLEMENTATION = "sparse_infer"


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
    return causal_mask(q_len, n, device)[None, None].expand(batch, 1, -1, -1)


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


# torch.compile runs the sparse paths as they are, between graphs: their index sizes depend on
# the data (.item(), top-k counts) and the C kernel reads raw pointers, which tracing cannot
# follow (it crashed the process). The rest of the model compiles.
_DECODE_ATTENTION = torch.compiler.disable(decode_attention)


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
        out = _DECODE_ATTENTION(rt, module, query, key, value, _to_bool_mask(attention_mask), scaling, kwargs)
        if out is None:
            return _dense(rt, module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        rt.stats.sparse_decode_calls += 1
        return out.transpose(1, 2).contiguous(), None
    rt.stats.prefill_calls += 1
    section = rt.plan.prefill
    if n < section.min_len or all(rule.kind == DENSE for rule, _ in rt.prefill_groups):
        pairs = query.shape[0] * query.shape[1] * causal_pairs(q_len, n)
        rt.stats.selected_pairs += pairs
        rt.stats.causal_pairs += pairs
        started = rt.clock(query) if rt.timed else 0.0
        out = _dense(rt, module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        if rt.timed:
            rt.stats.dense_s += rt.clock(query) - started
        return out
    rt.stats.sparse_prefill_calls += 1
    out = sparse_prefill(rt, query, key, value, _to_bool_mask(attention_mask), scaling, kwargs.get("softcap"))
    return out.transpose(1, 2).contiguous(), None

