"""The one place executors are registered: what runs, where, and when dense is faster.

A *backend* name ("torch", "cpu", "triton", "flex") registers a prefill executor, a
decode executor, or both, with what each supports and the measured dense break-even.
`patch(model, plan, backend=...)`, the dispatchers (`kernels.dispatch`) and
`dense_above="auto"` all read this table. A backend that registers only one phase
leaves the other phase to the 'auto' choice (e.g. "cpu" prefill runs the torch
executor, "flex" decode runs the device's default decode executor).

To add a backend: write the executor (same signature as the torch one of its phase),
then one `register(...)` call below.
"""

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

from .cpu_decode import cpu_kernel_available, cpu_kernel_supports
from .flex_executor import flex_available
from .triton_executor import triton_available

__all__ = ["Executor", "register", "backends", "executor", "resolve", "check_backend", "DENSE_ABOVE"]

PHASES = ("prefill", "decode")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Executor:
    """One executor of one phase.

    target: "module:function" of the callable (prefill: block_sparse_attention_torch's
    signature; decode: sparse_decode_torch's), looked up on each `run` so that wrapping the
    module's function (tests, profiling) wraps what dispatch calls. devices: device types it takes tensors on. auto_on: device
    types where 'auto' picks it, tried in registration order. available(): whether it can
    run at all here (an optional dependency imports, a C kernel builds); accepts(q, k, v):
    whether it takes these tensors, when that depends on more than device and dtype (key and
    value may be None when only the query is known: answer for the query alone).
    """

    name: str
    phase: str
    target: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] = _FLOATS
    columns: bool = True          # prefill: vertical lines in the index
    softcap: bool = True
    masks: bool = True            # bool attention_mask (padding, sliding windows)
    kv_heads: bool = False        # decode: index rows may read any cache head (one call per layer)
    auto_on: tuple[str, ...] = ()
    available: Callable[[], bool] = lambda: True
    accepts: Callable | None = None
    notes: str = ""

    @property
    def run(self) -> Callable:
        module, function = self.target.split(":")
        return getattr(importlib.import_module(module), function)

    def takes(self, query, key, value) -> bool:
        return (query.device.type in self.devices and query.dtype in self.dtypes and self.available()
                and (self.accepts is None or self.accepts(query, key, value)))


_EXECUTORS: dict[str, dict[str, Executor]] = {phase: {} for phase in PHASES}

# Dense break-even per backend: {"head", "group"} for prefill indices per query head / per
# GQA group, "decode" for the share of a cache head that decode selections may read in all.
# The dict itself is what `dense_above="auto"` reads (tests replace entries in it).
DENSE_ABOVE: dict[str, dict[str, float]] = {}


def register(name: str, *, prefill: dict | None = None, decode: dict | None = None,
             dense_above: dict[str, float]) -> None:
    """Register backend `name`: keyword arguments of `Executor` for each phase it runs."""
    if prefill is None and decode is None:
        raise ValueError(f"backend {name!r} registers no executor")
    if name == "auto":
        raise ValueError("'auto' is not a backend name: it means 'pick per device'")
    if set(dense_above) != {"head", "group", "decode"}:
        raise ValueError("dense_above needs 'head', 'group' and 'decode'")
    for phase, spec in (("prefill", prefill), ("decode", decode)):
        if spec is not None:
            _EXECUTORS[phase][name] = Executor(name=name, phase=phase, **spec)
    DENSE_ABOVE[name] = dict(dense_above)


def backends() -> list[str]:
    """Every registered backend name, in registration order."""
    return list(dict.fromkeys([*_EXECUTORS["prefill"], *_EXECUTORS["decode"]]))


def check_backend(backend: str) -> str:
    """`backend` when it is 'auto' or registered, else a ValueError listing the registered ones."""
    if backend != "auto" and backend not in DENSE_ABOVE:
        names = ", ".join(repr(b) for b in ["auto", *backends()])
        raise ValueError(f"unknown backend {backend!r}; registered backends: {names}")
    return backend


def executor(phase: str, name: str) -> Executor | None:
    return _EXECUTORS[phase].get(name)


def resolve(phase: str, backend: str, query, key=None, value=None) -> Executor:
    """The executor `backend` means in `phase` for these tensors.

    A named backend with an executor for the phase is that executor; 'auto', or a backend
    that only registers the other phase, is the first executor whose auto_on lists the
    query's device and that takes these tensors."""
    check_backend(backend)
    named = _EXECUTORS[phase].get(backend)
    if named is not None:
        return named
    device = query.device.type
    for candidate in _EXECUTORS[phase].values():
        if device in candidate.auto_on and candidate.takes(query, key, value):
            return candidate
    raise RuntimeError(f"no {phase} executor runs on {device} tensors")


# Prefill: above this share of causal pairs a head's block-sparse attention costs more
# than dense attention, so the head runs dense (exact, and faster). Measured for the
# torch executor against SDPA on a 2-core CPU with Qwen2.5-0.5B's real q/k/v at 16K
# (docs/RESULTS.md, "Where sparse stops paying"): 0.4 for an index per query head (each tile feeds
# one head), 0.7 for an index shared by a GQA group (a tile feeds the whole group's
# stacked rows, so bigger, cheaper matmuls).
# Decode: when the selections on one cache head add up to more than this share of the
# cache, the torch path would read that head in place anyway (decode.IN_PLACE_SHARE),
# i.e. as many bytes as dense attention, with the selection work on top: its heads run dense.
# The C decode kernel ("cpu", the default on CPUs) reads selected rows in place, but the
# selectors' own work (TokenSelect scores every key) keeps the same decode threshold: the
# shipped Qwen plan's step at 16K got slower with 0.5 and 0.7 (measured with benchmarks/decode_step_breakdown.py).
# The Triton and flex executors have not been timed against FlashAttention: they never switch.
_MEASURED_TORCH = {"head": 0.4, "group": 0.7, "decode": 1 / 3}
_NEVER = {"head": 1.0, "group": 1.0, "decode": 1.0}

_K = "sparse_infer.kernels."

# Registration order is the 'auto' preference order within a device.
register(
    "flex",
    prefill=dict(target=_K + "flex_executor:block_sparse_attention_flex", devices=("cuda", "cpu"),
                 auto_on=("cuda",), available=flex_available,
                 # on CUDA FlexAttention compiles through Triton (inductor)
                 accepts=lambda q, k, v: q.device.type != "cuda" or triton_available(),
                 notes="PyTorch FlexAttention over a BlockMask; compiled per shape (CPU: seconds)"),
    dense_above=_NEVER,
)
register(
    "triton",
    prefill=dict(target=_K + "triton_executor:block_sparse_attention_triton", devices=("cuda", "cpu"),
                 available=triton_available,
                 notes="power-of-two block_size >= 16; CPU tensors only under TRITON_INTERPRET=1"),
    decode=dict(target=_K + "sparse_decode:sparse_decode_triton", devices=("cuda", "cpu"), auto_on=("cuda",),
                available=triton_available, notes="CPU tensors only under TRITON_INTERPRET=1"),
    dense_above=_NEVER,
)
register(
    "cpu",
    decode=dict(target=_K + "cpu_decode:sparse_decode_cpu", devices=("cpu",), kv_heads=True, auto_on=("cpu",),
                available=cpu_kernel_available,
                accepts=lambda q, k, v: k is None or cpu_kernel_supports(q, k, v),
                notes="C kernel (cpu_decode.c): rows read in place; needs unit last-dim stride"),
    dense_above=_MEASURED_TORCH,
)
register(
    "torch",
    prefill=dict(target=_K + "torch_executor:block_sparse_attention_torch", devices=("cpu", "cuda"),
                 dtypes=_FLOATS + (torch.float64,), auto_on=("cpu", "cuda")),
    decode=dict(target=_K + "sparse_decode:sparse_decode_torch", devices=("cpu", "cuda"), kv_heads=True,
                dtypes=_FLOATS + (torch.float64,), auto_on=("cpu", "cuda")),
    dense_above=_MEASURED_TORCH,
)
