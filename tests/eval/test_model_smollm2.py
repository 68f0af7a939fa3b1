"""Real model check (run by the lead): RULER niah_single_1 at 2K is solvable by SmolLM2-135M dense."""

from __future__ import annotations

import pytest

from sparse_infer.eval import ruler, runner


@pytest.mark.model
def test_niah_single_1_dense_2k(smollm2, tmp_path):
    model, tok = smollm2
    samples = ruler.generate_samples(tok, ["niah_single_1"], [2048], 3, seed=0)
    assert all(0.99 * 2048 <= s["tokens"] <= 2048 for s in samples)
    rows = runner.run_eval(model, tok, samples, {"dense": None}, tmp_path, progress=False)
    (row,) = rows
    assert row["n"] == 3
    assert row["score"] > 0, (tmp_path / "results.json").read_text()
