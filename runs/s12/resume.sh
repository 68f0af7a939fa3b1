#!/usr/bin/env bash
# Restarts the Qwen2.5-0.5B RULER matrix left for issue 3 after the twelfth session: two chains,
# one pinned core each, from a snapshot worktree of HEAD (edits in the checkout do not reach
# running jobs). Outputs live under runs/ and are committed as they grow; --resume skips finished
# samples, so a finished run costs only a model load. Logs: runs/s12/core{0,1}.log (not committed).
#   core 0: the three presets at 16K: vertical_slash -> block -> a_shape
#   core 1: dense 8K -> the 16K-profiled plan (recall 0.97) at 8K -> the recall-0.98 profile at 16K
#           (runs/s12/qwen_profile_16k_r098.yaml; its teacher-forced margin probe says it too loses
#           niah_multikey_3/16384/0, so it comes last)
# CHAINS=1 (or 0) restarts only that core's chain. Progress: python runs/s11/progress.py runs/ruler_*
set -u
cd "$(dirname "$0")/../.."
SNAP=${SNAP:-/work/snap12}
[ -d "$SNAP/sparse_infer" ] || git worktree add -f --detach "$SNAP" HEAD
PLAN097=runs/s11/qwen_profile_16k.yaml
PLAN098=runs/s12/qwen_profile_16k_r098.yaml
si() { OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH="$SNAP" python -P -c \
  "import sys; sys.argv=['sparse-infer']+sys.argv[1:]; from sparse_infer.cli import main; main()" "$@"; }
ruler() { si eval ruler qwen2.5-0.5b --plan "$1" --lengths "$2" --tasks all --samples 5 --out "$3" --resume; }
export SNAP
export -f si ruler
CHAINS=${CHAINS:-0 1}
[[ " $CHAINS " == *" 0 "* ]] && taskset -c 0 bash -c '
  ruler vertical_slash 16384 runs/ruler_qwen_16k_vertical_slash
  ruler block 16384 runs/ruler_qwen_16k_block
  ruler a_shape 16384 runs/ruler_qwen_16k_a_shape
' >> runs/s12/core0.log 2>&1 &
[[ " $CHAINS " == *" 1 "* ]] && taskset -c 1 bash -c '
  ruler dense 8192 runs/ruler_qwen_8k_dense
  ruler '"$PLAN097"' 8192 runs/ruler_qwen_8k_profile16k
  ruler '"$PLAN098"' 16384 runs/ruler_qwen_16k_profile16k_r098
' >> runs/s12/core1.log 2>&1 &
echo "started; progress: python runs/s11/progress.py runs/ruler_*"
