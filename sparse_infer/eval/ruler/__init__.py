"""RULER synthetic long-context tasks, generated in-process.

Task definitions, templates, answer prefixes and metrics follow RULER
(Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context
Language Models?"). Differences, all forced by the offline setting or by
exact sizing, are noted where they happen: the essay haystack is the Python
language reference shipped with CPython instead of Paul Graham essays, and
word lists come from that same text instead of `wonderwords`.

A sample is a plain dict::

    {"id", "task", "length", "index", "input", "answers", "max_new_tokens",
     "metric", "tokens", "seed"}

`input` is the final prompt string (chat template and answer prefix
applied); `tokens` is its length in the model tokenizer's tokens, which is
within 1% of (and never above) `length`.

Modules: `catalogue` (task names and settings), `haystack` (seeds, random
values, filler text), one module per task family (`niah`, `variable_tracking`,
`common_words`, `frequent_words`), `sizing` (fitting a prompt to a length),
`generate` (samples) and `user_tasks` (the user's own QA file). Scoring and
prompt formatting are shared with the other evals: `sparse_infer.eval.scoring`
and `sparse_infer.eval.prompts`. The names below are importable from here.
"""

from sparse_infer.eval.errors import EvalError
from sparse_infer.eval.prompts import count_tokens, encode, format_prompt, has_chat_template
from sparse_infer.eval.ruler.catalogue import (
    MAX_NEW_TOKENS,
    NIAH_TASKS,
    QA_TASK,
    TASK_NAMES,
    NiahConfig,
    max_new_tokens_for,
    resolve_tasks,
    task_metric,
)
from sparse_infer.eval.ruler.common_words import CWE_FREQ_CW, CWE_FREQ_UCW, CWE_NUM_CW, cwe_frequencies
from sparse_infer.eval.ruler.frequent_words import FWE_ALPHA, FWE_WORD_LEN, fwe_counts
from sparse_infer.eval.ruler.generate import MIN_UNITS, generate_samples, generate_task, sample_id
from sparse_infer.eval.ruler.haystack import DEPTHS, derive_seed, insert_at_depths
from sparse_infer.eval.ruler.niah import NEEDLE_TEMPLATE
from sparse_infer.eval.ruler.sizing import TOLERANCE, fit_length
from sparse_infer.eval.ruler.user_tasks import load_user_tasks
from sparse_infer.eval.ruler.variable_tracking import VT_NUM_CHAINS, VT_NUM_HOPS
from sparse_infer.eval.scoring import (
    METRICS,
    STRING_MATCH_ALL,
    STRING_MATCH_PART,
    postprocess,
    score_sample,
    string_match_all,
    string_match_part,
)

__all__ = [
    "CWE_FREQ_CW",
    "CWE_FREQ_UCW",
    "CWE_NUM_CW",
    "DEPTHS",
    "FWE_ALPHA",
    "FWE_WORD_LEN",
    "MAX_NEW_TOKENS",
    "METRICS",
    "MIN_UNITS",
    "NEEDLE_TEMPLATE",
    "NIAH_TASKS",
    "QA_TASK",
    "STRING_MATCH_ALL",
    "STRING_MATCH_PART",
    "TASK_NAMES",
    "TOLERANCE",
    "VT_NUM_CHAINS",
    "VT_NUM_HOPS",
    "EvalError",
    "NiahConfig",
    "count_tokens",
    "cwe_frequencies",
    "derive_seed",
    "encode",
    "fit_length",
    "format_prompt",
    "fwe_counts",
    "generate_samples",
    "generate_task",
    "has_chat_template",
    "insert_at_depths",
    "load_user_tasks",
    "max_new_tokens_for",
    "postprocess",
    "resolve_tasks",
    "sample_id",
    "score_sample",
    "string_match_all",
    "string_match_part",
    "task_metric",
]
