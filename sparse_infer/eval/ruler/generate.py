"""RULER samples: one task at one length, sized to the tokenizer."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from sparse_infer.eval.errors import EvalError
from sparse_infer.eval.prompts import count_tokens, format_prompt
from sparse_infer.eval.ruler.catalogue import NIAH_TASKS, max_new_tokens_for, resolve_tasks, task_metric
from sparse_infer.eval.ruler.common_words import CWE_NUM_CW, render_cwe
from sparse_infer.eval.ruler.frequent_words import render_fwe
from sparse_infer.eval.ruler.haystack import derive_seed
from sparse_infer.eval.ruler.niah import render_niah
from sparse_infer.eval.ruler.sizing import fit_length
from sparse_infer.eval.ruler.variable_tracking import render_vt


def renderer_for(task: str) -> Callable[[int, int, int], tuple[str, str, list[str]]]:
    """The task's `render(seed, n, pad) -> (task_text, answer_prefix, answers)`.

    n is the haystack size in task units; every random choice that does not depend on n is
    drawn first, so growing n only grows the haystack (and fit_length can search over n).
    """
    if task in NIAH_TASKS:
        cfg = NIAH_TASKS[task]
        return lambda seed, n, pad: render_niah(cfg, seed, n, pad)
    return {"vt": render_vt, "cwe": render_cwe, "fwe": render_fwe}[task]


# Below these list sizes the top words are not well separated (ties, or
# common words that do not all appear).
MIN_UNITS = {"cwe": 6 * CWE_NUM_CW, "fwe": 60}


def sample_id(task: str, length: int, index: int) -> str:
    return f"{task}/{length}/{index}"


def generate_task(
    tokenizer: Any,
    task: str,
    length: int,
    index: int,
    seed: int = 0,
    *,
    chat_template: bool | None = None,
    hint: int | None = None,
) -> dict[str, Any]:
    """One sample of `task` whose prompt is `length` tokens (within 1%, never over)."""
    resolve_tasks([task])
    render = renderer_for(task)
    s = derive_seed(seed, task, length, index)
    def build(n: int, pad: int) -> str:
        task_text, prefix, _ = render(s, n, pad)
        return format_prompt(tokenizer, task_text, prefix, chat_template)

    prompt, n = fit_length(build, lambda t: count_tokens(tokenizer, t), length, hint=hint, what=f"{task} @ {length}")
    answers = render(s, n, 0)[2]  # answers never depend on pad
    if n < MIN_UNITS.get(task, 1) or not all(a in prompt for a in answers):
        raise EvalError(f"{task} @ {length}: too short to hold the task (haystack of {n} units); use a longer length")
    return {
        "id": sample_id(task, length, index),
        "task": task,
        "length": length,
        "index": index,
        "input": prompt,
        "answers": answers,
        "max_new_tokens": max_new_tokens_for(task),
        "metric": task_metric(task),
        "tokens": count_tokens(tokenizer, prompt),
        "seed": seed,
        "_units": n,
    }


def generate_samples(
    tokenizer: Any,
    tasks: str | Iterable[str],
    lengths: Iterable[int],
    num_samples: int,
    seed: int = 0,
    *,
    chat_template: bool | None = None,
) -> list[dict[str, Any]]:
    """All samples for tasks x lengths x num_samples, in (length, task, index) order."""
    names = resolve_tasks(tasks)
    out = []
    for length in lengths:
        for task in names:
            hint = None
            for index in range(num_samples):
                sample = generate_task(tokenizer, task, length, index, seed, chat_template=chat_template, hint=hint)
                hint = sample.pop("_units") or None  # next sample's haystack is about as large
                out.append(sample)
    return out
