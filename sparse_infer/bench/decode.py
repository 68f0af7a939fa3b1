"""End-to-end decode speed of a loaded model: dense vs each plan's decode selection.

One dense prefill of the prompt is shared by every plan (its cache is copied), so the
numbers isolate decoding: `new_tokens` greedy steps through the whole model, one token at a
time, with the plan's decode methods on the patched layers. The first step of each plan
(which builds the side state from the full cache) is timed separately from the steady state.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from contextlib import contextmanager
from statistics import median

import torch

from sparse_infer.bench.patching import patched
from sparse_infer.bench.timing import synchronize
from sparse_infer.methods import DECODE_SELECTORS


def _load(model_spec):
    if isinstance(model_spec, str):
        from sparse_infer.models import load_model
        return load_model(model_spec)
    if isinstance(model_spec, tuple):
        return model_spec
    return model_spec, None


def _prompt(model, tokenizer, prompt_len: int) -> torch.Tensor:
    if tokenizer is not None:
        from sparse_infer.bench.prefill import synthetic_prompt_ids
        return synthetic_prompt_ids(tokenizer, prompt_len)
    vocab = model.config.get_text_config().vocab_size
    return torch.randint(3, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _decode_loop(model, cache, first_token, new_tokens: int):
    """Greedy steps; returns (tokens, seconds of the first step, seconds of the remaining steps)."""
    device = next(model.parameters()).device
    token = first_token.to(device)
    out, first_s = [], 0.0
    t0 = time.perf_counter()
    for step in range(new_tokens):
        logits = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1]
        token = logits.argmax(-1, keepdim=True)
        out.append(int(token[0, 0]))
        if step == 0:
            synchronize(device)
            first_s = time.perf_counter() - t0
            t0 = time.perf_counter()
    synchronize(device)
    return out, first_s, time.perf_counter() - t0


def decode_method_plan(method: str, budget: int = 2048) -> dict:
    """A whole-model plan for the end-to-end decode benches: prefill dense, every layer but
    layer 0 decoding with `method` (streaming keeps its default sink + window, the others
    read `budget` tokens), from the first step (min_kv_len 0)."""
    takes_budget = method in DECODE_SELECTORS and "budget" in DECODE_SELECTORS[method].params
    rule = {"method": method, "budget": budget} if takes_budget else {"method": method}
    return {"sparse_infer_plan": 1, "prefill": {"min_seq_len": 1 << 30},
            "decode": {"min_kv_len": 0, "default": rule, "layers": {0: {"*": {"method": "dense"}}}}}


def method_or_plan(name: str, budget: int = 2048):
    """A decode method name as decode_method_plan's plan (one method for every layer but
    layer 0); any other name (shipped plan, preset, YAML path) is passed on as it is."""
    return decode_method_plan(name, budget) if name in DECODE_SELECTORS else name


def split_backend(spec: str) -> tuple[str, str]:
    """'NAME@BACKEND' -> (NAME, BACKEND); a bare NAME gets patch's default backend "auto"."""
    name, _, backend = spec.partition("@")
    return name, backend or "auto"


def synthetic_cache(config, n: int, batch: int = 1, cache_cls=None):
    """A cache of n random K/V rows per layer for the model config, seeded (every run the same):
    a long context for timing decode steps without a prefill. cache_cls defaults to AppendCache."""
    if cache_cls is None:
        from sparse_infer.cache import AppendCache

        cache_cls = AppendCache
    head_dim = config.hidden_size // config.num_attention_heads
    g = torch.Generator().manual_seed(0)
    cache = cache_cls(config=config)
    shape = (batch, config.num_key_value_heads, n, head_dim)
    for layer in range(config.num_hidden_layers):
        cache.update(torch.randn(*shape, generator=g), torch.randn(*shape, generator=g), layer)
    return cache


def bench_decode_end_to_end(model_spec, prompt_len: int, new_tokens: int, plans: dict, backend: str = "auto",
                            cache: str = "dynamic", rounds: int = 1):
    """Decode tokens/s for dense and each plan (name -> plan: dict, YAML path, Plan, or a
    (plan, backend) pair to run that plan on another executor than `backend`).

    model_spec: a built-in model name / path for load_model, a (model, tokenizer) pair, or a
    model (random prompt). Returns {"prompt_len", "new_tokens", "rounds", "rows": [...]}, one
    row per plan, dense first: tokens_per_s (steady state, steps 2..new_tokens; the median over
    rounds), tokens_per_s_rounds, first_step_s (median), speedup (vs dense tokens_per_s),
    decode_density, state_bytes (side state after the run), same_tokens (fraction of
    generated tokens equal to dense's).

    rounds: each round decodes dense and then every plan once, so a slow drift of the machine
    (other load, clock) reaches dense and the plans alike instead of whichever ran first.

    cache: "dynamic" (transformers' DynamicCache: every step concatenates, i.e. copies the
    whole K/V once, for dense and sparse alike) or "append" (sparse_infer.AppendCache: rows
    written in place). Dense and every plan use the same kind."""
    from transformers import DynamicCache

    import sparse_infer
    from sparse_infer.cache import AppendCache
    from sparse_infer.decode import decode_state_bytes

    if cache not in ("dynamic", "append"):
        raise ValueError(f"cache must be 'dynamic' or 'append', got {cache!r}")
    if new_tokens < 2:
        raise ValueError("new_tokens must be >= 2 (the first step is timed apart)")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    model, tokenizer = _load(model_spec)
    ids = _prompt(model, tokenizer, prompt_len).to(next(model.parameters()).device)
    with torch.no_grad():
        kv = (DynamicCache if cache == "dynamic" else AppendCache)(config=model.config)
        logits = model(input_ids=ids, cache=kv, use_cache=True).logits[:, -1]
    first_token = logits.argmax(-1, keepdim=True)

    configs = [("dense", None, None)]
    for name, plan in plans.items():
        plan, plan_backend = plan if isinstance(plan, tuple) else (plan, backend)
        configs.append((name, plan, plan_backend))
    runs: dict[str, list] = {name: [] for name, _, _ in configs}
    for _ in range(rounds):
        for name, plan, plan_backend in configs:
            with patched(model, plan, backend=plan_backend):
                tokens, first_s, rest_s = _decode_loop(model, copy.deepcopy(kv), first_token, new_tokens)
                density = sparse_infer.get_stats(model)["decode_density"] if plan is not None else 1.0
                state = decode_state_bytes(model) if plan is not None else 0
            runs[name].append({"tokens": tokens, "first_s": first_s, "rate": (new_tokens - 1) / rest_s,
                               "density": density, "state": state})

    dense_tokens = runs["dense"][0]["tokens"]
    dense_rate = median(run["rate"] for run in runs["dense"])
    rows = []
    for name, _, _ in configs:
        mine = runs[name]
        rate = median(run["rate"] for run in mine)
        rows.append({
            "plan": name, "cache": cache, "tokens_per_s": rate, "tokens_per_s_rounds": [run["rate"] for run in mine],
            "first_step_s": median(run["first_s"] for run in mine), "speedup": rate / dense_rate,
            "decode_density": mine[-1]["density"], "state_bytes": mine[-1]["state"],
            "same_tokens": sum(a == b for a, b in zip(mine[0]["tokens"], dense_tokens)) / len(dense_tokens),
        })
    return {"prompt_len": prompt_len, "new_tokens": new_tokens, "rounds": rounds, "rows": rows}


def _zero_attention(module, query, key, value, attention_mask, **kwargs):
    batch, heads, q_len, head_dim = query.shape
    return query.new_zeros(batch, q_len, heads, head_dim), None


@contextmanager
def no_attention(model) -> Iterator[None]:
    """The model with every attention call replaced by zeros for the length of the block: a
    decode step without attention is the bound for any decode method."""
    from transformers import AttentionInterface

    AttentionInterface.register("sparse_infer_zero", _zero_attention)
    previous = model.config._attn_implementation
    model.set_attn_implementation("sparse_infer_zero")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def padding_mask(batch: int, length: int, padding: int, device=None) -> torch.Tensor | None:
    """The (batch, length) attention mask of a batch whose odd rows are left-padded by `padding`
    tokens (zeros there), as generate gives prompts of different lengths; None without padding."""
    if padding <= 0 or batch < 2:
        return None
    if padding >= length:
        raise ValueError(f"padding {padding} must be shorter than the cache ({length} tokens)")
    mask = torch.ones(batch, length, dtype=torch.long, device=device)
    mask[1::2, :padding] = 0
    return mask


@torch.no_grad()
def step_ms(model, base_cache, batch: int, warmup: int, timed: int, after_warmup=None,
            padding: int = 0) -> list[float]:
    """Milliseconds of `timed` decode steps (after `warmup`, then `after_warmup()`) on a copy of
    the cache, growing by one row per step as in generation; with `padding`, the odd batch rows
    are left-padded by that many cached tokens (padding_mask)."""
    device = next(model.parameters()).device
    cache = copy.deepcopy(base_cache)
    held = cache.get_seq_length()
    token = torch.full((batch, 1), 100, device=device)
    times = []
    for step in range(warmup + timed):
        if step == warmup and after_warmup is not None:
            after_warmup()
        mask = padding_mask(batch, held + step + 1, padding, device)
        synchronize(device)
        t0 = time.perf_counter()
        model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1)
        synchronize(device)
        if step >= warmup:
            times.append(1e3 * (time.perf_counter() - t0))
    return times


def bench_decode_steps(model, kv_lens, batches, plans: dict, warmup: int = 2, timed: int = 6,
                       padding: int = 0) -> list[dict]:
    """Per decode step of the whole model over a synthetic cache (random K/V of the model's shape:
    timing only), for each cache length and batch size: dense, no attention at all (the bound of
    any decode method), and each plan (name -> plan, as patch takes it; plans run with patch's
    defaults). `padding`: the odd rows of a batch are left-padded by that many cached tokens.

    Rows {kv_len, batch, plan, step_ms (median), ratio (dense / plan), attention_share (of dense's
    step: 1 - no-attention / dense), kv_bytes (K/V bytes read per step: the measured decode
    density times the cache), select_ms (selectors choosing rows, per step), select_attend_ms
    (fused selection + attention calls, per step), decode_density}."""
    import sparse_infer
    from sparse_infer.runtime import set_timing

    config = model.config.get_text_config()
    elem = next(model.parameters()).element_size()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rows = []
    for n in kv_lens:
        for batch in batches:
            base = synthetic_cache(config, n, batch)
            cache_bytes = 2 * config.num_hidden_layers * batch * config.num_key_value_heads * n * head_dim * elem
            dense_ms = median(step_ms(model, base, batch, warmup, timed, padding=padding))
            with no_attention(model):
                bound_ms = median(step_ms(model, base, batch, warmup, timed, padding=padding))
            share = max(0.0, 1 - bound_ms / dense_ms)
            common = {"kv_len": n, "batch": batch, "padding": padding if batch > 1 else 0, "attention_share": share}
            rows.append({**common, "plan": "dense", "step_ms": dense_ms, "ratio": 1.0, "kv_bytes": cache_bytes,
                         "select_ms": 0.0, "select_attend_ms": 0.0, "decode_density": 1.0})
            rows.append({**common, "plan": "no attention (bound)", "step_ms": bound_ms, "ratio": dense_ms / bound_ms,
                         "kv_bytes": 0, "select_ms": 0.0, "select_attend_ms": 0.0, "decode_density": 0.0})
            for name, plan in plans.items():
                with patched(model, plan):
                    set_timing(model, True)
                    # side state built from the whole cache in the warm-up steps, kept per step after:
                    # the stats count the timed steps only
                    times = step_ms(model, base, batch, warmup, timed, lambda: sparse_infer.reset_stats(model),
                                    padding=padding)
                    stats = sparse_infer.get_stats(model)
                density = stats["decode_density"] if stats["decode_density"] is not None else 1.0
                steps = timed
                seconds = [layer.get("decode_seconds", {}) for layer in stats["layers"].values()]
                rows.append({**common, "plan": name, "step_ms": median(times), "ratio": dense_ms / median(times),
                             "kv_bytes": density * cache_bytes,
                             "select_ms": 1e3 * sum(s.get("select", 0.0) for s in seconds) / steps,
                             "select_attend_ms": 1e3 * sum(s.get("select_attend", 0.0) for s in seconds) / steps,
                             "decode_density": density})
    return rows

