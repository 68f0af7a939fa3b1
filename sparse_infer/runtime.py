"""Per-layer runtime and stats: what a patched attention layer knows about its plan.

Nothing is written onto the model: each attention module maps to its LayerRuntime in a
weak side table, so a model that is dropped takes its runtimes with it. The dispatchers
(sparse_infer.prefill.dispatch, sparse_infer.decode.dispatch) and the transformers
integration (sparse_infer.patches) all read this module; it imports none of them.
"""
from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:   # annotations only: plan imports the method packages, which import this module
    from sparse_infer.plan import Plan, Rule


@dataclass
class LayerStats:
    prefill_calls: int = 0
    sparse_prefill_calls: int = 0
    selected_pairs: float = 0.0      # (query, key) pairs computed in sparse prefill calls (dense heads: all)
    causal_pairs: float = 0.0        # pairs dense causal attention would compute for the same heads
    decode_calls: int = 0
    sparse_decode_calls: int = 0
    decode_selected: float = 0.0
    decode_total: float = 0.0
    # prefill attention seconds, recorded only while timing is on (set_timing)
    estimate_s: float = 0.0          # building the indices (the patterns' estimates)
    sparse_s: float = 0.0            # the block-sparse executor
    dense_s: float = 0.0             # heads run dense (dense rules, too-dense indices, short prompts)
    # decode seconds, also only while timing is on
    select_s: float = 0.0            # selectors choosing rows (index tensors for an executor)
    select_attend_s: float = 0.0     # fused selection + attention calls (the C kernel's Quest, DS)


@dataclass
class DecodeState:
    """What decode dispatch keeps for one layer between steps (sparse_infer.decode.dispatch)."""

    sequence: object | None = None      # decode.dispatch.Fingerprint of the sequence the side state holds
    layouts: tuple | None = None        # ((Hq, Hkv), [(rule, q heads, kv slice, per_head)]): the layer's parts
    executor: tuple | None = None       # (signature, executor, dense_above limit, takes kv_heads) for that signature
    all_dense: bool | None = None       # every rule of the layer is dense
    rebuilds: int = 0                   # sequence starts seen (side state rebuilt from the whole cache)
    groups: dict = field(default_factory=dict)   # part index -> its selector's SideState (None: stateless)


@dataclass
class LayerRuntime:
    plan: Plan
    layer_idx: int
    num_heads: int
    num_kv_heads: int
    dense_fn: object                    # the pre-patch attention function
    dense_mask: str = "bool"            # the mask dense_fn expects: one of patches.attention.DENSE_MASKS
    backend: str = "auto"
    dense_above: float | str = "auto"    # see kernels.registry.DENSE_ABOVE
    stats: LayerStats = field(default_factory=LayerStats)
    decode_state: DecodeState = field(default_factory=DecodeState)
    prefill_groups: list = field(default_factory=list)  # [(Rule, [q heads])], computed once
    decode_groups: list = field(default_factory=list)
    timed: bool = False                 # record prefill seconds in stats (set_timing)
    # one dict for every layer of a patched model: what a layer hands to later layers of the
    # same forward (decode: "selections", layer -> (kv length, token set), see decode.cross_layer)
    shared: dict = field(default_factory=dict)

    def clock(self, tensor: torch.Tensor) -> float:
        """perf_counter once the device has finished the work queued so far (CUDA runs async)."""
        if tensor.device.type == "cuda":
            torch.cuda.synchronize(tensor.device)
        return time.perf_counter()


_RUNTIME: "weakref.WeakKeyDictionary[torch.nn.Module, LayerRuntime]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def runtime_for(module) -> LayerRuntime | None:
    return _RUNTIME.get(module)


def set_runtime(module, runtime: LayerRuntime | None) -> None:
    with _LOCK:
        if runtime is None:
            _RUNTIME.pop(module, None)
        else:
            _RUNTIME[module] = runtime


def group_heads(section, layer_idx: int, num_heads: int) -> list[tuple[Rule, list[int]]]:
    """Heads of one layer grouped by identical rule, so each rule runs once over its heads."""
    groups: dict[tuple, tuple[Rule, list[int]]] = {}
    for head in range(num_heads):
        rule = section.rule(layer_idx, head)
        groups.setdefault(rule.key(), (rule, []))[1].append(head)
    return list(groups.values())


def iter_runtimes(model):
    for module in model.modules():
        rt = runtime_for(module)
        if rt is not None:
            yield rt


def heads_of(mask: torch.Tensor | None, heads: list[int]) -> torch.Tensor | None:
    """The rows of a (B, 1|H, ...) mask for the given heads (a shared mask is kept as it is)."""
    if mask is None or mask.shape[1] == 1 or heads == list(range(mask.shape[1])):
        return mask
    return mask[:, heads]


def causal_pairs(q_len: int, n: int) -> float:
    """(query, key) pairs causal attention computes for one head: the queries are the last q_len of n keys."""
    return q_len * (n - q_len) + q_len * (q_len + 1) / 2


def causal_mask(q_len: int, n: int, device) -> torch.Tensor:
    """bool (q_len, n): what each query may see when the queries are the last q_len of n keys."""
    return torch.ones(q_len, n, dtype=torch.bool, device=device).tril(n - q_len)


def get_stats(model) -> dict:
    """Measured density per layer since patching (or the last reset_stats)."""
    runtimes = list(iter_runtimes(model))
    layers = {}
    for rt in runtimes:
        s = rt.stats
        layers[rt.layer_idx] = {
            "prefill_calls": s.prefill_calls, "sparse_prefill_calls": s.sparse_prefill_calls,
            "prefill_density": s.selected_pairs / s.causal_pairs if s.causal_pairs else None,
            "decode_calls": s.decode_calls, "sparse_decode_calls": s.sparse_decode_calls,
            "decode_density": s.decode_selected / s.decode_total if s.decode_total else None,
        }
        if rt.timed:
            layers[rt.layer_idx]["prefill_seconds"] = {"estimate": s.estimate_s, "sparse": s.sparse_s,
                                                       "dense": s.dense_s}
            layers[rt.layer_idx]["decode_seconds"] = {"select": s.select_s, "select_attend": s.select_attend_s}

    def ratio(num: str, den: str):
        total = sum(getattr(rt.stats, den) for rt in runtimes)
        return sum(getattr(rt.stats, num) for rt in runtimes) / total if total else None

    return {"layers": layers, "prefill_density": ratio("selected_pairs", "causal_pairs"),
            "decode_density": ratio("decode_selected", "decode_total")}


def set_timing(model, on: bool = True) -> None:
    """Record where each layer's attention time goes in its stats: prefill (estimate, sparse
    executor, dense heads) and decode selection. Off by default: on a GPU each reading waits
    for the device."""
    for rt in iter_runtimes(model):
        rt.timed = on


def reset_stats(model) -> None:
    for rt in iter_runtimes(model):
        rt.stats = LayerStats()
