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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_label_rows_written_by_the_call_are_quantize_keys_bits(dtype):
    """token_select's int8 scoring: the C call writes the code rows [fold_from, n) and their
    scales with the bits quantize_keys computes (a zero key included), and leaves the rows
    before fold_from alone."""
    from sparse_infer.decode.token_select import quantize_keys

    q, k, v, _ = make_case(2, 8, 2, 2, 64, 10, D=64, dtype=dtype)
    k[1, 0, 50] = 0                                          # a zero key: codes and scale 0
    codes, scales = quantize_keys(k)
    written = torch.full_like(codes, 99)
    written[:, :, :40] = codes[:, :, :40]
    written_scales = torch.full_like(scales[..., 0], -1.0)
    written_scales[:, :, :40] = scales[:, :, :40, 0]
    channels = torch.arange(64).expand(2, 2, 64).contiguous()
    double_sparsity_decode_cpu(q[:, :, 0], k, v, written, channels, sink=4, local=8, budget=16, scaling=0.125,
                               index_heads=2, fold_from=40, scales=written_scales)
    assert torch.equal(written, codes)
    assert torch.equal(written_scales, scales[..., 0])
    assert torch.equal(codes[1, 0, 50], torch.zeros(64, dtype=torch.int8)) and scales[1, 0, 50, 0] == 0


def test_int8_scores_are_the_exact_products_of_the_codes():
    """int8_scores: the integer dot products of the query's and the keys' codes are exact in fp32
    (checked against int64 arithmetic), then scaled by both scales."""
    from sparse_infer.decode.token_select import int8_scores, quantize_keys

    g = torch.Generator().manual_seed(3)
    query, key = torch.randn(2, 8, 128, generator=g) * 5, torch.randn(2, 2, 300, 128, generator=g) * 5
    codes, scales = quantize_keys(key)
    got = int8_scores(query, codes, scales, 0.1, None)                        # (2, 2, 4, 300)
    q8, q_scale = quantize_keys((query * 0.1).view(2, 2, 4, 128))
    exact = torch.matmul(q8.long(), codes.long().transpose(-1, -2))           # integers, no rounding
    assert torch.equal(got, exact.float() * q_scale * scales.transpose(-1, -2))
    # and close to the fp32 q.k they stand for: errors within 5% of the scores' spread
    reference = (query * 0.1).view(2, 2, 4, 128) @ key.transpose(-1, -2)
    assert (got - reference).abs().max() <= 0.05 * reference.std()
    # the fp32 product of the codes, used where torch._int_mm is missing or inexact, gives the same bits
    import sparse_infer.decode.token_select as token_select
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(token_select, "_INT_MM_EXACT", False)
        assert torch.equal(int8_scores(query, codes, scales, 0.1, None), got)


def test_int8_scores_stay_exact_where_onednn_saturates_int8_products():
    """Without VNNI, oneDNN's int8 GEMM saturates 16-bit pair sums; the probe must then keep
    torch._int_mm out. Run where oneDNN is limited to AVX2 (a fresh process: the limit is read once)."""
    import os
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from sparse_infer.decode.token_select import int8_scores, quantize_keys, _int_mm_is_exact\n"
        "g = torch.Generator().manual_seed(3)\n"
        "query, key = torch.randn(2, 8, 64, generator=g) * 5, torch.randn(2, 2, 300, 64, generator=g) * 5\n"
        "codes, scales = quantize_keys(key)\n"
        "got = int8_scores(query, codes, scales, 0.1, None)\n"
        "q8, q_scale = quantize_keys((query * 0.1).view(2, 2, 4, 64))\n"
        "exact = torch.matmul(q8.long(), codes.long().transpose(-1, -2)).float() * q_scale * scales.transpose(-1, -2)\n"
        "print(_int_mm_is_exact(), torch.equal(got, exact))\n")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[-1] == "True", res.stdout


def test_int8_call_refuses_bad_scales():
    q, k, v, _ = make_case(1, 4, 2, 2, 64, 10, D=64)
    channels = torch.arange(64).expand(1, 2, 64).contiguous()
    kw = dict(sink=4, local=8, budget=16, scaling=0.2, index_heads=2)
    codes = torch.zeros(1, 2, 64, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match="scales must be float32"):
        double_sparsity_decode_cpu(q[:, :, 0], k, v, codes, channels, scales=torch.zeros(1, 2, 63), **kw)
    with pytest.raises(ValueError, match="int8 labels"):
        double_sparsity_decode_cpu(q[:, :, 0], k, v, codes.float(), channels, scales=torch.zeros(1, 2, 64), **kw)


@pytest.mark.parametrize("scales", [False, True])
def test_tied_scores_choose_the_lowest_positions(scales):
    """The kernel's top-k (radix selection) breaks ties at the threshold by position: with every
    key equal, the `budget` chosen are the first eligible ones, whose V rows the output averages."""
    from sparse_infer.decode.token_select import quantize_keys

    g = torch.Generator().manual_seed(5)
    B, h, hk, n, D = 1, 4, 2, 300, 64
    q = torch.randn(B, h, D, generator=g)
    k = torch.randn(1, 1, 1, D, generator=g).expand(B, hk, n, D).contiguous()
    v = torch.randn(B, hk, n, D, generator=g)
    channels = torch.arange(D).expand(B, hk, D).contiguous()
    kw = dict(sink=3, local=5, budget=10, scaling=0.125, index_heads=hk, fold_from=n)
    if scales:
        codes, key_scales = quantize_keys(k)
        out, read = double_sparsity_decode_cpu(q, k, v, codes, channels, scales=key_scales[..., 0], **kw)
    else:
        out, read = double_sparsity_decode_cpu(q, k, v, k, channels, **kw)
    chosen = list(range(3 + 10)) + list(range(n - 5, n))       # sinks, the first 10 eligible, the window
    expected = v[:, :, chosen].mean(2).repeat_interleave(h // hk, dim=1)
    torch.testing.assert_close(out[:, :, 0], expected, atol=1e-5, rtol=1e-5)
    assert read.tolist() == [[18, 18]]
