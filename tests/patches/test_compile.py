"""torch.compile (fullgraph=False) over a patched model: every prefill pattern and estimator and
every decode method runs, and gives what the same plan gives uncompiled (the sparse paths run
between compiled graphs; only the rest of the model is compiled)."""
import pytest
import torch

import sparse_infer
from tests.conftest import tiny_model
from tests.decode.test_generate import FULL as DECODE_FULL
from tests.patches.test_architecture_matrix import PREFILL_FULL, decode_plan, padded_batch, prefill_plan

# a windowed model (the mask carries the window) with GQA; 160 tokens = whole 32-token blocks,
# the antidiagonal estimator's path without a padding copy
ARCH, LENGTH = "mistral", 160


@pytest.fixture(scope="module")
def model():
    return tiny_model(ARCH)


@pytest.fixture(scope="module")
def compiled(model):
    # one compiled wrapper for every plan: a new plan changes no guard, so the graphs are reused
    torch._dynamo.reset()
    yield torch.compile(model, fullgraph=False)
    torch._dynamo.reset()


@pytest.mark.parametrize("rule", list(PREFILL_FULL))
def test_prefill_under_compile(model, compiled, rule):
    ids, mask = padded_batch("left", LENGTH)
    real = mask.bool()
    with torch.no_grad():
        dense = model(ids, attention_mask=mask).logits
        sparse_infer.patch(model, prefill_plan(PREFILL_FULL[rule]))
        try:
            eager_run = model(ids, attention_mask=mask).logits
            compiled_run = compiled(ids, attention_mask=mask).logits
            stats = sparse_infer.get_stats(model)
        finally:
            sparse_infer.unpatch(model)
    assert all(layer["sparse_prefill_calls"] == 2 for layer in stats["layers"].values())
    torch.testing.assert_close(compiled_run[real], eager_run[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled_run[real], dense[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", list(DECODE_FULL))
def test_decode_under_compile(model, compiled, method):
    from transformers import DynamicCache

    ids, _ = padded_batch("left", 104)
    ids = ids[:1]
    runs = {}
    with torch.no_grad():
        for name, fn in (("dense", model), ("eager", model), ("compiled", compiled)):
            if name == "eager":
                sparse_infer.patch(model, decode_plan(DECODE_FULL[method]))
            cache = DynamicCache(config=model.config)
            fn(ids[:, :100], cache=cache, use_cache=True)
            runs[name] = torch.cat([fn(ids[:, i:i + 1], cache=cache, use_cache=True).logits
                                    for i in range(100, 104)], 1)
        stats = sparse_infer.get_stats(model)
        sparse_infer.unpatch(model)
    assert stats["layers"][0]["sparse_decode_calls"] == 8
    torch.testing.assert_close(runs["compiled"], runs["eager"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(runs["compiled"], runs["dense"], atol=1e-5, rtol=1e-5)
