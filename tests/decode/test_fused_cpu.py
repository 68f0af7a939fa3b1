"""The decode methods' C entry points (decode/quest.c, decode/double_sparsity.c,
decode/fingerprint.c, built into the CPU kernel's library) called directly: their argument
checks, Quest's in-place fold of new keys into the page bounds, and the continuity fingerprint's
row compare and keep. tests/decode/test_selectors.py checks the fused steps against the
selectors plus the torch executor."""

import pytest
import torch

from sparse_infer.decode.double_sparsity import double_sparsity_decode_cpu
from sparse_infer.decode.fingerprint import fingerprint_keep, fingerprint_matches
from sparse_infer.decode.quest import page_bounds_from_keys, quest_decode_cpu
from sparse_infer.kernels.cpu_decode import cpu_kernel_available
from tests.kernels.test_sparse_decode import make_case

pytestmark = pytest.mark.skipif(not cpu_kernel_available(), reason="no C compiler: the kernel is not built here")


def test_quest_call_refuses_mismatched_bounds():
    q, k, v, _ = make_case(1, 4, 2, 2, 64, 10)
    kmin = torch.zeros(1, 2, 3, 32)                       # 64 keys in pages of 16 need 4 pages
    with pytest.raises(ValueError, match="page bounds"):
        quest_decode_cpu(q[:, :, 0], k, v, kmin, kmin, page=16, sink=4, local=8, budget=32, scaling=0.2,
                         index_heads=2)
    kmin = torch.zeros(1, 2, 4, 32, dtype=torch.float64)
    with pytest.raises(TypeError, match="dtype"):
        quest_decode_cpu(q[:, :, 0], k, v, kmin, kmin, page=16, sink=4, local=8, budget=32, scaling=0.2,
                         index_heads=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quest_call_folds_new_keys_into_the_bounds(dtype):
    """fold_from: the bounds hold keys [0, fold_from); the call folds in the rest (across page
    starts, several keys at once) and gives the bounds and output of bounds built from all keys."""
    q, k, v, _ = make_case(2, 6, 2, 2, 70, 10, seed=4)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    held, page, n = 37, 16, 70
    full_min, full_max = page_bounds_from_keys(k, page)
    old_min, old_max = page_bounds_from_keys(k[:, :, :held], page)
    pages = -(-n // page)
    # rows past the held pages start as garbage: the fold must write them whole
    kmin = torch.full((2, 2, pages, 32), 7.0, dtype=dtype)
    kmax = torch.full((2, 2, pages, 32), -7.0, dtype=dtype)
    kmin[:, :, : old_min.shape[2]], kmax[:, :, : old_max.shape[2]] = old_min, old_max
    kw = dict(page=page, sink=4, local=8, budget=32, scaling=0.2, index_heads=2)
    out, count = quest_decode_cpu(q[:, :, 0], k, v, kmin, kmax, fold_from=held, **kw)
    assert torch.equal(kmin, full_min) and torch.equal(kmax, full_max)     # min/max pick values: exact
    ref, ref_count = quest_decode_cpu(q[:, :, 0], k, v, full_min, full_max, **kw)
    assert torch.equal(out, ref) and torch.equal(count, ref_count)
    with pytest.raises(ValueError, match="fold_from"):
        quest_decode_cpu(q[:, :, 0], k, v, kmin, kmax, fold_from=n + 1, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fingerprint_rows_compare_and_keep_in_place(dtype):
    key = torch.randn(2, 3, 50, 16, generator=torch.Generator().manual_seed(3)).to(dtype)
    view = key[:, :, :40]                                   # a cache prefix: strided view
    positions = torch.tensor([0, 7, 39])
    stored = view.index_select(2, positions)
    assert fingerprint_matches(view, positions, stored)
    for b, h, p in [(0, 0, 0), (1, 2, 7), (1, 1, 39)]:     # any batch row, head, position
        changed = view.clone()
        changed[b, h, p, 5] += 1
        assert not fingerprint_matches(changed, positions, stored)
    fingerprint_keep(key[:, :, :41], 40, positions, stored, 2)
    assert positions.tolist() == [0, 7, 40] and torch.equal(stored[:, :, 2], key[:, :, 40])
    assert torch.equal(stored[:, :, :2], view.index_select(2, positions[:2]))   # other slots untouched
    assert fingerprint_matches(key[:, :, :41], positions, stored)


def test_double_sparsity_call_refuses_bad_labels_and_channels():
    q, k, v, _ = make_case(1, 4, 2, 2, 64, 10)
    channels = torch.zeros(1, 2, 4, dtype=torch.int64)
    kw = dict(sink=4, local=8, budget=16, scaling=0.2, index_heads=2)
    with pytest.raises(ValueError, match="labels must be"):
        double_sparsity_decode_cpu(q[:, :, 0], k, v, torch.zeros(1, 2, 63, 4), channels, **kw)
    with pytest.raises(ValueError, match="channels must be int64"):
        double_sparsity_decode_cpu(q[:, :, 0], k, v, torch.zeros(1, 2, 64, 4), channels.int(), **kw)
    with pytest.raises(TypeError, match="dtype"):
        double_sparsity_decode_cpu(q[:, :, 0], k, v, torch.zeros(1, 2, 64, 4, dtype=torch.float64), channels, **kw)
    with pytest.raises(ValueError, match="index_heads"):
        double_sparsity_decode_cpu(q[:, :, 0], k, v, torch.zeros(1, 2, 64, 4), channels,
                                   **{**kw, "index_heads": 3})
