#!/usr/bin/env bash
# Nineteenth session: the shipped SmolLM2-135M plan at 8K on RULER, which sessions 1-10 ran only
# under the lost out/ (its printed table: 19.1 against dense 19.1). Two parts split by task, one
# pinned core each (runs/s16/resume.sh); each part waits for the job on its core to finish first.
# Usage: WAIT_A=PID WAIT_B=PID SAMPLES=5 bash runs/s19/shipped8k.sh; rerunning resumes.
# Merge: sparse-infer eval merge runs/ruler_smol_8k_dense:dense runs/ruler_smol_8k_shipped_a \
#          runs/ruler_smol_8k_shipped_b --common --out runs/ruler_smol_8k_shipped_table
set -u
cd "$(dirname "$0")/../.."
for part in a b; do
  wait_pid=$([ "$part" = a ] && echo "${WAIT_A:-}" || echo "${WAIT_B:-}")
  nohup bash -c "while [ -n '$wait_pid' ] && kill -0 '$wait_pid' 2>/dev/null; do sleep 20; done
    PARTS=$part SAMPLES=${SAMPLES:-5} MODEL=smollm2-135m PLAN=smollm2-135m LENGTH=8192 \
      OUT=runs/ruler_smol_8k_shipped LOG=runs/s19/shipped8k bash runs/s16/resume.sh" >/dev/null 2>&1 &
done
echo "queued; progress: python runs/s11/progress.py runs/ruler_smol_8k_shipped_*"
