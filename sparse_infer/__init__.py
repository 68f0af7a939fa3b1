"""sparse_infer: training-free sparse attention for Hugging Face transformers.

    import sparse_infer
    model, tok = sparse_infer.load_model("smollm2-135m")
    sparse_infer.patch(model, "vertical_slash")      # a YAML path, shipped plan, preset, dict or Plan
    model.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=32)
    sparse_infer.unpatch(model)

For long decodes, `model.generate(..., cache=sparse_infer.AppendCache(config=model.config))`
appends K/V in place instead of copying the whole cache every step (sparse_infer/cache.py).
"""
from sparse_infer.cache import AppendCache
from sparse_infer.models import load_model
from sparse_infer.patches import get_stats, is_patched, patch, reset_stats, unpatch
from sparse_infer.plan import Plan, PlanError, load_plan
from sparse_infer.presets import preset

__version__ = "0.1.0"
__all__ = ["patch", "unpatch", "is_patched", "load_plan", "preset", "Plan", "PlanError", "load_model",
           "get_stats", "reset_stats", "AppendCache", "__version__"]
