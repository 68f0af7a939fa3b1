"""The flex executor (FlexAttention over a BlockMask) vs the torch executor and the dense
reference, fp32 at 1e-5, and the executor registry (backend names, dense break-even).

FlexAttention only runs compiled on CPU: each distinct case compiles once (seconds), so the
cases below each cover several features at once.
"""

import math

import pytest
import torch

import sparse_infer
from sparse_infer.kernels import (
    block_sparse_attention,
    block_sparse_attention_flex,
    block_sparse_attention_torch,
    dense_masked_attention,
    index_to_mask,
    registry,
)
from sparse_infer.kernels.dispatch import resolve_backend, resolve_decode_backend, resolve_dense_above
from sparse_infer.kernels.flex_executor import flex_available
from tests.conftest import tiny_model
from tests.kernels.test_block_sparse_attn import make_index, make_qkv
from tests.patches.test_patch import FULL_RULES, _ids, full_plan

needs_flex = pytest.mark.skipif(not flex_available(), reason="torch has no FlexAttention")


def _left_padding(B, Hm, q_len, n, pads, band=False):
    """bool (B, Hm, q, n): causal over the last q of n keys, batch b left-padded by pads[b]
    (padded queries see nothing); band: each head also loses a different key band."""
    valid = torch.arange(n)[None, :] >= torch.tensor(pads)[:, None]                  # (B, n)
    causal = torch.ones(q_len, n, dtype=torch.bool).tril(n - q_len)
    mask = causal[None] & valid[:, None, :] & valid[:, n - q_len:, None]
    mask = mask.unsqueeze(1).expand(B, Hm, q_len, n).clone()
    if band:
        for h in range(Hm):
            mask[:, h, :, 20 + 3 * h:26 + 3 * h] = False
    return mask


CASES = {
    # GQA 1, index per head, q == n not a multiple of the block, a query block with nothing selected
    "mha_empty_block": dict(B=2, Hq=4, Hkv=4, Hi=4, q=100, n=100, bs=16, cols=0, mask=None, softcap=None,
                            empty=(1,)),
    # GQA 4, index per group, chunked prefill whose first query is inside a block, columns, left padding
    "gqa_group_chunked_columns_padding": dict(B=2, Hq=8, Hkv=2, Hi=2, q=70, n=200, bs=16, cols=20,
                                              mask="shared", softcap=None, empty=()),
    # GQA 4, index per head, chunked prefill, columns, per-head mask, softcap
    "gqa_head_softcap_head_mask": dict(B=1, Hq=8, Hkv=2, Hi=8, q=37, n=140, bs=32, cols=9, mask="per_head",
                                       softcap=5.0, empty=()),
}


@needs_flex
@pytest.mark.parametrize("case", list(CASES))
def test_flex_equals_torch_and_reference(case):
    c = CASES[case]
    B, Hq, q_len, n, D = c["B"], c["Hq"], c["q"], c["n"], 32
    q, k, v = make_qkv(B, Hq, c["Hkv"], q_len, n, D, seed=7)
    index = make_index(B, c["Hi"], q_len, n, c["bs"], n_cols=c["cols"], seed=11, empty_blocks=c["empty"])
    mask = None
    if c["mask"] is not None:
        mask = _left_padding(B, 1 if c["mask"] == "shared" else Hq, q_len, n, [0, 13][:B] if B > 1 else [9],
                             band=c["mask"] == "per_head")
    scaling = 1 / math.sqrt(D)
    kwargs = dict(scaling=scaling, attention_mask=mask, softcap=c["softcap"])
    ref = dense_masked_attention(q, k, v, index_to_mask(index, q_len, n, Hq, mask), scaling, softcap=c["softcap"])
    out = block_sparse_attention_flex(q, k, v, index, **kwargs)
    torch_out = block_sparse_attention_torch(q, k, v, index, **kwargs)
    assert out.shape == (B, Hq, q_len, D) and out.dtype == q.dtype
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, torch_out, atol=1e-5, rtol=1e-5)
    # rows with no selected key (fully padded queries, empty query blocks) are zeros, as in torch
    nothing = ~index_to_mask(index, q_len, n, Hq, mask).any(-1)
    if c["empty"]:
        assert nothing.any()
    if nothing.any():
        assert out[nothing].abs().max() == 0
    # the dispatcher runs the same executor by name
    torch.testing.assert_close(block_sparse_attention(q, k, v, index, backend="flex", **kwargs), out,
                               atol=0, rtol=0)


def test_unknown_backend_lists_the_registered_ones():
    model = tiny_model("llama")
    with pytest.raises(ValueError) as err:
        sparse_infer.patch(model, full_plan(model, FULL_RULES["block"]), backend="cuda_magic")
    for name in ("'auto'", "'torch'", "'cpu'", "'triton'", "'flex'"):
        assert name in str(err.value)
    assert not sparse_infer.patches.is_patched(model)
    q = torch.zeros(1, 1, 4, 8)
    with pytest.raises(ValueError, match="registered backends"):
        resolve_backend("cuda_magic", q)


def test_backends_resolve_per_phase():
    cpu = torch.zeros(1, 2, 1, 8)
    assert set(registry.backends()) == {"torch", "cpu", "triton", "flex"}
    assert resolve_backend("auto", cpu) == "torch"              # flex is the 'auto' choice on CUDA only
    assert resolve_backend("flex", cpu) == "flex"
    assert resolve_backend("cpu", cpu) == "torch"               # decode-only backend: prefill runs 'auto'
    auto_flex_on_cuda = registry.executor("prefill", "flex").auto_on
    assert auto_flex_on_cuda == ("cuda",)
    k = v = torch.zeros(1, 2, 10, 8)
    assert resolve_decode_backend("flex", cpu, k, v) == resolve_decode_backend("auto", cpu, k, v)
    assert resolve_decode_backend("torch", cpu, k, v) == "torch"


def test_dense_above_comes_from_the_registry(monkeypatch):
    monkeypatch.undo()          # the autouse fixture keeps heads sparse; read the shipped table
    measured = {"head": 0.4, "group": {3: 0.6, 7: 0.7}, "decode": 1 / 3}
    assert registry.DENSE_ABOVE["torch"] == measured and registry.DENSE_ABOVE["cpu"] == measured
    assert registry.DENSE_ABOVE["triton"] == registry.DENSE_ABOVE["flex"] == {"head": 1.0, "group": 1.0,
                                                                             "decode": 1.0}
    cpu = torch.zeros(1, 1, 4, 8)
    assert resolve_dense_above("auto", "cpu", cpu, phase="decode") == measured
    assert resolve_dense_above("auto", "flex", cpu) == registry.DENSE_ABOVE["flex"]
    monkeypatch.setitem(registry.DENSE_ABOVE, "flex", {"head": 0.5, "group": 0.6, "decode": 0.7})
    assert resolve_dense_above("auto", "flex", cpu) == {"head": 0.5, "group": 0.6, "decode": 0.7}


def test_group_limit_follows_the_measured_group_sizes():
    measured = {3: 0.6, 7: 0.7}
    assert registry.group_limit(measured, 3) == registry.group_limit(measured, 6) == 0.6
    assert registry.group_limit(measured, 7) == registry.group_limit(measured, 16) == 0.7
    assert registry.group_limit(measured, 2) == 0.6           # below every measured size: the smallest
    assert registry.group_limit(0.8, 5) == 0.8


@pytest.mark.parametrize("table, message", [
    ({"head": 0.4, "group": {1: 0.5}, "decode": 0.3}, "group sizes >= 2"),
    ({"head": 0.4, "group": {3: 1.5}, "decode": 0.3}, r"must be in \(0, 1\]"),
    ({"head": {3: 0.4}, "group": 0.5, "decode": 0.3}, r"only dense_above\['group'\]"),
])
def test_bad_dense_above_tables_are_refused(table, message):
    with pytest.raises(ValueError, match=message):
        registry.register("toy_bad_limits", prefill=dict(target="x:y", devices=("cpu",)), dense_above=table)
    assert "toy_bad_limits" not in registry.DENSE_ABOVE


@needs_flex
@pytest.mark.parametrize("backend", ["flex", "cpu"])
def test_patch_backend_full_budget_equals_dense(backend):
    model = tiny_model("llama")
    ids = _ids(n=150)
    with torch.no_grad():
        dense = model(ids).logits
        sparse_infer.patch(model, full_plan(model, FULL_RULES["vertical_slash"], mixed=False), backend=backend)
        try:
            sparse = model(ids).logits
            assert sparse_infer.get_stats(model)["layers"][0]["sparse_prefill_calls"] == 1
        finally:
            sparse_infer.unpatch(model)
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
