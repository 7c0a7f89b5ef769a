"""chibisplat/files.py: the one atomic-write helper every stage uses, and folder installs."""

from __future__ import annotations

import os

import pytest

from chibisplat import files
from chibisplat.files import atomic_path, atomic_write, install_folder, same_bytes, write_atomic


class Boom(RuntimeError):
    pass


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_write_atomic_writes_exactly_the_bytes_and_leaves_no_temp(tmp_path):
    write_atomic(tmp_path / "a.bin", b"\x00\x01binary\xff")
    write_atomic(tmp_path / "b.json", '{"name": "\u00e9"}\n')  # text is UTF-8
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01binary\xff"
    assert (tmp_path / "b.json").read_bytes() == b'{"name": "\xc3\xa9"}\n'
    assert _listing(tmp_path) == ["a.bin", "b.json"]


def test_the_old_file_stays_readable_until_the_block_ends(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old\n")
    with atomic_write(path, "w") as f:
        f.write("new\n")
        f.flush()
        assert path.read_text() == "old\n"  # a reader now still sees the complete old file
        assert _listing(tmp_path) == [f".f.txt.tmp{os.getpid()}", "f.txt"]  # hidden, same folder
    assert path.read_text() == "new\n"
    assert _listing(tmp_path) == ["f.txt"]


@pytest.mark.parametrize("how", ["file", "path"])
def test_a_failure_inside_leaves_the_old_file_untouched_and_no_temp(tmp_path, how):
    path = tmp_path / "data.bin"
    path.write_bytes(b"old contents")
    with pytest.raises(Boom):
        if how == "file":
            with atomic_write(path) as f:
                f.write(b"half of the new con")
                raise Boom
        else:
            with atomic_path(path) as tmp:
                tmp.write_bytes(b"half of the new con")  # e.g. a library writing to the path, then failing
                raise Boom
    assert path.read_bytes() == b"old contents"
    assert _listing(tmp_path) == ["data.bin"]


def test_a_failure_before_the_first_write_creates_nothing(tmp_path):
    with pytest.raises(Boom), atomic_write(tmp_path / "new.bin"):
        raise Boom
    assert _listing(tmp_path) == []


def test_writing_nothing_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "x.parquet"
    path.write_bytes(b"old")
    with pytest.raises(FileNotFoundError, match="x.parquet was not replaced"), atomic_path(path):
        pass
    assert path.read_bytes() == b"old"


def test_keep_identical_keeps_the_old_file_and_its_mtime(tmp_path):
    path = tmp_path / "shard.parquet"
    path.write_bytes(b"same bytes")
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    inode = path.stat().st_ino
    with atomic_path(path, keep_identical=True) as tmp:
        tmp.write_bytes(b"same bytes")
    assert path.stat().st_mtime_ns == 1_000_000_000 and path.stat().st_ino == inode
    assert _listing(tmp_path) == ["shard.parquet"]
    with atomic_path(path, keep_identical=True) as tmp:
        tmp.write_bytes(b"same bytez")  # same size, other bytes: replaced
    assert path.read_bytes() == b"same bytez" and path.stat().st_mtime_ns != 1_000_000_000
    assert _listing(tmp_path) == ["shard.parquet"]


def test_without_keep_identical_the_file_is_always_replaced(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    inode = path.stat().st_ino
    write_atomic(path, b"abc")
    assert path.stat().st_ino != inode


def test_fsync_flushes_the_new_file_before_the_rename(tmp_path, monkeypatch):
    path = tmp_path / "f.png"
    synced = []

    def fsync(fd):
        synced.append((os.fstat(fd).st_size, path.exists()))

    monkeypatch.setattr(files.os, "fsync", fsync)
    write_atomic(path, b"png", fsync=True)
    assert synced == [(3, False)]  # the complete new file, synced before the final name existed
    write_atomic(tmp_path / "g", b"x")
    assert len(synced) == 1  # off by default


def test_same_bytes_reads_the_contents(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    a.write_bytes(b"x" * 3000 + b"1")
    b.write_bytes(b"x" * 3000 + b"2")
    c.write_bytes(b"x" * 3000 + b"1")
    os.utime(a, ns=(5, 5))
    os.utime(b, ns=(5, 5))  # same size and mtime: a stat-based check would call them equal
    assert not same_bytes(a, b, chunk=1000)
    assert same_bytes(a, c, chunk=1000)
    assert same_bytes(a, a, chunk=7)


def test_atomic_write_only_writes(tmp_path):
    with pytest.raises(ValueError, match="mode must be one of"), atomic_write(tmp_path / "f", "a"):
        pass


def test_install_folder_replaces_the_folder_and_empties_the_trash(tmp_path):
    final, staged, trash = tmp_path / "out", tmp_path / "staged", tmp_path / "trash"
    final.mkdir()
    (final / "old.txt").write_text("old")
    staged.mkdir()
    (staged / "new.txt").write_text("new")
    install_folder(staged, final, trash)
    assert _listing(final) == ["new.txt"] and not staged.exists() and _listing(trash) == []


def test_install_folder_once_keeps_the_first_copy(tmp_path):
    from chibisplat.files import install_folder_once

    final = tmp_path / "cache" / "model"
    final.parent.mkdir()
    for name, text in (("a", "first"), ("b", "second")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "weights.bin").write_text(text)
    assert install_folder_once(tmp_path / "a", final) is True
    assert install_folder_once(tmp_path / "b", final) is False  # another process got there first: kept, b dropped
    assert (final / "weights.bin").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    with pytest.raises(FileNotFoundError):  # any other failure is not swallowed
        install_folder_once(tmp_path / "never-built", tmp_path / "cache" / "other")
