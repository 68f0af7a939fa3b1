"""End-to-end prefill timing of a loaded model: dense vs each plan, in one run."""
from __future__ import annotations

import time

import torch


def synthetic_prompt_ids(tokenizer, length: int, seed: int = 0) -> torch.Tensor:
    """Exactly `length` tokens of natural prose (the Python reference that ships with CPython).

    Non-repeating text matters: a prompt made of one passage repeated gives copy heads strong
    periodic diagonals, which is not what long documents look like.
    """
    from sparse_infer.eval._text import essay_words

    words = essay_words()
    start = (seed * 7919) % len(words)
    ids: list[int] = []
    chunk = 2000
    while len(ids) < length:
        piece = " ".join(words[start:start + chunk]) or " ".join(words[:chunk])
        ids.extend(tokenizer(" " + piece, add_special_tokens=False)["input_ids"])
        start = (start + chunk) % len(words)
    return torch.tensor(ids[:length])[None]


def named_plans(names, model_config) -> dict:
    """{name: plan} for the end-to-end benches: sparse presets are built with min_seq_len 0 (so
    every benchmarked length runs sparse); any other name (shipped plan, YAML path) is passed on
    to patch as it is."""
    from sparse_infer.plan import PRESETS, preset

    return {name: preset(name, model_config, min_seq_len=0) if name in PRESETS and name != "dense" else name
            for name in names}


def bench_prefill_end_to_end(model, tokenizer, lengths, plans: dict, repeats: int = 1):
    """Rows {n, plan, seconds, ratio, density}: one forward over the prompt, dense first."""
    import sparse_infer
    from sparse_infer.bench.patching import patched

    rows = []
    for n in lengths:
        ids = synthetic_prompt_ids(tokenizer, n)
        dense_s = None
        for name, plan in [("dense", None), *plans.items()]:
            best = float("inf")
            with patched(model, plan), torch.no_grad():
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    model(ids, use_cache=False, logits_to_keep=1)
                    best = min(best, time.perf_counter() - t0)
                density = sparse_infer.get_stats(model)["prefill_density"] if plan is not None else 1.0
            dense_s = best if name == "dense" else dense_s
            rows.append({"n": n, "plan": name, "seconds": best, "ratio": dense_s / best, "density": density})
    return rows
