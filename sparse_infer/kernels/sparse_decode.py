"""Sparse decode executors (one query token per sequence).

Contract: docs/ARCHITECTURE.md ("Decode index"). A selector picks, per
(batch, index head), up to K absolute kv positions; the executors attend to
exactly those (AND attention_mask), reading only the selected K/V rows.
"""

import torch

from .index import check_attention_mask, dense_masked_attention
from .torch_executor import acquire_workspace, release_workspace
from .triton_executor import (
    apply_softcap,
    is_interpreted,
    launch_options,
    online_softmax_step,
    require_triton,
    tl,
    triton,
)

__all__ = [
    "indices_to_mask",
    "dense_decode_reference",
    "sparse_decode_torch",
    "sparse_decode_triton",
    "check_decode_rows",
    "check_decode_mask",
]

_NEG_INF = float("-inf")


def _check(query, key, value, indices):
    if query.dim() != 4 or query.shape[2] != 1:
        raise ValueError(f"decode query must be (B, Hq, 1, D), got {tuple(query.shape)}")
    B, Hq, _, D = query.shape
    Bk, Hkv, n, Dk = key.shape
    if Bk != B or Dk != D or value.shape[:3] != key.shape[:3]:
        raise ValueError("query/key/value shape mismatch")
    if indices.dim() != 3 or indices.shape[0] != B:
        raise ValueError(f"indices must be (B, Hi, K), got {tuple(indices.shape)}")
    Hi = indices.shape[1]
    if Hq % Hi or Hi % Hkv:
        raise ValueError(f"index heads Hi={Hi} must divide Hq={Hq} and be a multiple of Hkv={Hkv}")
    return B, Hq, D, Hkv, n, Hi


def check_decode_rows(query, key, value, indices, kv_heads):
    """Shapes of an executor call, and the cache head each index row reads: kv_heads when
    given (any subset of a layer's heads), else the rows' own kv group (r * Hkv // Hi)."""
    if kv_heads is None:
        B, Hq, D, Hkv, n, Hi = _check(query, key, value, indices)
        return B, Hq, D, Hkv, n, Hi, torch.arange(Hi, device=query.device) * Hkv // Hi
    B, Hq, D = query.shape[0], query.shape[1], query.shape[3]
    Hkv, n = key.shape[1], key.shape[2]
    Hi = indices.shape[1] if indices.dim() == 3 else 0
    if indices.dim() != 3 or indices.shape[0] != B or not Hi or Hq % Hi or tuple(kv_heads.shape) != (Hi,):
        raise ValueError("with kv_heads, indices must be (B, Hi, K) with Hi dividing Hq, and kv_heads (Hi,)")
    if kv_heads.numel() and (int(kv_heads.min()) < 0 or int(kv_heads.max()) >= Hkv):
        raise ValueError(f"kv_heads must lie in [0, {Hkv})")
    return B, Hq, D, Hkv, n, Hi, kv_heads.to(query.device)


def check_decode_mask(attention_mask, B, Hq, n):
    """The prefill mask check for the one query row of a decode step."""
    return check_attention_mask(attention_mask, B, Hq, 1, n)


def indices_to_mask(indices: torch.Tensor, kv_len: int, num_q_heads: int) -> torch.Tensor:
    """Dense bool (B, Hq, 1, n) mask of the selected positions (reference only)."""
    B, Hi, _ = indices.shape
    idx = indices.long()
    ok = (idx >= 0) & (idx < kv_len)
    m = torch.zeros(B, Hi, kv_len + 1, dtype=torch.bool, device=indices.device)
    m.scatter_(-1, torch.where(ok, idx, torch.full_like(idx, kv_len)), True)  # slot n swallows -1
    return m[:, :, :kv_len].repeat_interleave(num_q_heads // Hi, dim=1).unsqueeze(2)


def dense_decode_reference(query, key, value, indices, *, scaling, attention_mask=None, softcap=None):
    """Reference via dense_masked_attention over indices_to_mask (AND attention_mask)."""
    _, Hq, _, _, n, _ = _check(query, key, value, indices)
    mask = indices_to_mask(indices, n, Hq)
    if attention_mask is not None:
        mask = mask & attention_mask
    return dense_masked_attention(query, key, value, mask, scaling, softcap)


def _row_layout(x: torch.Tensor):
    """(row stride of dim 0, row stride of dim 1) when every (b, h, t) row of x (B, H, n, D) is
    a contiguous D-vector at a whole-row offset in its storage (contiguous caches, and the
    prefix views of AppendCache / static buffers); None otherwise."""
    B, H, n, D = x.shape
    if x.stride(3) != 1 or (x.stride(2) != D and n > 1):
        return None
    s0, s1 = x.stride(0), x.stride(1)
    if s0 % D or s1 % D:
        return None
    return s0 // D, s1 // D


def _gather_rows(x: torch.Tensor, pos: torch.Tensor, kv_head: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """x (B, Hkv, n, D), pos (B, Hi, K) clamped valid, kv_head (Hi,) -> (B, Hi, K, D).

    One gather per index head: with Hi == Hkv it is read once for all G query
    heads of the group. Row-addressable layouts (see _row_layout) use a flat row
    index_select into the reusable `buf` (fresh multi-MB outputs each step cost
    page faults); other layouts use advanced indexing.
    """
    B, Hkv, n, D = x.shape
    Hi, K = pos.shape[1], pos.shape[2]
    layout = _row_layout(x)
    if layout is not None:
        r0, r1 = layout
        base = torch.arange(B, device=x.device).view(B, 1, 1) * r0 + kv_head.view(1, Hi, 1) * r1
        rows = (base + pos).reshape(-1)
        # flat (rows, D) view over the storage from x's first element to its last row
        span = (B - 1) * r0 + (Hkv - 1) * r1 + n
        flat = torch.as_strided(x, (span, D), (D, 1))
        out = buf[: rows.numel() * D].view(rows.numel(), D)
        return torch.index_select(flat, 0, rows, out=out).view(B, Hi, K, D)
    b = torch.arange(B, device=x.device).view(B, 1, 1)
    return x[b, kv_head.view(1, Hi, 1), pos]


@torch.no_grad()
def sparse_decode_torch(query, key, value, indices, *, scaling, attention_mask=None, softcap=None,
                        kv_heads=None):
    """Attention of one query token over the selected kv rows only (fp32 math).

    kv_heads: optional int64 (Hi,), the cache head each index row reads, for index rows over
    any subset of a layer's heads; row r serves query heads r*g .. r*g+g-1 (g = Hq / Hi: 1 for
    per-head selections, the group size for shared ones). Lets the decode dispatcher run all
    of a layer's sparse parts as one call without copying K/V per head.
    Inference only: runs without autograd."""
    B, Hq, D, Hkv, n, Hi, kv_head = check_decode_rows(query, key, value, indices, kv_heads)
    attention_mask = check_decode_mask(attention_mask, B, Hq, n)
    idx = indices.long()
    K = idx.shape[-1]
    if K == 0:
        return torch.zeros_like(query)
    ok = (idx >= 0) & (idx < n)
    pos = torch.where(ok, idx, torch.zeros_like(idx))
    numel = B * Hi * K * D
    ws = acquire_workspace({"dk": (numel, key.dtype), "dv": (numel, value.dtype)}, key.device)
    try:
        kg = _gather_rows(key, pos, kv_head, ws["dk"]).float()  # (B, Hi, K, D)
        vg = _gather_rows(value, pos, kv_head, ws["dv"]).float()
        return _attend_gathered(query, kg, vg, pos, ok, n, scaling, attention_mask, softcap)
    finally:
        release_workspace(ws)  # kg/vg are dead once the output exists


def _attend_gathered(query, kg, vg, pos, ok, n, scaling, attention_mask, softcap):
    B, Hq, _, D = query.shape
    Hi, K = pos.shape[1], pos.shape[2]
    Gi = Hq // Hi
    q = query.reshape(B, Hi, Gi, D).float() * scaling           # the G heads of a group share kg/vg
    s = torch.matmul(q, kg.transpose(-1, -2))                    # (B, Hi, Gi, K)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    allowed = ok.unsqueeze(2)                                    # (B, Hi, 1, K)
    if attention_mask is not None:
        am = attention_mask[:, :, 0, :]                          # (B, 1|Hq, n)
        if am.shape[1] == 1:
            amg = am.expand(B, Hi, n).gather(-1, pos).unsqueeze(2)
        else:
            amg = am.reshape(B, Hi, Gi, n).gather(-1, pos.unsqueeze(2).expand(B, Hi, Gi, K))
        allowed = allowed & amg
    s = s.masked_fill(~allowed, _NEG_INF)
    p = torch.softmax(s, dim=-1).nan_to_num_(nan=0.0)           # empty selection -> zeros
    out = torch.matmul(p, vg)                                    # (B, Hi, Gi, D)
    return out.reshape(B, Hq, 1, D).to(query.dtype)


# --------------------------------------------------------------------------
# Triton: split-K flash-decoding over the index list
# --------------------------------------------------------------------------

if tl is not None:

    @triton.jit
    def _sparse_decode_split_kernel(
        Q, K, V, IDX, MASK, MID_ACC, MID_M, MID_L,
        sqb, sqh, skb, skh, skn, svb, svh, svn, sib, sih, smb, smh, smn,
        Hi, num_idx, kv_len, chunk, qk_scale, softcap, HI_PER_KV, GI,
        G_PAD: tl.constexpr, BLOCK_K: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        # Program = (batch b, index head hi) x split. All GI query heads that
        # share this index list are rows of one (G_PAD x BLOCK_K) tile, so each
        # gathered K/V row is read once per group. G_PAD >= 16 because tl.dot
        # needs 16-row operands; the padded rows are masked out.
        bh = tl.program_id(0)
        sp = tl.program_id(1)
        b = bh // Hi
        hi = bh % Hi
        kvh = hi // HI_PER_KV
        g = tl.arange(0, G_PAD)
        g_ok = g < GI
        head = hi * GI + g
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        q = tl.load(Q + b * sqb + head[:, None] * sqh + offs_d[None, :], mask=g_ok[:, None] & d_ok[None, :],
                    other=0.0)
        if DOT_F32:  # the CPU interpreter's tl.dot is wrong for bf16: use fp32 there
            q = q.to(tl.float32)
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.full([G_PAD], 0.0, tl.float32)
        acc = tl.full([G_PAD, BLOCK_D], 0.0, tl.float32)
        start = sp * chunk
        end = tl.minimum(start + chunk, num_idx)
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(start, end, BLOCK_K):
            kk = k0 + offs_k
            pos = tl.load(IDX + b * sib + hi * sih + kk, mask=kk < end, other=-1)  # read the list directly
            ok = (pos >= 0) & (pos < kv_len)
            pos = tl.where(ok, pos, 0)
            k = tl.load(K + b * skb + kvh * skh + pos[None, :] * skn + offs_d[:, None],
                        mask=ok[None, :] & d_ok[:, None], other=0.0)
            if DOT_F32:
                k = k.to(tl.float32)
            v = tl.load(V + b * svb + kvh * svh + pos[:, None] * svn + offs_d[None, :],
                        mask=ok[:, None] & d_ok[None, :], other=0.0)
            if DOT_F32:
                v = v.to(tl.float32)
            s = tl.dot(q, k, input_precision=PREC) * qk_scale
            if HAS_SOFTCAP:
                s = apply_softcap(s, softcap)
            valid = ok[None, :] & g_ok[:, None]
            if HAS_MASK:
                am = tl.load(MASK + b * smb + head[:, None] * smh + pos[None, :] * smn, mask=valid, other=0)
                valid = valid & (am != 0)
            m_i, l_i, acc = online_softmax_step(s, valid, m_i, l_i, acc, v, PREC)
        # unnormalized partials; the reduce kernel rescales by the global max
        row = (bh * tl.num_programs(1) + sp) * G_PAD + g
        tl.store(MID_M + row, m_i)
        tl.store(MID_L + row, l_i)
        tl.store(MID_ACC + row[:, None] * BLOCK_D + offs_d[None, :], acc)

    @triton.jit
    def _sparse_decode_reduce_kernel(
        MID_ACC, MID_M, MID_L, O, sob, soh, Hi, num_splits, GI,
        G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # Second step of split-K: merge the per-split (max, sum, acc) triples.
        bh = tl.program_id(0)
        b = bh // Hi
        hi = bh % Hi
        g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, BLOCK_D)
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.full([G_PAD], 0.0, tl.float32)
        acc = tl.full([G_PAD, BLOCK_D], 0.0, tl.float32)
        for sp in range(0, num_splits):
            row = (bh * num_splits + sp) * G_PAD + g
            ms = tl.load(MID_M + row)
            ls = tl.load(MID_L + row)
            a_s = tl.load(MID_ACC + row[:, None] * BLOCK_D + offs_d[None, :])
            m_new = tl.maximum(m_i, ms)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_use)
            beta = tl.exp(ms - m_use)
            l_i = l_i * alpha + ls * beta
            acc = acc * alpha[:, None] + a_s * beta[:, None]
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # nothing selected -> 0
        head = hi * GI + g
        tl.store(O + b * sob + head[:, None] * soh + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=(g < GI)[:, None] & (offs_d < HEAD_DIM)[None, :])


def _num_splits(num_idx: int, programs: int, block_k: int, target_programs: int = 264) -> int:
    # Enough programs to fill ~2 waves of a 132-SM H100, but each split keeps
    # at least one full BLOCK_K tile of work.
    max_splits = max(1, -(-num_idx // block_k))
    return max(1, min(max_splits, -(-target_programs // programs)))


def sparse_decode_triton(query, key, value, indices, *, scaling, attention_mask=None, softcap=None,
                         num_splits: int | None = None, block_k: int = 64, num_warps: int | None = None,
                         allow_tf32: bool = False):
    """Triton split-K decode over the index lists (same contract as the torch one)."""
    require_triton()
    B, Hq, D, Hkv, n, Hi = _check(query, key, value, indices)
    attention_mask = check_decode_mask(attention_mask, B, Hq, n)
    Gi = Hq // Hi
    num_idx = indices.shape[-1]
    if num_idx == 0:
        return torch.zeros_like(query)
    q = query if query.stride(-1) == 1 else query.contiguous()
    k = key if key.stride(-1) == 1 else key.contiguous()
    v = value if value.stride(-1) == 1 else value.contiguous()
    idx = indices if indices.stride(-1) == 1 else indices.contiguous()
    if attention_mask is not None:
        mask = attention_mask.view(torch.uint8)
        smb, smh, smn = mask.stride(0), mask.stride(1), mask.stride(3)
        if mask.shape[1] == 1:
            smh = 0
    else:
        mask, smb, smh, smn = idx, 0, 0, 0
    splits = num_splits or _num_splits(num_idx, B * Hi, block_k)
    chunk = -(-num_idx // splits)
    chunk = -(-chunk // block_k) * block_k  # whole tiles per split
    splits = -(-num_idx // chunk)
    g_pad = max(16, triton.next_power_of_2(Gi))
    block_d = max(16, triton.next_power_of_2(D))
    dev = q.device
    mid_acc = torch.empty(B * Hi * splits * g_pad, block_d, dtype=torch.float32, device=dev)
    mid_m = torch.empty(B * Hi * splits * g_pad, dtype=torch.float32, device=dev)
    mid_l = torch.empty_like(mid_m)
    out = torch.empty_like(q)
    prec = "tf32" if (allow_tf32 or q.dtype != torch.float32) else "ieee"
    opts = launch_options(_sparse_decode_split_kernel, q, num_warps=num_warps or 4)
    _sparse_decode_split_kernel[(B * Hi, splits)](
        q, k, v, idx, mask, mid_acc, mid_m, mid_l,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), idx.stride(0), idx.stride(1), smb, smh, smn,
        Hi, num_idx, n, chunk, float(scaling), float(softcap or 1.0), Hi // Hkv, Gi,
        G_PAD=g_pad, BLOCK_K=block_k, HEAD_DIM=D, BLOCK_D=block_d,
        HAS_MASK=attention_mask is not None, HAS_SOFTCAP=softcap is not None, PREC=prec,
        DOT_F32=is_interpreted(_sparse_decode_split_kernel) and q.dtype == torch.bfloat16, **opts,
    )
    opts = launch_options(_sparse_decode_reduce_kernel, q, num_warps=4)
    _sparse_decode_reduce_kernel[(B * Hi,)](
        mid_acc, mid_m, mid_l, out, out.stride(0), out.stride(1), Hi, splits, Gi,
        G_PAD=g_pad, HEAD_DIM=D, BLOCK_D=block_d, **opts,
    )
    return out
