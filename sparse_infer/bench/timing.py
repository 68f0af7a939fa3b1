"""Wall-clock timing that waits for the GPU, so CPU and CUDA runs are timed alike."""
from __future__ import annotations

import time

import torch


def synchronize(device) -> None:
    """Wait for queued GPU work (nothing to wait for on a CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_once_ms(fn, device) -> float:
    """Milliseconds of one call of `fn`, its GPU work included."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - t0) * 1e3
