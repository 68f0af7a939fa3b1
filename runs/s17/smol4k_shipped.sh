#!/usr/bin/env bash
# Seventeenth session: the shipped SmolLM2 plan at 4K on RULER (11 tasks x 5 samples), split by task
# over two pinned cores (runs/ruler_smol_4k_shipped_{a,b}), from the snapshot worktree; --resume
# skips finished samples. WAIT_A / WAIT_B: a pid each part waits for first.
# Merge: sparse-infer eval merge runs/ruler_smol_4k_dense:dense runs/ruler_smol_4k_shipped_a \
#          runs/ruler_smol_4k_shipped_b --common --out runs/ruler_smol_4k_shipped_table
set -u
cd "$(dirname "$0")/../.."
SNAP=${SNAP:-/work/snap16}
[ -d "$SNAP/sparse_infer" ] || git worktree add -f --detach "$SNAP" HEAD
TASKS_A=niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multikey_2,niah_multikey_3
TASKS_B=niah_multivalue,niah_multiquery,vt,cwe,fwe
for part in a b; do
  core=$([ "$part" = a ] && echo 0 || echo 1)
  tasks=$([ "$part" = a ] && echo "$TASKS_A" || echo "$TASKS_B")
  wait_pid=$([ "$part" = a ] && echo "${WAIT_A:-}" || echo "${WAIT_B:-}")
  nohup bash -c "while [ -n '$wait_pid' ] && kill -0 '$wait_pid' 2>/dev/null; do sleep 10; done
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH='$SNAP' exec taskset -c $core python -P -c \
      'import sys; sys.argv=[\"sparse-infer\"]+sys.argv[1:]; from sparse_infer.cli import main; main()' \
      eval ruler smollm2-135m --plan smollm2-135m --lengths 4096 --tasks $tasks --samples 5 \
      --out runs/ruler_smol_4k_shipped_$part --resume >> runs/s17/smol4k_shipped_$part.log 2>&1" >/dev/null 2>&1 &
done
echo "queued; progress: python runs/s11/progress.py runs/ruler_smol_4k_*"
