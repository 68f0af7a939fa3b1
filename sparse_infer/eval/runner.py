"""Run samples through a model under several attention plans and score them.

`run_eval` validates the request, claims the output directory, then greedy-generates every
sample under every plan and records it in results.json (layout: `sparse_infer.eval.results`)
after each sample. Comparing runs is elsewhere: `merge` (combine results files), `compare`
(answers a plan changed), `tables` (the printed table).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sparse_infer.eval.errors import EvalError
from sparse_infer.eval.outputs import write_json
from sparse_infer.eval.progress import ProgressBar, sample_weight
from sparse_infer.eval.prompts import encode
from sparse_infer.eval.results import (
    FORMAT_VERSION,
    PLAN_KEY,
    RESULTS_FILE,
    WEIGHTS_KEY,
    check_resumable,
    claim_out_dir,
    describe_plan,
    input_sha1,
    load_results,
    model_dtype,
    plan_fingerprint,
    recorded_dtype,
    sample_key,
    summarize,
    weights_fingerprint,
)
from sparse_infer.eval.ruler.catalogue import TASK_NAMES, task_metric
from sparse_infer.eval.scoring import METRICS, postprocess, score_sample


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
        from sparse_infer.runtime import get_stats
    except (ImportError, AttributeError):
        return None
    stats = get_stats(model)
    out = {k: float(stats[k]) for k in ("prefill_density", "decode_density") if stats.get(k) is not None}
    return out or None


def _reset_stats(model: Any) -> None:
    try:
        from sparse_infer.runtime import reset_stats
    except (ImportError, AttributeError):
        return
    reset_stats(model)


# ---------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------


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


class PrefillClock:
    """Wall time of the first forward call of a model: in `generate`, the prefill of the prompt."""

    def __init__(self) -> None:
        self.seconds: float | None = None
        self.calls = 0


@contextmanager
def timing_prefill(model: Any) -> Iterator[PrefillClock]:
    """Time the first forward of `model` within the block (hooks removed afterwards, also on error).

    generate runs the whole prompt through the model's own __call__ first (transformers 5.x
    `_prefill`), then one call per new token, so the first call is the prefill. The clock stays
    empty when the model never runs (a stand-in for generate_one) or is no torch module. On CUDA
    the queued work is waited for on both sides, so the time is the prefill's, not its launch.
    """
    clock = PrefillClock()
    if not callable(getattr(model, "register_forward_pre_hook", None)):
        yield clock
        return
    from sparse_infer.bench.timing import synchronize

    try:
        device = next(model.parameters()).device
    except (AttributeError, StopIteration):
        device = "cpu"
    start = 0.0

    def before(module: Any, args: Any) -> None:
        nonlocal start
        if clock.calls == 0:
            synchronize(device)
            start = time.perf_counter()

    def after(module: Any, args: Any, output: Any) -> None:
        if clock.calls == 0:
            synchronize(device)
            clock.seconds = time.perf_counter() - start
        clock.calls += 1

    handles = [model.register_forward_pre_hook(before), model.register_forward_hook(after)]
    try:
        yield clock
    finally:
        for handle in handles:
            handle.remove()


def warm_up(model: Any) -> None:
    """One short forward before the first timed prefill, so that the first sample is not charged
    the process's one-time costs (lazy initialisation, thread pools, CUDA context and kernels)."""
    if not callable(getattr(model, "register_forward_pre_hook", None)):
        return
    import torch

    try:
        device = next(model.parameters()).device
    except (AttributeError, StopIteration):
        return
    with torch.inference_mode():
        model(input_ids=torch.zeros((1, 16), dtype=torch.long, device=device))


# ---------------------------------------------------------------------------
# Main entry point
# ---------------------------------------------------------------------------


def _model_info(model: Any, fingerprint: str) -> dict[str, Any]:
    cfg = model.config
    return {
        "name_or_path": getattr(cfg, "_name_or_path", None) or getattr(model, "name_or_path", None),
        "model_type": getattr(cfg, "model_type", None),
        "max_position_embeddings": max_positions(cfg),
        "dtype": model_dtype(model),
        WEIGHTS_KEY: fingerprint,
    }


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
    (see `claim_out_dir`). Each record keeps the time of the whole generate call (`seconds`)
    and of its prefill alone (`prefill_seconds`, see `timing_prefill`), after one short warm-up
    forward. Returns the summary rows (see `summarize`). The model is left dense (unpatched)
    afterwards.
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
        check_resumable(doc, path)
        before, now = recorded_dtype(doc.get("model") or {}), model_dtype(model)
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
    shas = {k: input_sha1(s["input"]) for k, s in by_key.items()}
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

    write_json(path, doc)
    if pending:
        warm_up(model)
    total_weight = sum(sample_weight(s) for _, s in pending)
    bar = ProgressBar(progress, total_weight, len(pending))
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
                with timing_prefill(model) as prefill:
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
                if prefill.seconds is not None:
                    # finer than `seconds`: a short prompt's prefill takes milliseconds
                    rec["prefill_seconds"] = round(prefill.seconds, 4)
                stats = _attention_stats(model)
                if stats is not None:
                    rec["stats"] = stats
                doc["plans"][name]["records"].append(rec)
                doc["summary"] = summarize(doc)
                write_json(path, doc)
                bar.advance(sample_weight(sample), f"score {rec['score']:.1f}, {seconds:.0f} s")
    finally:
        if patched:
            _apply_plan(model, None)
    doc["summary"] = summarize(doc)
    write_json(path, doc)
    # Only rows for the plans asked about now (a resumed file may hold others).
    return [r for r in doc["summary"] if r["plan"] in plans]

