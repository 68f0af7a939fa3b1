"""Sixteenth session: the paired Δ, its 95% bootstrap interval and sign test for every RULER run
whose per-sample results are committed, as markdown rows for docs/RESULTS.md, plus how many samples
per task the interval's width says it would take to decide the 1-point goal.

The estimate assumes the measured Δ is the true one and the per-sample spread stays as measured:
the interval shrinks as 1/sqrt(samples), and the run decides once the side facing -1 no longer
crosses it. The last row compares dense in bfloat16 (fifteenth session, runs/s15/bf16_*) with
dense in float32 on whatever samples bf16 has finished: how far precision alone moves the table.
Usage: python runs/s16/paired_table.py"""
import math

from sparse_infer.eval import paired, runner

TABLES = [
    ("SmolLM2-135M", "4K", "runs/ruler_smol_4k_shipped_table"),
    ("SmolLM2-135M", "8K", "runs/ruler_smol_8k_vertical_slash_table"),
    ("SmolLM2-135M", "8K", "runs/ruler_smol_8k_a_shape_table"),
    ("SmolLM2-135M", "8K", "runs/ruler_smol_8k_block_table"),
    # eighteenth and nineteenth sessions: the same runs extended to 20 samples per task
    ("SmolLM2-135M", "8K ×20", "runs/ruler_smol_8k_vertical_slash_table20"),
    ("SmolLM2-135M", "8K ×20", "runs/ruler_smol_8k_block_table20"),
    # nineteenth session: vertical_slash at 25 per task
    ("SmolLM2-135M", "8K ×25", "runs/ruler_smol_8k_vertical_slash_table25"),
    # nineteenth session: the shipped plan at 8K, rerun at 15 per task (its first run was lost), and at 4K to 10
    ("SmolLM2-135M", "8K ×15", "runs/ruler_smol_8k_shipped_table"),
    ("SmolLM2-135M", "4K ×10", "runs/ruler_smol_4k_shipped_table10"),
    # twentieth session: the shipped plan at 4K to 20 per task
    ("SmolLM2-135M", "4K ×20", "runs/ruler_smol_4k_shipped_table20"),
    # twenty-fifth session: the same run to 29 per task
    ("SmolLM2-135M", "4K ×29", "runs/ruler_smol_4k_shipped_table29"),
    # twenty-first session: the SmolLM2 4K presets written from 1K, rerun (their first runs were lost)
    ("SmolLM2-135M", "4K", "runs/ruler_smol_4k_vertical_slash_1k_table"),
    ("SmolLM2-135M", "4K", "runs/ruler_smol_4k_a_shape_1k_table"),
    ("SmolLM2-135M", "4K", "runs/ruler_smol_4k_block_1k_table"),
    ("SmolLM2-135M", "4K", "runs/ruler_smol_4k_block_pooled_1k_table"),
    ("Qwen2.5-0.5B", "8K", "runs/ruler_qwen_8k_profile16k_table"),
    # twentieth session: the shipped Qwen plan and the presets at 8K, rerun (their first runs were lost)
    ("Qwen2.5-0.5B", "8K", "runs/ruler_qwen_8k_shipped_table"),
    ("Qwen2.5-0.5B", "8K", "runs/ruler_qwen_8k_vertical_slash_table"),
    ("Qwen2.5-0.5B", "8K", "runs/ruler_qwen_8k_block_table"),
    # twenty-first session: the a_shape and pooled block presets at Qwen 8K, rerun (their first runs were lost)
    ("Qwen2.5-0.5B", "8K", "runs/ruler_qwen_8k_a_shape_table"),
    ("Qwen2.5-0.5B", "8K", "runs/ruler_qwen_8k_block_pooled_table"),
    # twenty-second session: the SmolLM2 8K preset runs that were only printed (pooled block with the
    # tail; a_shape and pooled block without it), rerun
    ("SmolLM2-135M", "8K", "runs/ruler_smol_8k_block_pooled_table"),
    ("SmolLM2-135M", "8K", "runs/ruler_smol_8k_a_shape_notail_table"),
    ("SmolLM2-135M", "8K", "runs/ruler_smol_8k_block_pooled_notail_table"),
    # twenty-second session: the SmolLM2 4K vertical_slash preset from 1K taken to 20 per task
    ("SmolLM2-135M", "4K ×20", "runs/ruler_smol_4k_vertical_slash_1k_table20"),
    # twenty-third session: the SmolLM2 8K pooled block preset with its tail taken to 15 per task
    ("SmolLM2-135M", "8K ×15", "runs/ruler_smol_8k_block_pooled_table15"),
    # twenty-fourth session: the SmolLM2 8K a_shape preset with its tail taken to 15 per task
    ("SmolLM2-135M", "8K ×15", "runs/ruler_smol_8k_a_shape_table15"),
    ("Qwen2.5-0.5B", "16K", "runs/ruler_qwen_16k_shipped_table"),
    ("Qwen2.5-0.5B", "16K", "runs/ruler_qwen_16k_profile16k_table"),
    ("Qwen2.5-0.5B", "16K", "runs/ruler_qwen_16k_vertical_slash_table"),
    ("Qwen2.5-0.5B", "16K", "runs/ruler_qwen_16k_block_table"),
    ("Qwen2.5-0.5B", "16K", "runs/ruler_qwen_16k_a_shape_table"),
]


def samples_to_decide(row, per_task, tolerance=paired.GOAL_POINTS):
    """Samples per task at which the interval's side towards -tolerance stops crossing it; None
    when it does not cross it now."""
    gap = abs(row.delta + tolerance)
    half = (row.delta - row.low) if row.delta > -tolerance else (row.high - row.delta)
    if half <= gap:
        return None
    if gap == 0:
        return math.inf
    return math.ceil(per_task * (half / gap) ** 2)


BF16_DIRS = [f"runs/s15/bf16_{part}_{core}" for part in ("fragile", "rest") for core in "ab"]


def bf16_doc():
    records = [r for d in BF16_DIRS for r in runner.load_results(d)["plans"]["dense"]["records"]]
    fp32 = runner.load_results("runs/ruler_qwen_16k_dense")["plans"]["dense"]["records"]
    return {"plans": {"dense fp32": {"records": fp32}, "dense bf16": {"records": records}}}


def main():
    print("| model | length | plan | Δ | 95% interval | lower / higher | sign test p | verdict | samples per task to decide |")
    print("|---|---|---|---|---|---|---|---|---|")
    docs = [(m, L, runner.load_results(d)) for m, L, d in TABLES] + [("Qwen2.5-0.5B", "16K", bf16_doc())]
    for model, length, doc in docs:
        base, deltas = paired.paired_deltas(doc, "dense" if "dense" in doc["plans"] else "dense fp32")
        for name, found in deltas.items():
            for r in found:
                tasks = len({rec["task"] for rec in doc["plans"][name]["records"]})
                need = samples_to_decide(r, r.pairs / tasks)
                need = "decided" if need is None else f"{need:g}"
                print(f"| {model} | {length} | {name} vs {base} | {r.delta:+.1f} | {r.low:+.1f} … {r.high:+.1f} "
                      f"| {r.lower} / {r.higher} | {r.sign_p:.2g} | {r.verdict(base)} | {need} |")


if __name__ == "__main__":
    main()
