"""The prefill index type and everything that reads it without computing attention.

Contract: docs/ARCHITECTURE.md ("Prefill index"). Patterns build a
`BlockSparseIndex`; `index_to_mask` and `dense_masked_attention` give the
reference semantics every executor is tested against; `normalize_index` is the
canonical form the torch, Triton and flex executors start from; the density
functions measure an index in closed form (no q x n mask).
"""

from dataclasses import dataclass

import torch

__all__ = [
    "BlockSparseIndex",
    "NormalizedIndex",
    "num_query_blocks",
    "check_prefill_shapes",
    "check_attention_mask",
    "unique_sorted",
    "normalize_index",
    "index_to_mask",
    "index_density",
    "index_head_density",
    "dense_masked_attention",
]

NEG_INF = float("-inf")

@dataclass
class BlockSparseIndex:
    """Which kv blocks (and columns) each query block attends to.

    kv_blocks: int64 (B, Hi, NQB, KB): kv block ids, ascending, -1 = unused slot.
    columns:   int64 (B, Hi, C) absolute kv positions, ascending, -1 = unused, or None.
    Hi is Hkv (shared by a GQA group) or Hq (one index per query head).
    """

    block_size: int
    kv_blocks: torch.Tensor
    columns: torch.Tensor | None = None

    @property
    def num_index_heads(self) -> int:
        return self.kv_blocks.shape[1]


# --------------------------------------------------------------------------
# small helpers shared by executors, reference and benchmarks
# --------------------------------------------------------------------------


def num_query_blocks(q_len: int, kv_len: int, bs: int) -> int:
    """NQB: query blocks are aligned to absolute positions (see contract)."""
    q0 = kv_len - q_len
    return -(-kv_len // bs) - q0 // bs


def check_prefill_shapes(query, key, value, index):
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError("query/key/value must be 4-D (B, H, L, D)")
    B, Hq, q_len, D = query.shape
    Bk, Hkv, n, Dk = key.shape
    if Bk != B or value.shape[:3] != key.shape[:3] or Dk != D:
        raise ValueError(f"shape mismatch q={tuple(query.shape)} k={tuple(key.shape)} v={tuple(value.shape)}")
    if q_len > n:
        raise ValueError("query length exceeds kv length; queries must be the last q positions")
    bs = index.block_size
    kvb = index.kv_blocks
    if kvb.dim() != 4 or kvb.shape[0] != B:
        raise ValueError(f"kv_blocks must be (B, Hi, NQB, KB), got {tuple(kvb.shape)}")
    Hi = kvb.shape[1]
    if Hq % Hi or Hi % Hkv:
        raise ValueError(f"index heads Hi={Hi} must divide Hq={Hq} and be a multiple of Hkv={Hkv}")
    nqb = num_query_blocks(q_len, n, bs)
    if kvb.shape[2] != nqb:
        raise ValueError(f"kv_blocks has {kvb.shape[2]} query blocks, expected {nqb} (q={q_len}, n={n}, bs={bs})")
    if index.columns is not None and (index.columns.dim() != 3 or index.columns.shape[:2] != (B, Hi)):
        raise ValueError(f"columns must be (B, Hi, C), got {tuple(index.columns.shape)}")
    return B, Hq, q_len, D, Hkv, n, Hi


def check_attention_mask(attention_mask, B, Hq, q_len, n):
    if attention_mask is None:
        return None
    if attention_mask.dtype != torch.bool:
        raise TypeError("attention_mask must be a bool tensor (True = may attend)")
    if attention_mask.dim() != 4 or attention_mask.shape[1] not in (1, Hq):
        raise ValueError(f"attention_mask must be (B, 1|Hq, q, n), got {tuple(attention_mask.shape)}")
    # expand() only adds stride-0 views: covers masks broadcast over batch/rows.
    return attention_mask.expand(B, attention_mask.shape[1], q_len, n)


def unique_sorted(x: torch.Tensor, valid: torch.Tensor, big: int):
    """Sort last dim, push invalid entries (and duplicates) to the end as `big`.

    Returns (sorted values with invalid = big, count of valid per row).
    Cheap (index tensors are tiny) and makes executors robust to unordered or
    duplicated index entries, so a duplicated block is never counted twice.
    """
    s = torch.where(valid, x, torch.full_like(x, big)).sort(dim=-1).values
    if s.shape[-1] > 1:
        dup = torch.zeros_like(s, dtype=torch.bool)
        dup[..., 1:] = s[..., 1:] == s[..., :-1]
        if bool(dup.any()):
            s = torch.where(dup, torch.full_like(s, big), s).sort(dim=-1).values
    count = (s < big).sum(-1)
    return s, count


@dataclass
class NormalizedIndex:
    """Canonical form of an index, what the executors start from.

    Blocks right of the diagonal are dropped: causality removes all their pairs.
    Shapes: B batch, Hi index heads, NQB query blocks, C columns.
    """

    first_query_block: int            # absolute block id of query block 0 ((n - q) // bs)
    num_kv_blocks: int                # ceil(n / bs)
    pad_block: int                    # value padding `off_diagonal` (> every real block id)
    off_diagonal: torch.Tensor        # (B, Hi, NQB, KBo) selected blocks strictly left of the diagonal,
                                      # sorted, unique, padded with pad_block: they need no causal mask
    off_diagonal_count: torch.Tensor  # (B, Hi, NQB) valid entries of `off_diagonal`
    has_diagonal: torch.Tensor        # (B, Hi, NQB) bool: the diagonal block is selected
    columns: torch.Tensor | None = None         # (B, Hi, C) sorted unique valid columns, -1 padded
    column_usable: torch.Tensor | None = None   # (B, Hi, NQB, C) valid, not right of the diagonal
                                                # block, not inside a selected block (counted once)
    column_prefix: torch.Tensor | None = None   # (B, Hi, NQB) columns at or before the block's last
                                                # row: the only prefix of `columns` that block reads,
                                                # so an early block does not pay for a long list
    column_usable_count: torch.Tensor | None = None  # (B, Hi, NQB) usable columns per query block


def normalize_index(index: BlockSparseIndex, q_len: int, n: int) -> NormalizedIndex:
    """The `NormalizedIndex` of `index` for q_len queries over n keys."""
    bs = index.block_size
    kvb = index.kv_blocks.long()
    B, Hi, NQB, _ = kvb.shape
    nkb = -(-n // bs)
    qb0 = (n - q_len) // bs
    big = nkb + 1
    diag = (qb0 + torch.arange(NQB, device=kvb.device)).view(1, 1, NQB, 1)
    has_diag = (kvb == diag).any(-1)
    off, off_cnt = unique_sorted(kvb, (kvb >= 0) & (kvb < diag), big)
    kbo = int(off_cnt.max()) if off_cnt.numel() else 0
    off = off[..., :kbo]
    out = NormalizedIndex(first_query_block=qb0, num_kv_blocks=nkb, pad_block=big,
                          off_diagonal=off, off_diagonal_count=off_cnt, has_diagonal=has_diag)
    if index.columns is not None and index.columns.shape[-1] > 0:
        cols = index.columns.long()
        cs, ccnt = unique_sorted(cols, (cols >= 0) & (cols < n), n + 1)
        c_eff = int(ccnt.max())
        if c_eff > 0:
            cs = cs[..., :c_eff]
            cvalid = cs <= n - 1
            cblk = torch.where(cvalid, cs // bs, torch.zeros_like(cs))
            cblk4 = cblk.unsqueeze(2).expand(B, Hi, NQB, c_eff).contiguous()
            # membership of the column's block in the (sorted) off-diagonal list
            if kbo > 0:
                pos = torch.searchsorted(off.contiguous(), cblk4).clamp_max(kbo - 1)
                in_off = off.gather(-1, pos) == cblk4
            else:
                in_off = torch.zeros_like(cblk4, dtype=torch.bool)
            in_diag = (cblk4 == diag) & has_diag.unsqueeze(-1)
            col_ok = cvalid.unsqueeze(2) & (cblk4 <= diag) & ~in_off & ~in_diag
            out.columns = torch.where(cvalid, cs, torch.full_like(cs, -1))
            out.column_usable = col_ok
            last_row = torch.clamp((diag.view(1, 1, NQB) + 1) * bs, max=n)   # exclusive end of each query block
            out.column_prefix = torch.searchsorted(cs.contiguous(), last_row.expand(B, Hi, NQB).contiguous())
            out.column_usable_count = col_ok.sum(-1)
    return out


# --------------------------------------------------------------------------
# reference semantics
# --------------------------------------------------------------------------


def index_to_mask(index: BlockSparseIndex, q_len: int, kv_len: int, num_q_heads: int,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Dense bool (B, Hq, q, n) mask of the selected pairs (tests/reference only)."""
    bs = index.block_size
    kvb = index.kv_blocks.long()
    B, Hi, NQB, _ = kvb.shape
    dev = kvb.device
    n = kv_len
    q0 = n - q_len
    nkb = -(-n // bs)
    if NQB != num_query_blocks(q_len, n, bs):
        raise ValueError("kv_blocks query-block count does not match q_len/kv_len")
    # block bitmap; the extra last slot swallows invalid ids
    bitmap = torch.zeros(B, Hi, NQB, nkb + 1, dtype=torch.bool, device=dev)
    ok = (kvb >= 0) & (kvb < nkb)
    bitmap.scatter_(-1, torch.where(ok, kvb, torch.full_like(kvb, nkb)), True)
    bitmap = bitmap[..., :nkb]
    qpos = q0 + torch.arange(q_len, device=dev)
    kpos = torch.arange(n, device=dev)
    qblk = qpos // bs - q0 // bs
    mask = bitmap[:, :, qblk][:, :, :, kpos // bs]
    if index.columns is not None and index.columns.shape[-1] > 0:
        cols = index.columns.long()
        colmap = torch.zeros(B, Hi, n + 1, dtype=torch.bool, device=dev)
        cok = (cols >= 0) & (cols < n)
        colmap.scatter_(-1, torch.where(cok, cols, torch.full_like(cols, n)), True)
        mask = mask | colmap[:, :, None, :n]
    mask = mask & (kpos[None, :] <= qpos[:, None])
    mask = mask.repeat_interleave(num_q_heads // Hi, dim=1)
    if attention_mask is not None:
        mask = mask & attention_mask.to(torch.bool)
    return mask


def index_density(index: BlockSparseIndex, q_len: int, kv_len: int) -> float:
    """Fraction of causal (q, k) pairs selected, averaged over batch and heads.

    Computed in closed form per (query block, kv block) so it stays cheap at
    long lengths (no q x n mask).
    """
    return float(index_head_density(index, q_len, kv_len).mean())


def index_head_density(index: BlockSparseIndex, q_len: int, kv_len: int) -> torch.Tensor:
    """float64 (Hi,): fraction of causal pairs each index head selects, averaged over batch."""
    bs = index.block_size
    n = kv_len
    q0 = n - q_len
    kvb = index.kv_blocks.long()
    B, Hi, NQB, _ = kvb.shape
    dev = kvb.device
    nkb = -(-n // bs)
    blocks, _ = unique_sorted(kvb, (kvb >= 0) & (kvb < nkb), nkb)  # invalid -> nkb
    j = torch.arange(NQB, device=dev, dtype=torch.float64)
    qb0 = q0 // bs
    rs = torch.clamp((qb0 + j) * bs, min=q0).view(1, 1, NQB, 1)  # row range [rs, re)
    re = torch.clamp((qb0 + j + 1) * bs, max=n).view(1, 1, NQB, 1)

    def tri_sum(m, w):
        # sum_{t=1..m} min(t, w) for m >= 0
        m = m.clamp(min=0)
        return torch.where(m <= w, m * (m + 1) / 2, w * (w + 1) / 2 + (m - w) * w)

    valid = blocks < nkb
    ks = blocks.double() * bs
    w = (torch.clamp(ks + bs, max=n) - ks).clamp(min=0)
    # pairs (p, k) with p in [rs, re), k in [ks, ks+w), k <= p
    per = tri_sum(re - ks, w) - tri_sum(rs - ks, w)
    total = torch.where(valid, per, torch.zeros_like(per)).sum((2, 3))                # (B, Hi)
    if index.columns is not None and index.columns.shape[-1] > 0:
        cols = index.columns.long()
        cs, _ = unique_sorted(cols, (cols >= 0) & (cols < n), n + 1)
        cvalid = cs < n
        cblk = torch.where(cvalid, cs // bs, torch.zeros_like(cs))
        cblk4 = cblk.unsqueeze(2).expand(B, Hi, NQB, cs.shape[-1]).contiguous()
        pos = torch.searchsorted(blocks.contiguous(), cblk4).clamp_max(blocks.shape[-1] - 1)
        in_blk = blocks.gather(-1, pos) == cblk4
        c = cs.double().unsqueeze(2)
        rows = (re - torch.maximum(rs, c)).clamp(min=0)
        total = total + torch.where(cvalid.unsqueeze(2) & ~in_blk, rows, torch.zeros_like(rows)).sum((2, 3))
    causal = (n * (n + 1) - q0 * (q0 + 1)) / 2
    return total.mean(0) / causal


def dense_masked_attention(query, key, value, mask_bool, scaling, softcap=None):
    """Reference: softmax(q k^T * scaling [softcap]) v over `mask_bool` (fp32 math).

    key/value are (B, Hkv, n, D) and get repeated for GQA. mask_bool broadcasts
    to (B, Hq, q, n) (None = attend everywhere). Rows with no allowed key -> 0.
    """
    Hq, Hkv = query.shape[1], key.shape[1]
    k = key.float().repeat_interleave(Hq // Hkv, dim=1)
    v = value.float().repeat_interleave(Hq // Hkv, dim=1)
    s = torch.matmul(query.float(), k.transpose(-1, -2)) * scaling
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if mask_bool is not None:
        s = s.masked_fill(~mask_bool, NEG_INF)
        p = torch.softmax(s, dim=-1)
        p = torch.where(mask_bool.any(-1, keepdim=True), p, torch.zeros_like(p))
    else:
        p = torch.softmax(s, dim=-1)
    return torch.matmul(p, v).to(query.dtype)


