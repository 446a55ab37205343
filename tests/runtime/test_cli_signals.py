"""``anoclip-infer`` killed mid-run: SIGINT and SIGTERM both unwind (one ``error:`` line, exit 130 /
143), every JSON line already written stays whole, and no temporary file is left in --out."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest


@pytest.mark.parametrize("sig,code,line", [(signal.SIGINT, 130, "error: aborted"),
                                           (signal.SIGTERM, 143, "error: terminated (SIGTERM)")])
def test_killed_infer_unwinds_and_keeps_whole_lines(tiny_artifact, tmp_path, sig, code, line):
    # 400 links to one 2048 x 2048 PNG (tens of ms to decode each): the run outlasts any scheduling delay of
    # this process under a loaded suite, so the signal always lands mid-run (48 x 64 images once finished first)
    y, x = np.mgrid[0:2048, 0:2048]
    picture = np.dstack([(x // 8) % 256, (y // 8) % 256, ((x + y) // 16) % 256]).astype(np.uint8)
    images = tmp_path / "imgs"
    images.mkdir()
    cv2.imwrite(str(images / "im000.png"), picture)
    for i in range(1, 400):
        os.link(images / "im000.png", images / f"im{i:03d}.png")
    out = tmp_path / "out"
    code_to_run = "from anoclip.runtime.cli import infer_main; infer_main()"
    proc = subprocess.Popen([sys.executable, "-c", code_to_run, str(tiny_artifact), str(images), "--class", "bottle",
                             "--backend", "ort-cpu", "--batch", "1", "--out", str(out), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, TQDM_DISABLE="1"))
    results = out / "results.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:  # wait until some lines are written
        if results.is_file() and results.read_text().count("\n") >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err.decode()[-2000:]
    assert err.decode().strip().splitlines()[-1] == line
    lines = results.read_text().splitlines()
    assert 3 <= len(lines) < 400 and all(json.loads(x)["class"] == "bottle" for x in lines)
    assert not [p.name for p in Path(out).iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]
