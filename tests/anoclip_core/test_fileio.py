"""anoclip_core.fileio: hashing, atomic file writes and the staged-folder swap."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from anoclip_core import fileio


def test_sha256_and_atomic_write(tmp_path: Path) -> None:
    p = fileio.atomic_write_text(tmp_path / "sub" / "a.txt", "hello")
    assert p.read_text() == "hello"
    assert fileio.sha256_file(p) == hashlib.sha256(b"hello").hexdigest()
    assert sorted(x.name for x in p.parent.iterdir()) == ["a.txt"]  # no temp file left


def _folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "f.txt").write_text(text)
    return path


def test_swap_dir_into_a_new_place(tmp_path: Path) -> None:
    fileio.swap_dir(_folder(tmp_path / ".staged", "new"), tmp_path / "final")
    assert (tmp_path / "final" / "f.txt").read_text() == "new"
    assert [x.name for x in tmp_path.iterdir()] == ["final"]


def test_swap_dir_replaces_and_removes_the_old(tmp_path: Path) -> None:
    _folder(tmp_path / "final", "old")
    fileio.swap_dir(_folder(tmp_path / ".staged", "new"), tmp_path / "final")
    assert (tmp_path / "final" / "f.txt").read_text() == "new"
    assert [x.name for x in tmp_path.iterdir()] == ["final"]


def test_swap_dir_puts_the_old_back_when_the_rename_fails(tmp_path: Path, monkeypatch) -> None:
    final = _folder(tmp_path / "final", "old")
    staged = _folder(tmp_path / ".staged", "new")
    real = os.replace

    def failing(src, dst):
        if Path(src) == staged:
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(fileio.os, "replace", failing)
    with pytest.raises(OSError, match="disk full"):
        fileio.swap_dir(staged, final)
    assert (final / "f.txt").read_text() == "old"
    assert sorted(x.name for x in tmp_path.iterdir()) == [".staged", "final"]
