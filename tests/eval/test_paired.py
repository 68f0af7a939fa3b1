"""Paired deltas: the table's Δ, its bootstrap interval against the exact resampling law, the sign
test against hand-computed binomial tails, and the verdicts."""

import pytest

from sparse_infer.eval import paired


def rec(task, length, i, score, sha="p"):
    sid = f"{task}/{length}/{i}"
    return {"id": sid, "task": task, "length": length, "score": float(score), "input_sha1": sha + sid}


def doc_of(**plans):
    return {"plans": {name: {"records": recs} for name, recs in plans.items()}}


def test_sign_test_matches_the_binomial_tails():
    assert paired.sign_test(0, 0) == 1.0
    assert paired.sign_test(5, 0) == pytest.approx(2 / 32)
    assert paired.sign_test(0, 5) == pytest.approx(2 / 32)
    assert paired.sign_test(14, 1) == pytest.approx(2 * (1 + 15) / 2**15)
    assert paired.sign_test(4, 1) == pytest.approx(2 * (1 + 5) / 32)
    assert paired.sign_test(1, 1) == 1.0                                # the doubled tail is capped


def test_one_lost_sample_of_five_has_the_exact_resampling_interval():
    """One of five samples lost (100 -> 0): a resample's mean is -20 x Binomial(5, 1/5), whose
    2.5% quantile is -60 (P(K>=3) = 0.058, P(K>=4) = 0.0067) and 97.5% quantile 0 (P(K=0) = 0.33)."""
    dense = [rec("vt", 16384, i, 100) for i in range(5)]
    plan = [rec("vt", 16384, 0, 0)] + [rec("vt", 16384, i, 100) for i in range(1, 5)]
    base, deltas = paired.paired_deltas(doc_of(dense=dense, vs=plan))
    assert base == "dense"
    (row,) = deltas["vs"]                       # one length: no over-lengths row
    assert (row.length, row.pairs, row.lower, row.higher) == (16384, 5, 1, 0)
    assert row.delta == pytest.approx(-20.0)
    assert (row.low, row.high) == (-60.0, 0.0)
    assert row.sign_p == 1.0
    assert row.verdict("dense") == "cannot tell whether within 1 of dense"


def test_table_delta_is_the_mean_of_task_means_and_lengths_average():
    """Δ at a length weighs tasks equally whatever their sample counts, as the table's average row
    does; the over-lengths row is the mean of the lengths' Δ."""
    dense = ([rec("vt", 8192, i, 100) for i in range(4)] + [rec("cwe", 8192, 0, 50)]
             + [rec("vt", 16384, i, 100) for i in range(2)])
    plan = ([rec("vt", 8192, 0, 0)] + [rec("vt", 8192, i, 100) for i in range(1, 4)] + [rec("cwe", 8192, 0, 70)]
            + [rec("vt", 16384, i, 100) for i in range(2)])
    _, deltas = paired.paired_deltas(doc_of(dense=dense, vs=plan))
    at8k, at16k, overall = deltas["vs"]
    assert at8k.delta == pytest.approx((-25.0 + 20.0) / 2)
    assert (at8k.lower, at8k.higher, at8k.pairs) == (1, 1, 5)
    assert (at16k.delta, at16k.low, at16k.high) == (0.0, 0.0, 0.0)
    assert at16k.verdict("dense") == "within 1 of dense"
    assert overall.length is None and overall.pairs == 7
    assert overall.delta == pytest.approx((at8k.delta + at16k.delta) / 2)
    assert overall.low <= overall.delta <= overall.high


def test_every_sample_lost_is_more_than_the_tolerance_below():
    dense = [rec("niah_single_1", 4096, i, 100) for i in range(5)]
    plan = [rec("niah_single_1", 4096, i, 0) for i in range(5)]
    _, deltas = paired.paired_deltas(doc_of(dense=dense, a_shape=plan))
    (row,) = deltas["a_shape"]
    assert (row.delta, row.low, row.high) == (-100.0, -100.0, -100.0)
    assert row.sign_p == pytest.approx(2 / 32)
    assert row.verdict("dense", tolerance=5) == "more than 5 below dense"


def test_only_samples_on_the_same_prompt_are_paired_and_runs_are_reproducible():
    dense = [rec("vt", 4096, i, 100) for i in range(3)]
    plan = [rec("vt", 4096, 0, 0, sha="other"), rec("vt", 4096, 1, 0), rec("vt", 4096, 2, 100)]
    doc = doc_of(dense=dense, vs=plan, solo=[])
    base, deltas = paired.paired_deltas(doc)
    (row,) = deltas["vs"]
    assert row.pairs == 2 and row.delta == pytest.approx(-50.0)
    assert deltas["solo"] == []
    again = paired.paired_deltas(doc_of(solo=[], vs=plan, dense=dense))[1]["vs"]   # plan order does not matter
    assert again == deltas["vs"]
    assert paired.paired_deltas(doc, baseline="vs")[0] == "vs"
    lines = paired.describe_paired(base, deltas)
    assert lines[0].startswith("vs at 4096: Δ -50.0 points (95% interval ")
    assert "2 samples, 1 lower, 0 higher, sign test p=1)" in lines[0]
    assert lines[1] == "solo: no sample in common with dense"


def test_bad_settings_are_refused():
    doc = doc_of(dense=[rec("vt", 4096, 0, 100)], vs=[rec("vt", 4096, 0, 100)])
    with pytest.raises(ValueError, match="level"):
        paired.paired_deltas(doc, level=1.0)
    with pytest.raises(ValueError, match="resamples"):
        paired.paired_deltas(doc, resamples=0)


def test_interval_covers_the_point_on_a_real_shape():
    """55 samples over 11 tasks with four losses and one gain (the 16K tables' shape)."""
    tasks = [f"t{k}" for k in range(11)]
    dense = [rec(t, 16384, i, 100 if (k + i) % 3 else 0) for k, t in enumerate(tasks) for i in range(5)]
    plan = [dict(r) for r in dense]
    right = [j for j, r in enumerate(dense) if r["score"] == 100.0]
    for j in right[::9][:4]:
        plan[j]["score"] = 0.0
    gain = next(j for j, r in enumerate(dense) if r["score"] == 0.0)
    plan[gain]["score"] = 100.0
    _, deltas = paired.paired_deltas(doc_of(dense=dense, vs=plan))
    (row,) = deltas["vs"]
    assert row.delta == pytest.approx(-3 * 100 / 5 / 11)
    assert (row.lower, row.higher, row.pairs) == (4, 1, 55)
    assert row.low < row.delta < row.high
    assert row.sign_p == pytest.approx(2 * (1 + 5) / 32)
