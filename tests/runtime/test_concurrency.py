"""Concurrent writers on one artifact: every write lands, readers never see a mix (issue 10 item 1)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    env.update(extra)
    return env


def _add_class(art: Path, name: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "anoclip.export.cli", "add-class", str(art), name, "--text-cache", "none", "--quiet"],
        env=_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _calibrate(art: Path, good: Path, cls: str, q: float, **env: str) -> subprocess.Popen:
    code = "from anoclip.runtime.cli import main; main()"
    return subprocess.Popen([sys.executable, "-c", code, "calibrate", str(art), "--good", str(good), "--class", cls,
                             "--quantile", str(q), "--backend", "ort-cpu"],
                            env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture()
def good(tmp_path: Path) -> Path:
    folder = tmp_path / "good"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        cv2.imwrite(str(folder / f"g{i}.png"), (rng.random((40, 48, 3)) * 255).astype(np.uint8))
    return folder


def test_two_add_class_and_two_calibrate_processes_all_land(artifact_copy: Path, good: Path):
    procs = [_add_class(artifact_copy, "cable"), _add_class(artifact_copy, "screw"),
             _calibrate(artifact_copy, good, "bottle", 0.9), _calibrate(artifact_copy, good, "carpet", 0.8)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [o[1][-300:] for o in outs]
    manifest = json.loads((artifact_copy / "manifest.json").read_text())
    assert set(manifest["text"]["classes"]) == {"bottle", "carpet", "cable", "screw"}
    cal = json.loads((artifact_copy / "calibration.json").read_text())
    assert {k: v["quantile"] for k, v in cal["classes"].items()} == {"bottle": 0.9, "carpet": 0.8}
    assert set(manifest["calibration"]["classes"]) == {"bottle", "carpet"}
    from anoclip.runtime import Detector

    with Detector.load(artifact_copy, backend="ort-cpu") as det:  # sha256 of every file, calibration record
        assert set(det.classes) == {"bottle", "carpet", "cable", "screw"}
        assert det.thresholds("carpet")[2] == "calibration"


def test_a_held_lock_gives_a_one_line_error_after_the_timeout(artifact_copy: Path, good: Path):
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from anoclip_core.artlock import artifact_lock\n"
            f"with artifact_lock({str(artifact_copy)!r}, what='anoclip-export add-class'):\n"
            "    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    try:
        t0 = time.monotonic()
        proc = _calibrate(artifact_copy, good, "bottle", 0.9, ANOCLIP_LOCK_TIMEOUT="1")
        _, err = proc.communicate(timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2
    assert err.strip().splitlines()[-1] == (f"error: artifact {artifact_copy} is locked by pid {holder.pid} "
                                            "(anoclip-export add-class); waited 1 s (set $ANOCLIP_LOCK_TIMEOUT to "
                                            "wait longer)")
    assert not (artifact_copy / "calibration.json").exists()
    assert time.monotonic() - t0 >= 1


def test_stress_writers_small(tmp_path: Path):
    """The stress script at a small target: 3 rounds of 2 add-class + 2 calibrate, a loader throughout."""
    proc = subprocess.run([sys.executable, str(HERE / "stress_writers.py"), "--rounds", "3", "--min-loads", "20"],
                          env=_env(), capture_output=True, text=True, timeout=600)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["rounds"] >= 3 and report["loads"] >= 20, report
    assert (report["lost_writes"], report["writer_errors"], report["false_alarms"]) == (0, 0, 0), proc.stdout
    assert proc.returncode == 0
