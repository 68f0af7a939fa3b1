"""Prefill patterns: each maps (query, key, rule) to a BlockSparseIndex, never to a result.

Each pattern is one class registered in sparse_infer.methods (a_shape.py, vertical_slash.py,
block.py, adaptive.py, imported here in the order plans list them); prefill.dispatch runs a layer's rules.
"""
from sparse_infer.methods import PREFILL_PATTERNS
from sparse_infer.prefill import a_shape, vertical_slash, block, adaptive  # noqa: F401  (registers them, in this order)


def build_index(rule, query, key, **kwargs):
    return PREFILL_PATTERNS[rule.kind].build_index(query, key, rule, **kwargs)
