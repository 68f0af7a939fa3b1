"""Prefill attention of single Qwen2.5-0.5B layers on their real q/k/v: dense SDPA vs a plan,
and where the sparse time goes (index building vs executor vs dense heads).

    python benchmarks/prefill_layers.py capture 16384 0,5,13,18 out/qkv16k.pt
    python benchmarks/prefill_layers.py plan out/qkv16k.pt qwen2.5-0.5b 1.0,0.5,0.4,0.3 [THREADS]
    python benchmarks/prefill_layers.py group out/qkv16k.pt 0,5 0.9,0.97,0.99,0.999 [THREADS]

capture: one dense forward of the benchmark prompt that stops after the last listed layer and
saves those layers' (q, k, v). plan: each layer under a plan (shipped name, preset or YAML) at
several dense_above thresholds (one number for both index kinds). group: kv group 0 alone with
one group-shared block index per coverage, the break-even of group-shared indices.
"""
import sys
import time

import torch
import torch.nn.functional as F

from sparse_infer.bench.layer import qwen2_5_0_5b_shape

SCALING = qwen2_5_0_5b_shape().head_dim ** -0.5


def capture(length: str, layers: str, out: str):
    import transformers.integrations.sdpa_attention as sdpa
    from transformers import AttentionInterface

    from sparse_infer.bench.prefill import synthetic_prompt_ids
    from sparse_infer.models import load_model

    wanted = [int(x) for x in layers.split(",")]
    model, tok = load_model("qwen2.5-0.5b")
    ids = synthetic_prompt_ids(tok, int(length))
    saved = {}

    class Done(Exception):
        pass

    def record(module, q, k, v, mask, **kw):
        if module.layer_idx in wanted:
            saved[module.layer_idx] = (q.clone(), k.clone(), v.clone())
            if len(saved) == len(wanted):
                torch.save(saved, out)
                raise Done
        return sdpa.sdpa_attention_forward(module, q, k, v, mask, **kw)

    AttentionInterface.register("sparse_infer_capture", record)
    model.set_attn_implementation("sparse_infer_capture")
    try:
        with torch.no_grad():
            model(ids)
    except Done:
        print(f"saved layers {sorted(saved)} to {out}")


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def plan_layers(path: str, plan_name: str, thresholds: str, threads: str = "1"):
    import sparse_infer.prefill.dispatch as prefill_dispatch
    from sparse_infer.bench.layer import layer_runtime
    from sparse_infer.bench.prefill import named_plans
    from sparse_infer.prefill.dispatch import sparse_prefill

    torch.set_num_threads(int(threads))
    saved = torch.load(path)
    from sparse_infer.plan import load_plan

    plan = load_plan(named_plans([plan_name], qwen2_5_0_5b_shape())[plan_name])
    spent = {}

    def account(module, name):
        inner = getattr(module, name)

        def wrapped(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
        setattr(module, name, wrapped)

    account(prefill_dispatch, "build_index")
    account(prefill_dispatch, "_dense_subset")
    import sparse_infer.kernels.dispatch as kernels
    account(kernels, "block_sparse_attention")
    for layer, (q, k, v) in saved.items():
        rt = layer_runtime(plan, layer, q.shape[1], k.shape[1], backend="torch")
        dense = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALING, enable_gqa=True)  # noqa: E731
        dense()
        dense_s = _timed(dense)
        for threshold in (float(x) for x in thresholds.split(",")):
            rt.dense_above = threshold
            sparse_prefill(rt, q, k, v, None, SCALING)          # warm-up (workspaces)
            spent.clear()
            sparse_s = _timed(lambda: sparse_prefill(rt, q, k, v, None, SCALING))
            parts = " ".join(f"{name}={sec:.2f}s" for name, sec in spent.items())
            print(f"layer {layer} dense_above {threshold}: {len(rt.prefill_groups)} rules, dense {dense_s:.2f}s, "
                  f"plan {sparse_s:.2f}s ({dense_s / sparse_s:.2f}x)  {parts}", flush=True)


def group_break_even(path: str, layers: str, coverages: str, threads: str = "1"):
    from sparse_infer.kernels.index import index_head_density
    from sparse_infer.kernels.torch_executor import block_sparse_attention_torch
    from sparse_infer.plan import Rule
    from sparse_infer.presets import preset
    from sparse_infer.prefill import build_index

    torch.set_num_threads(int(threads))
    saved = torch.load(path)
    base = preset("block", qwen2_5_0_5b_shape(), min_seq_len=0).prefill.default
    for layer in (int(x) for x in layers.split(",")):
        q, k, v = saved[layer]
        group = q.shape[1] // k.shape[1]
        qg, kg, vg = q[:, :group], k[:, :1], v[:, :1]
        dense_s = _timed(lambda: F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=SCALING,
                                                                enable_gqa=True))
        for coverage in (float(x) for x in coverages.split(",")):
            rule = Rule(kind="block", params={**base.params, "coverage": coverage})
            index = build_index(rule, qg, kg, block_size=64, scaling=SCALING, granularity="group")
            density = float(index_head_density(index, q.shape[2], k.shape[2])[0])
            block_sparse_attention_torch(qg, kg, vg, index, scaling=SCALING)
            sparse_s = _timed(lambda: block_sparse_attention_torch(qg, kg, vg, index, scaling=SCALING))
            print(f"layer {layer} coverage {coverage}: group density {density:.3f}, dense {dense_s:.2f}s, "
                  f"sparse {sparse_s:.2f}s ({dense_s / sparse_s:.2f}x)", flush=True)


if __name__ == "__main__":
    {"capture": capture, "plan": plan_layers, "group": group_break_even}[sys.argv[1]](*sys.argv[2:])
