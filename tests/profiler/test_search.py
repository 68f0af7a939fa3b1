"""Head search on synthetic attention with planted structure picks the matching pattern."""
import pytest

from sparse_infer.profiler.layer import LayerRun, analyze_layer
from sparse_infer.methods import combine_budget
from sparse_infer.profiler.search import SearchSettings, runtime_granularity, make_rule
from tests.profiler.synthetic import planted_heads

LENGTHS = (1024, 2048)
BS = 32


@pytest.fixture(scope="module")
def planted_reports():
    runs = []
    for n in LENGTHS:
        q, k = planted_heads(n)
        runs.append(LayerRun(n, q, k, scaling=1.0))
    return analyze_layer(runs, SearchSettings(block_size=BS), block_size=BS)


def _resolved(rule_params, key, n):
    from sparse_infer.params import parse_budget
    return parse_budget(rule_params[key], key).resolve(n)


def test_local_head_gets_a_shape(planted_reports):
    rep = planted_reports[0]
    assert rep.prefill.pattern == "a_shape"
    assert rep.prefill.params["local"] <= 256          # ~115 tokens carry 95% of the mass
    assert all(r >= 0.95 for r in rep.prefill_recall.values())


def test_vertical_head_gets_vertical_heavy_vertical_slash(planted_reports):
    rep = planted_reports[1]
    assert rep.prefill.pattern == "vertical_slash"
    n = LENGTHS[-1]
    assert _resolved(rep.prefill.params, "vertical", n) > _resolved(rep.prefill.params, "slash", n)
    assert rep.vertical_share > 0.5 > rep.slash_share


def test_slash_head_gets_slash_heavy_vertical_slash(planted_reports):
    rep = planted_reports[2]
    assert rep.prefill.pattern == "vertical_slash"
    n = LENGTHS[-1]
    assert _resolved(rep.prefill.params, "slash", n) >= _resolved(rep.prefill.params, "vertical", n)
    assert rep.slash_share > 0.5 > rep.vertical_share
    assert all(r >= 0.95 for r in rep.prefill_recall.values())


def test_diffuse_head_stays_dense(planted_reports):
    rep = planted_reports[3]
    assert rep.prefill.pattern == "dense"
    assert rep.decode.pattern == "dense"


def test_sparse_choices_meet_target_and_save_work(planted_reports):
    for rep in planted_reports[:3]:
        for n in LENGTHS:
            assert rep.prefill_recall[n] >= 0.95
            assert rep.prefill_density[n] < 0.8
        assert rep.decode.pattern != "dense"
        assert all(r >= 0.95 for r in rep.decode_recall.values())


def test_combine_budget_fixed_or_growing():
    assert combine_budget({2048: 256, 4096: 256}) == 256          # same need: a token count
    assert combine_budget({2048: 512, 4096: 256}) == 512
    grown = combine_budget({2048: 128, 4096: 512})                # grows: {frac, min}
    assert grown == {"frac": 0.125, "min": 128}
    from sparse_infer.params import parse_budget
    b = parse_budget(grown, "b")
    assert b.resolve(2048) == 256 and b.resolve(4096) == 512         # exactly the need at 4096
    odd = parse_budget(combine_budget({1500: 100, 3000: 333}), "b")
    assert odd.resolve(3000) in (333, 334) and odd.resolve(1500) >= 100


def test_runtime_granularity_mirrors_grouping():
    a = make_rule("a_shape", {"sink": 64, "local": 128})
    v = make_rule("vertical_slash", {"vertical": 16, "slash": 16})
    d = make_rule("dense", {})
    # 4 q heads, 2 kv heads: heads {0,1} share kv 0, {2,3} share kv 1
    assert runtime_granularity([v, v, d, d], 2) == ["group", "group", "group", "group"]
    assert runtime_granularity([v, a, v, a], 2) == ["head"] * 4
    assert runtime_granularity([v, v, v, a], 2) == ["head", "head", "head", "head"]
    assert runtime_granularity([v, v, v, v], 4) == ["head"] * 4     # no GQA


def test_infinite_group_slack_gives_one_rule_per_kv_group():
    """--group-slack inf: the heads of a GQA group always share one rule (K/V loaded once)."""
    runs = []
    for n in LENGTHS:
        q, k = planted_heads(n)
        runs.append(LayerRun(n, q, k[[0, 2]], scaling=1.0))         # heads 0,1 -> kv 0; 2,3 -> kv 1
    per_head = analyze_layer(runs, SearchSettings(block_size=BS, group_slack=0.0), block_size=BS)
    shared = analyze_layer(runs, SearchSettings(block_size=BS, group_slack=float("inf")), block_size=BS)

    def rules(reports):
        return [(r.prefill.pattern, repr(r.prefill.params), r.prefill.granularity) for r in reports]

    assert len({rule[:2] for rule in rules(per_head)}) >= 2           # per head, the heads differ
    got = rules(shared)
    assert got[0] == got[1] and got[2] == got[3]
    assert all(gran == "group" for _, _, gran in got)


def test_decode_cost_counts_per_head_selections_once_per_query_head():
    """A head whose attention sits in 1/16 of the cache takes quest alone; priced per query head
    of a 7-head GQA group the same selection costs more than dense reads, so it stays dense."""
    import torch

    from sparse_infer.profiler.search import DENSE_CHOICE, choose_decode, decode_cost_factor

    curves = {n: _ramp_curves(n, [n // 16]) for n in LENGTHS}
    settings = SearchSettings(target_recall=0.95)
    alone = choose_decode(curves, 0, 64, settings, None, cost_factor=1)
    assert alone.pattern == "quest" and alone.cost < 0.3
    assert choose_decode(curves, 0, 64, settings, None, cost_factor=3).pattern == "quest"
    assert choose_decode(curves, 0, 64, settings, None, cost_factor=7) == DENSE_CHOICE
    assert decode_cost_factor(SearchSettings(decode_granularity="head"), 14, 2) == 7
    assert decode_cost_factor(SearchSettings(), 14, 2) == 1                 # group: one selection per kv head


def _ramp_curves(n, full_at_per_head):
    """Curves where head i's recall grows linearly to 1 after full_at_per_head[i] ranked keys."""
    import torch

    from sparse_infer.decode.quest import QUEST_PAGE
    from sparse_infer.decode.streaming import STREAMING_SINKS

    def ramp(points, full_at):
        return torch.clamp((torch.arange(points, dtype=torch.float64) + 1) / full_at, max=1.0)

    half, heads = n // 2, len(full_at_per_head)
    exact = torch.stack([ramp(half, f) for f in full_at_per_head])
    return {"token_select": exact, "token_select_int8": exact,
            "quest": torch.stack([ramp(half // QUEST_PAGE, max(1, f // QUEST_PAGE)) for f in full_at_per_head]),
            "streaming": {s: torch.full((heads, half), 0.5, dtype=torch.float64) for s in STREAMING_SINKS}}


def test_a_shared_decode_rule_is_sized_for_the_neediest_head_of_its_group():
    from sparse_infer.methods import resolve
    from sparse_infer.profiler.search import choose_decode, decode_recall

    curves = {n: _ramp_curves(n, [n // 32, n // 8]) for n in LENGTHS}
    settings = SearchSettings(target_recall=0.95)
    small = choose_decode(curves, 0, 64, settings, None)
    group = choose_decode(curves, [0, 1], 64, settings, None)
    assert group == choose_decode(curves, 1, 64, settings, None)
    n = max(LENGTHS)
    assert resolve(group.params["budget"], n) > resolve(small.params["budget"], n)
    for length, c in curves.items():
        assert float(decode_recall(c, group.pattern, group.params, length).min()) >= 0.95

def test_decode_is_decided_per_gqa_group_and_priced_per_selection():
    """Default: one decode rule per kv group, every head of it at the target on the group's
    shared selection, costed once per kv head. Per head, the same selections cost G times that."""
    import torch

    runs = []
    for n in LENGTHS:
        q, k = planted_heads(n)
        # kv 0: a local head and a broader copy of it; kv 1: two slash heads
        runs.append(LayerRun(n, torch.stack([q[0], 0.9 * q[0], q[2], q[2]]), torch.stack([k[0], k[2]]),
                             scaling=1.0))
    grouped = analyze_layer(runs, SearchSettings(block_size=BS), block_size=BS)
    per_head = analyze_layer(runs, SearchSettings(block_size=BS, decode_granularity="head"), block_size=BS)
    for pair in ((0, 1), (2, 3)):
        a, b = (grouped[h] for h in pair)
        assert a.decode == b.decode and a.decode.pattern != "dense"
        assert all(r >= 0.95 for h in pair for r in grouped[h].decode_recall.values())
    for g, p in zip(grouped, per_head):
        if g.decode == p.decode:
            assert all(abs(min(1.0, 2 * g.decode_cost[n]) - p.decode_cost[n]) < 1e-9 for n in LENGTHS)


def _int8_curves(n, exact_full_at, int8_full_at):
    """Token-select curves only (quest and streaming never reach the target): the exact ranking
    is complete after exact_full_at keys, the int8 one after int8_full_at."""
    import torch

    from sparse_infer.decode.quest import QUEST_PAGE
    from sparse_infer.decode.streaming import STREAMING_SINKS

    half = n // 2

    def ramp(full_at):
        return torch.clamp((torch.arange(half, dtype=torch.float64) + 1) / full_at, max=1.0)[None]

    return {"token_select": ramp(exact_full_at), "token_select_int8": ramp(int8_full_at),
            "quest": torch.full((1, half // QUEST_PAGE), 0.5, dtype=torch.float64),
            "streaming": {s: torch.full((1, half), 0.5, dtype=torch.float64) for s in STREAMING_SINKS}}


def test_int8_scoring_is_searched_as_a_candidate_of_its_own():
    """int8 scoring reads codes (a quarter of K) instead of K: it wins at the budget its own
    (coarser) ranking needs, and is left out when the settings exclude it (plans for GPUs)."""
    from sparse_infer.methods import resolve
    from sparse_infer.profiler.search import choose_decode, decode_recall

    curves = {n: _int8_curves(n, n // 16, n // 8) for n in LENGTHS}
    n = max(LENGTHS)
    choice = choose_decode(curves, 0, 64, SearchSettings(target_recall=0.95), None)
    assert choice.pattern == "token_select" and choice.params["scoring"] == "int8"
    budget = resolve(choice.params["budget"], n)
    assert budget >= 0.95 * n / 8 and float(decode_recall(curves[n], "token_select", choice.params, n)[0]) >= 0.95
    assert choice.cost == pytest.approx((64 + 4) / (8 * 64) + (budget + 16 + 64) / n)
    exact = choose_decode(curves, 0, 64, SearchSettings(target_recall=0.95, int8_scoring=False), None)
    assert exact.pattern == "token_select" and "scoring" not in exact.params
    assert resolve(exact.params["budget"], n) < budget and exact.cost > choice.cost
    # the int8 ranking never reaching the target leaves exact scoring
    never = {L: _int8_curves(L, L // 10, L) for L in LENGTHS}
    assert "scoring" not in choose_decode(never, 0, 64, SearchSettings(target_recall=0.95), None).params


def test_query_aware_only_leaves_streaming_out():
    """A retrieval head allowed a selector (--retrieval-heads select) never gets streaming, which
    does not look at the query, even where streaming would be cheapest."""
    import torch

    from sparse_infer.decode.streaming import STREAMING_SINKS
    from sparse_infer.profiler.search import choose_decode

    curves = {n: {**_int8_curves(n, n // 4, n // 4),
                  "streaming": {s: torch.ones(1, n // 2, dtype=torch.float64) for s in STREAMING_SINKS}}
              for n in LENGTHS}
    settings = SearchSettings(target_recall=0.95)
    assert choose_decode(curves, 0, 64, settings, None).pattern == "streaming"
    assert choose_decode(curves, 0, 64, settings, None, query_aware_only=True).pattern == "token_select"


def test_budget_grid_adds_the_points_halfway_in_ratio():
    from sparse_infer.methods import budget_grid
    assert budget_grid(16, 200) == [16, 24, 32, 48, 64, 96, 128, 192]
    assert 3072 in budget_grid(16, 16384) and max(budget_grid(16, 16384)) == 16384
    from sparse_infer.decode.quest import QUEST_PAGE, Quest
    quest = [p["budget"] for p in Quest().search_grid(4096)]
    assert 48 in quest and all(b % QUEST_PAGE == 0 for b in quest)      # whole pages: 24 is not one


def test_decode_only_analysis_keeps_prefill_dense_and_decides_decode_the_same():
    import torch

    runs = []
    for n in LENGTHS:
        q, k = planted_heads(n)
        runs.append(LayerRun(n, q, k, scaling=1.0))
    full = analyze_layer(runs, SearchSettings(block_size=BS), block_size=BS)
    decode_only = analyze_layer(runs, SearchSettings(block_size=BS), block_size=BS, prefill=False)
    assert any(r.prefill.pattern != "dense" for r in full)
    assert all(r.prefill.pattern == "dense" for r in decode_only)
    assert [r.decode for r in decode_only] == [r.decode for r in full]
    for a, b in zip(full, decode_only):
        assert a.decode_recall == pytest.approx(b.decode_recall, abs=1e-5)
        assert a.channels == b.channels


def _copying_runs():
    """Two lengths of one kv group (2 query heads): head 0 copies a needle (its answer queries
    look at the needle keys only); every other query looks at the first key, which every
    selector keeps, so averaged over the decode queries a fixed window would do."""
    import torch

    runs = []
    for n in LENGTHS:
        d = 16
        g = torch.Generator().manual_seed(n)
        k = torch.randn(1, n, d, generator=g) * 0.1
        needle = (n // 4, n // 4 + 3)
        k[0, needle[0]:needle[1]] = torch.tensor([8.0] + [0.0] * (d - 1))
        k[0, 0, 1] = 8.0                         # a sink every other query looks at
        q = torch.randn(2, n, d, generator=g) * 0.1
        q[:, :, 1] = 8.0
        answer = [n - 2, n - 1]
        for t in answer:
            q[0, t - 1] = torch.tensor([8.0] + [0.0] * (d - 1))
        ids = torch.arange(n)
        ids[answer[0]:answer[1] + 1] = ids[needle[0]:needle[0] + 2]
        runs.append(LayerRun(n, q, k, scaling=1.0, input_ids=ids[None], answer_positions=answer,
                             needle_span=needle))
    return runs


def test_retrieval_heads_are_dense_or_take_a_query_aware_selector_that_keeps_the_answer():
    from sparse_infer.methods import DECODE_SELECTORS
    from sparse_infer.profiler.search import decode_recall

    runs = _copying_runs()
    settings = SearchSettings(block_size=BS, target_recall=0.9)
    dense = analyze_layer(runs, settings, block_size=BS, prefill=False)
    assert dense[0].retrieval_score >= 0.5
    assert [r.decode.pattern for r in dense] == ["dense", "dense"]
    chosen = analyze_layer(runs, SearchSettings(block_size=BS, target_recall=0.9, retrieval_dense=False),
                           block_size=BS, prefill=False)
    rule = chosen[0].decode
    assert rule == chosen[1].decode and rule.pattern != "dense"
    assert DECODE_SELECTORS[rule.pattern].query_aware
    assert not DECODE_SELECTORS["streaming"].query_aware
