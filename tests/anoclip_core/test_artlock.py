"""The artifact lock: exclusive between processes, shared readers, a timeout naming the holder."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from anoclip_core import artlock
from anoclip_core.errors import ArtifactError

ROOT = Path(__file__).resolve().parents[2]


def hold(folder: Path, seconds: float, exclusive: bool = True, what: str = "anoclip-export add-class"):
    """A separate process holding the lock for ``seconds``; returns once it holds it."""
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from anoclip_core.artlock import artifact_lock\n"
            f"with artifact_lock({str(folder)!r}, exclusive={exclusive}, what={what!r}):\n"
            f"    print('held', flush=True); time.sleep({seconds})\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_file_is_beside_the_folder(tmp_path):
    assert artlock.lock_path(tmp_path / "art") == tmp_path / ".art.lock"


def test_held_lock_times_out_with_the_holders_pid_and_command(tmp_path):
    proc = hold(tmp_path / "art", 30)
    try:
        t0 = time.monotonic()
        with pytest.raises(ArtifactError) as err:
            with artlock.artifact_lock(tmp_path / "art", timeout=0.5):
                pass
        assert time.monotonic() - t0 >= 0.5
        assert str(err.value).startswith(
            f"artifact {tmp_path / 'art'} is locked by pid {proc.pid} (anoclip-export add-class); waited 0.5 s")
        with pytest.raises(ArtifactError):  # readers wait for writers too
            with artlock.artifact_lock(tmp_path / "art", exclusive=False, timeout=0.2):
                pass
    finally:
        proc.kill()
        proc.wait()
    with artlock.artifact_lock(tmp_path / "art", timeout=5):  # released by the holder's death
        pass


def test_shared_holders_admit_readers_and_exclude_writers(tmp_path):
    proc = hold(tmp_path / "art", 30, exclusive=False)
    try:
        with artlock.artifact_lock(tmp_path / "art", exclusive=False, timeout=0.2):
            pass
        with pytest.raises(ArtifactError, match="locked by"):
            with artlock.artifact_lock(tmp_path / "art", timeout=0.2):
                pass
    finally:
        proc.kill()
        proc.wait()


def test_reentrant_in_one_thread(tmp_path):
    with artlock.artifact_lock(tmp_path / "art", timeout=0.2):
        with artlock.artifact_lock(tmp_path / "art", exclusive=False, timeout=0.2):
            pass


def test_timeout_from_the_environment(monkeypatch):
    monkeypatch.setenv("ANOCLIP_LOCK_TIMEOUT", "2.5")
    assert artlock.default_timeout() == 2.5
    monkeypatch.setenv("ANOCLIP_LOCK_TIMEOUT", "soon")
    with pytest.raises(ArtifactError, match="ANOCLIP_LOCK_TIMEOUT"):
        artlock.default_timeout()


def test_consistent_read_retries_once_under_the_lock(tmp_path):
    (tmp_path / "art").mkdir()
    calls = []

    def read():
        calls.append(1)
        if len(calls) == 1:
            raise ArtifactError("sha256 mismatch")
        return "whole"

    assert artlock.consistent_read(tmp_path / "art", read) == "whole" and len(calls) == 2

    def broken():
        raise ArtifactError("really corrupt")

    with pytest.raises(ArtifactError, match="really corrupt"):
        artlock.consistent_read(tmp_path / "art", broken)
