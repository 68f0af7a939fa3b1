"""Sparse decode executors vs the dense masked reference (q == 1)."""

import math

import pytest
import torch

from sparse_infer.kernels import (
    dense_decode_reference,
    indices_to_mask,
    sparse_decode,
    sparse_decode_torch,
    sparse_decode_triton,
)
from tests.kernels.triton_support import TRITON_DEVICE, needs_triton


def make_case(B, Hq, Hkv, Hi, n, K, D=32, n_unused=5, dtype=torch.float32, seed=0, device="cpu"):
    """Random unique positions per (b, index head), last n_unused slots = -1."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, 1, D, generator=g)
    k = torch.randn(B, Hkv, n, D, generator=g)
    v = torch.randn(B, Hkv, n, D, generator=g)
    idx = torch.stack([torch.randperm(n, generator=g)[:K] for _ in range(B * Hi)]).view(B, Hi, K)
    if n_unused:
        idx[..., -n_unused:] = -1
    q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    return q, k, v, idx.to(device)


# (B, Hq, Hkv, index heads "kv"|"q", n, K, softcap)
CASES = [
    (1, 4, 4, "kv", 300, 40, None),    # G=1
    (2, 8, 4, "kv", 257, 64, None),    # G=2
    (1, 8, 2, "kv", 500, 130, 25.0),   # G=4, softcap
    (2, 8, 1, "kv", 100, 100, None),   # G=8, selection covers (almost) everything
    (1, 8, 2, "q", 200, 33, None),     # per-query-head indices
]


@pytest.mark.parametrize("case", CASES)
def test_torch_matches_dense(case):
    B, Hq, Hkv, which, n, K, softcap = case
    Hi = Hkv if which == "kv" else Hq
    q, k, v, idx = make_case(B, Hq, Hkv, Hi, n, K, seed=n)
    scaling = 1 / math.sqrt(q.shape[-1])
    ref = dense_decode_reference(q, k, v, idx, scaling=scaling, softcap=softcap)
    out = sparse_decode_torch(q, k, v, idx, scaling=scaling, softcap=softcap)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_torch_explicit_cache_head_per_query_head():
    # any subset of a layer's query heads, each reading the cache head kv_heads names
    B, Hkv, n, K = 2, 3, 150, 40
    kv_heads = torch.tensor([2, 0, 0, 1, 2])
    q, k, v, idx = make_case(B, kv_heads.numel(), Hkv, kv_heads.numel(), n, K, seed=7)
    mask = torch.ones(B, 1, 1, n, dtype=torch.bool)
    mask[1, ..., :20] = False
    ref = dense_decode_reference(q, k[:, kv_heads], v[:, kv_heads], idx, scaling=0.2, attention_mask=mask)
    out = sparse_decode_torch(q, k, v, idx, scaling=0.2, attention_mask=mask, kv_heads=kv_heads)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="kv_heads"):
        sparse_decode_torch(q, k, v, idx, scaling=0.2, kv_heads=torch.tensor([0, 1, 2, 3, 0]))
    with pytest.raises(ValueError, match="kv_heads"):
        sparse_decode_torch(q, k, v, idx[:, :2], scaling=0.2, kv_heads=kv_heads)


def test_torch_explicit_cache_head_per_shared_index_row():
    # index rows shared by g = 3 query heads each, rows reading cache heads 1, 0, 1
    B, Hkv, n, K, g = 2, 2, 130, 30, 3
    kv_heads = torch.tensor([1, 0, 1])
    q, k, v, idx = make_case(B, g * kv_heads.numel(), Hkv, kv_heads.numel(), n, K, seed=11)
    mask = torch.ones(B, g * kv_heads.numel(), 1, n, dtype=torch.bool)
    mask[0, 4, ..., :50] = False
    ref = dense_decode_reference(q, k[:, kv_heads], v[:, kv_heads], idx, scaling=0.2, attention_mask=mask)
    out = sparse_decode_torch(q, k, v, idx, scaling=0.2, attention_mask=mask, kv_heads=kv_heads)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("per_head", [False, True])
def test_torch_padding_mask(per_head):
    B, Hq, Hkv, n, K = 2, 8, 2, 120, 50
    q, k, v, idx = make_case(B, Hq, Hkv, Hkv, n, K, seed=1)
    mask = torch.ones(B, 1, 1, n, dtype=torch.bool)
    mask[1, ..., :30] = False  # left padding of batch 1
    if per_head:
        mask = mask.expand(B, Hq, 1, n).clone()
        mask[:, 3, 0, 60:90] = False
    ref = dense_decode_reference(q, k, v, idx, scaling=0.2, attention_mask=mask)
    out = sparse_decode_torch(q, k, v, idx, scaling=0.2, attention_mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_torch_empty_selection_and_noncontiguous_cache():
    B, Hq, Hkv, n, K = 2, 4, 2, 64, 16
    q, k, v, idx = make_case(B, Hq, Hkv, Hkv, n, K, n_unused=0, seed=2)
    idx[1, 0] = -1  # group 0 of batch 1 selects nothing -> zeros
    # strided cache view (e.g. a slice of a preallocated static cache)
    big_k = torch.randn(B, Hkv, n + 20, 32)
    big_v = torch.randn(B, Hkv, n + 20, 32)
    k_view, v_view = big_k[:, :, :n], big_v[:, :, :n]
    assert not k_view.is_contiguous()
    ref = dense_decode_reference(q, k_view, v_view, idx, scaling=0.2)
    out = sparse_decode_torch(q, k_view, v_view, idx, scaling=0.2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert out[1, :2].abs().max() == 0  # query heads 0,1 form kv group 0
    assert torch.equal(sparse_decode_torch(q, k, v, idx[..., :0], scaling=0.2), torch.zeros_like(q))


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_torch_half_dtypes(dtype, atol):
    # fp32 math in both; only the final rounding differs (~1 ulp of |out| <= 2)
    q, k, v, idx = make_case(1, 8, 2, 2, 300, 90, dtype=dtype, seed=3)
    ref = dense_decode_reference(q, k, v, idx, scaling=0.2)
    out = sparse_decode_torch(q, k, v, idx, scaling=0.2)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=0)


def test_indices_to_mask():
    idx = torch.tensor([[[3, -1, 0], [5, 1, -1]]])
    m = indices_to_mask(idx, 6, 4)  # Hi=2 -> each row serves 2 query heads
    assert m.shape == (1, 4, 1, 6)
    assert m[0, 0, 0].nonzero().flatten().tolist() == [0, 3]
    assert torch.equal(m[0, 0], m[0, 1])
    assert m[0, 2, 0].nonzero().flatten().tolist() == [1, 5]


def test_dispatch_torch_backend_is_the_torch_executor():
    # ('auto' on CPU tensors: the C kernel where it builds, see test_cpu_decode.py)
    q, k, v, idx = make_case(1, 4, 2, 2, 50, 10)
    assert torch.equal(sparse_decode(q, k, v, idx, scaling=0.2, backend="torch"),
                       sparse_decode_torch(q, k, v, idx, scaling=0.2))
    with pytest.raises(ValueError, match="unknown backend"):
        sparse_decode(q, k, v, idx, scaling=0.2, backend="numpy")


TRITON_CASES = [
    # (B, Hq, Hkv, which, n, K, softcap, mask, dtype, num_splits)
    (2, 8, 2, "kv", 200, 70, None, False, torch.float32, 3),   # split-K over 3 programs
    (1, 4, 2, "q", 150, 40, 20.0, False, torch.float32, 1),    # per-query-head, softcap
    (2, 4, 1, "kv", 120, 50, None, True, torch.float32, 2),    # G=4, padding mask
    (1, 4, 2, "kv", 100, 45, None, False, torch.float16, 2),
    (1, 4, 2, "kv", 100, 45, None, False, torch.bfloat16, 2),
]


@needs_triton
@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_matches_torch(case):
    B, Hq, Hkv, which, n, K, softcap, use_mask, dtype, splits = case
    Hi = Hkv if which == "kv" else Hq
    dev = TRITON_DEVICE
    q, k, v, idx = make_case(B, Hq, Hkv, Hi, n, K, D=16, dtype=dtype, seed=4, device=dev)
    idx[0, 0, :] = -1  # an empty selection (zeros) alongside normal ones
    mask = None
    if use_mask:
        mask = torch.ones(B, 1, 1, n, dtype=torch.bool, device=dev)
        mask[-1, ..., :40] = False
    out_t = sparse_decode_triton(q, k, v, idx, scaling=0.3, attention_mask=mask, softcap=softcap,
                                 num_splits=splits, block_k=16)
    out_r = sparse_decode_torch(q, k, v, idx, scaling=0.3, attention_mask=mask, softcap=softcap)
    atol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}[dtype]
    assert out_t.dtype == dtype
    torch.testing.assert_close(out_t.float(), out_r.float(), atol=atol, rtol=0)
