"""Huge images: refused from the header before decoding, overlays bounded, results flushed per image."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from anoclip_core.errors import InputError
from anoclip_core.transform import read_image


def huge_png(path: Path, w: int = 20000, h: int = 20000) -> Path:
    """A valid gray 8-bit PNG of w x h zeros (PNG spec: IHDR, IDAT rows with filter byte, IEND)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = b"\0" * (w + 1)
    idat = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return huge_png(tmp_path_factory.mktemp("huge") / "huge.png")


def test_huge_png_is_refused_from_its_header_naming_file_and_size(big: Path):
    with pytest.raises(InputError, match=r"huge\.png is 20000 x 20000 \(400000000 pixels\), over the decode limit"):
        read_image(big)


def test_limit_is_configurable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from anoclip_core import transform

    p = tmp_path / "a.png"
    cv2.imwrite(str(p), np.zeros((30, 40, 3), np.uint8))
    monkeypatch.setattr(transform, "_max_pixels", 30 * 40 - 1)
    with pytest.raises(InputError, match="30 x 40|40 x 30"):
        read_image(p)
    monkeypatch.setattr(transform, "_max_pixels", 30 * 40)
    assert read_image(p).shape == (30, 40, 3)


def test_directory_given_as_image_is_reported_as_a_directory(tmp_path: Path):
    d = tmp_path / "looks.png"
    d.mkdir()
    with pytest.raises(InputError, match="is a directory"):
        read_image(d)


# The run is measured in a grandchild: on Linux a forked child's ru_maxrss starts at its parent's
# RSS at fork time and survives exec, so a child forked from this (multi-GiB) pytest process would
# report pytest's memory. The small launcher forks the CLI and reads RUSAGE_CHILDREN.
RUN = "import sys; from anoclip.runtime.cli import infer_main; infer_main(sys.argv[1:])"
LAUNCH = f"""
import resource, subprocess, sys
proc = subprocess.run([sys.executable, "-c", {RUN!r}, *sys.argv[1:]])
sys.stderr.write("MAXRSS_KB=%d\\n" % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(proc.returncode)
"""


def test_infer_refuses_huge_image_keeps_the_rest_and_stays_under_2gb(tiny_artifact: Path, big: Path, tmp_path: Path):
    small = tmp_path / "small.png"
    cv2.imwrite(str(small), np.full((300, 3000, 3), 120, np.uint8))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", LAUNCH, str(tiny_artifact), str(big), str(small), "--class", "bottle",
                           "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    assert "decode limit" in lines[0]["error"] and "20000 x 20000" in lines[0]["error"]
    assert "error" not in lines[1]
    overlay = cv2.imread(str(out / lines[1]["overlay"]))
    assert max(overlay.shape[:2]) <= 2048  # overlay written at bounded resolution
    assert overlay.shape[1] / overlay.shape[0] == pytest.approx(10, rel=0.02)
    rss_kb = int(proc.stderr.rsplit("MAXRSS_KB=", 1)[1].split()[0])
    print(f"anoclip-infer peak RSS {rss_kb} KB")
    assert rss_kb < 2 * 1024 * 1024, rss_kb


def test_max_pixels_option_refuses_before_decode(tiny_artifact: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch):
    from click.testing import CliRunner

    from anoclip.runtime.cli import infer_main
    from anoclip_core import transform

    monkeypatch.setattr(transform, "_max_pixels", transform._max_pixels)  # restored after the test
    monkeypatch.delenv("OPENCV_IO_MAX_IMAGE_PIXELS", raising=False)  # restored after the test

    img = tmp_path / "m.png"
    cv2.imwrite(str(img), np.zeros((64, 64, 3), np.uint8))
    res = CliRunner().invoke(infer_main, [str(tiny_artifact), str(img), "--class", "bottle", "--max-pixels", "1000",
                                          "--quiet"])
    assert res.exit_code == 1
    line = next(x for x in res.output.splitlines() if x.startswith("{"))
    assert "over the decode limit of 1000 pixels" in json.loads(line)["error"]
