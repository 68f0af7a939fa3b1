"""Decode attention of one Qwen2.5-0.5B-shaped layer (14 query / 2 kv heads, D 64) over a
synthetic cache: dense SDPA vs a plan's rules for that layer, per step, cache growing by one.

    python benchmarks/decode_layer.py 16384 qwen2.5-0.5b 5 [profile]
    python benchmarks/decode_layer.py 16384 quest 1            # one method for every head, budget 2048

PLAN: a decode method name (quest, double_sparsity, token_select, streaming) or a plan name /
YAML. DENSE_ABOVE=1 runs every rule as written (default "auto", as patch: heads whose selections
could not read less than dense attention run dense, and a layer left with nothing to select says so). Prints ms per step (mean of 40 steps after 2 warm-up steps); `profile` adds a torch
profiler table of 10 more steps.
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

from sparse_infer.bench.decode import method_or_plan
from sparse_infer.bench.layer import StandInAttention, layer_runtime, parse_dense_above, qwen2_5_0_5b_shape
from sparse_infer.decode import decode_attention
from sparse_infer.plan import load_plan

SHAPE = qwen2_5_0_5b_shape()
HEADS, KV_HEADS, HEAD_DIM = SHAPE.num_attention_heads, SHAPE.num_key_value_heads, SHAPE.head_dim


def main(length: str, plan_name: str, layer: str, profile: str = ""):
    torch.set_num_threads(1)
    n, layer_idx = int(length), int(layer)
    plan = load_plan(method_or_plan(plan_name, 2048))
    g = torch.Generator().manual_seed(0)
    key = torch.randn(1, KV_HEADS, n + 64, HEAD_DIM, generator=g)
    value = torch.randn(1, KV_HEADS, n + 64, HEAD_DIM, generator=g)
    query = torch.randn(1, HEADS, 1, HEAD_DIM, generator=g)
    rt = layer_runtime(plan, layer_idx, HEADS, KV_HEADS, backend="torch",
                       dense_above=parse_dense_above(os.environ.get("DENSE_ABOVE", "auto")))
    module, scaling = StandInAttention(layer_idx), HEAD_DIM ** -0.5

    def sparse(i):
        out = decode_attention(rt, module, query, key[:, :, : n + i], value[:, :, : n + i], None, scaling, {})
        if out is None:
            raise SystemExit(f"layer {layer_idx} of {plan_name} decodes dense at {n} tokens")

    def dense(i):
        F.scaled_dot_product_attention(query, key[:, :, : n + i], value[:, :, : n + i], scale=scaling, enable_gqa=True)

    for name, step in (("dense", dense), (plan_name, sparse)):
        step(0)
        step(1)
        t0 = time.perf_counter()
        for i in range(2, 42):
            step(i)
        print(f"{name}: {(time.perf_counter() - t0) / 40 * 1e3:.3f} ms/step", flush=True)
    if profile:
        with torch.profiler.profile() as prof:
            for i in range(42, 52):
                sparse(i)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main(*sys.argv[1:])
