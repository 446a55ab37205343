"""Progress bars draw only on a terminal; a log gets plain lines, never carriage-return frames."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from anoclip_core.progress import LineProgress, progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _progress_on(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # the test conftest silences bars by default


def test_pipe_gets_one_plain_line_per_step():
    log = io.StringIO()
    bar = progress(total=3, desc="encode", unit="img", file=log)
    assert isinstance(bar, LineProgress)
    bar.interval_s = 0.0
    for name in ("a", "b", "c"):
        bar.set_postfix_str(name)
        bar.update(1)
    bar.close()
    assert "\r" not in log.getvalue()
    assert log.getvalue().splitlines() == ["encode: 1/3 img (a)", "encode: 2/3 img (b)", "encode: 3/3 img (c)"]


def test_fast_steps_are_throttled_but_the_last_is_written():
    log = io.StringIO()
    with progress(total=500, desc="bench", unit="call", file=log) as bar:  # default interval: 1 s
        for _ in range(500):
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert lines[0] == "bench: 1/500 call" and lines[-1] == "bench: 500/500 call" and len(lines) < 10


def test_iteration_reset_and_disabled():
    log = io.StringIO()
    bar = progress(["x", "y"], desc="classes", unit="class", file=log)
    bar.interval_s = 0.0
    assert list(bar) == ["x", "y"]
    bar.reset(total=1)
    bar.set_description("batch 8")
    bar.update(1)
    assert log.getvalue().splitlines() == ["classes: 1/2 class", "classes: 2/2 class", "batch 8: 1/1 class"]
    quiet = io.StringIO()
    bar = progress(total=2, file=quiet, enabled=False)
    bar.update(2)
    bar.close()
    assert quiet.getvalue() == ""


def test_terminal_gets_a_tqdm_bar():
    from tqdm import tqdm

    bar = progress(total=2, desc="x", file=_Tty())
    assert isinstance(bar, tqdm)
    bar.close()


def test_every_cli_uses_the_helper():
    """No module draws tqdm bars of its own (they would write carriage returns into logs)."""
    root = Path(__file__).resolve().parents[2]
    offenders = [str(p.relative_to(root)) for pkg in ("anoclip_core", "runtime", "export", "benchmarks", "anoclip_demo")
                 for p in (root / pkg).rglob("*.py") if "tqdm" in p.read_text() and p.name != "progress.py"]
    assert offenders == []


def test_infer_piped_to_a_log_writes_lines_not_frames(tiny_artifact_for_progress: Path, tmp_path: Path):
    import cv2
    import numpy as np

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        cv2.imwrite(str(imgs / f"{i}.png"), np.full((20, 30, 3), 40 * i, np.uint8))
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    proc = subprocess.run([sys.executable, "-c", "from anoclip.runtime.cli import infer_main as m; m()",
                           str(tiny_artifact_for_progress), str(imgs), "--class", "bottle", "--backend", "ort-cpu"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr
    assert "anoclip: 3/3 img" in proc.stderr.splitlines()


@pytest.fixture(scope="module")
def tiny_artifact_for_progress(register_tiny: str, text_cache: Path, tmp_path_factory) -> Path:
    from anoclip.export.api import ExportConfig, export_artifact

    out = tmp_path_factory.mktemp("progress-art") / "tiny"
    return Path(export_artifact(ExportConfig(backbone=register_tiny, classes=["bottle"], pretrained="none", out=out,
                                             text_cache=text_cache, progress=False)))
