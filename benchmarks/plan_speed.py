"""Prefill seconds and decode ms/token of a built-in model, dense vs a plan, through generate.

    python benchmarks/plan_speed.py smollm2-135m smollm2-135m 4096,8192 [append]

Prefill = generate with 1 new token; decode = (generate with 33 tokens - that) / 32.
"""
import sys
import time

import torch

import sparse_infer
from sparse_infer.bench.patching import patched
from sparse_infer.bench.prefill import synthetic_prompt_ids


def main(model_name: str, plan: str, lengths: str, cache: str = "dynamic"):
    model, tok = sparse_infer.load_model(model_name)
    for n in (int(x) for x in lengths.split(",")):
        ids = synthetic_prompt_ids(tok, n)
        for name in (None, plan):

            def run(new):
                extra = {"cache": sparse_infer.AppendCache(config=model.config)} if cache == "append" else {}
                t0 = time.perf_counter()
                with torch.no_grad():
                    model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, **extra)
                return time.perf_counter() - t0

            with patched(model, name):
                first, total = run(1), run(33)
            print(f"n={n} plan={name or 'dense'} prefill {first:.2f} s  decode {(total - first) / 32 * 1e3:.1f} ms/token",
                  flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
