"""The Triton prefill executor, and the Triton helpers the decode kernels share.

One program per (batch, index head, query block); runs natively on CUDA and
under TRITON_INTERPRET on CPU.
"""

import torch

from .index import BlockSparseIndex, check_attention_mask, check_prefill_shapes, normalize_index

__all__ = [
    "triton",
    "tl",
    "triton_available",
    "triton_problem",
    "triton_refuses",
    "require_triton",
    "is_interpreted",
    "launch_options",
    "apply_softcap",
    "online_softmax_step",
    "block_sparse_attention_triton",
]


try:  # Triton is optional: the torch executor covers every case without it.
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - a missing or broken triton only disables that backend
    triton = None
    tl = None
    apply_softcap = online_softmax_step = None   # kernels are only defined when triton imports


def triton_available() -> bool:
    return tl is not None


def triton_problem() -> str | None:
    """Why the Triton executors cannot run here, None when they can."""
    return None if tl is not None else "triton is not installed (or does not import)"


def triton_refuses(query: torch.Tensor, key=None, value=None) -> str | None:
    """Why the Triton kernels cannot take tensors on the query's device (triton imported), None when they can."""
    if query.device.type != "cuda" and not is_interpreted(_bsa_fwd_kernel):
        return ("Triton kernels need CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 before "
                "triton is first imported")
    return None


def is_interpreted(kernel) -> bool:
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(kernel, InterpretedFunction)


def launch_options(kernel, t: torch.Tensor, **opts) -> dict:
    """Check the kernel can run on t's device; return launch options.

    triton.jit picks compiled vs interpreted mode when triton is imported (the
    decision covers tl's own helpers too), so CPU tensors only work when
    TRITON_INTERPRET=1 was set before the first `import triton`.
    """
    if is_interpreted(kernel):
        return {}  # interpreter ignores warps/stages
    if t.device.type != "cuda":
        raise RuntimeError("Triton kernels need CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 "
                           "before triton is imported, or use backend='torch'")
    return {k: v for k, v in opts.items() if v is not None}


def require_triton():
    if tl is None:
        raise RuntimeError("triton is not installed; use backend='torch'")


if tl is not None:

    @triton.jit
    def apply_softcap(s, softcap):
        # softcap * tanh(s / softcap), written with exp (tl has no tanh on every backend)
        return softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))

    @triton.jit
    def online_softmax_step(s, ok, m_i, l_i, acc, v, PREC: tl.constexpr):
        """Fold one tile of scores (allowed where ok) and its values into the running (max, sum, acc).

        Rows with nothing allowed so far keep max = -inf; they are rescaled with 0 so no NaN appears.
        """
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_use)
        p = tl.exp(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        return m_new, l_i, acc

    @triton.jit
    def _bsa_fwd_kernel(
        Q, K, V, O, OFF_BLOCKS, OFF_COUNT, HAS_DIAGONAL, COLUMNS, COLUMN_USABLE, COLUMN_PREFIX, MASK,
        sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
        stride_off, stride_columns, stride_usable, smb, smh, smq, smn,
        Hi, NQB, kv_len, q0, qb0, qk_scale, softcap,
        HI_PER_KV, GI, HEAD_SPLITS,
        BLOCK: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_COLS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        PREC: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        # One program = (query block j, batch b, index head hi, head split).
        # The HEADS query heads it serves are stacked along M: row m is head
        # m // BLOCK, query offset m % BLOCK. A K/V tile is then loaded once and
        # feeds a single (HEADS*BLOCK) x BLOCK MMA for the whole group, which is
        # what makes Hi == Hkv cheaper than per-head programs. Looping over heads
        # instead would need the same HEADS accumulators live, so stacking costs
        # no more registers and gives bigger MMAs.
        j = tl.program_id(0)
        pid = tl.program_id(1)
        split = pid % HEAD_SPLITS
        bh = pid // HEAD_SPLITS
        b = bh // Hi
        hi = bh % Hi
        kvh = hi // HI_PER_KV
        item = bh * NQB + j
        diag = qb0 + j

        offs_m = tl.arange(0, HEADS * BLOCK)
        head = hi * GI + split * HEADS + offs_m // BLOCK
        qpos = diag * BLOCK + offs_m % BLOCK          # absolute query position per row
        row_ok = (qpos >= q0) & (qpos < kv_len)
        qrow = qpos - q0
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        offs_n = tl.arange(0, BLOCK)

        q = tl.load(Q + b * sqb + head[:, None] * sqh + qrow[:, None] * sqm + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_F32:  # the CPU interpreter's tl.dot is wrong for bf16: use fp32 there
            q = q.to(tl.float32)
        m_i = tl.full([HEADS * BLOCK], float("-inf"), tl.float32)
        l_i = tl.zeros([HEADS * BLOCK], tl.float32)
        acc = tl.zeros([HEADS * BLOCK, BLOCK_D], tl.float32)
        k_base = K + b * skb + kvh * skh
        v_base = V + b * svb + kvh * svh

        # 1) off-diagonal selected blocks: fully causal-visible, no mask math
        #    unless an attention_mask is given. The list is pre-compacted, so
        #    the loop runs exactly `cnt` times.
        cnt = tl.load(OFF_COUNT + item)
        for s in range(0, cnt):
            blk = tl.load(OFF_BLOCKS + item * stride_off + s)
            kpos = blk * BLOCK + offs_n
            k = tl.load(k_base + kpos[None, :] * skn + offs_d[:, None], mask=d_ok[:, None], other=0.0)
            if DOT_F32:
                k = k.to(tl.float32)
            v = tl.load(v_base + kpos[:, None] * svn + offs_d[None, :], mask=d_ok[None, :], other=0.0)
            if DOT_F32:
                v = v.to(tl.float32)
            qk = tl.dot(q, k, input_precision=PREC) * qk_scale
            if HAS_SOFTCAP:
                qk = apply_softcap(qk, softcap)
            ok = qk > float("-inf")          # blocks left of the diagonal are causal-safe; only a mask cuts them
            if HAS_MASK:
                am = tl.load(MASK + b * smb + head[:, None] * smh + qrow[:, None] * smq + kpos[None, :] * smn,
                             mask=row_ok[:, None], other=0)
                ok = ok & (am != 0)
            m_i, l_i, acc = online_softmax_step(qk, ok, m_i, l_i, acc, v, PREC)

        # 2) the diagonal block: the only tile that needs the causal triangle
        #    (it also holds the partial last block when n % BLOCK != 0).
        hd = tl.load(HAS_DIAGONAL + item)
        if hd != 0:
            kpos = diag * BLOCK + offs_n
            k_ok = kpos < kv_len
            k = tl.load(k_base + kpos[None, :] * skn + offs_d[:, None], mask=k_ok[None, :] & d_ok[:, None], other=0.0)
            if DOT_F32:
                k = k.to(tl.float32)
            v = tl.load(v_base + kpos[:, None] * svn + offs_d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            if DOT_F32:
                v = v.to(tl.float32)
            qk = tl.dot(q, k, input_precision=PREC) * qk_scale
            if HAS_SOFTCAP:
                qk = apply_softcap(qk, softcap)
            ok = kpos[None, :] <= qpos[:, None]
            if HAS_MASK:
                am = tl.load(MASK + b * smb + head[:, None] * smh + qrow[:, None] * smq + kpos[None, :] * smn,
                             mask=row_ok[:, None] & k_ok[None, :], other=0)
                ok = ok & (am != 0)
            m_i, l_i, acc = online_softmax_step(qk, ok, m_i, l_i, acc, v, PREC)

        # 3) columns, BLOCK at a time, only the prefix at or before this block's
        #    rows (COLUMN_PREFIX); COLUMN_USABLE already removed invalid columns, columns right
        #    of the diagonal block and those inside selected blocks.
        if HAS_COLS:
            num_cols = tl.load(COLUMN_PREFIX + item)
            for c0 in range(0, num_cols, BLOCK):
                cidx = c0 + offs_n
                c_in = cidx < num_cols
                cpos = tl.load(COLUMNS + bh * stride_columns + cidx, mask=c_in, other=-1)
                c_ok = (tl.load(COLUMN_USABLE + item * stride_usable + cidx, mask=c_in, other=0) != 0) & (cpos >= 0)
                kpos = tl.where(c_ok, cpos, 0)
                k = tl.load(k_base + kpos[None, :] * skn + offs_d[:, None], mask=c_ok[None, :] & d_ok[:, None],
                            other=0.0)
                if DOT_F32:
                    k = k.to(tl.float32)
                v = tl.load(v_base + kpos[:, None] * svn + offs_d[None, :], mask=c_ok[:, None] & d_ok[None, :],
                            other=0.0)
                if DOT_F32:
                    v = v.to(tl.float32)
                qk = tl.dot(q, k, input_precision=PREC) * qk_scale
                if HAS_SOFTCAP:
                    qk = apply_softcap(qk, softcap)
                ok = c_ok[None, :] & (kpos[None, :] <= qpos[:, None])
                if HAS_MASK:
                    am = tl.load(MASK + b * smb + head[:, None] * smh + qrow[:, None] * smq + kpos[None, :] * smn,
                                 mask=row_ok[:, None] & c_ok[None, :], other=0)
                    ok = ok & (am != 0)
                m_i, l_i, acc = online_softmax_step(qk, ok, m_i, l_i, acc, v, PREC)

        # rows that saw no key have l_i == 0 -> output zeros
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(O + b * sob + head[:, None] * soh + qrow[:, None] * som + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _pow2_divisor(x: int) -> int:
    return x & (-x)


def block_sparse_attention_triton(query, key, value, index: BlockSparseIndex, *, scaling,
                                  attention_mask=None, softcap=None, max_rows: int = 256,
                                  num_warps: int | None = None, num_stages: int | None = None,
                                  allow_tf32: bool = False):
    """Triton executor, same contract as `block_sparse_attention_torch`.

    max_rows caps the stacked M dimension (heads x block rows) of one program;
    groups that do not fit are split over several programs (K/V then shared via
    L2). allow_tf32 trades fp32 exactness for tensor-core speed on fp32 inputs.
    CPU tensors run only under the interpreter: TRITON_INTERPRET=1 must be set
    before triton is first imported. Untuned on real GPUs so far.
    """
    require_triton()
    B, Hq, q_len, D, Hkv, n, Hi = check_prefill_shapes(query, key, value, index)
    attention_mask = check_attention_mask(attention_mask, B, Hq, q_len, n)
    bs = index.block_size
    if bs < 16 or bs & (bs - 1):
        raise ValueError("triton executor needs a power-of-two block_size >= 16")
    Gi = Hq // Hi
    NQB = index.kv_blocks.shape[2]
    q0 = n - q_len
    norm = normalize_index(index, q_len, n)
    items = B * Hi * NQB
    off_blocks = norm.off_diagonal.reshape(items, -1)
    if off_blocks.shape[1] == 0:
        off_blocks = torch.zeros(items, 1, dtype=torch.long, device=query.device)
    off_blocks = off_blocks.to(torch.int32).contiguous()
    off_count = norm.off_diagonal_count.reshape(items).to(torch.int32).contiguous()
    has_diagonal = norm.has_diagonal.reshape(items).to(torch.int32).contiguous()
    has_cols = norm.columns is not None
    if has_cols:
        columns = norm.columns.reshape(B * Hi, -1).to(torch.int32).contiguous()
        column_usable = norm.column_usable.reshape(items, -1).to(torch.uint8).contiguous()
        column_prefix = norm.column_prefix.reshape(items).to(torch.int32).contiguous()
    else:
        columns = column_usable = column_prefix = off_count  # dummies, never read
    if attention_mask is not None:
        mask = attention_mask.view(torch.uint8)  # same storage, Triton-friendly dtype
        smb, smh, smq, smn = mask.stride()
        if mask.shape[1] == 1:
            smh = 0
    else:
        mask, smb, smh, smq, smn = off_count, 0, 0, 0, 0

    q = query if query.stride(-1) == 1 else query.contiguous()
    k = key if key.stride(-1) == 1 else key.contiguous()
    v = value if value.stride(-1) == 1 else value.contiguous()
    out = torch.empty_like(q)

    heads = _pow2_divisor(Gi)  # arange(HEADS*BLOCK) needs a power of two
    while heads > 1 and heads * bs > max_rows:
        heads //= 2
    splits = Gi // heads
    block_d = max(16, triton.next_power_of_2(D))
    # exact fp32 MMAs unless tf32 is allowed; fp16/bf16 MMAs ignore the setting
    prec = "ieee" if (q.dtype == torch.float32 and not allow_tf32) else "tf32"
    kernel = _bsa_fwd_kernel
    grid = (NQB, B * Hi * splits)
    kwargs = launch_options(kernel, q, num_warps=num_warps or (8 if heads * bs >= 128 else 4),
                          num_stages=num_stages or 2)
    kernel[grid](
        q, k, v, out, off_blocks, off_count, has_diagonal, columns, column_usable, column_prefix, mask,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        off_blocks.stride(0), columns.stride(0) if has_cols else 0, column_usable.stride(0) if has_cols else 0,
        smb, smh, smq, smn,
        Hi, NQB, n, q0, norm.first_query_block, float(scaling), float(softcap or 1.0),
        Hi // Hkv, Gi, splits,
        BLOCK=bs, HEADS=heads, HEAD_DIM=D, BLOCK_D=block_d,
        HAS_COLS=has_cols, HAS_MASK=attention_mask is not None, HAS_SOFTCAP=softcap is not None,
        PREC=prec, DOT_F32=is_interpreted(kernel) and q.dtype == torch.bfloat16, **kwargs,
    )
    return out

