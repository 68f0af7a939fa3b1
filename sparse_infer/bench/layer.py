"""One attention layer outside a model: what the layer benchmarks need to call the patch
layer's prefill and decode paths directly, without patching a model.

Benchmarks build their layer here rather than constructing `LayerRuntime` themselves or
reading its side state, so a change of the runtime's fields touches this module only.
"""
from __future__ import annotations

from types import SimpleNamespace


def qwen2_5_0_5b_shape() -> SimpleNamespace:
    """The model config fields of Qwen2.5-0.5B that plans and layer benchmarks read (24 layers,
    14 query / 2 kv heads, head dim 64), without loading the model."""
    return SimpleNamespace(num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, head_dim=64,
                           hidden_size=896, model_type="qwen2", architectures=["Qwen2ForCausalLM"])


class StandInAttention:
    """Stands in for a transformers attention module: the attributes the patch layer reads."""

    is_causal = True
    training = False

    def __init__(self, layer_idx: int = 0):
        self.layer_idx = layer_idx


def layer_runtime(plan, layer_idx: int, num_heads: int, num_kv_heads: int, *, backend: str = "auto",
                  dense_above: float | str = "auto"):
    """The runtime `sparse_prefill` and `decode_attention` take for one layer of a loaded plan,
    its heads already grouped by rule. No dense fallback function: the benchmarks time the
    sparse paths and call dense attention themselves. `dense_above` may be changed on the
    returned runtime between calls."""
    from sparse_infer.runtime import LayerRuntime, group_heads

    runtime = LayerRuntime(plan=plan, layer_idx=layer_idx, num_heads=num_heads, num_kv_heads=num_kv_heads,
                           dense_fn=None, dense_mask="bool", backend=backend, dense_above=dense_above)
    runtime.prefill_groups = group_heads(plan.prefill, layer_idx, num_heads)
    runtime.decode_groups = group_heads(plan.decode, layer_idx, num_heads)
    return runtime


def decode_counters(runtime, group: int = 0) -> dict:
    """A copy of a decode rule group's counters (e.g. TokenSelect's reuses and full_scorings);
    empty before its first step."""
    return dict(getattr(runtime.decode_state.groups.get(group), "counters", {}))


def parse_dense_above(text: str) -> float | str:
    """A dense_above setting as scripts take it from the environment: "auto" or a number."""
    return text if text == "auto" else float(text)
