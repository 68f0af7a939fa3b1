"""Micro-benchmarks of the attention executors against dense SDPA.

Functions return plain dict rows (no printing); the CLI renders them.
Synthetic index sets stand in for real patterns so the executors can be timed
in isolation at controlled densities.
"""

import math
import statistics

import torch
import torch.nn.functional as F

from sparse_infer.kernels.index import BlockSparseIndex, index_density, num_query_blocks
from sparse_infer.kernels.torch_executor import block_sparse_attention_torch
from sparse_infer.kernels.triton_executor import block_sparse_attention_triton, triton_available
from sparse_infer.bench.layer import StandInAttention, decode_counters, layer_runtime
from sparse_infer.bench.timing import time_once_ms
from sparse_infer.kernels.sparse_decode import sparse_decode_torch, sparse_decode_triton
from sparse_infer.methods import DECODE_SELECTORS

__all__ = [
    "synthetic_a_shape_index",
    "block_random_index",
    "synthetic_index",
    "naive_gather_attention",
    "bench_prefill_attention",
    "bench_decode_attention",
    "bench_decode_methods",
]


# --------------------------------------------------------------------------
# synthetic index sets
# --------------------------------------------------------------------------


def synthetic_a_shape_index(batch, heads, q_len, kv_len, block_size, window_blocks, sink_blocks=1, device="cpu"):
    """Sink blocks + a local window of `window_blocks` blocks ending at the diagonal."""
    nqb = num_query_blocks(q_len, kv_len, block_size)
    qb0 = (kv_len - q_len) // block_size
    diag = qb0 + torch.arange(nqb, device=device).view(nqb, 1)
    local = diag - torch.arange(window_blocks - 1, -1, -1, device=device).view(1, -1)
    local = torch.where(local >= 0, local, torch.full_like(local, -1))
    first_local = local.clamp(min=0)[:, :1] if window_blocks else diag + 1
    sink = torch.arange(sink_blocks, device=device).view(1, -1).expand(nqb, sink_blocks)
    sink = torch.where(sink < first_local, sink, torch.full_like(sink, -1))  # no duplicates
    blocks = torch.cat([sink, local], dim=1)
    # ascending with -1 slots last
    big = 1 << 40
    blocks = torch.where(blocks >= 0, blocks, torch.full_like(blocks, big)).sort(-1).values
    blocks = torch.where(blocks == big, torch.full_like(blocks, -1), blocks)
    kv_blocks = blocks.view(1, 1, nqb, -1).expand(batch, heads, nqb, blocks.shape[-1]).contiguous()
    return BlockSparseIndex(block_size, kv_blocks, None)


def block_random_index(batch, heads, q_len, kv_len, block_size, density, sink_blocks=1, seed=0, device="cpu"):
    """Per query block: sink + diagonal + random earlier blocks, about `density` of the causal blocks."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    nqb = num_query_blocks(q_len, kv_len, block_size)
    nkb = -(-kv_len // block_size)
    qb0 = (kv_len - q_len) // block_size
    diag = (qb0 + torch.arange(nqb)).view(1, 1, nqb, 1)
    blk = torch.arange(nkb).view(1, 1, 1, nkb)
    want = torch.clamp(torch.round(density * (diag + 1).float()).long(), min=1)  # incl. diag
    r = torch.rand(batch, heads, nqb, nkb, generator=g)
    r = torch.where(blk < sink_blocks, torch.full_like(r, -1.0), r)        # sinks first
    r = torch.where(blk >= diag, torch.full_like(r, 2.0), r)               # only strictly-causal blocks
    order = r.argsort(dim=-1)
    kmax = int(want.max())
    pick = order[..., : max(kmax - 1, 0)]
    keep = (torch.arange(pick.shape[-1]).view(1, 1, 1, -1) < (want - 1)) & (pick < diag)
    pick = torch.where(keep, pick, torch.full_like(pick, -1))
    blocks = torch.cat([pick, diag.expand(batch, heads, nqb, 1)], dim=-1)
    big = 1 << 40
    blocks = torch.where(blocks >= 0, blocks, torch.full_like(blocks, big)).sort(-1).values
    blocks = torch.where(blocks == big, torch.full_like(blocks, -1), blocks)
    used = int((blocks >= 0).sum(-1).max())
    return BlockSparseIndex(block_size, blocks[..., :used].contiguous().to(device), None)


def synthetic_index(pattern, batch, heads, q_len, kv_len, block_size, density, seed=0, device="cpu"):
    """Index of the given pattern whose measured density is close to `density`."""
    if pattern == "block_random":
        return block_random_index(batch, heads, q_len, kv_len, block_size, density, seed=seed, device=device)
    if pattern != "a_shape":
        raise ValueError(f"unknown pattern {pattern!r}")
    nkb = -(-kv_len // block_size)
    lo, hi = 1, nkb
    while lo < hi:  # smallest window reaching the target density
        mid = (lo + hi) // 2
        d = index_density(synthetic_a_shape_index(1, 1, q_len, kv_len, block_size, mid), q_len, kv_len)
        if d < density:
            lo = mid + 1
        else:
            hi = mid
    if lo > 1:  # take whichever neighbouring window is closer to the target
        below = index_density(synthetic_a_shape_index(1, 1, q_len, kv_len, block_size, lo - 1), q_len, kv_len)
        above = index_density(synthetic_a_shape_index(1, 1, q_len, kv_len, block_size, lo), q_len, kv_len)
        if density - below < above - density:
            lo -= 1
    return synthetic_a_shape_index(batch, heads, q_len, kv_len, block_size, lo, device=device)


# --------------------------------------------------------------------------
# naive gather baseline (what the batched executor has to beat)
# --------------------------------------------------------------------------


def naive_gather_attention(query, key, value, index: BlockSparseIndex, *, scaling):
    """Straightforward gather: a Python loop over (batch, query head, query block),
    gathering that block list per head and building the mask with full-size
    comparisons. Causal only, no columns. For benchmarking, not for use."""
    B, Hq, q_len, D = query.shape
    Hkv, n = key.shape[1], key.shape[2]
    bs = index.block_size
    Hi = index.kv_blocks.shape[1]
    q0 = n - q_len
    qb0 = q0 // bs
    out = torch.zeros(B, Hq, q_len, D, dtype=torch.float32, device=query.device)
    for b in range(B):
        for h in range(Hq):
            hi = h * Hi // Hq
            kvh = h * Hkv // Hq
            for j in range(index.kv_blocks.shape[2]):
                r0 = max((qb0 + j) * bs, q0)
                r1 = min((qb0 + j + 1) * bs, n)
                blocks = index.kv_blocks[b, hi, j]
                blocks = blocks[blocks >= 0]
                kpos = (blocks[:, None] * bs + torch.arange(bs, device=blocks.device)).reshape(-1)
                kpos = kpos[kpos < n]
                qv = query[b, h, r0 - q0:r1 - q0].float()
                s = qv @ key[b, kvh, kpos].float().T * scaling
                s = s.masked_fill(kpos[None, :] > torch.arange(r0, r1, device=kpos.device)[:, None], float("-inf"))
                out[b, h, r0 - q0:r1 - q0] = torch.softmax(s, -1).nan_to_num(0.0) @ value[b, kvh, kpos].float()
    return out.to(query.dtype)


# --------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------


def _reduce(times, stat):
    return min(times) if stat == "min" else statistics.median(times)


def _time_interleaved(fns, repeats, warmup, device, stat):
    """Time several callables round-robin (fn1, fn2, ..., fn1, fn2, ...).

    Interleaving keeps the comparison fair when the machine's load drifts
    (shared CPUs); `stat` = "min" (robust to other load) or "median".
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for t, fn in zip(times, fns):
            t.append(time_once_ms(fn, device))
    return [_reduce(t, stat) for t in times]


def bench_prefill_attention(lengths=(4096, 8192, 16384), heads=(32, 8), head_dim=128,
                            densities=(0.1, 0.15), patterns=("a_shape", "block_random"),
                            block_size=64, batch=1, repeats=3, warmup=1, dtype=torch.float32,
                            device="cpu", include_naive=False, stat="min", seed=0):
    """Dense causal SDPA vs the block-sparse executors (full prefill, q == n).

    heads = (Hq, Hkv); indices are shared per GQA group (Hi = Hkv). For each
    length, dense and every sparse variant are timed round-robin `repeats`
    times after `warmup` calls. Returns rows {n, pattern, density,
    target_density, backend, dense_ms, sparse_ms, ratio, ...}; density is the
    measured causal-pair density (index_density).
    """
    Hq, Hkv = heads
    scaling = 1.0 / math.sqrt(head_dim)
    backends = ["torch"]
    if torch.device(device).type == "cuda" and triton_available():
        backends.append("triton")
    if include_naive:
        backends.append("naive_gather")
    rows = []
    g = torch.Generator(device="cpu").manual_seed(seed)
    for n in lengths:
        q = torch.randn(batch, Hq, n, head_dim, generator=g).to(device=device, dtype=dtype)
        k = torch.randn(batch, Hkv, n, head_dim, generator=g).to(device=device, dtype=dtype)
        v = torch.randn(batch, Hkv, n, head_dim, generator=g).to(device=device, dtype=dtype)
        configs = []
        for pattern in patterns:
            for target in densities:
                index = synthetic_index(pattern, batch, Hkv, n, n, block_size, target, seed=seed, device=device)
                for backend in backends:
                    configs.append((pattern, target, index_density(index, n, n), backend, index))

        executors = {"torch": block_sparse_attention_torch, "triton": block_sparse_attention_triton,
                     "naive_gather": naive_gather_attention}
        # default arguments bind this iteration's tensors
        fns = [lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)]
        fns += [lambda q=q, k=k, v=v, f=executors[backend], index=index: f(q, k, v, index, scaling=scaling)
                for _, _, _, backend, index in configs]
        times = _time_interleaved(fns, repeats, warmup, device, stat)
        dense_ms = times[0]
        for (pattern, target, density, backend, _), sparse_ms in zip(configs, times[1:]):
            rows.append({
                "n": n, "pattern": pattern, "density": density, "target_density": target,
                "backend": backend, "dense_ms": dense_ms, "sparse_ms": sparse_ms,
                "ratio": dense_ms / sparse_ms, "heads": f"{Hq}/{Hkv}", "head_dim": head_dim,
                "block_size": block_size, "dtype": str(dtype).replace("torch.", ""),
                "device": str(device), "threads": torch.get_num_threads(), "stat": stat,
            })
    return rows


def _dense_decode_grouped(q, k, v, scaling):
    """Dense decode reading K/V once per GQA group (no repeat_kv): the
    memory-bound floor a dense CPU decode can reach."""
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, Hq // Hkv, D).float() * scaling
    p = torch.softmax(torch.matmul(qg, k.float().transpose(-1, -2)), dim=-1)
    return torch.matmul(p, v.float()).reshape(B, Hq, 1, D).to(q.dtype)


def bench_decode_attention(kv_lens=(16384, 32768, 65536), budget=2048, heads=(32, 8), head_dim=128,
                           batch=1, repeats=20, warmup=3, dtype=torch.float32, device="cpu", stat="min",
                           seed=0):
    """Dense decode (one query over the whole cache) vs the gather executor.

    Returns rows {kv_len, budget, backend, dense_ms, dense_grouped_ms,
    sparse_ms, ratio, ratio_grouped, dense_kv_bytes, sparse_kv_bytes}.
    dense_ms is SDPA (what transformers runs); dense_grouped_ms is a grouped
    matmul that reads K/V once per group, the fairer memory-bound baseline.
    Bytes are K/V bytes read per decode step (sparse includes the int64 indices).
    """
    Hq, Hkv = heads
    scaling = 1.0 / math.sqrt(head_dim)
    elem = torch.empty((), dtype=dtype).element_size()
    from sparse_infer.kernels.cpu_decode import cpu_kernel_supports, sparse_decode_cpu

    backends = ["torch"]
    if torch.device(device).type == "cuda" and triton_available():
        backends.append("triton")
    probe = torch.empty(1, 1, 1, head_dim, dtype=dtype, device=device)
    if cpu_kernel_supports(probe, probe, probe):
        backends.append("cpu")                          # the C kernel: rows read in place
    executors = {"torch": sparse_decode_torch, "triton": sparse_decode_triton, "cpu": sparse_decode_cpu}
    rows = []
    g = torch.Generator(device="cpu").manual_seed(seed)
    for n in kv_lens:
        q = torch.randn(batch, Hq, 1, head_dim, generator=g).to(device=device, dtype=dtype)
        k = torch.randn(batch, Hkv, n, head_dim, generator=g).to(device=device, dtype=dtype)
        v = torch.randn(batch, Hkv, n, head_dim, generator=g).to(device=device, dtype=dtype)
        kb = min(budget, n)
        idx = torch.stack([torch.randperm(n, generator=g)[:kb] for _ in range(batch * Hkv)])
        idx = idx.view(batch, Hkv, kb).to(device)
        dense_bytes = 2 * batch * Hkv * n * head_dim * elem
        sparse_bytes = 2 * batch * Hkv * kb * head_dim * elem + idx.numel() * idx.element_size()
        # default arguments bind this iteration's tensors
        fns = [lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
               lambda q=q, k=k, v=v: _dense_decode_grouped(q, k, v, scaling)]
        for backend in backends:
            fn = executors[backend]
            fns.append(lambda fn=fn, q=q, k=k, v=v, idx=idx: fn(q, k, v, idx, scaling=scaling))
        times = _time_interleaved(fns, repeats, warmup, device, stat)
        dense_ms, grouped_ms = times[0], times[1]
        for backend, sparse_ms in zip(backends, times[2:]):
            rows.append({
                "kv_len": n, "budget": kb, "backend": backend, "dense_ms": dense_ms,
                "dense_grouped_ms": grouped_ms, "sparse_ms": sparse_ms, "ratio": dense_ms / sparse_ms,
                "ratio_grouped": grouped_ms / sparse_ms, "dense_kv_bytes": dense_bytes,
                "sparse_kv_bytes": sparse_bytes,
                "heads": f"{Hq}/{Hkv}", "head_dim": head_dim, "dtype": str(dtype).replace("torch.", ""),
                "device": str(device), "threads": torch.get_num_threads(), "stat": stat,
            })
    return rows


# --------------------------------------------------------------------------
# per-method decode (selectors + gather executor, with their side state)
# --------------------------------------------------------------------------


QUERY_DRIFT = 0.3     # how far each decode query moves from the last (see _drifting_queries)


def bench_cases(budget: int) -> dict:
    """{label: (selector name, BenchCase)} of every registered selector's bench_cases at a token
    budget, in registration order."""
    cases = {}
    for selector in DECODE_SELECTORS.values():
        for case in selector.bench_cases(budget):
            if case.label in cases:
                raise ValueError(f"decode bench case {case.label!r} is given by {cases[case.label][0]!r} "
                                 f"and {selector.name!r}")
            cases[case.label] = (selector.name, case)
    return cases


def _case_plan(method, params):
    """One-layer plan dict for a decode rule (min_kv_len 0)."""
    return {"sparse_infer_plan": 1, "decode": {"min_kv_len": 0, "default": {"method": method, **params}}}


def _drifting_queries(steps, batch, heads, head_dim, generator, drift=QUERY_DRIFT):
    """q_t = normalize(q_{t-1} + drift * noise), per head, norm sqrt(head_dim) (unit element scale),
    so consecutive queries have cosine ~ 1 / sqrt(1 + drift^2) (~0.96 for drift 0.3)."""
    def norm(x):
        return x / x.norm(dim=-1, keepdim=True) * math.sqrt(head_dim)
    q = norm(torch.randn(batch, heads, 1, head_dim, generator=generator))
    out = [q]
    for _ in range(steps - 1):
        q = norm(q + drift * torch.randn(q.shape, generator=generator))
        out.append(q)
    return out


def bench_decode_methods(kv_lens=(16384, 32768, 65536), budget=2048, heads=(32, 8), head_dim=128,
                         methods=None, repeats=5, dtype=torch.float32, device="cpu", seed=0):
    """Dense SDPA vs `decode_attention` per decode method, on a cache that grows one key per step.

    methods: labels of the registered selectors' bench cases (DecodeSelector.bench_cases: each
    selector's rule reading about `budget` tokens, e.g. token_select and token_select_reuse, i.e.
    token_select with reuse threshold 0.9); None runs every case, in registration order.
    For each kv length n: synthetic K/V (1, Hkv, n + repeats, D); step t (t = 0..repeats) sees the
    first n + t keys (a fresh contiguous tensor per step, as DynamicCache's cat produces) and a
    query drifting slowly (see _drifting_queries). Step 0 is a warm-up that builds the method's
    side state from the full K (Quest page bounds, Double Sparsity label cache, TokenSelect's last
    selection); steps 1..repeats continue the sequence, so the incremental paths run as in
    generation. Each step times dense SDPA (enable_gqa) then the method; times are means over
    the `repeats` steps (a mean, so reuse's occasional full scorings are amortised).

    bytes_read: K/V bytes per step, incl. the method's scoring data, averaged over the timed steps,
    from each selector's DecodeSelector.bytes_read model (e.g. token_select: all of K on the steps
    that score + selected V; quest: page bounds + selected K and V). The selected count is
    measured (sink + local + budget for the top-k methods). Index bytes are not counted.
    dense_bytes = all of K and V (at the mean length of the timed steps). reuse_rate: for a
    method whose side state counts reuses and full scorings, the share of reuses.
    """
    from sparse_infer.decode import decode_attention
    from sparse_infer.plan import plan_from_dict

    cases = bench_cases(budget)
    if methods is None:
        methods = tuple(cases)
    unknown = [m for m in methods if m not in cases]
    if unknown:
        raise ValueError(f"unknown decode bench case(s) {', '.join(unknown)}; registered: {', '.join(cases)}")
    Hq, Hkv = heads
    batch = 1
    scaling = 1.0 / math.sqrt(head_dim)
    elem = torch.empty((), dtype=dtype).element_size()
    module = StandInAttention(0)
    rows = []
    for n in kv_lens:
        g = torch.Generator(device="cpu").manual_seed(seed)
        total = n + repeats
        k_all = torch.randn(batch, Hkv, total, head_dim, generator=g).to(device=device, dtype=dtype)
        v_all = torch.randn(batch, Hkv, total, head_dim, generator=g).to(device=device, dtype=dtype)
        queries = [q.to(device=device, dtype=dtype)
                   for q in _drifting_queries(repeats + 1, batch, Hq, head_dim, g)]
        for method in methods:
            name, case = cases[method]
            selector = DECODE_SELECTORS[name]
            plan = plan_from_dict(_case_plan(name, case.params))
            rt = layer_runtime(plan, 0, Hq, Hkv)
            rule = rt.decode_groups[0][0]
            dense_t, sparse_t, bytes_read, selected_tokens = [], [], [], []
            reuses = scorings = 0
            for step in range(repeats + 1):
                m = n + step
                k = k_all[:, :, :m].contiguous()
                v = v_all[:, :, :m].contiguous()
                q = queries[step]
                counters_before = decode_counters(rt)
                selected_before = rt.stats.decode_selected
                d_ms = time_once_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), device)
                s_ms = time_once_ms(lambda: decode_attention(rt, module, q, k, v, None, scaling, {}), device)
                if step == 0:
                    continue  # warm-up: builds the side state from the full K
                dense_t.append(d_ms)
                sparse_t.append(s_ms)
                kv_rows = (rt.stats.decode_selected - selected_before) * Hkv / Hq   # per kv head row
                selected_tokens.append(kv_rows / (batch * Hkv))
                counters = decode_counters(rt)
                grown = {key: value - counters_before.get(key, 0) for key, value in counters.items()}
                reuses += grown.get("reuses", 0)
                scorings += grown.get("full_scorings", 0)
                bytes_read.append(selector.bytes_read(rule, m, kv_rows, cache_heads=batch * Hkv, head_dim=head_dim,
                                                      elem_size=elem, counters=grown))
            dense_ms = statistics.mean(dense_t)
            sparse_ms = statistics.mean(sparse_t)
            row = {
                "kv_len": n, "method": method, "dense_ms": dense_ms, "sparse_ms": sparse_ms,
                "ratio": dense_ms / sparse_ms, "bytes_read": int(statistics.mean(bytes_read)),
                "dense_bytes": 2 * batch * Hkv * (n + (repeats + 1) // 2) * head_dim * elem,
                "selected": round(statistics.mean(selected_tokens), 1),
                "reuse_rate": reuses / (reuses + scorings) if reuses + scorings else None,
                "budget": budget, "steps": repeats,
                # a variant's note says what it changes; the query drift is what a reuse rate depends on
                "note": f"{case.note}, q drift {QUERY_DRIFT}" if case.note else "",
                "heads": f"{Hq}/{Hkv}", "head_dim": head_dim, "dtype": str(dtype).replace("torch.", ""),
                "device": str(device), "threads": torch.get_num_threads(), "stat": "mean",
            }
            rows.append(row)
    return rows
