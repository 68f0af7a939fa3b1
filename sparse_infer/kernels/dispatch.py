"""Dispatch: run the executor a backend name means for these tensors (see `registry`)."""

import torch

from . import registry
from .index import BlockSparseIndex

__all__ = ["resolve_backend", "block_sparse_attention", "resolve_decode_backend", "sparse_decode",
           "resolve_dense_above"]


def _checked(ex: registry.Executor, query) -> registry.Executor:
    if query.device.type not in ex.devices:
        raise ValueError(f"the {ex.name!r} {ex.phase} executor does not run on {query.device.type} tensors "
                         f"(it takes {', '.join(ex.devices)})")
    if query.dtype not in ex.dtypes:
        raise TypeError(f"the {ex.name!r} {ex.phase} executor does not take {query.dtype}")
    return ex


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    """The prefill executor `backend` means for this tensor. 'auto': flex on CUDA (PyTorch's
    tuned kernel) when it can compile there, else torch; a decode-only backend ("cpu") runs
    the 'auto' prefill executor."""
    return registry.resolve("prefill", backend, tensor).name


def block_sparse_attention(query, key, value, index: BlockSparseIndex, *, scaling,
                           attention_mask=None, softcap=None, backend: str = "auto"):
    """Prefill attention over `index` by the executor `backend` resolves to (see resolve_backend)."""
    ex = _checked(registry.resolve("prefill", backend, query, key, value), query)
    return ex.run(query, key, value, index, scaling=scaling, attention_mask=attention_mask, softcap=softcap)


def resolve_decode_backend(backend: str, query, key, value) -> str:
    """The decode executor `backend` means for these tensors. 'auto': Triton for CUDA tensors
    when importable; on the CPU the C kernel (sparse_infer.kernels.cpu_decode) when it builds
    and takes these dtypes and strides, else torch. A prefill-only backend ("flex") decodes
    with the 'auto' choice."""
    return registry.resolve("decode", backend, query, key, value).name


def sparse_decode(query, key, value, indices, *, scaling, attention_mask=None, softcap=None,
                  backend: str = "auto", kv_heads=None):
    """Dispatch to one decode executor (see resolve_decode_backend). kv_heads: see
    sparse_decode_torch (executors registered with kv_heads only)."""
    ex = _checked(registry.resolve("decode", backend, query, key, value), query)
    if kv_heads is None:
        return ex.run(query, key, value, indices, scaling=scaling, attention_mask=attention_mask, softcap=softcap)
    if not ex.kv_heads:
        raise ValueError(f"the {ex.name!r} decode executor reads index rows in kv-head order: no kv_heads")
    return ex.run(query, key, value, indices, scaling=scaling, attention_mask=attention_mask, softcap=softcap,
                  kv_heads=kv_heads)


def resolve_dense_above(dense_above, backend: str, tensor, phase: str = "prefill") -> dict:
    """{"head", "group", "decode"} thresholds: prefill indices per query head / per GQA group,
    and the share of a cache head that decode selections may read in all. "auto": the
    break-even registered for the executor `backend` resolves to in `phase`."""
    if dense_above != "auto":
        return {"head": float(dense_above), "group": float(dense_above), "decode": float(dense_above)}
    return dict(registry.DENSE_ABOVE[registry.resolve(phase, backend, tensor).name])
