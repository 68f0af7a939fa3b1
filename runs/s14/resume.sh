#!/usr/bin/env bash
# Restarts the Qwen2.5-0.5B RULER runs left for issue 3 after the thirteenth session (replaces
# runs/s13/resume.sh): two chains, one pinned core each, from a snapshot worktree (edits in the
# checkout do not reach running jobs). Outputs live under runs/ and are committed as they grow;
# --resume skips finished samples, so a finished run costs only a model load.
# Logs: runs/s14/core{0,1}.log (not committed).
#   core 0: the block preset at 16K on the first nine tasks (runs/ruler_qwen_16k_block), then on
#           fwe (runs/ruler_qwen_16k_block_fwe)
#   core 1: the a_shape preset at 16K, then the block preset at 16K on cwe
#           (runs/ruler_qwen_16k_block_cwe)
# Each block job has a directory of its own, so two jobs never write one results.json;
# eval merge joins the three. The split balances the two cores (cwe and fwe are the slowest
# tasks). The recall-0.98 profile at 16K, neither shipped nor a preset, is dropped from the queue.
# CHAINS=1 (or 0) restarts only that core's chain; WAIT0 / WAIT1 = a pid the chain waits for
# first (a job of the previous chain still running).
# Progress: python runs/s11/progress.py runs/ruler_*
set -u
cd "$(dirname "$0")/../.."
SNAP=${SNAP:-/work/snap12}
[ -d "$SNAP/sparse_infer" ] || git worktree add -f --detach "$SNAP" HEAD
FIRST9=niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multikey_2,niah_multikey_3,niah_multivalue,niah_multiquery,vt
si() { OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH="$SNAP" python -P -c \
  "import sys; sys.argv=['sparse-infer']+sys.argv[1:]; from sparse_infer.cli import main; main()" "$@"; }
ruler() { si eval ruler qwen2.5-0.5b --plan "$1" --lengths "$2" --tasks "$4" --samples 5 --out "$3" --resume; }
wait_for() { [ -n "${1:-}" ] && while kill -0 "$1" 2>/dev/null; do sleep 20; done; return 0; }
export SNAP
export -f si ruler wait_for
CHAINS=${CHAINS:-0 1}
[[ " $CHAINS " == *" 0 "* ]] && taskset -c 0 bash -c '
  wait_for "'"${WAIT0:-}"'"
  ruler block 16384 runs/ruler_qwen_16k_block '"$FIRST9"'
  ruler block 16384 runs/ruler_qwen_16k_block_fwe fwe
' >> runs/s14/core0.log 2>&1 &
[[ " $CHAINS " == *" 1 "* ]] && taskset -c 1 bash -c '
  wait_for "'"${WAIT1:-}"'"
  ruler a_shape 16384 runs/ruler_qwen_16k_a_shape all
  ruler block 16384 runs/ruler_qwen_16k_block_cwe cwe
' >> runs/s14/core1.log 2>&1 &
echo "started; progress: python runs/s11/progress.py runs/ruler_*"
