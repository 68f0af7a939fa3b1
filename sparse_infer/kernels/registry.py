"""The one place executors are registered: what runs, where, and when dense is faster.

A *backend* name ("torch", "cpu", "triton", "flex") registers a prefill executor, a
decode executor, or both, with what each supports and the measured dense break-even.
`patch(model, plan, backend=...)`, the dispatchers (`kernels.dispatch`) and
`dense_above="auto"` all read this table. A backend that registers only one phase
leaves the other phase to the 'auto' choice (e.g. "cpu" prefill runs the torch
executor, "flex" decode runs the device's default decode executor).

'auto' picks, per call, the first executor (registration order) whose `auto_on` lists the
query's device and that takes the call: its device, dtype, the features the call needs
(`FEATURES`), availability and `refuses`. A backend named explicitly is that executor, or a
clear error saying why it cannot run the call (`BackendUnavailable` when it cannot run here
at all, ValueError / TypeError when it does not take these tensors or features).

To add a backend: write the executor (same signature as the torch one of its phase),
then one `register(...)` call below.
"""

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

from .cpu_decode import cpu_kernel_available, cpu_kernel_problem, cpu_kernel_refuses
from .flex_executor import flex_problem
from .triton_executor import triton_problem, triton_refuses

__all__ = ["Executor", "BackendUnavailable", "FEATURES", "register", "unregister", "backends", "executor",
           "needs", "resolve", "check_backend", "check_available", "DENSE_ABOVE", "group_limit"]

PHASES = ("prefill", "decode")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

# What a call may need beyond plain causal attention over an index; an executor declares
# each as a flag. The text is what errors say.
FEATURES = {
    "columns": "column lines (vertical lines) in the index",
    "softcap": "softcap (attention logit soft-capping)",
    "masks": "a bool attention_mask (padding, sliding windows)",
    "kv_heads": "kv_heads (index rows that read any cache head)",
}


class BackendUnavailable(RuntimeError):
    """A backend named explicitly cannot run here (a dependency is missing, its kernel does not build)."""


@dataclass(frozen=True)
class Executor:
    """One executor of one phase.

    target: "module:function" of the callable (prefill: block_sparse_attention_torch's
    signature; decode: sparse_decode_torch's), looked up on each `run` so that wrapping the
    module's function (tests, profiling) wraps what dispatch calls. devices: device types it
    takes tensors on. columns / softcap / masks / kv_heads: the `FEATURES` it handles.
    auto_on: device types where 'auto' picks it, tried in registration order.
    unavailable(): why it cannot run at all here (an optional dependency does not import, a C
    kernel does not build), None when it can. available(): what 'auto' asks instead, when given
    (the C kernel's also warns once that 'auto' falls back); default: unavailable() is None.
    refuses(q, k, v): why it does not take these tensors, when that depends on more than device
    and dtype, None when it does (key and value may be None when only the query is known:
    answer for the query alone).
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
    unavailable: Callable[[], str | None] = lambda: None
    available: Callable[[], bool] | None = None
    refuses: Callable | None = None
    notes: str = ""

    @property
    def run(self) -> Callable:
        module, function = self.target.split(":")
        return getattr(importlib.import_module(module), function)

    def refusal(self, query, key=None, value=None, needs=frozenset(), *, auto: bool = False):
        """Why this executor does not take this call, as (exception type, message), or None.
        needs: the `FEATURES` the call uses. auto: ask `available` (may warn) for availability."""
        device = query.device.type
        if device not in self.devices:
            return ValueError, f"it does not run on {device} tensors (it takes {', '.join(self.devices)})"
        if query.dtype not in self.dtypes:
            return TypeError, (f"it does not take {query.dtype} (it takes "
                               f"{', '.join(str(d).removeprefix('torch.') for d in self.dtypes)})")
        missing = [f for f in FEATURES if f in needs and not getattr(self, f)]
        if missing:
            return ValueError, f"it does not handle {' or '.join(FEATURES[f] for f in missing)}, which the call uses"
        if auto and self.available is not None:
            why = None if self.available() else (self.unavailable() or "unavailable")
        else:
            why = self.unavailable()
        if why is not None:
            return BackendUnavailable, why
        why = None if self.refuses is None else self.refuses(query, key, value)
        return None if why is None else (ValueError, why)

    def takes(self, query, key=None, value=None, needs=frozenset()) -> bool:
        """Whether 'auto' may pick it for this call."""
        return self.refusal(query, key, value, needs, auto=True) is None


_EXECUTORS: dict[str, dict[str, Executor]] = {phase: {} for phase in PHASES}   # each in _ORDER's order
_ORDER: list[str] = []          # backend names: the 'auto' preference order

# Dense break-even per backend: {"head", "group"} for prefill indices per query head / per
# GQA group, "decode" for the share of a cache head that decode selections may read in all.
# The dict itself is what `dense_above="auto"` reads (tests replace entries in it).
DENSE_ABOVE: dict[str, dict] = {}


def group_limit(limit, heads_per_index: int) -> float:
    """A "group" threshold (a number, or {heads per group: limit}) for an index shared by
    `heads_per_index` query heads: the entry of the largest measured group size at or below it
    (the smallest one's below all of them)."""
    if not isinstance(limit, dict):
        return float(limit)
    below = [g for g in limit if g <= heads_per_index]
    return float(limit[max(below) if below else min(limit)])


def _check_limit(value, what: str) -> None:
    """A threshold in (0, 1]; only "group" may map group sizes (>= 2) to thresholds."""
    if isinstance(value, dict):
        if what != "group":
            raise ValueError("only dense_above['group'] may depend on the group size")
        if not value or not all(isinstance(g, int) and g >= 2 for g in value):
            raise ValueError(f"dense_above[{what!r}] as a mapping needs group sizes >= 2 as keys")
    values = value.values() if isinstance(value, dict) else [value]
    if not all(isinstance(v, (int, float)) and 0 < v <= 1 for v in values):
        raise ValueError(f"dense_above[{what!r}] must be in (0, 1], got {value!r}")


def register(name: str, *, prefill: dict | None = None, decode: dict | None = None,
             dense_above: dict[str, float], before: str | None = None) -> None:
    """Register backend `name`: keyword arguments of `Executor` for each phase it runs.
    before: a registered backend that 'auto' tries after this one, in each phase (default: last)."""
    if prefill is None and decode is None:
        raise ValueError(f"backend {name!r} registers no executor")
    if name == "auto":
        raise ValueError("'auto' is not a backend name: it means 'pick per device'")
    if name in DENSE_ABOVE:
        raise ValueError(f"backend {name!r} is already registered")
    if set(dense_above) != {"head", "group", "decode"}:
        raise ValueError("dense_above needs 'head', 'group' and 'decode'")
    for what, value in dense_above.items():
        _check_limit(value, what)
    if before is not None and before not in DENSE_ABOVE:
        raise ValueError(f"before={before!r} is not a registered backend")
    # every executor is built (and its arguments checked) before the table changes
    made = {phase: Executor(name=name, phase=phase, **spec)
            for phase, spec in (("prefill", prefill), ("decode", decode)) if spec is not None}
    _ORDER.insert(len(_ORDER) if before is None else _ORDER.index(before), name)
    for phase, ex in made.items():
        _EXECUTORS[phase][name] = ex
        ordered = sorted(_EXECUTORS[phase].items(), key=lambda item: _ORDER.index(item[0]))
        _EXECUTORS[phase].clear()
        _EXECUTORS[phase].update(ordered)
    DENSE_ABOVE[name] = dict(dense_above)


def unregister(name: str) -> None:
    """Remove backend `name` (tests register toy executors and remove them after)."""
    check_backend(name)
    if name == "auto":
        raise ValueError("'auto' is not a backend name")
    for table in _EXECUTORS.values():
        table.pop(name, None)
    _ORDER.remove(name)
    del DENSE_ABOVE[name]


def backends() -> list[str]:
    """Every registered backend name, in 'auto' preference order (registration order unless `before`)."""
    return list(_ORDER)


def check_backend(backend: str) -> str:
    """`backend` when it is 'auto' or registered, else a ValueError listing the registered ones."""
    if backend != "auto" and backend not in DENSE_ABOVE:
        names = ", ".join(repr(b) for b in ["auto", *backends()])
        raise ValueError(f"unknown backend {backend!r}; registered backends: {names}")
    return backend


def check_available(backend: str) -> str:
    """`backend` when it is 'auto' or each executor it registers can run here, else a
    BackendUnavailable naming the backend, the phase and why (an unknown name: check_backend's error)."""
    check_backend(backend)
    for phase in PHASES:
        ex = _EXECUTORS[phase].get(backend)
        why = None if ex is None else ex.unavailable()
        if why is not None:
            raise BackendUnavailable(f"backend {backend!r} cannot run {phase} here: {why}; "
                                     f"use backend='auto' or one of {_others(phase, backend)}")
    return backend


def _others(phase: str, backend: str, feature: str | None = None) -> str:
    """The other backends whose `phase` executor can run here (and handles `feature`), for hints."""
    names = [n for n, ex in _EXECUTORS[phase].items()
             if n != backend and (feature is None or getattr(ex, feature)) and ex.unavailable() is None]
    return ", ".join(repr(n) for n in names) or "none"


def executor(phase: str, name: str) -> Executor | None:
    return _EXECUTORS[phase].get(name)


def needs(**used: bool) -> frozenset:
    """The features a call uses, from keyword flags named as in FEATURES: needs(softcap=True, ...)."""
    unknown = set(used) - set(FEATURES)
    if unknown:
        raise ValueError(f"unknown features {sorted(unknown)}; known: {', '.join(FEATURES)}")
    return frozenset(f for f, on in used.items() if on)


def resolve(phase: str, backend: str, query, key=None, value=None, needs: frozenset = frozenset()) -> Executor:
    """The executor `backend` means in `phase` for this call (`needs`: the FEATURES it uses).

    A named backend with an executor for the phase is that executor, or an error saying why
    it cannot run the call; 'auto', or a backend that only registers the other phase, is the
    first executor whose auto_on lists the query's device and that takes the call."""
    check_backend(backend)
    named = _EXECUTORS[phase].get(backend)
    if named is not None:
        refused = named.refusal(query, key, value, needs)
        if refused is not None:
            kind, why = refused
            missing = [f for f in FEATURES if f in needs and not getattr(named, f)]
            hint = (f"backends whose {phase} executor handles it: {_others(phase, backend, missing[0])}"
                    if missing else f"use backend='auto' or one of {_others(phase, backend)}")
            raise kind(f"backend {backend!r} cannot run this {phase} call: {why}; {hint}")
        return named
    device = query.device.type
    skipped = []
    for candidate in _EXECUTORS[phase].values():
        if device not in candidate.auto_on:
            continue
        refused = candidate.refusal(query, key, value, needs, auto=True)
        if refused is None:
            return candidate
        skipped.append(f"{candidate.name!r}: {refused[1]}")
    used = f" using {', '.join(sorted(needs))}" if needs else ""
    raise RuntimeError(f"no {phase} executor takes this call ({device} {query.dtype} tensors{used})"
                       + (f": {'; '.join(skipped)}" if skipped else ""))


# Prefill: above this share of causal pairs a head's block-sparse attention costs more
# than dense attention, so the head runs dense (exact, and faster). Measured for the
# torch executor against SDPA on a 2-core CPU with Qwen2.5-0.5B's real q/k/v at 16K
# (docs/RESULTS.md, "Where sparse stops paying"): 0.4 for an index per query head (each tile feeds
# one head), 0.7 for an index shared by a GQA group (a tile feeds the whole group's
# stacked rows, so bigger, cheaper matmuls). The smaller the group, the less a shared tile
# saves: `python benchmarks/executor_paths.py 8192 9,3,64` (SmolLM2's 3 heads per group) puts
# the fused path at 1.59-1.71x SDPA's cost per unit of density, a break-even near 0.6, where
# Qwen2.5-0.5B's 7 heads per group give 1.28-1.44x. "group" maps heads per group to the limit
# (group_limit reads the nearest measured group size at or below).
# Decode: when the selections on one cache head add up to more than this share of the
# cache, the torch path would read that head in place anyway (decode.IN_PLACE_SHARE),
# i.e. as many bytes as dense attention, with the selection work on top: its heads run dense.
# The C decode kernel ("cpu", the default on CPUs) reads selected rows in place, but the
# selectors' own work (TokenSelect scores every key) keeps the same decode threshold: the
# shipped Qwen plan's step at 16K got slower with 0.5 and 0.7 (measured with benchmarks/decode_step_breakdown.py).
# The Triton and flex executors have not been timed against FlashAttention: they never switch.
_MEASURED_TORCH = {"head": 0.4, "group": {3: 0.6, 7: 0.7}, "decode": 1 / 3}
_NEVER = {"head": 1.0, "group": 1.0, "decode": 1.0}

_K = "sparse_infer.kernels."

# Registration order is the 'auto' preference order within a device.
register(
    "flex",
    prefill=dict(target=_K + "flex_executor:block_sparse_attention_flex", devices=("cuda", "cpu"),
                 auto_on=("cuda",), unavailable=flex_problem,
                 # on CUDA FlexAttention compiles through Triton (inductor)
                 refuses=lambda q, k, v: (None if q.device.type != "cuda" or triton_problem() is None
                                          else "FlexAttention on CUDA compiles through Triton: " + triton_problem()),
                 notes="PyTorch FlexAttention over a BlockMask; compiled per shape (CPU: seconds)"),
    dense_above=_NEVER,
)
register(
    "triton",
    prefill=dict(target=_K + "triton_executor:block_sparse_attention_triton", devices=("cuda", "cpu"),
                 unavailable=triton_problem, refuses=triton_refuses,
                 notes="power-of-two block_size >= 16; CPU tensors only under TRITON_INTERPRET=1"),
    decode=dict(target=_K + "sparse_decode:sparse_decode_triton", devices=("cuda", "cpu"), auto_on=("cuda",),
                unavailable=triton_problem, refuses=triton_refuses,
                notes="CPU tensors only under TRITON_INTERPRET=1"),
    dense_above=_NEVER,
)
register(
    "cpu",
    decode=dict(target=_K + "cpu_decode:sparse_decode_cpu", devices=("cpu",), kv_heads=True, auto_on=("cpu",),
                unavailable=cpu_kernel_problem, available=cpu_kernel_available, refuses=cpu_kernel_refuses,
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
