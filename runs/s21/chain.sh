#!/usr/bin/env bash
# Twenty-first session: rerun, with per-sample results, the RULER runs whose tables were only
# printed (their results.json files were lost with out/): the Qwen2.5-0.5B 8K a_shape and pooled
# block presets and the SmolLM2-135M 4K presets written from 1K (runs/s21/*.yaml; the pooled
# files are the block preset with `estimator: pooled`). Each core runs its half of the tasks
# (the split of runs/s16/resume.sh) for every job in turn, from the snapshot worktree that
# resume.sh uses; --resume makes a rerun of this script pick up where it stopped.
# Usage: [JOBS_FILE=runs/sNN/jobs.txt] bash runs/s21/chain.sh [a b]   Progress: python runs/s11/progress.py runs/ruler_*_{a,b}
# Merge, per job: sparse-infer eval merge DENSE:dense OUT_a OUT_b --common --out OUT_table
# Stop: pkill -f runs/s21/chain.sh; pkill -f 'sparse_infer.cli import main'   (the loop shells first:
# killing only the Python process lets its loop start the next job)
set -u
cd "$(dirname "$0")/../.."
SNAP=${SNAP:-/work/snap16}
[ -d "$SNAP/sparse_infer" ] || git worktree add -f --detach "$SNAP" HEAD
TASKS_a=niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multikey_2,niah_multikey_3
TASKS_b=niah_multivalue,niah_multiquery,vt,cwe,fwe
# model plan length out [samples per task, default 5]
LOGDIR=runs/s21
JOBS="qwen2.5-0.5b a_shape 8192 runs/ruler_qwen_8k_a_shape
smollm2-135m runs/s21/smol_vertical_slash_1k.yaml 4096 runs/ruler_smol_4k_vertical_slash_1k
smollm2-135m runs/s21/smol_a_shape_1k.yaml 4096 runs/ruler_smol_4k_a_shape_1k
smollm2-135m runs/s21/smol_block_1k.yaml 4096 runs/ruler_smol_4k_block_1k
smollm2-135m runs/s21/smol_block_pooled_1k.yaml 4096 runs/ruler_smol_4k_block_pooled_1k
qwen2.5-0.5b runs/s21/qwen_block_pooled.yaml 8192 runs/ruler_qwen_8k_block_pooled"
# JOBS_FILE (lines of the same fields, # comments) replaces the list; its runs log beside it
if [ -n "${JOBS_FILE:-}" ]; then
  JOBS=$(grep -v '^#' "$JOBS_FILE")
  LOGDIR=$(dirname "$JOBS_FILE")
fi
for part in ${*:-a b}; do
  core=$([ "$part" = a ] && echo 0 || echo 1)
  tasks_var=TASKS_$part
  (echo "$JOBS" | while read -r model plan length out samples; do
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH="$SNAP" taskset -c "$core" python -P -c \
      "import sys; sys.argv=['sparse-infer']+sys.argv[1:]; from sparse_infer.cli import main; main()" \
      eval ruler "$model" --plan "$plan" --lengths "$length" --tasks "${!tasks_var}" --samples "${samples:-5}" \
      --out "${out}_$part" --resume >> "$LOGDIR/chain_$part.log" 2>&1 < /dev/null
  done) > /dev/null 2>&1 &
done
echo "started; progress: python runs/s11/progress.py runs/ruler_*_{a,b}"
