"""Dispatch: run the executor a backend name means for this call (see `registry`)."""

import torch

from . import registry
from .index import BlockSparseIndex

__all__ = ["resolve_backend", "block_sparse_attention", "resolve_decode_backend", "sparse_decode",
           "resolve_dense_above", "prefill_needs"]


def prefill_needs(index: BlockSparseIndex | None = None, attention_mask=None, softcap=None) -> frozenset:
    """The registry FEATURES a prefill call uses (index None: before the index is built)."""
    return registry.needs(columns=index is not None and index.columns is not None and index.columns.shape[-1] > 0,
                          softcap=softcap is not None, masks=attention_mask is not None)


def resolve_backend(backend: str, tensor: torch.Tensor, needs: frozenset = frozenset()) -> str:
    """The prefill executor `backend` means for this tensor (and a call using `needs`). 'auto':
    flex on CUDA (PyTorch's tuned kernel) when it can compile there, else torch; a decode-only
    backend ("cpu") runs the 'auto' prefill executor."""
    return registry.resolve("prefill", backend, tensor, needs=needs).name


def block_sparse_attention(query, key, value, index: BlockSparseIndex, *, scaling,
                           attention_mask=None, softcap=None, backend: str = "auto"):
    """Prefill attention over `index` by the executor `backend` resolves to (see resolve_backend)."""
    ex = registry.resolve("prefill", backend, query, key, value, needs=prefill_needs(index, attention_mask, softcap))
    return ex.run(query, key, value, index, scaling=scaling, attention_mask=attention_mask, softcap=softcap)


def resolve_decode_backend(backend: str, query, key, value, needs: frozenset = frozenset()) -> str:
    """The decode executor `backend` means for these tensors (and a call using `needs`). 'auto':
    Triton for CUDA tensors when importable; on the CPU the C kernel
    (sparse_infer.kernels.cpu_decode) when it builds and takes these dtypes and strides, else
    torch. A prefill-only backend ("flex") decodes with the 'auto' choice."""
    return registry.resolve("decode", backend, query, key, value, needs=needs).name


def sparse_decode(query, key, value, indices, *, scaling, attention_mask=None, softcap=None,
                  backend: str = "auto", kv_heads=None):
    """Dispatch to one decode executor (see resolve_decode_backend). kv_heads: see
    sparse_decode_torch ('auto' picks an executor that takes it)."""
    used = registry.needs(softcap=softcap is not None, masks=attention_mask is not None,
                          kv_heads=kv_heads is not None)
    ex = registry.resolve("decode", backend, query, key, value, needs=used)
    if kv_heads is None:
        return ex.run(query, key, value, indices, scaling=scaling, attention_mask=attention_mask, softcap=softcap)
    return ex.run(query, key, value, indices, scaling=scaling, attention_mask=attention_mask, softcap=softcap,
                  kv_heads=kv_heads)


def resolve_dense_above(dense_above, backend: str, tensor, phase: str = "prefill",
                        needs: frozenset = frozenset()) -> dict:
    """{"head", "group", "decode"} thresholds: prefill indices per query head / per GQA group,
    and the share of a cache head that decode selections may read in all. "auto": the
    break-even registered for the executor `backend` means in `phase` (for a call using
    `needs`); a named backend's table is read without asking whether it takes the call, which
    the executor call itself checks."""
    if dense_above != "auto":
        return {"head": float(dense_above), "group": float(dense_above), "decode": float(dense_above)}
    registry.check_backend(backend)
    name = backend if registry.executor(phase, backend) is not None else \
        registry.resolve(phase, "auto", tensor, needs=needs).name
    return dict(registry.DENSE_ABOVE[name])
