"""The torch prefill executor: gathers the selected K/V tiles, CPU friendly.

Also home of the scratch-buffer pool the torch executors (prefill and decode)
keep between calls.
"""

import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .index import NEG_INF, BlockSparseIndex, check_attention_mask, check_prefill_shapes, normalize_index

__all__ = ["block_sparse_attention_torch", "acquire_workspace", "release_workspace", "release_workspaces"]


@dataclass
class _Job:
    """What every chunk of one executor call reads. An "item" is one (batch, index head,
    query block); item tensors are flat over B * Hi * NQB."""

    qflat: torch.Tensor            # (B*Hq*q, D) query rows, read in place
    kflat: torch.Tensor            # (B*Hkv*n, D) fp32 key rows
    vflat: torch.Tensor            # (B*Hkv*n, D) fp32 value rows
    out_full: torch.Tensor         # (B*Hq*q + 1, D) fp32 output; the last row takes rows outside [q0, n)
    items_sorted: torch.Tensor     # active items, sorted by key length (chunks are slices of this)
    item_b: torch.Tensor           # batch of each item
    item_h: torch.Tensor           # index head of each item
    item_j: torch.Tensor           # query block of each item
    off_blocks: torch.Tensor       # (items, KBo) off-diagonal blocks, padded with pad_block
    has_diagonal: torch.Tensor     # (items,) diagonal block selected
    kv_base: torch.Tensor          # (items,) first K/V row of the item's kv head
    q_base: torch.Tensor           # (items, Gi, 1) first query row of each stacked head
    columns: torch.Tensor | None   # (B*Hi, C) sorted columns, -1 padded
    column_usable: torch.Tensor | None   # (items, C)
    column_prefix: torch.Tensor | None   # (items,) columns at or before the item's rows
    block_offsets: torch.Tensor    # arange(bs)
    above_diagonal: torch.Tensor   # (bs, bs) key offset > query offset: the diagonal's masked triangle
    attention_mask: torch.Tensor | None
    softcap: float | None
    query_scale: float             # scaling, divided by softcap when there is one
    fused: bool                    # softmax attention through SDPA with an additive mask (no softcap)
    mask_heads: int                # heads of that mask: Gi when the attention mask differs per head, else 1
    bs: int
    Gi: int                        # query heads per index head (stacked as rows)
    D: int
    NQB: int
    first_query_block: int
    pad_block: int
    q0: int                        # absolute position of query row 0
    q_len: int
    n: int
    dummy_row: int
    workspace_spec: dict
    workspace_local: threading.local = field(default_factory=threading.local)
    workspaces_taken: list = field(default_factory=list)


# --------------------------------------------------------------------------
# torch executor
# --------------------------------------------------------------------------

# Score elements (fp32) per processed chunk: 4M (16 MiB) amortizes per-op
# overhead while S stays cache-friendly; bigger was slower on a 2-core EPYC.
_DEFAULT_CHUNK_ELEMS = 1 << 22

# Softmax attention of a chunk through F.scaled_dot_product_attention (the fused CPU flash
# kernel) with the masks as an additive bias, instead of bmm + softmax + bmm over explicit
# scores. Module-level so that benchmarks and tests can run both paths.
FUSED_SOFTMAX = True


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
    B, Hq, q_len, D, Hkv, n, Hi = check_prefill_shapes(query, key, value, index)
    attention_mask = check_attention_mask(attention_mask, B, Hq, q_len, n)
    dev = query.device
    bs = index.block_size
    Gi = Hq // Hi
    q0 = n - q_len
    NQB = index.kv_blocks.shape[2]
    norm = normalize_index(index, q_len, n)
    qb0 = norm.first_query_block
    off, off_cnt, has_diag = norm.off_diagonal, norm.off_diagonal_count, norm.has_diagonal
    cols, col_ok = norm.columns, norm.column_usable
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
    use_flat = norm.column_usable_count.reshape(-1) if C else torch.zeros_like(cnt_flat)
    key_len = (cnt_flat + 1) * bs + use_flat
    items_all = act_idx[torch.argsort(key_len[act_idx], stable=True)]
    # softcap (tanh of the scores) has no place in SDPA: those calls keep the explicit scores. So
    # do per-head indices (Gi 1): their bias is as large as the scores it replaces, and SDPA's
    # short query tiles made them slower (benchmarks/executor_paths.py: 2.6 against 2.5 x SDPA's
    # cost per unit of density; group-shared indices 1.3-1.7 against 1.6-2.0)
    fused = FUSED_SOFTMAX and softcap is None and Gi > 1
    mask_heads = Gi if attention_mask is not None and attention_mask.shape[1] > 1 else 1
    workers = torch.get_num_threads() if num_workers is None else num_workers
    plan = _chunk_plan(cnt_flat[items_all].tolist(), use_flat[items_all].tolist(), Gi, bs, chunk_elems, workers)

    job = _Job(
        qflat=qflat, kflat=kflat, vflat=vflat, out_full=out_full, items_sorted=items_all,
        item_b=item_b, item_h=item_h, item_j=item_j,
        off_blocks=off.reshape(B * Hi * NQB, -1), has_diagonal=has_diag_flat,
        kv_base=(item_b * Hkv + item_h * Hkv // Hi) * n,  # first K row of the item's kv head
        # query row offsets of the Gi stacked heads: ((b*Hq + hi*Gi + g) * q)
        q_base=((item_b * Hq + item_h * Gi) * q_len).view(-1, 1, 1) + (torch.arange(Gi, device=dev) * q_len).view(1, Gi, 1),
        columns=None if cols is None else cols.reshape(B * Hi, C), column_usable=col_ok_flat,
        column_prefix=norm.column_prefix.reshape(-1) if C else None,
        block_offsets=torch.arange(bs, device=dev),
        above_diagonal=torch.ones(bs, bs, dtype=torch.bool, device=dev).triu_(1),  # key offset > query offset
        attention_mask=attention_mask, softcap=softcap,
        query_scale=scaling / softcap if softcap is not None else scaling,
        fused=fused, mask_heads=mask_heads,
        bs=bs, Gi=Gi, D=D, NQB=NQB, first_query_block=qb0, pad_block=norm.pad_block, q0=q0, q_len=q_len, n=n,
        dummy_row=B * Hq * q_len,
        workspace_spec=_workspace_spec(
            max((j - i) * Gi * bs * ((kbc + 1) * bs + cc) for i, j, kbc, cc, _ in plan),
            max((j - i) * ((kbc + 1) * bs + cc) * D for i, j, kbc, cc, _ in plan),
            max(j - i for i, j, *_ in plan) * Gi * bs * D,
            fused, mask_heads, Gi,
        ),
    )

    workers = min(workers, len(plan))
    try:
        if workers <= 1 or dev.type != "cpu":
            for step in plan:
                _run_chunk(job, *step)
        else:
            from concurrent.futures import ThreadPoolExecutor

            inference = torch.is_inference_mode_enabled()

            def work(step):
                # grad/inference modes are thread-local: match the caller's so
                # in-place writes into `out_full` are legal in the worker
                with torch.inference_mode(inference), torch.no_grad():
                    _run_chunk(job, *step)

            prev = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                with ThreadPoolExecutor(max_workers=workers) as pool:
                    list(pool.map(work, reversed(plan)))  # largest chunks first: short tail
            finally:
                torch.set_num_threads(prev)
    finally:
        for ws in job.workspaces_taken:
            release_workspace(ws)
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
_WORKSPACE_LOCK = threading.Lock()
_FREE_WORKSPACES: list = []


def acquire_workspace(spec: dict, device) -> dict:
    """Take a scratch set from the pool: spec = {name: (numel, dtype)}.

    Buffers are grown (never shrunk) to fit; callers slice what they need.
    """
    with _WORKSPACE_LOCK:
        ws = next((w for w in _FREE_WORKSPACES if w["device"] == device and w["names"] == tuple(spec)), None)
        if ws is not None:
            _FREE_WORKSPACES.remove(ws)
    if ws is None:
        ws = {"device": device, "names": tuple(spec)}
    for name, (numel, dtype) in spec.items():
        buf = ws.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            ws.pop(name, None)  # drop the old buffer before allocating the new one
            with torch.inference_mode(False):  # normal tensors: usable in and out of inference mode
                ws[name] = torch.empty(max(numel, 1), dtype=dtype, device=device)
    return ws


def _workspace_spec(s_elems, kv_elems, q_elems, fused=False, mask_heads=1, gi=1):
    """Scratch per worker: the scores, probabilities and output (s, p, o) of the explicit path, or
    the additive mask (m: s_elems / Gi per mask head, shared by the stacked heads) of the fused one,
    whose output SDPA allocates."""
    f32 = torch.float32
    own = ({"m": (s_elems * mask_heads // gi, f32)} if fused
           else {"s": (s_elems, f32), "p": (s_elems, f32), "o": (q_elems, f32)})
    return {**own, "k": (kv_elems, f32), "v": (kv_elems, f32), "q": (q_elems, f32)}


def release_workspace(ws: dict):
    with _WORKSPACE_LOCK:
        _FREE_WORKSPACES.append(ws)


def release_workspaces():
    """Free the scratch buffers the torch executor keeps between calls."""
    with _WORKSPACE_LOCK:
        _FREE_WORKSPACES.clear()


def _run_chunk(job: "_Job", i, j_end, kbc, cc, counts):
    """Process sorted items [i, j_end), each padded to `kbc` off-diagonal blocks
    and `cc` usable columns (`counts`: each item's own block count)."""
    bs, Gi, D = job.bs, job.Gi, job.D
    M = Gi * bs
    items = job.items_sorted[i:j_end]
    c = items.numel()
    dev = items.device
    ws = getattr(job.workspace_local, "ws", None)
    if ws is None:
        ws = acquire_workspace(job.workspace_spec, dev)
        job.workspace_local.ws = ws
        job.workspaces_taken.append(ws)  # list.append is atomic under the GIL

    # key rows: [diagonal | off-diagonal blocks (padded with block 0) | columns]
    diag_blk = job.first_query_block + job.item_j[items]
    slots = torch.empty(c, kbc + 1, dtype=torch.long, device=dev)
    slots[:, 0] = diag_blk
    if kbc:
        o = job.off_blocks[items, :kbc]
        slots[:, 1:] = torch.where(o < job.pad_block, o, torch.zeros_like(o))  # padding, masked below
    kb = job.kv_base[items]
    kpos = (slots[:, :, None] * bs + job.block_offsets).clamp_(max=job.n - 1).view(c, -1)
    cpos = cok = None
    if cc:
        prefix = int(job.column_prefix[items].max())
        cpos = job.columns[items // job.NQB, :prefix]
        cok = job.column_usable[items, :prefix]
        if cc < prefix:  # usable columns first (stable: they stay ascending), then cut
            keep = torch.sort(cok.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :cc]
            cpos, cok = cpos.gather(1, keep), cok.gather(1, keep)
        kpos = torch.cat([kpos, cpos.clamp(min=0)], dim=1)
    L = kpos.shape[1]
    kidx = (kb[:, None] + kpos).view(-1)
    kg = torch.index_select(job.kflat, 0, kidx, out=ws["k"][: c * L * D].view(c * L, D)).view(c, L, D)
    vg = torch.index_select(job.vflat, 0, kidx, out=ws["v"][: c * L * D].view(c * L, D)).view(c, L, D)

    # query rows (c, Gi, bs): absolute position -> row within q, invalid -> dummy
    qrow = (diag_blk * bs)[:, None] + job.block_offsets - job.q0          # (c, bs)
    q_ok = (qrow >= 0) & (qrow < job.q_len)
    rows = job.q_base[items] + qrow.clamp(0, job.q_len - 1).unsqueeze(1)  # (c, Gi, bs)
    qbuf = ws["q"][: c * M * D].view(c * M, D)
    if job.qflat.dtype == torch.float32:
        torch.index_select(job.qflat, 0, rows.view(-1), out=qbuf)
    else:
        qbuf.copy_(job.qflat.index_select(0, rows.view(-1)))
    qc = qbuf.mul_(job.query_scale).view(c, M, D)

    if job.fused:
        # one fused softmax-attention call (SDPA's CPU flash kernel) instead of bmm, softmax and
        # bmm over a materialized score matrix; the masks go in as an additive float mask shared
        # by the Gi stacked heads (per head only when the attention mask is)
        heads = job.mask_heads
        bias = ws["m"][: c * heads * bs * L].view(c, heads, bs, L).zero_()
        _mask_chunk(bias, job, items, diag_blk, qrow, kpos, cpos, cok, kbc, cc, counts)
        o_c = F.scaled_dot_product_attention(qc.view(c, Gi, bs, D), kg[:, None].expand(c, Gi, L, D),
                                             vg[:, None].expand(c, Gi, L, D), attn_mask=bias, scale=1.0)
        o_c = o_c.reshape(c, M, D)
    else:
        s = torch.bmm(qc, kg.transpose(1, 2), out=ws["s"][: c * M * L].view(c, M, L))
        if job.softcap is not None:
            s.tanh_().mul_(job.softcap)  # qscale already divided by softcap
        _mask_chunk(s.view(c, Gi, bs, L), job, items, diag_blk, qrow, kpos, cpos, cok, kbc, cc, counts)
        p = torch.ops.aten._softmax.out(s, -1, False, out=ws["p"][: c * M * L].view(c, M, L))
        o_c = torch.bmm(p, vg, out=ws["o"][: c * M * D].view(c, M, D))
    o_c.nan_to_num_(nan=0.0)  # rows with no selected key: softmax of all -inf
    dst = torch.where(q_ok.unsqueeze(1), rows, job.dummy_row)
    job.out_full.index_copy_(0, dst.view(-1), o_c.view(c * M, D))


def _mask_chunk(t4, job: "_Job", items, diag_blk, qrow, kpos, cpos, cok, kbc, cc, counts):
    """Set to -inf, in t4 (c, 1|Gi, bs, L): each item's padded block slots, the diagonal's
    upper triangle (or the whole slot when the diagonal is not selected), columns an item
    cannot use, and what the attention mask hides."""
    bs = job.bs
    c = t4.shape[0]
    dev = t4.device
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
            t4[a:b, :, :, (count + 1) * bs:nb] = NEG_INF
    else:
        cnt = torch.tensor(counts, device=dev)
        first = min(counts)
        pad = torch.arange(first, kbc, device=dev)[None, :] >= cnt[:, None]     # (c, kbc - first)
        t4[..., (first + 1) * bs:nb].masked_fill_(pad.repeat_interleave(bs, 1)[:, None, None, :], NEG_INF)
    # slot 0 = diagonal: causal triangle, or everything if it is not selected
    hd = job.has_diagonal[items]
    all_diag = bool(hd.all())
    if all_diag:
        t4[..., :bs].masked_fill_(job.above_diagonal, NEG_INF)
    else:
        t4[..., :bs].masked_fill_(job.above_diagonal | ~hd.view(c, 1, 1, 1), NEG_INF)
    if cc:
        if all_diag:
            # usable columns lie left of a selected diagonal block: visible to every row
            # compacted: each item's unusable columns are a tail, so mask from the shortest item on
            first = int(cok.sum(1).min())
            if first < cc:
                t4[..., nb + first:].masked_fill_(~cok[:, None, None, first:], NEG_INF)
        else:
            rowpos = (diag_blk * bs)[:, None] + job.block_offsets  # absolute query position per row
            cmask = cok[:, None, :] & (cpos[:, None, :] <= rowpos[:, :, None])
            t4[..., nb:].masked_fill_(~cmask.unsqueeze(1), NEG_INF)
    if job.attention_mask is not None:
        _apply_attention_mask(t4, job, items, qrow, kpos)


def _apply_attention_mask(s4, job: "_Job", items, qrow, kpos):
    """Gather attention_mask only at the chunk's tiles and mask scores in place."""
    attention_mask, Gi = job.attention_mask, job.Gi
    c, bs = qrow.shape
    dev = s4.device
    rows = qrow.clamp(0, job.q_len - 1)
    bidx = job.item_b[items].view(c, 1, 1, 1)
    if attention_mask.shape[1] == 1:
        hidx = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=dev)
    else:
        hidx = (job.item_h[items] * Gi).view(c, 1, 1, 1) + torch.arange(Gi, device=dev).view(1, Gi, 1, 1)
    m = attention_mask[bidx, hidx, rows.view(c, 1, bs, 1), kpos.view(c, 1, 1, -1)]
    s4.masked_fill_(~m, NEG_INF)

