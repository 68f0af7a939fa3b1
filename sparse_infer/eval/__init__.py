"""Accuracy evaluation for sparse attention plans: RULER tasks and a needle grid.

Submodules import torch/transformers lazily where they can, so
``from sparse_infer.eval import ruler`` stays cheap.
"""

from sparse_infer.eval.ruler import (
    TASK_NAMES,
    EvalError,
    generate_samples,
    load_user_tasks,
    resolve_tasks,
    score_sample,
    string_match_all,
    string_match_part,
)

__all__ = [
    "TASK_NAMES",
    "EvalError",
    "generate_samples",
    "load_user_tasks",
    "resolve_tasks",
    "score_sample",
    "string_match_all",
    "string_match_part",
]
