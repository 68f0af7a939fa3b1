"""The torch prefill executor's two softmax paths against dense SDPA, on synthetic indices.

    python benchmarks/executor_paths.py N HQ,HKV[,D] [OUT_JSON]
    python benchmarks/executor_paths.py 16384 14,2,64        # Qwen2.5-0.5B's attention shape

Per index (A-shape and random blocks shared per GQA group, random blocks per query head), the
median of 5 interleaved rounds of: dense causal SDPA, the executor with its fused path (SDPA over
the gathered tiles, masks as an additive bias) and with explicit scores (bmm, softmax, bmm).
Per-head indices always take the explicit path (the executor keeps the fused one for indices
shared by a GQA group), so their two columns time the same code.
"cost/density" is the executor's time over dense's, divided by the index density: the share of
dense's time one unit of density costs (1.0 would be as efficient per pair as SDPA itself). Its
inverse is the density above which the executor is slower than dense.
"""
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from sparse_infer.bench.attention import synthetic_index
from sparse_infer.kernels import torch_executor
from sparse_infer.kernels.index import index_density


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv):
    n = int(argv[0])
    shape = [int(x) for x in argv[1].split(",")]
    hq, hkv, head_dim = (*shape, 64) if len(shape) == 2 else shape
    out_json = argv[2] if len(argv) > 2 else None
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, n, head_dim, generator=g) for h in (hq, hkv, hkv))
    scaling = head_dim ** -0.5
    cases = [("a_shape, per group", synthetic_index("a_shape", 1, hkv, n, n, 64, 0.3)),
             ("random blocks, per group", synthetic_index("block_random", 1, hkv, n, n, 64, 0.3)),
             ("random blocks, per group", synthetic_index("block_random", 1, hkv, n, n, 64, 0.6)),
             ("random blocks, per head", synthetic_index("block_random", 1, hq, n, n, 64, 0.4))]

    def dense():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)

    def sparse(index, fused):
        previous = torch_executor.FUSED_SOFTMAX
        torch_executor.FUSED_SOFTMAX = fused
        try:
            torch_executor.block_sparse_attention_torch(q, k, v, index, scaling=scaling)
        finally:
            torch_executor.FUSED_SOFTMAX = previous

    rows = []
    print(f"n={n} Hq={hq} Hkv={hkv} D={head_dim}, {torch.get_num_threads()} threads")
    print(f"{'index':<26} {'density':>7} {'dense ms':>9} {'fused ms':>9} {'explicit ms':>11} "
          f"{'cost/density fused':>18} {'explicit':>9}")
    for name, index in cases:
        density = float(index_density(index, n, n))
        times = {"dense": [], "fused": [], "explicit": []}
        for _ in range(5):
            times["dense"].append(seconds(dense))
            times["fused"].append(seconds(lambda: sparse(index, True)))
            times["explicit"].append(seconds(lambda: sparse(index, False)))
        med = {key: statistics.median(values) for key, values in times.items()}
        row = {"index": name, "density": density, **{f"{key}_ms": 1e3 * value for key, value in med.items()},
               "cost_per_density_fused": med["fused"] / med["dense"] / density,
               "cost_per_density_explicit": med["explicit"] / med["dense"] / density}
        rows.append(row)
        print(f"{name:<26} {density:>7.3f} {row['dense_ms']:>9.0f} {row['fused_ms']:>9.0f} {row['explicit_ms']:>11.0f} "
              f"{row['cost_per_density_fused']:>18.2f} {row['cost_per_density_explicit']:>9.2f}", flush=True)
    if out_json:
        with open(out_json, "x") as f:             # never replaces an earlier run
            json.dump({"n": n, "hq": hq, "hkv": hkv, "head_dim": head_dim, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main(sys.argv[1:])
