"""How well one layer's top tokens serve the layers after it (cross-layer reuse, decode).

For one long prose prompt, dense greedy decoding; at each of the last STEPS steps the decode
query's exact attention of every layer (eager, output_attentions) is kept. For each pair of
layers S < L it reports the attention mass of layer L (averaged over heads and steps) that
falls on the tokens layer S would publish at a budget: the `layer` scope (attention summed
over all heads of S) and the `kv_head` scope (cache head j of L reads the set of cache head
j of S), next to L's own best set of the same size (the oracle). Sinks (16) and window (64)
are in every set, as in layer_select's defaults.

    python benchmarks/cross_layer_overlap.py MODEL LENGTH BUDGET STEPS OUT.json
"""
from __future__ import annotations

import json
import sys

import torch

import sparse_infer
from sparse_infer.eval.fidelity import greedy_continuation, prose_prompt
from sparse_infer.plan import parse_rule
from sparse_infer.profiler.reuse import held_mass, published_sets

SINK, LOCAL = 16, 64


def step_attentions(model, ids, steps):
    """[(layers, Hq, n)] exact decode attention of the last `steps` generated positions."""
    with torch.no_grad():
        out = model(torch.tensor([ids[:-steps]]), use_cache=True)
        cache = out.past_key_values
        model.set_attn_implementation("eager")
        kept = []
        for t in range(len(ids) - steps, len(ids)):
            o = model(torch.tensor([[ids[t]]]), past_key_values=cache, use_cache=True, output_attentions=True)
            cache = o.past_key_values
            kept.append(torch.stack([a[0, :, 0].float() for a in o.attentions]))
        model.set_attn_implementation("sdpa")
    return kept


def select_rule(budget, scope):
    return parse_rule({"method": "layer_select", "budget": budget, "sink": SINK, "local": LOCAL, "scope": scope},
                      "overlap", "decode")


def main():
    name, length, budget, steps, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    torch.set_num_threads(2)
    model, tok = sparse_infer.load_model(name)
    prompt = prose_prompt(tok, length, 0).input_ids
    ids = list(prompt) + greedy_continuation(model, prompt, steps)
    atts = step_attentions(model, ids, steps)
    layers, hq = atts[0].shape[:2]
    hk = model.config.num_key_value_heads
    oracle = torch.zeros(layers)
    layer_scope = torch.zeros(layers, layers)
    kv_scope = torch.zeros(layers, layers)
    by_layer, per_head = select_rule(budget, "layer"), select_rule(budget, "kv_head")
    for probs in atts:                                                  # (layers, Hq, n)
        # a set per query head (kv_head scope with one head a set): each head's own best set
        oracle += held_mass(probs, published_sets(probs, per_head, hq)).diagonal()
        layer_scope += held_mass(probs, published_sets(probs, by_layer, hk))
        kv_scope += held_mass(probs, published_sets(probs, per_head, hk))
    result = {"model": name, "length": length, "budget": budget, "steps": steps, "sink": SINK, "local": LOCAL,
              "oracle": (oracle / steps).tolist(), "layer": (layer_scope / steps).tolist(),
              "kv_head": (kv_scope / steps).tolist()}
    with open(out, "x") as f:
        json.dump(result, f, indent=1)
    o, ls, ks = result["oracle"], layer_scope / steps, kv_scope / steps
    print("layer  oracle  prev-layer(layer)  prev-layer(kv_head)  best source(layer)")
    for L in range(1, layers):
        best = int(ls[:L, L].argmax())
        print(f"{L:5d}  {o[L]:.3f}  {ls[L - 1, L]:.3f}  {ks[L - 1, L]:.3f}  {best}:{ls[best, L]:.3f}")


if __name__ == "__main__":
    main()
