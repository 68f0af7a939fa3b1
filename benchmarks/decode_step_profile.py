"""cProfile of decode steps under a plan: where the time of a sparse decode step goes.

    MODEL=smollm2-135m N=8192 python benchmarks/decode_step_profile.py smollm2-135m
    MODEL=qwen2.5-0.5b N=16384 python benchmarks/decode_step_profile.py quest     # a method, every head

Synthetic cache (random K/V, timing only), 1 thread, 3 warm-up steps, then 6 profiled steps;
prints the 25 functions with the most time of their own (torch ops appear as built-ins).
"""
import cProfile
import os
import pstats
import sys

import torch

from sparse_infer.bench.decode import method_or_plan, synthetic_cache
from sparse_infer.bench.patching import patched
from sparse_infer.models import load_model


def main(plan: str) -> None:
    torch.set_num_threads(1)
    model, _ = load_model(os.environ.get("MODEL", "smollm2-135m"))
    cache = synthetic_cache(model.config, int(os.environ.get("N", 8192)))
    token = torch.full((1, 1), 100)
    # a method: every head, budget 2048
    with patched(model, method_or_plan(plan, 2048)), torch.no_grad():
        for _ in range(3):
            model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(6):
            model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)
        prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main(sys.argv[1])
