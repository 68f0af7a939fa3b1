"""Presets: plans built from a model's config alone, without profiling."""
from __future__ import annotations

import copy
import datetime

from sparse_infer.params import PlanError
from sparse_infer.plan import PLAN_VERSION, Plan, model_spec_from_config, plan_from_dict

PRESETS = ("dense", "a_shape", "vertical_slash", "block")

# each preset's rule for every sparse layer
PRESET_RULES = {
    "dense": {"pattern": "dense"},
    # the dense tail lets the prompt's last rows (the question) reach the middle; without
    # it these presets lost 10.5 (a_shape) and 7.9 (block) points to dense on RULER at
    # SmolLM2 8K (docs/RESULTS.md)
    "a_shape": {"pattern": "a_shape", "sink": 128, "local": 1024, "dense_tail": 128},
    # slash lines become whole kv blocks in the executor, so their budget is kept small
    "vertical_slash": {"pattern": "vertical_slash", "vertical": {"frac": 0.03, "min": 256, "max": 2048},
                       "slash": {"frac": 0.02, "min": 256, "max": 2048}},
    # the antidiagonal (XAttention) estimate, not the pooled one: at Qwen2.5-0.5B 8K on RULER it
    # changed 3 of 55 answers against dense where pooled changed 7 (niah_multivalue 95 vs 75),
    # for ~8% more prefill time at 16K (1.26x vs 1.36x over dense; docs/RESULTS.md)
    "block": {"pattern": "block", "coverage": 0.95, "estimator": "antidiagonal", "dense_tail": 128},
}


def preset(name: str, model_config, min_seq_len: int = 4096, min_kv_len: int = 4096) -> Plan:
    """A plan built from a model's config alone, without profiling.

    Layer 0 stays dense in the sparse presets: its attention is diffuse in most
    LLMs and it is a small share of the compute.
    """
    if name not in PRESETS:
        raise PlanError("", f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    spec = model_spec_from_config(model_config)
    raw = {
        "sparse_infer_plan": PLAN_VERSION,
        "model": {k: v for k, v in vars(spec).items() if v is not None},
        "profile": {"preset": name, "created": datetime.date.today().isoformat()},
        "prefill": {"min_seq_len": min_seq_len, "block_size": 64, "default": copy.deepcopy(PRESET_RULES[name])},
        "decode": {"min_kv_len": min_kv_len, "default": {"method": "dense"}},
    }
    if name != "dense":
        raw["prefill"]["layers"] = {0: {"*": {"pattern": "dense"}}}
    return plan_from_dict(raw, source=f"preset:{name}")
