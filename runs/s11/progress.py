"""Count the finished samples of RULER runs still under way: python runs/s11/progress.py runs/ruler_*

Per plan: samples done, mean seconds per sample, each score in run order (tables come from eval merge).
"""
import json, sys
for d in sys.argv[1:]:
    try:
        r = json.load(open(f"{d}/results.json"))
    except FileNotFoundError:
        print(d, "none"); continue
    for k, v in r["plans"].items():
        recs = v["records"]
        secs = [x.get("seconds", 0) for x in recs]
        print(d, k, len(recs), "mean s %.0f" % (sum(secs) / max(1, len(secs))), "score", [round(x["score"]) for x in recs])
