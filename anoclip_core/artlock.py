"""Advisory lock of an artifact folder (standard library only; the runtime imports it).

Writers of an artifact (``anoclip-export`` commit, ``add-class``, ``anoclip calibrate``) hold an
exclusive ``fcntl.flock`` on ``<parent>/.<name>.lock`` around their read-modify-write; readers
that found an inconsistent pair of files re-read once under a shared lock. The lock file lives
beside the folder, not in it, so replacing the folder (``--force``) keeps the lock. The holder
writes ``pid command`` into the file so a waiter can say who holds it.

Locks are re-entrant per thread: a thread already holding the lock of a folder (any mode) gets a
no-op, so a writer may call readers that lock. Other threads and processes wait as usual.
"""
from __future__ import annotations

import errno
import fcntl
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from .errors import ArtifactError

#: Seconds a writer waits for the lock before giving up (``$ANOCLIP_LOCK_TIMEOUT`` overrides).
DEFAULT_TIMEOUT = 30.0
_POLL = 0.05
_held = threading.local()
T = TypeVar("T")


def lock_path(artifact_dir: str | os.PathLike) -> Path:
    """``<parent>/.<name>.lock`` of an artifact folder."""
    root = Path(artifact_dir).absolute()
    return root.parent / f".{root.name}.lock"


def default_timeout() -> float:
    """The writer's wait in seconds: ``$ANOCLIP_LOCK_TIMEOUT`` when set to a number >= 0, else 30."""
    raw = os.environ.get("ANOCLIP_LOCK_TIMEOUT")
    if raw is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        raise ArtifactError(f"$ANOCLIP_LOCK_TIMEOUT must be a number of seconds, got {raw!r}") from None
    if not value >= 0:
        raise ArtifactError(f"$ANOCLIP_LOCK_TIMEOUT must be >= 0 seconds, got {raw!r}")
    return value


def _holder(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return "another process"
    pid, _, cmd = text.partition(" ")
    return f"pid {pid} ({cmd})" if pid.isdigit() and cmd else (f"pid {pid}" if pid.isdigit() else "another process")


def _command() -> str:
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    sub = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
    return f"{name} {sub}".strip() if sub in ("add-class", "calibrate", "export") else name


@contextmanager
def artifact_lock(artifact_dir: str | os.PathLike, exclusive: bool = True, timeout: float | None = None,
                  what: str | None = None) -> Iterator[None]:
    """Hold the artifact's lock (exclusive for writers, shared for readers) for the ``with`` body.

    Waits up to ``timeout`` seconds (default ``default_timeout()``), then raises ``ArtifactError``
    naming the holder's pid and command. ``what`` names the holder in the lock file.
    """
    path = lock_path(artifact_dir)
    held: set[str] = getattr(_held, "paths", set())
    _held.paths = held
    key = str(path)
    if key in held:
        yield
        return
    wait = default_timeout() if timeout is None else float(timeout)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        _acquire(fd, path, exclusive, wait, Path(artifact_dir))
        if exclusive:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {what or _command()}\n".encode(), 0)
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)
            if exclusive:
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _acquire(fd: int, path: Path, exclusive: bool, wait: float, artifact: Path) -> None:
    mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, mode)
            return
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
        if time.monotonic() >= deadline:
            raise ArtifactError(f"artifact {artifact} is locked by {_holder(path)}; waited {wait:g} s "
                                "(set $ANOCLIP_LOCK_TIMEOUT to wait longer)")
        time.sleep(_POLL)


def consistent_read(artifact_dir: str | os.PathLike, read: Callable[[], T]) -> T:
    """``read()``; when it raises ``ArtifactError`` (e.g. a new npz paired with the old manifest
    while a writer commits), once more under a shared lock, where no writer is half-way. A real
    corruption fails both times and its error is raised. Without a usable lock file (read-only
    parent folder) the second read waits a moment instead."""
    try:
        return read()
    except ArtifactError:
        if not Path(artifact_dir).is_dir():
            raise
    try:
        lock = artifact_lock(artifact_dir, exclusive=False)
        with lock:
            return read()
    except PermissionError:
        time.sleep(0.5)
        return read()
