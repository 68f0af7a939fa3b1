"""The decode continuity fingerprint's row compare and keep in one C call each (fingerprint.c,
built into the CPU kernel's library): a gather and a compare in torch cost ~30 us per layer
and step. decode.dispatch keeps the fingerprint and decides when these apply."""
from __future__ import annotations

import ctypes

import torch

from sparse_infer.kernels.cpu_decode import c_function

_p, _i64, _i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_KEY = [_p, _i64, _i64, _i64, _i32, _i32, _i32, _i32]          # key, strides b h n, B H D elem
_MATCHES_ARGS = [*_KEY, _p, _i32, _p]                           # positions P stored
_KEEP_ARGS = [*_KEY, _i64, _p, _i32, _i32, _p]                  # pos positions P slot stored


def _key_args(key: torch.Tensor):
    B, H, _, D = key.shape
    return (key.data_ptr(), key.stride(0), key.stride(1), key.stride(2), B, H, D, key.element_size())


def fingerprint_matches(key: torch.Tensor, positions: torch.Tensor, stored: torch.Tensor) -> bool:
    """Whether key[:, :, positions] equals `stored` byte for byte (the decode continuity check
    in one C call). key (B, H, n, D) on the CPU with unit last stride; positions int64 (P,),
    contiguous, each in [0, n); stored (B, H, P, D) contiguous, key's dtype."""
    entry = c_function("fingerprint_matches", _MATCHES_ARGS)
    return bool(entry(*_key_args(key), positions.data_ptr(), positions.shape[0], stored.data_ptr()))


def fingerprint_keep(key: torch.Tensor, pos: int, positions: torch.Tensor, stored: torch.Tensor, slot: int) -> None:
    """stored[:, :, slot] = key[:, :, pos] and positions[slot] = pos, in place (one C call)."""
    entry = c_function("fingerprint_keep", _KEEP_ARGS, restype=None)
    entry(*_key_args(key), pos, positions.data_ptr(), positions.shape[0], slot, stored.data_ptr())
