"""Smoke test of an installed sparse_infer (a wheel), run from outside the repository.

    python wheel_smoke.py SITE_DIR

Checks that sparse_infer is imported from SITE_DIR (not from a checkout or an editable
install), that the shipped plans are found by name, and that a random model with the shape of
qwen2.5-0.5b, patched with the shipped plan, runs its prefill and decode through the plugin.
"""
import sys
from pathlib import Path

import torch
import transformers

import sparse_infer

site = Path(sys.argv[1]).resolve()
where = Path(sparse_infer.__file__).resolve()
if site not in where.parents:
    sys.exit(f"sparse_infer was imported from {where}, not from the installed wheel in {site}")

plan = sparse_infer.load_plan("qwen2.5-0.5b")
assert Path(plan.source).resolve().is_relative_to(site), plan.source
# the plan's own shape, with small MLP and vocabulary: random weights, real attention geometry
config = transformers.Qwen2Config(
    vocab_size=256, hidden_size=plan.model.num_attention_heads * plan.model.head_dim, intermediate_size=64,
    num_hidden_layers=plan.model.num_hidden_layers, num_attention_heads=plan.model.num_attention_heads,
    num_key_value_heads=plan.model.num_key_value_heads, head_dim=plan.model.head_dim,
    max_position_embeddings=4096, tie_word_embeddings=False)
config.architectures = ["Qwen2ForCausalLM"]
torch.manual_seed(0)
model = transformers.Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()
# the shipped thresholds (16384 and 8192 tokens) lowered so that a short prompt takes the sparse paths
plan.prefill.min_len = plan.decode.min_len = 128
ids = torch.randint(3, 250, (1, 300), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    sparse_infer.patch(model, plan, dense_above=1.0)    # run the sparse executors even where dense is cheaper
    cache = transformers.DynamicCache(config=config)
    prefill = model(input_ids=ids, cache=cache, use_cache=True)
    step = model(input_ids=prefill.logits[:, -1:].argmax(-1), cache=cache, use_cache=True)   # one decode step
    stats = sparse_infer.get_stats(model)
    sparse_infer.unpatch(model)
assert torch.isfinite(prefill.logits).all() and torch.isfinite(step.logits).all()
sparse_prefill = sum(s["sparse_prefill_calls"] for s in stats["layers"].values())
decode = sum(s["decode_calls"] for s in stats["layers"].values())
assert sparse_prefill > 0 and decode > 0, stats
print(f"wheel smoke ok: sparse_infer from {where.parent}, shipped plan {plan.source}, "
      f"{sparse_prefill} sparse prefill and {decode} decode layer calls through the plugin")
