"""The teacher-forced fidelity measure: exact zero at full budget, large where the plan drops
what the answer needs, the bf16 floor cached, results never replaced silently."""
from __future__ import annotations

import json

import pytest
import torch

import sparse_infer
from sparse_infer.eval import fidelity as fd
from sparse_infer.eval.errors import EvalError
from sparse_infer.presets import preset


def _a_shape(config, sink, local, dense_tail=0, min_seq_len=64):
    plan = preset("a_shape", config, min_seq_len=min_seq_len, min_kv_len=min_seq_len).to_dict()
    plan["prefill"]["block_size"] = 16
    plan["prefill"]["default"] = {"pattern": "a_shape", "sink": sink, "local": local, "dense_tail": dense_tail}
    plan["prefill"]["layers"] = {}
    return plan


@pytest.fixture
def sharp_llama(tiny_llama):
    """Random weights give near-uniform next-token distributions; a scaled LM head makes them
    as peaked as a trained model's, so differences in attention show in the KL."""
    with torch.no_grad():
        tiny_llama.lm_head.weight.mul_(30.0)
    return tiny_llama


def test_prompts_have_the_asked_length_and_answer_positions(tokenizer):
    prose = fd.prose_prompt(tokenizer, 300, 0)
    assert len(prose.input_ids) == 300 and prose.answer_positions == []
    assert fd.prose_prompt(tokenizer, 300, 1).input_ids != prose.input_ids      # other offset
    assert fd.prose_prompt(tokenizer, 300, 0).input_ids == prose.input_ids      # deterministic

    ruler_prompt = fd.ruler_prompt(tokenizer, "niah_single_2", 400, 0)
    first, last = ruler_prompt.answer_positions[0], ruler_prompt.answer_positions[-1]
    assert last == len(ruler_prompt.input_ids) - 2            # the last answer token is predicted from the one before
    answer = tokenizer.decode(ruler_prompt.input_ids[first + 1:])
    assert answer.strip().isdigit() and len(answer.strip()) == 7

    positions = fd.scored_positions(ruler_prompt, window=32)
    assert positions[:32] == list(range(first - 32, first)) and positions[32:] == ruler_prompt.answer_positions


def test_compare_is_zero_for_identical_and_matches_a_hand_kl():
    ref = torch.log_softmax(torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]]), -1)
    other = torch.log_softmax(torch.tensor([[0.0, 2.0, -1.0], [0.0, 1.0, 0.0]]), -1)
    prompt = fd.FidelityPrompt(id="x", kind="ruler", length=3, input_ids=[0, 5, 1], answer_positions=[1])
    same = fd.compare(ref, ref, [0, 1], prompt)
    assert same["kl"] == 0.0 and same["answer_kl"] == 0.0 and same["top1"] == 100.0
    got = fd.compare(ref, other, [0, 1], prompt)
    p = ref[0].exp()
    assert got["kl"] == pytest.approx(float((p * (ref[0] - other[0])).sum()), rel=1e-6)
    assert got["top1"] == 0.0 and got["answer_top1"] == 100.0 and got["answer_kl"] == pytest.approx(0.0, abs=1e-7)
    assert got["answer_logprob_delta"] == pytest.approx(0.0, abs=1e-6)     # token 1 at position 1: same dist


def test_gate_uses_answer_kl_against_twice_the_floor_and_one_top1_point():
    row = {"plan_answer_kl": 0.002, "bf16_answer_kl": 0.001, "plan_top1": 96.0, "bf16_top1": 97.0}
    assert fd.gate(row) is True
    assert fd.gate({**row, "plan_answer_kl": 0.0021}) is False
    assert fd.gate({**row, "plan_top1": 95.9}) is False
    assert fd.gate({"plan_kl": 0.001, "bf16_kl": 0.001, "plan_top1": 97.0, "bf16_top1": 97.0}) is True  # prose only
    assert fd.gate({**row, "bf16_answer_kl": None}) is None


def test_full_budget_plan_scores_zero_kl_and_full_agreement(sharp_llama, tokenizer, tmp_path):
    prompts = fd.make_prompts(tokenizer, [256], samples=1, tasks=["niah_single_2"])
    plan = _a_shape(sharp_llama.config, sink=16, local=512)        # local covers every key: dense
    rows = fd.run_fidelity(sharp_llama, prompts, plan, "full", tmp_path / "out", window=64,
                           floor_cache=tmp_path / "floor.json", progress=False)
    doc = json.loads((tmp_path / "out" / fd.FIDELITY_FILE).read_text())
    for rec in doc["records"]:
        assert rec["plan"]["kl"] == pytest.approx(0.0, abs=1e-6)
        assert rec["plan"]["top1"] == 100.0
        assert rec["density"] == pytest.approx(1.0)
        assert rec["bf16"]["kl"] > 10 * rec["plan"]["kl"]     # the floor is a real bf16 run, not fp32 again
    ruler = next(r for r in doc["records"] if r["kind"] == "ruler")
    assert ruler["plan"]["answer_kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows[0]["passes"] is True and rows[0]["samples"] == 2
    assert not sparse_infer.is_patched(sharp_llama)     # the model is left as it was


def test_a_plan_that_drops_context_moves_the_distributions(sharp_llama, tokenizer, tmp_path):
    prompts = [fd.prose_prompt(tokenizer, 384, 0)]
    plan = _a_shape(sharp_llama.config, sink=16, local=16)
    rows = fd.run_fidelity(sharp_llama, prompts, plan, "narrow", tmp_path / "out", window=64,
                           floor_cache=tmp_path / "floor.json", progress=False)
    assert rows[0]["density"] < 0.3
    assert rows[0]["plan_kl"] > 10 * rows[0]["bf16_kl"]
    assert rows[0]["passes"] is False


def test_floor_is_cached_and_results_are_not_replaced(sharp_llama, tokenizer, tmp_path, monkeypatch):
    prompts = [fd.prose_prompt(tokenizer, 200, 0)]
    plan = _a_shape(sharp_llama.config, sink=16, local=512)
    floor = tmp_path / "floor.json"
    fd.run_fidelity(sharp_llama, prompts, plan, "p", tmp_path / "a", window=16, floor_cache=floor, progress=False)
    assert len(json.loads(floor.read_text())) == 1

    # a second plan on the same prompts reads the floor from the cache: no bf16 copy is made
    def no_copy(*_a, **_k):
        raise AssertionError("the bf16 floor was measured again")
    monkeypatch.setattr(fd, "bf16_copy", no_copy)
    fd.run_fidelity(sharp_llama, prompts, plan, "p", tmp_path / "b", window=16, floor_cache=floor, progress=False)

    with pytest.raises(EvalError, match="--resume"):
        fd.run_fidelity(sharp_llama, prompts, plan, "p", tmp_path / "a", window=16, floor_cache=floor,
                        progress=False)
    other = _a_shape(sharp_llama.config, sink=16, local=32)
    with pytest.raises(EvalError, match="plan_sha256"):
        fd.run_fidelity(sharp_llama, prompts, other, "p", tmp_path / "a", window=16, floor_cache=floor,
                        resume=True, progress=False)
    # resuming with the same plan and more prompts runs only the new one (its floor is new)
    monkeypatch.undo()
    more = prompts + [fd.prose_prompt(tokenizer, 200, 1)]
    fd.run_fidelity(sharp_llama, more, plan, "p", tmp_path / "a", window=16, floor_cache=floor, resume=True,
                    progress=False)
    doc = json.loads((tmp_path / "a" / fd.FIDELITY_FILE).read_text())
    assert [r["id"] for r in doc["records"]] == ["prose/200/0", "prose/200/1"]


@pytest.mark.model
def test_smollm2_needle_dropped_shows_in_the_answer_kl_and_full_budget_is_exact(smollm2, tmp_path):
    model, tok = smollm2
    prompts = [fd.ruler_prompt(tok, "niah_single_2", 2048, 0)]
    narrow = _a_shape(model.config, sink=64, local=256, min_seq_len=1024)     # the needle lies outside
    full = _a_shape(model.config, sink=64, local=4096, min_seq_len=1024)
    (row,) = fd.run_fidelity(model, prompts, narrow, "narrow", tmp_path / "narrow", window=32,
                             floor_cache=tmp_path / "floor.json", progress=False)
    assert row["bf16_answer_kl"] < 0.01                     # a dtype change barely moves the answer
    assert row["plan_answer_kl"] > 100 * row["bf16_answer_kl"]
    assert row["plan_answer_logprob_delta"] < -5.0 and row["passes"] is False
    (row,) = fd.run_fidelity(model, prompts, full, "full", tmp_path / "full", window=32, floor=False,
                             progress=False)
    assert row["plan_answer_kl"] < 1e-6 and row["plan_kl"] < 1e-6
    assert row["plan_answer_top1"] == 100.0 and row["plan_top1"] == 100.0


def test_fidelity_command_prints_the_table_and_refuses_to_replace(tmp_path, fake_load, tokenizer):
    from typer.testing import CliRunner

    from sparse_infer.eval.cli import eval_app

    from tests.eval.conftest import make_tiny_llama

    plan_path = tmp_path / "plan.yaml"
    plan = _a_shape(make_tiny_llama(tokenizer).config, sink=16, local=32)
    plan_path.write_text(__import__("yaml").safe_dump({**plan, "complete": True}, sort_keys=False))
    args = ["fidelity", "tiny", "--plan", str(plan_path), "--lengths", "256", "--samples", "1", "--kinds", "prose",
            "--window", "32", "--out", str(tmp_path / "o"), "--floor-cache", str(tmp_path / "floor.json")]
    res = CliRunner().invoke(eval_app, args, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "256" in res.output and ("pass" in res.output or "FAIL" in res.output)
    doc = json.loads((tmp_path / "o" / fd.FIDELITY_FILE).read_text())
    assert [r["id"] for r in doc["records"]] == ["prose/256/0"] and doc["records"][0]["bf16"]["kl"] > 0
    before = (tmp_path / "o" / fd.FIDELITY_FILE).read_bytes()
    res = CliRunner().invoke(eval_app, args)
    assert res.exit_code == 2 and "--resume" in res.output and fake_load == ["tiny"]    # refused before loading
    assert (tmp_path / "o" / fd.FIDELITY_FILE).read_bytes() == before


def test_fidelity_command_refuses_a_missing_plan_before_loading(tmp_path, fake_load):
    from typer.testing import CliRunner

    from sparse_infer.eval.cli import eval_app

    res = CliRunner().invoke(eval_app, ["fidelity", "tiny", "--plan", "missing/plan.yaml", "--out",
                                        str(tmp_path / "o")])
    assert res.exit_code == 2 and "missing/plan.yaml" in res.output
    assert fake_load == [] and not (tmp_path / "o").exists()


def _decode_plan(method_rule):
    return {"sparse_infer_plan": 1,
            "prefill": {"min_seq_len": 0, "default": {"pattern": "a_shape", "sink": 16, "local": 16}},
            "decode": {"min_kv_len": 0, "default": method_rule}}


def test_decode_mode_full_budget_is_exact_and_a_small_budget_is_not(sharp_llama, tokenizer, tmp_path):
    # the plan's prefill (a narrow a_shape) is switched off in decode mode: only decode is measured
    prompts = fd.make_prompts(tokenizer, [256], samples=1, tasks=["niah_single_2"])
    full = _decode_plan({"method": "token_select", "budget": 4096})
    rows = fd.run_fidelity(sharp_llama, prompts, full, "full", tmp_path / "full", decode_tokens=12,
                           floor_cache=tmp_path / "floor.json", progress=False)
    doc = json.loads((tmp_path / "full" / fd.FIDELITY_FILE).read_text())
    assert doc["decode_tokens"] == 12
    for rec in doc["records"]:
        assert rec["positions"] == 11 and rec["answer_positions"] == 0      # decode steps, no answer tokens
        assert rec["plan"]["kl"] == pytest.approx(0.0, abs=1e-6) and rec["plan"]["top1"] == 100.0
        assert rec["bf16"]["kl"] > 0
    assert rows[0]["samples"] == 2 and rows[0]["passes"] is True
    narrow = _decode_plan({"method": "streaming", "sink": 4, "local": 8})
    rows = fd.run_fidelity(sharp_llama, prompts, narrow, "narrow", tmp_path / "narrow", decode_tokens=12,
                           floor_cache=tmp_path / "floor.json", progress=False)
    doc = json.loads((tmp_path / "narrow" / fd.FIDELITY_FILE).read_text())
    assert all(rec["density"] < 0.2 for rec in doc["records"])              # decode density of the plan
    assert rows[0]["plan_kl"] > 10 * rows[0]["bf16_kl"] and rows[0]["passes"] is False
    assert not sparse_infer.is_patched(sharp_llama)


def test_decode_logprobs_of_dense_equal_one_teacher_forced_forward(sharp_llama, tokenizer):
    prompt = fd.prose_prompt(tokenizer, 120, 0)
    continuation = fd.greedy_continuation(sharp_llama, prompt.input_ids, 6)
    assert len(continuation) == 6
    steps = fd.decode_logprobs(sharp_llama, prompt.input_ids, continuation)
    forward = fd.next_token_logprobs(sharp_llama, prompt.input_ids + continuation, range(120, 125))
    torch.testing.assert_close(steps, forward, atol=1e-4, rtol=0)
    # greedy: each continuation token is the argmax of the step before it
    assert steps.argmax(-1).tolist() == continuation[1:]
