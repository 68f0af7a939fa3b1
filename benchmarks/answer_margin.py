"""How close is a RULER answer to a tie, dense and under each plan?

    python benchmarks/answer_margin.py SAMPLE_ID PLAN[,PLAN...] [OUT_JSON [MODEL [TEXT]]]
    python benchmarks/answer_margin.py niah_multikey_3/16384/0 dense,docs/data/plans/qwen_profile_16k.yaml

One forward per plan of the sample's prompt followed by the expected answer (teacher forcing;
logits of the answer's positions only). For each plan and each answer token: its
log-probability and the best other token's. The first token where another token wins is where
greedy decoding leaves the answer; its margin says whether that was a near-tie (a fraction of a
logit: any approximation, or another kernel, can flip it) or a clear preference.
The sample is regenerated as `eval ruler --samples 5` does (seed 0); plans run their prefill on
the whole sequence, so only the prefill half of a plan is exercised.
TEXT, when given, is forced instead of the first expected answer: for tasks whose answer is a
list (vt, multi-value), pass dense's greedy prediction from results.json. It is encoded as it
stands, without the leading space added to an expected answer (vt's prediction starts with a
digit, which Qwen's tokenizer keeps apart from a space). Dense then keeps every token (a check
that TEXT tokenizes as generated), and a plan's first lost token shows where it leaves dense's
answer.
DTYPE (environment, default float32) loads the model in another precision, e.g. bfloat16 with
PLAN dense: how far a change of precision alone moves the same margins.
"""
import json
import os
import sys

import torch

import sparse_infer
from sparse_infer.bench.patching import patched
from sparse_infer.eval import ruler
from sparse_infer.eval.cli import parse_dtype


def answer_report(model, tok, prompt_ids: list[int], answer_ids: list[int]) -> dict:
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.inference_mode():
        # position i predicts token i + 1: keep the last prompt position and the answer's but its last
        logits = model(input_ids=ids, logits_to_keep=len(answer_ids) + 1).logits[0, :-1].float()
    logp = torch.log_softmax(logits, -1)
    want = torch.tensor(answer_ids)
    want_logp = logp.gather(-1, want[:, None])[:, 0]
    other = logp.scatter(-1, want[:, None], float("-inf"))
    best_other_logp, best_other = other.max(-1)
    margins = want_logp - best_other_logp
    lost = [i for i, m in enumerate(margins.tolist()) if m < 0]
    first_lost = lost[0] if lost else None
    return {
        "answer_logp": float(want_logp.sum()),
        "min_margin": float(margins.min()), "min_margin_at": int(margins.argmin()),
        "first_lost_at": first_lost,
        "first_lost": None if first_lost is None else {
            "expected": tok.decode([answer_ids[first_lost]]), "winner": tok.decode([int(best_other[first_lost])]),
            "margin": float(margins[first_lost])},
        "margins": [round(m, 3) for m in margins.tolist()],
    }


def main(sample_id: str, plans: str, out: str | None = None, model_name: str = "qwen2.5-0.5b",
         text: str | None = None):
    task, length, index = sample_id.split("/")
    model, tok = sparse_infer.load_model(model_name, dtype=parse_dtype(os.environ.get("DTYPE", "float32")))
    sample = ruler.generate_samples(tok, [task], [int(length)], int(index) + 1, 0)[int(index)]
    prompt_ids = ruler.encode(tok, sample["input"])
    # the answer as greedy decoding writes it after the answer prefix: a space, then the value
    # (TEXT is taken as generated)
    forced = " " + sample["answers"][0] if text is None else text
    answer_ids = ruler.encode(tok, forced)
    report = {"sample": sample_id, "tokens": len(prompt_ids), "answer": forced.strip(),
              "answer_tokens": [tok.decode([i]) for i in answer_ids], "plans": {}}
    for name in plans.split(","):
        with patched(model, None if name == "dense" else name):
            report["plans"][name] = answer_report(model, tok, prompt_ids, answer_ids)
        print(name, json.dumps({k: v for k, v in report["plans"][name].items() if k != "margins"}), flush=True)
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
