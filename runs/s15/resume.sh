#!/usr/bin/env bash
# Restarts the fifteenth session's last job: dense in bfloat16 on the 43 Qwen 16K RULER samples
# outside the fragile twelve (runs/s15/bf16_fragile_{a,b} hold those), split over two pinned cores
# by the fp32 dense run's seconds per sample. With the fragile twelve it gives bf16 dense's whole
# 55-sample score against fp32 dense: how far a change of precision alone moves the 16K table.
# ruler_plan_halves.py resumes from each results.json, so a finished part costs only a model load.
# It runs from this checkout: do not edit sparse_infer/ or benchmarks/ while it runs.
# Logs: runs/s15/bf16_rest_{a,b}.log (not committed). Progress: python runs/s11/progress.py runs/s15/bf16_rest_*
set -u
cd "$(dirname "$0")/../.."
for part in a b; do
  core=$([ "$part" = a ] && echo 0 || echo 1)
  DTYPE=bfloat16 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nohup taskset -c "$core" \
    python benchmarks/ruler_plan_halves.py configs/qwen2.5-0.5b.yaml runs/ruler_qwen_16k_dense \
    "runs/s15/bf16_rest_$part" "$(cat "runs/s15/bf16_rest_$part.ids")" dense \
    >> "runs/s15/bf16_rest_$part.log" 2>&1 &
done
echo "started; progress: python runs/s11/progress.py runs/s15/bf16_rest_a runs/s15/bf16_rest_b"
