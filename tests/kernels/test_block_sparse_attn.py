"""Block-sparse prefill executors vs the dense masked reference.

Every executor must equal dense_masked_attention(index_to_mask(...)). Triton
runs under TRITON_INTERPRET=1 on CPU (set by tests/conftest.py before triton is imported)
or natively when CUDA is present.
"""

import math

import pytest
import torch

from sparse_infer.kernels import (
    BlockSparseIndex,
    block_sparse_attention,
    block_sparse_attention_torch,
    block_sparse_attention_triton,
    dense_masked_attention,
    index_density,
    index_to_mask,
    num_query_blocks,
)
from tests.kernels.triton_support import TRITON_DEVICE, needs_triton


def make_index(B, Hi, q_len, n, bs, p=0.35, n_cols=0, seed=0, empty_blocks=(), device="cpu"):
    """Random ascending block lists (-1 padded) plus optional columns.

    Columns are drawn partly from inside selected blocks so the dedup path is
    exercised. Query blocks listed in empty_blocks get no blocks at all.
    """
    g = torch.Generator().manual_seed(seed)
    nqb = num_query_blocks(q_len, n, bs)
    nkb = -(-n // bs)
    sel = torch.rand(B, Hi, nqb, nkb, generator=g) < p
    for j in empty_blocks:
        sel[:, :, j] = False
    kb = sel.sum(-1).max().item() + 2  # spare -1 slots
    blocks = torch.full((B, Hi, nqb, kb), -1, dtype=torch.long)
    for b in range(B):
        for h in range(Hi):
            for j in range(nqb):
                ids = sel[b, h, j].nonzero().flatten()
                blocks[b, h, j, : ids.numel()] = ids
    cols = None
    if n_cols:
        cols = torch.full((B, Hi, n_cols + 2), -1, dtype=torch.long)
        for b in range(B):
            for h in range(Hi):
                cols[b, h, :n_cols] = torch.randperm(n, generator=g)[:n_cols].sort().values
    return BlockSparseIndex(bs, blocks.to(device), None if cols is None else cols.to(device))


def make_qkv(B, Hq, Hkv, q_len, n, D, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, q_len, D, generator=g)
    k = torch.randn(B, Hkv, n, D, generator=g)
    v = torch.randn(B, Hkv, n, D, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def reference(q, k, v, index, scaling, attention_mask=None, softcap=None):
    mask = index_to_mask(index, q.shape[2], k.shape[2], q.shape[1], attention_mask)
    return dense_masked_attention(q, k, v, mask, scaling, softcap)


# (B, Hq, Hkv, index heads "kv"|"q", q_len, n, bs, columns, softcap)
CASES = [
    (1, 4, 4, "kv", 64, 64, 16, 0, None),      # MHA, aligned
    (1, 8, 4, "kv", 100, 100, 16, 0, None),    # G=2, n % bs != 0
    (1, 8, 2, "kv", 70, 203, 32, 9, None),     # G=4, chunked (q < n, unaligned q0), columns
    (1, 8, 1, "kv", 96, 96, 16, 12, 20.0),     # G=8, columns + softcap
    (1, 8, 2, "q", 50, 150, 16, 7, None),      # per-query-head index, chunked
    (2, 4, 2, "q", 33, 33, 16, 0, 30.0),       # per-query-head index, tiny, softcap
    (1, 4, 2, "kv", 1, 90, 16, 5, None),       # single query row (last position)
    (1, 6, 2, "q", 130, 130, 16, 60, None),    # long column lists: each query block reads its own prefix
    (1, 4, 2, "kv", 400, 400, 16, 0, None),    # one chunk holding many distinct block counts
]


@pytest.fixture(params=[True, False], ids=["fused", "explicit"])
def softmax_path(request, monkeypatch):
    """The torch executor's two softmax paths: SDPA with an additive mask, or explicit scores."""
    from sparse_infer.kernels import torch_executor
    monkeypatch.setattr(torch_executor, "FUSED_SOFTMAX", request.param)
    return request.param


def _heads(Hq, Hkv, which):
    return Hkv if which == "kv" else Hq


@pytest.mark.parametrize("case", CASES)
def test_torch_matches_dense(case, softmax_path):
    B, Hq, Hkv, which, q_len, n, bs, n_cols, softcap = case
    D = 32
    q, k, v = make_qkv(B, Hq, Hkv, q_len, n, D)
    index = make_index(B, _heads(Hq, Hkv, which), q_len, n, bs, n_cols=n_cols, seed=n + q_len)
    scaling = 1 / math.sqrt(D)
    ref = reference(q, k, v, index, scaling, softcap=softcap)
    # tiny chunks + 2 workers: many chunks, padded slots, thread pool path
    out = block_sparse_attention_torch(q, k, v, index, scaling=scaling, softcap=softcap,
                                       chunk_elems=4096, num_workers=2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out1 = block_sparse_attention_torch(q, k, v, index, scaling=scaling, softcap=softcap, num_workers=1)
    torch.testing.assert_close(out1, ref, atol=1e-5, rtol=1e-5)


def test_column_prefix_per_query_block():
    # a query block reads only the columns at or before its last row
    from sparse_infer.kernels.index import normalize_index
    q_len, n, bs = 70, 200, 16
    index = make_index(2, 3, q_len, n, bs, n_cols=50, seed=5)
    norm = normalize_index(index, q_len, n)
    cols = index.columns
    qb0 = (n - q_len) // bs
    for j in range(norm.column_prefix.shape[-1]):
        end = min((qb0 + j + 1) * bs, n)
        expected = ((cols >= 0) & (cols < end)).sum(-1)
        assert torch.equal(norm.column_prefix[..., j], expected)
        # nothing usable lies past that prefix
        width = norm.column_usable.shape[-1]
        beyond = torch.arange(width)[None, None, :] >= norm.column_prefix[..., j, None]
        assert not (norm.column_usable[:, :, j] & beyond).any()


@pytest.mark.parametrize("per_head_mask", [False, True])
def test_torch_left_padding_mask(per_head_mask, softmax_path):
    B, Hq, Hkv, n, bs, D = 2, 8, 2, 80, 16, 32
    q, k, v = make_qkv(B, Hq, Hkv, n, n, D, seed=3)
    index = make_index(B, Hkv, n, n, bs, n_cols=6, seed=4)
    pad = torch.tensor([0, 13])  # batch 1 is left-padded by 13 tokens
    valid = torch.arange(n)[None, :] >= pad[:, None]  # (B, n)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    mask = (causal[None] & valid[:, None, :] & valid[:, :, None]).unsqueeze(1)  # (B, 1, q, n)
    if per_head_mask:  # also drop a different key band per head
        band = torch.ones(B, Hq, n, n, dtype=torch.bool)
        for h in range(Hq):
            band[:, h, :, 20 + h:24 + h] = False
        mask = mask & band
    scaling = 1 / math.sqrt(D)
    ref = reference(q, k, v, index, scaling, attention_mask=mask)
    out = block_sparse_attention_torch(q, k, v, index, scaling=scaling, attention_mask=mask, chunk_elems=8192)
    rows = valid  # compare on non-padded query rows
    for b in range(B):
        torch.testing.assert_close(out[b][:, rows[b]], ref[b][:, rows[b]], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()
    assert out[1][:, ~rows[1]].abs().max() == 0  # fully padded rows -> zeros


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_torch_half_dtypes(dtype, atol, softmax_path):
    # Math is fp32 in both paths; only the final rounding to dtype differs, so
    # the error bound is ~1 ulp of |out| <= ~2 (fp16 ulp 1e-3, bf16 ulp 8e-3).
    B, Hq, Hkv, q_len, n, bs, D = 1, 8, 2, 60, 100, 16, 32
    q, k, v = make_qkv(B, Hq, Hkv, q_len, n, D, dtype=dtype, seed=5)
    index = make_index(B, Hkv, q_len, n, bs, n_cols=5, seed=6)
    ref = reference(q, k, v, index, 0.2)
    out = block_sparse_attention_torch(q, k, v, index, scaling=0.2)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=0)


def test_torch_empty_rows_and_noncausal_blocks(softmax_path):
    B, Hq, Hkv, n, bs, D = 1, 4, 2, 64, 16, 16
    q, k, v = make_qkv(B, Hq, Hkv, n, n, D, seed=7)
    index = make_index(B, Hkv, n, n, bs, p=0.5, empty_blocks=(1, 2), seed=8)
    # only blocks right of the diagonal for query block 0: causally empty
    index.kv_blocks[:, :, 0] = -1
    index.kv_blocks[:, :, 0, :2] = torch.tensor([2, 3])
    ref = reference(q, k, v, index, 0.25)
    out = block_sparse_attention_torch(q, k, v, index, scaling=0.25)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert out[:, :, : 3 * bs].abs().max() == 0
    # nothing selected anywhere
    none = BlockSparseIndex(bs, torch.full_like(index.kv_blocks, -1), None)
    assert block_sparse_attention_torch(q, k, v, none, scaling=0.25).abs().max() == 0


def test_torch_unsorted_duplicate_entries(softmax_path):
    # Not allowed by the contract, but the torch executor normalizes them anyway.
    B, Hq, Hkv, n, bs, D = 1, 4, 2, 96, 16, 16
    q, k, v = make_qkv(B, Hq, Hkv, n, n, D, seed=9)
    index = make_index(B, Hkv, n, n, bs, n_cols=8, seed=10)
    g = torch.Generator().manual_seed(0)
    kb = index.kv_blocks
    messy = torch.cat([kb, kb[..., :2]], dim=-1)
    messy = messy[..., torch.randperm(messy.shape[-1], generator=g)]
    cols = torch.cat([index.columns, index.columns[..., :3]], -1).flip(-1)
    ref = reference(q, k, v, index, 0.25)
    out = block_sparse_attention_torch(q, k, v, BlockSparseIndex(bs, messy, cols), scaling=0.25)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("q_len,n,bs,n_cols", [(64, 64, 16, 0), (50, 150, 16, 9), (100, 203, 32, 7)])
def test_index_density_matches_mask(q_len, n, bs, n_cols):
    index = make_index(2, 3, q_len, n, bs, n_cols=n_cols, seed=q_len)
    mask = index_to_mask(index, q_len, n, 3)
    causal = torch.ones(n, n, dtype=torch.bool).tril()[n - q_len:]
    expected = mask.sum().item() / (2 * 3 * causal.sum().item())
    assert index_density(index, q_len, n) == pytest.approx(expected, rel=1e-9)


def test_num_query_blocks_and_alignment():
    assert num_query_blocks(64, 64, 16) == 4
    assert num_query_blocks(100, 100, 16) == 7
    assert num_query_blocks(1, 100, 16) == 1
    assert num_query_blocks(20, 100, 16) == 2  # q0 = 80 -> blocks 5 (80..95) and 6 (96..99)
    assert num_query_blocks(21, 100, 16) == 3  # q0 = 79 starts inside block 4
    # diagonal block of query block 0 is absolute block q0 // bs
    index = BlockSparseIndex(16, torch.tensor([[[[4], [5], [6]]]]), None)
    mask = index_to_mask(index, 21, 100, 1)
    assert mask[0, 0, 0].nonzero().flatten().tolist() == [64 + i for i in range(79 - 64 + 1)]


def test_dispatch_auto_uses_torch_on_cpu():
    q, k, v = make_qkv(1, 4, 2, 32, 32, 16)
    index = make_index(1, 2, 32, 32, 16)
    a = block_sparse_attention(q, k, v, index, scaling=0.25)
    b = block_sparse_attention_torch(q, k, v, index, scaling=0.25)
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        block_sparse_attention(q, k, v, index, scaling=0.25, backend="nope")


# ---------------------------------------------------------------- triton ----

TRITON_CASES = [
    # (B, Hq, Hkv, which, q_len, n, bs, columns, softcap, mask, dtype)
    (1, 4, 2, "kv", 45, 45, 16, 0, None, False, torch.float32),   # G=2 stacked, n % bs != 0
    (1, 8, 2, "kv", 30, 70, 16, 6, None, False, torch.float32),   # G=4 stacked, chunked, columns
    (1, 4, 2, "q", 40, 40, 16, 5, 20.0, False, torch.float32),    # per-query-head index, softcap
    (2, 2, 1, "kv", 40, 40, 16, 4, None, True, torch.float32),    # left padding mask
    (1, 4, 2, "kv", 40, 40, 16, 3, None, False, torch.float16),
    (1, 4, 2, "kv", 40, 40, 16, 3, None, False, torch.bfloat16),
    (1, 4, 2, "q", 80, 80, 16, 40, None, False, torch.float32),   # long column lists, per-block prefixes
]


@needs_triton
@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_matches_torch(case):
    B, Hq, Hkv, which, q_len, n, bs, n_cols, softcap, use_mask, dtype = case
    D = 16
    dev = TRITON_DEVICE
    q, k, v = make_qkv(B, Hq, Hkv, q_len, n, D, dtype=dtype, seed=11, device=dev)
    index = make_index(B, _heads(Hq, Hkv, which), q_len, n, bs, p=0.4, n_cols=n_cols,
                       empty_blocks=(0,), seed=12, device=dev)
    mask = None
    if use_mask:
        valid = torch.arange(n, device=dev)[None, :] >= torch.tensor([0, 7], device=dev)[:, None]
        causal = torch.ones(n, n, dtype=torch.bool, device=dev).tril()[n - q_len:]
        mask = (causal[None] & valid[:, None, :]).unsqueeze(1)
    out_t = block_sparse_attention_triton(q, k, v, index, scaling=0.3, attention_mask=mask, softcap=softcap)
    out_r = block_sparse_attention_torch(q, k, v, index, scaling=0.3, attention_mask=mask, softcap=softcap)
    # fp16/bf16: the kernel rounds P to the input dtype before P@V (standard
    # flash practice) while the torch path keeps fp32 -> a few ulps of slack.
    atol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}[dtype]
    assert out_t.dtype == dtype
    torch.testing.assert_close(out_t.float(), out_r.float(), atol=atol, rtol=0)


@needs_triton
def test_triton_head_split():
    # max_rows below Gi*bs splits a GQA group over several programs
    B, Hq, Hkv, n, bs, D = 1, 8, 1, 40, 16, 16
    dev = TRITON_DEVICE
    q, k, v = make_qkv(B, Hq, Hkv, n, n, D, seed=13, device=dev)
    index = make_index(B, Hkv, n, n, bs, n_cols=4, seed=14, device=dev)
    out_t = block_sparse_attention_triton(q, k, v, index, scaling=0.3, max_rows=32)
    out_r = block_sparse_attention_torch(q, k, v, index, scaling=0.3)
    torch.testing.assert_close(out_t, out_r, atol=1e-5, rtol=0)


def test_torch_inference_mode_and_requires_grad_inputs():
    # worker threads must inherit inference mode; executors never build graphs
    q, k, v = make_qkv(1, 4, 2, 64, 64, 16)
    index = make_index(1, 2, 64, 64, 16, n_cols=3)
    ref = reference(q, k, v, index, 0.25)
    with torch.inference_mode():
        out = block_sparse_attention_torch(q, k, v, index, scaling=0.25, chunk_elems=2048, num_workers=2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out = block_sparse_attention_torch(q.clone().requires_grad_(), k, v, index, scaling=0.25, num_workers=2)
    assert not out.requires_grad
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_fused_path_runs_sdpa_and_softcap_keeps_explicit_scores(monkeypatch):
    import torch.nn.functional as F

    from sparse_infer.kernels import torch_executor
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(torch_executor.F, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    q, k, v = make_qkv(1, 4, 2, 64, 64, 16)
    index = make_index(1, 2, 64, 64, 16, seed=1)
    block_sparse_attention_torch(q, k, v, index, scaling=0.25)
    assert calls, "no softcap: the fused path"
    calls.clear()
    block_sparse_attention_torch(q, k, v, index, scaling=0.25, softcap=20.0)
    assert not calls, "softcap: explicit scores"
