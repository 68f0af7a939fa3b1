"""How sure a results table is about a plan's difference from its baseline.

At 5 samples per task one sample moves a task by 20 points and an 11-task average by 1.8, so a
table's Δ alone cannot say whether a plan is within 1 point of dense. This pairs each plan's
samples with the baseline's (same id, same prompt) and gives, per length and over all lengths:

- Δ computed as the table computes it: the mean over tasks of each task's mean score difference;
- a percentile bootstrap interval for that Δ, resampling the paired samples within each task
  (a task's samples are drawn from one generator, so tasks are the strata);
- how many samples score lower and higher than the baseline, and a two-sided exact sign test on
  those counts (do the changes lean one way more than chance would?).

The bootstrap treats the finished samples as the population: with 5 per task it is narrower than
the truth (a task where no sample changed contributes no spread at all), so an interval that
still spans the tolerance means the run is too small to decide, not that the plan is safe.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from sparse_infer.eval.compare import pair_records, pick_baseline

GOAL_POINTS = 1.0  # the accuracy goal: each plan within 1 point of dense, on average and at each length
LEVEL = 0.95
RESAMPLES = 4000


@dataclass(frozen=True)
class PairedDelta:
    """A plan against the baseline at one length (`length` None: the mean over the lengths)."""

    length: int | None
    pairs: int
    delta: float
    low: float
    high: float
    lower: int
    higher: int
    sign_p: float

    def verdict(self, base: str, tolerance: float = GOAL_POINTS) -> str:
        if self.low >= -tolerance:
            return f"within {tolerance:g} of {base}"
        if self.high < -tolerance:
            return f"more than {tolerance:g} below {base}"
        return f"cannot tell whether within {tolerance:g} of {base}"


def sign_test(lower: int, higher: int) -> float:
    """Two-sided exact binomial p-value of `lower` against `higher` changes at even odds."""
    n = lower + higher
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(lower, higher) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_deltas(
    doc: Mapping[str, Any],
    baseline: str | None = None,
    *,
    level: float = LEVEL,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[str | None, dict[str, list[PairedDelta]]]:
    """(baseline name, {plan: [PairedDelta per length in increasing order, then over lengths]}).

    A plan with no sample in common with the baseline gets an empty list; the over-lengths entry
    is there only when there are several lengths. Deterministic for a given `seed`."""
    if not 0 < level < 1:
        raise ValueError(f"level must be within (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    base = pick_baseline(list(doc["plans"]), baseline)
    if base is None:
        return None, {}
    result: dict[str, list[PairedDelta]] = {}
    for name, entry in doc["plans"].items():
        if name == base:
            continue
        pairs, _ = pair_records(doc["plans"][base], entry)
        strata: dict[int, dict[str, list[float]]] = {}
        for ref_rec, rec in pairs:
            by_task = strata.setdefault(int(rec["length"]), {})
            by_task.setdefault(rec["task"], []).append(float(rec["score"]) - float(ref_rec["score"]))
        # One generator per plan, so a plan's interval does not depend on which plans precede it.
        rng = np.random.default_rng(seed)
        rows, draws_per_length, diffs_per_length = [], [], []
        for length in sorted(strata):
            diffs = [np.asarray(d) for d in strata[length].values()]
            point = float(np.mean([d.mean() for d in diffs]))
            draws = np.mean([d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1) for d in diffs], axis=0)
            draws_per_length.append(draws)
            diffs_per_length.append(np.concatenate(diffs))
            rows.append(_row(length, diffs_per_length[-1], point, draws, level))
        if len(rows) > 1:
            point = float(np.mean([r.delta for r in rows]))
            rows.append(_row(None, np.concatenate(diffs_per_length), point, np.mean(draws_per_length, axis=0), level))
        result[name] = rows
    return base, result


def _row(length: int | None, diffs: np.ndarray, point: float, draws: np.ndarray, level: float) -> PairedDelta:
    low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    lower, higher = int((diffs < 0).sum()), int((diffs > 0).sum())
    return PairedDelta(length, int(diffs.size), point, float(low), float(high), lower, higher, sign_test(lower, higher))


def describe_paired(
    base: str | None, deltas: Mapping[str, list[PairedDelta]], tolerance: float = GOAL_POINTS, level: float = LEVEL
) -> list[str]:
    """One line per plan and length: Δ, its interval, the changes' balance and the verdict."""
    lines = []
    for name, rows in deltas.items():
        if not rows:
            lines.append(f"{name}: no sample in common with {base}")
        for r in rows:
            where = "over all lengths" if r.length is None else f"at {r.length}"
            lines.append(
                f"{name} {where}: Δ {r.delta:+.1f} points ({level:.0%} interval {r.low:+.1f} … {r.high:+.1f}; "
                f"{r.pairs} samples, {r.lower} lower, {r.higher} higher, sign test p={r.sign_p:.2g}): "
                f"{r.verdict(base, tolerance)}"
            )
    return lines
