#!/usr/bin/env bash
# Restarts the Qwen2.5-0.5B RULER matrix left for issue 3, two chains, one pinned core each, from a
# snapshot worktree of HEAD (edits in the checkout do not reach running jobs). Every output lives
# under runs/ and is committed, so finished samples survive a new checkout; --resume skips them and
# a finished run costs only a model load. Logs: runs/s11/core{0,1}.log (not committed).
#   core 0: dense 16K -> vertical_slash 16K -> block 16K
#   core 1: the 16K profile (skipped once its YAML exists) -> RULER 16K with it -> dense 8K
#           -> RULER 8K with it -> a_shape 16K
set -u
cd "$(dirname "$0")/../.."
SNAP=${SNAP:-/work/snap}
[ -d "$SNAP/sparse_infer" ] || git worktree add -f --detach "$SNAP" HEAD
PLAN16=runs/s11/qwen_profile_16k.yaml
si() { OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH="$SNAP" python -P -c \
  "import sys; sys.argv=['sparse-infer']+sys.argv[1:]; from sparse_infer.cli import main; main()" "$@"; }
ruler() { si eval ruler qwen2.5-0.5b --plan "$1" --lengths "$2" --tasks all --samples 5 --out "$3" --resume; }
export SNAP
export -f si ruler
CHAINS=${CHAINS:-0 1}   # CHAINS=1 restarts only core 1's chain
[[ " $CHAINS " == *" 0 "* ]] && taskset -c 0 bash -c '
  ruler dense 16384 runs/ruler_qwen_16k_dense
  ruler vertical_slash 16384 runs/ruler_qwen_16k_vertical_slash
  ruler block 16384 runs/ruler_qwen_16k_block
' >> runs/s11/core0.log 2>&1 &
[[ " $CHAINS " == *" 1 "* ]] && taskset -c 1 bash -c '
  [ -f '"$PLAN16"' ] || si profile qwen2.5-0.5b --out '"$PLAN16"' --seq-len 16384 --min-seq-len 4096 \
      --samples 4 --target-recall 0.97 --seed 0 --channels 16 --no-progress
  ruler '"$PLAN16"' 16384 runs/ruler_qwen_16k_profile16k
  ruler dense 8192 runs/ruler_qwen_8k_dense
  ruler '"$PLAN16"' 8192 runs/ruler_qwen_8k_profile16k
  ruler a_shape 16384 runs/ruler_qwen_16k_a_shape
' >> runs/s11/core1.log 2>&1 &
echo "started; progress: python runs/s11/progress.py runs/ruler_*"
