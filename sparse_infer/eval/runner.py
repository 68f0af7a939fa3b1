"""Run samples through a model under several attention plans and score them.

results.json layout (rewritten atomically after every sample, so Ctrl-C
loses at most the sample in flight)::

    {"version": 1, "model": {..., "dtype", "weights_sha256"},
     "plans": {NAME: {"plan": <description>, "plan_sha256": <hex>, "records": [RECORD, ...]}},
     "summary": [{"plan", "length", "task", "score", "n"[, "prefill_density", "decode_density"]}, ...]}

`weights_sha256` (see `weights_fingerprint`) and `plan_sha256` (see `plan_fingerprint`) let
--resume and `eval merge` check that stored records come from the same weights and the same
plan content; files written before they existed lack them.

A RECORD is the sample without its (possibly 128K-token) `input`, plus
`input_sha1`, `prediction`, `score`, `new_tokens`, `seconds` and, when the
patch layer reports it, `stats`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sparse_infer.eval.ruler import (
    METRICS,
    TASK_NAMES,
    EvalError,
    encode,
    postprocess,
    score_sample,
    task_metric,
)
from sparse_infer.eval.outputs import check_writable_dir, locked_dir, write_json

RESULTS_FILE = "results.json"
FORMAT_VERSION = 1
DEFAULT_DTYPE = "float32"
DENSE = "dense"
WEIGHTS_KEY = "weights_sha256"
PLAN_KEY = "plan_sha256"


# ---------------------------------------------------------------------------
# Validation (cheap; runs before any generation)
# ---------------------------------------------------------------------------


def max_positions(config: Any) -> int | None:
    # Multimodal configs keep the language model's limits in a sub-config.
    get_text = getattr(config, "get_text_config", None)
    text_cfg = get_text() if callable(get_text) else config
    value = getattr(text_cfg, "max_position_embeddings", None)
    return int(value) if value else None


def validate_lengths(config: Any, lengths: Sequence[int]) -> None:
    limit = max_positions(config)
    bad = sorted({int(L) for L in lengths if limit is not None and int(L) > limit})
    if bad:
        raise EvalError(f"length(s) {', '.join(map(str, bad))} exceed the model's max_position_embeddings ({limit})")
    nonpos = [L for L in lengths if int(L) <= 0]
    if nonpos:
        raise EvalError(f"lengths must be positive, got {nonpos}")


def _validate_samples(samples: Sequence[Mapping[str, Any]]) -> None:
    if not samples:
        raise EvalError("no samples to evaluate")
    seen = set()
    for s in samples:
        task = s.get("task")
        metric = s.get("metric")
        if metric is None and task not in TASK_NAMES:
            raise EvalError(f"unknown task {task!r}; valid: {', '.join(TASK_NAMES)} (or give the sample a 'metric')")
        if metric is not None and metric not in METRICS:
            raise EvalError(f"sample {sample_key(s)}: unknown metric {metric!r}; valid: {', '.join(METRICS)}")
        key = sample_key(s)
        if key in seen:
            raise EvalError(f"duplicate sample id {key!r}")
        seen.add(key)


def resolve_plan(plan: Any, config: Any) -> Any:
    """Load a plan (path, shipped name, preset name, dict or Plan) against the model config; None = dense.

    Loading here, before any generation, makes a plan written for another
    model fail at once with the plan loader's PlanError.
    """
    if plan is None:
        return None
    from sparse_infer.plan import (
        load_plan,  # lazy: the eval package must import without it
    )

    return load_plan(plan, model_config=config)


def validate(model: Any, samples: Sequence[Mapping[str, Any]], plans: Mapping[str, Any]) -> dict[str, Any]:
    """Check tasks, lengths and plans; return the loaded plans by name."""
    if not plans:
        raise EvalError("no plans to evaluate")
    _validate_samples(samples)
    validate_lengths(model.config, [int(s["length"]) for s in samples])
    return {name: resolve_plan(plan, model.config) for name, plan in plans.items()}


# ---------------------------------------------------------------------------
# Patching
# ---------------------------------------------------------------------------


def _apply_plan(model: Any, plan: Any) -> None:
    """Make the model run `plan` (None = dense attention)."""
    try:
        import sparse_infer as si

        patch, unpatch = si.patch, si.unpatch
    except (ImportError, AttributeError):
        if plan is None:
            return  # dense needs nothing when the patch layer is not there
        raise EvalError("sparse_infer.patch is not available; cannot run a sparse plan") from None
    unpatch(model)  # start from dense so plans never stack
    if plan is not None:
        # the accuracy of the plan as written: no head switched to dense because this
        # machine's executor would be faster that way (patch's dense_above="auto")
        patch(model, plan, dense_above=1.0)


def _attention_stats(model: Any) -> dict[str, float] | None:
    """Measured prefill/decode density from the patch layer (None when dense or unavailable).

    Per-layer detail is dropped: it would dominate results.json.
    """
    try:
        from sparse_infer.patches.attention import get_stats
    except (ImportError, AttributeError):
        return None
    stats = get_stats(model)
    out = {k: float(stats[k]) for k in ("prefill_density", "decode_density") if stats.get(k) is not None}
    return out or None


def _reset_stats(model: Any) -> None:
    try:
        from sparse_infer.patches.attention import reset_stats
    except (ImportError, AttributeError):
        return
    reset_stats(model)


def _jsonable(obj: Any) -> Any:
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # tensors / numpy
        return _jsonable(obj.tolist())
    if hasattr(obj, "to_dict"):
        return _jsonable(obj.to_dict())
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return _jsonable(dataclasses.asdict(obj))
    return str(obj)


def describe_plan(plan: Any) -> Any:
    if plan is None:
        return None
    if isinstance(plan, os.PathLike):
        return str(plan)
    return _jsonable(plan)


# ---------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------


def sample_key(sample: Mapping[str, Any]) -> str:
    return str(sample.get("id") or f"{sample['task']}/{sample['length']}/{sample['index']}")


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def generate_one(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> tuple[str, int]:
    """Greedy completion of `prompt`; returns (decoded new text, number of new tokens)."""
    import torch

    ids = encode(tokenizer, prompt)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    extra = {}
    if getattr(model, "config", None) is not None:
        from sparse_infer.cache import AppendCache

        # in-place K/V appends instead of DynamicCache's per-step copy (same results, dense or sparse)
        extra["cache"] = AppendCache(config=model.config)
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=int(max_new_tokens),
            pad_token_id=pad,
            **extra,
        )
    new = out[0, input_ids.shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=True), int(new.numel())


# ---------------------------------------------------------------------------
# Results file
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


def _write_json(path: Path, doc: Any) -> None:
    # a temporary file of this writer's own, then a rename: an interrupt never leaves half a file
    write_json(Path(path), doc)


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
    canonical = json.dumps(_jsonable(content), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def model_dtype(model: Any) -> str:
    """The dtype of the model's weights, as results.json records it ("float32", "bfloat16", ...)."""
    try:
        return str(next(model.parameters()).dtype).removeprefix("torch.")
    except (AttributeError, StopIteration):
        return DEFAULT_DTYPE


def _dtype_of(info: Mapping[str, Any]) -> str:
    # files written before the dtype was recorded all come from float32 runs
    return info.get("dtype") or DEFAULT_DTYPE


def _model_info(model: Any, fingerprint: str) -> dict[str, Any]:
    cfg = model.config
    return {
        "name_or_path": getattr(cfg, "_name_or_path", None) or getattr(model, "name_or_path", None),
        "model_type": getattr(cfg, "model_type", None),
        "max_position_embeddings": max_positions(cfg),
        "dtype": model_dtype(model),
        WEIGHTS_KEY: fingerprint,
    }


def _check_resumable(doc: Mapping[str, Any], path: Path) -> None:
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
    with _holding(out_dir) as out:
        path = out / RESULTS_FILE
        if path.exists() and not resume:
            raise EvalError(f"{path} already holds results; add --resume to continue them (same model "
                            "weights, plans and --dtype), or choose another --out")
        if resume and path.exists():
            _check_resumable(load_results(out), path)
        yield out


@contextmanager
def _holding(out_dir: str | Path) -> Iterator[Path]:
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


def summarize(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Mean score per (plan, length, task), plans in run order, then length, then task order."""
    rows = []
    for plan_name, entry in doc["plans"].items():
        groups: dict[tuple[int, str], list[Mapping[str, Any]]] = {}
        for rec in entry.get("records", []):
            groups.setdefault((int(rec["length"]), rec["task"]), []).append(rec)
        order = {t: i for i, t in enumerate(TASK_NAMES)}
        for (length, task), recs in sorted(
            groups.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 99), kv[0][1])
        ):
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
            rows.append(row)
    return rows


def _source_and_plans(source) -> tuple[Path, list[str] | None]:
    """'DIR' -> (DIR, None); 'DIR:a,b' -> (DIR, ['a', 'b']) when DIR is a directory."""
    text = str(source)
    head, sep, tail = text.rpartition(":")
    if sep and tail and Path(head).is_dir():
        return Path(head), [n for n in tail.split(",") if n]
    return Path(text), None


def merge_results(sources: Sequence[str | Path], out_dir: str | Path, common: bool = False) -> dict[str, Any]:
    """Merge the results.json of runs split over processes or machines into OUT/results.json.

    Runs may split the samples (e.g. by --tasks) or the plans (dense in one, the plan in
    another). They must come from the same model; a plan name must mean the same plan in every
    source, and a sample present in several sources must have the same prompt (its input_sha1).
    A sample's first record is kept. OUT may be one of the sources; an existing OUT/results.json
    that is not a source is refused rather than overwritten. Returns the merged document.

    A source written DIR:NAME[,NAME...] contributes only those plans (e.g. the dense records of
    a run whose plan of the same name has since been replaced); a named plan it lacks is an error.

    common=True keeps only the samples that every plan has finished, so that runs still under
    way (dense ahead of the plan, say) compare on the same prompts; none in common is an error."""
    out = Path(out_dir)
    picked = [_source_and_plans(s) for s in sources]
    paths = [p for p, _ in picked]
    if not paths:
        raise EvalError("nothing to merge: give at least one results directory")
    target = out / RESULTS_FILE
    if target.exists() and not any(target.resolve() == (p / RESULTS_FILE).resolve() for p in paths):
        raise EvalError(f"{target} exists and is not one of the sources; use another --out or list it as a source")
    # locked: an eval still writing into OUT would otherwise replace the merge, or the merge its records
    with _holding(out):
        return _merge(picked, out, target, common)


def _merge(picked: list[tuple[Path, list[str] | None]], out: Path, target: Path, common: bool) -> dict[str, Any]:
    docs = []
    for path, names in picked:
        doc = load_results(path)
        if names is not None:
            missing = [n for n in names if n not in doc["plans"]]
            if missing:
                raise EvalError(f"{path} has no plan {', '.join(map(repr, missing))} "
                                f"(it has {', '.join(map(repr, doc['plans']))})")
            doc = {**doc, "plans": {n: doc["plans"][n] for n in names}}
        docs.append((path, doc))
    first_path, first = docs[0]
    model = first.get("model") or {}
    merged: dict[str, Any] = {"version": FORMAT_VERSION, "model": dict(model), "plans": {}, "summary": []}
    seen: dict[str, dict[str, tuple[Path, str | None]]] = {}
    weights = {path: (doc.get("model") or {}).get(WEIGHTS_KEY) for path, doc in docs}
    known_weights = next(((path, sha) for path, sha in weights.items() if sha), (None, None))
    for path, doc in docs:
        other = doc.get("model") or {}
        for key in ("name_or_path", "model_type"):
            if other.get(key) != model.get(key):
                raise EvalError(f"{path} is for model {other.get(key)!r}, {first_path} for {model.get(key)!r}")
        if _dtype_of(other) != _dtype_of(model):
            raise EvalError(f"{path} was run in {_dtype_of(other)}, {first_path} in {_dtype_of(model)}: "
                            "scores of different dtypes do not go in one table")
        if weights[path] and weights[path] != known_weights[1]:
            raise EvalError(f"{path} and {known_weights[0]} were run with different weights of model "
                            f"{model.get('name_or_path')!r} (weights sha256 {weights[path][:12]}… and "
                            f"{known_weights[1][:12]}…): their scores do not go in one table")
        for name, entry in doc["plans"].items():
            target_entry = merged["plans"].setdefault(
                name, {"plan": entry.get("plan"), PLAN_KEY: entry.get(PLAN_KEY), "records": []})
            # the fingerprints decide where both sources have one (a plan file may have moved);
            # older sources are compared by the plan as they describe it
            ours, theirs = target_entry[PLAN_KEY], entry.get(PLAN_KEY)
            same = ours == theirs if ours and theirs else target_entry["plan"] == entry.get("plan")
            if not same:
                raise EvalError(f"plan {name!r} is {entry.get('plan')!r} in {path} but {target_entry['plan']!r} "
                                "in an earlier source" + (" (other content)" if ours and theirs else ""))
            if not theirs:
                target_entry["unchecked"] = True
            elif not ours:
                target_entry[PLAN_KEY] = theirs
            ids = seen.setdefault(name, {})
            for rec in entry.get("records", []):
                key = rec.get("id")
                if key in ids:
                    if ids[key][1] != rec.get("input_sha1"):
                        raise EvalError(f"{key} has a different prompt in {path} than in {ids[key][0]} "
                                        "(other seed, tokenizer or data)")
                    continue
                ids[key] = (path, rec.get("input_sha1"))
                target_entry["records"].append(rec)
    # a fingerprint is kept only where every source had it, so that a --resume into the merged
    # directory is refused rather than checked against part of its records
    if not all(weights.values()):
        merged["model"].pop(WEIGHTS_KEY, None)
    for entry in merged["plans"].values():
        if entry.pop("unchecked", False) or not entry.get(PLAN_KEY):
            entry.pop(PLAN_KEY, None)
    if common:
        shared = set.intersection(*(set(ids) for ids in seen.values())) if seen else set()
        if not shared:
            raise EvalError("--common: no sample is finished under every plan "
                            f"({', '.join(f'{name}: {len(ids)}' for name, ids in seen.items())} samples)")
        for entry in merged["plans"].values():
            entry["records"] = [rec for rec in entry["records"] if rec.get("id") in shared]
    merged["summary"] = summarize(merged)
    _write_json(target, merged)
    return merged


# ---------------------------------------------------------------------------
# Main entry point
# ---------------------------------------------------------------------------


def run_eval(
    model: Any,
    tokenizer: Any,
    samples: Sequence[Mapping[str, Any]],
    plans: Mapping[str, Any],
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Greedy-generate every sample under every plan, score, and keep results.json current.

    `plans` maps a display name to a plan (path, preset name, dict or Plan) or
    None for dense attention. With `resume`, samples already in results.json
    for a plan are skipped, once the stored weights, dtype and plan fingerprints
    are checked to be this run's; without it an existing results.json is refused
    (see `claim_out_dir`). Returns the summary rows (see `summarize`). The
    model is left dense (unpatched) afterwards.
    """
    loaded = validate(model, samples, plans)
    with claim_out_dir(out_dir, resume) as out:
        return _run_claimed(model, tokenizer, samples, plans, loaded, out, resume, progress)


def _run_claimed(
    model: Any,
    tokenizer: Any,
    samples: Sequence[Mapping[str, Any]],
    plans: Mapping[str, Any],
    loaded: Mapping[str, Any],
    out: Path,
    resume: bool,
    progress: bool,
) -> list[dict[str, Any]]:
    path = out / RESULTS_FILE
    fingerprint = weights_fingerprint(model)
    plan_sha = {name: plan_fingerprint(plan) for name, plan in loaded.items()}

    doc: dict[str, Any]
    if resume and path.exists():
        doc = load_results(out)
        _check_resumable(doc, path)
        before, now = _dtype_of(doc.get("model") or {}), model_dtype(model)
        if before != now:
            raise EvalError(f"--resume: {path} was run in {before}, now {now}; use the same --dtype or another --out")
        if doc["model"][WEIGHTS_KEY] != fingerprint:
            stored = doc["model"].get("name_or_path")
            raise EvalError(f"--resume: {path} was run with other weights (model {stored!r}, weights sha256 "
                            f"{doc['model'][WEIGHTS_KEY][:12]}…, now {fingerprint[:12]}…); use the same model or "
                            "another --out")
    else:
        doc = {"version": FORMAT_VERSION, "model": _model_info(model, fingerprint), "plans": {}, "summary": []}

    by_key = {sample_key(s): s for s in samples}
    shas = {k: _sha1(s["input"]) for k, s in by_key.items()}
    pending: list[tuple[str, Mapping[str, Any]]] = []
    for name in plans:
        entry = doc["plans"].setdefault(
            name, {"plan": describe_plan(plans[name]), PLAN_KEY: plan_sha[name], "records": []})
        if entry[PLAN_KEY] != plan_sha[name]:
            # one name, one plan: records of two plans under one name would be averaged together
            raise EvalError(
                f"--resume: {path} holds another plan under the name {name!r} ({entry.get('plan')!r}, "
                f"sha256 {entry[PLAN_KEY][:12]}…; now {describe_plan(plans[name])!r}, sha256 {plan_sha[name][:12]}…); "
                "use another --out, or give this plan another name"
            )
        done = set()
        for rec in entry["records"]:
            key = rec.get("id")
            if key in shas and rec.get("input_sha1") != shas[key]:
                raise EvalError(
                    f"--resume: {path} holds a different prompt for {key} (other seed, tokenizer or data); "
                    "use another --out or drop --resume"
                )
            done.add(key)
        pending += [(name, s) for s in samples if sample_key(s) not in done]

    _write_json(path, doc)
    total_weight = sum(_weight(s) for _, s in pending)
    bar = _Progress(progress, total_weight, len(pending))
    current: str | None = None
    patched = False
    try:
        with bar:
            for name, sample in pending:
                if name != current:
                    _apply_plan(model, loaded[name])
                    current, patched = name, patched or loaded[name] is not None
                bar.describe(f"{name} {sample['task']} @{sample['length']}")
                _reset_stats(model)
                t0 = time.perf_counter()
                raw, n_new = generate_one(model, tokenizer, sample["input"], int(sample["max_new_tokens"]))
                seconds = time.perf_counter() - t0
                metric = sample.get("metric") or task_metric(sample["task"])
                rec = {k: v for k, v in sample.items() if k != "input"}
                rec.update(
                    id=sample_key(sample),
                    metric=metric,
                    input_sha1=shas[sample_key(sample)],
                    prediction=postprocess(raw),
                    score=score_sample(raw, sample["answers"], metric),
                    new_tokens=n_new,
                    seconds=round(seconds, 3),
                )
                stats = _attention_stats(model)
                if stats is not None:
                    rec["stats"] = stats
                doc["plans"][name]["records"].append(rec)
                doc["summary"] = summarize(doc)
                _write_json(path, doc)
                bar.advance(_weight(sample), f"score {rec['score']:.1f}, {seconds:.0f} s")
    finally:
        if patched:
            _apply_plan(model, None)
    doc["summary"] = summarize(doc)
    _write_json(path, doc)
    # Only rows for the plans asked about now (a resumed file may hold others).
    return [r for r in doc["summary"] if r["plan"] in plans]


def _weight(sample: Mapping[str, Any]) -> int:
    # Cost grows with prompt length; weighting the bar by tokens keeps the ETA
    # honest when short prompts run first.
    return max(1, int(sample.get("tokens") or sample.get("length") or 1)) + 8 * int(sample.get("max_new_tokens", 0))


class _Progress:
    """rich progress bar (weighted by prompt tokens), a line per sample where the
    console is not a terminal (logs of long runs under nohup), or nothing."""

    def __init__(self, enabled: bool, total: int, count: int):
        self.enabled = enabled and count > 0
        self.count = count
        self.done = 0
        if self.enabled:
            from rich.progress import (
                BarColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._p = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[samples]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
            )
            self._task = self._p.add_task("", total=total, samples=f"0/{count}")

    def __enter__(self) -> _Progress:
        if self.enabled:
            self._p.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self._p.__exit__(*exc)

    def describe(self, text: str) -> None:
        if self.enabled:
            self._p.update(self._task, description=text)

    def advance(self, weight: int, result: str = "") -> None:
        self.done += 1
        if not self.enabled:
            return
        self._p.update(self._task, advance=weight, samples=f"{self.done}/{self.count}")
        if not self._p.console.is_terminal:
            # rich draws no live bar into a file or pipe: print one line per sample instead.
            # The ETA is the mean rate so far; rich's own estimate looks at the last 30 s
            # only, and one long sample takes minutes.
            task = self._p.tasks[0]  # the only task
            elapsed = task.elapsed or 0.0
            eta = elapsed * task.remaining / max(task.completed, 1)
            self._p.console.print(
                f"{self.done}/{self.count} {task.description}: {result}; "
                f"elapsed {_clock(elapsed)}, ETA {_clock(eta)}",
                highlight=False,
                soft_wrap=True,
            )


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


# ---------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------


def pick_baseline(plans: Sequence[str], baseline: str | None) -> str | None:
    """`baseline` if it is among the plans, else "dense" if present, else the first plan."""
    if baseline in plans:
        return baseline
    return DENSE if DENSE in plans else (plans[0] if plans else None)


def changed_answers(doc: Mapping[str, Any], baseline: str | None = None) -> tuple[str | None, dict[str, dict]]:
    """Per plan, the samples whose score differs from the baseline's on the same prompt.

    Averages hide swaps: a plan can lose one answer and gain another and score the same. Only
    samples both finished on the same prompt (same id and input_sha1) are compared; the rest are
    counted as "other_prompt". Returns (baseline name, {plan: {"common", "lower", "higher",
    "other_prompt"}}), where lower/higher list (id, baseline score, plan score) in run order."""
    base = pick_baseline(list(doc["plans"]), baseline)
    if base is None:
        return None, {}
    changes: dict[str, dict] = {}
    for name, entry in doc["plans"].items():
        if name == base:
            continue
        pairs, other_prompt = pair_records(doc["plans"][base], entry)
        found = {"common": len(pairs), "lower": [], "higher": [], "other_prompt": other_prompt}
        for ref_rec, rec in pairs:
            before, after = float(ref_rec["score"]), float(rec["score"])
            if after != before:
                found["lower" if after < before else "higher"].append((rec.get("id"), before, after))
        changes[name] = found
    return base, changes


def pair_records(base_entry: Mapping[str, Any], entry: Mapping[str, Any]) -> tuple[list[tuple[dict, dict]], int]:
    """(baseline record, record) for each sample both plans finished on the same prompt, in the
    plan's run order, and how many share an id but not the prompt (not comparable)."""
    ref = {r.get("id"): r for r in base_entry.get("records", [])}
    pairs, other_prompt = [], 0
    for rec in entry.get("records", []):
        ref_rec = ref.get(rec.get("id"))
        if ref_rec is None:
            continue
        if ref_rec.get("input_sha1") != rec.get("input_sha1"):
            other_prompt += 1
            continue
        pairs.append((ref_rec, rec))
    return pairs, other_prompt


def describe_changes(base: str | None, changes: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One line per plan: how many answers differ from the baseline's, and which."""

    def listing(items: Sequence[tuple]) -> str:
        return ", ".join(f"{sid} {a:.4g}→{b:.4g}" for sid, a, b in items)

    def samples(n: int) -> str:
        return f"{n} sample" + ("" if n == 1 else "s")

    lines = []
    for name, found in changes.items():
        n, lower, higher = found["common"], found["lower"], found["higher"]
        if not n:
            line = f"{name}: no sample in common with {base}"
        elif not lower and not higher:
            line = f"{name}: every answer scores as {base}'s ({samples(n)} in common)"
        else:
            line = (f"{name}: {len(lower) + len(higher)} of {samples(n)} score differently from {base}: "
                    f"{len(lower)} lower, {len(higher)} higher")
            if lower:
                line += f"; lower: {listing(lower)}"
            if higher:
                line += f"; higher: {listing(higher)}"
        if found["other_prompt"]:
            line += f" ({samples(found['other_prompt'])} with the same id but another prompt, not compared)"
        lines.append(line)
    return lines


def render_table(rows: Sequence[Mapping[str, Any]], baseline: str | None = None, title: str | None = None):
    """rich Table: one score column per plan and, per other plan, its difference to the baseline.

    The baseline is `baseline`, else "dense" if present, else the first plan.
    Each length ends with an average row over its tasks.
    """
    from rich.table import Table

    plans = list(dict.fromkeys(r["plan"] for r in rows))
    base = pick_baseline(plans, baseline)
    others = [p for p in plans if p != base]
    scores = {(r["plan"], int(r["length"]), r["task"]): float(r["score"]) for r in rows}
    density = {
        (r["plan"], int(r["length"]), r["task"]): r["prefill_density"]
        for r in rows
        if r.get("prefill_density") is not None
    }
    dens_plans = [p for p in others if any(k[0] == p for k in density)]
    counts = {(int(r["length"]), r["task"]): r["n"] for r in rows}
    keys = list(dict.fromkeys((int(r["length"]), r["task"]) for r in rows))
    order = {t: i for i, t in enumerate(TASK_NAMES)}
    keys.sort(key=lambda k: (k[0], order.get(k[1], 99), k[1]))

    table = Table(title=title, show_lines=False)
    table.add_column("length", justify="right")
    table.add_column("task")
    table.add_column("n", justify="right")
    for p in plans:
        table.add_column(p, justify="right")
    if base is not None:
        for p in others:
            table.add_column(f"Δ {p}", justify="right")
    for p in dens_plans:
        table.add_column(f"density {p}", justify="right")  # measured prefill density

    def cells(getter, dens_getter) -> list[str]:
        vals = [getter(p) for p in plans]
        out = [f"{v:.1f}" if v is not None else "-" for v in vals]
        b = getter(base) if base is not None else None
        if base is not None:
            for p in others:
                v = getter(p)
                out.append(_diff_cell(v - b) if v is not None and b is not None else "-")
        for p in dens_plans:
            d = dens_getter(p)
            out.append(f"{d:.0%}" if d is not None else "-")
        return out

    lengths = list(dict.fromkeys(k[0] for k in keys))
    for i, length in enumerate(lengths):
        tasks = [t for (L, t) in keys if L == length]
        for task in tasks:
            table.add_row(
                str(length),
                task,
                str(counts[(length, task)]),
                *cells(
                    lambda p, k=(length, task): scores.get((p, *k)), lambda p, k=(length, task): density.get((p, *k))
                ),
            )
        if len(tasks) > 1:

            def avg(table_: dict, p: str, length: int = length, tasks: list[str] = tasks) -> float | None:
                vals = [table_[(p, length, t)] for t in tasks if (p, length, t) in table_]
                return sum(vals) / len(vals) if vals and len(vals) == len(tasks) else None

            table.add_row(
                str(length),
                "[bold]average[/]",
                "",
                *cells(lambda p: avg(scores, p), lambda p: avg(density, p)),
                end_section=i < len(lengths) - 1,
            )
        elif i < len(lengths) - 1:
            table.add_section()
    return table


def _diff_cell(d: float) -> str:
    if d <= -1.0:
        return f"[red]{d:+.1f}[/]"
    if d >= 1.0:
        return f"[green]{d:+.1f}[/]"
    return f"{d:+.1f}"
