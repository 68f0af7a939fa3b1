"""Blockwise statistics and index recall/density equal their dense-map definitions."""
import pytest
import torch

from sparse_infer.kernels.index import index_density, index_to_mask
from sparse_infer.prefill import build_index
from sparse_infer.methods import curve_at
from sparse_infer.profiler.decode import CurveInputs, curve_entries, retrieval_hits
from sparse_infer.profiler.search import evaluate_prefill_run, make_rule, params_key
from sparse_infer.profiler.stats import (
    attention_stats, channel_scores, index_head_density, index_recall, index_tail_recall, last_attention,
)


def _inputs(hq=4, hkv=2, n=300, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(hq, n, d, generator=g) * 1.5, torch.randn(hkv, n, d, generator=g)


def _dense_probs(q, k, scaling, mask=None, softcap=None):
    hq, n, _ = q.shape
    kk = k.repeat_interleave(hq // k.shape[0], 0)
    s = q @ kk.transpose(-1, -2) * scaling
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    if mask is not None:
        allowed = allowed & mask
    return torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)


@pytest.mark.parametrize("n,bs", [(300, 32), (256, 64), (97, 16)])
def test_blockwise_stats_equal_dense_map(n, bs):
    q, k = _inputs(n=n)
    st = attention_stats(q, k, scaling=0.25, block_size=bs, decode_queries=20)
    P = _dense_probs(q, k, 0.25)
    nkb = -(-n // bs)
    Pp = torch.nn.functional.pad(P, (0, nkb * bs - n, 0, nkb * bs - n))
    torch.testing.assert_close(st.block_mass, Pp.view(4, nkb, bs, nkb, bs).sum((2, 4)), atol=1e-5, rtol=0)
    torch.testing.assert_close(st.col_mass, Pp.view(4, nkb, bs, nkb * bs).sum(2)[..., :n], atol=1e-5, rtol=0)
    torch.testing.assert_close(st.col_total, P.sum(1), atol=1e-5, rtol=0)
    i = torch.arange(n)
    diag = torch.stack([P[:, i[o:], i[o:] - o].sum(-1) for o in range(n)], -1)
    torch.testing.assert_close(st.diag_mass, diag, atol=1e-5, rtol=0)
    torch.testing.assert_close(st.last_probs, P[:, -20:], atol=1e-6, rtol=0)


RULES = [
    ("a_shape", {"sink": 32, "local": 64}),
    ("vertical_slash", {"vertical": 16, "slash": 8}),
    ("block", {"coverage": 0.8}),
]


@pytest.mark.parametrize("granularity", ["head", "group"])
@pytest.mark.parametrize("pattern,params", RULES)
def test_recall_and_density_equal_dense_map(pattern, params, granularity):
    q, k = _inputs(n=300)
    bs = 32
    st = attention_stats(q, k, scaling=0.25, block_size=bs)
    index = build_index(make_rule(pattern, params), q[None], k[None], block_size=bs, scaling=0.25,
                        granularity=granularity)
    mask = index_to_mask(index, 300, 300, 4)[0]                          # (Hq, n, n) selected pairs
    P = _dense_probs(q, k, 0.25)
    want_recall = (P * mask).sum((-1, -2)) / 300
    torch.testing.assert_close(index_recall(index, st), want_recall, atol=1e-5, rtol=0)
    tail = slice((300 // bs) * bs, 300)                                  # the last query block's rows
    want_tail = (P[:, tail] * mask[:, tail]).sum((-1, -2)) / (300 - (300 // bs) * bs)
    torch.testing.assert_close(index_tail_recall(index, st), want_tail, atol=1e-5, rtol=0)
    want_density = mask.float().sum((-1, -2)) / (300 * 301 / 2)
    torch.testing.assert_close(index_head_density(index, 300, 4), want_density, atol=1e-6, rtol=0)
    assert abs(float(want_density.mean()) - index_density(index, 300, 300)) < 1e-6


def test_recall_with_padding_mask_equals_dense_map():
    q, k = _inputs(n=200)
    n = 200
    mask = torch.ones(n, n, dtype=torch.bool).tril() & (torch.arange(n)[None, :] >= 30)
    st = attention_stats(q, k, scaling=0.25, block_size=32, mask=mask[None])
    index = build_index(make_rule("a_shape", {"sink": 32, "local": 64}), q[None], k[None], block_size=32,
                        scaling=0.25, attention_mask=mask[None, None], granularity="head")
    P = _dense_probs(q, k, 0.25, mask)
    sel = index_to_mask(index, n, n, 4)[0]
    torch.testing.assert_close(index_recall(index, st), (P * sel).sum((-1, -2)) / n, atol=1e-5, rtol=0)


def test_every_grid_point_measures_the_builder_index():
    """However a pattern's grid is measured (built, cached static bitmaps, vertical_slash's
    separable blocks(slash) | columns(vertical), builds sharing one estimate in a search
    session), each entry is the recall and density of the builder's own index."""
    from sparse_infer.methods import PREFILL_PATTERNS
    from sparse_infer.profiler.search import prefill_grid

    q, k = _inputs(n=512, d=16)
    st = attention_stats(q, k, scaling=0.25, block_size=32)
    table = evaluate_prefill_run(q, k, st, scaling=0.25, granularities=("head", "group"))
    grid = prefill_grid(512, 32)
    assert set(grid) == set(PREFILL_PATTERNS) and all(grid.values())
    for gran in ("head", "group"):
        for name, points in grid.items():
            for params in points:
                index = build_index(make_rule(name, params), q[None], k[None], block_size=32, scaling=0.25,
                                    granularity=gran)
                recall, tail, density = table[(gran, name, params_key(params))]
                torch.testing.assert_close(recall, index_recall(index, st), atol=1e-6, rtol=0)
                torch.testing.assert_close(tail, index_tail_recall(index, st), atol=1e-6, rtol=0)
                torch.testing.assert_close(density, index_head_density(index, 512, 4), atol=1e-6, rtol=0)


def test_one_prompt_computes_its_last_query_estimate_once(monkeypatch):
    """vertical_slash and adaptive share the last-query estimate through their search sessions:
    one prompt's whole grid (both granularities, every budget and gamma) computes it once, and
    outside a session every build computes its own."""
    from sparse_infer.methods import PREFILL_PATTERNS
    from sparse_infer.prefill import vertical_slash

    calls = []
    original = vertical_slash._last_query_attention
    monkeypatch.setattr(vertical_slash, "_last_query_attention",
                        lambda *a, **kw: calls.append(1) or original(*a, **kw))
    q, k = _inputs(n=256, d=16)
    st = attention_stats(q, k, scaling=0.25, block_size=32)
    evaluate_prefill_run(q, k, st, scaling=0.25, granularities=("head", "group"))
    assert len(calls) == 1
    for params in ({"vertical": 16, "slash": 16}, {"vertical": 32, "slash": 16}):
        build_index(make_rule("vertical_slash", params), q[None], k[None], block_size=32, scaling=0.25)
    assert len(calls) == 3
    with PREFILL_PATTERNS["adaptive"].search_session():       # adaptive's own session, without vertical_slash's
        for gamma in (0.9, 0.95):
            build_index(make_rule("adaptive", {"gamma": gamma}), q[None], k[None], block_size=32, scaling=0.25)
    assert len(calls) == 4


def test_the_estimate_memo_answers_copies_and_tells_inputs_apart():
    from sparse_infer.prefill.vertical_slash import estimate_memo, last_query_attention

    q, k = _inputs(n=64, d=8)
    q4, k4 = q[None], k[None]
    plain = last_query_attention(q4, k4, scaling=0.25, last_q=8)
    with estimate_memo():
        first = last_query_attention(q4, k4, scaling=0.25, last_q=8)
        first[0].zero_()                                       # a caller's change stays its own
        again = last_query_attention(q4, k4, scaling=0.25, last_q=8)
        other = last_query_attention(q4, k4, scaling=0.5, last_q=8)
        shorter = last_query_attention(q4, k4, scaling=0.25, last_q=4)
    for x, y in zip(again, plain):
        assert torch.equal(x, y)
    assert torch.equal(other[0], last_query_attention(q4, k4, scaling=0.5, last_q=8)[0])
    assert shorter[0].shape[2] == 4


def test_channel_scores_are_mean_abs_products_over_causal_pairs():
    q, k = _inputs(n=40, d=8)
    got = channel_scores(q, k)
    kk = k.repeat_interleave(2, 0)
    prod = (q[:, :, None, :] * kk[:, None, :, :]).abs()                 # (H, i, j, D)
    causal = torch.ones(40, 40, dtype=torch.bool).tril()[None, :, :, None]
    want = (prod * causal).sum((1, 2)) / (40 * 41 / 2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _curves(P, pos, q, k, *, scaling=1.0, shared=False, channels=None, softcap=None):
    """One prompt's recall curves as the profiler hands them to search_recall ({name: curve} or
    {name: {key: curve}}), from every registered selector's search_curves; with `channels`,
    only those of the selectors that need them."""
    inputs = CurveInputs(P[:, -1:], pos, q[:, -1:], k, scaling=scaling, shared=shared, softcap=softcap)
    out = {}
    for key, curve in curve_entries(inputs, channels).items():
        if len(key) == 1:
            out[key[0]] = curve
        else:
            out.setdefault(key[0], {})[key[1]] = curve
    return out


def _selector_recall(kind, params, q, k, P, scaling, per_head=True, softcap=None):
    """Recall of the project's own decode selector on the last query (per_head=False: one
    selection per kv head, shared by its query heads)."""
    from sparse_infer.decode.common import GroupInputs
    from sparse_infer.methods import DECODE_SELECTORS
    rule = make_rule(kind, params, "decode")
    inp = GroupInputs(query=q[None, :, -1], key=k[None], valid=None, per_head=per_head, scaling=scaling,
                      softcap=softcap, fresh=True)
    selector = DECODE_SELECTORS[kind]
    idx = selector.select(inp, rule, selector.new_state())[0]                            # (Hi, K)
    if not per_head:
        idx = idx.repeat_interleave(q.shape[0] // k.shape[0], 0)
    sel = torch.zeros(q.shape[0], P.shape[-1], dtype=torch.bool)
    sel.scatter_(-1, idx.clamp(min=0), idx >= 0)
    return (P[:, -1] * sel).sum(-1)


@pytest.mark.parametrize("kind,params", [("token_select", {"budget": 40}), ("quest", {"page": 16, "budget": 64}),
                                         ("streaming", {"sink": 16, "local": 64}),
                                         ("token_select", {"budget": 40, "scoring": "int8"})])
def test_decode_curves_match_the_decode_selectors(kind, params):
    from sparse_infer.profiler.search import decode_recall
    q, k = _inputs(n=400)
    P = _dense_probs(q, k, 0.25)
    pos = torch.tensor([399])
    got = decode_recall(_curves(P, pos, q, k, scaling=0.25), kind, params, 400)
    torch.testing.assert_close(got, _selector_recall(kind, params, q, k, P, 0.25), atol=1e-5, rtol=0)


def test_double_sparsity_curve_matches_the_selector():
    q, k = _inputs(n=400, hq=2, hkv=2)
    P = _dense_probs(q, k, 0.25)
    channels = [1, 4, 7, 9]
    curves = _curves(P, torch.tensor([399]), q, k, channels=torch.tensor([channels, channels]))
    got = curve_at(curves["double_sparsity"], 48)
    want = _selector_recall("double_sparsity", {"channels": channels, "budget": 48}, q, k, P, 0.25)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind,params", [("token_select", {"budget": 40}), ("quest", {"page": 16, "budget": 64}),
                                         ("double_sparsity", {"channels": [1, 4, 7, 9], "budget": 48}),
                                         ("token_select", {"budget": 40, "scoring": "int8"})])
@pytest.mark.parametrize("softcap", [None, 1.5])     # scaled scores here have a spread of ~1.5: into the bend
def test_shared_decode_curves_match_one_selection_per_gqa_group(kind, params, softcap):
    """With shared=True each head is scored on its group's soft-vote selection, as the runtime
    selects for a whole GQA group; the per-head curves would overstate what a head keeps. Under
    a logit softcap the group votes on the scores as each selector caps them."""
    from sparse_infer.profiler.search import decode_recall
    q, k = _inputs(hq=6, hkv=2, n=400, seed=3)
    P = _dense_probs(q, k, 0.25, softcap=softcap)
    pos = torch.tensor([399])
    want = _selector_recall(kind, params, q, k, P, 0.25, per_head=False, softcap=softcap)
    chans = torch.tensor([params["channels"]] * 6) if kind == "double_sparsity" else None
    got, alone = (decode_recall(_curves(P, pos, q, k, scaling=0.25, shared=shared, channels=chans, softcap=softcap),
                                kind, params, 400) for shared in (True, False))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got < alone - 1e-4).any()                  # sharing costs some heads recall here
    if softcap and (kind == "quest" or params.get("scoring") == "int8"):
        # the cap changes which keys the group votes for (the exact curve reads the capped attention itself)
        uncapped = decode_recall(_curves(P, pos, q, k, scaling=0.25, shared=True, channels=chans), kind, params, 400)
        assert not torch.allclose(uncapped, got, atol=1e-5, rtol=0)


def test_retrieval_hits_count_copying_heads():
    n = 50
    ids = torch.arange(100, 100 + n)
    ids[45:48] = ids[10:13]                          # the answer copies the needle tokens 10..12
    probs = torch.full((2, 10, n), 0.01)
    pos = torch.arange(40, 50)
    for t in (45, 46, 47):
        probs[0, t - 1 - 40, t - 35] = 1.0           # head 0 looks at the token it copies
        probs[1, t - 1 - 40, 0] = 1.0                # head 1 looks at the first token
    hits, count = retrieval_hits(probs, pos, ids, [45, 46, 47], (10, 13))
    assert count == 3
    assert hits.tolist() == [3.0, 0.0]


def test_int8_curve_ranks_as_int8_scoring_does_not_as_the_true_attention():
    """The int8 curve is measured on the int8 ranking: on keys whose scores differ by less than
    int8 resolution it keeps less than the exact (oracle) curve for some head."""
    q, k = _inputs(n=400, seed=5)
    P = _dense_probs(q, k, 0.25)
    curves = _curves(P, torch.tensor([399]), q, k, scaling=0.25)
    exact, int8 = curves["token_select"], curves["token_select_int8"]
    assert (int8 <= exact + 1e-6).all() and (int8 < exact - 1e-4).any()


def test_int8_curve_is_skipped_when_the_search_will_not_read_it():
    from sparse_infer.profiler.decode import curve_entries
    from sparse_infer.profiler.search import SearchSettings
    q, k = _inputs(n=200, seed=5)
    P = _dense_probs(q, k, 0.25)
    pos = torch.tensor([199])
    keys = {s: set(curve_entries(CurveInputs(P[:, 199:], pos, q[:, 199:], k, scaling=0.25, settings=s)))
            for s in (None, SearchSettings(int8_scoring=True), SearchSettings(int8_scoring=False))}
    assert ("token_select_int8",) in keys[None] and keys[None] == keys[SearchSettings(int8_scoring=True)]
    assert keys[SearchSettings(int8_scoring=False)] == keys[None] - {("token_select_int8",)}


def test_int8_ranking_of_many_stand_in_queries_is_each_query_scored_as_decode_does():
    from sparse_infer.decode.token_select import TokenSelect, int8_scores, quantize_keys
    q, k = _inputs(hq=6, hkv=2, n=200, seed=4)
    P = _dense_probs(q, k, 0.25)
    pos = torch.arange(195, 200)
    inputs = CurveInputs(P[:, 195:], pos, q[:, 195:], k, scaling=0.25)
    got = TokenSelect._int8_ranking(inputs)                                      # (Hq, dq, n)
    codes, scales = quantize_keys(k[None])
    for j in range(5):
        want = int8_scores(q[None, :, 195 + j], codes, scales, 0.25, None).reshape(6, -1)
        assert torch.equal(got[:, j], want)


@pytest.mark.parametrize("masked,softcap", [(None, None), ("bool", None), (None, 30.0), ("float", None),
                                            ("per_head", None), ("longer", None)])
def test_last_attention_equals_the_last_rows_of_the_blockwise_statistics(masked, softcap):
    q, k = _inputs(n=300, seed=2)
    mask = None
    if masked:                                   # left padding of 20 keys
        mask = torch.ones(300, 300, dtype=torch.bool)
        mask[:, :20] = False
        if masked == "float":                    # additive, as eager attention gets it
            mask = torch.zeros(1, 1, 300, 300).masked_fill(~mask, torch.finfo(torch.float32).min)
        elif masked == "per_head":               # and a window on head 1
            mask = mask[None].repeat(4, 1, 1)
            mask[1] &= torch.ones(300, 300, dtype=torch.bool).triu(-50)
        elif masked == "longer":                 # a mask over more keys than the prompt's
            mask = torch.cat([torch.zeros(300, 7, dtype=torch.bool), mask], 1)[None, None]
    stats = attention_stats(q, k, scaling=0.3, block_size=32, decode_queries=40, mask=mask, softcap=softcap)
    probs, pos = last_attention(q, k, scaling=0.3, decode_queries=40, mask=mask, softcap=softcap)
    assert torch.equal(pos, stats.last_pos)
    torch.testing.assert_close(probs, stats.last_probs, atol=1e-6, rtol=1e-5)
