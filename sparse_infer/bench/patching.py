"""A model running a plan for the length of a `with` block, as every speed benchmark needs."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def patched(model, plan, **patch_kwargs) -> Iterator[None]:
    """Patch `model` with `plan` (keyword arguments go to patch) and reset its stats, so what the
    block reads from get_stats is its own; unpatch when the block ends, also on error. A plan of
    None leaves the model dense and untouched: the dense baseline runs through the same code."""
    if plan is None:
        yield
        return
    import sparse_infer

    sparse_infer.patch(model, plan, **patch_kwargs)
    sparse_infer.reset_stats(model)
    try:
        yield
    finally:
        sparse_infer.unpatch(model)
