"""Decode selectors at unit level, real shapes (B=2, Hq=8, Hkv=2, n=1000, D=64): the output is
dense attention restricted to exactly the selected indices, the selection is what each method
promises, padded keys are never chosen, and the incremental side state equals a rebuild."""
import math

import pytest
import torch

from sparse_infer.decode import decode_attention, double_sparsity, quest
from sparse_infer.decode.dispatch import _fingerprint_positions, _layer_layouts, visible_suffix_starts
from sparse_infer.decode.common import GroupInputs
from sparse_infer.kernels.index import dense_masked_attention
from sparse_infer.methods import DECODE_SELECTORS
from sparse_infer.kernels.sparse_decode import indices_to_mask
from sparse_infer.runtime import LayerRuntime, group_heads
from sparse_infer.plan import load_plan

B, HQ, HKV, N, D = 2, 8, 2, 1000, 64
PAD = 137          # left padding of batch row 1
SCALING = D ** -0.5

RULES = {
    "streaming": {"method": "streaming", "sink": 8, "local": 64},
    "token_select": {"method": "token_select", "budget": 100, "sink": 8, "local": 32},
    "double_sparsity": {"method": "double_sparsity", "channels": 8, "budget": 100, "sink": 8, "local": 32},
    "double_sparsity_list": {"method": "double_sparsity", "channels": [0, 5, 9, 33, 60], "budget": 100,
                             "sink": 8, "local": 32},
    "quest": {"method": "quest", "page": 16, "budget": 128, "sink": 8, "local": 32},
}


def make_rt(default, layers=None, granularity="group"):
    plan = load_plan({"sparse_infer_plan": 1, "decode": {"min_kv_len": 0, "granularity": granularity,
                                                         "default": default, "layers": layers or {}}})
    rt = LayerRuntime(plan, 0, HQ, HKV, dense_fn=None, dense_mask="bool", backend="torch")
    rt.decode_groups = group_heads(plan.decode, 0, HQ)
    return rt


def tensors(seed, n=N, padded=True, dim=D):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, 1, dim, generator=g)
    k = torch.randn(B, HKV, n, dim, generator=g)
    v = torch.randn(B, HKV, n, dim, generator=g)
    # a few strong keys so the selection is not arbitrary
    k[:, :, torch.randint(0, n, (20,), generator=g)] *= 3
    mask = None
    if padded:
        mask = torch.ones(B, 1, 1, n, dtype=torch.bool)
        mask[1, ..., :PAD] = False
    return q, k, v, mask


@pytest.fixture
def recorder(monkeypatch):
    """Wrap every selector so the test sees the (rule, indices, Hi) each group produced."""
    seen = []
    for selector in DECODE_SELECTORS.values():
        def wrapped(inp, rule, state, _fn=selector.select):
            idx = _fn(inp, rule, state)
            seen.append((rule, idx, inp))
            return idx
        monkeypatch.setattr(selector, "select", wrapped)
    return seen


def selection_mask(seen, rt, n):
    """(B, Hq, 1, n) bool of the (head, key) pairs selected by the last decode step, dense heads =
    everything. The selectors of one step run in the order of the layer's parts."""
    sel = torch.ones(B, HQ, 1, n, dtype=torch.bool)
    parts = [p for p in _layer_layouts(rt, HQ, HKV) if p[0].kind != "dense"]
    for (rule, q_heads, _, _), (seen_rule, idx, _) in zip(parts, seen[-len(parts):]):
        assert seen_rule.key() == rule.key()
        heads = list(range(HQ)) if q_heads is None else q_heads
        sel[:, heads] = indices_to_mask(idx, n, len(heads))
    return sel


def check_index_invariants(idx, n, mask, limit):
    assert idx.dtype == torch.long
    for b in range(idx.shape[0]):
        for h in range(idx.shape[1]):
            row = idx[b, h][idx[b, h] >= 0]
            assert row.numel() == row.unique().numel(), "duplicate index"
            assert row.numel() <= limit
            assert int(row.max()) < n
            if mask is not None:
                assert bool(mask[b, 0, 0, row].all()), "a masked (padded) key was selected"


@pytest.mark.parametrize("granularity", ["group", "head"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("name", list(RULES))
def test_output_is_dense_attention_over_selection(name, padded, granularity, recorder):
    rule = RULES[name]
    rt = make_rt(rule, granularity=granularity)
    q, k, v, mask = tensors(1, padded=padded)
    out = decode_attention(rt, None, q, k, v, mask, SCALING, {})
    assert out.shape == (B, HQ, 1, D)
    (_, idx, _), = recorder
    assert idx.shape[1] == (HQ if granularity == "head" else HKV)
    limit = rule.get("budget", 0) + rule.get("sink", 0) + rule.get("local", 0)
    if name == "quest":
        limit = math.ceil(rule["budget"] / rule["page"]) * rule["page"] + rule["sink"] + rule["local"]
    check_index_invariants(idx, N, mask, limit)
    sel = selection_mask(recorder, rt, N)
    full = sel if mask is None else sel & mask
    ref = dense_masked_attention(q, k, v, full, SCALING)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert rt.stats.decode_total == B * HQ * N
    assert rt.stats.decode_selected == float(indices_to_mask(idx, N, HQ).sum())


def _valid_rows(mask, n):
    return torch.ones(B, n, dtype=torch.bool) if mask is None else mask[:, 0, 0]


def _forced(valid_row, sink, local):
    pos = valid_row.nonzero().flatten()
    return set(pos[:sink].tolist()) | set(pos[-local:].tolist() if local else [])


@pytest.mark.parametrize("padded", [False, True])
def test_streaming_selects_first_valid_sinks_and_window(padded, recorder):
    rt = make_rt(RULES["streaming"])
    q, k, v, mask = tensors(2, padded=padded)
    decode_attention(rt, None, q, k, v, mask, SCALING, {})
    (_, idx, _), = recorder
    valid = _valid_rows(mask, N)
    for b in range(B):
        want = _forced(valid[b], 8, 64)
        for h in range(HKV):
            assert set(idx[b, h][idx[b, h] >= 0].tolist()) == want


def _soft_vote(scores, valid):
    """(B, Hq, n) logits -> (B, Hkv, n) summed per-head softmax over valid keys (independent ref)."""
    s = scores.masked_fill(~valid[:, None], float("-inf"))
    return torch.softmax(s, -1).view(B, HKV, HQ // HKV, -1).sum(2)


def _check_top(idx, vote_scores, valid, sink, local, budget):
    """Non-forced selected keys are the `budget` best by vote_scores among non-forced valid keys."""
    for b in range(B):
        forced = _forced(valid[b], sink, local)
        for h in range(idx.shape[1]):
            chosen = set(idx[b, h][idx[b, h] >= 0].tolist())
            assert forced <= chosen
            picked = sorted(chosen - forced)
            assert len(picked) == budget
            rest = [i for i in valid[b].nonzero().flatten().tolist() if i not in chosen]
            assert vote_scores[b, h, picked].min() >= vote_scores[b, h, rest].max() - 1e-7


@pytest.mark.parametrize("padded", [False, True])
def test_token_select_keeps_best_soft_vote(padded, recorder):
    rt = make_rt(RULES["token_select"])
    q, k, v, mask = tensors(3, padded=padded)
    decode_attention(rt, None, q, k, v, mask, SCALING, {})
    (_, idx, _), = recorder
    valid = _valid_rows(mask, N)
    logits = torch.einsum("bhd,bhnd->bhn", q[:, :, 0], k.repeat_interleave(HQ // HKV, 1)) * SCALING
    _check_top(idx, _soft_vote(logits, valid), valid, 8, 32, 100)


@pytest.mark.parametrize("channels", [8, [0, 5, 9, 33, 60]])
def test_double_sparsity_keeps_best_label_scores(channels, recorder):
    rule = dict(RULES["double_sparsity"], channels=channels)
    rt = make_rt(rule)
    q, k, v, mask = tensors(4, padded=True)
    decode_attention(rt, None, q, k, v, mask, SCALING, {})
    (_, idx, _), = recorder
    chans = rt.decode_state.groups[0].channels                     # (B, Hkv, r)
    r = channels if isinstance(channels, int) else len(channels)
    assert chans.shape == (B, HKV, r)
    if isinstance(channels, list):
        assert chans.tolist() == [[channels] * HKV] * B
    valid = _valid_rows(mask, N)
    logits = torch.zeros(B, HQ, N)
    for b in range(B):
        for h in range(HQ):
            c = chans[b, h // (HQ // HKV)]
            logits[b, h] = k[b, h // (HQ // HKV)][:, c] @ q[b, h, 0, c] * SCALING
    _check_top(idx, _soft_vote(logits, valid), valid, 8, 32, 100)


def test_double_sparsity_int_channels_follow_query_key_magnitude():
    q, k, _, _ = tensors(5, padded=False)
    q[:, :, 0, 7] *= 50      # channel 7 dominates q.k in every head
    k[:, :, :, 7] += 2
    inp = GroupInputs(q[:, :, 0], k, None, False, SCALING, None, True)
    chans = double_sparsity.choose_channels(inp.query, inp.key, None, 4)
    assert all(7 in row.tolist() for row in chans.view(-1, 4))
    assert double_sparsity.choose_channels(inp.query, inp.key, None, 1000).shape == (B, HKV, D)


@pytest.mark.parametrize("padded", [False, True])
def test_quest_keeps_pages_with_best_bounds(padded, recorder):
    rt = make_rt(RULES["quest"])
    q, k, v, mask = tensors(6, padded=padded)
    decode_attention(rt, None, q, k, v, mask, SCALING, {})
    (_, idx, _), = recorder
    page, sink, local = 16, 8, 32
    valid = _valid_rows(mask, N)
    kmin, kmax = quest.page_bounds_from_keys(k, page, valid[:, None].expand(B, HKV, N))
    pages = kmin.shape[2]
    qh = q[:, :, 0].view(B, HKV, HQ // HKV, D)
    bound = (torch.einsum("bgcd,bgpd->bgcp", qh.clamp(min=0), kmax)
             + torch.einsum("bgcd,bgpd->bgcp", qh.clamp(max=0), kmin)) * SCALING
    for b in range(B):
        forced = _forced(valid[b], sink, local)
        eligible = [p for p in range(pages)
                    if any(valid[b, t] and t not in forced for t in range(p * page, min((p + 1) * page, N)))]
        for h in range(HKV):
            s = bound[b, h][:, eligible].softmax(-1).sum(0)
            chosen_tokens = set(idx[b, h][idx[b, h] >= 0].tolist())
            assert forced <= chosen_tokens
            chosen_pages = {t // page for t in chosen_tokens - forced}
            assert len(chosen_pages) == 128 // page
            # every non-forced valid token of a chosen page is read
            for p in chosen_pages:
                for t in range(p * page, min((p + 1) * page, N)):
                    assert (t in chosen_tokens) == bool(valid[b, t])
            rank = {p: float(s[i]) for i, p in enumerate(eligible)}
            others = [rank[p] for p in eligible if p not in chosen_pages]
            assert min(rank[p] for p in chosen_pages) >= max(others) - 1e-7


def test_mixed_heads_dense_and_two_methods(recorder):
    layers = {0: {0: {"method": "dense"}, 5: RULES["streaming"], 6: {"method": "dense"}}}
    rt = make_rt(RULES["quest"], layers=layers)
    q, k, v, mask = tensors(7, padded=True)
    out = decode_attention(rt, None, q, k, v, mask, SCALING, {})
    assert {rule.kind for rule, _, _ in recorder} == {"quest", "streaming"}
    for _, _, inp in recorder:
        # partial GQA groups read one kv head each, as a view of the cache (no per-step copy of K)
        assert inp.key.shape[1] == 1 and inp.per_head
        assert inp.key.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
    sel = selection_mask(recorder, rt, N)
    ref = dense_masked_attention(q, k, v, sel & mask, SCALING)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    full = dense_masked_attention(q, k, v, mask, SCALING)
    torch.testing.assert_close(out[:, [0, 6]], full[:, [0, 6]], atol=1e-5, rtol=1e-5)


def test_whole_group_subsets_share_one_selection(recorder):
    # heads 0-3 are kv group 0: a rule covering exactly them keeps one selection for the group
    layers = {0: {h: RULES["token_select"] for h in range(4)}}
    rt = make_rt({"method": "dense"}, layers=layers)
    q, k, v, mask = tensors(8, padded=False)
    out = decode_attention(rt, None, q, k, v, mask, SCALING, {})
    (_, idx, inp), = recorder
    assert idx.shape[1] == 1 and inp.key.shape[1] == 1
    sel = selection_mask(recorder, rt, N)
    torch.testing.assert_close(out, dense_masked_attention(q, k, v, sel, SCALING), atol=1e-5, rtol=1e-5)


def test_below_min_kv_len_and_all_dense_return_none():
    rt = make_rt({"method": "dense"})
    q, k, v, mask = tensors(9, n=50, padded=False)
    assert decode_attention(rt, None, q, k, v, mask, SCALING, {}) is None
    rt = make_rt(RULES["token_select"])
    rt.plan.decode.min_len = 51
    assert decode_attention(rt, None, q, k, v, mask, SCALING, {}) is None
    rt.plan.decode.min_len = 50
    assert decode_attention(rt, None, q, k, v, mask, SCALING, {}) is not None


def test_softcap_is_applied():
    rt = make_rt({"method": "token_select", "budget": 5000, "sink": 0, "local": 0})
    q, k, v, mask = tensors(10, padded=True)
    q = q * 5
    out = decode_attention(rt, None, q, k, v, mask, SCALING, {"softcap": 3.0})
    ref = dense_masked_attention(q, k, v, mask, SCALING, softcap=3.0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- incremental state
def _step(rule, state, q, k, valid, fresh):
    inp = GroupInputs(q, k, valid, False, SCALING, None, fresh)
    return DECODE_SELECTORS[rule.kind].select(inp, rule, state)


def _rule(d):
    plan = load_plan({"sparse_infer_plan": 1, "decode": {"default": d}})
    return plan.decode.default


@pytest.mark.parametrize("seed", range(40))
def test_quest_bounds_are_upper_bounds_and_incremental(seed):
    g = torch.Generator().manual_seed(seed)
    b, hk, G = int(torch.randint(1, 3, (1,), generator=g)), int(torch.randint(1, 3, (1,), generator=g)), 2
    d = int(torch.randint(4, 33, (1,), generator=g))
    page = int(torch.randint(1, 20, (1,), generator=g))
    n0 = int(torch.randint(1, 80, (1,), generator=g))
    steps = int(torch.randint(1, 3 * page + 2, (1,), generator=g))
    scale = float(torch.rand(1, generator=g)) * 4 + 0.1
    k = torch.randn(b, hk, n0 + steps, d, generator=g) * scale
    valid = torch.ones(b, hk, n0 + steps, dtype=torch.bool)
    pad = int(torch.randint(0, n0, (1,), generator=g))
    valid[-1, :, :pad] = False              # left padding on the last row
    rule = _rule({"method": "quest", "page": page, "budget": 10 * page})
    state = DECODE_SELECTORS["quest"].new_state()
    for n in range(n0, n0 + steps + 1):
        q = torch.randn(b, hk * G, d, generator=g)
        _step(rule, state, q, k[:, :, :n], valid[:, :, :n], fresh=(n == n0))
    kmin, kmax = state.kmin.view(), state.kmax.view()
    n = n0 + steps
    # incremental == rebuilt from the full K (keys appended after the rebuild are all valid)
    ref_valid = valid.clone()
    ref_min, ref_max = quest.page_bounds_from_keys(k, page, ref_valid)
    assert torch.equal(kmin, ref_min) and torch.equal(kmax, ref_max)
    for _ in range(5):
        q = torch.randn(b, hk * G, d, generator=g) * scale
        bound = quest.upper_bounds(q, kmin, kmax)                              # (b, hk, G, pages)
        exact = torch.einsum("bgcd,bgnd->bgcn", q.view(b, hk, G, d), k)       # (b, hk, G, n)
        per_key_bound = bound.repeat_interleave(page, -1)[..., :n]
        ok = exact <= per_key_bound + 1e-4 * (1 + exact.abs())
        assert bool(ok[valid[:, :, None].expand_as(ok)].all())


def test_double_sparsity_label_cache_appends_one_row_per_step():
    rule = _rule({"method": "double_sparsity", "channels": 6, "budget": 20})
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 2, 300, 32, generator=g)
    state = DECODE_SELECTORS["double_sparsity"].new_state()
    for n in range(200, 301):
        _step(rule, state, torch.randn(2, 4, 32, generator=g), k[:, :, :n], None, fresh=(n == 200))
        assert state.labels.length == n
    chans = state.channels
    assert torch.equal(state.labels.view(), double_sparsity.labels_of(k, chans))


@pytest.mark.parametrize("in_c", [True, False])
def test_new_sequence_sharing_first_and_last_rows_rebuilds(in_c, monkeypatch):
    """Continuity needs more than length + first/last rows: a different cache that is one
    longer and agrees on those rows must still rebuild the side state. Same with the
    fingerprint kept by the C helpers (CPUs) and by torch ops."""
    import sparse_infer.kernels.cpu_decode as cpu_decode

    if in_c and not cpu_decode.cpu_kernel_available():
        pytest.skip("no C compiler: the C decode kernel is not built here")
    if not in_c:
        monkeypatch.setattr(cpu_decode, "cpu_kernel_available", lambda: False)
    rt = make_rt(RULES["double_sparsity"])
    q, k, v, _ = tensors(11, n=305, padded=False)
    decode_attention(rt, None, q, k[:, :, :300], v[:, :, :300], None, SCALING, {})
    assert rt.decode_state.sequence.in_c is in_c
    for n in range(301, 305):                                               # genuine next steps
        decode_attention(rt, None, q, k[:, :, :n], v[:, :, :n], None, SCALING, {})
    assert rt.decode_state.rebuilds == 1
    other = torch.randn_like(k[:, :, :304])
    other[:, :, 0], other[:, :, 303] = k[:, :, 0], k[:, :, 303]
    other = torch.cat([other, torch.randn(B, HKV, 1, D)], dim=2)
    decode_attention(rt, None, q, other, torch.randn_like(other), None, SCALING, {})
    assert rt.decode_state.rebuilds == 2
    labels = rt.decode_state.groups[0].labels.view()
    assert torch.equal(labels, double_sparsity.labels_of(other, rt.decode_state.groups[0].channels))
    # one changed element in one spread row of one head is enough
    edited = torch.cat([other, torch.randn(B, HKV, 1, D)], dim=2)
    spread = _fingerprint_positions(other.shape[2])[3]                    # kept since `other` was seen
    edited[1, 1, spread, 3] += 1.0
    decode_attention(rt, None, q, edited, torch.randn_like(edited), None, SCALING, {})
    assert rt.decode_state.rebuilds == 3


def test_sliding_window_without_mask_is_respected(recorder):
    rt = make_rt(RULES["token_select"])
    q, k, v, _ = tensors(12, padded=False)
    out = decode_attention(rt, None, q, k, v, None, SCALING, {"sliding_window": 300})
    (_, idx, _), = recorder
    window = torch.zeros(1, 1, 1, N, dtype=torch.bool)
    window[..., N - 300:] = True
    check_index_invariants(idx, N, window.expand(B, 1, 1, N), 300)
    sel = selection_mask(recorder, rt, N)
    torch.testing.assert_close(out, dense_masked_attention(q, k, v, sel & window, SCALING), atol=1e-5, rtol=1e-5)


FUSED = {"quest": (quest, "quest_decode_cpu", {}),
         "double_sparsity": (double_sparsity, "double_sparsity_decode_cpu", {"channels": 16}),
         "double_sparsity_r8": (double_sparsity, "double_sparsity_decode_cpu", {"channels": 8}),
         "double_sparsity_list": (double_sparsity, "double_sparsity_decode_cpu", {"channels": [0, 5, 9, 33]}),
         # token_select: the Double Sparsity kernel with every channel, K as its label cache
         "token_select": (double_sparsity, "double_sparsity_decode_cpu", {}),
         # scoring int8: int8 label rows with a scale each, written by the call; the C scores are
         # the torch path's bits, so both choose the same keys
         "token_select_int8": (double_sparsity, "double_sparsity_decode_cpu", {"scoring": "int8"})}


@pytest.mark.parametrize("method", list(FUSED))
@pytest.mark.parametrize("case", ["group", "head", "softcap", "short", "bf16", "dim40", "dim128", "padded",
                                  "window"])
def test_fused_c_path_equals_selector_and_executor(method, case, monkeypatch):
    """On CPUs, a Quest, Double Sparsity or token_select step with no mask runs the method's
    choice and its attention in one C call; it reads what the selector + the torch executor
    read, step after step (page bounds / label cache kept incrementally), and counts the same
    selected keys. Double Sparsity with 16 label channels takes the kernel's vector loops, with
    8 or a list of 4 its scalar ones. token_select leaves softcap to its select() path.
    Under left padding or a sliding window (a mask hiding a prefix of each row) every method
    still takes the C call, on each row's visible keys."""
    import sparse_infer.kernels.cpu_decode as cpu_decode

    if not cpu_decode.cpu_kernel_available():
        pytest.skip("no C compiler: the C decode kernel is not built here")
    calls = []
    module, entry, extra = FUSED[method]
    real = getattr(module, entry)
    monkeypatch.setattr(module, entry, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    rule = {**RULES[method if method in ("quest", "token_select") else
                    "token_select" if method.startswith("token_select") else "double_sparsity"], **extra}
    n = 60 if case == "short" else N                       # short: sinks + window cover most keys
    if case == "short":
        rule.update(budget=64, sink=8, local=24)
    softcap = 30.0 if case == "softcap" else None
    granularity = "head" if case == "head" else "group"
    steps = 20                                              # crosses page boundaries (page 16)
    # dim40: head dims that are no multiple of 16 take the kernel's scalar loops; dim128 its widest vectors
    dim = {"dim40": 40, "dim128": 128}.get(case, D)
    q, k, v, mask = tensors(11, n=n + steps, padded=case == "padded", dim=dim)
    window = 200 if case == "window" else None
    if case == "bf16":
        # the C path ranks on the bf16 values in fp32; the torch path on the same values
        # upcast to fp32 must choose the same keys
        q, k, v = (t.bfloat16() for t in (q, k, v))
    fused, reference = make_rt(rule, granularity=granularity), make_rt(rule, granularity=granularity)
    fused.backend = "auto"
    for step in range(steps):                               # the cache grows by one key per step
        kk, vv = k[:, :, : n + step], v[:, :, : n + step]
        m = None if mask is None else mask[..., : n + step]
        kwargs = {"softcap": softcap, "sliding_window": window}
        out = decode_attention(fused, None, q, kk, vv, m, SCALING, kwargs)
        ref = decode_attention(reference, None, q.float(), kk.float(), vv.float(), m, SCALING, kwargs)
        atol = 1e-2 if case == "bf16" else 1e-5              # bf16: the output's own rounding
        torch.testing.assert_close(out.float(), ref, atol=atol, rtol=0 if case == "bf16" else 1e-5)
    skipped = method.startswith("token_select") and case == "softcap"
    assert len(calls) == (0 if skipped else steps)
    assert fused.stats.decode_selected == reference.stats.decode_selected
    assert fused.stats.decode_total == reference.stats.decode_total


def test_visible_suffix_starts_only_for_masks_hiding_a_prefix():
    """The fused C calls take a mask as per-row starts only when each row sees exactly its last
    keys: left padding, a sliding window (broadcast over the batch), a row that sees nothing."""
    mask = torch.ones(3, 1, 1, 10, dtype=torch.bool)
    mask[1, ..., :4] = False
    mask[2, ...] = False
    assert visible_suffix_starts(mask, 3).tolist() == [0, 4, 10]
    window = torch.zeros(1, 1, 1, 10, dtype=torch.bool)
    window[..., 7:] = True
    assert visible_suffix_starts(window, 2).tolist() == [7, 7]
    holes = mask.clone()
    holes[0, ..., 5] = False                                   # a hidden key inside the row
    assert visible_suffix_starts(holes, 3) is None
    assert visible_suffix_starts(mask.expand(3, 2, 1, 10), 3) is None   # per-head masks: the select() path
    assert visible_suffix_starts(None, 3) is None


@pytest.mark.parametrize("granularity", ["group", "head"])
def test_quest_c_call_under_mixed_left_padding_equals_select(granularity, monkeypatch):
    """Rows padded on and off page boundaries, a row that sees fewer keys than sinks + window and
    one that sees a single key: Quest's C call (per-row starts) attends as select() + the torch
    executor do, step after step."""
    import sparse_infer.kernels.cpu_decode as cpu_decode

    if not cpu_decode.cpu_kernel_available():
        pytest.skip("no C compiler: the C decode kernel is not built here")
    calls = []
    real = quest.quest_decode_cpu
    monkeypatch.setattr(quest, "quest_decode_cpu", lambda *a, **kw: calls.append(kw["starts"]) or real(*a, **kw))
    n, steps, batch = 400, 6, 6
    g = torch.Generator().manual_seed(5)
    q = torch.randn(batch, HQ, 1, D, generator=g)
    k = torch.randn(batch, HKV, n + steps, D, generator=g)
    v = torch.randn(batch, HKV, n + steps, D, generator=g)
    k[:, :, torch.randint(0, n, (20,), generator=g)] *= 3
    pads = [0, 137, 144, 152, n - 30, n - 1]          # off / on a page boundary, < sinks + window, one key
    mask = torch.ones(batch, 1, 1, n + steps, dtype=torch.bool)
    for row, pad in enumerate(pads):
        mask[row, ..., :pad] = False
    rule = RULES["quest"]
    fused, reference = make_rt(rule, granularity=granularity), make_rt(rule, granularity=granularity)
    fused.backend = "auto"
    for step in range(steps):
        m = mask[..., : n + step]
        kk, vv = k[:, :, : n + step], v[:, :, : n + step]
        out = decode_attention(fused, None, q, kk, vv, m, SCALING, {})
        ref = decode_attention(reference, None, q, kk, vv, m, SCALING, {})
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert len(calls) == steps and calls[0].tolist() == pads
    assert fused.stats.decode_selected == reference.stats.decode_selected
