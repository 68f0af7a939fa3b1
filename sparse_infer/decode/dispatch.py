"""Decode-time KV selection (q == 1): pick, per head or GQA group, which cached keys to read.

`decode_attention` is called by the registered attention function for every one-token
step. For each rule of the layer (rt.decode_groups: [(Rule, [query heads])]) it asks that
method's selector for an index list (B, Hi, K) of absolute kv positions (-1 = unused;
Hi = kv heads when a group shares one selection, query heads otherwise) and hands it to the
gather executor (sparse_infer.kernels.sparse_decode). Dense heads (e.g. retrieval heads)
read the whole cache, and so, under patch's dense_above="auto", do heads whose selections
could not read less than dense attention (see _parts_over_limit); on the torch executor a
layer's sparse parts are attended in one call (see _attend_pending). Selectors are the
DecodeSelector classes registered in sparse_infer.methods (one file each in this package);
they only choose indices.

Each part of a layer keeps its selector's typed side state (the selector's State dataclass:
label cache, page bounds, last selection for reuse) in rt.decode_state.groups.
The attention function never sees the cache object, so continuity is detected from the
keys: a step continues the sequence held in the side state only if the kv length grew by
exactly one since the previous step of this layer AND a fingerprint (full rows of K, all
batch rows and heads, at the last-processed position and at the first, last and 7 evenly
spread positions of the sequence when its side state was built) still matches; on CPUs the
rows are compared and kept by two small C helpers (sparse_infer.decode.fingerprint). Anything
else (a new `generate` call, a new cache, beam reordering, a rolled sliding-window cache, a
crop) rebuilds the state from the full K. `reset_decode_state(model)` drops it explicitly.
"""
from __future__ import annotations

import torch

import dataclasses
from dataclasses import dataclass

from sparse_infer.decode import fingerprint
from sparse_infer.decode.common import GroupInputs, GrowBuffer, grouped_dense_decode, pad_indices
from sparse_infer.kernels import cpu_decode, registry
from sparse_infer.kernels.dispatch import resolve_decode_backend, resolve_dense_above, sparse_decode
from sparse_infer.methods import DECODE_SELECTORS, DENSE
from sparse_infer.runtime import DecodeState, heads_of, iter_runtimes

_FINGERPRINT_SPREAD = 8


# --------------------------------------------------------------------------- continuity
def _fingerprint_positions(n: int) -> list[int]:
    return sorted({0, n - 1, *((i * n) // _FINGERPRINT_SPREAD for i in range(1, _FINGERPRINT_SPREAD))})


@dataclass
class Fingerprint:
    """Rows of K that identify the sequence a layer's side state was built for."""

    shape: tuple                  # (B, Hkv, D)
    positions: torch.Tensor       # spread positions, then the last processed one
    rows: torch.Tensor            # (B, Hkv, len(positions), D) the rows of K there
    in_c: bool                    # kept and compared by the C helpers
    n: int = 0                    # kv length last processed


def _sequence_continues(state: DecodeState, key: torch.Tensor) -> bool:
    prev = state.sequence
    if prev is None:
        return False
    B, Hkv, n, D = key.shape
    if prev.n != n - 1 or prev.shape != (B, Hkv, D) or prev.rows.dtype != key.dtype \
            or prev.rows.device != key.device:
        return False
    # the spread rows and, in the last slot, the previous last row: one C call on CPUs (a gather
    # and a compare in torch cost ~30 us per layer and step), else one gather and one compare
    if prev.in_c and key.stride(-1) == 1:
        return fingerprint.fingerprint_matches(key, prev.positions, prev.rows)
    return torch.equal(key.index_select(2, prev.positions), prev.rows)


def _remember_sequence(state: DecodeState, key: torch.Tensor, continued: bool) -> None:
    """Keep the fingerprint: rows at positions spread over the sequence when its side state
    was built (they stay put while it grows: no per-step re-sampling), then the last row."""
    B, Hkv, n, D = key.shape
    seq = state.sequence
    if not continued or seq is None:
        positions = torch.tensor([*_fingerprint_positions(n), n - 1], device=key.device)
        seq = state.sequence = Fingerprint((B, Hkv, D), positions, key.index_select(2, positions),
                                           _fingerprint_in_c(key))
    elif seq.in_c and key.stride(-1) == 1:
        fingerprint.fingerprint_keep(key, n - 1, seq.positions, seq.rows, len(seq.positions) - 1)
    else:
        seq.positions[-1] = n - 1
        seq.rows[:, :, -1] = key[:, :, n - 1]
    seq.n = n


def _fingerprint_in_c(key: torch.Tensor) -> bool:
    return key.device.type == "cpu" and cpu_decode.cpu_kernel_available()


# --------------------------------------------------------------------------- head layout
def _parts(heads: list[int], num_heads: int, num_kv: int, by_head: bool):
    """Split a rule's query heads into parts that each read one contiguous run of cache heads.

    Returns [(q heads or None for the whole layer, kv slice or None, per_head)]. Whole GQA
    groups keep one shared selection per kv head (unless the plan asks for per-head
    selection); a partial group gives each of its query heads its own selection. K/V are
    always sliced (views), never gathered with a head list: that would copy the whole cache
    of those heads on every step."""
    G = num_heads // num_kv
    if len(heads) == num_heads:
        return [(None, None, by_head or G == 1)]
    per_kv: dict[int, list[int]] = {}
    for h in heads:
        per_kv.setdefault(h // G, []).append(h)
    parts, run = [], []                                # run: adjacent whole groups sharing one part

    def close_run():
        if run:
            parts.append(([h for j in run for h in per_kv[j]], slice(run[0], run[-1] + 1), G == 1))
            run.clear()

    for j in sorted(per_kv):
        if len(per_kv[j]) == G and not by_head:
            if run and run[-1] != j - 1:
                close_run()
            run.append(j)
        else:
            close_run()
            parts.append((per_kv[j], slice(j, j + 1), True))
    close_run()
    return parts


def _layer_layouts(rt, num_heads: int, num_kv: int) -> list:
    """[(rule, q heads or None, kv slice or None, per_head)], one entry per part (see _parts)."""
    by_head = rt.plan.decode.granularity == "head"
    cached = rt.decode_state.layouts
    if cached is None or cached[0] != (num_heads, num_kv):
        layouts = [(rule, *part) for rule, heads in rt.decode_groups
                   for part in _parts(heads, num_heads, num_kv, by_head)]
        cached = rt.decode_state.layouts = ((num_heads, num_kv), layouts)
    return cached[1]


def _part_heads(q_heads, kv_slice, num_heads: int, heads_per_kv: int):
    """A part's query heads (the layer's when q_heads is None) and the cache head each reads."""
    heads = list(range(num_heads)) if q_heads is None else list(q_heads)
    first_kv = 0 if kv_slice is None else kv_slice.start
    return heads, [first_kv + j // heads_per_kv for j in range(len(heads))]


def visible_suffix_starts(mask: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """(batch,) int64 first visible key per batch row when a (batch | 1, 1, 1, n) mask lets each
    row see exactly the keys [start, n) (left padding, a sliding window), else None. The fused C
    steps take such a mask as these starts."""
    if mask is None or mask.shape[1] != 1 or mask.dtype != torch.bool:
        return None
    rows = mask[:, 0, 0]
    n = rows.shape[-1]
    starts = n - rows.sum(-1)
    suffix = torch.arange(n, device=rows.device) >= starts[:, None]
    return starts.expand(batch).contiguous() if torch.equal(suffix, rows) else None


def _valid_for(mask_h: torch.Tensor | None, B: int, hk: int, per_head: bool, h: int, n: int):
    """(B, Hi, n) bool of keys the mask allows, from a (B, 1|h, 1, n) mask."""
    if mask_h is None:
        return None
    m = mask_h[:, :, 0]
    Hi = h if per_head else hk
    if m.shape[1] == 1:
        return m.expand(B, Hi, n)
    return m if per_head else m.view(B, hk, h // hk, n).any(2)


# a gathered row is copied and read again (~3 passes) where reading in place is one pass
IN_PLACE_SHARE = 1 / 3
# attend a mixed layer's sparse parts in one executor call on the CPU executors (see decode_attention)
MERGE_PARTS = True


def _parts_over_limit(layouts, num_heads: int, num_kv: int, n: int, limit: float) -> set[int]:
    """Parts (indices into layouts) to run dense: those touching a cache head whose sparse
    selections would hold more than `limit` x n rows in all (a per-query-head selection counts
    once per query head, a shared one once), where reading it whole costs no more."""
    group = num_heads // num_kv
    load = [0] * num_kv
    touched = []
    checked = []                          # parts whose rows are known before selecting
    for rule, q_heads, kv_slice, per_head in layouts:
        kvs = range(num_kv) if kv_slice is None else range(kv_slice.start, kv_slice.stop)
        touched.append(kvs)
        selector = None if rule.kind == DENSE else DECODE_SELECTORS[rule.kind]
        # a selector reading the whole cache itself is exact and not slower than dense; one
        # whose rows only its selection tells is checked once it has selected
        rows = None if selector is None or selector.attends_whole_cache else selector.expected_rows(rule, n)
        checked.append(rows is not None)
        if rows is None:
            continue
        heads_per_kv = group if q_heads is None else len(q_heads) // len(kvs)
        for kv in kvs:
            load[kv] += rows * (heads_per_kv if per_head else 1)
    over = {kv for kv in range(num_kv) if load[kv] > limit * n}
    return {pi for pi in range(len(layouts)) if checked[pi] and any(kv in over for kv in touched[pi])}


def _attend_pending(out, pending, query, key, value, mask, scaling, softcap, executor):
    """Attend the collected sparse parts of a layer (an executor that takes kv_heads), writing into `out`.

    pending: [(query heads, cache head of each index row, (B, R, K) indices)]; index row r
    serves query heads r*g .. r*g+g-1 of the list (g = 1 for per-head selections, the group
    size for a selection shared by a GQA group, which is then gathered once for its g heads).

    Per cache head: when its index rows add up to more than IN_PLACE_SHARE of the cache,
    gathering them (copy, then read the copy) would move more bytes than reading the cache
    once, so its query heads read it in place under a mask of exactly their selections; the
    other rows share one gather call per g. Only the torch executor gathers: the others (the
    cpu one) read selected rows in place, so they never need the masked whole-cache read."""
    n = key.shape[2]
    rows = []                                                  # (g, query heads, cache head, (B, K) indices)
    for heads, row_kv, indices in pending:
        g = len(heads) // indices.shape[1]
        rows += [(g, heads[r * g:(r + 1) * g], kv, indices[:, r]) for r, kv in enumerate(row_kv)]
    load: dict[int, int] = {}
    for _, _, kv, idx in rows:
        load[kv] = load.get(kv, 0) + int((idx >= 0).sum(-1).max())      # worst batch row
    in_place = {kv for kv, count in load.items() if count > IN_PLACE_SHARE * n} if executor == "torch" else set()
    for kv in in_place:
        mine = [(hs, idx) for _, hs, row_kv, idx in rows if row_kv == kv]
        hs = [h for heads, _ in mine for h in heads]
        width = max(idx.shape[-1] for _, idx in mine)
        per_query = torch.stack([pad_indices(idx[:, None], width)[:, 0] for heads, idx in mine for _ in heads], 1)
        keep = _selection_mask(per_query, n, heads_of(mask, hs))
        res = grouped_dense_decode(query[:, hs], key[:, kv: kv + 1], value[:, kv: kv + 1], keep, scaling, softcap)
        out[:, hs] = res.nan_to_num(0.0).to(out.dtype)               # a head with nothing selected reads 0
    by_g: dict[int, list] = {}
    for row in rows:
        if row[2] not in in_place:
            by_g.setdefault(row[0], []).append(row)
    for g, mine in by_g.items():
        hs = [h for _, heads, _, _ in mine for h in heads]
        width = max(idx.shape[-1] for *_, idx in mine)
        indices = torch.cat([pad_indices(idx[:, None], width) for *_, idx in mine], dim=1)   # (B, R, K)
        res = sparse_decode(query[:, hs], key, value, indices, scaling=scaling,
                            attention_mask=heads_of(mask, hs), softcap=softcap, backend=executor,
                            kv_heads=torch.tensor([kv for _, _, kv, _ in mine], device=key.device))
        out[:, hs] = res.to(out.dtype)


def _collect_dense(dense_on_kv: dict, q_heads, kv_slice, num_heads: int, heads_per_kv: int) -> int:
    """Add a part's query heads to the cache heads they read whole (run together after the
    layer's sparse parts: one call per cache head, not per part); returns how many heads."""
    heads, kvs = _part_heads(q_heads, kv_slice, num_heads, heads_per_kv)
    for head, kv in zip(heads, kvs):
        dense_on_kv.setdefault(kv, []).append(head)
    return len(heads)


def _selection_mask(indices, n: int, mask):
    """bool (B, h, 1, n): True at each query head's selected positions (and where `mask`, (B, 1|h, 1, n), allows)."""
    B, h = indices.shape[:2]
    keep = torch.zeros(B, h, n + 1, dtype=torch.bool, device=indices.device)
    keep.scatter_(-1, torch.where(indices >= 0, indices, n), True)                  # -1 -> spare slot n
    keep = keep[..., :n].unsqueeze(2)
    return keep if mask is None else keep & mask


def _place(out, res, q_heads, query, value):
    """Put a part's output (its query heads, all of them when q_heads is None) into the layer's."""
    if q_heads is None:
        return res
    if out is None:
        out = query.new_empty(query.shape[0], query.shape[1], 1, value.shape[-1])
    out[:, q_heads] = res.to(out.dtype)
    return out


# --------------------------------------------------------------------------- entry point
def decode_attention(rt, module, query, key, value, mask, scaling, kwargs):
    """Return (B, Hq, 1, D) for a sparse decode step, or None to run the dense implementation.

    mask: None or bool (B, 1|Hq, 1, n), True = may attend (padding, sliding windows)."""
    B, Hq = query.shape[:2]
    Hkv, n = key.shape[1], key.shape[2]
    state = rt.decode_state
    published = rt.shared.get("selections")
    if published:
        published.pop(rt.layer_idx, None)     # a set lives for one step: this layer's is republished below
    all_dense = state.all_dense
    if all_dense is None:
        all_dense = state.all_dense = all(rule.kind == DENSE for rule, _ in rt.decode_groups)
    if n < rt.plan.decode.min_len or all_dense:
        state.sequence = None                 # the next sparse step must rebuild, whatever it sees
        # read whole, as prefill counts its dense layers: the measured density is the model's
        rt.stats.decode_selected += float(B * Hq * n)
        rt.stats.decode_total += float(B * Hq * n)
        return None
    layouts = _layer_layouts(rt, Hq, Hkv)
    softcap = kwargs.get("softcap") or None
    window = kwargs.get("sliding_window")
    masked = mask is not None or bool(window and n > window)
    # the executor and its dense threshold depend only on these; resolving them each step
    # costs more than the lookup (this function runs once per layer and token)
    signature = (rt.backend, rt.dense_above, query.device, query.dtype, key.dtype, value.dtype,
                 key.stride(-1), value.stride(-1), softcap is not None, masked)
    cached = state.executor
    if cached is None or cached[0] != signature:
        executor = resolve_decode_backend(rt.backend, query, key, value,
                                          needs=registry.needs(softcap=softcap is not None, masks=masked))
        cached = state.executor = (signature, executor,
                                   resolve_dense_above(rt.dense_above, executor, query, phase="decode")["decode"],
                                   registry.executor("decode", executor).kv_heads)
    executor, limit, takes_kv_heads = cached[1:]
    run_dense = _parts_over_limit(layouts, Hq, Hkv, n, limit) if limit < 1 else set()
    if all(rule.kind == DENSE or pi in run_dense for pi, (rule, *_) in enumerate(layouts)):
        # nothing left to select: the model's own attention runs the whole layer in one call
        state.sequence = None
        rt.stats.decode_selected += float(B * Hq * n)
        rt.stats.decode_total += float(B * Hq * n)
        return None
    if mask is None and window and n > window:
        # a window layer whose mask was skipped: the query (position n-1) sees the last `window` keys
        mask = torch.zeros(1, 1, 1, n, dtype=torch.bool, device=key.device)
        mask[..., n - window:] = True
    # a mask that hides a prefix of each row (left padding) is also given as per-row starts, which
    # the fused C calls take (only the cpu executor has them); one that hides nothing is dropped:
    # selectors take their cheaper path
    starts = visible_suffix_starts(mask, B) if executor == "cpu" else None
    if starts is not None:
        hides_nothing = not bool(starts.any())
    else:
        hides_nothing = mask is not None and bool(mask.all())
    if hides_nothing:
        mask = starts = None
    fresh = not _sequence_continues(state, key)
    group_states = state.groups
    if fresh:
        state.rebuilds += 1
        for gs in group_states.values():       # keep only the counters across sequences
            if gs is not None:
                gs.forget_sequence()

    out = None
    selected = 0.0
    dense_on_kv: dict[int, list[int]] = {}        # cache head -> query heads that read it whole
    # On executors that take kv_heads (the CPU ones), the sparse parts of a mixed layer are
    # attended in one call (one index list per query head, each reading its own cache head):
    # per-part calls cost ~0.3 ms each on a CPU, and a layer of a profiled plan has up to ~8 parts.
    sparse_parts = sum(rule.kind != DENSE and pi not in run_dense for pi, (rule, *_) in enumerate(layouts))
    merge = MERGE_PARTS and takes_kv_heads and sparse_parts >= 2
    pending = []                                   # (query heads, cache head per index row, (B, R, K))
    for pi, (rule, q_heads, kv_slice, per_head) in enumerate(layouts):
        whole_layer = q_heads is None
        q = query if whole_layer else query[:, q_heads]
        k = key if kv_slice is None else key[:, kv_slice]
        v = value if kv_slice is None else value[:, kv_slice]
        m = mask if whole_layer else heads_of(mask, q_heads)
        h = q.shape[1]
        if rule.kind == DENSE or pi in run_dense:
            selected += _collect_dense(dense_on_kv, q_heads, kv_slice, Hq, h // k.shape[1]) * B * n
            continue
        inp = GroupInputs(query=q[:, :, 0], key=k, valid=_valid_for(m, B, k.shape[1], per_head, h, n),
                          per_head=per_head, scaling=scaling, softcap=softcap, fresh=fresh, published=published,
                          first_kv=0 if kv_slice is None else kv_slice.start, starts=starts)
        selector = DECODE_SELECTORS[rule.kind]
        if pi not in group_states:
            group_states[pi] = selector.new_state()
        if selector.attends_whole_cache:
            started = rt.clock(q) if rt.timed else 0.0
            res, chosen = selector.attend(inp, rule, group_states[pi], v)
            if rt.timed:
                rt.stats.select_attend_s += rt.clock(q) - started
            if chosen is not None:
                published = rt.shared.setdefault("selections", {})
                published[rt.layer_idx] = (n, inp.first_kv, chosen)
            selected += B * h * n
            out = _place(out, res, q_heads, query, value)
            continue
        if executor == "cpu" and selector.select_and_attend_cpu is not None and (inp.valid is None
                                                                                or starts is not None):
            # selection and attention in one C call: no index tensors, no per-op overhead
            started = rt.clock(q) if rt.timed else 0.0
            fused = selector.select_and_attend_cpu(inp, rule, group_states[pi], v)
            if fused is not None:                  # None: the rule needs the select() path
                res, counts = fused
                if rt.timed:
                    rt.stats.select_attend_s += rt.clock(q) - started
                selected += float(sum(counts.view(-1).tolist())) * (h // counts.shape[1])   # no torch reduction op
                out = _place(out, res, q_heads, query, value)
                continue
        started = rt.clock(q) if rt.timed else 0.0
        indices = selector.select(inp, rule, group_states[pi])
        if rt.timed:
            rt.stats.select_s += rt.clock(q) - started
        if indices is None or (limit < 1 and indices.shape[-1] > limit * n
                               and selector.expected_rows(rule, n) is None):
            # nothing to select from, or a selection known only now to read more than dense_above
            selected += _collect_dense(dense_on_kv, q_heads, kv_slice, Hq, h // k.shape[1]) * B * n
            continue
        selected += float((indices >= 0).sum()) * (h // indices.shape[1])
        if merge:
            heads, kvs = _part_heads(q_heads, kv_slice, Hq, h // k.shape[1])
            pending.append((heads, kvs[::h // indices.shape[1]], indices))   # a shared row stays one row
            continue
        res = sparse_decode(q, k, v, indices, scaling=scaling, attention_mask=m, softcap=softcap,
                            backend=executor)
        out = _place(out, res, q_heads, query, value)

    if out is None and (pending or dense_on_kv):
        out = query.new_empty(B, Hq, 1, value.shape[-1])
    if pending:
        _attend_pending(out, pending, query, key, value, mask, scaling, softcap, executor)
    for kv, heads in dense_on_kv.items():
        out[:, heads] = grouped_dense_decode(query[:, heads], key[:, kv: kv + 1], value[:, kv: kv + 1],
                                             heads_of(mask, heads), scaling, softcap).to(out.dtype)

    _remember_sequence(state, key, continued=not fresh)
    rt.stats.decode_selected += selected
    rt.stats.decode_total += float(B * Hq * n)
    return out


# --------------------------------------------------------------------------- introspection
def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, GrowBuffer):
        return obj.nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if dataclasses.is_dataclass(obj):
        return sum(_tensor_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def decode_state_bytes(model, detail: bool = False):
    """Bytes held by the decode side state of a patched model (allocated, incl. growth headroom).

    detail=True returns {method: bytes} (plus "fingerprint" for the continuity rows)."""
    by_kind: dict[str, int] = {}
    for rt in iter_runtimes(model):
        state = rt.decode_state
        by_kind["fingerprint"] = by_kind.get("fingerprint", 0) + _tensor_bytes(state.sequence)
        layouts = (state.layouts or (None, []))[1]
        for pi, gs in state.groups.items():
            kind = layouts[pi][0].kind if pi < len(layouts) else "unknown"
            by_kind[kind] = by_kind.get(kind, 0) + _tensor_bytes(gs)
    return by_kind if detail else sum(by_kind.values())


def decode_counters(model) -> dict:
    """Totals over layers: full_scorings / reuses (token_select reuse decisions, one per batch
    row and index head) and rebuilds (sequence starts seen by each layer)."""
    total = {"full_scorings": 0, "reuses": 0, "rebuilds": 0}
    for rt in iter_runtimes(model):
        total["rebuilds"] += rt.decode_state.rebuilds
        for gs in rt.decode_state.groups.values():
            for key, value in getattr(gs, "counters", {}).items():
                total[key] = total.get(key, 0) + value
    return total


def reset_decode_state(model) -> None:
    """Forget all decode side state and counters (the next step of every layer rebuilds)."""
    for rt in iter_runtimes(model):
        rt.decode_state = DecodeState()
        rt.shared.pop("selections", None)


__all__ = ["decode_attention", "decode_counters", "decode_state_bytes", "reset_decode_state"]
