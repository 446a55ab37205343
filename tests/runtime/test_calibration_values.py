"""Calibration thresholds against values computed by hand (q != 0.5, asymmetric data).

A stand-in detector yields fixed results, so the quantile arithmetic is checked exactly:
numpy's default (linear) quantile of n sorted values at q sits at position q * (n - 1).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from anoclip.runtime.calibration import MAX_PIXELS_PER_IMAGE, calibrate
from anoclip.runtime.detector import Result

SCORES = [0.9, 0.1, 0.3, 0.2]  # sorted: 0.1 0.2 0.3 0.9
MAPS = [np.zeros((2, 2), np.float32), np.array([[0, 1], [2, 3]], np.float32),
        np.full((1, 1), 10.0, np.float32), np.array([[4.0]], np.float32)]
# pixels sorted: 0 0 0 0 0 1 2 3 4 10 (n = 10)


class FakeDetector:
    """Only what ``calibrate(write=False)`` touches: iter_predict, backend_name, calibration_binding."""

    artifact_dir = None
    backend_name = "fake"

    def __init__(self, scores, maps, fail: int = 0) -> None:
        self.scores, self.maps, self.fail = scores, maps, fail

    def calibration_binding(self, class_name, cfg=None):
        return {"model": "fp32"}

    def iter_predict(self, files, class_name, cfg):
        for path, s, m in zip(files, self.scores, self.maps, strict=False):  # more files than scores: the rest fail
            yield Result(path=path, class_name=class_name, score=s, anomaly_map=m)
        for path in list(files)[len(self.scores):len(self.scores) + self.fail]:
            yield Result(path=path, class_name=class_name, error="unreadable")


def _files(tmp_path: Path, n: int) -> list[str]:
    out = []
    for i in range(n):
        p = tmp_path / f"g{i}.png"
        p.write_bytes(b"x")
        out.append(str(p))
    return out


@pytest.mark.parametrize("q,image_thr,pixel_thr", [
    # image: pos q*3; pixel: pos q*9
    (0.75, 0.3 + 0.25 * 0.6, 2 + 0.75 * 1),   # img pos 2.25 -> 0.45; pix pos 6.75 -> 2 + 0.75 = 2.75
    (0.9, 0.3 + 0.7 * 0.6, 4 + 0.1 * 6),      # img pos 2.7 -> 0.72; pix pos 8.1 -> 4 + 0.1 * 6 = 4.6
    (1.0, 0.9, 10.0),
    (0.2, 0.1 + 0.6 * 0.1, 0.0),              # img pos 0.6 -> 0.16; pix pos 1.8 -> 0
])
def test_thresholds_equal_hand_quantiles(tmp_path, q, image_thr, pixel_thr):
    entry = calibrate(FakeDetector(SCORES, MAPS), _files(tmp_path, 4), "bottle", quantile=q, write=False)
    assert entry["image_threshold"] == pytest.approx(image_thr, abs=1e-9)
    assert entry["pixel_threshold"] == pytest.approx(pixel_thr, abs=1e-6)
    assert entry["images"] == 4 and entry["pixels"] == 10 and entry["quantile"] == q


def test_failed_images_are_counted_not_used(tmp_path):
    entry = calibrate(FakeDetector(SCORES, MAPS, fail=1), _files(tmp_path, 5), "bottle", quantile=0.9, write=False)
    assert entry["images"] == 4 and entry["failed"] == 1
    assert entry["image_threshold"] == pytest.approx(0.72, abs=1e-9)


def test_large_maps_are_subsampled_on_a_regular_grid(tmp_path):
    """512 x 512 = 4 x MAX_PIXELS -> every 2nd row and column: 65536 pixels, the odd ones dropped."""
    assert MAX_PIXELS_PER_IMAGE == 1 << 16
    m = np.zeros((512, 512), np.float32)
    m[1::2, :] = 1.0  # odd rows are never sampled with step 2
    entry = calibrate(FakeDetector([0.5], [m]), _files(tmp_path, 1), "bottle", quantile=1.0, write=False)
    assert entry["pixels"] == 256 * 256
    assert entry["pixel_threshold"] == 0.0
