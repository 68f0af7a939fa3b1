"""The adaptive pattern: budgets follow the input. Vertical-slash heads keep at least `gamma` of
the estimate rows' exact attention, query-aware heads are the block pattern at coverage
`gamma`, the divergence test sends each head to the right mode, and `gamma` 1 is dense."""
import math

import pytest
import torch

from sparse_infer.kernels.index import index_to_mask
from sparse_infer.plan import PlanError, load_plan, parse_rule
from sparse_infer.prefill import build_index
from sparse_infer.prefill.adaptive import coverage_count, js_distance
from sparse_infer.prefill.block import block_index


def _qk(hq=4, hkv=2, n=320, d=16, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, hq, n, d, generator=g) * scale, torch.randn(1, hkv, n, d, generator=g) * scale


def _rule(**params):
    return parse_rule({"pattern": "adaptive", **params}, "t", "prefill")


def _exact_probs(q, k, scaling):
    groups = q.shape[1] // k.shape[1]
    scores = q @ k.repeat_interleave(groups, 1).transpose(-1, -2) * scaling
    n = k.shape[2]
    causal = torch.ones(q.shape[2], n, dtype=torch.bool).tril(n - q.shape[2])
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)


def test_coverage_count_and_js_distance():
    mass = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    assert coverage_count(mass, 0.8).tolist() == [2, 4]        # the entry crossing the target counts
    assert coverage_count(mass, 0.81).tolist() == [3, 4]
    assert coverage_count(mass, 1.0).tolist() == [4, 4]
    # forced entries count first: their mass is part of the target, their slots are not in the count
    forced = torch.tensor([False, False, True, False])
    assert coverage_count(mass, 0.6, forced).tolist() == [1, 2]    # 0.15 + 0.5 / 0.25 + 0.25 + 0.25
    assert coverage_count(mass, 0.1, forced).tolist() == [0, 0]    # the forced entry alone reaches it
    assert coverage_count(mass, 1.0, forced).tolist() == [3, 3]
    p = torch.tensor([1.0, 0.0])
    assert js_distance(p, p).item() == pytest.approx(0.0, abs=1e-6)
    assert js_distance(p, torch.tensor([0.0, 1.0])).item() == pytest.approx(math.log(2) ** 0.5, rel=1e-5)   # disjoint: ln 2


@pytest.mark.parametrize("sink,local", [(0, 0), (40, 24)])
@pytest.mark.parametrize("gamma", [0.5, 0.8, 0.95])
def test_vertical_slash_heads_keep_gamma_of_the_estimate_rows_mass(gamma, sink, local):
    q, k = _qk(scale=2.0)
    scaling = q.shape[-1] ** -0.5
    last_q = 32
    index = build_index(_rule(gamma=gamma, tau=0.0, last_q=last_q, sink=sink, local=local), q, k, block_size=32,
                        scaling=scaling, granularity="head")
    selected = index_to_mask(index, q.shape[2], k.shape[2], q.shape[1])[:, :, -last_q:]
    probs = _exact_probs(q, k, scaling)[:, :, -last_q:]
    kept = (probs * selected).sum((-1, -2)) / probs.sum((-1, -2))          # per head
    assert (kept >= gamma - 1e-5).all(), kept
    assert index.columns is not None and (index.columns >= 0).any()


def test_query_aware_heads_are_the_block_pattern_at_coverage_gamma():
    q, k = _qk()
    kwargs = dict(block_size=32, scaling=0.25, granularity="group")
    adaptive = build_index(_rule(gamma=0.7, tau=1.0, dense_tail=0), q, k, **kwargs)
    block = block_index(q, k, parse_rule({"pattern": "block", "coverage": 0.7}, "t", "prefill"), **kwargs)
    n = k.shape[2]
    assert torch.equal(index_to_mask(adaptive, n, n, 4), index_to_mask(block, n, n, 4))
    assert adaptive.columns is None or (adaptive.columns < 0).all()


def test_divergence_picks_the_mode_per_head():
    # head 0 of each pair: a needle column the pooled blocks cannot see (its block's mean is
    # dominated by 31 ordinary keys); head 1: smooth keys the pooled estimate predicts well
    n, d = 320, 16
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, n, d, generator=g) * 0.1
    k = torch.randn(1, 2, n, d, generator=g) * 0.1
    q[0, 0, :, 0] = 4.0
    k[0, 0, 100, 0] = 4.0                                     # the needle key
    index = build_index(_rule(gamma=0.9, tau=0.1, last_q=32, sink=0, local=0), q, k, block_size=32,
                        scaling=1.0, granularity="head")
    columns = index.columns[0]
    assert 100 in columns[0].tolist(), "the needle head goes vertical-slash and keeps the needle"
    assert (columns[1] < 0).all(), "the smooth head stays query-aware"


@pytest.mark.parametrize("tau", [0.0, 0.1, 1.0])
def test_gamma_one_is_dense_causal(tau):
    q, k = _qk(n=300)
    index = build_index(_rule(gamma=1.0, tau=tau), q, k, block_size=32, scaling=0.25, granularity="group")
    mask = index_to_mask(index, 300, 300, 4)
    assert torch.equal(mask, torch.ones(300, 300, dtype=torch.bool).tril().expand_as(mask))


def test_plan_fields_are_checked():
    plan = {"sparse_infer_plan": 1, "prefill": {"default": {"pattern": "adaptive"}}}
    rule = load_plan(plan).prefill.rule(0, 0)
    assert (rule.gamma, rule.tau) == (0.9, 0.1)
    for field, value, message in (("gamma", 0, "(0, 1]"), ("gamma", 1.5, "(0, 1]"), ("tau", -0.1, "[0, 1]"),
                                  ("last_q", 0, "positive")):
        bad = {"sparse_infer_plan": 1, "prefill": {"default": {"pattern": "adaptive", field: value}}}
        with pytest.raises(PlanError) as err:
            load_plan(bad)
        assert f"prefill.default.{field}" in str(err.value) and message in str(err.value)


def test_always_kept_sinks_count_toward_gamma():
    # keys whose first 40 columns draw most of the attention (attention sinks): with the sinks
    # counted first, a vertical-slash head needs fewer extra columns than when they come on top
    q, k = _qk(scale=1.0, seed=5)
    k[:, :, :40, 0] = 6.0
    q[:, :, :, 0] = 1.5
    scaling = q.shape[-1] ** -0.5
    kwargs = dict(block_size=32, scaling=scaling, granularity="head")
    with_sinks = build_index(_rule(gamma=0.9, tau=0.0, last_q=32, sink=40, local=0), q, k, **kwargs)
    without = build_index(_rule(gamma=0.9, tau=0.0, last_q=32, sink=0, local=0), q, k, **kwargs)
    extra = ((with_sinks.columns >= 40).sum(-1))                       # columns beyond the sinks
    assert (extra < (without.columns >= 0).sum(-1)).all()
    assert ((with_sinks.columns >= 0) & (with_sinks.columns < 40)).sum(-1).eq(40).all()
