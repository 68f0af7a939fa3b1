"""Prefill patterns: each maps (query, key, rule) to a BlockSparseIndex, never to a result."""
from sparse_infer.prefill.a_shape import a_shape_index
from sparse_infer.prefill.adaptive import adaptive_index
from sparse_infer.prefill.block import block_index
from sparse_infer.prefill.vertical_slash import vertical_slash_index

PATTERN_BUILDERS = {
    "a_shape": a_shape_index,
    "vertical_slash": vertical_slash_index,
    "block": block_index,
    "adaptive": adaptive_index,
}


def build_index(rule, query, key, **kwargs):
    return PATTERN_BUILDERS[rule.kind](query, key, rule, **kwargs)
