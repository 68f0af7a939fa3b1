"""The C decode kernel (sparse_infer/kernels/cpu_decode.c) vs the dense masked reference and
the torch executor: same contract, rows read in place. Also the build's trust rules and its key
(tests/decode/test_fused_cpu.py calls the methods' C entry points of the same library)."""

import hashlib
import math
import os
import re
import stat
from pathlib import Path

import pytest
import torch

import sparse_infer
import sparse_infer.kernels.cpu_decode as cpu_decode
from sparse_infer.kernels import dense_decode_reference, sparse_decode, sparse_decode_torch
from sparse_infer.kernels.cpu_decode import cpu_kernel_available, sparse_decode_cpu
from sparse_infer.kernels.registry import BackendUnavailable
from tests.conftest import tiny_model
from tests.kernels.test_sparse_decode import CASES, make_case

pytestmark = pytest.mark.skipif(not cpu_kernel_available(), reason="no C compiler: the kernel is not built here")


@pytest.mark.parametrize("case", CASES)
def test_matches_dense(case):
    B, Hq, Hkv, which, n, K, softcap = case
    Hi = Hkv if which == "kv" else Hq
    q, k, v, idx = make_case(B, Hq, Hkv, Hi, n, K, seed=n)
    scaling = 1 / math.sqrt(q.shape[-1])
    ref = dense_decode_reference(q, k, v, idx, scaling=scaling, softcap=softcap)
    out = sparse_decode_cpu(q, k, v, idx, scaling=scaling, softcap=softcap)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("D", [64, 128, 80])
def test_real_head_dims_at_long_cache(D):
    # Qwen2.5-0.5B's layout (14 query / 2 kv heads) at a 16K cache, a ~2K selection per group;
    # 80 is not a multiple of the vector width
    q, k, v, idx = make_case(1, 14, 2, 2, 16384, 2300, D=D, n_unused=100, seed=D)
    ref = dense_decode_reference(q, k, v, idx, scaling=D ** -0.5)
    out = sparse_decode_cpu(q, k, v, idx, scaling=D ** -0.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("per_head", [False, True])
def test_padding_mask(per_head):
    B, Hq, Hkv, n, K = 2, 8, 2, 120, 50
    q, k, v, idx = make_case(B, Hq, Hkv, Hkv, n, K, seed=1)
    mask = torch.ones(B, 1, 1, n, dtype=torch.bool)
    mask[1, ..., :30] = False
    if per_head:
        mask = mask.expand(B, Hq, 1, n).clone()
        mask[:, 3, 0, 60:90] = False
    ref = dense_decode_reference(q, k, v, idx, scaling=0.2, attention_mask=mask)
    torch.testing.assert_close(sparse_decode_cpu(q, k, v, idx, scaling=0.2, attention_mask=mask), ref,
                               atol=1e-5, rtol=1e-5)


def test_explicit_cache_heads_shared_and_per_head_rows():
    B, Hkv, n, K = 2, 3, 150, 40
    kv_heads = torch.tensor([2, 0, 0, 1, 2])
    q, k, v, idx = make_case(B, kv_heads.numel(), Hkv, kv_heads.numel(), n, K, seed=7)
    ref = dense_decode_reference(q, k[:, kv_heads], v[:, kv_heads], idx, scaling=0.2)
    torch.testing.assert_close(sparse_decode_cpu(q, k, v, idx, scaling=0.2, kv_heads=kv_heads), ref,
                               atol=1e-5, rtol=1e-5)
    g, kv_heads = 3, torch.tensor([1, 0, 1])            # rows shared by 3 query heads each
    q, k, v, idx = make_case(B, g * 3, 2, 3, n, K, seed=11)
    mask = torch.ones(B, g * 3, 1, n, dtype=torch.bool)
    mask[0, 4, ..., :50] = False
    ref = dense_decode_reference(q, k[:, kv_heads], v[:, kv_heads], idx, scaling=0.2, attention_mask=mask)
    out = sparse_decode_cpu(q, k, v, idx, scaling=0.2, attention_mask=mask, kv_heads=kv_heads)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="kv_heads"):
        sparse_decode_cpu(q, k, v, idx, scaling=0.2, kv_heads=torch.tensor([0, 1, 2]))


def test_strided_cache_views_empty_rows_and_out_of_range_slots():
    B, Hq, Hkv, n, K = 2, 4, 2, 64, 16
    q, k, v, idx = make_case(B, Hq, Hkv, Hkv, n, K, n_unused=0, seed=2)
    idx[1, 0] = -1                                       # group 0 of batch 1 selects nothing -> zeros
    idx[0, 1, :3] = torch.tensor([n, n + 5, -7])         # slots outside [0, n) are unused
    big_k, big_v = torch.randn(B, Hkv, n + 20, 32), torch.randn(B, Hkv, n + 20, 32)
    k_view, v_view = big_k[:, :, :n], big_v[:, :, :n]    # the prefix views AppendCache hands out
    assert not k_view.is_contiguous()
    ref = dense_decode_reference(q, k_view, v_view, idx, scaling=0.2)
    out = sparse_decode_cpu(q, k_view, v_view, idx, scaling=0.2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert out[1, :2].abs().max() == 0
    assert torch.equal(sparse_decode_cpu(q, k, v, idx[..., :0], scaling=0.2), torch.zeros_like(q))


def test_same_result_as_torch_executor_with_duplicate_slots():
    # the contract does not forbid a position listed twice; both executors then count it twice
    q, k, v, idx = make_case(1, 8, 2, 2, 100, 30, n_unused=0, seed=5)
    idx[..., 10:20] = idx[..., :10]
    torch.testing.assert_close(sparse_decode_cpu(q, k, v, idx, scaling=0.3),
                               sparse_decode_torch(q, k, v, idx, scaling=0.3), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_dtypes(dtype, atol):
    # fp32 math, output rounded once to the input dtype, as the torch executor does
    q, k, v, idx = make_case(1, 8, 2, 2, 300, 90, dtype=dtype, seed=3)
    ref = dense_decode_reference(q, k, v, idx, scaling=0.2)
    out = sparse_decode_cpu(q, k, v, idx, scaling=0.2)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=0)


def test_bad_input_is_refused():
    q, k, v, idx = make_case(1, 4, 2, 2, 50, 10)
    with pytest.raises(TypeError, match="dtype"):
        sparse_decode_cpu(q, k.double(), v.double(), idx, scaling=0.2)
    with pytest.raises(ValueError, match="contiguous"):
        sparse_decode_cpu(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, idx, scaling=0.2)
    with pytest.raises(ValueError, match="head dims"):
        q2, k2, v2, idx2 = make_case(1, 2, 1, 1, 20, 5, D=1040)
        sparse_decode_cpu(q2, k2, v2, idx2, scaling=0.2)


def test_dispatch_auto_picks_the_c_kernel_on_cpu_and_falls_back(monkeypatch):
    q, k, v, idx = make_case(1, 4, 2, 2, 50, 10)
    calls = []
    real = cpu_decode.sparse_decode_cpu
    monkeypatch.setattr(cpu_decode, "sparse_decode_cpu", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    auto = sparse_decode(q, k, v, idx, scaling=0.2)
    assert calls == [1]
    torch.testing.assert_close(auto, sparse_decode_torch(q, k, v, idx, scaling=0.2), atol=1e-6, rtol=1e-5)
    sparse_decode(q.double(), k.double(), v.double(), idx, scaling=0.2)     # float64: torch executor
    sparse_decode(q, k, v, idx, scaling=0.2, backend="torch")
    monkeypatch.setenv("SPARSE_INFER_CPU_KERNEL", "0")
    sparse_decode(q, k, v, idx, scaling=0.2)
    assert calls == [1]


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """Forget the loaded library and build into an empty cache of this test's own."""
    _forget_library(monkeypatch)
    monkeypatch.setenv("SPARSE_INFER_CACHE", str(tmp_path))
    return tmp_path


def _forget_library(monkeypatch):
    monkeypatch.setattr(cpu_decode, "_LIB", None)
    monkeypatch.setattr(cpu_decode, "_ERROR", None)
    monkeypatch.setattr(cpu_decode, "_WARNED", False)


def _planted_library(tmp_path, marker):
    """A shared library that, once loaded, creates `marker`: proof that it ran in this process."""
    import subprocess

    source = tmp_path / "planted.c"
    source.write_text('#include <stdio.h>\n'
                      f'__attribute__((constructor)) static void ran(void) {{ fclose(fopen("{marker}", "w")); }}\n'
                      'int sparse_decode_rows(void) { return 0; }\n')
    built = tmp_path / "planted.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(built), str(source)], check=True)
    return built.read_bytes()


def _swap_in(path, data):
    """Replace a file by a new one (a loaded library's own pages must not change under it)."""
    staged = path.with_name(path.name + ".staged")
    staged.write_bytes(data)
    os.replace(staged, path)


def _copy_of_the_build(monkeypatch, built_cache, tmp_path_factory):
    """A copy of a built cache at a path this process has not loaded from (dlopen would hand back
    the library already loaded from a path, whatever is there now), made the cache in use."""
    import shutil

    copy = tmp_path_factory.mktemp("copied") / "cache"
    shutil.copytree(built_cache, copy)
    monkeypatch.setenv("SPARSE_INFER_CACHE", str(copy))
    _forget_library(monkeypatch)
    return copy


def _check_still_correct():
    q, k, v, idx = make_case(1, 8, 2, 2, 200, 40, seed=9)
    torch.testing.assert_close(sparse_decode_cpu(q, k, v, idx, scaling=0.2),
                               dense_decode_reference(q, k, v, idx, scaling=0.2), atol=1e-5, rtol=1e-5)


def test_build_failure_leaves_the_torch_executor_and_warns_once(fresh_kernel, monkeypatch):
    # no compiler: 'auto' keeps working on the torch executor, an explicit 'cpu' says why not
    monkeypatch.setenv("CC", "no-such-compiler-here")
    q, k, v, idx = make_case(1, 4, 2, 2, 50, 10)
    with pytest.warns(RuntimeWarning, match="no-such-compiler-here.*torch executor") as caught:
        assert not cpu_kernel_available()
        torch.testing.assert_close(sparse_decode(q, k, v, idx, scaling=0.2),
                                   sparse_decode_torch(q, k, v, idx, scaling=0.2))
        assert not cpu_kernel_available()
    assert len([w for w in caught if "C decode kernel" in str(w.message)]) == 1
    with pytest.raises(BackendUnavailable, match="backend 'cpu'.*decode.*no-such-compiler-here"):
        sparse_decode(q, k, v, idx, scaling=0.2, backend="cpu")
    # and patch refuses it up front, leaving the model as it was
    model = tiny_model("llama")
    before = model.config._attn_implementation
    with pytest.raises(BackendUnavailable, match="backend 'cpu' cannot run decode here.*no-such-compiler-here"):
        sparse_infer.patch(model, "a_shape", backend="cpu")
    assert not sparse_infer.is_patched(model) and model.config._attn_implementation == before


def test_fresh_build_into_an_empty_cache_dir(fresh_kernel, monkeypatch):
    assert cpu_kernel_available()
    directory = fresh_kernel / f"kernels-{os.getuid()}"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    built = sorted(p.name for p in directory.iterdir())
    # the library and its hash record, no temporary left behind
    assert len(built) == 2 and built[0].endswith(".so") and built[1].endswith(".sha256")
    library = directory / built[0]
    assert (directory / built[1]).read_text().strip() == hashlib.sha256(library.read_bytes()).hexdigest()
    _check_still_correct()
    # a second process loads the verified library without compiling again
    _forget_library(monkeypatch)
    monkeypatch.setattr(cpu_decode, "_compile", lambda *a: pytest.fail("rebuilt a library that verifies"))
    assert cpu_kernel_available()
    _check_still_correct()


def test_planted_library_with_a_wrong_hash_is_not_loaded(fresh_kernel, monkeypatch, tmp_path_factory):
    assert cpu_kernel_available()                     # a good build, its hash recorded
    cache = _copy_of_the_build(monkeypatch, fresh_kernel, tmp_path_factory)
    elsewhere = tmp_path_factory.mktemp("planted")
    marker = elsewhere / "ran"
    planted = _planted_library(elsewhere, marker)
    libraries = list(cache.rglob("cpu_decode_*.so"))
    assert libraries
    for library in libraries:                         # swapped in under the name that is loaded
        _swap_in(library, planted)
    with pytest.warns(RuntimeWarning, match="sha256.*not loading it"):
        assert cpu_kernel_available()                 # rebuilt
    assert not marker.exists(), "the planted library ran"
    _check_still_correct()


def _plant_with_matching_record(directory, planted):
    """Put the planted library where the build was, under a hash record that matches it: only the
    directory's owner and mode can then keep it out."""
    digest = hashlib.sha256(planted).hexdigest()
    for library in directory.glob("cpu_decode_*.so"):
        _swap_in(library, planted)
    for record in directory.glob("cpu_decode_*.sha256"):
        _swap_in(record, (digest + "\n").encode())
        key = record.name.removeprefix("cpu_decode_").removesuffix(".sha256")
        _swap_in(directory / cpu_decode._library_name(key, digest), planted)


@pytest.mark.parametrize("problem", ["group-writable", "another user's"])
def test_kernel_dir_others_could_write_is_refused(fresh_kernel, monkeypatch, tmp_path_factory, problem):
    assert cpu_kernel_available()
    cache = _copy_of_the_build(monkeypatch, fresh_kernel, tmp_path_factory)
    [directory] = cache.glob("kernels*")
    elsewhere = tmp_path_factory.mktemp("planted")
    marker = elsewhere / "ran"
    _plant_with_matching_record(directory, _planted_library(elsewhere, marker))
    if problem == "group-writable":
        os.chmod(directory, 0o770)
        expected = "writable by group or others"
    else:
        other_uid = os.getuid() + 1                   # as if another user had made this user's dir
        directory.rename(cache / f"kernels-{other_uid}")
        monkeypatch.setattr(os, "getuid", lambda: other_uid)
        expected = "owned by uid"
    with pytest.warns(RuntimeWarning, match=expected):
        assert not cpu_kernel_available()
    assert not marker.exists(), "the planted library ran"


KERNEL_FILES = [f"{p.parent.name}/{p.name}" for p in (*cpu_decode.SOURCES, *cpu_decode.HEADERS)]


def _copied_sources(monkeypatch, tmp_path):
    """The library's sources and headers copied into a tree of this test's own (same layout) and
    made the ones built: editing a copy is then a change to the shipped source."""
    copies = {}
    for path in (*cpu_decode.SOURCES, *cpu_decode.HEADERS):
        copy = tmp_path / "src" / path.parent.name / path.name
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(path.read_bytes())
        copies[f"{path.parent.name}/{path.name}"] = copy
    monkeypatch.setattr(cpu_decode, "SOURCES", tuple(copies[f"{p.parent.name}/{p.name}"] for p in cpu_decode.SOURCES))
    monkeypatch.setattr(cpu_decode, "HEADERS", tuple(copies[f"{p.parent.name}/{p.name}"] for p in cpu_decode.HEADERS))
    _reread(monkeypatch)
    return copies


def _reread(monkeypatch):
    """What a new process would read at import."""
    monkeypatch.setattr(cpu_decode, "_TEXTS", cpu_decode.read_sources())


def test_the_build_covers_every_c_file_and_include():
    # a method's .c or .h left out of the lists would be missing from the library or its key
    package = Path(cpu_decode.__file__).resolve().parents[1]
    assert set(package.rglob("*.c")) == set(cpu_decode.SOURCES)
    assert set(package.rglob("*.h")) == set(cpu_decode.HEADERS)
    headers = {h.name for h in cpu_decode.HEADERS}
    for path in (*cpu_decode.SOURCES, *cpu_decode.HEADERS):
        for included in re.findall(r'^#include "([^"]+)"', path.read_text(), flags=re.M):
            assert included in headers, f"{path.name} includes {included}, which the build key does not hash"


@pytest.mark.parametrize("name", KERNEL_FILES)
def test_a_change_to_any_source_or_header_changes_the_build_key(name, monkeypatch, tmp_path):
    copies = _copied_sources(monkeypatch, tmp_path)
    before = cpu_decode.build_key("cc")
    assert cpu_decode.build_key("cc") == before
    copies[name].write_bytes(copies[name].read_bytes() + b"\n/* edited */\n")
    assert cpu_decode.build_key("cc") == before          # this process keeps what it read at import
    _reread(monkeypatch)
    assert cpu_decode.build_key("cc") != before


def test_a_source_edited_after_import_is_not_what_gets_built(fresh_kernel, monkeypatch, tmp_path):
    """The library is built at its first use, maybe long after import: it is built from the
    sources as read at import (which the ctypes prototypes match), not from the files then."""
    copies = _copied_sources(monkeypatch, tmp_path)
    for copy in copies.values():
        copy.write_text("this is not C\n")
    _forget_library(monkeypatch)
    assert cpu_kernel_available(), cpu_decode.cpu_kernel_problem()
    _check_still_correct()


def test_a_changed_method_source_is_rebuilt(fresh_kernel, monkeypatch, tmp_path):
    copies = _copied_sources(monkeypatch, tmp_path)
    assert cpu_kernel_available()
    directory = fresh_kernel / f"kernels-{os.getuid()}"
    first = set(directory.iterdir())
    assert len(first) == 2                             # one library and its record
    edited = copies["decode/quest.c"]
    edited.write_text(edited.read_text() + "\n/* edited */\n")
    _reread(monkeypatch)
    _forget_library(monkeypatch)
    compiled = []
    real_compile = cpu_decode._compile
    monkeypatch.setattr(cpu_decode, "_compile", lambda *a: compiled.append(1) or real_compile(*a))
    assert cpu_kernel_available()
    assert compiled == [1]
    added = sorted(p.name for p in set(directory.iterdir()) - first)
    assert len(added) == 2 and added[0].endswith(".so") and added[1].endswith(".sha256")
    _check_still_correct()


def test_unreadable_sources_leave_decode_without_the_kernel_not_broken(fresh_kernel, monkeypatch):
    monkeypatch.setattr(cpu_decode, "_TEXTS", None)
    monkeypatch.setattr(cpu_decode, "_UNREADABLE", "cannot read the CPU kernel's sources: gone")
    _forget_library(monkeypatch)
    with pytest.warns(RuntimeWarning, match="cannot read the CPU kernel's sources"):
        assert not cpu_kernel_available()
    with pytest.raises(cpu_decode.CpuKernelUnavailable, match="gone"):
        cpu_decode.build_key("cc")
