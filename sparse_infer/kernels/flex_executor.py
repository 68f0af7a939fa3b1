"""The flex prefill executor: a BlockSparseIndex run by PyTorch's FlexAttention.

The index becomes a `BlockMask`: selected blocks strictly left of the diagonal
are *full* blocks (every pair is causal-visible, no mask_mod call), the
diagonal block and blocks reached only through columns are *partial* blocks
whose pairs a `mask_mod` decides. Padding/sliding-window masks (bool
attention_mask) demote a full block to partial wherever they cut into it.
Softcap is a `score_mod`. K/V are not repeated for GQA (enable_gqa).

FlexAttention's query tiles start at query row 0 while the index's query
blocks are aligned to absolute positions (chunked prefill, docs/ARCHITECTURE.md),
so the query gets `(n - q) % bs` zero rows in front: flex tile j is then index
query block j. Those rows attend to nothing and are cut from the output.

flex_attention is compiled once per process (torch.compile, dynamic=False): on
CPU it only runs compiled, and on CUDA compiling is what makes it fast. Every
new (shape, dtype, softcap) compiles again (seconds on CPU).
"""

import threading

import torch
import torch.nn.functional as F

from .index import BlockSparseIndex, check_attention_mask, check_prefill_shapes, normalize_index

__all__ = ["block_sparse_attention_flex", "index_to_block_mask", "flex_available", "flex_problem"]

_COMPILED = None
_COMPILE_LOCK = threading.Lock()


def flex_problem() -> str | None:
    """Why FlexAttention cannot run here, None when it can."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except Exception as err:  # noqa: BLE001 - an old or broken torch only disables this backend
        return f"this torch ({torch.__version__}) has no FlexAttention ({err})"
    return None


def flex_available() -> bool:
    return flex_problem() is None


def _compiled_flex_attention():
    global _COMPILED
    if _COMPILED is None:
        with _COMPILE_LOCK:
            if _COMPILED is None:
                from torch.nn.attention.flex_attention import flex_attention

                _COMPILED = torch.compile(flex_attention, dynamic=False)
    return _COMPILED


def _ordered(bitmap: torch.Tensor):
    """(..., NKB) bool -> (counts int32, block ids int32 ascending first, width NKB): BlockMask's layout."""
    counts = bitmap.sum(-1, dtype=torch.int32)
    # stable sort of "not selected" puts the selected ids first, in ascending order
    ids = torch.sort((~bitmap).to(torch.uint8), dim=-1, stable=True).indices
    return counts.contiguous(), ids.to(torch.int32).contiguous()


def index_to_block_mask(index: BlockSparseIndex, q_len: int, kv_len: int, num_q_heads: int,
                        attention_mask: torch.Tensor | None = None):
    """(BlockMask, front) for `index`: a BlockMask over (front + q_len) query rows and kv_len
    keys whose rows front.. are the index's queries (see the module docstring).

    attention_mask: None or bool (B, 1|Hq, q_len, kv_len), True = may attend.
    """
    from torch.nn.attention.flex_attention import BlockMask

    bs = index.block_size
    n = kv_len
    norm = normalize_index(index, q_len, n)
    B, Hi, NQB = norm.has_diagonal.shape
    nkb = norm.num_kv_blocks
    qb0 = norm.first_query_block
    front = (n - q_len) - qb0 * bs
    dev = index.kv_blocks.device
    Gi = num_q_heads // Hi

    # full candidates: off-diagonal selected blocks (pad_block = nkb + 1 lands in a dropped slot)
    full = torch.zeros(B, Hi, NQB, nkb + 2, dtype=torch.bool, device=dev)
    full.scatter_(-1, norm.off_diagonal, True)
    full = full[..., :nkb]
    diag = qb0 + torch.arange(NQB, device=dev)
    on_diag = torch.nn.functional.one_hot(diag, nkb).bool().view(1, 1, NQB, nkb)
    partial = on_diag & norm.has_diagonal.unsqueeze(-1)
    selected = full | partial                                   # what mask_mod reads per tile
    columns = None
    if norm.columns is not None:
        cols = norm.columns
        # a block holding a usable column is partial for that query block
        cblk = torch.where(norm.column_usable, (cols // bs).unsqueeze(2), torch.full_like(norm.column_usable, nkb,
                                                                                           dtype=torch.long))
        hit = torch.zeros(B, Hi, NQB, nkb + 1, dtype=torch.bool, device=dev)
        hit.scatter_(-1, cblk, True)
        partial = partial | hit[..., :nkb]
        columns = torch.zeros(B, Hi, n + 1, dtype=torch.bool, device=dev)
        columns.scatter_(-1, torch.where(cols >= 0, cols, torch.full_like(cols, n)), True)
        columns = columns[..., :n].contiguous()

    # the BlockMask is per query head (mask_mod's h); index tensors are tiny, repeating is cheap
    full = full.repeat_interleave(Gi, dim=1)
    partial = partial.repeat_interleave(Gi, dim=1)
    mask = None
    if attention_mask is not None:
        mask = attention_mask
        # a full tile stays full only where the mask allows all of it (rows outside the
        # queries count as allowed: they are cut from the output anyway)
        rows, cols_pad = NQB * bs - front - q_len, nkb * bs - n
        padded = F.pad(mask, (0, cols_pad, front, rows), value=True)
        tile_ok = padded.view(B, mask.shape[1], NQB, bs, nkb, bs).all(5).all(3)
        partial = partial | (full & ~tile_ok)
        full = full & tile_ok

    heads_in_mask = 1 if mask is None else mask.shape[1]
    offset = qb0 * bs                      # absolute position of flex query row 0

    def mask_mod(b, h, q_idx, kv_idx):
        hi = h // Gi
        qb = torch.clamp(q_idx // bs, max=NQB - 1)
        kv = torch.clamp(kv_idx, max=n - 1)
        ok = (kv_idx <= q_idx + offset) & (q_idx >= front)
        chosen = selected[b, hi, qb, kv // bs]
        if columns is not None:
            chosen = chosen | columns[b, hi, kv]
        ok = ok & chosen
        if mask is not None:
            row = torch.clamp(q_idx - front, min=0, max=q_len - 1)
            ok = ok & mask[b, h if heads_in_mask > 1 else 0, row, kv]
        return ok

    kv_num, kv_ids = _ordered(partial)
    full_num, full_ids = _ordered(full)
    block_mask = BlockMask.from_kv_blocks(kv_num, kv_ids, full_num, full_ids, BLOCK_SIZE=bs, mask_mod=mask_mod,
                                          seq_lengths=(front + q_len, n))
    return block_mask, front


def block_sparse_attention_flex(query, key, value, index: BlockSparseIndex, *, scaling,
                                attention_mask=None, softcap=None):
    """FlexAttention executor, same contract as `block_sparse_attention_torch`."""
    B, Hq, q_len, D, Hkv, n, Hi = check_prefill_shapes(query, key, value, index)
    attention_mask = check_attention_mask(attention_mask, B, Hq, q_len, n)
    block_mask, front = index_to_block_mask(index, q_len, n, Hq, attention_mask)
    q = F.pad(query, (0, 0, front, 0)) if front else query
    score_mod = None
    if softcap is not None:
        cap = float(softcap)

        def score_mod(score, b, h, q_idx, kv_idx):
            return cap * torch.tanh(score / cap)

    with torch.no_grad():
        out = _compiled_flex_attention()(q, key, value, score_mod=score_mod, block_mask=block_mask,
                                         scale=float(scaling), enable_gqa=Hq != Hkv)
    return out[:, :, front:].contiguous() if front else out
