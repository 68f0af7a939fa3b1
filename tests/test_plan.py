"""Plan schema: load/save round trip, budgets, presets, and every rejection with its field path."""
import copy

import pytest
import yaml

from sparse_infer.params import Budget, parse_budget
from sparse_infer.plan import PlanError, load_plan, plan_from_dict
from sparse_infer.presets import preset
from tests.conftest import tiny_config

GOOD = {
    "sparse_infer_plan": 1,
    "model": {"architecture": "LlamaForCausalLM", "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16},
    "profile": {"seq_len": 16384, "samples": 8, "target_recall": 0.95},
    "prefill": {
        "min_seq_len": 4096, "block_size": 64,
        "default": {"pattern": "vertical_slash", "vertical": 1000, "slash": 4096},
        "layers": {0: {"*": {"pattern": "dense"}},
                   1: {0: {"pattern": "a_shape", "sink": 128, "local": 2048},
                       3: {"pattern": "block", "coverage": 0.9}}},
    },
    "decode": {
        "min_kv_len": 4096,
        "default": {"method": "token_select", "budget": 2048, "sink": 128, "local": 512},
        "layers": {0: {"*": {"method": "dense"}}, 1: {3: {"method": "quest", "page": 16,
                                                          "budget": {"frac": 0.05, "min": 1024, "max": 8192}}}},
    },
}


def test_round_trip_exact(tmp_path):
    plan = plan_from_dict(copy.deepcopy(GOOD))
    path = plan.save(tmp_path / "p.yaml")
    again = load_plan(path)
    assert again.to_dict() == plan.to_dict()
    assert again.prefill.rule(1, 0).kind == "a_shape" and again.prefill.rule(1, 0).params["local"] == 2048
    assert again.prefill.rule(1, 2).kind == "vertical_slash"
    assert again.prefill.rule(0, 3).kind == "dense"
    assert again.decode.rule(1, 3).params["budget"] == Budget(frac=0.05, min=1024, max=8192)
    # what the YAML said is what is written back
    raw = yaml.safe_load(path.read_text())
    assert raw["prefill"]["layers"][1][0] == {"pattern": "a_shape", "sink": 128, "local": 2048}


def test_budget_resolution():
    b = parse_budget({"frac": 0.05, "min": 1024, "max": 8192}, "x")
    assert b.resolve(4096) == 1024
    assert b.resolve(65536) == 3277
    assert b.resolve(1 << 20) == 8192
    assert parse_budget(300, "x").resolve(10) == 300


def _bad(mutate):
    raw = copy.deepcopy(GOOD)
    mutate(raw)
    return raw


@pytest.mark.parametrize("mutate, path, words", [
    (lambda r: r["prefill"]["layers"][1][0].update(pattern="hexagon"), "prefill.layers.1.0.pattern", "unknown pattern"),
    (lambda r: r["prefill"]["layers"][1].update({2: {"pattern": "vertical_slash", "vertical": 0, "slash": 5}}),
     "prefill.layers.1.2.vertical", "positive"),
    (lambda r: r["prefill"]["layers"][1][0].update(window=5), "prefill.layers.1.0.window", "unknown key"),
    (lambda r: r["prefill"]["layers"][1][0].update(dense_tail=-1), "prefill.layers.1.0.dense_tail", "non-negative"),
    (lambda r: r["decode"]["default"].update(budget=-3), "decode.default.budget", "positive"),
    (lambda r: r["decode"]["layers"][1][3]["budget"].update(frac=1.5), "decode.layers.1.3.budget.frac", "(0, 1]"),
    (lambda r: r["decode"]["default"].pop("budget"), "decode.default.budget", "missing"),
    (lambda r: r["prefill"].update(block_size=48), "prefill.block_size", "power of two"),
    (lambda r: r.update(sparse_infer_plan=2), "sparse_infer_plan", "must be 1"),
    (lambda r: r.update(extra=1), "extra", "unknown top-level key"),
    (lambda r: r["prefill"]["layers"][1].update({"x": {"pattern": "dense"}}), "prefill.layers.1.x", "head keys"),
    (lambda r: r["prefill"]["layers"][1][3].update(top_k=4), "prefill.layers.1.3", "exactly one of top_k or coverage"),
    (lambda r: r["decode"]["default"].update(method="oracle"), "decode.default.method", "unknown method"),
    (lambda r: r["decode"]["default"].update(scoring="int4"), "decode.default.scoring", "one of exact, int8"),
    # an antidiagonal stride that does not divide the block size failed only at the first prompt
    (lambda r: r["prefill"]["layers"][1][3].update(estimator="antidiagonal", stride=24),
     "prefill.layers.1.3.stride", "must divide prefill.block_size 64"),
    (lambda r: r["prefill"].update(default={"pattern": "block", "coverage": 0.9, "estimator": "antidiagonal",
                                            "stride": 128}), "prefill.default.stride", "must divide"),
    # 65536 tried to allocate tens of GiB for a 300-token prompt
    (lambda r: r["prefill"].update(block_size=65536), "prefill.block_size", "power of two from 16 to 1024"),
    (lambda r: r["prefill"]["layers"][1].update({3: {"pattern": "block", "top_k": 10 ** 21}}),
     "prefill.layers.1.3.top_k", "beyond the maximum of 16777216"),
    (lambda r: r["prefill"]["layers"][1].update({3: {"pattern": "block", "top_k": 1e21}}),
     "prefill.layers.1.3.top_k", "positive integer (at most 16777216)"),
    (lambda r: r["decode"]["default"].update(budget="1e21"), "decode.default.budget", "positive integer (at most"),
    (lambda r: r["decode"]["layers"][1][3]["budget"].update(max=2 ** 40), "decode.layers.1.3.budget.max",
     "beyond the maximum"),
    (lambda r: r["prefill"]["layers"][1][0].update(local=2 ** 25), "prefill.layers.1.0.local", "beyond the maximum"),
    (lambda r: r["decode"]["layers"][1][3].update(page=1.0e9), "decode.layers.1.3.page", "written as an integer"),
    # channels are read from each key: the plan's own model.head_dim (16) bounds them
    (lambda r: r["decode"]["layers"][1].update({2: {"method": "double_sparsity", "budget": 64, "channels": 32}}),
     "decode.layers.1.2.channels", "32 channels exceed model.head_dim 16"),
    (lambda r: r["decode"].update(default={"method": "double_sparsity", "budget": 64, "channels": [0, 16]}),
     "decode.default.channels", "channel index 16 out of range"),
    # True == 1 in Python: a boolean is not a schema version
    (lambda r: r.update(sparse_infer_plan=True), "sparse_infer_plan", "must be 1"),
    (lambda r: r.update(complete=False), "complete", "must be true"),
    (lambda r: r["model"].update(architecture=["Llama"]), "model.architecture", "class name"),
])
def test_rejections_name_the_field(mutate, path, words):
    with pytest.raises(PlanError) as err:
        plan_from_dict(_bad(mutate))
    assert err.value.path == path
    assert str(err.value).startswith(path + ":")
    assert words in str(err.value)


def test_channels_beyond_the_models_head_dim_are_rejected_by_check_and_patch():
    """Without model.head_dim in the plan, the model's own head_dim bounds channels (plan check --model, patch)."""
    import torch

    import sparse_infer
    from tests.conftest import tiny_model

    raw = copy.deepcopy(GOOD)
    raw["model"].pop("head_dim")
    raw["decode"]["layers"][1][2] = {"method": "double_sparsity", "budget": 64, "channels": 17}
    plan_from_dict(copy.deepcopy(raw))      # nothing to check against without a model
    with pytest.raises(PlanError, match=r"^decode.layers.1.2.channels: 17 channels exceed the model's head_dim 16"):
        load_plan(copy.deepcopy(raw), tiny_config("llama"))
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        with pytest.raises(PlanError, match=r"^decode.layers.1.2.channels"):
            sparse_infer.patch(model, copy.deepcopy(raw))
        assert not sparse_infer.is_patched(model)
        assert torch.equal(model(ids).logits, before)


def test_plan_for_another_model_is_rejected():
    cfg = tiny_config("llama", num_hidden_layers=3)
    with pytest.raises(PlanError, match=r"model.num_hidden_layers: plan is for 2, this model has 3"):
        load_plan(copy.deepcopy(GOOD), cfg)
    cfg = tiny_config("llama")
    raw = _bad(lambda r: r["prefill"]["layers"].update({5: {"*": {"pattern": "dense"}}}))
    raw["model"] = {}
    with pytest.raises(PlanError, match=r"prefill.layers.5: layer index out of range"):
        load_plan(raw, cfg)
    raw = _bad(lambda r: r["decode"]["layers"][1].update({7: {"method": "dense"}}))
    raw["model"] = {}
    with pytest.raises(PlanError, match=r"decode.layers.1.7: head index out of range: model has 4"):
        load_plan(raw, cfg)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(PlanError, match="plan file not found"):
        load_plan(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prefill: [unclosed")
    with pytest.raises(PlanError, match="not valid YAML") as err:
        load_plan(bad)
    assert "\n" not in str(err.value)          # one line, with where the problem is
    assert "line 1" in str(err.value)


@pytest.mark.parametrize("name", ["dense", "a_shape", "vertical_slash", "block"])
def test_presets_validate_against_config(name):
    cfg = tiny_config("qwen2")
    plan = load_plan(name, cfg)
    assert plan.model.num_attention_heads == 4
    assert plan.prefill.default.kind == name
    assert plan_from_dict(plan.to_dict()).to_dict() == plan.to_dict()
    if name != "dense":
        assert plan.prefill.rule(0, 0).kind == "dense"
    if name in ("a_shape", "block"):
        assert plan.prefill.default.params["dense_tail"] == 128
    if name == "block":      # the estimate that kept multi-value needles on RULER (docs/RESULTS.md)
        assert plan.prefill.default.params["estimator"] == "antidiagonal"


def test_preset_unknown():
    with pytest.raises(PlanError, match="unknown preset"):
        preset("sparse", tiny_config("llama"))


@pytest.mark.parametrize("name,shape", [
    ("smollm2-135m", dict(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576)),
    ("qwen2.5-0.5b", dict(num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, hidden_size=896)),
])
def test_shipped_plans_load_by_name_and_fit_their_model(name, shape):
    """Shipped plans are found by model name, round-trip exactly, record the command that
    wrote them, and validate against their model's shape (and not another's)."""
    import transformers

    config = transformers.LlamaConfig(**shape)
    plan = load_plan(name, config)
    assert plan.profile["command"].startswith((f"sparse-infer profile {name} ", f"sparse-infer calibrate {name} "))
    assert plan_from_dict(plan.to_dict()).to_dict() == plan.to_dict()
    other = transformers.LlamaConfig(**{**shape, "num_hidden_layers": shape["num_hidden_layers"] + 1})
    with pytest.raises(PlanError, match="another model"):
        load_plan(name, other)
    # decode was decided per GQA group: one shared selection per kv head
    assert plan.decode.granularity == "group"
    G = shape["num_attention_heads"] // shape["num_key_value_heads"]
    for layer in range(shape["num_hidden_layers"]):
        rules = [repr(plan.decode.rule(layer, h)) for h in range(shape["num_attention_heads"])]
        assert all(len(set(rules[j:j + G])) == 1 for j in range(0, len(rules), G))


def test_plan_preset_cli_writes_an_editable_plan_and_refuses_bad_input(tmp_path):
    from typer.testing import CliRunner

    from sparse_infer.cli import app
    tiny_config("qwen2").save_pretrained(tmp_path / "m")
    out = tmp_path / "a.yaml"
    args = ["plan", "preset", "a_shape", "--model", str(tmp_path / "m"), "--out", str(out)]
    res = CliRunner().invoke(app, [*args, "--min-seq-len", "1024"])
    assert res.exit_code == 0, res.output
    plan = load_plan(out, tiny_config("qwen2"))
    assert plan.prefill.min_len == 1024 and plan.decode.min_len == 4096
    assert plan.to_dict()["prefill"] == preset("a_shape", tiny_config("qwen2"), min_seq_len=1024).to_dict()["prefill"]
    written = out.read_text()
    res = CliRunner().invoke(app, args)                          # an existing file is never overwritten
    assert res.exit_code == 1 and "exists" in res.output and out.read_text() == written
    res = CliRunner().invoke(app, ["plan", "preset", "hexagon", "--model", str(tmp_path / "m"),
                                   "--out", str(tmp_path / "b.yaml")])
    assert res.exit_code == 1 and "unknown preset" in res.output and not (tmp_path / "b.yaml").exists()
    res = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "c.yaml"), "--min-seq-len", "-5"])
    assert res.exit_code == 1 and "prefill.min_seq_len" in res.output and not (tmp_path / "c.yaml").exists()
