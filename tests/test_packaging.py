"""The wheel carries what the package reads at run time: the shipped plans and the C decode kernel
(every source and header the library is built from).
(.ci/wheel_check goes further: it installs the wheel in a fresh venv and runs a patched forward.)"""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import sparse_infer
from sparse_infer.kernels.cpu_decode import HEADERS, SOURCES
from sparse_infer.plan import CONFIGS_DIR

REPO = Path(__file__).resolve().parent.parent


def test_wheel_ships_the_plans_and_the_kernel_source(tmp_path):
    pytest.importorskip("setuptools")      # built offline, without an isolated build environment
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "sparse_infer", src / "sparse_infer", ignore=shutil.ignore_patterns("__pycache__"))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "-q", "--no-deps",
                          "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    (wheel,) = (tmp_path / "dist").glob("sparse_infer-*.whl")
    package = Path(sparse_infer.__file__).resolve().parent
    plans = sorted(CONFIGS_DIR.glob("*.yaml"))
    assert plans and all(package in p.resolve().parents for p in plans), "shipped plans live inside the package"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for path in [*plans, *SOURCES, *HEADERS]:
            member = path.resolve().relative_to(package.parent).as_posix()
            assert member in names, f"{member} is not in the wheel"
            assert zf.read(member) == path.read_bytes()
