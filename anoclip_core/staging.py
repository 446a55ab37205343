"""Staged artifact folders: hidden temp names, sweeping the leftovers of dead processes, and
finishing a ``--force`` replace that was killed half-way (standard library only).

An export builds ``<parent>/.<name>.tmp-<pid>-<random>``; a ``--force`` replace renames the old
folder to ``.<name>.old-<pid>``, the new one to ``<name>``, then deletes the old one
(``anoclip_core.fileio.swap_dir``). A process killed with SIGKILL leaves these hidden folders.
``recover`` (run by the next export, ``add-class`` or load, under the artifact's lock) puts an
artifact back at ``<name>``: the new one when its staged folder is complete, else the old one.
``sweep`` deletes the hidden folders of processes that are no longer alive.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def temp_dir(out: str | os.PathLike) -> Path:
    """A new empty ``.<name>.tmp-<pid>-<random>`` beside ``out`` (mode as the umask allows)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700; an artifact is shared like any folder
    return tmp


def old_name(final: str | os.PathLike) -> Path:
    """Where ``swap_dir`` parks the folder it replaces: ``.<name>.old-<pid>``."""
    final = Path(final)
    return final.parent / f".{final.name}.old-{os.getpid()}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (on this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(out: Path, kind: str) -> list[tuple[Path, int]]:
    """``(path, pid)`` of ``.<name>.<kind>-<pid>[-...]`` folders beside ``out`` whose pid is dead."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.{kind}-(\d+)(?:-.*)?$")
    found: list[tuple[Path, int]] = []
    if not out.parent.is_dir():
        return found
    for entry in out.parent.iterdir():
        m = pattern.match(entry.name)
        if m and entry.is_dir() and not pid_alive(int(m.group(1))):
            found.append((entry, int(m.group(1))))
    return sorted(found)


def recover(out: str | os.PathLike, complete: Callable[[Path], bool]) -> str | None:
    """Finish a ``--force`` replace of ``out`` whose process died between its renames.

    With ``out`` missing and a dead process's ``.<name>.old-<pid>`` beside it: the same process's
    staged folder becomes ``out`` when ``complete(staged)`` says it is whole, else the old folder
    goes back. Returns what was done (for the user), or None when there was nothing to do.
    Call it while holding the artifact's exclusive lock.
    """
    out = Path(out).absolute()
    olds = _leftovers(out, "old")
    if not olds or out.exists():
        return None
    old, pid = olds[-1]
    staged = [p for p, tpid in _leftovers(out, "tmp") if tpid == pid and complete(p)]
    if staged:
        os.replace(staged[0], out)
        shutil.rmtree(old, ignore_errors=True)
        return (f"completed the interrupted --force replace of {out} (pid {pid} was killed between its renames; "
                "its verified new artifact is now in place)")
    os.replace(old, out)
    return (f"restored the previous artifact {out} (pid {pid} was killed during a --force replace; "
            "the new artifact was incomplete)")


def sweep(out: str | os.PathLike) -> list[Path]:
    """Delete hidden temp and old folders of ``out`` left by dead processes (after ``recover``);
    returns what was deleted. A live process's folders are never touched."""
    out = Path(out).absolute()
    removed = []
    for kind in ("tmp", "old"):
        for path, _ in _leftovers(out, kind):
            if kind == "old" and not out.exists():
                continue  # the only copy of an artifact: recover() decides about it
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def pending(out: str | os.PathLike) -> bool:
    """Whether dead processes left hidden temp or old folders of ``out`` (one directory listing)."""
    out = Path(out).absolute()
    return bool(_leftovers(out, "tmp") or _leftovers(out, "old"))


def has_leftovers(out: str | os.PathLike) -> bool:
    """Cheap check (one directory listing) for an interrupted replace's ``.<name>.old-*``."""
    out = Path(out).absolute()
    prefix = f".{out.name}.old-"
    try:
        return any(name.startswith(prefix) for name in os.listdir(out.parent))
    except OSError:
        return False
