"""results.json: its layout, reading it, fingerprints, the claim on its directory, the summary.

Layout (rewritten atomically after every sample, so Ctrl-C loses at most the sample in
flight)::

    {"version": 1, "model": {..., "dtype", "weights_sha256"},
     "plans": {NAME: {"plan": <description>, "plan_sha256": <hex>, "records": [RECORD, ...]}},
     "summary": [{"plan", "length", "task", "score", "n"[, "prefill_density", "decode_density",
                  "prefill_seconds"]}, ...]}

`weights_sha256` (see `weights_fingerprint`) and `plan_sha256` (see `plan_fingerprint`) let
--resume and `eval merge` check that stored records come from the same weights and the same
plan content; files written before they existed lack them.

A RECORD is the sample without its (possibly 128K-token) `input`, plus
`input_sha1`, `prediction`, `score`, `new_tokens`, `seconds` (the whole generate call),
`prefill_seconds` (its first forward, the prompt's prefill; absent in files written before it
was recorded) and, when the patch layer reports it, `stats`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sparse_infer.eval.errors import EvalError
from sparse_infer.eval.outputs import check_writable_dir, locked_dir
from sparse_infer.eval.ruler.catalogue import TASK_NAMES

RESULTS_FILE = "results.json"
FORMAT_VERSION = 1
DEFAULT_DTYPE = "float32"
WEIGHTS_KEY = "weights_sha256"
PLAN_KEY = "plan_sha256"


def sample_key(sample: Mapping[str, Any]) -> str:
    """The id a sample's record is stored and compared under."""
    return str(sample.get("id") or f"{sample['task']}/{sample['length']}/{sample['index']}")


def input_sha1(prompt: str) -> str:
    """A record's `input_sha1`: tells whether two records answered the same prompt."""
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()


def length_task_order(length: int, task: str) -> tuple[int, int, str]:
    """Sort key of summary rows and table rows: by length, then RULER's task order, then name."""
    return length, _TASK_ORDER.get(task, 99), task


_TASK_ORDER = {task: i for i, task in enumerate(TASK_NAMES)}


# ---------------------------------------------------------------------------
# Values as results.json stores them
# ---------------------------------------------------------------------------


def jsonable(obj: Any) -> Any:
    """`obj` as plain JSON values (tensors, dataclasses and plans included; NaN becomes null)."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # tensors / numpy
        return jsonable(obj.tolist())
    if hasattr(obj, "to_dict"):
        return jsonable(obj.to_dict())
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return jsonable(dataclasses.asdict(obj))
    return str(obj)


def describe_plan(plan: Any) -> Any:
    """A plan as a results file names it: its path, its name, or its content."""
    if plan is None:
        return None
    if isinstance(plan, os.PathLike):
        return str(plan)
    return jsonable(plan)


def model_dtype(model: Any) -> str:
    """The dtype of the model's weights, as results.json records it ("float32", "bfloat16", ...)."""
    try:
        return str(next(model.parameters()).dtype).removeprefix("torch.")
    except (AttributeError, StopIteration):
        return DEFAULT_DTYPE


def recorded_dtype(model_info: Mapping[str, Any]) -> str:
    """The dtype a results file's `model` entry records."""
    # files written before the dtype was recorded all come from float32 runs
    return model_info.get("dtype") or DEFAULT_DTYPE


# ---------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------


def weights_fingerprint(model: Any) -> str:
    """sha256 over every parameter's name, dtype, shape and bytes, in the model's own order.

    The identity of the weights themselves, whatever they were loaded from (built-in GGUF, HF
    directory, a model built in-process): a name says nothing about a re-downloaded, re-quantized
    or fine-tuned file. All bytes rather than a sample, so that a change confined to one tensor
    (a fine-tuned head) still shows; at ~1 GB/s this costs seconds even for a 0.5B model in
    float32, next to minutes of loading and hours of generation. Parameters only: buffers are
    derived from the config (rotary tables) or are run state. Tied weights count once, as
    named_parameters lists them once."""
    import torch

    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        tensor = param.detach()
        digest.update(f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{tuple(tensor.shape)}\n".encode())
        if tensor.numel():
            raw = tensor.contiguous().reshape(-1).view(torch.uint8).cpu()
            digest.update(memoryview(raw.numpy()))
    return digest.hexdigest()


def plan_fingerprint(plan: Any) -> str:
    """sha256 of what a loaded plan makes the model do: its model shape and its prefill and
    decode sections, as canonical JSON (sorted keys). Dense (None) has a fingerprint too.

    The plan's `profile` block is left out: it records how the plan was made (a preset stamps
    the date it was built), which does not change a single attention score. A plan file that is
    moved or renamed keeps its fingerprint; one edited in place does not."""
    if plan is None:
        content: Any = None
    else:
        content = plan.to_dict() if hasattr(plan, "to_dict") else dict(plan)
        content = {k: v for k, v in content.items() if k != "profile"}
    canonical = json.dumps(jsonable(content), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------
# Reading, and the claim on the results directory
# ---------------------------------------------------------------------------


def load_results(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir) / RESULTS_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EvalError(f"no {RESULTS_FILE} in {out_dir}") from None
    except json.JSONDecodeError as e:
        raise EvalError(f"{path} is not valid JSON ({e}); remove it or use another --out") from None
    if not isinstance(doc, dict) or "plans" not in doc:
        raise EvalError(f"{path} is not a sparse_infer results file")
    return doc


def check_resumable(doc: Mapping[str, Any], path: Path) -> None:
    """A stored results file --resume can add to: one that records its weights and plans."""
    lacking = [] if (doc.get("model") or {}).get(WEIGHTS_KEY) else ["the model's weights"]
    lacking += [f"plan {name!r}" for name, entry in doc["plans"].items() if not entry.get(PLAN_KEY)]
    if lacking:
        raise EvalError(
            f"--resume: {path} does not record the fingerprint of {', '.join(lacking)} (it was written by an "
            "older sparse_infer or merged from such files), so it cannot be checked that new samples run the "
            "same weights and plans; run into another --out and combine the two with `sparse-infer eval merge`"
        )


@contextmanager
def claim_out_dir(out_dir: str | Path, resume: bool) -> Iterator[Path]:
    """Check OUT before any model work and keep it to this run until the block ends.

    Refuses, with the way out in the message: an OUT that cannot be written; one another run
    is writing (a lock held for the whole run); results.json already there without `resume`
    (it would be replaced); with `resume`, a results.json that cannot be checked (no
    fingerprints). Claims nest, so run_eval can claim what its caller already holds. A
    directory made here that ends up without results is removed again."""
    with holding_out_dir(out_dir) as out:
        path = out / RESULTS_FILE
        if path.exists() and not resume:
            raise EvalError(f"{path} already holds results; add --resume to continue them (same model "
                            "weights, plans and --dtype), or choose another --out")
        if resume and path.exists():
            check_resumable(load_results(out), path)
        yield out


@contextmanager
def holding_out_dir(out_dir: str | Path) -> Iterator[Path]:
    """OUT made if needed, proved writable and locked for the block; removed again if made
    here and left without results."""
    out = Path(out_dir)
    created = check_writable_dir(out)
    try:
        with locked_dir(out):
            yield out
    finally:
        if created and not (out / RESULTS_FILE).exists():
            try:
                out.rmdir()
            except OSError:
                pass  # something else was put there: leave it


# ---------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------


def summarize(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Mean score per (plan, length, task), plans in run order, then length, then task order.

    Measured densities and `prefill_seconds` are means over the records that have them (records
    of older files have no prefill time); a row none of whose records has one lacks the key."""
    rows = []
    for plan_name, entry in doc["plans"].items():
        groups: dict[tuple[int, str], list[Mapping[str, Any]]] = {}
        for rec in entry.get("records", []):
            groups.setdefault((int(rec["length"]), rec["task"]), []).append(rec)
        for (length, task), recs in sorted(groups.items(), key=lambda kv: length_task_order(*kv[0])):
            row = {
                "plan": plan_name,
                "length": length,
                "task": task,
                "score": sum(r["score"] for r in recs) / len(recs),
                "n": len(recs),
            }
            for key in ("prefill_density", "decode_density"):
                vals = [r["stats"][key] for r in recs if isinstance(r.get("stats"), Mapping) and key in r["stats"]]
                if vals:
                    row[key] = sum(vals) / len(vals)
            times = [float(r["prefill_seconds"]) for r in recs if r.get("prefill_seconds") is not None]
            if times:
                row["prefill_seconds"] = sum(times) / len(times)
            rows.append(row)
    return rows
