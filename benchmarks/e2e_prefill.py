"""End-to-end prefill of Qwen2.5-0.5B: dense vs presets / shipped plans, one forward each.

    python benchmarks/e2e_prefill.py LENGTHS PLANS OUT.json
    python benchmarks/e2e_prefill.py 32768 a_shape,qwen2.5-0.5b out/prefill32k.json

PLANS: preset names (a_shape, block, vertical_slash; built with min_seq_len 0), shipped plan
names or YAML paths (see sparse_infer.bench.prefill.named_plans).
"""
import json
import sys

from sparse_infer.bench.prefill import bench_prefill_end_to_end, named_plans
from sparse_infer.models import load_model


def main(lengths: str, plan_names: str, out: str, model_name: str = "qwen2.5-0.5b"):
    model, tok = load_model(model_name)
    plans = named_plans(plan_names.split(","), model.config)
    rows = bench_prefill_end_to_end(model, tok, [int(x) for x in lengths.split(",")], plans)
    for row in rows:
        print(row, flush=True)
    with open(out, "w") as fh:
        json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
