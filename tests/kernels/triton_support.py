"""Shared by the kernel tests: where Triton runs and the marker that skips with the reason.

tests/conftest.py sets TRITON_INTERPRET=1 on machines without a GPU before triton is imported;
the interpreter mode is process-wide, so checking one kernel tells it for all of them.
"""
import pytest
import torch

from sparse_infer.kernels import triton_available

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _triton_skip_reason():
    if not triton_available():
        return "triton is not installed"
    if TRITON_DEVICE == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        from sparse_infer.kernels import triton_executor

        if not isinstance(triton_executor._bsa_fwd_kernel, InterpretedFunction):
            return "triton was imported before TRITON_INTERPRET=1 was set; run this module on its own"
    return None


_SKIP = _triton_skip_reason()


def needs_triton(fn):
    """Mark a test as a Triton test (registered `triton` marker) and skip it with the reason."""
    return pytest.mark.triton(pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")(fn))
