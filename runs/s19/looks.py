"""Nineteenth session: a run's paired interval at each sample count it was looked at, plain and
corrected for the number of looks.

The SmolLM2 8K runs were extended 5 -> 20 -> 25 samples per task, and each extension was chosen
after seeing the previous interval. Checking a 95% interval at k looks and stopping at the first
one that decides raises the chance of a wrong "decided" above 5%. The Bonferroni level
1 - 0.05 / k keeps it at most 5% over k looks (strictly, when k is fixed before the first look),
so a verdict that holds at that level is not an artefact of having looked until it passed.

Usage: python runs/s19/looks.py TABLE_DIR [PER_TASK_COUNTS]   (default counts: 5,20,25)
Prints markdown rows: samples per task, pairs, Δ, the 95% interval and verdict, the corrected
interval and verdict."""
import sys

from sparse_infer.eval import paired, runner


def first_samples(doc, per_task):
    """The doc with each plan's records cut to indices below `per_task`."""
    plans = {
        name: {**entry, "records": [r for r in entry["records"] if int(r["index"]) < per_task]}
        for name, entry in doc["plans"].items()
    }
    return {**doc, "plans": plans}


def main(table_dir, counts):
    doc = runner.load_results(table_dir)
    corrected = 1 - (1 - paired.LEVEL) / len(counts)
    print(f"| samples per task | pairs | Δ | 95% interval | verdict | {corrected:.1%} interval (looks: {len(counts)}) | verdict |")
    print("|---|---|---|---|---|---|---|")
    for per_task in counts:
        cut = first_samples(doc, per_task)
        base, plain = paired.paired_deltas(cut, "dense")
        _, strict = paired.paired_deltas(cut, "dense", level=corrected)
        for name in plain:
            p, s = plain[name][-1], strict[name][-1]
            print(f"| {per_task} | {p.pairs} | {p.delta:+.2f} | {p.low:+.2f} … {p.high:+.2f} | {p.verdict(base)} "
                  f"| {s.low:+.2f} … {s.high:+.2f} | {s.verdict(base)} |")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    main(sys.argv[1], [int(c) for c in (sys.argv[2] if len(sys.argv) == 3 else "5,20,25").split(",")])
