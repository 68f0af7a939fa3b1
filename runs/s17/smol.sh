#!/usr/bin/env bash
# Seventeenth session: reruns SmolLM2-135M at 8K (or LENGTH) on RULER (11 tasks x 5 samples) for dense,
# the vertical_slash preset and the two presets that missed the 1-point goal there (a_shape and
# block, both with their dense_tail), so that their rows in the paired table (runs/s16/paired_table.py) have per-sample results: the
# seventh-to-ninth sessions' runs were written under the lost out/ and only their printed tables
# survive (a_shape -2.5, block -2.7 against dense 19.1).
# One queue per pinned core, each run in its own directory, from a snapshot worktree (edits in the
# checkout do not reach them); --resume skips finished samples, so rerunning picks them up.
# SAMPLES (default 5) per task; a larger count on the same directories adds samples 5, 6, ...
# (--resume reuses the first ones: a prompt depends only on seed, task, length and index).
# LENGTH (default 8192) picks the prompt length; directories are runs/ruler_smol_{4k,8k}_PLAN.
# PLANS_A / PLANS_B: the plans each queue runs in turn (a preset or shipped plan name); empty: no queue.
# WAIT_A / WAIT_B: a pid the queue on core 0 / 1 waits for before starting (e.g. a job still running).
# Merge: sparse-infer eval merge runs/ruler_smol_8k_dense:dense runs/ruler_smol_8k_a_shape --common --out runs/ruler_smol_8k_a_shape_table
# Logs: runs/s17/*.log (not committed). Progress: python runs/s11/progress.py runs/ruler_smol_8k_*
set -u
cd "$(dirname "$0")/../.."
SNAP=${SNAP:-/work/snap16}
LENGTH=${LENGTH:-8192}
SAMPLES=${SAMPLES:-5}
TAG=$((LENGTH / 1024))k
[ -d "$SNAP/sparse_infer" ] || git worktree add -f --detach "$SNAP" HEAD
run_queue() {  # core, pid to wait for, plans...
  local core=$1 wait_pid=$2; shift 2
  while [ -n "$wait_pid" ] && kill -0 "$wait_pid" 2>/dev/null; do sleep 20; done
  for plan in "$@"; do
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH="$SNAP" taskset -c "$core" python -P -c \
      "import sys; sys.argv=['sparse-infer']+sys.argv[1:]; from sparse_infer.cli import main; main()" \
      eval ruler smollm2-135m --plan "$plan" --lengths "$LENGTH" --tasks all --samples "$SAMPLES" \
      --out "runs/ruler_smol_${TAG}_$plan" --resume >> "runs/s17/smol${TAG}_$plan.log" 2>&1
  done
}
PLANS_A=${PLANS_A-dense block}
PLANS_B=${PLANS_B-a_shape vertical_slash}
[ -n "$PLANS_A" ] && nohup bash -c "$(declare -f run_queue); cd '$PWD'; SNAP='$SNAP'; LENGTH=$LENGTH; SAMPLES=$SAMPLES; TAG=$TAG; run_queue 0 '${WAIT_A:-}' $PLANS_A" >/dev/null 2>&1 &
[ -n "$PLANS_B" ] && nohup bash -c "$(declare -f run_queue); cd '$PWD'; SNAP='$SNAP'; LENGTH=$LENGTH; SAMPLES=$SAMPLES; TAG=$TAG; run_queue 1 '${WAIT_B:-}' $PLANS_B" >/dev/null 2>&1 &
echo "queued; progress: python runs/s11/progress.py runs/ruler_smol_${TAG}_*"
