"""Samples from the user's own QA file (jsonl, json or parquet), scored like RULER's QA."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sparse_infer.eval.errors import EvalError
from sparse_infer.eval.prompts import count_tokens, format_prompt
from sparse_infer.eval.ruler.catalogue import MAX_NEW_TOKENS, QA_TASK
from sparse_infer.eval.ruler.generate import sample_id
from sparse_infer.eval.scoring import STRING_MATCH_PART, as_answer_list


def _read_records(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import datasets
        except ImportError:
            raise EvalError(f"reading {path.name} needs the datasets library: pip install datasets") from None
        return [dict(r) for r in datasets.load_dataset("parquet", data_files=str(path), split="train")]
    # JSON is read with the stdlib even when datasets is installed: Arrow's
    # schema inference rejects a field that is a string in one record and a
    # list in another (answers: "x" vs ["x", "y"]), which hand-written files do.
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            try:
                return [json.loads(line) for line in fh if line.strip()]
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}: invalid JSON line ({e})") from None
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise EvalError(f"{path}: invalid JSON ({e})") from None
        if isinstance(data, dict):  # {"data": [...]} as written by many exporters
            data = data.get("data", data.get("samples"))
        if not isinstance(data, list):
            raise EvalError(f"{path}: expected a list of records or {{'data': [...]}}")
        return data
    raise EvalError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")


def _length_bucket(tokens: int, lengths: Sequence[int] | None) -> int:
    # Group user samples with the smallest requested length that holds them,
    # else the next power of two, so the summary has few rows.
    for L in sorted(lengths or []):
        if tokens <= L:
            return L
    return 1 << max(0, (tokens - 1).bit_length())


def load_user_tasks(
    file: str | Path,
    tokenizer: Any = None,
    *,
    lengths: Sequence[int] | None = None,
    limit: int | None = None,
    task: str = QA_TASK,
    max_new_tokens: int = MAX_NEW_TOKENS[QA_TASK],
    chat_template: bool | None = None,
) -> list[dict[str, Any]]:
    """QA samples from a jsonl/json/parquet file with `input` and `answers` fields.

    Optional per-record fields: `task`, `answer_prefix`, `max_new_tokens`,
    `metric` (default string_match_part, as RULER's QA). With a tokenizer the
    prompt gets the chat template and `length` is a bucket of its token count.
    """
    path = Path(file)
    if not path.is_file():
        raise EvalError(f"data file not found: {path}")
    records = _read_records(path)
    if limit is not None:
        records = records[:limit]
    samples = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or "input" not in rec or "answers" not in rec:
            raise EvalError(f"{path}: record {i} needs 'input' and 'answers' fields")
        answers = as_answer_list(rec["answers"])
        if not answers or not all(isinstance(a, str) for a in answers):
            raise EvalError(f"{path}: record {i}: 'answers' must be a string or a list of strings")
        name = str(rec.get("task") or task)
        prefix = str(rec.get("answer_prefix") or "")
        if prefix and not prefix.startswith(" "):
            prefix = " " + prefix
        prompt = format_prompt(tokenizer, rec["input"], prefix, chat_template) if tokenizer else rec["input"] + prefix
        tokens = count_tokens(tokenizer, prompt) if tokenizer else 0
        length = _length_bucket(tokens, lengths) if tokenizer else int(rec.get("length", 0))
        samples.append(
            {
                "id": sample_id(name, length, i),
                "task": name,
                "length": length,
                "index": i,
                "input": prompt,
                "answers": answers,
                "max_new_tokens": int(rec.get("max_new_tokens") or max_new_tokens),
                "metric": str(rec.get("metric") or STRING_MATCH_PART),
                "tokens": tokens,
            }
        )
    if not samples:
        raise EvalError(f"{path}: no records")
    return samples
