"""Which answers a plan changed: its records paired with a baseline plan's, sample by sample."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

DENSE = "dense"


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
