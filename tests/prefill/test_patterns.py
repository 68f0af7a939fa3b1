"""Each prefill pattern: executor output == dense attention masked to exactly the pattern's
selected pairs (fp32, 1e-5), plus checks that each pattern selects what it promises."""
import pytest
import torch

from sparse_infer.kernels.index import dense_masked_attention, index_density, index_to_mask
from sparse_infer.kernels.torch_executor import block_sparse_attention_torch
from sparse_infer.plan import parse_rule
from sparse_infer.prefill import build_index
from sparse_infer.prefill.block import antidiagonal_block_scores
from sparse_infer.prefill.common import Geometry

RULES = {
    "a_shape": {"pattern": "a_shape", "sink": 40, "local": 100},
    "a_shape_tail": {"pattern": "a_shape", "sink": 40, "local": 100, "dense_tail": 40},
    "vertical_slash": {"pattern": "vertical_slash", "vertical": 30, "slash": 20, "last_q": 32, "sink": 8, "local": 8},
    "vertical_slash_tail": {"pattern": "vertical_slash", "vertical": 30, "slash": 20, "last_q": 32, "sink": 8,
                            "local": 8, "dense_tail": 40},
    "block_topk": {"pattern": "block", "top_k": 3},
    "block_coverage": {"pattern": "block", "coverage": 0.7},
    "block_antidiagonal": {"pattern": "block", "coverage": 0.8, "estimator": "antidiagonal", "stride": 4},
    "block_tail": {"pattern": "block", "top_k": 3, "dense_tail": 40},
    "adaptive": {"pattern": "adaptive", "gamma": 0.8, "last_q": 32, "sink": 8, "local": 8},
    "adaptive_query_aware": {"pattern": "adaptive", "gamma": 0.8, "tau": 1.0, "last_q": 32},
    "adaptive_vertical_slash": {"pattern": "adaptive", "gamma": 0.8, "tau": 0.0, "last_q": 32, "sink": 8,
                                "local": 8},
}


def _inputs(b, hq, hkv, q_len, n, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, q_len, d, generator=g)
    k = torch.randn(b, hkv, n, d, generator=g)
    v = torch.randn(b, hkv, n, d, generator=g)
    return q, k, v


def _left_pad_mask(b, q_len, n, pads):
    rows = torch.arange(n - q_len, n)[:, None]
    cols = torch.arange(n)[None, :]
    causal = cols <= rows
    masks = [causal & (cols >= p) for p in pads]
    return torch.stack(masks)[:, None]          # (B, 1, q, n) bool, transformers' sdpa_mask format


def _check(name, b, hq, hkv, q_len, n, bs=32, mask=None, granularity="group", softcap=None):
    q, k, v = _inputs(b, hq, hkv, q_len, n)
    rule = parse_rule(RULES[name], "t", "prefill")
    scaling = q.shape[-1] ** -0.5
    index = build_index(rule, q, k, block_size=bs, scaling=scaling, attention_mask=mask,
                        granularity=granularity, softcap=softcap)
    out = block_sparse_attention_torch(q, k, v, index, scaling=scaling, attention_mask=mask, softcap=softcap)
    ref_mask = index_to_mask(index, q_len, n, hq, attention_mask=mask)
    ref = dense_masked_attention(q, k, v, ref_mask, scaling, softcap=softcap)
    valid_rows = ref_mask.any(-1, keepdim=True)
    torch.testing.assert_close(out * valid_rows, ref * valid_rows, atol=1e-5, rtol=1e-5)
    return index, ref_mask


@pytest.mark.parametrize("name", list(RULES))
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (8, 2), (8, 1)])
def test_pattern_equals_masked_dense(name, hq, hkv):
    _check(name, 1, hq, hkv, 200, 200)            # 200 is not a multiple of the 32 block


@pytest.mark.parametrize("name", list(RULES))
def test_pattern_chunked_prefill(name):
    _check(name, 1, 4, 2, 70, 230)                # queries are the last 70 of 230 keys


@pytest.mark.parametrize("name", list(RULES))
def test_pattern_batch_left_padding(name):
    mask = _left_pad_mask(2, 190, 190, pads=[0, 37])
    _, ref_mask = _check(name, 2, 4, 2, 190, 190, mask=mask)
    assert not ref_mask[1, :, :, :37].any()       # padding is never attended


@pytest.mark.parametrize("name", list(RULES))
def test_pattern_per_head_and_softcap(name):
    _check(name, 1, 4, 2, 150, 150, granularity="head", softcap=20.0)


def test_a_shape_covers_token_level_a_shape():
    n = 1000
    q, k, _ = _inputs(1, 2, 2, n, n)
    rule = parse_rule(RULES["a_shape"], "t", "prefill")
    index = build_index(rule, q, k, block_size=32, scaling=0.25)
    sel = index_to_mask(index, n, n, 2)
    rows, cols = torch.arange(n)[:, None], torch.arange(n)[None, :]
    token_a_shape = (cols <= rows) & ((cols < 40) | (rows - cols < 100))
    assert bool((sel[0, 0] | ~token_a_shape).all())
    assert index_density(index, n, n) < 0.5      # and it really is sparse (about 7 of 32 blocks)


@pytest.mark.parametrize("plain,tailed", [("a_shape", "a_shape_tail"), ("block_topk", "block_tail"),
                                          ("vertical_slash", "vertical_slash_tail")])
def test_dense_tail_rows_see_every_key_and_other_rows_are_unchanged(plain, tailed):
    n, bs = 1000, 32
    q, k, v = _inputs(1, 2, 2, n, n)
    without = build_index(parse_rule(RULES[plain], "t", "prefill"), q, k, block_size=bs, scaling=0.25)
    with_tail = build_index(parse_rule(RULES[tailed], "t", "prefill"), q, k, block_size=bs, scaling=0.25)
    sel_plain, sel_tail = index_to_mask(without, n, n, 2)[0, 0], index_to_mask(with_tail, n, n, 2)[0, 0]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    assert bool((sel_tail[n - 40:] == causal[n - 40:]).all())       # the last 40 rows are dense causal
    first_tail_block_row = (n - 40) // bs * bs
    assert bool((sel_tail[:first_tail_block_row] == sel_plain[:first_tail_block_row]).all())
    assert not bool(sel_plain[n - 1].all())                           # without the tail that row is sparse
    # the tail rows' outputs are dense attention's
    out = block_sparse_attention_torch(q, k, v, with_tail, scaling=0.25)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25)
    torch.testing.assert_close(out[:, :, n - 40:], ref[:, :, n - 40:], atol=1e-5, rtol=1e-5)


def test_vertical_slash_finds_planted_column_and_diagonal():
    torch.manual_seed(0)
    n, d = 512, 16
    q = torch.randn(1, 1, n, d) * 0.1
    k = torch.randn(1, 1, n, d) * 0.1
    target = torch.randn(d)
    k[0, 0, 300] = target * 3                     # every query loves key 300 (a vertical line)
    q[0, 0, :] += target
    rule = parse_rule({"pattern": "vertical_slash", "vertical": 4, "slash": 4, "last_q": 32, "sink": 4, "local": 4},
                      "t", "prefill")
    index = build_index(rule, q, k, block_size=64, scaling=d ** -0.5)
    assert 300 in index.columns[0, 0].tolist()
    assert set(range(4)) <= set(index.columns[0, 0].tolist())   # sinks always kept
    sel = index_to_mask(index, n, n, 1)[0, 0]
    assert bool(sel.diagonal().all())                            # the local diagonal is always kept


def test_block_coverage_keeps_mass_and_topk_counts():
    q, k, _ = _inputs(1, 2, 1, 256, 256)
    rule = parse_rule({"pattern": "block", "top_k": 2}, "t", "prefill")
    index = build_index(rule, q, k, block_size=32, scaling=0.25)
    counts = (index.kv_blocks >= 0).sum(-1)
    geo = Geometry(256, 256, 32)
    # top 2 plus possibly the sink and diagonal blocks, never more than causal allows
    assert int(counts.max()) <= 4
    assert bool((counts <= torch.arange(geo.nqb) + 1).all())
    full = parse_rule({"pattern": "block", "coverage": 1.0}, "t", "prefill")
    index = build_index(full, q, k, block_size=32, scaling=0.25)
    assert index_density(index, 256, 256) == pytest.approx(1.0)


def _antidiagonal_mass_by_definition(q, k, bs, stride, scaling, key_start):
    """XAttention's block estimate written out from the full score matrix, one antidiagonal
    offset at a time: reduced score (r, c) = sum_i S[r*stride + stride-1-i, c*stride + i]."""
    b, hq, q_len, _ = q.shape
    n = k.shape[2]
    q0, nkb = n - q_len, -(-n // bs)
    first = q0 // bs
    qpos = torch.arange(first * bs, nkb * bs)                    # absolute rows of whole query blocks
    s = torch.zeros(b, hq, len(qpos), nkb * bs)
    full = q @ k.repeat_interleave(hq // k.shape[1], 1).transpose(-1, -2)
    s[:, :, q0 - first * bs:q0 - first * bs + q_len, :n] = full
    nr, nc = len(qpos) // stride, nkb * bs // stride
    red = torch.zeros(b, hq, nr, nc)
    for i in range(stride):
        red += s[:, :, stride - 1 - i::stride, i::stride]
    red *= scaling / stride
    row_abs = qpos[::stride] // stride
    row_real = ((qpos >= q0) & (qpos < n)).view(nr, stride).any(-1)
    mass = torch.zeros(b, hq, len(qpos) // bs, nkb)
    per = bs // stride
    for bi in range(b):
        col_ok = (torch.arange(nc) * stride < n) & (torch.arange(nc) // per * bs + bs > key_start[bi])
        for r in range(nr):
            ok = col_ok & (torch.arange(nc) <= row_abs[r])
            if not (row_real[r] and ok.any()):
                continue
            p = torch.softmax(red[bi, :, r].masked_fill(~ok, float("-inf")), -1)
            mass[bi, :, r // per] += p.view(hq, nkb, per).sum(-1)
    return mass / mass.sum(-1, keepdim=True).clamp(min=1e-12)


@pytest.mark.parametrize("b,hq,hkv,q_len,n,stride,key_start", [
    (1, 4, 2, 200, 200, 4, [0]),          # n not a multiple of the block
    (1, 8, 2, 70, 230, 8, [0]),           # chunked prefill: queries are the last 70 of 230 keys
    (2, 4, 4, 190, 190, 4, [0, 37]),      # left padding in the second row
    (1, 6, 1, 333, 333, 2, [0]),          # several chunks of query blocks
    (1, 4, 2, 256, 256, 8, [0]),          # whole blocks: no padding copy
])
@pytest.mark.parametrize("layout", ["contiguous", "model"])
def test_antidiagonal_estimate_matches_its_definition(b, hq, hkv, q_len, n, stride, key_start, layout):
    q, k, _ = _inputs(b, hq, hkv, q_len, n)
    if layout == "model":                 # attention modules pass (b, n, h, d) tensors transposed
        q, k = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k))
    bs = 32
    geo = Geometry(q_len, n, bs)
    start = torch.tensor(key_start)
    key_valid_blocks = (torch.arange(geo.nkb) + 1)[None, :] * bs > start[:, None]
    got = antidiagonal_block_scores(q, k, geo, 0.25, key_valid_blocks, stride)
    want = _antidiagonal_mass_by_definition(q, k, bs, stride, 0.25, key_start)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,rule", [
    ("a_shape", {"pattern": "a_shape", "sink": 64, "local": 4096}),
    ("vertical_slash", {"pattern": "vertical_slash", "vertical": 4096, "slash": 4096}),
    ("block", {"pattern": "block", "top_k": 4096}),
])
def test_full_budget_is_dense_causal(name, rule):
    q, k, v = _inputs(1, 4, 2, 333, 333)
    index = build_index(parse_rule(rule, "t", "prefill"), q, k, block_size=64, scaling=0.25)
    assert index_density(index, 333, 333) == pytest.approx(1.0)
    out = block_sparse_attention_torch(q, k, v, index, scaling=0.25)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("q_len,n", [(320, 320), (300, 300), (150, 320), (137, 301), (1, 300)])
def test_diagonal_blocks_equal_their_row_by_row_crossings(q_len, n):
    """The block-offset expansion of the slash diagonals selects exactly the kv blocks the
    diagonals cross, row range by row range, whole and partial query blocks alike."""
    from sparse_infer.prefill.vertical_slash import _crossed_blocks, _diagonal_blocks

    geo = Geometry(q_len, n, 32)
    g = torch.Generator().manual_seed(q_len + n)
    diagonals = torch.stack([torch.randperm(n, generator=g)[:40] for _ in range(6)]).view(2, 3, 40)
    kept = torch.rand(2, 3, 40, generator=g) < 0.7
    qstart, qend = geo.query_block_ranges("cpu")
    for k in (None, kept):
        assert torch.equal(_diagonal_blocks(diagonals, k, geo), _crossed_blocks(diagonals, k, geo, qstart, qend))


def test_vertical_slash_right_padding_keeps_a_per_head_mask():
    """A per-head (B, Hq, q, n) mask with a right-padded row: the estimate of each head reads its
    own mask rows (a head that may not see key 5 gets no column there)."""
    from sparse_infer.prefill.vertical_slash import last_query_attention

    q, k, _ = _inputs(2, 4, 2, 64, 64)
    mask = torch.ones(64, 64, dtype=torch.bool).tril()[None, None].repeat(2, 4, 1, 1)
    mask[1, :, :, 50:] = False                  # row 1: right padding from 50 on
    mask[1, 2, :, 5] = False                    # head 2 of row 1 may not see key 5
    end = torch.tensor([64, 50])
    probs, _ = last_query_attention(q, k, scaling=0.25, attention_mask=mask, last_q=8, end=end)
    assert (probs[1, 2, :, 5] == 0).all() and (probs[1, 1, :, 5] > 0).all()
    assert (probs[1, :, :, 50:] == 0).all()
