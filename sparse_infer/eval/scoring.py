"""RULER's metrics (x100) and the post-processing of a prediction before it is scored.

Shared by every eval that scores a greedy answer: RULER tasks, user QA data and the needle grid.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from sparse_infer.eval.errors import EvalError


STRING_MATCH_ALL = "string_match_all"
STRING_MATCH_PART = "string_match_part"


_CONTROL_CHARS = re.compile(r"[\x00-\x1f]")


def postprocess(pred: str) -> str:
    """RULER's post-processing: control characters become newlines, then strip."""
    return _CONTROL_CHARS.sub("\n", pred.strip()).strip()


def as_answer_list(refs: Sequence[str] | str) -> list[str]:
    return [refs] if isinstance(refs, str) else list(refs)


def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Mean over samples of the fraction of references found (case-insensitive) x100."""
    if not preds:
        return 0.0
    total = 0.0
    for pred, ref in zip(preds, refs, strict=True):
        ref = as_answer_list(ref)
        p = pred.lower()
        total += sum(r.lower() in p for r in ref) / len(ref) if ref else 0.0
    return total / len(preds) * 100


def string_match_part(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Mean over samples of 1 if any reference is found (case-insensitive) x100."""
    if not preds:
        return 0.0
    total = 0.0
    for pred, ref in zip(preds, refs, strict=True):
        p = pred.lower()
        total += max((r.lower() in p for r in as_answer_list(ref)), default=False)
    return total / len(preds) * 100


METRICS: dict[str, Callable[[Sequence[str], Sequence[Sequence[str]]], float]] = {
    STRING_MATCH_ALL: string_match_all,
    STRING_MATCH_PART: string_match_part,
}


def score_sample(pred: str, answers: Sequence[str] | str, metric: str = STRING_MATCH_ALL) -> float:
    if metric not in METRICS:
        raise EvalError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    return METRICS[metric]([postprocess(pred)], [as_answer_list(answers)])
