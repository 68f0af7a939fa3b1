"""AppendCache: the same generations as DynamicCache (dense and with every decode method),
K/V written in place (no copy of the whole cache per step), and the gather executor
reading its strided prefix views exactly like contiguous tensors."""
import pytest
import torch
from transformers import DynamicCache

import sparse_infer
from sparse_infer.cache import AppendCache, AppendLayer
from sparse_infer.kernels.sparse_decode import sparse_decode_torch
from tests.conftest import tiny_model
from tests.decode.test_generate import SPARSE, assert_same, ids_of, plan_for

NEW = 6


def generate_with(model, ids, cache, attention_mask=None):
    with torch.no_grad():
        return model.generate(ids, attention_mask=attention_mask, cache=cache, max_new_tokens=NEW,
                              min_new_tokens=NEW, do_sample=False, output_scores=True,
                              return_dict_in_generate=True)


@pytest.fixture(scope="module", params=["llama", "gemma3"])   # gemma3 mixes sliding-window layers
def model(request):
    return tiny_model(request.param)


def test_dense_generation_equals_dynamic_cache(model):
    ids = ids_of(2, 40, seed=1)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0                                    # left padding in row 1
    ref = generate_with(model, ids, DynamicCache(config=model.config), mask)
    got = generate_with(model, ids, AppendCache(config=model.config), mask)
    assert torch.equal(ref.sequences, got.sequences)
    for a, b in zip(ref.scores, got.scores):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", list(SPARSE))
def test_sparse_decode_equals_dynamic_cache(model, method):
    """A patched model reading the strided views gives what it gives on DynamicCache's tensors."""
    ids = ids_of(1, 60, seed=2)
    sparse_infer.patch(model, plan_for(SPARSE[method]))
    try:
        ref = generate_with(model, ids, DynamicCache(config=model.config))
        got = generate_with(model, ids, AppendCache(config=model.config))
        stats = sparse_infer.get_stats(model)
    finally:
        sparse_infer.unpatch(model)
    assert stats["decode_density"] < 1.0              # the sparse path really ran
    assert_same(ref, got)


def test_update_writes_in_place_and_crop_keeps_working():
    cache = AppendCache()
    layer_keys = []
    k0 = torch.randn(1, 2, 10, 4)
    keys, values = cache.update(k0, k0 + 1, 0)
    store = cache.layers[0]._key_store
    assert isinstance(cache.layers[0], AppendLayer)
    for step in range(5):
        k = torch.randn(1, 2, 1, 4)
        keys, values = cache.update(k, k + 1, 0)
        layer_keys.append(k)
        assert keys.data_ptr() == store.data_ptr()     # a view of the same buffer: nothing copied
    expect = torch.cat([k0, *layer_keys], dim=2)
    assert torch.equal(keys, expect) and torch.equal(values, expect + 1)
    cache.crop(-3)                                     # drop the last 3 rows, then append again
    k = torch.randn(1, 2, 1, 4)
    keys, _ = cache.update(k, k, 0)
    assert torch.equal(keys, torch.cat([expect[:, :, :-3], k], dim=2))
    assert keys.data_ptr() == store.data_ptr()
    # growing past the capacity re-allocates and keeps every row
    big = torch.randn(1, 2, store.shape[2], 4)
    keys, _ = cache.update(big, big, 0)
    assert torch.equal(keys[:, :, -big.shape[2]:], big) and keys.shape[2] == expect.shape[2] - 2 + big.shape[2]
    assert cache.get_seq_length() == keys.shape[2]


@pytest.mark.parametrize("B,Hq,Hkv,Hi", [(1, 8, 2, 2), (2, 4, 4, 4), (2, 8, 2, 8)])
def test_gather_executor_on_strided_prefix_views(B, Hq, Hkv, Hi):
    g = torch.Generator().manual_seed(0)
    n, cap, D, K = 50, 70, 16, 12
    k_store = torch.randn(B, Hkv, cap, D, generator=g)
    v_store = torch.randn(B, Hkv, cap, D, generator=g)
    key, value = k_store[:, :, :n], v_store[:, :, :n]        # what AppendCache hands to attention
    assert not key.is_contiguous()
    q = torch.randn(B, Hq, 1, D, generator=g)
    idx = torch.randint(0, n, (B, Hi, K), generator=g)
    idx[..., -2:] = -1
    mask = torch.rand(B, 1, 1, n, generator=g) > 0.2
    got = sparse_decode_torch(q, key, value, idx, scaling=0.25, attention_mask=mask)
    ref = sparse_decode_torch(q, key.contiguous(), value.contiguous(), idx, scaling=0.25, attention_mask=mask)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
