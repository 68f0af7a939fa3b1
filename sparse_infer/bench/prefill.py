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
    from sparse_infer.presets import PRESETS, preset

    return {name: preset(name, model_config, min_seq_len=0) if name in PRESETS and name != "dense" else name
            for name in names}


def _layer_seconds(stats: dict, forwards: int) -> dict[int, dict[str, float]]:
    """{layer: {estimate, sparse, dense, attention, density}}: seconds per forward, from the
    timed stats (get_stats)."""
    layers = {}
    for idx, layer in stats["layers"].items():
        seconds = {k: v / forwards for k, v in layer.get("prefill_seconds", {}).items()}
        if seconds:
            seconds["attention"] = sum(seconds.values())
            seconds["density"] = layer["prefill_density"]
            layers[idx] = seconds
    return layers


def bench_prefill_end_to_end(model, tokenizer, lengths, plans: dict, repeats: int = 1, window: int = 256,
                             detail: bool = False):
    """Rows {n, plan, seconds, ratio, density, kl, top1}: one teacher-forced forward over a prose
    prompt of n tokens (the `eval fidelity` prose prompt), dense first; each plan's next-token
    distributions over the last `window` positions are compared with dense's from the same run
    (mean KL(dense || plan) in nats, top-1 agreement in %).

    detail: each row also gets "layers", {layer: seconds per forward of its prefill attention,
    split into estimate (building indices), sparse (executor), dense (heads run dense)}, and
    the dense row gets the same from a forward under the all-dense plan (which runs every layer
    through the patched path's dense call); "other_s" is the rest of the forward (projections,
    MLP, norms, logits): "forward_s", the mean forward of the same runs (for the dense row not
    the timed one), minus their mean attention time."""
    from sparse_infer.bench.patching import patched
    from sparse_infer.eval.fidelity import compare, next_token_logprobs, prose_prompt, scored_positions
    from sparse_infer.runtime import set_timing

    def timed(plan):
        """(log-probs, fastest forward, density, {"layers", "forward_s", "other_s"} under detail)."""
        import sparse_infer

        best, total, out, stats = float("inf"), 0.0, None, None
        with patched(model, plan):
            set_timing(model, detail)
            for _ in range(repeats):
                t0 = time.perf_counter()
                out = next_token_logprobs(model, prompt.input_ids, positions)
                elapsed = time.perf_counter() - t0
                best, total = min(best, elapsed), total + elapsed
            if plan is not None:
                stats = sparse_infer.get_stats(model)
        breakdown = {}
        if detail and stats is not None:
            # the layer times are means over the forwards: so is the forward they are taken from
            layers = _layer_seconds(stats, repeats)
            breakdown = {"layers": layers, "forward_s": total / repeats,
                         "other_s": total / repeats - sum(layer["attention"] for layer in layers.values())}
        return out, best, 1.0 if stats is None else stats["prefill_density"], breakdown

    rows = []
    for n in lengths:
        prompt = prose_prompt(tokenizer, n, 0)
        positions = scored_positions(prompt, window)
        # one untimed forward first: the process's first forward at a length pays for growing
        # the allocator's arenas (measured 10-20% slower at 16K), which would flatter every plan
        next_token_logprobs(model, prompt.input_ids, positions)
        reference, dense_s, _, _ = timed(None)
        dense_row = {"n": n, "plan": "dense", "seconds": dense_s, "ratio": 1.0, "density": 1.0,
                     "kl": 0.0, "top1": 100.0}
        if detail:
            dense_row.update(timed("dense")[3])
        rows.append(dense_row)
        for name, plan in plans.items():
            out, seconds, density, breakdown = timed(plan)
            figures = compare(reference, out, positions, prompt)
            rows.append({"n": n, "plan": name, "seconds": seconds, "ratio": dense_s / seconds, "density": density,
                         "kl": figures["kl"], "top1": figures["top1"], **breakdown})
    return rows
