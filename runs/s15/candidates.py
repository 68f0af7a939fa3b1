"""Plan variants of configs/qwen2.5-0.5b.yaml probed at Qwen 16K in the fifteenth session.

    python runs/s15/candidates.py OUT_DIR      (the session wrote them to /tmp/s15)

q0, q6, q12, q18   the shipped prefill kept on six layers only (0-5, 6-11, 12-17, 18-23),
                   every other layer dense: which layers move a near-tied answer
S                  the shipped plan with each fixed vertical/slash budget b turned into
                   {frac: b / 8192, min: b} (its share at the profiled 8K)
C1                 S with layers 0-5 and 12-17 dense (the two quarters that moved the ties);
                   copied as runs/s15/qwen_c1_dense_0-5_12-17_scaled.yaml
The decode section is the shipped one in every variant.
"""
import sys

import yaml

sys.path.insert(0, "benchmarks")
from ruler_plan_halves import scale_fixed_budgets  # noqa: E402  (the tenth session's prefill_scaled)


def variant(out_dir, name, sparse_layers=None, dense_layers=(), scaled=False):
    plan = yaml.safe_load(open("configs/qwen2.5-0.5b.yaml"))
    layers = plan["prefill"]["layers"]
    plan["prefill"]["layers"] = {
        layer: heads for layer, heads in layers.items()
        if int(layer) not in dense_layers and (sparse_layers is None or int(layer) in sparse_layers)}
    if scaled:
        scale_fixed_budgets(plan["prefill"], int(plan["profile"]["seq_len"]))
    yaml.safe_dump(plan, open(f"{out_dir}/{name}.yaml", "w"), sort_keys=False)


if __name__ == "__main__":
    out = sys.argv[1]
    for first in range(0, 24, 6):
        variant(out, f"q{first}", sparse_layers=set(range(first, first + 6)))
    variant(out, "S", scaled=True)
    variant(out, "C1", dense_layers=set(range(0, 6)) | set(range(12, 18)), scaled=True)
