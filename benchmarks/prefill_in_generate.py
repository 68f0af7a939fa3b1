"""Prefill inside generate against the bench's forward, dense and under a plan, on one process.

    python benchmarks/prefill_in_generate.py MODEL PLAN LENGTH OUT.json [PROMPTS]
    python benchmarks/prefill_in_generate.py qwen2.5-0.5b qwen2.5-0.5b 16384 out/gen16k.json needle,prose

`eval needle` times the first forward of `generate` (its prefill); `bench prefill` times a
teacher-forced forward without a cache on a prose prompt. This runs both ways on the same
prompts: `forward` (no cache, one logit row) and `generate` (the real generate call with
AppendCache and an attention mask, one new token, its first forward timed as `eval needle`
times it). PROMPTS: `needle` (the eval needle prompt at depth 50) and/or `prose` (the fidelity
and bench prompt). Under the plan each row also has the prefill attention's seconds (estimate,
sparse executor, dense heads) and the rest of the forward (`other_s`: projections, MLP, norms).
One untimed forward first, so the first timed one does not pay for growing the allocator.
"""
import sys
import time
from pathlib import Path

import torch

import sparse_infer
from sparse_infer.bench.patching import patched
from sparse_infer.bench.prefill import _layer_seconds
from sparse_infer.eval.fidelity import prose_prompt
from sparse_infer.eval.needle import make_needle_sample
from sparse_infer.eval.outputs import write_json
from sparse_infer.eval.prompts import encode
from sparse_infer.eval.runner import generate_one, timing_prefill
from sparse_infer.models import load_model
from sparse_infer.runtime import set_timing


def prompt_text(tokenizer, kind: str, length: int) -> str:
    """The prompt as generate_one takes it (text); its tokens are encode(tokenizer, text)."""
    if kind == "needle":
        return make_needle_sample(tokenizer, length, 50)["input"]
    if kind == "prose":
        return tokenizer.decode(prose_prompt(tokenizer, length, 0).input_ids)
    raise SystemExit(f"unknown prompt kind {kind!r}: use needle and/or prose")


def timed_forward(model, ids: list[int]) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        model(input_ids=torch.tensor([ids]), use_cache=False, logits_to_keep=1)
        return time.perf_counter() - start


def timed_generate(model, tokenizer, text: str) -> float:
    with timing_prefill(model) as clock:
        generate_one(model, tokenizer, text, 1)
    return clock.seconds


def main(model_name: str, plan: str, length: str, out: str, prompts: str = "needle,prose") -> None:
    if Path(out).exists():
        raise SystemExit(f"{out} exists: give another OUT.json (results are not overwritten)")
    model, tokenizer = load_model(model_name)
    n = int(length)
    texts = {kind: prompt_text(tokenizer, kind, n) for kind in prompts.split(",")}
    timed_forward(model, encode(tokenizer, next(iter(texts.values()))))
    rows = []
    for kind, text in texts.items():
        ids = encode(tokenizer, text)
        for name in ("dense", plan):
            with patched(model, None if name == "dense" else name):
                set_timing(model, True)
                for way in ("forward", "generate"):
                    if name != "dense":
                        sparse_infer.reset_stats(model)
                    seconds = (timed_forward(model, ids) if way == "forward"
                               else timed_generate(model, tokenizer, text))
                    row = {"prompt": kind, "tokens": len(ids), "plan": name, "way": way, "seconds": seconds}
                    if name != "dense":
                        stats = sparse_infer.get_stats(model)
                        layers = _layer_seconds(stats, 1)
                        row["density"] = stats["prefill_density"]
                        for part in ("estimate", "sparse", "dense", "attention"):
                            row[f"{part}_s"] = sum(layer.get(part, 0.0) for layer in layers.values())
                        row["other_s"] = seconds - row["attention_s"]
                        row["layers"] = layers
                    rows.append(row)
                    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "layers"},
                          flush=True)
                    write_json(out, rows)


if __name__ == "__main__":
    main(*sys.argv[1:])
