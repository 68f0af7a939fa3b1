"""The calling convention of the decode methods whose choice and attention run in one C call
(Quest, Double Sparsity: decode/quest.c, decode/double_sparsity.c, built into the CPU kernel's
library by sparse_infer.kernels.cpu_decode). Their entry points take, in order: the query, the
method's side state, K, V, the output, the per-row key counts, B Hi G Hkv n D, the method's
sizes, fold_from, scaling, softcap, dtype and threads; they return 0, 1 for sizes they do not
take, 2 when scratch allocation failed."""
from __future__ import annotations

import ctypes

import torch

from sparse_infer.kernels.cpu_decode import c_function, check_status, dtype_code

_p, _i64, _i32, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


def fused_argtypes(side: list, sizes: list) -> list:
    """The ctypes prototype of a fused entry point whose side state and sizes take these types."""
    return [_p, _i64, _i64,                      # query, strides b h
            *side,
            _p, _i64, _i64, _i64,                # key, strides b h n
            _p, _i64, _i64, _i64,                # value
            _p, _i64, _i64,                      # out, strides b h
            _p,                                  # selected (B * Hi) int64
            _i32, _i32, _i32, _i32, _i64, _i32,  # B Hi G Hkv n D
            *sizes,
            _i64,                                # fold_from
            _f32, _f32, _i32, _i32]              # scaling softcap dtype threads


def _strides3(x: torch.Tensor):
    return x.stride(0), x.stride(1), x.stride(2)


def check_fused_step(query, key, index_heads: int, fold_from) -> None:
    """The checks every fused method step shares: the index rows' layout and fold_from's range."""
    h, hk, n = query.shape[1], key.shape[1], key.shape[2]
    if h % index_heads or index_heads % hk:
        raise ValueError(f"index_heads={index_heads} must divide h={h} and be a multiple of hk={hk}")
    if fold_from is not None and not 0 <= fold_from <= n:
        raise ValueError(f"fold_from must be in [0, n={n}], got {fold_from}")


def starts_arg(starts, B: int, n: int):
    """The pointer a fused call takes for `starts` (int64 (B,): row b sees keys [starts[b], n)), or None."""
    if starts is None:
        return None
    if tuple(starts.shape) != (B,) or starts.dtype != torch.int64 or not starts.is_contiguous():
        raise ValueError(f"starts must be contiguous int64 ({B},), got {starts.dtype} {tuple(starts.shape)}")
    if B and not (0 <= int(starts.min()) and int(starts.max()) <= n):
        raise ValueError(f"starts must lie in [0, n={n}]")
    return starts.data_ptr()


def fused_step(name: str, argtypes: list, query, key, value, side_args: tuple, method_args: tuple, *,
               index_heads: int, fold_from, scaling: float, softcap, bad_sizes: str):
    """Call the fused entry point `name` (prototype `argtypes`) with the method's side state
    (`side_args`) and sizes (`method_args`). Returns (out (B, h, 1, D), keys read (B, index_heads))."""
    B, h, D = query.shape
    hk, n = key.shape[1], key.shape[2]
    entry = c_function(name, argtypes)
    q = query if query.stride(-1) == 1 else query.contiguous()
    out = torch.empty(B, h, 1, D, dtype=query.dtype)
    selected = torch.empty(B, index_heads, dtype=torch.int64)
    status = entry(
        q.data_ptr(), q.stride(0), q.stride(1), *side_args,
        key.data_ptr(), *_strides3(key), value.data_ptr(), *_strides3(value),
        out.data_ptr(), out.stride(0), out.stride(1), selected.data_ptr(),
        B, index_heads, h // index_heads, hk, n, D, *method_args, n if fold_from is None else fold_from,
        float(scaling), float(softcap or 0.0), dtype_code(query.dtype), torch.get_num_threads())
    check_status(status, bad_sizes)
    return out, selected
