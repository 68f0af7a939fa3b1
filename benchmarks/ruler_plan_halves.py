"""Rerun chosen RULER samples with one half of a plan: which phase, prefill or decode, changes them?

    python benchmarks/ruler_plan_halves.py PLAN DENSE_DIR OUT_DIR SAMPLE_ID[,SAMPLE_ID...] [VARIANTS]
    python benchmarks/ruler_plan_halves.py configs/qwen2.5-0.5b.yaml out/ruler_qwen_16k out/probe_16k_losses \\
        niah_multikey_2/16384/4,niah_multikey_3/16384/0 prefill_only,decode_only

VARIANTS (default prefill_only,decode_only):
  whole           the plan as it is (to rerun a few samples of a candidate plan)
  dense           both sections dense: with DTYPE=bfloat16, how many answers a change of precision
                  alone moves against the float32 dense run
  prefill_only    the plan's prefill, dense decode
  decode_only     dense prefill, the plan's decode
  prefill_scaled  prefill_only with each fixed vertical/slash token budget b turned into
                  {frac: b / profile.seq_len, min: b}: the share of the prompt it had at the
                  profiled length
DTYPE (environment, default float32): the model's weights and activations for every variant.
The samples are regenerated (seed 0, 5 per task, as `eval ruler --samples 5`) and must have the
same prompt as in DENSE_DIR/results.json, which gives the dense answers to compare with.
"""
import copy
import os
import sys

import yaml

import sparse_infer
from sparse_infer.eval import compare, results, ruler, runner
from sparse_infer.eval.cli import parse_dtype


def plan_half(plan: dict, variant: str) -> dict:
    if variant not in ("whole", "dense", "prefill_only", "decode_only", "prefill_scaled"):
        raise SystemExit(f"unknown variant {variant!r}")
    half = copy.deepcopy(plan)
    if variant in ("dense", "prefill_only", "prefill_scaled"):
        half["decode"] = {"min_kv_len": plan["decode"]["min_kv_len"], "default": {"method": "dense"}}
    if variant in ("dense", "decode_only"):
        half["prefill"] = {k: v for k, v in plan["prefill"].items() if k != "layers"}
        half["prefill"]["default"] = {"pattern": "dense"}
    if variant == "prefill_scaled":
        scale_fixed_budgets(half["prefill"], int(plan["profile"]["seq_len"]))
    return half


def scale_fixed_budgets(prefill: dict, profiled: int) -> None:
    """Turn each fixed vertical/slash token budget b into {frac: b / profiled, min: b}, in place."""
    rules = [prefill["default"]] + [r for heads in prefill.get("layers", {}).values() for r in heads.values()]
    for rule in rules:
        if rule.get("pattern") == "vertical_slash":
            for key in ("vertical", "slash"):
                if isinstance(rule[key], int):
                    rule[key] = {"frac": rule[key] / profiled, "min": rule[key]}


def main(plan_path: str, dense_dir: str, out: str, ids: str, variants: str = "prefill_only,decode_only"):
    wanted = ids.split(",")
    plan = yaml.safe_load(open(plan_path))
    model_name = plan["profile"]["model"]["name"]
    model, tok = sparse_infer.load_model(model_name, dtype=parse_dtype(os.environ.get("DTYPE", "float32")))
    lengths = sorted({int(i.split("/")[1]) for i in wanted})
    tasks = sorted({i.split("/")[0] for i in wanted})
    samples = [s for s in ruler.generate_samples(tok, tasks, lengths, 5, 0) if results.sample_key(s) in wanted]
    dense = {r["id"]: r for r in results.load_results(dense_dir)["plans"]["dense"]["records"]}
    for s in samples:
        key = results.sample_key(s)
        if key not in dense or results.input_sha1(s["input"]) != dense[key]["input_sha1"]:
            raise SystemExit(f"{key}: not in {dense_dir} with the same prompt")
    plans = {v: plan_half(plan, v) for v in variants.split(",")}
    runner.run_eval(model, tok, samples, plans, out, resume=True)
    doc = results.load_results(out)
    # named apart from the variants: the `dense` variant's records must not replace the reference
    reference = f"dense in {dense_dir}"
    doc["plans"] = {reference: {"records": [dense[results.sample_key(s)] for s in samples]}, **doc["plans"]}
    for line in compare.describe_changes(*compare.changed_answers(doc, baseline=reference)):
        print(line)


if __name__ == "__main__":
    main(*sys.argv[1:])
