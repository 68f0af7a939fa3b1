"""Needle grid: prompts, grid aggregation, heatmap, and a run on a tiny random model."""

from __future__ import annotations

import json

import pytest

from sparse_infer.eval import needle
from sparse_infer.eval.errors import EvalError


def test_needle_sample_length_and_depth(tokenizer):
    positions = []
    for depth in (0, 50, 100):
        s = needle.make_needle_sample(tokenizer, 1024, depth, seed=0)
        assert 0.99 * 1024 <= s["tokens"] <= 1024
        value = s["answers"][0]
        assert len(value) == 7 and value.isdigit()
        needle_text = f"is: {value}."
        assert s["input"].count(needle_text) == 1
        start = s["input"].index("afterwards.\n") + len("afterwards.\n")
        end = s["input"].index("\nWhat is the special magic number")
        positions.append((s["input"].index(needle_text) - start) / (end - start))
        assert s["depth"] == depth and s["task"] == needle.NEEDLE_TASK
    assert positions[0] < 0.1 < positions[1] < 0.9 < positions[2]
    assert abs(positions[1] - 0.5) < 0.1
    again = needle.make_needle_sample(tokenizer, 1024, 50, seed=0)
    other = needle.make_needle_sample(tokenizer, 1024, 50, seed=1)
    assert again == needle.make_needle_sample(tokenizer, 1024, 50, seed=0)
    assert other["answers"] != again["answers"]


def test_bad_depth(tokenizer):
    with pytest.raises(EvalError, match="depth"):
        needle.make_needle_sample(tokenizer, 1024, 120)


def test_needle_grid():
    recs = [
        {"task": "needle", "length": 512, "depth": 0.0, "score": 100.0},
        {"task": "needle", "length": 512, "depth": 0.0, "score": 0.0},
        {"task": "needle", "length": 1024, "depth": 100.0, "score": 100.0},
        {"task": "vt", "length": 512, "depth": 0.0, "score": 0.0},
    ]
    grid = needle.needle_grid(recs, [512, 1024], [0, 100])
    assert grid == [[50.0, None], [None, 100.0]]
    # prefill seconds: records without one (older files) are left out of their cell
    recs[0]["prefill_seconds"], recs[2]["prefill_seconds"], recs[3]["prefill_seconds"] = 0.5, 2.0, 9.0
    times = needle.needle_grid(recs, [512, 1024], [0, 100], "prefill_seconds")
    assert times == [[0.5, None], [None, 2.0]]
    assert needle.column_means(times) == [0.5, 2.0]
    assert needle.column_means([[None, 1.0], [None, 3.0]]) == [None, 2.0]


def test_format_seconds():
    assert [needle.format_seconds(t) for t in (42.4, 1.26, 0.42, 0.0085)] == ["42 s", "1.3 s", "0.42 s", "8.5 ms"]


def test_heatmap_png(tmp_path):
    import matplotlib.image

    lengths, depths = [512, 1024, 2048], [0, 25, 50, 75, 100]
    grid = [[(i * 10 + j) % 101 for j in range(len(lengths))] for i in range(len(depths))]
    grid[0][0] = None
    path = tmp_path / "grid.png"
    fig = needle.plot_heatmap({"dense": grid, "sparse": grid}, lengths, depths, path)
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    heat_axes = [ax for ax in fig.axes if ax.images and ax.get_title()]
    assert [ax.get_title().split("\n")[0] for ax in heat_axes] == ["dense", "sparse"]
    for ax in heat_axes:
        assert ax.images[0].get_array().shape == (len(depths), len(lengths))
        assert len(ax.texts) == len(depths) * len(lengths)  # every cell annotated
        assert "prefill" not in ax.get_title()
    # with prefill times: under each score its cell's time, in the title the plan's mean
    times = [[0.5 * (j + 1) for j in range(len(lengths))] for _ in depths]
    times[1][1] = None
    fig = needle.plot_heatmap({"dense": grid, "sparse": grid}, lengths, depths, prefill={"dense": times})
    dense_ax, sparse_ax = [ax for ax in fig.axes if ax.images and ax.get_title()]
    assert dense_ax.get_title() == "dense\nmean 22, prefill 1.0 s"   # (5 rows × 3 s - 1 s) / 14 cells
    assert "prefill" not in sparse_ax.get_title()
    labels = {tuple(t.get_position()): t.get_text() for t in dense_ax.texts}
    assert labels[(0, 0)] == "–\n0.50 s" and labels[(2, 4)] == f"{grid[4][2]}\n1.5 s"
    assert labels[(1, 1)] == f"{grid[1][1]}"                   # no time for this cell
    assert all("\n" not in t.get_text() for t in sparse_ax.texts)


def test_run_needle_tiny_model(tmp_path, tokenizer, tiny_llama, sparse_plan):
    import matplotlib.image

    lengths, depths = [256, 512], [0, 50, 100]
    plans = {"dense": None, "sparse": sparse_plan}
    result = needle.run_needle(tiny_llama, tokenizer, plans, tmp_path, lengths, depths, progress=False)
    saved = json.loads((tmp_path / needle.NEEDLE_JSON).read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["lengths"] == lengths and saved["depths"] == [0.0, 50.0, 100.0]
    assert set(saved["plans"]) == {"dense", "sparse"}
    for entry in saved["plans"].values():
        grid = entry["scores"]
        assert len(grid) == len(depths) and all(len(row) == len(lengths) for row in grid)
        assert all(v in (0.0, 100.0) for row in grid for v in row)
    assert matplotlib.image.imread(tmp_path / needle.NEEDLE_PNG).ndim == 3
    records = json.loads((tmp_path / "results.json").read_text())["plans"]["sparse"]["records"]
    assert len(records) == len(lengths) * len(depths)
    assert all("depth" in r and r["task"] == "needle" for r in records)
    for name, entry in saved["plans"].items():
        times = entry["prefill_seconds"]
        assert len(times) == len(depths) and all(len(row) == len(lengths) for row in times)
        assert all(t > 0 for row in times for t in row)
        assert entry["prefill_seconds_by_length"] == pytest.approx(
            [sum(row[j] for row in times) / len(depths) for j in range(len(lengths))])
        assert entry["prefill_seconds_mean"] == pytest.approx(sum(map(sum, times)) / (len(depths) * len(lengths)))
    lines = needle.describe(result)
    assert lines[0].startswith("dense: mean score ") and ", mean prefill " in lines[0]
    assert lines[1].startswith("sparse: mean score ") and ", mean prefill " in lines[1]
    for line, length in zip(lines[2:], lengths, strict=True):
        assert line.startswith(f"prefill at {length} tokens: dense ") and " vs dense)" in line
