#!/usr/bin/env bash
# Twentieth session: the shipped SmolLM2-135M plan at 4K and its dense baseline, from 10 to
# SAMPLES (default 20) per task. Core 0 extends dense (one directory); core 1 extends the shipped
# run's two parts one after the other. From a snapshot worktree, --resume skips finished samples.
# Merge: sparse-infer eval merge runs/ruler_smol_4k_dense:dense runs/ruler_smol_4k_shipped_a \
#          runs/ruler_smol_4k_shipped_b --common --out runs/ruler_smol_4k_shipped_table20
set -u
cd "$(dirname "$0")/../.."
SNAP=${SNAP:-/work/snap16} SAMPLES=${SAMPLES:-20}
[ -d "$SNAP/sparse_infer" ] || git worktree add -f --detach "$SNAP" HEAD
ruler() {  # core plan tasks out
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH="$SNAP" taskset -c "$1" python -P -c \
    "import sys; sys.argv=['sparse-infer']+sys.argv[1:]; from sparse_infer.cli import main; main()" \
    eval ruler smollm2-135m --plan "$2" --lengths 4096 --tasks "$3" --samples "$SAMPLES" --out "$4" --resume
}
A=niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multikey_2,niah_multikey_3
B=niah_multivalue,niah_multiquery,vt,cwe,fwe
export -f ruler; export SNAP SAMPLES
nohup bash -c "ruler 0 dense all runs/ruler_smol_4k_dense" >> runs/s20/dense4k.log 2>&1 &
nohup bash -c "ruler 1 smollm2-135m $A runs/ruler_smol_4k_shipped_a; ruler 1 smollm2-135m $B runs/ruler_smol_4k_shipped_b" >> runs/s20/shipped4k.log 2>&1 &
echo "started; progress: python runs/s11/progress.py runs/ruler_smol_4k_dense runs/ruler_smol_4k_shipped_*"
