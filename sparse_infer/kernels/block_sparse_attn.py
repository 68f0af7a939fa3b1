"""Block-sparse prefill attention: the public face of the prefill executors.

Contract: docs/ARCHITECTURE.md ("Prefill index"). Patterns only build a
`BlockSparseIndex`; the executors compute softmax attention over exactly the
(query, key) pairs that `index_to_mask` describes, without ever building a
dense q x n score or mask matrix. Where things live:

  * `index`          -- BlockSparseIndex, its reference semantics and densities.
  * `torch_executor` -- gathers the selected K/V tiles, CPU friendly.
  * `triton_executor` -- one Triton program per (batch, index head, query block).
  * `flex_executor`  -- PyTorch FlexAttention over a BlockMask built from the index.
  * `registry` / `dispatch` -- which executor a backend name means, and running it.
"""

from .dispatch import block_sparse_attention, resolve_backend
from .flex_executor import block_sparse_attention_flex, index_to_block_mask
from .index import (
    BlockSparseIndex,
    dense_masked_attention,
    index_density,
    index_head_density,
    index_to_mask,
    normalize_index,
    num_query_blocks,
)
from .torch_executor import block_sparse_attention_torch, release_workspaces
from .triton_executor import block_sparse_attention_triton, triton_available

__all__ = [
    "BlockSparseIndex",
    "num_query_blocks",
    "index_to_mask",
    "index_density",
    "index_head_density",
    "normalize_index",
    "dense_masked_attention",
    "block_sparse_attention_torch",
    "block_sparse_attention_triton",
    "block_sparse_attention_flex",
    "index_to_block_mask",
    "block_sparse_attention",
    "triton_available",
    "resolve_backend",
    "release_workspaces",
]
