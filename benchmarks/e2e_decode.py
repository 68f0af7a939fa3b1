"""End-to-end decode tokens/s of Qwen2.5-0.5B after a real prompt: dense vs Quest, Double
Sparsity and TokenSelect (budget 2048, layer 0 dense), per cache kind.

    python benchmarks/e2e_decode.py dynamic,append out/e2e_decode.json [PROMPT_LEN] [NEW_TOKENS]
    METHODS=quest,quest@torch,streaming python benchmarks/e2e_decode.py append out/e2e.json 16384 32

METHODS: decode methods (one for every layer but layer 0), NAME@BACKEND to pick patch's
backend for one of them (default "auto": on CPUs the C decode kernel). ROUNDS (default 3):
dense and every method decode once per round, in turn; tokens/s is the median over rounds.
"""
import os
import json
import sys

from sparse_infer.bench.decode import bench_decode_end_to_end, decode_method_plan, split_backend
from sparse_infer.models import load_model


def main(caches: str, out: str, prompt_len: str = "16384", new_tokens: str = "16"):
    pair = load_model("qwen2.5-0.5b")
    methods = os.environ.get("METHODS", "quest,double_sparsity,token_select").split(",")
    plans = {}
    for spec in methods:
        method, backend = split_backend(spec)
        plans[spec] = (decode_method_plan(method, 2048), backend)
    result = {}
    for cache in caches.split(","):
        result[cache] = bench_decode_end_to_end(pair, int(prompt_len), int(new_tokens), plans, cache=cache,
                                                rounds=int(os.environ.get("ROUNDS", 3)))
        for row in result[cache]["rows"]:
            print(cache, row, flush=True)
    with open(out, "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
