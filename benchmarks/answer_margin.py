"""How close is a RULER answer's first token to a tie, dense and under each plan?

    python benchmarks/answer_margin.py SAMPLE_ID PLAN[,PLAN...] [OUT_JSON [MODEL]]
    python benchmarks/answer_margin.py niah_multikey_3/16384/0 dense,runs/s11/qwen_profile_16k.yaml

One forward of the sample's prompt per plan (logits of the last position only). For each plan:
the log-probability of the expected answer's first token, of the plan's own greedy first token,
and the top 5. A sample whose dense margin is a fraction of a logit can flip under any
approximation (or a different kernel); one lost by a wide margin points at the plan.
The sample is regenerated as `eval ruler --samples 5` does (seed 0).
"""
import json
import sys

import torch

import sparse_infer
from sparse_infer.eval import ruler


def first_token_report(model, tok, ids: list[int], answer: str) -> dict:
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids]), logits_to_keep=1).logits[0, -1].float()
    logp = torch.log_softmax(logits, -1)
    # the answer's first token as the model would write it right after the prompt, with or
    # without a leading space (whichever dense-style tokenization the prompt's end calls for)
    want = max({ruler.encode(tok, answer)[0], ruler.encode(tok, " " + answer)[0]}, key=lambda i: float(logp[i]))
    top = logp.topk(5)
    return {
        "expected_token": tok.decode([want]), "expected_logp": float(logp[want]),
        "top5": [(tok.decode([int(i)]), round(float(v), 4)) for v, i in zip(top.values, top.indices)],
        "margin_expected_vs_best_other": float(logp[want] - logp[[i for i in top.indices.tolist() if i != want][0]]),
    }


def main(sample_id: str, plans: str, out: str | None = None, model_name: str = "qwen2.5-0.5b"):
    task, length, index = sample_id.split("/")
    model, tok = sparse_infer.load_model(model_name)
    sample = ruler.generate_samples(tok, [task], [int(length)], int(index) + 1, 0)[int(index)]
    ids = ruler.encode(tok, sample["input"])
    report = {"sample": sample_id, "tokens": len(ids), "answer": sample["answers"][0], "plans": {}}
    for name in plans.split(","):
        if name != "dense":
            sparse_infer.patch(model, name)
        try:
            report["plans"][name] = first_token_report(model, tok, ids, sample["answers"][0])
        finally:
            if name != "dense":
                sparse_infer.unpatch(model)
        print(name, json.dumps(report["plans"][name]), flush=True)
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
