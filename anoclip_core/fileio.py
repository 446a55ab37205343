"""File helpers shared by the core, the exporter and the runtime (standard library only).

Atomic writes go to a temp file in the target's folder, are flushed to disk, then renamed over
the target with ``os.replace``: readers see the old file or the new one, never half of one.
Folders (artifacts, Triton models) are built in a staged sibling and swapped in with ``swap_dir``.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import tempfile
from pathlib import Path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (creating the folder); returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp creates 0600
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return target


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """UTF-8 text version of ``atomic_write_bytes``."""
    return atomic_write_bytes(path, text.encode("utf-8"))


#: Test seam: ``ANOCLIP_FAULT=after-first-rename`` ends the process (``os._exit(137)``, as SIGKILL
#: would) between the two renames of a replacing ``swap_dir``, so tests can check the recovery.
FAULT_ENV = "ANOCLIP_FAULT"


def _fault(point: str) -> None:
    if os.environ.get(FAULT_ENV) == point:
        os._exit(137)


def swap_dir(staged: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename the folder ``staged`` to ``final`` (same file system). An existing ``final`` is moved
    aside first to ``.<name>.old-<pid>``, put back if the rename fails, and deleted once the new
    folder is in place. SIGINT / SIGTERM wait until both renames are done; a SIGKILL between them
    is repaired by ``anoclip_core.staging.recover``."""
    staged, final = Path(staged), Path(final)
    signals = {signal.SIGINT, signal.SIGTERM}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    old = None
    try:
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            _fault("after-first-rename")
        try:
            os.replace(staged, final)
        except BaseException:
            if old is not None:
                os.replace(old, final)
            raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
