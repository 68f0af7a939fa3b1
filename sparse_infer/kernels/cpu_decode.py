"""Sparse decode on the CPU without copying the selected rows (a small C kernel), and the
loader of the package's C code.

The torch executor gathers the selected K/V rows into a buffer and then reads the buffer,
which on a memory-bound CPU costs about three passes over the selected bytes plus a few
dozen small ops. cpu_decode.c reads each selected row in place, once per GQA group, with
OpenMP over (batch row, index row). Same contract as sparse_decode_torch: it attends to the
rows it is given and chooses nothing. Inference only: the outputs carry no autograd history
(the model's decode runs under no_grad anyway).

The decode methods that choose in C as well (Quest, Double Sparsity, the continuity
fingerprint) keep their C next to their Python in sparse_infer/decode/ and share the attention
machinery of cpu_attend.h; they get their entry points here with `c_function`. All of it is
compiled with the system C compiler into one library at first use and cached in a directory of
this user's only (SPARSE_INFER_CACHE, else ~/.cache/sparse_infer, then kernels-<uid>, mode 0700)
with the library's sha256 recorded beside it, under a name keyed by every source and header,
the flags, the compiler and the host; it is loaded only when the directory and file belong to
this user, nobody else can write them, and the hash matches. Without a compiler, or when that
check fails, the decode path stays on the torch executor (with one warning).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

__all__ = ["cpu_kernel_available", "cpu_kernel_problem", "cpu_kernel_refuses", "cpu_kernel_supports",
           "sparse_decode_cpu", "c_function", "dtype_code", "refuse_unsupported", "check_status",
           "CpuKernelUnavailable"]

_PACKAGE = Path(__file__).resolve().parents[1]
# One library for the executor and the decode methods' C (kept beside their selectors): one
# build, one hash check and one availability answer for all of them. Paths only, no imports:
# kernels stays below decode.
SOURCES = (_PACKAGE / "kernels" / "cpu_decode.c", _PACKAGE / "decode" / "quest.c",
           _PACKAGE / "decode" / "double_sparsity.c", _PACKAGE / "decode" / "fingerprint.c")
HEADERS = (_PACKAGE / "kernels" / "cpu_attend.h", _PACKAGE / "decode" / "cpu_select.h")


def read_sources() -> dict[str, bytes]:
    """{"dir/name": bytes} of every source and header of the library."""
    return {f"{path.parent.name}/{path.name}": path.read_bytes() for path in (*SOURCES, *HEADERS)}


# Read once, when this module is imported (the library is built later, at its first use): the
# library is then built from the code this process's ctypes prototypes were written against,
# even if a file is edited while a long run goes on (which crashed such a run).
try:
    _TEXTS: dict[str, bytes] | None = read_sources()
    _UNREADABLE = None
except OSError as err:            # an install without them: decode runs without the C kernel
    _TEXTS, _UNREADABLE = None, f"cannot read the CPU kernel's sources: {err}"
# reassociation lets the dot-product and softmax-sum loops vectorize; no -ffinite-math-only: the
# kernel marks unused slots with -inf
_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros", "-fassociative-math",
          "-march=native", "-fopenmp", "-fPIC", "-shared"]
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_LOCK = threading.Lock()
_LIB: ctypes.CDLL | None = None
_ERROR: str | None = None
_WARNED = False


class CpuKernelUnavailable(RuntimeError):
    """The C decode kernel could not be built or loaded here."""


def _kernel_dir() -> Path:
    """The per-user build dir: a library found here is loaded into the process, so it must be
    this user's alone (the uid in the name keeps users sharing SPARSE_INFER_CACHE apart)."""
    root = os.environ.get("SPARSE_INFER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sparse_infer")
    return Path(root) / f"kernels-{os.getuid()}"


def _check_private(st: os.stat_result, path: Path, directory: bool) -> None:
    """Refuse a path another user could have planted or could still change."""
    kind_ok = stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)
    if not kind_ok:
        raise CpuKernelUnavailable(f"{path} is not a {'directory' if directory else 'regular file'}: "
                                   "not loading the CPU kernel from it")
    if st.st_uid != os.getuid():
        raise CpuKernelUnavailable(f"{path} is owned by uid {st.st_uid}, not by this user (uid {os.getuid()}): "
                                   "not loading the CPU kernel from it")
    if st.st_mode & 0o022:
        raise CpuKernelUnavailable(f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}): "
                                   "not loading the CPU kernel from it (remove it to rebuild)")


def _private_dir() -> Path:
    directory = _kernel_dir()
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(directory, 0o700)
        os.chmod(directory, 0o700)       # mkdir's mode is masked by the umask; make it exact
    except FileExistsError:
        pass
    _check_private(os.lstat(directory), directory, directory=True)
    return directory


def _record_name(key: str) -> str:
    return f"cpu_decode_{key}.sha256"


def _library_name(key: str, digest: str) -> str:
    # named by its own hash: two processes building at once each rename a complete library and
    # then its record into place, so a record never names a library that is not yet there
    return f"cpu_decode_{key}-{digest[:16]}.so"


def _sha256_fd(fd: int) -> str:
    digest = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, 1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def _load_recorded(directory: Path, key: str) -> ctypes.CDLL | None:
    """dlopen the library this key's record names, after checking the directory's and the file's
    owner and mode and the file's sha256 against the record. None when nothing is built yet, or
    (with a warning, the bad file removed) when the library fails its hash: the caller rebuilds.
    Everything is checked through open descriptors and the library is loaded through its own
    descriptor, so the bytes that were hashed are the bytes that get loaded."""
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        _check_private(os.fstat(dfd), directory, directory=True)
        try:
            rfd = os.open(_record_name(key), os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
        except FileNotFoundError:
            return None
        with os.fdopen(rfd, "rb") as record:
            _check_private(os.fstat(record.fileno()), directory / _record_name(key), directory=False)
            expected = record.read(200).decode("ascii", "replace").strip()
        if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
            warnings.warn(f"{directory / _record_name(key)} is not a sha256 record: rebuilding the CPU kernel",
                          RuntimeWarning, stacklevel=4)
            return None
        name = _library_name(key, expected)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
        except FileNotFoundError:
            return None
        try:
            _check_private(os.fstat(fd), directory / name, directory=False)
            actual = _sha256_fd(fd)
            if actual != expected:
                warnings.warn(f"{directory / name} has sha256 {actual[:16]}..., not the {expected[:16]}... "
                              "recorded when it was built: not loading it; rebuilding the CPU kernel",
                              RuntimeWarning, stacklevel=4)
                os.unlink(name, dir_fd=dfd)
                return None
            # /proc/self/fd/N opens the very file checked above; where there is none (not Linux)
            # the path is the best there is, in a directory only this user can write
            through = f"/proc/self/fd/{fd}"
            return ctypes.CDLL(through if os.path.exists(through) else str(directory / name))
        finally:
            os.close(fd)
    finally:
        os.close(dfd)


def _compile(cc: str, directory: Path, key: str) -> None:
    """Build into a temporary name of this process's own, then rename the library and its hash
    record into place (atomic: a concurrent build or load never sees half a file)."""
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=directory)
    os.close(fd)
    record_tmp = None
    try:
        with tempfile.TemporaryDirectory(prefix="sparse_infer-src-") as src:
            # the texts read at import, in the package's layout
            for name, text in _TEXTS.items():
                (Path(src) / name).parent.mkdir(exist_ok=True)
                (Path(src) / name).write_bytes(text)
            sources = [str(Path(src) / f"{p.parent.name}/{p.name}") for p in SOURCES]
            # every header's directory: decode/cpu_select.h includes kernels/cpu_attend.h
            includes = sorted({f"-I{Path(src) / p.parent.name}" for p in HEADERS})
            done = subprocess.run([cc, *_FLAGS, *includes, "-o", tmp, *sources, "-lm"],
                                  capture_output=True, text=True)
        if done.returncode:
            names = ", ".join(s.name for s in SOURCES)
            raise CpuKernelUnavailable(f"compiling {names} failed:\n{done.stderr.strip()}")
        os.chmod(tmp, 0o700)                       # the linker's mode follows the umask
        fd = os.open(tmp, os.O_RDONLY)
        try:
            digest = _sha256_fd(fd)
        finally:
            os.close(fd)
        os.replace(tmp, directory / _library_name(key, digest))
        fd, record_tmp = tempfile.mkstemp(prefix=".record-", dir=directory)
        with os.fdopen(fd, "w") as record:
            record.write(digest + "\n")
        os.replace(record_tmp, directory / _record_name(key))
    finally:
        for leftover in (tmp, record_tmp):
            if leftover is not None and os.path.exists(leftover):
                os.unlink(leftover)


def build_key(cc: str) -> str:
    """The name a build is cached under: a change in any source or header (as read at import),
    the flags, the compiler or the host gives another name, so a stale library is never loaded
    for it."""
    if _TEXTS is None:
        raise CpuKernelUnavailable(_UNREADABLE)
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    parts = [" ".join(_FLAGS).encode(), version.encode(), platform.machine().encode(), platform.node().encode()]
    for name, text in _TEXTS.items():         # named, so that moving code between files counts too
        parts += [name.encode(), text]
    # -march=native: the library is only valid on this kind of CPU, so the host is in the key
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


# torch.utils.cpp_extension.load is not used: it needs a C++ compiler, ninja and the torch headers
# (a much slower build of a Python extension where a plain C shared library does), and it neither
# checks the build dir's owner and mode nor verifies the built file before loading it, which this
# module must do.
def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise CpuKernelUnavailable(f"no C compiler ({cc!r} not on PATH; set CC)")
    key = build_key(cc)
    directory = _private_dir()
    lib = _load_recorded(directory, key)
    if lib is None:
        _compile(cc, directory, key)
        lib = _load_recorded(directory, key)
        if lib is None:
            raise CpuKernelUnavailable(f"the CPU kernel built in {directory} failed its own hash check")
    return lib


_p, _i64, _i32, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_EXECUTOR_ARGS = [_p, _i64, _i64,                   # query, strides b h
                  _p, _i64, _i64, _i64,             # key, strides b h n
                  _p, _i64, _i64, _i64,             # value
                  _p, _i64, _i64,                   # indices, strides b r
                  _p,                               # kv_heads
                  _p, _i64, _i64, _i64,             # mask, strides b h n
                  _p, _i64, _i64,                   # out, strides b h
                  _i32, _i32, _i32, _i32, _i64, _i32,  # B Hi G K n D
                  _f32, _f32, _i32, _i32]           # scaling softcap dtype threads


def _library() -> ctypes.CDLL:
    global _LIB, _ERROR
    if _LIB is None and _ERROR is None:
        with _LOCK:
            if _LIB is None and _ERROR is None:
                try:
                    _LIB = _build()
                except (CpuKernelUnavailable, OSError) as err:
                    _ERROR = str(err)
    if _LIB is None:
        raise CpuKernelUnavailable(_ERROR)
    return _LIB


def cpu_kernel_problem() -> str | None:
    """Why the C decode kernel cannot run here (building it on first call), None when it can."""
    if os.environ.get("SPARSE_INFER_CPU_KERNEL", "1") == "0":
        return "the C decode kernel is turned off (SPARSE_INFER_CPU_KERNEL=0)"
    try:
        _library()
    except CpuKernelUnavailable as err:
        return f"the C decode kernel is unavailable ({err})"
    return None


def c_function(name: str, argtypes: list, restype=ctypes.c_int):
    """The library's entry point `name` with its C prototype (building the library on first
    use; raises CpuKernelUnavailable when it cannot be built or loaded)."""
    fn = getattr(_library(), name)
    if fn.argtypes is None:             # once per loaded library (ctypes keeps the object)
        fn.argtypes, fn.restype = argtypes, restype
    return fn


def cpu_kernel_available() -> bool:
    """True when the C decode kernel is built (building it on first call) and loadable.
    SPARSE_INFER_CPU_KERNEL=0 turns it off (the torch executor then runs decode on CPUs).
    Warns once when it cannot be built or loaded: 'auto' then decodes on the torch executor."""
    if os.environ.get("SPARSE_INFER_CPU_KERNEL", "1") == "0":
        return False
    global _WARNED
    try:
        _library()
        return True
    except CpuKernelUnavailable as err:
        if not _WARNED:
            _WARNED = True
            warnings.warn(f"sparse_infer: the C decode kernel is unavailable ({err}); "
                          "decode runs on the torch executor", RuntimeWarning, stacklevel=2)
        return False


def _unsupported(query: torch.Tensor, *rows: torch.Tensor):
    """Why the C kernel cannot take these tensors, as (exception type, message), or None.
    rows: the tensors it reads row by row (K, V, page bounds): same dtype as the query, rows contiguous."""
    if query.dtype not in _DTYPES or any(t.dtype != query.dtype for t in rows):
        return TypeError, (f"the CPU kernel takes one dtype of {sorted(map(str, _DTYPES))} for all its "
                           f"tensors, got {[str(t.dtype) for t in (query, *rows)]}")
    if any(t.device.type != "cpu" for t in (query, *rows)):
        return ValueError, "the CPU kernel takes CPU tensors"
    if any(t.stride(-1) != 1 for t in rows):
        return ValueError, "key, value (and page bound) rows must be contiguous (last stride 1)"
    return None


def refuse_unsupported(query: torch.Tensor, *rows: torch.Tensor) -> None:
    """Raise what _unsupported names, if anything (TypeError for dtypes, ValueError otherwise)."""
    problem = _unsupported(query, *rows)
    if problem is not None:
        raise problem[0](problem[1])


def cpu_kernel_refuses(query: torch.Tensor, key: torch.Tensor | None = None,
                       value: torch.Tensor | None = None) -> str | None:
    """Why the C kernel does not take these tensors (dtype, device, row strides), None when it
    does; with key and value None, for the query alone. Says nothing about the kernel being built."""
    problem = _unsupported(query, *(t for t in (key, value) if t is not None))
    if problem is not None:
        return problem[1]
    if key is not None and value is not None and key.shape[-1] != value.shape[-1]:
        return "the CPU kernel takes key and value of one head dim"
    return None


def cpu_kernel_supports(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether these tensors can go to the C kernel: CPU, one supported dtype, rows contiguous."""
    return cpu_kernel_refuses(query, key, value) is None and cpu_kernel_available()


def dtype_code(dtype: torch.dtype) -> int:
    """The C code's dtype argument: 0 float32, 1 bfloat16, 2 float16."""
    return _DTYPES[dtype]


def check_status(status: int, bad_sizes: str) -> None:
    """The C entry points return 0, 1 for sizes they do not take, 2 when scratch allocation failed."""
    if status == 1:
        raise ValueError(bad_sizes)
    if status:
        raise MemoryError("the CPU kernel could not allocate its scratch")


def sparse_decode_cpu(query, key, value, indices, *, scaling, attention_mask=None, softcap=None,
                      kv_heads=None):
    """Attention of one query token over the selected kv rows, read in place (C kernel).

    Arguments as sparse_decode_torch (kv_heads included); query, key and value must share a
    dtype (float32, bfloat16 or float16) and have unit stride in the last dim."""
    from sparse_infer.kernels.sparse_decode import check_decode_mask, check_decode_rows

    B, Hq, D, Hkv, n, Hi, kv_heads = check_decode_rows(query, key, value, indices, kv_heads)
    refuse_unsupported(query, key, value)
    attention_mask = check_decode_mask(attention_mask, B, Hq, n)
    K = indices.shape[-1]
    if K == 0:
        return torch.zeros_like(query)
    entry = c_function("sparse_decode_rows", _EXECUTOR_ARGS)
    q = query if query.stride(-1) == 1 else query.contiguous()
    idx = indices.to(torch.int64)
    idx = idx if idx.stride(-1) == 1 else idx.contiguous()
    kvh = kv_heads.to(torch.int64).contiguous()
    out = torch.empty(B, Hq, 1, D, dtype=query.dtype)
    if attention_mask is None:
        mask_ptr, msb, msh, msn = None, 0, 0, 0
    else:
        mask = attention_mask.view(torch.uint8)      # bool and uint8 share the byte layout
        mask_ptr, msb, msn = mask.data_ptr(), mask.stride(0), mask.stride(3)
        msh = 0 if mask.shape[1] == 1 else mask.stride(1)
    status = entry(
        q.data_ptr(), q.stride(0), q.stride(1),
        key.data_ptr(), key.stride(0), key.stride(1), key.stride(2),
        value.data_ptr(), value.stride(0), value.stride(1), value.stride(2),
        idx.data_ptr(), idx.stride(0), idx.stride(1),
        kvh.data_ptr(),
        mask_ptr, msb, msh, msn,
        out.data_ptr(), out.stride(0), out.stride(1),
        B, Hi, Hq // Hi, K, n, D,
        float(scaling), float(softcap or 0.0), _DTYPES[query.dtype], torch.get_num_threads())
    check_status(status, f"the CPU kernel takes head dims up to 1024, got {D}")
    return out
