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
# MODEL, PLAN, LENGTH, OUT and LOG (prefixes; _a/_b are appended) run another shipped plan the
# same way, e.g. the seventeenth session's SmolLM2 4K run: MODEL=smollm2-135m PLAN=smollm2-135m
# LENGTH=4096 OUT=runs/ruler_smol_4k_shipped LOG=runs/s17/smol4k_shipped bash runs/s16/resume.sh
# TASKS_A / TASKS_B (comma lists) change the split and SAMPLES (default 5) the samples per task, e.g.
# the eighteenth session's SmolLM2 8K block run at 20 per task (docs/RESULTS.md, eighteenth session).
set -u
cd "$(dirname "$0")/../.."
SNAP=${SNAP:-/work/snap16}
MODEL=${MODEL:-qwen2.5-0.5b} PLAN=${PLAN:-qwen2.5-0.5b} LENGTH=${LENGTH:-16384}
OUT=${OUT:-runs/ruler_qwen_16k_shipped} LOG=${LOG:-runs/s16/shipped}
[ -d "$SNAP/sparse_infer" ] || git worktree add -f --detach "$SNAP" HEAD
TASKS_A=${TASKS_A:-niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multikey_2,niah_multikey_3}
TASKS_B=${TASKS_B:-niah_multivalue,niah_multiquery,vt,cwe,fwe}
SAMPLES=${SAMPLES:-5}
for part in ${PARTS:-a b}; do
  core=$([ "$part" = a ] && echo 0 || echo 1)
  tasks=$([ "$part" = a ] && echo "$TASKS_A" || echo "$TASKS_B")
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH="$SNAP" nohup taskset -c "$core" python -P -c \
    "import sys; sys.argv=['sparse-infer']+sys.argv[1:]; from sparse_infer.cli import main; main()" \
    eval ruler "$MODEL" --plan "$PLAN" --lengths "$LENGTH" --tasks "$tasks" --samples "$SAMPLES" \
    --out "${OUT}_$part" --resume >> "${LOG}_$part.log" 2>&1 &
done
echo "started; progress: python runs/s11/progress.py ${OUT}_*"
