"""Decode-time KV selection (q == 1): one registered DecodeSelector class per file, dispatch in
decode.dispatch (imported here in the order plans list the methods, which registers them).

    streaming       first `sink` + last `local` valid tokens
    token_select    exact q.k over all keys, per-head softmax summed over the group, top `budget`
    double_sparsity q.k approximated on r label channels (label cache ~ r/D of K), top `budget`
    quest           per-page key min/max -> upper bound of q.k, top pages up to `budget` tokens
    layer_select    exact attention, and the layer's top `budget` tokens published for later layers
    layer_reuse     the token set an earlier layer_select layer published in the same step

This package face re-exports the dispatch entry points and introspection helpers.
"""
from sparse_infer.decode import streaming, token_select, double_sparsity, quest, cross_layer  # noqa: F401  (registers)
from sparse_infer.decode.dispatch import decode_attention, decode_counters, decode_state_bytes, reset_decode_state

__all__ = ["decode_attention", "decode_counters", "decode_state_bytes", "reset_decode_state"]
