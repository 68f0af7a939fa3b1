"""`eval merge`: one results.json from the results of runs split over processes or machines."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sparse_infer.eval.errors import EvalError
from sparse_infer.eval.outputs import write_json
from sparse_infer.eval.results import (
    FORMAT_VERSION,
    PLAN_KEY,
    RESULTS_FILE,
    WEIGHTS_KEY,
    holding_out_dir,
    load_results,
    recorded_dtype,
    summarize,
)


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
    with holding_out_dir(out):
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
        if recorded_dtype(other) != recorded_dtype(model):
            raise EvalError(f"{path} was run in {recorded_dtype(other)}, {first_path} in {recorded_dtype(model)}: "
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
    write_json(target, merged)
    return merged
