"""Block-sparse prefill attention executors.

Contract: docs/ARCHITECTURE.md ("Prefill index"). Patterns only build a
`BlockSparseIndex`; the executors here compute softmax attention over exactly
the (query, key) pairs that `index_to_mask` describes, without ever building a
dense q x n score or mask matrix.

Three implementations share the contract:
  * `dense_masked_attention`      -- plain torch reference (O(q*n) memory), tests only.
  * `block_sparse_attention_torch` -- gathers the selected K/V tiles, CPU friendly.
  * `block_sparse_attention_triton` -- one Triton program per (batch, index head,
    query block); runs natively on CUDA and under TRITON_INTERPRET on CPU.
"""

import threading
from dataclasses import dataclass

import torch

__all__ = [
    "BlockSparseIndex",
    "num_query_blocks",
    "index_to_mask",
    "index_density",
    "index_head_density",
    "dense_masked_attention",
    "block_sparse_attention_torch",
    "block_sparse_attention_triton",
    "block_sparse_attention",
    "triton_available",
    "resolve_backend",
    "release_workspaces",
]

_NEG_INF = float("-inf")


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


def _check_shapes(query, key, value, index):
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


def _check_mask(attention_mask, B, Hq, q_len, n):
    if attention_mask is None:
        return None
    if attention_mask.dtype != torch.bool:
        raise TypeError("attention_mask must be a bool tensor (True = may attend)")
    if attention_mask.dim() != 4 or attention_mask.shape[1] not in (1, Hq):
        raise ValueError(f"attention_mask must be (B, 1|Hq, q, n), got {tuple(attention_mask.shape)}")
    # expand() only adds stride-0 views: covers masks broadcast over batch/rows.
    return attention_mask.expand(B, attention_mask.shape[1], q_len, n)


def _unique_sorted(x: torch.Tensor, valid: torch.Tensor, big: int):
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


def _normalize_index(index: BlockSparseIndex, q_len: int, n: int):
    """Canonical form of an index used by the torch/triton executors.

    Returns a dict with
      off:      (B, Hi, NQB, KBo) selected blocks strictly left of the diagonal,
                sorted, unique, padded with `big`; those need no causal mask.
      off_cnt:  (B, Hi, NQB) number of valid entries in `off`.
      has_diag: (B, Hi, NQB) whether the diagonal block is selected.
      cols:     (B, Hi, C) sorted unique valid columns padded with -1 (or None).
      col_ok:   (B, Hi, NQB, C) column usable for this query block: valid, not
                right of the diagonal block, not inside a selected block (dedup).
      col_cnt:  (B, Hi, NQB) columns at or before the query block's last row: a
                prefix of `cols`, the only part that block has to read. Without it
                an early query block would pay for every column of a long list.
      col_use:  (B, Hi, NQB) usable columns (col_ok) per query block: what the
                torch executor computes after dropping the others.
    Blocks right of the diagonal are dropped: causality removes all their pairs.
    """
    bs = index.block_size
    kvb = index.kv_blocks.long()
    B, Hi, NQB, _ = kvb.shape
    nkb = -(-n // bs)
    qb0 = (n - q_len) // bs
    big = nkb + 1
    diag = (qb0 + torch.arange(NQB, device=kvb.device)).view(1, 1, NQB, 1)
    has_diag = (kvb == diag).any(-1)
    off, off_cnt = _unique_sorted(kvb, (kvb >= 0) & (kvb < diag), big)
    kbo = int(off_cnt.max()) if off_cnt.numel() else 0
    off = off[..., :kbo]
    out = {"off": off, "off_cnt": off_cnt, "has_diag": has_diag, "big": big, "nkb": nkb,
           "qb0": qb0, "cols": None, "col_ok": None, "col_cnt": None, "col_use": None}
    if index.columns is not None and index.columns.shape[-1] > 0:
        cols = index.columns.long()
        cs, ccnt = _unique_sorted(cols, (cols >= 0) & (cols < n), n + 1)
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
            out["cols"] = torch.where(cvalid, cs, torch.full_like(cs, -1))
            out["col_ok"] = col_ok
            last_row = torch.clamp((diag.view(1, 1, NQB) + 1) * bs, max=n)   # exclusive end of each query block
            out["col_cnt"] = torch.searchsorted(cs.contiguous(), last_row.expand(B, Hi, NQB).contiguous())
            out["col_use"] = col_ok.sum(-1)
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
    blocks, _ = _unique_sorted(kvb, (kvb >= 0) & (kvb < nkb), nkb)  # invalid -> nkb
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
        cs, _ = _unique_sorted(cols, (cols >= 0) & (cols < n), n + 1)
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
        s = s.masked_fill(~mask_bool, _NEG_INF)
        p = torch.softmax(s, dim=-1)
        p = torch.where(mask_bool.any(-1, keepdim=True), p, torch.zeros_like(p))
    else:
        p = torch.softmax(s, dim=-1)
    return torch.matmul(p, v).to(query.dtype)


# --------------------------------------------------------------------------
# torch executor
# --------------------------------------------------------------------------

# Score elements (fp32) per processed chunk: 4M (16 MiB) amortizes per-op
# overhead while S stays cache-friendly; bigger was slower on a 2-core EPYC.
_DEFAULT_CHUNK_ELEMS = 1 << 22


@torch.no_grad()
def block_sparse_attention_torch(query, key, value, index: BlockSparseIndex, *, scaling,
                                 attention_mask=None, softcap=None,
                                 chunk_elems: int = _DEFAULT_CHUNK_ELEMS, num_workers: int | None = None):
    """Attention over the selected blocks only, by gathering K/V rows.

    Work unit ("item") = one (batch, index head, query block) with the Gi query
    heads of the index head stacked as rows (Gi*bs rows), so each gathered K/V
    tile feeds all heads of a GQA group in one matmul. Per item, the key axis is
      [diagonal block | off-diagonal selected blocks | columns]
    with the diagonal always in slot 0, so only that slot needs the causal
    triangle; off-diagonal blocks are fully visible. Items are sorted by block
    count and processed in chunks padded to the chunk's largest count, which
    keeps padding (and its masking) rare. Softmax is one-shot per chunk since
    an item's whole key set is in the chunk. Nothing of size q x n is built.

    num_workers: chunks run on this many Python threads with one intra-op
    thread each (default: torch.get_num_threads()). Independent chunks need no
    barrier per op, which matters on small or shared CPUs; the intra-op thread
    count is restored on return. Scratch buffers are kept between calls
    (see `release_workspaces`). Inference only: runs without autograd.
    """
    B, Hq, q_len, D, Hkv, n, Hi = _check_shapes(query, key, value, index)
    attention_mask = _check_mask(attention_mask, B, Hq, q_len, n)
    dev = query.device
    bs = index.block_size
    Gi = Hq // Hi
    q0 = n - q_len
    NQB = index.kv_blocks.shape[2]
    norm = _normalize_index(index, q_len, n)
    qb0, big = norm["qb0"], norm["big"]
    off, off_cnt, has_diag = norm["off"], norm["off_cnt"], norm["has_diag"]
    cols, col_ok = norm["cols"], norm["col_ok"]
    C = 0 if cols is None else cols.shape[-1]

    # Q rows and the output are addressed in place (row = (b*Hq + h)*q + pos):
    # no padded/permuted copy of Q. Rows of a query block that fall outside
    # [q0, n) read row 0 and are written to a dummy last output row.
    qflat = query.reshape(B * Hq * q_len, D)
    out_full = torch.empty(B * Hq * q_len + 1, D, dtype=torch.float32, device=dev)
    # K/V as fp32 rows (no copy for contiguous fp32 caches); positions past n in
    # a partial last block are clamped: only the diagonal slot can hold them,
    # and its causal triangle masks them.
    kflat = key.float().reshape(B * Hkv * n, D)
    vflat = value.float().reshape(B * Hkv * n, D)

    item_b = torch.arange(B, device=dev).view(B, 1, 1).expand(B, Hi, NQB).reshape(-1)
    item_h = torch.arange(Hi, device=dev).view(1, Hi, 1).expand(B, Hi, NQB).reshape(-1)
    item_j = torch.arange(NQB, device=dev).view(1, 1, NQB).expand(B, Hi, NQB).reshape(-1)
    cnt_flat = off_cnt.reshape(-1)
    has_diag_flat = has_diag.reshape(-1)
    active = (cnt_flat > 0) | has_diag_flat
    col_ok_flat = None
    if col_ok is not None:
        col_ok_flat = col_ok.reshape(B * Hi * NQB, C)
        active = active | col_ok_flat.any(-1)
    act_idx = active.nonzero().squeeze(1)
    if act_idx.numel() < active.numel():
        out_full.zero_()  # items with nothing selected are skipped and must read 0
    if act_idx.numel() == 0:
        return _finish(out_full, B, Hq, q_len, D, query.dtype)
    # An item's key axis: the diagonal block, its off-diagonal blocks and its
    # usable columns (read from the prefix of the column list that lies at or
    # before its rows; columns inside selected blocks are dropped, not masked).
    use_flat = norm["col_use"].reshape(-1) if C else torch.zeros_like(cnt_flat)
    key_len = (cnt_flat + 1) * bs + use_flat
    items_all = act_idx[torch.argsort(key_len[act_idx], stable=True)]
    workers = torch.get_num_threads() if num_workers is None else num_workers
    plan = _chunk_plan(cnt_flat[items_all].tolist(), use_flat[items_all].tolist(), Gi, bs, chunk_elems, workers)

    ar_bs = torch.arange(bs, device=dev)
    ctx = dict(
        qflat=qflat, kflat=kflat, vflat=vflat, out_full=out_full, items_all=items_all,
        item_b=item_b, item_h=item_h, item_j=item_j,
        off_flat=off.reshape(B * Hi * NQB, -1), has_diag_flat=has_diag_flat,
        kv_base=(item_b * Hkv + item_h * Hkv // Hi) * n,  # first K row of the item's kv head
        # query row offsets of the Gi stacked heads: ((b*Hq + hi*Gi + g) * q)
        q_base=((item_b * Hq + item_h * Gi) * q_len).view(-1, 1, 1) + (torch.arange(Gi, device=dev) * q_len).view(1, Gi, 1),
        cols_bh=None if cols is None else cols.reshape(B * Hi, C), col_ok_flat=col_ok_flat,
        ar_bs=ar_bs, triu=torch.ones(bs, bs, dtype=torch.bool, device=dev).triu_(1),  # key offset > query offset
        attention_mask=attention_mask, softcap=softcap, qscale=scaling / softcap if softcap is not None else scaling,
        bs=bs, Gi=Gi, D=D, C=C, NQB=NQB, qb0=qb0, big=big, q0=q0, q_len=q_len, n=n,
        dummy_row=B * Hq * q_len,
        col_cnt_flat=norm["col_cnt"].reshape(-1) if C else None,
        ws_spec=_prefill_ws_spec(
            max((j - i) * Gi * bs * ((kbc + 1) * bs + cc) for i, j, kbc, cc, _ in plan),
            max((j - i) * ((kbc + 1) * bs + cc) * D for i, j, kbc, cc, _ in plan),
            max(j - i for i, j, *_ in plan) * Gi * bs * D,
        ),
        ws_local=threading.local(), ws_taken=[],
    )

    workers = min(workers, len(plan))
    try:
        if workers <= 1 or dev.type != "cpu":
            for step in plan:
                _run_chunk(ctx, *step)
        else:
            from concurrent.futures import ThreadPoolExecutor

            inference = torch.is_inference_mode_enabled()

            def work(step):
                # grad/inference modes are thread-local: match the caller's so
                # in-place writes into `out_full` are legal in the worker
                with torch.inference_mode(inference), torch.no_grad():
                    _run_chunk(ctx, *step)

            prev = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                with ThreadPoolExecutor(max_workers=workers) as pool:
                    list(pool.map(work, reversed(plan)))  # largest chunks first: short tail
            finally:
                torch.set_num_threads(prev)
    finally:
        for ws in ctx["ws_taken"]:
            _ws_release(ws)
    return _finish(out_full, B, Hq, q_len, D, query.dtype)


def _chunk_plan(counts, col_counts, Gi, bs, chunk_elems, workers):
    """Split items (sorted by key length) into chunks [(i, j, blocks, columns, item block counts)].

    A chunk is padded to its largest block count and largest column count, so
    cut where that padded length would change once the chunk is at least half
    full: chunks stay (nearly) uniform and padded slots stay rare.
    """
    n_items = len(counts)
    if workers > 1:  # give every worker a few chunks (short prompts, chunked prefill)
        total = Gi * bs * ((sum(counts) + n_items) * bs + sum(col_counts))
        chunk_elems = max(min(chunk_elems, total // (3 * workers)), 1 << 18)
    plan = []
    i = 0
    while i < n_items:
        kbc, cc = counts[i], col_counts[i]
        j = i + 1
        while j < n_items:
            nk, nc = max(kbc, counts[j]), max(cc, col_counts[j])
            padded, now = (nk + 1) * bs + nc, (kbc + 1) * bs + cc
            if (j + 1 - i) * Gi * bs * padded > chunk_elems:
                break
            if padded != now and (j - i) * Gi * bs * now * 2 >= chunk_elems:
                break
            kbc, cc = nk, nc
            j += 1
        plan.append((i, j, kbc, cc, counts[i:j]))
        i = j
    return plan


def _finish(out_full, B, Hq, q_len, D, dtype):
    out = out_full[:-1].view(B, Hq, q_len, D)  # contiguous view without the dummy row
    return out if dtype == torch.float32 else out.to(dtype)


# Scratch buffers survive between calls (one set per worker; decode uses the
# same pool): allocating tens of MB per chunk or per call costs page faults,
# measured 1.2-2x slower end to end on a 2-core machine (10x for decode gathers).
_WS_LOCK = threading.Lock()
_WS_FREE: list = []


def _ws_acquire(spec: dict, device) -> dict:
    """Take a scratch set from the pool: spec = {name: (numel, dtype)}.

    Buffers are grown (never shrunk) to fit; callers slice what they need.
    """
    with _WS_LOCK:
        ws = next((w for w in _WS_FREE if w["device"] == device and w["names"] == tuple(spec)), None)
        if ws is not None:
            _WS_FREE.remove(ws)
    if ws is None:
        ws = {"device": device, "names": tuple(spec)}
    for name, (numel, dtype) in spec.items():
        buf = ws.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            ws.pop(name, None)  # drop the old buffer before allocating the new one
            with torch.inference_mode(False):  # normal tensors: usable in and out of inference mode
                ws[name] = torch.empty(max(numel, 1), dtype=dtype, device=device)
    return ws


def _prefill_ws_spec(s_elems, kv_elems, q_elems):
    f32 = torch.float32
    return {"s": (s_elems, f32), "p": (s_elems, f32), "k": (kv_elems, f32), "v": (kv_elems, f32),
            "q": (q_elems, f32), "o": (q_elems, f32)}


def _ws_release(ws: dict):
    with _WS_LOCK:
        _WS_FREE.append(ws)


def release_workspaces():
    """Free the scratch buffers the torch executor keeps between calls."""
    with _WS_LOCK:
        _WS_FREE.clear()


def _run_chunk(ctx, i, j_end, kbc, cc, counts):
    """Process sorted items [i, j_end), each padded to `kbc` off-diagonal blocks
    and `cc` usable columns (`counts`: each item's own block count)."""
    bs, Gi, D = ctx["bs"], ctx["Gi"], ctx["D"]
    M = Gi * bs
    items = ctx["items_all"][i:j_end]
    c = items.numel()
    dev = items.device
    ws = getattr(ctx["ws_local"], "ws", None)
    if ws is None:
        ws = _ws_acquire(ctx["ws_spec"], dev)
        ctx["ws_local"].ws = ws
        ctx["ws_taken"].append(ws)  # list.append is atomic under the GIL

    # key rows: [diagonal | off-diagonal blocks (padded with block 0) | columns]
    diag_blk = ctx["qb0"] + ctx["item_j"][items]
    slots = torch.empty(c, kbc + 1, dtype=torch.long, device=dev)
    slots[:, 0] = diag_blk
    if kbc:
        o = ctx["off_flat"][items, :kbc]
        slots[:, 1:] = torch.where(o < ctx["big"], o, torch.zeros_like(o))  # padding, masked below
    kb = ctx["kv_base"][items]
    kpos = (slots[:, :, None] * bs + ctx["ar_bs"]).clamp_(max=ctx["n"] - 1).view(c, -1)
    cpos = cok = None
    if cc:
        prefix = int(ctx["col_cnt_flat"][items].max())
        cpos = ctx["cols_bh"][items // ctx["NQB"], :prefix]
        cok = ctx["col_ok_flat"][items, :prefix]
        if cc < prefix:  # usable columns first (stable: they stay ascending), then cut
            keep = torch.sort(cok.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :cc]
            cpos, cok = cpos.gather(1, keep), cok.gather(1, keep)
        kpos = torch.cat([kpos, cpos.clamp(min=0)], dim=1)
    L = kpos.shape[1]
    kidx = (kb[:, None] + kpos).view(-1)
    kg = torch.index_select(ctx["kflat"], 0, kidx, out=ws["k"][: c * L * D].view(c * L, D)).view(c, L, D)
    vg = torch.index_select(ctx["vflat"], 0, kidx, out=ws["v"][: c * L * D].view(c * L, D)).view(c, L, D)

    # query rows (c, Gi, bs): absolute position -> row within q, invalid -> dummy
    qrow = (diag_blk * bs)[:, None] + ctx["ar_bs"] - ctx["q0"]          # (c, bs)
    q_ok = (qrow >= 0) & (qrow < ctx["q_len"])
    rows = ctx["q_base"][items] + qrow.clamp(0, ctx["q_len"] - 1).unsqueeze(1)  # (c, Gi, bs)
    qbuf = ws["q"][: c * M * D].view(c * M, D)
    if ctx["qflat"].dtype == torch.float32:
        torch.index_select(ctx["qflat"], 0, rows.view(-1), out=qbuf)
    else:
        qbuf.copy_(ctx["qflat"].index_select(0, rows.view(-1)))
    qc = qbuf.mul_(ctx["qscale"]).view(c, M, D)

    s = torch.bmm(qc, kg.transpose(1, 2), out=ws["s"][: c * M * L].view(c, M, L))
    if ctx["softcap"] is not None:
        s.tanh_().mul_(ctx["softcap"])  # qscale already divided by softcap
    s4 = s.view(c, Gi, bs, L)
    nb = (kbc + 1) * bs
    # padded block slots sit at the end of each item's block list: fill just those,
    # one slice per run of equal counts (items sorted by key length mostly form a few
    # runs), or with one broadcast mask when the counts are mixed
    runs = []
    a = 0
    while a < c:
        b = a + 1
        while b < c and counts[b] == counts[a]:
            b += 1
        if counts[a] < kbc:
            runs.append((a, b, counts[a]))
        a = b
    if len(runs) <= 8:
        for a, b, count in runs:
            s4[a:b, :, :, (count + 1) * bs:nb] = _NEG_INF
    else:
        cnt = torch.tensor(counts, device=dev)
        first = min(counts)
        pad = torch.arange(first, kbc, device=dev)[None, :] >= cnt[:, None]     # (c, kbc - first)
        s4[..., (first + 1) * bs:nb].masked_fill_(pad.repeat_interleave(bs, 1)[:, None, None, :], _NEG_INF)
    # slot 0 = diagonal: causal triangle, or everything if it is not selected
    hd = ctx["has_diag_flat"][items]
    all_diag = bool(hd.all())
    if all_diag:
        s4[..., :bs].masked_fill_(ctx["triu"], _NEG_INF)
    else:
        s4[..., :bs].masked_fill_(ctx["triu"] | ~hd.view(c, 1, 1, 1), _NEG_INF)
    if cc:
        if all_diag:
            # usable columns lie left of a selected diagonal block: visible to every row
            # compacted: each item's unusable columns are a tail, so mask from the shortest item on
            first = int(cok.sum(1).min())
            if first < cc:
                s4[..., nb + first:].masked_fill_(~cok[:, None, None, first:], _NEG_INF)
        else:
            rowpos = (diag_blk * bs)[:, None] + ctx["ar_bs"]  # absolute query position per row
            cmask = cok[:, None, :] & (cpos[:, None, :] <= rowpos[:, :, None])
            s4[..., nb:].masked_fill_(~cmask.unsqueeze(1), _NEG_INF)
    if ctx["attention_mask"] is not None:
        _apply_attention_mask(s4, ctx, items, qrow, kpos)
    p = torch.ops.aten._softmax.out(s, -1, False, out=ws["p"][: c * M * L].view(c, M, L))
    o_c = torch.bmm(p, vg, out=ws["o"][: c * M * D].view(c, M, D))
    o_c.nan_to_num_(nan=0.0)  # rows with no selected key: softmax of all -inf
    dst = torch.where(q_ok.unsqueeze(1), rows, ctx["dummy_row"])
    ctx["out_full"].index_copy_(0, dst.view(-1), o_c.view(c * M, D))


def _apply_attention_mask(s4, ctx, items, qrow, kpos):
    """Gather attention_mask only at the chunk's tiles and mask scores in place."""
    attention_mask, Gi = ctx["attention_mask"], ctx["Gi"]
    c, bs = qrow.shape
    dev = s4.device
    rows = qrow.clamp(0, ctx["q_len"] - 1)
    bidx = ctx["item_b"][items].view(c, 1, 1, 1)
    if attention_mask.shape[1] == 1:
        hidx = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=dev)
    else:
        hidx = (ctx["item_h"][items] * Gi).view(c, 1, 1, 1) + torch.arange(Gi, device=dev).view(1, Gi, 1, 1)
    m = attention_mask[bidx, hidx, rows.view(c, 1, bs, 1), kpos.view(c, 1, 1, -1)]
    s4.masked_fill_(~m, _NEG_INF)


# --------------------------------------------------------------------------
# Triton executor
# --------------------------------------------------------------------------


try:  # Triton is optional: the torch executor covers every case without it.
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - a missing or broken triton only disables that backend
    triton = None
    tl = None
    _softcap = _online_softmax_step = None   # kernels are only defined when triton imports


def triton_available() -> bool:
    return tl is not None


def _is_interpreted(kernel) -> bool:
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(kernel, InterpretedFunction)


def _launch_opts(kernel, t: torch.Tensor, **opts) -> dict:
    """Check the kernel can run on t's device; return launch options.

    triton.jit picks compiled vs interpreted mode when triton is imported (the
    decision covers tl's own helpers too), so CPU tensors only work when
    TRITON_INTERPRET=1 was set before the first `import triton`.
    """
    if _is_interpreted(kernel):
        return {}  # interpreter ignores warps/stages
    if t.device.type != "cuda":
        raise RuntimeError("Triton kernels need CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 "
                           "before triton is imported, or use backend='torch'")
    return {k: v for k, v in opts.items() if v is not None}


def _require_triton():
    if tl is None:
        raise RuntimeError("triton is not installed; use backend='torch'")


if tl is not None:

    @triton.jit
    def _softcap(s, softcap):
        # softcap * tanh(s / softcap), written with exp (tl has no tanh on every backend)
        return softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))

    @triton.jit
    def _online_softmax_step(s, ok, m_i, l_i, acc, v, PREC: tl.constexpr):
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
        Q, K, V, O, OFF, CNT, HASD, COLS, COLOK, COLCNT, MASK,
        sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
        s_off, s_cols, s_colok, smb, smh, smq, smn,
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
        cnt = tl.load(CNT + item)
        for s in range(0, cnt):
            blk = tl.load(OFF + item * s_off + s)
            kpos = blk * BLOCK + offs_n
            k = tl.load(k_base + kpos[None, :] * skn + offs_d[:, None], mask=d_ok[:, None], other=0.0)
            if DOT_F32:
                k = k.to(tl.float32)
            v = tl.load(v_base + kpos[:, None] * svn + offs_d[None, :], mask=d_ok[None, :], other=0.0)
            if DOT_F32:
                v = v.to(tl.float32)
            qk = tl.dot(q, k, input_precision=PREC) * qk_scale
            if HAS_SOFTCAP:
                qk = _softcap(qk, softcap)
            ok = qk > float("-inf")          # blocks left of the diagonal are causal-safe; only a mask cuts them
            if HAS_MASK:
                am = tl.load(MASK + b * smb + head[:, None] * smh + qrow[:, None] * smq + kpos[None, :] * smn,
                             mask=row_ok[:, None], other=0)
                ok = ok & (am != 0)
            m_i, l_i, acc = _online_softmax_step(qk, ok, m_i, l_i, acc, v, PREC)

        # 2) the diagonal block: the only tile that needs the causal triangle
        #    (it also holds the partial last block when n % BLOCK != 0).
        hd = tl.load(HASD + item)
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
                qk = _softcap(qk, softcap)
            ok = kpos[None, :] <= qpos[:, None]
            if HAS_MASK:
                am = tl.load(MASK + b * smb + head[:, None] * smh + qrow[:, None] * smq + kpos[None, :] * smn,
                             mask=row_ok[:, None] & k_ok[None, :], other=0)
                ok = ok & (am != 0)
            m_i, l_i, acc = _online_softmax_step(qk, ok, m_i, l_i, acc, v, PREC)

        # 3) columns, BLOCK at a time, only the prefix at or before this block's
        #    rows (COLCNT); COLOK already removed invalid columns, columns right
        #    of the diagonal block and those inside selected blocks.
        if HAS_COLS:
            num_cols = tl.load(COLCNT + item)
            for c0 in range(0, num_cols, BLOCK):
                cidx = c0 + offs_n
                c_in = cidx < num_cols
                cpos = tl.load(COLS + bh * s_cols + cidx, mask=c_in, other=-1)
                c_ok = (tl.load(COLOK + item * s_colok + cidx, mask=c_in, other=0) != 0) & (cpos >= 0)
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
                    qk = _softcap(qk, softcap)
                ok = c_ok[None, :] & (kpos[None, :] <= qpos[:, None])
                if HAS_MASK:
                    am = tl.load(MASK + b * smb + head[:, None] * smh + qrow[:, None] * smq + kpos[None, :] * smn,
                                 mask=row_ok[:, None] & c_ok[None, :], other=0)
                    ok = ok & (am != 0)
                m_i, l_i, acc = _online_softmax_step(qk, ok, m_i, l_i, acc, v, PREC)

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
    _require_triton()
    B, Hq, q_len, D, Hkv, n, Hi = _check_shapes(query, key, value, index)
    attention_mask = _check_mask(attention_mask, B, Hq, q_len, n)
    bs = index.block_size
    if bs < 16 or bs & (bs - 1):
        raise ValueError("triton executor needs a power-of-two block_size >= 16")
    Gi = Hq // Hi
    NQB = index.kv_blocks.shape[2]
    q0 = n - q_len
    norm = _normalize_index(index, q_len, n)
    items = B * Hi * NQB
    off = norm["off"].reshape(items, -1)
    if off.shape[1] == 0:
        off = torch.zeros(items, 1, dtype=torch.long, device=query.device)
    off = off.to(torch.int32).contiguous()
    cnt = norm["off_cnt"].reshape(items).to(torch.int32).contiguous()
    hasd = norm["has_diag"].reshape(items).to(torch.int32).contiguous()
    has_cols = norm["cols"] is not None
    if has_cols:
        cols = norm["cols"].reshape(B * Hi, -1).to(torch.int32).contiguous()
        colok = norm["col_ok"].reshape(items, -1).to(torch.uint8).contiguous()
        colcnt = norm["col_cnt"].reshape(items).to(torch.int32).contiguous()
    else:
        cols = colok = colcnt = cnt  # dummies, never read
    if attention_mask is not None:
        mask = attention_mask.view(torch.uint8)  # same storage, Triton-friendly dtype
        smb, smh, smq, smn = mask.stride()
        if mask.shape[1] == 1:
            smh = 0
    else:
        mask, smb, smh, smq, smn = cnt, 0, 0, 0, 0

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
    kwargs = _launch_opts(kernel, q, num_warps=num_warps or (8 if heads * bs >= 128 else 4),
                          num_stages=num_stages or 2)
    kernel[grid](
        q, k, v, out, off, cnt, hasd, cols, colok, colcnt, mask,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        off.stride(0), cols.stride(0) if has_cols else 0, colok.stride(0) if has_cols else 0,
        smb, smh, smq, smn,
        Hi, NQB, n, q0, norm["qb0"], float(scaling), float(softcap or 1.0),
        Hi // Hkv, Gi, splits,
        BLOCK=bs, HEADS=heads, HEAD_DIM=D, BLOCK_D=block_d,
        HAS_COLS=has_cols, HAS_MASK=attention_mask is not None, HAS_SOFTCAP=softcap is not None,
        PREC=prec, DOT_F32=_is_interpreted(kernel) and q.dtype == torch.bfloat16, **kwargs,
    )
    return out


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    """The executor 'auto' means for this tensor: Triton for CUDA tensors when importable, else torch."""
    if backend != "auto":
        return backend
    return "triton" if (tensor.is_cuda and triton_available()) else "torch"


def block_sparse_attention(query, key, value, index: BlockSparseIndex, *, scaling,
                           attention_mask=None, softcap=None, backend: str = "auto"):
    """Dispatch: 'auto' = Triton for CUDA tensors when importable, else torch."""
    backend = resolve_backend(backend, query)
    if backend == "torch":
        return block_sparse_attention_torch(query, key, value, index, scaling=scaling,
                                            attention_mask=attention_mask, softcap=softcap)
    if backend == "triton":
        return block_sparse_attention_triton(query, key, value, index, scaling=scaling,
                                             attention_mask=attention_mask, softcap=softcap)
    raise ValueError(f"unknown backend {backend!r}")
