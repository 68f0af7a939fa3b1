#!/usr/bin/env bash
# Reruns the shipped Qwen2.5-0.5B plan at 16K on RULER (5 samples per task), so that its row in
# the paired table (runs/s16/paired_table.py) has per-sample results: the tenth session's run was
# written under the lost out/ and only its printed table survives (-2.8, 4 lower, 1 higher).
# Two jobs, one pinned core each, from a snapshot worktree (edits in the checkout do not reach
# them), each with its own directory; --resume skips finished samples, so rerunning this script
# picks both up (PARTS=a or PARTS=b starts one). The split balances the cores by the 16K-profiled run's seconds per task.
# Merge: sparse-infer eval merge runs/ruler_qwen_16k_dense:dense runs/ruler_qwen_16k_shipped_a \
#          runs/ruler_qwen_16k_shipped_b --common --out runs/ruler_qwen_16k_shipped_table
# Logs: runs/s16/shipped_{a,b}.log (not committed). Progress: python runs/s11/progress.py runs/ruler_qwen_16k_shipped_*
set -u
cd "$(dirname "$0")/../.."
SNAP=${SNAP:-/work/snap16}
[ -d "$SNAP/sparse_infer" ] || git worktree add -f --detach "$SNAP" HEAD
TASKS_A=niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multikey_2,niah_multikey_3
TASKS_B=niah_multivalue,niah_multiquery,vt,cwe,fwe
for part in ${PARTS:-a b}; do
  core=$([ "$part" = a ] && echo 0 || echo 1)
  tasks=$([ "$part" = a ] && echo "$TASKS_A" || echo "$TASKS_B")
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH="$SNAP" nohup taskset -c "$core" python -P -c \
    "import sys; sys.argv=['sparse-infer']+sys.argv[1:]; from sparse_infer.cli import main; main()" \
    eval ruler qwen2.5-0.5b --plan qwen2.5-0.5b --lengths 16384 --tasks "$tasks" --samples 5 \
    --out "runs/ruler_qwen_16k_shipped_$part" --resume >> "runs/s16/shipped_$part.log" 2>&1 &
done
echo "started; progress: python runs/s11/progress.py runs/ruler_qwen_16k_shipped_*"
