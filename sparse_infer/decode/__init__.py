"""Decode-time KV selection (q == 1): one file per selector, dispatch in decode.dispatch.

    streaming       first `sink` + last `local` valid tokens
    token_select    exact q.k over all keys, per-head softmax summed over the group, top `budget`
    double_sparsity q.k approximated on r label channels (label cache ~ r/D of K), top `budget`
    quest           per-page key min/max -> upper bound of q.k, top pages up to `budget` tokens

This package face re-exports the dispatch entry points and introspection helpers.
"""
from sparse_infer.decode import double_sparsity, quest, streaming, token_select  # noqa: F401
from sparse_infer.decode.dispatch import (  # noqa: F401
    SELECTORS, decode_attention, decode_counters, decode_state_bytes, reset_decode_state,
)

__all__ = ["SELECTORS", "decode_attention", "decode_counters", "decode_state_bytes", "reset_decode_state"]
