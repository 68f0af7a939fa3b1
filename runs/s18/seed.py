"""Eighteenth session: seeds a run directory with another run's finished samples of some tasks, so
that a run split by task part-way through (runs/s16/resume.sh with TASKS_A/TASKS_B) resumes from
them instead of rerunning them. `eval merge` later drops the copies (same id and prompt hash).
Usage: python runs/s18/seed.py SOURCE_DIR OUT_DIR TASK[,TASK...]"""
import sys
from pathlib import Path

from sparse_infer.eval import runner


def main(source, out, tasks):
    wanted = set(tasks.split(","))
    target = Path(out) / runner.RESULTS_FILE
    if target.exists():
        raise SystemExit(f"{target} exists; seeding would overwrite its samples")
    doc = runner.load_results(source)
    for entry in doc["plans"].values():
        entry["records"] = [rec for rec in entry["records"] if rec["task"] in wanted]
    doc["summary"] = runner.summarize(doc)
    target.parent.mkdir(parents=True, exist_ok=True)
    runner._write_json(target, doc)
    print(f"{target}: {sum(len(e['records']) for e in doc['plans'].values())} samples of {', '.join(sorted(wanted))}")


if __name__ == "__main__":
    main(*sys.argv[1:])
