"""The executor registry's checks: a backend named explicitly that cannot run, or does not
take a call, fails early with an error saying why; 'auto' skips an executor that lacks what
a call needs. Toy executors are registered for a test and removed after it."""

import contextlib
import copy

import pytest
import torch

import sparse_infer
from sparse_infer.kernels import registry
from sparse_infer.kernels.dispatch import block_sparse_attention, sparse_decode
from sparse_infer.kernels.sparse_decode import sparse_decode_torch
from sparse_infer.kernels.torch_executor import block_sparse_attention_torch
from sparse_infer.kernels.triton_executor import triton_available
from tests.conftest import tiny_model
from tests.kernels.test_block_sparse_attn import make_index, make_qkv
from tests.kernels.test_sparse_decode import make_case
from tests.patches.test_patch import FULL_RULES, _ids, full_plan

_NEVER = {"head": 1.0, "group": 1.0, "decode": 1.0}
CALLS = []        # (phase, backend) of every toy executor call


def toy_prefill(*args, **kwargs):
    CALLS.append(("prefill", "toy"))
    return block_sparse_attention_torch(*args, **kwargs)


def toy_decode(*args, **kwargs):
    CALLS.append(("decode", "toy"))
    return sparse_decode_torch(*args, **kwargs)


_HERE = __name__ + ":"


@contextlib.contextmanager
def registered(name="toy", *, prefill=None, decode=None):
    """Backend `name` ahead of every other one in 'auto' order, for the duration of the block."""
    CALLS.clear()
    registry.register(name, prefill=prefill, decode=decode, dense_above=_NEVER, before=registry.backends()[0])
    try:
        yield
    finally:
        registry.unregister(name)


def toy_prefill_spec(**flags):
    return dict(target=_HERE + "toy_prefill", devices=("cpu",), auto_on=("cpu",)) | flags


def toy_decode_spec(**flags):
    return dict(target=_HERE + "toy_decode", devices=("cpu",), auto_on=("cpu",), kv_heads=True) | flags


PREFILL_FEATURES = {
    # feature flag -> (call keyword arguments / index columns that use it, text the error names)
    "columns": (dict(), 5, "column lines"),
    "softcap": (dict(softcap=20.0), 0, "softcap"),
    "masks": ("mask", 0, "attention_mask"),
}


def _prefill_call(feature):
    kwargs, n_cols, _ = PREFILL_FEATURES[feature]
    q, k, v = make_qkv(1, 4, 2, 40, 40, 16, seed=3)
    index = make_index(1, 2, 40, 40, 16, n_cols=n_cols, seed=4)
    if kwargs == "mask":
        kwargs = dict(attention_mask=torch.ones(1, 1, 40, 40, dtype=torch.bool).tril())
    return (q, k, v, index), dict(scaling=0.25, **kwargs)


@pytest.mark.parametrize("feature", list(PREFILL_FEATURES))
def test_prefill_auto_skips_an_executor_lacking_a_feature_and_naming_it_errors(feature):
    args, kwargs = _prefill_call(feature)
    plain_args, plain_kwargs = _prefill_call("softcap" if feature != "softcap" else "masks")
    without_toy = block_sparse_attention(*args, **kwargs)
    with registered(prefill=toy_prefill_spec(**{feature: False})):
        # a call not using the feature: 'auto' picks the toy (first in order)
        block_sparse_attention(*plain_args, **plain_kwargs)
        assert CALLS == [("prefill", "toy")]
        CALLS.clear()
        out = block_sparse_attention(*args, **kwargs)
        assert CALLS == []                                      # skipped: the next in order ran it
        torch.testing.assert_close(out, without_toy, atol=0, rtol=0)
        with pytest.raises(ValueError, match=f"backend 'toy' cannot run this prefill call: .*{PREFILL_FEATURES[feature][2]}"
                                             r".*handles it: .*'torch'"):
            block_sparse_attention(*args, backend="toy", **kwargs)
        assert CALLS == []
    assert "toy" not in registry.backends()


@pytest.mark.parametrize("feature", ["softcap", "masks", "kv_heads"])
def test_decode_auto_skips_an_executor_lacking_a_feature_and_naming_it_errors(feature):
    q, k, v, idx = make_case(2, 4, 2, 2, 60, 12, seed=5)
    kwargs = dict(scaling=0.2)
    if feature == "softcap":
        kwargs["softcap"] = 10.0
    elif feature == "masks":
        kwargs["attention_mask"] = torch.ones(2, 1, 1, 60, dtype=torch.bool)
    else:
        kwargs["kv_heads"] = torch.tensor([1, 0])
    without_toy = sparse_decode(q, k, v, idx, **kwargs)
    with registered(decode=toy_decode_spec(**{feature: False})):
        sparse_decode(q, k, v, idx, scaling=0.2)
        assert CALLS == [("decode", "toy")]
        CALLS.clear()
        out = sparse_decode(q, k, v, idx, **kwargs)
        assert CALLS == []                                      # skipped: the next in order ran it
        torch.testing.assert_close(out, without_toy, atol=0, rtol=0)
        text = {"softcap": "softcap", "masks": "attention_mask", "kv_heads": "kv_heads"}[feature]
        with pytest.raises(ValueError, match=f"backend 'toy' cannot run this decode call: .*{text}"):
            sparse_decode(q, k, v, idx, backend="toy", **kwargs)
        assert CALLS == []


def test_unavailable_backend_fails_in_patch_and_auto_skips_it():
    model = tiny_model("llama")
    before = model.config._attn_implementation
    plan = full_plan(model, FULL_RULES["block"])
    with registered(prefill=toy_prefill_spec(unavailable=lambda: "toylib is not installed")):
        with pytest.raises(registry.BackendUnavailable,
                           match="backend 'toy' cannot run prefill here: toylib is not installed; use backend='auto'"):
            sparse_infer.patch(model, plan, backend="toy")
        assert not sparse_infer.is_patched(model) and model.config._attn_implementation == before
        # the same at run time, for a dispatcher call naming it
        args, kwargs = _prefill_call("softcap")
        with pytest.raises(registry.BackendUnavailable, match="toylib is not installed"):
            block_sparse_attention(*args, backend="toy", **kwargs)
        # 'auto' runs past it
        ids = _ids(n=100)
        with torch.no_grad():
            dense = model(ids).logits
            sparse_infer.patch(model, plan)
            try:
                sparse = model(ids).logits
            finally:
                sparse_infer.unpatch(model)
        assert CALLS == []
        torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)


def test_patched_model_names_the_feature_a_named_backend_lacks():
    # a vertical_slash plan's indices have columns: the toy takes the plan's other calls only
    model = tiny_model("llama")
    plan = full_plan(model, FULL_RULES["vertical_slash"], mixed=False)
    with registered(prefill=toy_prefill_spec(columns=False)):
        sparse_infer.patch(model, plan, backend="toy")
        try:
            with pytest.raises(ValueError, match="backend 'toy' cannot run this prefill call: .*column lines"):
                with torch.no_grad():
                    model(_ids(n=100))
        finally:
            sparse_infer.unpatch(model)
        sparse_infer.patch(model, full_plan(model, FULL_RULES["block"], mixed=False), backend="toy")
        try:
            with torch.no_grad():
                model(_ids(n=100))
        finally:
            sparse_infer.unpatch(model)
        assert CALLS and set(CALLS) == {("prefill", "toy")}


def test_named_backend_wrong_device_or_dtype_is_a_clear_error():
    q, k, v, idx = make_case(1, 4, 2, 2, 30, 8)
    with pytest.raises(TypeError, match="backend 'cpu' cannot run this decode call: it does not take torch.float64"):
        sparse_decode(q.double(), k.double(), v.double(), idx, scaling=0.2, backend="cpu")
    with registered(decode=toy_decode_spec(devices=("cuda",), auto_on=("cuda",))):
        with pytest.raises(ValueError, match="backend 'toy' cannot run this decode call: it does not run on cpu "
                                             r"tensors \(it takes cuda\)"):
            sparse_decode(q, k, v, idx, scaling=0.2, backend="toy")
        sparse_decode(q, k, v, idx, scaling=0.2)          # 'auto' does not offer it CPU tensors
        assert CALLS == []


@pytest.mark.skipif(not registry.executor("decode", "cpu").takes(torch.zeros(1, 1, 1, 8)),
                    reason="no C compiler: the kernel is not built here")
def test_named_cpu_backend_refuses_strided_rows_with_the_reason():
    q, k, v, idx = make_case(1, 4, 2, 2, 30, 8)
    strided = k.transpose(2, 3).contiguous().transpose(2, 3)
    with pytest.raises(ValueError, match="backend 'cpu' cannot run this decode call: .*contiguous"):
        sparse_decode(q, strided, v, idx, scaling=0.2, backend="cpu")
    assert registry.resolve("decode", "auto", q, strided, v).name == "torch"


def test_triton_missing_fails_in_patch(monkeypatch):
    from sparse_infer.kernels import triton_executor

    monkeypatch.setattr(triton_executor, "tl", None)            # as if triton did not import
    model = tiny_model("llama")
    with pytest.raises(registry.BackendUnavailable, match="backend 'triton' cannot run prefill here: triton is not "
                                                          "installed"):
        sparse_infer.patch(model, full_plan(model, FULL_RULES["block"]), backend="triton")
    assert not sparse_infer.is_patched(model)
    q, k, v = make_qkv(1, 2, 2, 20, 20, 8)
    # 'auto' never needed it on the CPU; on CUDA it would have skipped it
    assert registry.resolve("prefill", "auto", q).name == "torch"


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_on_cpu_without_the_interpreter_is_refused_by_name(monkeypatch):
    from sparse_infer.kernels import triton_executor

    monkeypatch.setattr(triton_executor, "is_interpreted", lambda kernel: False)
    args, kwargs = _prefill_call("softcap")
    with pytest.raises(ValueError, match="backend 'triton' cannot run this prefill call: .*TRITON_INTERPRET=1"):
        block_sparse_attention(*args, backend="triton", **kwargs)


def test_register_checks_before_changing_anything():
    names = registry.backends()
    table = copy.deepcopy(registry.DENSE_ABOVE)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("torch", prefill=toy_prefill_spec(), dense_above=_NEVER)
    with pytest.raises(TypeError):               # the prefill spec is fine, the decode one is not
        registry.register("toy", prefill=toy_prefill_spec(), decode=dict(no_such_field=1), dense_above=_NEVER)
    with pytest.raises(ValueError, match="not a registered backend"):
        registry.register("toy", prefill=toy_prefill_spec(), dense_above=_NEVER, before="nope")
    assert registry.backends() == names and registry.DENSE_ABOVE == table
    assert registry.executor("prefill", "toy") is None
    with pytest.raises(ValueError, match="unknown backend 'toy'"):
        registry.unregister("toy")
    with pytest.raises(ValueError, match="unknown features"):
        registry.needs(colums=True)


def test_auto_with_nothing_that_takes_the_call_says_why():
    q, k, v, idx = make_case(1, 4, 2, 2, 30, 8)
    with pytest.raises(RuntimeError, match=r"no decode executor takes this call \(cpu torch.int64 tensors\): "
                                           r".*'torch': it does not take torch.int64"):
        registry.resolve("decode", "auto", q.long(), k.long(), v.long())


def test_decode_in_a_model_keeps_to_what_the_auto_choice_takes():
    # the toy (first in 'auto' order) takes no kv_heads and no masks: a layer mixing methods is
    # attended part by part rather than in one kv_heads call, and padded steps go to the next
    # executor in order; the tokens and scores equal the torch executor's
    from tests.decode.test_generate import SPARSE, assert_same, generate, ids_of

    model = tiny_model("llama")
    rules = {0: SPARSE["token_select"], 1: SPARSE["token_select"], 2: SPARSE["streaming"],
             3: SPARSE["streaming"]}
    plan = {"sparse_infer_plan": 1, "prefill": {"min_seq_len": 100000},
            "decode": {"min_kv_len": 0, "default": SPARSE["streaming"],
                       "layers": {layer: copy.deepcopy(rules) for layer in range(2)}}}
    ids = ids_of(1, 90, seed=4)
    padded = ids_of(2, 90, seed=5)
    mask = torch.ones_like(padded)
    mask[1, :9] = 0
    sparse_infer.patch(model, plan, backend="torch")
    reference, reference_padded = generate(model, ids), generate(model, padded, mask)
    sparse_infer.unpatch(model)
    with registered(decode=toy_decode_spec(kv_heads=False, masks=False)):
        sparse_infer.patch(model, plan)
        try:
            out = generate(model, ids)
            assert CALLS and set(CALLS) == {("decode", "toy")}
            CALLS.clear()
            out_padded = generate(model, padded, mask)
            assert CALLS == []
        finally:
            sparse_infer.unpatch(model)
    assert_same(out, reference)
    assert_same(out_padded, reference_padded)
