"""File-system helpers shared by the stages: files written atomically, whole folders replaced with renames only."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

WRITE_MODES = ("wb", "w")


def temp_path_for(path: Path) -> Path:
    """The temporary name used while ``path`` is being written: hidden, in the same folder (so the final rename
    stays on one file system), and distinct per process."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextmanager
def atomic_path(path: Path, *, fsync: bool = False, keep_identical: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` for the caller (or a library) to write; when the block ends normally
    the file there replaces ``path`` in one rename, so readers see the old file or the new one, never half of one.

    If the block raises, the temporary file is removed and ``path`` is left as it was. ``fsync`` flushes the new
    file to disk before the rename. ``keep_identical`` keeps an existing ``path`` (and its mtime) when the new
    bytes are the same."""
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"{tmp}: nothing was written there, so {path} was not replaced")
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        if not (keep_identical and path.is_file() and same_bytes(path, tmp)):
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def same_bytes(a: Path, b: Path, chunk: int = 1 << 20) -> bool:
    """Whether two files hold the same bytes (read in chunks; no stat-based shortcut)."""
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True


@contextmanager
def atomic_write(path: Path, mode: str = "wb", *, encoding: str | None = None, fsync: bool = False,
                 keep_identical: bool = False) -> Iterator[IO]:
    """``open(path, mode)`` for writing, atomically: the caller writes to the yielded file, which replaces ``path``
    only when the block ends normally (see :func:`atomic_path`). ``mode`` is ``"wb"`` or ``"w"`` (text)."""
    if mode not in WRITE_MODES:
        raise ValueError(f"atomic_write mode must be one of {WRITE_MODES}, got {mode!r}")
    with atomic_path(path, fsync=fsync, keep_identical=keep_identical) as tmp:
        with open(tmp, mode, encoding=encoding) as f:
            yield f


def write_atomic(path: Path, data: bytes | str, *, encoding: str = "utf-8", fsync: bool = False) -> None:
    """Write ``data`` (bytes, or text encoded with ``encoding``) to ``path`` atomically (see :func:`atomic_path`)."""
    if isinstance(data, str):
        data = data.encode(encoding)
    with atomic_write(path, "wb", fsync=fsync) as f:
        f.write(data)


def install_folder(staged: Path, final: Path, trash_dir: Path) -> None:
    """Replace ``final`` by ``staged`` with renames only (same file system): a kill at any point leaves either the
    old or the new folder at ``final``; the old one goes through ``trash_dir`` and is then deleted."""
    trash_dir.mkdir(parents=True, exist_ok=True)
    old = None
    if final.exists():
        old = trash_dir / f"{final.name}.{os.getpid()}"
        os.replace(final, old)
    os.replace(staged, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def install_folder_once(staged: Path, final: Path) -> bool:
    """Move ``staged`` to ``final`` with one rename, unless another process installed ``final`` first (a cache
    whose folders are deterministic: the copy there is the same); then ``staged`` is deleted. Returns whether
    ``staged`` was installed. Readers never see half a folder."""
    try:
        os.rename(staged, final)
        return True
    except OSError:
        if not Path(final).is_dir():
            raise
        shutil.rmtree(staged, ignore_errors=True)
        return False
