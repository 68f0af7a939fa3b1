"""Run a transformers decoder one layer at a time over several prompts, capturing post-RoPE q/k.

Layer by layer (all prompts through layer l, then l + 1) keeps only one layer's q/k
in memory for the whole calibration set, and lets statistics that need every prompt
(Double Sparsity channels, verification of the final rules) see them all at once.

How, without knowing the architecture:
  1. one cheap pass of the base model with every decoder layer's forward replaced by
     a recorder that stores its call (hidden states, masks, rotary embeddings, ...)
     and returns the hidden states unchanged: embeddings and masks are computed by
     the model's own code, no layer math runs;
  2. replays: layer l is called with the recorded keyword arguments on the hidden
     states layer l - 1 produced. Its attention goes through a temporary attention
     function registered with transformers' AttentionInterface, which records q/k
     (post-RoPE, exactly what sparse_infer's attention function would receive) and
     then calls the implementation the model had, so outputs are unchanged.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch

CAPTURE_IMPL = "sparse_infer_profile"


@dataclass
class Captured:
    query: torch.Tensor            # (Hq, n, D) float32
    key: torch.Tensor              # (Hkv, n, D) float32
    mask: torch.Tensor | None      # as the model passed it (None: plain causal)
    scaling: float
    softcap: float | None


class _Recorder:
    """Holds the q/k of the layer being replayed (one at a time)."""

    def __init__(self):
        self.layer: int | None = None
        self.captured: Captured | None = None
        self.previous: dict[int, object] = {}      # id(model config) -> dense function


_STATE = _Recorder()


def _dense_function(implementation, module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if implementation not in (None, "eager") and implementation in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[implementation]
    # eager: each model file defines its own eager_attention_forward
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward
    return fn


def _capture_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    if _STATE.layer is not None and getattr(module, "layer_idx", None) == _STATE.layer and query.shape[0] == 1:
        sc = scaling if scaling is not None else query.shape[-1] ** -0.5
        _STATE.captured = Captured(query[0].detach().float(), key[0].detach().float(),
                                   None if attention_mask is None else attention_mask[0].detach(),
                                   float(sc), kwargs.get("softcap"))
    dense = _STATE.previous[id(module.config)]
    return dense(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The ModuleList of decoder layers (one per config layer)."""
    base = model.base_model
    layers = getattr(base, "layers", None)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if isinstance(layers, torch.nn.ModuleList):
        return layers
    for _, mod in base.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == cfg.num_hidden_layers:
            return mod
    raise RuntimeError(f"cannot find the decoder layers of {type(model).__name__}")


@dataclass
class RunState:
    """One prompt's progress through the decoder."""

    hidden: torch.Tensor
    calls: list                     # per layer: (positional args after hidden, kwargs)


class LayerwiseRunner:
    """Context manager: switches the model to the capturing attention and restores it on exit."""

    def __init__(self, model):
        self.model = model
        self.layers = decoder_layers(model)
        self.previous_impl = model.config._attn_implementation

    def __enter__(self):
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        prev = self.previous_impl
        AttentionInterface.register(CAPTURE_IMPL, _capture_attention)
        # masks keep the format the model's own implementation expects
        mask_fn = ALL_MASK_ATTENTION_FUNCTIONS[prev] if prev in ALL_MASK_ATTENTION_FUNCTIONS else \
            ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
        AttentionMaskInterface.register(CAPTURE_IMPL, mask_fn)
        for module in self.model.modules():
            if getattr(module, "layer_idx", None) is not None and hasattr(module, "config"):
                impl = getattr(module.config, "_attn_implementation", prev)
                _STATE.previous[id(module.config)] = _dense_function(
                    prev if impl == CAPTURE_IMPL else impl, module)
        self.model.set_attn_implementation(CAPTURE_IMPL)
        return self

    def __exit__(self, *exc):
        self.model.set_attn_implementation(self.previous_impl)
        _STATE.layer, _STATE.captured = None, None
        _STATE.previous.clear()
        return False

    @torch.no_grad()
    def start(self, input_ids: torch.Tensor) -> RunState:
        """Record every layer's call for this prompt (no layer math runs)."""
        calls: list = [None] * len(self.layers)
        first_hidden: list = [None]

        def recorder(idx):
            def forward(*args, **kwargs):
                hidden = args[0] if args else kwargs.pop("hidden_states")
                calls[idx] = (args[1:], kwargs)
                if idx == 0:
                    first_hidden[0] = hidden
                return hidden
            return forward

        for idx, layer in enumerate(self.layers):
            layer.forward = recorder(idx)
        try:
            self.model.base_model(input_ids=input_ids, use_cache=False)
        finally:
            for layer in self.layers:
                del layer.forward          # back to the class's forward
        if any(c is None for c in calls):
            raise RuntimeError("some decoder layers were not called; cannot profile this model layer by layer")
        return RunState(first_hidden[0], calls)

    @torch.no_grad()
    def step(self, layer_idx: int, state: RunState) -> Captured:
        """Run layer `layer_idx` on the prompt, advance its hidden states, return the layer's q/k."""
        args, kwargs = state.calls[layer_idx]
        _STATE.layer, _STATE.captured = layer_idx, None
        try:
            out = self.layers[layer_idx](state.hidden, *args, **kwargs)
        finally:
            _STATE.layer = None
        state.hidden = out[0] if isinstance(out, tuple) else out
        captured, _STATE.captured = _STATE.captured, None
        if captured is None:
            raise RuntimeError(f"layer {layer_idx} did not call the attention interface")
        if layer_idx == len(self.layers) - 1:
            state.calls = []               # last layer done: drop masks and rotary tables
        return captured


@contextmanager
def layerwise(model):
    with LayerwiseRunner(model) as runner:
        yield runner
