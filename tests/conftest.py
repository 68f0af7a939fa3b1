"""Shared fixtures: tiny random-weight models of several architectures, and the real
PyPI-shipped models (session-scoped, loaded once, marked `model`)."""
from __future__ import annotations

import os

# Triton kernels run in its CPU interpreter here; it must be set before triton is first imported.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


def tiny_config(arch: str, **overrides):
    """A small config of each architecture that routes attention through AttentionInterface."""
    import transformers as tf

    # the layer count goes to the constructor: configs derive per-layer fields (layer_types) from it
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=overrides.pop("num_hidden_layers", 2),
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if arch == "llama":
        cfg = tf.LlamaConfig(**common)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**common)
    elif arch == "mistral":
        cfg = tf.MistralConfig(**common, sliding_window=96)
    elif arch == "gemma2":
        cfg = tf.Gemma2Config(**common, sliding_window=96, attn_logit_softcapping=50.0,
                              final_logit_softcapping=30.0, query_pre_attn_scalar=16)
    elif arch == "gemma3":
        cfg = tf.Gemma3TextConfig(**common, sliding_window=96, query_pre_attn_scalar=16)
    elif arch in ("phi3", "phi3_window"):
        common.pop("head_dim")
        cfg = tf.Phi3Config(**common, sliding_window=96 if arch == "phi3_window" else None)
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(**common)
    elif arch == "qwen3_window":
        # the first layer full, the second windowed: both kinds in one model
        cfg = tf.Qwen3Config(**common, use_sliding_window=True, sliding_window=96, max_window_layers=1)
    elif arch == "olmo2":
        cfg = tf.Olmo2Config(**common)
    elif arch == "starcoder2":
        common.pop("head_dim")
        cfg = tf.Starcoder2Config(**common, sliding_window=96)
    elif arch == "gpt_neox":
        cfg = tf.GPTNeoXConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=4096, pad_token_id=0,
                               bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=4096, pad_token_id=0,
                            bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    else:
        raise KeyError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(arch: str, seed: int = 0, impl: str | None = None, **overrides):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config(arch, **overrides)
    cls = {"llama": tf.LlamaForCausalLM, "qwen2": tf.Qwen2ForCausalLM, "mistral": tf.MistralForCausalLM,
           "gemma2": tf.Gemma2ForCausalLM, "gemma3": tf.Gemma3ForCausalLM, "phi3": tf.Phi3ForCausalLM,
           "phi3_window": tf.Phi3ForCausalLM, "qwen3": tf.Qwen3ForCausalLM, "qwen3_window": tf.Qwen3ForCausalLM,
           "olmo2": tf.Olmo2ForCausalLM, "starcoder2": tf.Starcoder2ForCausalLM,
           "gpt_neox": tf.GPTNeoXForCausalLM, "gpt2": tf.GPT2LMHeadModel}[arch]
    # Gemma 2 is meant to run eager (softcapping): its reference is eager attention
    impl = impl or ("eager" if arch == "gemma2" else "sdpa")
    model = cls._from_config(cfg, attn_implementation=impl, dtype=torch.float32)
    model.config.architectures = [cls.__name__]
    return model.eval()


ARCHS = ["llama", "qwen2", "mistral", "gemma2", "gemma3", "phi3"]
# every architecture the matrix test (tests/patches/test_architecture_matrix.py) runs
ALL_ARCHS = ARCHS + ["phi3_window", "qwen3", "qwen3_window", "olmo2", "starcoder2", "gpt_neox", "gpt2"]


@pytest.fixture(scope="session")
def smollm2():
    import sparse_infer

    return sparse_infer.load_model("smollm2-135m")


@pytest.fixture(autouse=True)
def _sparse_heads_stay_sparse(monkeypatch):
    """Tests compare the sparse executors with dense attention, often on short inputs
    where the indices are dense enough for patch's "auto" dense_above to run those
    heads dense instead; keep every head on its planned path unless a test says otherwise."""
    from sparse_infer.kernels import registry

    for executor in ("torch", "cpu"):
        monkeypatch.setitem(registry.DENSE_ABOVE, executor, {"head": 1.0, "group": 1.0, "decode": 1.0})
