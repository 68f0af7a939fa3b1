"""Attention executors: compute attention over an index set chosen elsewhere.

Which executor runs is decided by `registry` (backend names, what each supports,
dense break-even) and `dispatch`.
"""

from .index import (
    BlockSparseIndex,
    dense_masked_attention,
    index_density,
    index_head_density,
    index_to_mask,
    num_query_blocks,
)
from .torch_executor import block_sparse_attention_torch, release_workspaces
from .triton_executor import block_sparse_attention_triton, triton_available
from .flex_executor import block_sparse_attention_flex
from .cpu_decode import cpu_kernel_available, sparse_decode_cpu
from .sparse_decode import (
    dense_decode_reference,
    indices_to_mask,
    sparse_decode_torch,
    sparse_decode_triton,
)
# after the submodule sparse_decode is imported: the package's `sparse_decode` is the dispatcher
from .dispatch import block_sparse_attention, resolve_decode_backend, sparse_decode  # noqa: E402
from . import registry  # noqa: E402
from .registry import backends  # noqa: E402

__all__ = [
    "BlockSparseIndex",
    "block_sparse_attention",
    "block_sparse_attention_flex",
    "block_sparse_attention_torch",
    "block_sparse_attention_triton",
    "dense_masked_attention",
    "index_density",
    "index_head_density",
    "index_to_mask",
    "num_query_blocks",
    "release_workspaces",
    "triton_available",
    "dense_decode_reference",
    "indices_to_mask",
    "sparse_decode",
    "sparse_decode_torch",
    "sparse_decode_triton",
    "sparse_decode_cpu",
    "cpu_kernel_available",
    "resolve_decode_backend",
    "backends",
]
