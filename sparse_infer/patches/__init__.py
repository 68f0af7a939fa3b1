"""patch / unpatch: route a loaded model's attention through sparse_infer via AttentionInterface."""
from __future__ import annotations

import weakref

from sparse_infer.patches.attention import IMPLEMENTATION, eager_fallback, sparse_attention_forward
from sparse_infer.plan import Plan, PlanError, load_plan
from sparse_infer.runtime import LayerRuntime, get_stats, group_heads, reset_stats, set_runtime

_registered = False
# model -> the attn implementation it had before patching (restored by unpatch). Keyed by the
# model itself, weakly: an id() can be reused by a new model once the patched one is gone.
_PREVIOUS: "weakref.WeakKeyDictionary[object, object]" = weakref.WeakKeyDictionary()


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, sparse_attention_forward)
    # bool masks (True = attend), the format the executors take
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    _registered = True


def attention_modules(model):
    """(layer_idx, module) for every attention layer that routes through AttentionInterface."""
    found = []
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if idx is not None and type(module).__name__.endswith("Attention") and hasattr(module, "config"):
            found.append((idx, module))
    return found


def _dense_function(implementation, module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if implementation in (None, "eager"):
        return eager_fallback(module)
    if implementation == "flex_attention":
        return ALL_ATTENTION_FUNCTIONS[implementation], "flex"
    if implementation in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[implementation], "bool"
    raise PlanError("", f"cannot patch a model whose attention implementation is {implementation!r}")


def is_patched(model) -> bool:
    return model in _PREVIOUS


def patch(model, plan, backend: str = "auto", dense_above: float | str = "auto"):
    """Make `model` run the plan's sparse attention. Returns the validated Plan.

    plan: a YAML path, a shipped plan name, a preset name ("dense", "a_shape",
    "vertical_slash", "block"), a dict or a Plan. Validation happens before
    anything changes: a bad plan raises PlanError and leaves the model untouched.
    dense_above: in prefill, a head whose index selects more than this share of
    the causal pairs runs dense instead (faster there, and exact). "auto" takes
    the break-even measured for the executor in use; 1.0 always runs the plan.
    backend: "auto" or a backend registered in sparse_infer.kernels.registry ("torch",
    "cpu", "triton", "flex"); one that runs a single phase leaves the other to "auto".
    A named backend that cannot run here (triton not installed, the C kernel does not
    build, no FlexAttention) raises BackendUnavailable saying why, before anything changes.
    """
    from sparse_infer.kernels.registry import check_available    # imports triton: not at package import

    check_available(backend)
    if dense_above != "auto" and not (isinstance(dense_above, (int, float)) and 0 < dense_above <= 1):
        raise ValueError(f"dense_above must be 'auto' or a number in (0, 1], got {dense_above!r}")
    resolved: Plan = load_plan(plan, model.config)
    modules = attention_modules(model)
    if not modules:
        raise PlanError("", f"{type(model).__name__} has no attention layers with a layer_idx to patch")
    if not model._can_set_attn_implementation():
        raise PlanError("", f"{type(model).__name__} does not route attention through transformers' "
                            "AttentionInterface, so it cannot be patched")
    if is_patched(model):
        unpatch(model)
    previous = model.config._attn_implementation
    _register()
    runtimes = []
    shared: dict = {}
    for layer_idx, module in modules:
        cfg = module.config.get_text_config() if hasattr(module.config, "get_text_config") else module.config
        num_heads = cfg.num_attention_heads
        num_kv = getattr(cfg, "num_key_value_heads", None) or num_heads
        impl = getattr(module.config, "_attn_implementation", previous)
        dense_fn, dense_mask = _dense_function(impl if impl != IMPLEMENTATION else previous, module)
        rt = LayerRuntime(resolved, layer_idx, num_heads, num_kv, dense_fn, dense_mask, backend, dense_above)
        rt.shared = shared
        rt.prefill_groups = group_heads(resolved.prefill, layer_idx, num_heads)
        rt.decode_groups = group_heads(resolved.decode, layer_idx, num_heads)
        runtimes.append((module, rt))
    for module, rt in runtimes:
        set_runtime(module, rt)
    model.set_attn_implementation(IMPLEMENTATION)
    if model.config._attn_implementation != IMPLEMENTATION:
        for module, _ in runtimes:
            set_runtime(module, None)
        raise PlanError("", f"transformers refused to switch {type(model).__name__} to the sparse attention")
    _PREVIOUS[model] = previous
    return resolved


def unpatch(model) -> None:
    """Restore exactly the attention implementation the model had before patch(); no-op if not patched."""
    if not is_patched(model):
        return
    previous = _PREVIOUS.pop(model)
    model.set_attn_implementation(previous)
    for _, module in attention_modules(model):
        set_runtime(module, None)


__all__ = ["patch", "unpatch", "is_patched", "get_stats", "reset_stats", "attention_modules"]
