#!/usr/bin/env bash
# Twentieth session: rerun a Qwen2.5-0.5B plan at 8K on RULER (5 samples per task) so that its row
# has per-sample results for the paired table: the shipped plan's and the presets' 8K runs were
# written under the lost out/ and only their printed tables survive. Two parts split by task, one
# pinned core each (runs/s16/resume.sh); each part first waits for the job on its core. WAIT_A and
# WAIT_B take that job's python PID: a resume.sh launcher exits at once, so its PID would not wait.
# Usage: PLAN=qwen2.5-0.5b NAME=shipped WAIT_A=PID WAIT_B=PID bash runs/s20/qwen8k.sh; rerunning resumes.
# Merge: sparse-infer eval merge runs/ruler_qwen_8k_dense:dense runs/ruler_qwen_8k_NAME_a \
#          runs/ruler_qwen_8k_NAME_b --common --out runs/ruler_qwen_8k_NAME_table
set -u
cd "$(dirname "$0")/../.."
PLAN=${PLAN:-qwen2.5-0.5b} NAME=${NAME:-shipped}
for part in a b; do
  wait_pid=$([ "$part" = a ] && echo "${WAIT_A:-}" || echo "${WAIT_B:-}")
  nohup bash -c "while [ -n '$wait_pid' ] && kill -0 '$wait_pid' 2>/dev/null; do sleep 20; done
    PARTS=$part SAMPLES=${SAMPLES:-5} MODEL=qwen2.5-0.5b PLAN=$PLAN LENGTH=8192 \
      OUT=runs/ruler_qwen_8k_$NAME LOG=runs/s20/qwen8k_$NAME bash runs/s16/resume.sh" >/dev/null 2>&1 &
done
echo "queued; progress: python runs/s11/progress.py runs/ruler_qwen_8k_${NAME}_*"
