"""End-to-end prefill of Qwen2.5-0.5B: dense vs presets / shipped plans, one forward each.

    python benchmarks/e2e_prefill.py LENGTHS PLANS OUT.json
    python benchmarks/e2e_prefill.py 32768 a_shape,qwen2.5-0.5b out/prefill32k.json

PLANS: preset names (a_shape, block, vertical_slash; built with min_seq_len 0) or anything
load_plan accepts (a shipped plan name, a YAML path).
"""
import json
import sys

from sparse_infer.bench.prefill import bench_prefill_end_to_end
from sparse_infer.models import load_model
from sparse_infer.plan import load_plan, preset

PRESETS = ("a_shape", "block", "vertical_slash")


def main(lengths: str, plan_names: str, out: str, model_name: str = "qwen2.5-0.5b"):
    model, tok = load_model(model_name)
    plans = {name: preset(name, model.config, min_seq_len=0) if name in PRESETS else load_plan(name, model.config)
             for name in plan_names.split(",")}
    rows = bench_prefill_end_to_end(model, tok, [int(x) for x in lengths.split(",")], plans)
    for row in rows:
        print(row, flush=True)
    with open(out, "w") as fh:
        json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
