"""Which RULER tasks there are, their settings, metric and answer budget."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sparse_infer.eval.errors import EvalError
from sparse_infer.eval.scoring import STRING_MATCH_ALL, STRING_MATCH_PART


QA_TASK = "qa"  # the task name of user QA samples


@dataclass(frozen=True)
class NiahConfig:
    haystack: str  # "noise" (repeated sentences), "essay", or "needle" (distractor needles)
    key_type: str  # "words" | "uuids"
    value_type: str  # "numbers" | "words" | "uuids"
    num_keys: int = 1  # needles with distinct keys (the others are distractors)
    num_values: int = 1  # values per queried key
    num_queries: int = 1  # keys asked about


# RULER's synthetic.yaml settings.
NIAH_TASKS: dict[str, NiahConfig] = {
    "niah_single_1": NiahConfig("noise", "words", "numbers"),
    "niah_single_2": NiahConfig("essay", "words", "numbers"),
    "niah_single_3": NiahConfig("essay", "words", "uuids"),
    "niah_multikey_1": NiahConfig("essay", "words", "numbers", num_keys=4),
    "niah_multikey_2": NiahConfig("needle", "words", "numbers"),
    "niah_multikey_3": NiahConfig("needle", "uuids", "uuids"),
    "niah_multivalue": NiahConfig("essay", "words", "numbers", num_values=4),
    "niah_multiquery": NiahConfig("essay", "words", "numbers", num_keys=4, num_queries=4),
}
TASK_NAMES: tuple[str, ...] = (*NIAH_TASKS, "vt", "cwe", "fwe")

# RULER's tokens_to_generate per task family.
MAX_NEW_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, QA_TASK: 32}


def task_metric(task: str) -> str:
    return STRING_MATCH_PART if task == QA_TASK else STRING_MATCH_ALL


def resolve_tasks(spec: str | Iterable[str]) -> list[str]:
    """'all' or a comma list (or iterable) of task names -> validated list, order kept."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    names = [n for n in names if n]
    if names == ["all"]:
        return list(TASK_NAMES)
    unknown = [n for n in names if n not in TASK_NAMES]
    if unknown or not names:
        raise EvalError(
            f"unknown task(s): {', '.join(unknown) or '(none given)'}; "
            f"valid: all, {', '.join(TASK_NAMES)} (QA data comes from --data FILE)"
        )
    return list(dict.fromkeys(names))


def max_new_tokens_for(task: str) -> int:
    return MAX_NEW_TOKENS["niah" if task.startswith("niah") else task]
