"""Needle-in-a-haystack grid: context lengths x needle depths, one needle per prompt.

Each prompt hides "One of the special magic numbers for {key} is: {value}."
(a random 7-digit number for a random key word, deterministic by seed) at a
sentence boundary near depth% of the essay haystack, and asks for it with
RULER's single-needle template. A cell scores 100 when the number appears in
the greedy output.

Outputs in out_dir: results.json (per sample, via the runner, so --resume
works), needle.json (the grids of scores and of prefill seconds) and needle.png
(one heatmap per plan, each cell annotated with its score and prefill time).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sparse_infer.eval import _text
from sparse_infer.eval.errors import EvalError
from sparse_infer.eval.prompts import count_tokens, format_prompt
from sparse_infer.eval.ruler.haystack import derive_seed, filler_text, insert_at_depths, repeat_to_length
from sparse_infer.eval.ruler.niah import NEEDLE_TEMPLATE, NIAH_ANSWER_ONE, NIAH_TEMPLATE_ONE
from sparse_infer.eval.ruler.sizing import fit_length
from sparse_infer.eval.scoring import STRING_MATCH_ALL

NEEDLE_TASK = "needle"
NEEDLE_JSON = "needle.json"
NEEDLE_PNG = "needle.png"
MAX_NEW_TOKENS = 16  # the answer is a 7-digit number right after the answer prefix (~10 tokens)


def needle_id(length: int, depth: float, index: int) -> str:
    return f"{NEEDLE_TASK}/{length}/d{depth:g}/{index}"


def make_needle_sample(
    tokenizer: Any, length: int, depth: float, index: int = 0, seed: int = 0, *, chat_template: bool | None = None
) -> dict[str, Any]:
    if not 0 <= depth <= 100:
        raise EvalError(f"depth must be within 0..100, got {depth}")
    rng = random.Random(derive_seed(seed, NEEDLE_TASK, length, depth, index))
    key = rng.choice(_text.vocabulary())
    value = str(rng.randint(1_000_000, 9_999_999))
    needle = NEEDLE_TEMPLATE.format(type_v="numbers", key=key, value=value)
    question = NIAH_TEMPLATE_ONE.replace("{type_v}", "number")
    prefix = NIAH_ANSWER_ONE.format(type_v="number", query=key)

    def build(n: int, pad: int) -> str:
        context = insert_at_depths(repeat_to_length(_text.essay_words(), n), [needle], [depth])
        if pad:
            context = filler_text(pad) + " " + context
        return format_prompt(tokenizer, question.format(context=context, query=key), prefix, chat_template)

    prompt, _ = fit_length(build, lambda t: count_tokens(tokenizer, t), length, what=f"needle @ {length}")
    return {
        "id": needle_id(length, depth, index),
        "task": NEEDLE_TASK,
        "length": int(length),
        "depth": depth,
        "index": index,
        "input": prompt,
        "answers": [value],
        "max_new_tokens": MAX_NEW_TOKENS,
        "metric": STRING_MATCH_ALL,  # one answer: 100 iff the number is in the output
        "tokens": count_tokens(tokenizer, prompt),
        "seed": seed,
    }


def make_needle_samples(
    tokenizer: Any,
    lengths: Sequence[int],
    depths: Sequence[float],
    seed: int = 0,
    samples_per_cell: int = 1,
    *,
    chat_template: bool | None = None,
) -> list[dict[str, Any]]:
    return [
        make_needle_sample(tokenizer, L, d, i, seed, chat_template=chat_template)
        for L in lengths
        for d in depths
        for i in range(samples_per_cell)
    ]


def needle_grid(
    records: Sequence[Mapping[str, Any]], lengths: Sequence[int], depths: Sequence[float], field: str = "score"
) -> list[list[float | None]]:
    """Mean of a record field per cell: grid[depth_row][length_col]; None where nothing ran.

    Records without the field (prefill_seconds in files written before it was recorded) are
    left out of their cell's mean."""
    cells: dict[tuple[int, float], list[float]] = {}
    for r in records:
        if r.get("task") == NEEDLE_TASK and r.get(field) is not None:
            cells.setdefault((int(r["length"]), float(r["depth"])), []).append(float(r[field]))
    return [[(sum(v) / len(v)) if (v := cells.get((int(L), float(d)))) else None for L in lengths] for d in depths]


def column_means(grid: Sequence[Sequence[float | None]]) -> list[float | None]:
    """Mean over the depths of each length column (cells that ran); None for a column with none."""
    columns = zip(*grid) if grid else []
    return [(sum(v) / len(v)) if (v := [x for x in col if x is not None]) else None for col in columns]


def format_seconds(t: float) -> str:
    """A prefill time as the heatmap and the CLI write it: "1.3 s", "0.42 s", "8.5 ms"."""
    if t >= 10:
        return f"{t:.0f} s"
    if t >= 1:
        return f"{t:.1f} s"
    if t >= 0.1:
        return f"{t:.2f} s"
    return f"{t * 1e3:.2g} ms"


def plot_heatmap(
    grids: Mapping[str, Sequence[Sequence[float | None]]],
    lengths: Sequence[int],
    depths: Sequence[float],
    path: str | Path | None = None,
    title: str | None = None,
    prefill: Mapping[str, Sequence[Sequence[float | None]]] | None = None,
):
    """One annotated heatmap per plan (rows = depth %, columns = length); returns the Figure.

    `prefill` (seconds, grids shaped like the scores) adds each cell's prefill time under its
    score and the plan's mean prefill time to its panel title."""
    # A bare Figure (no pyplot) renders with Agg and touches no global
    # backend state, so it works headless and inside other programs.
    import matplotlib
    import numpy as np
    from matplotlib.figure import Figure

    names = list(grids)
    cols = len(names)
    # Wide enough for the axis labels even with a single length column.
    panel_w = max(3.0, 0.8 * len(lengths) + 1.4)
    times = {name: grid for name, grid in (prefill or {}).items() if _mean(grid) is not None}
    # a second text line per cell needs taller rows
    row_h = 0.6 if times else 0.45
    fig = Figure(figsize=(panel_w * cols + 1.2, 1.9 + row_h * len(depths)), layout="constrained")
    axes = fig.subplots(1, cols, squeeze=False)[0]
    cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="#dddddd")  # grey: cells that did not run
    image = None
    for ax, name in zip(axes, names, strict=True):
        data = np.array([[np.nan if v is None else v for v in row] for row in grids[name]], dtype=float)
        image = ax.imshow(data, cmap=cmap, vmin=0, vmax=100, aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [_fmt_len(L) for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        if ax is axes[0]:
            ax.set_ylabel("needle depth (%)")
        finite = data[np.isfinite(data)]
        mean = f"\nmean {finite.mean():.0f}" if finite.size else ""
        seconds = times.get(name)
        if seconds is not None:
            timing = f"prefill {format_seconds(_mean(seconds))}"
            mean = f"{mean}, {timing}" if mean else f"\n{timing}"
        ax.set_title(f"{name}{mean}", fontsize=10)
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                v = data[i, j]
                label = "–" if np.isnan(v) else f"{v:.0f}"
                t = seconds[i][j] if seconds is not None else None
                if t is not None:
                    label += f"\n{format_seconds(t)}"
                ax.text(j, i, label, ha="center", va="center", fontsize=8, color="black")
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="score", shrink=0.9)
    if title:
        fig.suptitle(title, fontsize=11)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _fmt_len(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 and n >= 1024 else str(n)


def run_needle(
    model: Any,
    tokenizer: Any,
    plans: Mapping[str, Any],
    out_dir: str | Path,
    lengths: Sequence[int],
    depths: Sequence[float],
    *,
    seed: int = 0,
    samples_per_cell: int = 1,
    resume: bool = False,
    progress: bool = True,
    chat_template: bool | None = None,
    title: str | None = None,
) -> dict[str, Any]:
    """Run the grid under each plan; write results.json, needle.json and needle.png; return needle.json's content."""
    from sparse_infer.eval.results import claim_out_dir
    from sparse_infer.eval.runner import validate

    lengths = [int(L) for L in lengths]
    depths = [float(d) for d in depths]
    # Validate lengths and plans before spending time on prompts.
    validate(model, [{"id": "probe", "task": NEEDLE_TASK, "metric": STRING_MATCH_ALL, "length": max(lengths)}], plans)
    # held until needle.json and needle.png are written too: they are drawn from results.json
    with claim_out_dir(out_dir, resume) as out:
        samples = make_needle_samples(tokenizer, lengths, depths, seed, samples_per_cell, chat_template=chat_template)
        return _run_and_draw(model, tokenizer, plans, out, samples, lengths, depths, seed, samples_per_cell,
                             resume, progress, title)


def _run_and_draw(model, tokenizer, plans, out: Path, samples, lengths, depths, seed, samples_per_cell, resume,
                  progress, title) -> dict[str, Any]:
    from sparse_infer.eval.outputs import write_atomic, write_json
    from sparse_infer.eval.results import load_results
    from sparse_infer.eval.runner import run_eval

    run_eval(model, tokenizer, samples, plans, out, resume=resume, progress=progress)
    doc = load_results(out)
    grids = {name: needle_grid(doc["plans"][name]["records"], lengths, depths) for name in plans}
    times = {name: needle_grid(doc["plans"][name]["records"], lengths, depths, "prefill_seconds") for name in plans}
    result = {
        "lengths": lengths,
        "depths": depths,
        "rows": "depth",
        "cols": "length",
        "seed": seed,
        "samples_per_cell": samples_per_cell,
        "model": doc.get("model"),
        "plans": {
            name: {
                "plan": doc["plans"][name].get("plan"),
                "scores": grid,
                "mean": _mean(grid),
                # seconds of the prompt's first forward (generate's prefill), mean per cell
                "prefill_seconds": times[name],
                "prefill_seconds_by_length": column_means(times[name]),
                "prefill_seconds_mean": _mean(times[name]),
            }
            for name, grid in grids.items()
        },
        "png": NEEDLE_PNG,
    }
    write_json(out / NEEDLE_JSON, result)
    if title is None:
        name = (doc.get("model") or {}).get("name_or_path") or ""
        title = f"needle in a haystack: {Path(name).name}" if name else "needle in a haystack"
    figure = plot_heatmap(grids, lengths, depths, title=title, prefill=times)
    write_atomic(out / NEEDLE_PNG, lambda fh: figure.savefig(fh, format="png", dpi=120), binary=True)
    return result


def describe(result: Mapping[str, Any]) -> list[str]:
    """Lines for the terminal: each plan's mean score and mean prefill time, then per length each
    plan's prefill time against the first plan's (the baseline; above 1, the plan is faster)."""
    plans = result["plans"]
    lines = []
    for name, entry in plans.items():
        if entry["mean"] is None:
            lines.append(f"{name}: no results")
            continue
        line = f"{name}: mean score {entry['mean']:.1f}"
        if entry.get("prefill_seconds_mean") is not None:
            line += f", mean prefill {format_seconds(entry['prefill_seconds_mean'])}"
        lines.append(line)
    names = list(plans)
    if len(names) < 2:
        return lines
    base = names[0]
    base_times = plans[base].get("prefill_seconds_by_length") or []
    for i, length in enumerate(result["lengths"]):
        b = base_times[i] if i < len(base_times) else None
        parts = []
        for name in names[1:]:
            times = plans[name].get("prefill_seconds_by_length") or []
            t = times[i] if i < len(times) else None
            if b is not None and t:
                parts.append(f"{name} {format_seconds(t)} (× {b / t:.2f} vs {base})")
        if parts:
            lines.append(f"prefill at {length} tokens: {base} {format_seconds(b)}, {', '.join(parts)}")
    return lines


def _mean(grid: Sequence[Sequence[float | None]]) -> float | None:
    vals = [v for row in grid for v in row if v is not None]
    return sum(vals) / len(vals) if vals else None
