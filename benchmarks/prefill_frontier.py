"""The prefill frontier: time, measured density and fidelity of several plans on the same prompts.

    python benchmarks/prefill_frontier.py MODEL LENGTH PLAN[,PLAN...] [SAMPLES [KINDS [OUT_JSON]]]
    python benchmarks/prefill_frontier.py smollm2-135m 8192 smollm2-135m,block,docs/data/plans/x.yaml 2 prose,ruler

Per prompt (the `eval fidelity` prompts: long prose, RULER with the gold answer appended), one
dense forward and one forward per plan, teacher-forced, scoring the last 256 positions and the
answer tokens (`eval fidelity`'s measures against dense fp32). Each forward is timed (the whole
model, one pass, fp32): the ratio is dense's time over the plan's, in the same run. Plans run as
`patch` runs them by default (dense_above="auto"). The bf16 floor is not measured here: read it
from `eval fidelity` (it is cached per model and prompt).
"""
import json
import sys
import time

import torch

import sparse_infer
from sparse_infer.eval.fidelity import compare, make_prompts, next_token_logprobs, scored_positions


def timed_logprobs(model, prompt, positions):
    start = time.perf_counter()
    out = next_token_logprobs(model, prompt.input_ids, positions)
    return out, time.perf_counter() - start


def main(argv):
    model_name, length, plans = argv[0], int(argv[1]), argv[2].split(",")
    samples = int(argv[3]) if len(argv) > 3 else 2
    kinds = argv[4].split(",") if len(argv) > 4 else ["prose", "ruler"]
    out_json = argv[5] if len(argv) > 5 else None
    model, tokenizer = sparse_infer.load_model(model_name)
    prompts = make_prompts(tokenizer, [length], samples, kinds)
    records = []
    for prompt in prompts:
        positions = scored_positions(prompt, 256)
        # untimed: a process's first forward at a length is slower (allocator growth), which
        # would flatter every plan against dense
        next_token_logprobs(model, prompt.input_ids, positions)
        dense, dense_s = timed_logprobs(model, prompt, positions)
        for plan in plans:
            sparse_infer.patch(model, plan)
            try:
                planned, plan_s = timed_logprobs(model, prompt, positions)
                density = sparse_infer.get_stats(model)["prefill_density"]
            finally:
                sparse_infer.unpatch(model)
            row = {"prompt": prompt.id, "plan": plan, "dense_s": dense_s, "plan_s": plan_s,
                   "density": density, **compare(dense, planned, positions, prompt)}
            records.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'plan':<40} {'ratio':>6} {'density':>8} {'KL':>8} {'top1':>6} {'ans KL':>8} {'ans top1':>8}")
    for plan in plans:
        rows = [r for r in records if r["plan"] == plan]

        def mean(key):
            values = [r[key] for r in rows if r[key] is not None]
            return sum(values) / len(values) if values else float("nan")

        ratio = sum(r["dense_s"] for r in rows) / sum(r["plan_s"] for r in rows)
        print(f"{plan:<40} {ratio:>5.2f}x {mean('density'):>8.3f} {mean('kl'):>8.5f} {mean('top1'):>6.1f} "
              f"{mean('answer_kl'):>8.5f} {mean('answer_top1'):>8.1f}")
    if out_json:
        with open(out_json, "x") as f:             # never replaces an earlier run
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    torch.set_num_threads(int(__import__("os").environ.get("THREADS", "2")))
    main(sys.argv[1:])
