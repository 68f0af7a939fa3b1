"""The results table the eval commands print: scores per plan, differences, densities, prefill times."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sparse_infer.eval.compare import pick_baseline
from sparse_infer.eval.results import length_task_order


def render_table(rows: Sequence[Mapping[str, Any]], baseline: str | None = None, title: str | None = None):
    """rich Table: one score column per plan and, per other plan, its difference to the baseline.

    The baseline is `baseline`, else "dense" if present, else the first plan.
    Each length ends with an average row over its tasks. When rows carry `prefill_seconds`,
    each plan gets its mean prefill time and each other plan its speed against the baseline's
    (baseline seconds / plan seconds: above 1, the plan prefills faster).
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
    density_plans = [p for p in others if any(k[0] == p for k in density)]
    prefill = {
        (r["plan"], int(r["length"]), r["task"]): float(r["prefill_seconds"])
        for r in rows
        if r.get("prefill_seconds") is not None
    }
    prefill_plans = [p for p in plans if any(k[0] == p for k in prefill)]
    ratio_plans = [p for p in others if p in prefill_plans] if base in prefill_plans else []
    counts = {(int(r["length"]), r["task"]): r["n"] for r in rows}
    keys = list(dict.fromkeys((int(r["length"]), r["task"]) for r in rows))
    keys.sort(key=lambda k: length_task_order(*k))

    table = Table(title=title, show_lines=False)
    table.add_column("length", justify="right")
    table.add_column("task")
    table.add_column("n", justify="right")
    for p in plans:
        table.add_column(p, justify="right")
    if base is not None:
        for p in others:
            table.add_column(f"Δ {p}", justify="right")
    for p in density_plans:
        table.add_column(f"density {p}", justify="right")  # measured prefill density
    for p in prefill_plans:
        table.add_column(f"prefill s {p}", justify="right")
    for p in ratio_plans:
        table.add_column(f"{p} × vs {base}", justify="right")

    def cells(getter, density_getter, prefill_getter) -> list[str]:
        vals = [getter(p) for p in plans]
        out = [f"{v:.1f}" if v is not None else "-" for v in vals]
        b = getter(base) if base is not None else None
        if base is not None:
            for p in others:
                v = getter(p)
                out.append(_diff_cell(v - b) if v is not None and b is not None else "-")
        for p in density_plans:
            d = density_getter(p)
            out.append(f"{d:.0%}" if d is not None else "-")
        for p in prefill_plans:
            t = prefill_getter(p)
            out.append(_seconds_cell(t) if t is not None else "-")
        base_t = prefill_getter(base) if ratio_plans else None
        for p in ratio_plans:
            t = prefill_getter(p)
            out.append(f"{base_t / t:.2f}" if base_t is not None and t else "-")
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
                    lambda p, k=(length, task): scores.get((p, *k)),
                    lambda p, k=(length, task): density.get((p, *k)),
                    lambda p, k=(length, task): prefill.get((p, *k)),
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
                *cells(lambda p: avg(scores, p), lambda p: avg(density, p), lambda p: avg(prefill, p)),
                end_section=i < len(lengths) - 1,
            )
        elif i < len(lengths) - 1:
            table.add_section()
    return table


def _seconds_cell(t: float) -> str:
    # three significant digits: a short prompt prefills in milliseconds, a long one in minutes
    return f"{t:.3g}" if t < 1000 else f"{t:.0f}"


def _diff_cell(d: float) -> str:
    if d <= -1.0:
        return f"[red]{d:+.1f}[/]"
    if d >= 1.0:
        return f"[green]{d:+.1f}[/]"
    return f"{d:+.1f}"
