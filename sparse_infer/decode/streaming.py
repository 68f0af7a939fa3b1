"""StreamingLLM-style heads: attend to the first `sink` valid tokens and the last `local` ones.

No scoring and no side state: the index set depends only on positions (and the mask,
so left padding is skipped and the sinks are the first *real* tokens).
"""
from __future__ import annotations

import torch

from sparse_infer.decode.common import GroupInputs, forced_and_eligible
from sparse_infer.methods import BenchCase, DecodeSelector, Param, curve_at, fixed_size_ok, pow2_grid, register
from sparse_infer.params import positive_int

# sinks the profiler's recall curves are computed for (the streaming search grid)
STREAMING_SINKS = (4, 16, 64, 128)


def select(inp: GroupInputs, rule, state=None):
    forced, _ = forced_and_eligible(inp, rule.sink, rule.local)
    return forced


@register
class Streaming(DecodeSelector):
    name = "streaming"
    label = "stream"
    params = {"sink": Param(positive_int, 128), "local": Param(positive_int, 1024)}
    search_priority = 0

    def select(self, inp, rule, state):
        return select(inp, rule, state)

    def expected_rows(self, rule, n):
        return min(n, rule.sink + rule.local)

    def search_grid(self, n):
        half = max(n // 2, 64)              # the recall curves stop at half the cache (layer.curve_size)
        return [{"sink": s, "local": w} for s in STREAMING_SINKS for w in pow2_grid(64, half)]

    def search_curves(self, inputs, channels=None):
        """One curve per profiled sink: recall with the window w = index + 1."""
        probs, pos, n = inputs.probs, inputs.pos, inputs.n
        hq, dq = probs.shape[:2]
        keys = torch.arange(n)
        span = min(inputs.size, n)
        # the key at distance t behind the query (window w keeps t < w)
        behind = pos[:, None] - keys[None, :span]                             # (dq, span)
        ok = behind >= 0
        out = {}
        for sink in STREAMING_SINKS:
            sink_mass = (probs[..., :sink] * (keys[:sink][None, :] <= pos[:, None])).sum(-1)
            mid = probs.masked_fill((keys < sink)[None, None, :], 0.0)
            window = torch.where(ok, mid.gather(-1, behind.clamp(min=0).expand(hq, dq, span)), 0.0)
            out[("streaming", sink)] = inputs.extend((window.cumsum(-1) + sink_mass[..., None]).mean(1), inputs.size)
        return out

    def search_cost(self, params, n, head_dim, channels):
        return min(1.0, (params["sink"] + params["local"]) / n)

    def search_recall(self, curves, params, n):
        return curve_at(curves["streaming"][params["sink"]], params["local"])

    def bench_cases(self, budget):
        # no budget param: a sink of an eighth of the budget (at most the default 128), the rest window
        sink = min(128, max(1, budget // 8))
        return [BenchCase(self.name, {"sink": sink, "local": max(1, budget - sink)})]

    def search_combine(self, points, channel_list):
        if not fixed_size_ok({L: p["local"] for L, p in points.items()}):
            return None                     # window grows with length: not a streaming head
        return {k: max(p[k] for p in points.values()) for k in ("sink", "local")}
