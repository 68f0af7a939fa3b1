"""Where results are written: checks made before any model work, one writer per results
directory, and files replaced whole.

Evals and benchmarks run for minutes to hours; an output path that cannot be written, or a
second run writing into the same directory, must be refused before that time is spent, not
discovered (or silently merged) at the end.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sparse_infer.eval.errors import EvalError

LOCK_FILE = ".sparse_infer.lock"

# Results directories this process holds the lock of, with how many claims are open: the CLI
# claims the directory before loading the model and run_eval claims it again for its own
# callers. flock treats two opens of one file as two owners, even in one process, so a second
# claim from the same process must reuse the first instead of locking again.
_held: dict[str, int] = {}


def _reason(err: OSError) -> str:
    return err.strerror or str(err)


def check_writable_dir(out: Path, option: str = "--out") -> bool:
    """Make `out` (and its parents) if needed and prove a file can be created in it.

    Returns whether the directory was created here. Raises EvalError naming the option."""
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise EvalError(f"cannot write {option} {out}: {_reason(err)}") from None
    if not out.is_dir():
        raise EvalError(f"cannot write {option} {out}: it is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=out)
    except OSError as err:
        raise EvalError(f"cannot write {option} {out}: {_reason(err)}") from None
    os.close(fd)
    os.unlink(probe)
    return created


def check_new_file(path: Path, option: str) -> None:
    """Refuse an output file that exists (results are not replaced silently) or whose directory
    cannot take a new file."""
    if path.exists() or path.is_symlink():
        raise EvalError(f"{option} {path} exists; remove it or choose another path")
    check_writable_dir(path.parent if str(path.parent) else Path("."), option=f"{option} {path}: directory")


def write_atomic(path: Path, write: Callable[[Any], None], binary: bool = False) -> None:
    """Write `path` through a temporary file of its own in the same directory, then rename it
    into place: a reader or an interrupt never sees half a file, and two writers never share a
    temporary name."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as fh:
            write(fh)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are as readable as any output
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, doc: Any, indent: int | None = 1) -> None:
    write_atomic(Path(path), lambda fh: json.dump(doc, fh, indent=indent))


@contextmanager
def locked_dir(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on results directory `out` (it must exist) until the block ends.

    A second process (or a second claim in this one through another path) is refused at once
    rather than queued: two runs interleaving their rewrites of one results.json would each
    drop the other's records."""
    key = str(out.resolve())
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    try:
        import fcntl
    except ImportError:  # no flock (Windows): run unlocked rather than not at all
        yield
        return
    lock_path = out / LOCK_FILE
    fd = _lock(fcntl, lock_path, out)
    _held[key] = 1
    try:
        yield
    finally:
        del _held[key]
        # removed while still held, so no stray file is left in a results directory (runs/ are
        # committed); a run that opened the old file meanwhile sees it gone and refuses (_lock)
        lock_path.unlink(missing_ok=True)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _lock(fcntl, lock_path: Path, out: Path) -> int:
    """Open and lock `lock_path` without waiting; the descriptor, or EvalError when it is held."""
    busy = EvalError(f"another run is writing to {out} (it holds {lock_path}); wait for it to finish "
                     "or choose another --out")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise EvalError(f"cannot write --out {out}: {_reason(err)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # the holder deletes the file as it lets go: a lock on a file no longer at that path
        # guards nothing, since the next run creates and locks a new one
        mine, there = os.fstat(fd), os.stat(lock_path)
        if (mine.st_dev, mine.st_ino) != (there.st_dev, there.st_ino):
            raise BlockingIOError
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        raise busy from None
    # who holds it, for a person looking at a stuck directory
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd
