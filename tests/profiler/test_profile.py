"""End to end on a tiny random model: the CLI writes a plan that loads, patches and runs;
the same seed gives the same plan."""
import copy

import pytest
import torch
import yaml
from typer.testing import CliRunner

import sparse_infer
from sparse_infer.plan import load_plan
from sparse_infer.profiler import ProfileConfig, profile_model
from sparse_infer.profiler.cli import app, plan_show_command, profile_command
from sparse_infer.profiler.prompts import build_sample, calibration_set
from tests.conftest import tiny_model
from tests.profiler.helpers import char_tokenizer

# a low target so that random weights still get sparse heads, and the sparse paths run
ARGS = ["--seq-len", "1024", "--samples", "2", "--target-recall", "0.6", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llama")
    tiny_model("llama").save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def cli_plan(tiny_dir):
    out = tiny_dir / "plan.yaml"
    res = CliRunner().invoke(app, ["profile", str(tiny_dir), "--out", str(out), *ARGS])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return out


def _without_time(raw: dict) -> dict:
    raw = copy.deepcopy(raw)
    raw["profile"].pop("created")
    return raw


def test_cli_plan_validates_and_records_provenance(cli_plan, tiny_dir):
    model = tiny_model("llama")
    plan = load_plan(cli_plan, model.config)
    prof = plan.profile
    assert prof["lengths"] == [512, 1024] and prof["samples"] == 2 and prof["target_recall"] == 0.6
    assert prof["command"].startswith(f"sparse-infer profile {tiny_dir} --out {cli_plan} --seq-len 1024")
    assert prof["model"]["architecture"] == "LlamaForCausalLM"
    assert prof["model"]["fingerprint"].startswith("sha256:")
    assert prof["tool"].startswith("sparse_infer.profiler")
    assert plan.prefill.min_len == 512 and plan.decode.min_len == 512
    kinds = {plan.prefill.rule(layer, h).kind for layer in range(2) for h in range(4)}
    assert kinds - {"dense"}, "a 0.6 recall target should leave some sparse prefill heads"


def test_plan_patches_and_runs_sparse(cli_plan):
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 700), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(ids).logits
        sparse_infer.patch(model, str(cli_plan))
        try:
            out = model(ids).logits
            stats = sparse_infer.get_stats(model)
            gen = model.generate(ids, max_new_tokens=3, do_sample=False)
        finally:
            sparse_infer.unpatch(model)
    assert out.shape == dense.shape and torch.isfinite(out).all()
    assert sum(s["sparse_prefill_calls"] for s in stats["layers"].values()) > 0
    assert gen.shape == (1, 703)


def test_same_seed_same_plan(tiny_dir, cli_plan):
    model = tiny_model("llama")
    tok = char_tokenizer()
    cfg = ProfileConfig(seq_len=1024, samples=2, target_recall=0.6)
    a = profile_model(model, tok, cfg, name=str(tiny_dir), out=str(cli_plan), progress=False).plan.to_dict()
    b = profile_model(model, tok, cfg, name=str(tiny_dir), out=str(cli_plan), progress=False).plan.to_dict()
    assert _without_time(a) == _without_time(b)
    # the CLI run (model loaded from disk) made the same plan too
    assert _without_time(yaml.safe_load(cli_plan.read_text())) == _without_time({**a, "complete": True})
    other = profile_model(model, tok, ProfileConfig(seq_len=1024, samples=2, target_recall=0.6, seed=1),
                          progress=False).plan.to_dict()
    assert other["profile"]["seed"] == 1


def test_calibration_prompts_are_deterministic_and_nested():
    tok = char_tokenizer()
    a = calibration_set(tok, [512, 1024], 3, seed=5)
    b = calibration_set(tok, [512, 1024], 3, seed=5)
    assert [s.kind for s in a] == ["needle", "kv", "text"]
    for x, y in zip(a, b):
        assert torch.equal(x.input_ids, y.input_ids)
        assert [t.end for t in x.turns] == [t.end for t in y.turns]
        assert x.turns[-1].end == x.input_ids.shape[1] <= 1024
        assert x.turns[0].end <= 512
    needle = a[0]
    for t in needle.turns:
        lo, hi = t.needle_span
        copied = needle.input_ids[0, t.answer_positions]
        assert torch.equal(needle.input_ids[0, lo:hi], copied), "the answer copies the needle's tokens"
        assert tok.decode(copied).strip() == t.answer
    assert not torch.equal(calibration_set(tok, [512, 1024], 1, seed=6)[0].input_ids, needle.input_ids)
    s = build_sample(tok, "needle", 900, seed=1, depth=0.3, with_answer=False)
    assert s.input_ids.shape[1] == 900 and not s.turns[0].answer_positions   # room for the model to answer


def test_profile_command_callable_directly(tiny_dir, tmp_path, capsys):
    out = tmp_path / "direct.yaml"
    profile_command(str(tiny_dir), out, seq_len=1024, samples=1, target_recall=0.6, progress=False)
    load_plan(out, tiny_model("llama").config)
    plan_show_command(str(out))
    shown = capsys.readouterr().out
    assert "pre@1024" in shown and "dec@2048" in shown


def test_plan_show_densities_match_measurements(cli_plan):
    from sparse_infer.profiler.report import expected_densities
    plan = load_plan(cli_plan)
    measured = plan.profile["measured"]["prefill_density"]
    dens = expected_densities(plan, [512, 1024, 4096])
    for layer, row in enumerate(dens):
        for n in (512, 1024):             # at profiled lengths: what the profiler measured
            assert abs(row[n][0] - measured[n][layer]) < 0.02
        assert 0 < row[4096][0] <= 1 and 0 < row[4096][1] <= 1


def test_plan_show_cli(cli_plan):
    res = CliRunner().invoke(app, ["plan", "show", str(cli_plan)])
    assert res.exit_code == 0, res.output
    assert "layer" in res.output and "made by: sparse-infer profile" in res.output


def test_bad_options_are_rejected(tiny_dir, tmp_path):
    res = CliRunner().invoke(app, ["profile", str(tiny_dir), "--out", str(tmp_path / "x.yaml"),
                                   "--seq-len", "100", "--no-progress"])
    assert res.exit_code != 0 and "too short" in res.output
    res = CliRunner().invoke(app, ["profile", str(tiny_dir), "--out", str(tmp_path / "x.yaml"),
                                   "--seq-len", "8192", "--no-progress"])
    assert res.exit_code != 0 and "exceeds the model's context" in res.output


def test_group_slack_is_validated_and_recorded_in_the_command():
    from sparse_infer.profiler.profile import ProfileConfig

    config = ProfileConfig(seq_len=1024, group_slack=float("inf"))
    config.validate()
    assert config.command("qwen2.5-0.5b", "plan.yaml").endswith("--group-slack inf")
    assert "--group-slack" not in ProfileConfig(seq_len=1024).command("m", None)
    assert config.settings().group_slack == float("inf")
    with pytest.raises(ValueError, match="--group-slack must be >= 0"):
        ProfileConfig(seq_len=1024, group_slack=-1.0).validate()


def test_decode_rules_are_one_per_gqa_group_by_default(cli_plan):
    """The default plan selects once per kv group: every query head of a group gets the same
    decode rule, and the section says so, so the runtime shares one selection per group."""
    config = tiny_model("llama").config
    plan = load_plan(cli_plan, config)
    G = config.num_attention_heads // config.num_key_value_heads
    assert G > 1 and plan.decode.granularity == "group"
    assert plan.profile["decode_granularity"] == "group"
    assert "--decode-granularity" not in plan.profile["command"]
    for layer in range(config.num_hidden_layers):
        rules = [plan.decode.rule(layer, h) for h in range(config.num_attention_heads)]
        for j in range(config.num_key_value_heads):
            assert len({repr(r) for r in rules[j * G:(j + 1) * G]}) == 1


def test_decode_granularity_head_is_recorded_in_the_command_and_the_plan(tiny_dir, tmp_path):
    from sparse_infer.profiler.profile import ProfileConfig

    config = ProfileConfig(seq_len=1024, decode_granularity="head")
    assert config.command("m", "plan.yaml").endswith("--decode-granularity head")
    assert config.settings().decode_granularity == "head"
    with pytest.raises(ValueError, match="--decode-granularity must be 'group' or 'head'"):
        ProfileConfig(seq_len=1024, decode_granularity="layer").validate()
    out = tmp_path / "per_head.yaml"
    profile_command(str(tiny_dir), out, seq_len=1024, samples=1, target_recall=0.6, progress=False,
                    decode_granularity="head")
    plan = load_plan(out, tiny_model("llama").config)
    assert plan.decode.granularity == "head" and plan.profile["decode_granularity"] == "head"
    assert "--decode-granularity head" in plan.profile["command"]

def test_decode_only_profile_keeps_prefill_dense_and_decides_decode_as_a_full_profile(cli_plan, tiny_dir,
                                                                                     tmp_path):
    out = tmp_path / "decode_only.yaml"
    res = CliRunner().invoke(app, ["profile", str(tiny_dir), "--out", str(out), *ARGS, "--decode-only"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    config = tiny_model("llama").config
    plan, full = load_plan(out, config), load_plan(cli_plan, config)
    heads = [(layer, h) for layer in range(config.num_hidden_layers) for h in range(config.num_attention_heads)]
    assert all(plan.prefill.rule(layer, h).kind == "dense" for layer, h in heads)
    assert [repr(plan.decode.rule(*at)) for at in heads] == [repr(full.decode.rule(*at)) for at in heads]
    prof = plan.profile
    assert prof["decode_only"] is True and prof["command"].endswith("--decode-only")
    assert "prefill_density" not in prof["measured"] and prof["measured"]["decode_cost"] == \
        full.profile["measured"]["decode_cost"]


def test_decode_options_are_recorded_and_checked(tiny_dir, tmp_path):
    config = ProfileConfig(seq_len=1024, decode_only=True, retrieval_dense=False, int8_scoring=False)
    assert config.command("m", None).endswith("--retrieval-heads select --no-int8-scoring --decode-only")
    settings = config.settings()
    assert settings.retrieval_dense is False and settings.int8_scoring is False
    assert "--decode-only" not in ProfileConfig(seq_len=1024).command("m", None)
    res = CliRunner().invoke(app, ["profile", str(tiny_dir), "--out", str(tmp_path / "x.yaml"), *ARGS,
                                   "--retrieval-heads", "some"])
    assert res.exit_code != 0 and "--retrieval-heads must be 'dense' or 'select'" in res.output
    assert not (tmp_path / "x.yaml").exists()
