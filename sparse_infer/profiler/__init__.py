"""Offline profiler: measures each head's attention on calibration prompts and writes a plan.

    sparse-infer profile smollm2-135m --out smollm2-135m.yaml --seq-len 4096 --samples 4

or from Python: ``save_plan(profile_model(model, tokenizer, ProfileConfig(...)).plan, path)``.
See docs/PROFILER.md for what is measured and how each head's choice is made.
"""
from sparse_infer.profiler.profile import (
    ProfileConfig, ProfileResult, build_plan, plan_yaml, profile, profile_model, save_plan,
)

__all__ = ["ProfileConfig", "ProfileResult", "profile", "profile_model", "build_plan", "plan_yaml", "save_plan"]
