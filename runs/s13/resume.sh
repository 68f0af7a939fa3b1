#!/usr/bin/env bash
# Restarts the Qwen2.5-0.5B RULER matrix left for issue 3 after the thirteenth session (replaces
# runs/s12/resume.sh, which ran a_shape 16K after block on core 0): two chains,
# one pinned core each, from a snapshot worktree (edits in the checkout do not reach running jobs).
# Outputs live under runs/ and are committed as they grow; --resume skips finished samples, so a
# finished run costs only a model load. Logs: runs/s13/core{0,1}.log (not committed).
#   core 0: the vertical_slash and block presets at 16K
#   core 1: dense 8K -> the 16K-profiled plan (recall 0.97) at 8K -> the a_shape preset at 16K
#           -> the recall-0.98 profile at 16K (not a shipped plan or preset, so last)
# No run appears in both chains, so two chains never write one results.json.
# CHAINS=1 (or 0) restarts only that core's chain; WAIT0 / WAIT1 = a pid the chain waits for
# first (a job of the previous chain still running).
# Progress: python runs/s11/progress.py runs/ruler_*
set -u
cd "$(dirname "$0")/../.."
SNAP=${SNAP:-/work/snap12}
[ -d "$SNAP/sparse_infer" ] || git worktree add -f --detach "$SNAP" HEAD
PLAN097=runs/s11/qwen_profile_16k.yaml
PLAN098=runs/s12/qwen_profile_16k_r098.yaml
si() { OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH="$SNAP" python -P -c \
  "import sys; sys.argv=['sparse-infer']+sys.argv[1:]; from sparse_infer.cli import main; main()" "$@"; }
ruler() { si eval ruler qwen2.5-0.5b --plan "$1" --lengths "$2" --tasks all --samples 5 --out "$3" --resume; }
wait_for() { [ -n "${1:-}" ] && while kill -0 "$1" 2>/dev/null; do sleep 20; done; return 0; }
export SNAP
export -f si ruler wait_for
CHAINS=${CHAINS:-0 1}
[[ " $CHAINS " == *" 0 "* ]] && taskset -c 0 bash -c '
  wait_for "'"${WAIT0:-}"'"
  ruler vertical_slash 16384 runs/ruler_qwen_16k_vertical_slash
  ruler block 16384 runs/ruler_qwen_16k_block
' >> runs/s13/core0.log 2>&1 &
[[ " $CHAINS " == *" 1 "* ]] && taskset -c 1 bash -c '
  wait_for "'"${WAIT1:-}"'"
  ruler dense 8192 runs/ruler_qwen_8k_dense
  ruler '"$PLAN097"' 8192 runs/ruler_qwen_8k_profile16k
  ruler a_shape 16384 runs/ruler_qwen_16k_a_shape
  ruler '"$PLAN098"' 16384 runs/ruler_qwen_16k_profile16k_r098
' >> runs/s13/core1.log 2>&1 &
echo "started; progress: python runs/s11/progress.py runs/ruler_*"
