"""One dense Qwen2.5-0.5B forward in float32 and then bfloat16, same random prompt, timed.

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/dtype_prefill.py [LENGTH] [THREADS]

Decides whether `eval ruler --dtype bfloat16` saves time on this CPU: it does only where the CPU
has fast bf16 matmuls; the RULER tables run one pinned thread per process.
"""
import sys
import time

import torch

from sparse_infer.models import load_model


def main(length: int = 4096, threads: int = 1):
    torch.set_num_threads(threads)
    model, _ = load_model("qwen2.5-0.5b")
    ids = torch.randint(100, 20000, (1, length), generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        with torch.no_grad():
            start = time.time()
            model(ids, logits_to_keep=1)
        print(f"{dtype}: {time.time() - start:.1f} s for {length} tokens on {threads} thread(s)", flush=True)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
