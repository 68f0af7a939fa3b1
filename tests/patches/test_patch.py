"""patch/unpatch on tiny random models of every architecture: full-budget plans equal dense,
unpatch is bit-identical, padding and chunked prefill are exact, bad plans change nothing."""
import copy

import pytest
import torch

import sparse_infer
from sparse_infer.patches import is_patched
from sparse_infer.plan import PlanError
from tests.conftest import ARCHS, tiny_model

FULL_RULES = {
    "a_shape": {"pattern": "a_shape", "sink": 64, "local": 100000},
    "vertical_slash": {"pattern": "vertical_slash", "vertical": 100000, "slash": 100000, "last_q": 16},
    "block": {"pattern": "block", "top_k": 100000},
    # narrow patterns whose dense tail covers every row
    "a_shape_tail": {"pattern": "a_shape", "sink": 32, "local": 32, "dense_tail": 100000},
    "block_tail": {"pattern": "block", "top_k": 1, "dense_tail": 100000},
}


def full_plan(model, rule, mixed=True):
    cfg = model.config
    layers = {1: {0: {"pattern": "dense"}, 3: copy.deepcopy(FULL_RULES["a_shape"])}} if mixed else {}
    return {
        "sparse_infer_plan": 1,
        "model": {"num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads},
        "prefill": {"min_seq_len": 0, "block_size": 32, "default": copy.deepcopy(rule), "layers": layers},
        "decode": {"min_kv_len": 0, "default": {"method": "dense"}},
    }


def _ids(b=1, n=150, seed=0):
    return torch.randint(3, 128, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request):
    return request.param, tiny_model(request.param)


@pytest.mark.parametrize("pattern", list(FULL_RULES))
def test_full_budget_equals_dense(arch_model, pattern):
    arch, model = arch_model
    ids = _ids()
    with torch.no_grad():
        dense = model(ids).logits
        sparse_infer.patch(model, full_plan(model, FULL_RULES[pattern]))
        try:
            stats_before = sparse_infer.get_stats(model)["layers"][0]["sparse_prefill_calls"]
            sparse = model(ids).logits
            assert sparse_infer.get_stats(model)["layers"][0]["sparse_prefill_calls"] == stats_before + 1
        finally:
            sparse_infer.unpatch(model)
        again = model(ids).logits
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    assert torch.equal(again, dense), "unpatch must restore bit-identical logits"


def test_batch_left_padding_equals_dense(arch_model):
    arch, model = arch_model
    ids = _ids(2, 140, seed=1)
    attn = torch.ones_like(ids)
    attn[1, :29] = 0
    ids[1, :29] = 0
    with torch.no_grad():
        dense = model(ids, attention_mask=attn).logits
        sparse_infer.patch(model, full_plan(model, FULL_RULES["vertical_slash"]))
        try:
            sparse = model(ids, attention_mask=attn).logits
        finally:
            sparse_infer.unpatch(model)
    valid = attn.bool()
    torch.testing.assert_close(sparse[valid], dense[valid], atol=1e-5, rtol=1e-5)


def test_chunked_prefill_equals_dense():
    from transformers import DynamicCache

    model = tiny_model("qwen2")
    ids = _ids(1, 200, seed=2)
    with torch.no_grad():
        dense = model(ids).logits
        sparse_infer.patch(model, full_plan(model, FULL_RULES["block"]))
        try:
            cache = DynamicCache(config=model.config)
            first = model(ids[:, :120], cache=cache, use_cache=True).logits
            second = model(ids[:, 120:], cache=cache, use_cache=True).logits
        finally:
            sparse_infer.unpatch(model)
    torch.testing.assert_close(torch.cat([first, second], 1), dense, atol=1e-5, rtol=1e-5)


def test_generate_matches_dense_and_short_prompts_stay_dense():
    model = tiny_model("llama")
    ids = _ids(1, 120, seed=3)
    with torch.no_grad():
        dense = model.generate(ids, max_new_tokens=8, do_sample=False)
        plan = full_plan(model, FULL_RULES["a_shape"])
        sparse_infer.patch(model, plan)
        sparse = model.generate(ids, max_new_tokens=8, do_sample=False)
        sparse_infer.unpatch(model)
        plan["prefill"]["min_seq_len"] = 1000             # shorter prompts run the original implementation
        plan["prefill"]["default"] = {"pattern": "a_shape", "sink": 32, "local": 32}
        sparse_infer.patch(model, plan)
        short_logits = model(ids).logits
        assert sparse_infer.get_stats(model)["layers"][0]["sparse_prefill_calls"] == 0
        sparse_infer.unpatch(model)
        assert torch.equal(short_logits, model(ids).logits)
    assert torch.equal(sparse, dense)


def _dense_and_planned(model, ids, plan):
    """(dense logits, logits under the plan, measured prefill density); leaves the model unpatched."""
    with torch.no_grad():
        dense = model(ids).logits
        sparse_infer.patch(model, plan)
        planned = model(ids).logits
        density = sparse_infer.get_stats(model)["prefill_density"]
        sparse_infer.unpatch(model)
    return dense, planned, density


def test_sparse_budget_changes_output_but_stays_close():
    model = tiny_model("llama")
    ids = _ids(1, 256, seed=4)
    plan = full_plan(model, {"pattern": "a_shape", "sink": 32, "local": 64}, mixed=False)
    dense, sparse, density = _dense_and_planned(model, ids, plan)
    assert 0.2 < density < 0.8
    assert not torch.allclose(sparse, dense, atol=1e-5)   # the sparse path really ran


@pytest.mark.parametrize("granularity", ["group", "head"])
def test_heads_denser_than_dense_above_run_dense(granularity):
    # heads 0-1 (kv group 0) get a wide window (dense index), heads 2-3 a narrow one
    model = tiny_model("llama")
    ids = _ids(1, 512, seed=6)
    wide = {"pattern": "a_shape", "sink": 32, "local": 224}
    narrow = {"pattern": "a_shape", "sink": 32, "local": 32}

    def plan(first_two):
        p = full_plan(model, narrow, mixed=False)
        p["prefill"]["granularity"] = granularity
        p["prefill"]["layers"] = {layer: {0: first_two, 1: first_two} for layer in range(2)}
        return p

    with torch.no_grad():
        sparse_infer.patch(model, plan({"pattern": "dense"}), dense_above=1.0)
        reference = model(ids).logits
        sparse_infer.unpatch(model)
        sparse_infer.patch(model, plan(wide), dense_above=1.0)
        planned = model(ids).logits
        planned_density = sparse_infer.get_stats(model)["prefill_density"]
        sparse_infer.unpatch(model)
        sparse_infer.patch(model, plan(wide), dense_above=0.6)
        switched = model(ids).logits
        stats = sparse_infer.get_stats(model)
        sparse_infer.unpatch(model)
    assert not torch.allclose(planned, reference, atol=1e-5)   # the wide heads are not dense by themselves
    torch.testing.assert_close(switched, reference, atol=1e-6, rtol=1e-6)
    # dense heads count as computing every causal pair
    assert stats["prefill_density"] > planned_density
    assert stats["layers"][0]["sparse_prefill_calls"] == 1


@pytest.mark.parametrize("granularity", ["group", "head"])
def test_auto_dense_above_uses_the_threshold_of_the_index_kind(monkeypatch, granularity):
    # only indices shared by a GQA group switch when only the group threshold is below their density
    from sparse_infer.kernels import registry

    model = tiny_model("llama")
    ids = _ids(1, 512, seed=6)
    p = full_plan(model, {"pattern": "a_shape", "sink": 32, "local": 224}, mixed=False)
    p["prefill"]["granularity"] = granularity
    monkeypatch.setitem(registry.DENSE_ABOVE, "torch", {"head": 1.0, "group": 0.6, "decode": 1.0})
    dense, out, density = _dense_and_planned(model, ids, p)
    if granularity == "group":
        assert density == 1.0
        torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    else:
        assert density < 0.9
        assert not torch.allclose(out, dense, atol=1e-5)


@pytest.mark.parametrize("bad", [0, 1.5, "often", -0.2])
def test_bad_dense_above_changes_nothing(bad):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="dense_above"):
        sparse_infer.patch(model, full_plan(model, FULL_RULES["a_shape"]), dense_above=bad)
    assert not is_patched(model) and model.config._attn_implementation == "sdpa"


def test_auto_dense_above_follows_the_executor(monkeypatch):
    from sparse_infer.kernels import registry
    from sparse_infer.kernels.dispatch import resolve_dense_above

    measured = {"head": 0.35, "group": 0.75, "decode": 0.3}
    monkeypatch.setitem(registry.DENSE_ABOVE, "torch", measured)
    cpu = torch.zeros(1)                                  # a CPU tensor: "auto" means the torch executor
    assert resolve_dense_above("auto", "torch", cpu) == measured
    assert resolve_dense_above("auto", "auto", cpu) == measured
    assert resolve_dense_above("auto", "triton", cpu) == registry.DENSE_ABOVE["triton"]
    assert resolve_dense_above(0.5, "torch", cpu) == {"head": 0.5, "group": 0.5, "decode": 0.5}


def test_patch_is_idempotent_and_unpatch_restores_implementation():
    model = tiny_model("gemma2")
    assert model.config._attn_implementation == "eager"
    plan = full_plan(model, FULL_RULES["a_shape"])
    sparse_infer.patch(model, plan)
    sparse_infer.patch(model, plan)
    assert model.config._attn_implementation == "sparse_infer" and is_patched(model)
    sparse_infer.unpatch(model)
    sparse_infer.unpatch(model)
    assert model.config._attn_implementation == "eager" and not is_patched(model)


def _new_object_at(address, cls):
    """A new, uninitialised `cls` object at a given (freed) address: CPython hands a freed block
    back to a later allocation of the same size, so allocate until it does."""
    held = []
    for _ in range(200_000):
        obj = cls.__new__(cls)
        if id(obj) == address:
            return obj
        held.append(obj)       # kept until the end so that each try takes a different block
    pytest.skip("the allocator did not hand the freed address back")


def test_a_new_model_reusing_a_dead_models_id_is_not_patched():
    import gc

    template = tiny_model("llama")                       # built first: its allocations are done
    patched = tiny_model("gemma2")                        # eager before patching
    sparse_infer.patch(patched, full_plan(patched, FULL_RULES["a_shape"]))
    address = id(patched)
    del patched
    gc.collect()
    model = _new_object_at(address, type(template))       # same id as the dead patched model
    model.__dict__.update(template.__dict__)              # ... and a working sdpa model
    assert model.config._attn_implementation == "sdpa"
    assert not is_patched(model)
    sparse_infer.unpatch(model)                           # not patched: a no-op, as for any model
    assert model.config._attn_implementation == "sdpa" and not is_patched(model)
    sparse_infer.patch(model, full_plan(model, FULL_RULES["a_shape"]))
    sparse_infer.unpatch(model)
    assert model.config._attn_implementation == "sdpa"    # its own previous implementation, not eager


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p["prefill"]["default"].update(pattern="zigzag"), "prefill.default.pattern: unknown pattern"),
    (lambda p: p["model"].update(num_hidden_layers=30), "model.num_hidden_layers: plan is for 30"),
    (lambda p: p["prefill"]["default"].update(vertical=0), "prefill.default.vertical: budget must be a positive"),
])
def test_bad_plan_changes_nothing(mutate, message):
    model = tiny_model("llama")
    plan = full_plan(model, FULL_RULES["vertical_slash"])
    mutate(plan)
    with pytest.raises(PlanError, match=message):
        sparse_infer.patch(model, plan)
    assert model.config._attn_implementation == "sdpa" and not is_patched(model)
    with pytest.raises(PlanError, match="plan file not found"):
        sparse_infer.patch(model, "/nonexistent/plan.yaml")
    assert model.config._attn_implementation == "sdpa"


def test_device_map_auto(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_model("qwen2").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="auto", dtype=torch.float32).eval()
    ids = _ids(1, 130, seed=5)
    with torch.no_grad():
        dense = model(ids).logits
        sparse_infer.patch(model, full_plan(model, FULL_RULES["vertical_slash"]))
        sparse = model(ids).logits
        sparse_infer.unpatch(model)
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
