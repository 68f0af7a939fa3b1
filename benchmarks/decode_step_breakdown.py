"""Where a decode step of Qwen2.5-0.5B goes: dense, no attention at all (the bound for any
decode method), and each method, over a synthetic cache (random K/V: timing only).

    N=32768 BATCH=1 CACHE=append python benchmarks/decode_step_breakdown.py [THREADS]
    METHODS=quest,qwen2.5-0.5b N=16384 python benchmarks/decode_step_breakdown.py 1   # a shipped plan too
    MODEL=smollm2-135m METHODS=smollm2-135m N=4096 python benchmarks/decode_step_breakdown.py 1
    METHODS=quest@torch,quest N=16384 python benchmarks/decode_step_breakdown.py 2    # NAME@BACKEND: patch's backend

Each configuration starts from a copy of the same cache and runs warm-up steps, then 6 timed
steps on a growing cache (the side state of each method is built once, then kept
incrementally, as in generation). Prints median and min ms per step. TIMED sets the number of
timed steps (default 6). A method's backend defaults to "auto" (the C decode kernel on CPUs).
DENSE_ABOVE sets patch's dense_above (default "auto").
"""
import os
import sys

import torch
from transformers import DynamicCache

from sparse_infer.bench.decode import method_or_plan, no_attention, split_backend, step_ms, synthetic_cache
from sparse_infer.bench.layer import parse_dense_above
from sparse_infer.bench.patching import patched
from sparse_infer.cache import AppendCache
from sparse_infer.models import load_model

N = int(os.environ.get("N", 16384))
BATCH = int(os.environ.get("BATCH", 1))
CACHE = os.environ.get("CACHE", "append")
# decode methods (one method for every head, budget 2048) or plan names (shipped plans, YAML)
METHODS = tuple(os.environ.get("METHODS", "quest,double_sparsity,token_select,streaming").split(","))


def main(threads: str = "2"):
    torch.set_num_threads(int(threads))
    model, _ = load_model(os.environ.get("MODEL", "qwen2.5-0.5b"))
    base = synthetic_cache(model.config, N, BATCH, AppendCache if CACHE == "append" else DynamicCache)

    def steps(name, warmup=3, timed=int(os.environ.get("TIMED", 6))):
        times = sorted(step_ms(model, base, BATCH, warmup, timed))
        print(f"{name:18s} median {times[len(times) // 2]:7.1f} ms  min {times[0]:7.1f} ms", flush=True)

    print(f"N={N} batch={BATCH} cache={CACHE} threads={threads}")
    steps("dense")
    with no_attention(model):
        steps("no attention")
    for spec in METHODS:
        method, backend = split_backend(spec)
        dense_above = parse_dense_above(os.environ.get("DENSE_ABOVE", "auto"))
        with patched(model, method_or_plan(method, 2048), backend=backend, dense_above=dense_above):
            steps(spec, warmup=2)


if __name__ == "__main__":
    main(*sys.argv[1:])
