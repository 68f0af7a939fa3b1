"""Accuracy evaluation for sparse attention plans: RULER tasks and a needle grid.

Where things are: ``ruler`` (RULER task generation) and ``needle`` make samples;
``runner`` runs them under each plan and scores them (``scoring``, ``prompts``);
``results`` is the results.json they are kept in, ``merge`` combines such files,
``compare`` and ``paired`` set a plan against its baseline, ``tables`` prints
them, ``fidelity`` measures logits instead of answers, ``cli`` is ``sparse-infer eval``.

Submodules import torch/transformers lazily where they can, so
``from sparse_infer.eval import ruler`` stays cheap.
"""

from sparse_infer.eval.errors import EvalError
from sparse_infer.eval.ruler import (
    TASK_NAMES,
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
