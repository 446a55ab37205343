"""Metrics against scikit-learn and a brute-force AUPRO; memory bound on a full-size run."""
from __future__ import annotations

import math
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

from anoclip_core import metrics as M
from anoclip_core.errors import InputError


def sk_f1_max(y: np.ndarray, s: np.ndarray) -> float:
    p, r, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * p * r / (p + r)
    return float(np.max(f1[np.isfinite(f1)]))


def brute_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """Loop over every distinct threshold; per-region overlaps; trapezoid to ``limit``, interpolated."""
    gt = masks > 0.5
    regions = []
    for i in range(len(gt)):
        lab, n = ndimage.label(gt[i], structure=np.ones((3, 3)))
        regions += [(i, lab == k) for k in range(1, n + 1)]
    normal = ~gt
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        pros.append(float(np.mean([pred[i][r].sum() / r.sum() for i, r in regions])))
        fprs.append(float((pred & normal).sum() / normal.sum()))
    area = 0.0
    for k in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[k - 1], fprs[k], pros[k - 1], pros[k]
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_cut = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_cut) / 2
            break
    return area / limit


def random_regions(rng: np.random.Generator, n: int, h: int, w: int, max_blobs: int = 3) -> np.ndarray:
    masks = np.zeros((n, h, w), np.uint8)
    for i in range(n):
        for _ in range(rng.integers(0, max_blobs + 1)):
            y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
            masks[i, y : y + rng.integers(1, h // 3 + 2), x : x + rng.integers(1, w // 3 + 2)] = 1
    return masks


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("decimals", [None, 1, 2])
def test_ranking_metrics_equal_sklearn(seed: int, decimals: int | None) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(10, 3000))
    s = rng.random(n).astype(np.float32)
    if decimals is not None:
        s = np.round(s, decimals)
    y = (rng.random(n) < rng.uniform(0.05, 0.8)).astype(int)
    y[0], y[1] = 0, 1
    assert M.auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert M.average_precision(s, y) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert M.f1_max(s, y) == pytest.approx(sk_f1_max(y, s), abs=1e-12)


def test_chunked_sweep_equals_sklearn_with_heavy_ties() -> None:
    rng = np.random.default_rng(1)
    n = 3 * M.CHUNK + 17
    s = np.concatenate([rng.random(n // 2), np.full(n - n // 2, 0.25)]).astype(np.float32)
    y = rng.random(n) < 0.3
    assert M.auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert M.average_precision(s, y) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_pixel_metrics_equal_sklearn_on_flattened_pixels() -> None:
    rng = np.random.default_rng(2)
    masks = random_regions(rng, 7, 24, 20)
    maps = np.round(rng.random(masks.shape) + 0.4 * masks, 2).astype(np.float32)
    labels = masks.reshape(7, -1).max(1)
    scores = np.round(rng.random(7), 1)
    labels[:2] = [0, 1]
    out = M.compute_metrics(maps, masks * 255, scores, labels)
    y, s = masks.ravel(), maps.ravel()
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert out["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert out["pixel_f1_max"] == pytest.approx(sk_f1_max(y, s), abs=1e-12)
    assert out["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert out["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert out["image_f1_max"] == pytest.approx(sk_f1_max(labels, scores), abs=1e-12)
    assert out["aupro"] == pytest.approx(brute_aupro(maps, masks), abs=1e-12)
    assert out["reason"] == {}


@pytest.mark.parametrize("seed", range(5))
def test_exact_aupro_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    masks = random_regions(rng, 4, 16, 18, max_blobs=4)
    masks[0, 2:5, 2:5] = 1
    masks[0, 9:12, 9:12] = 1
    decimals = [None, 2, 1, 3, None][seed]
    maps = rng.random(masks.shape) + rng.uniform(0, 1) * masks
    if decimals is not None:
        maps = np.round(maps, decimals)
    assert M.aupro(maps, masks) == pytest.approx(brute_aupro(maps, masks), abs=1e-12)


def test_aupro_regions_are_weighted_equally() -> None:
    masks = np.zeros((1, 10, 10), np.uint8)
    masks[0, 0:4, 0:4] = 1
    masks[0, 8, 8] = 1
    maps = np.zeros((1, 10, 10), np.float32)
    maps[0, 8, 8] = 1.0
    # curve (0, 0) -> (0, 0.5) [one-pixel region found, no FP] -> (1, 1); at FPR 0.3 the line is at 0.65
    expected = 0.3 * (0.5 + 0.65) / 2 / 0.3
    assert M.aupro(maps, masks) == pytest.approx(expected, abs=1e-12)
    assert M.aupro(maps, masks) == pytest.approx(brute_aupro(maps, masks), abs=1e-12)


def test_regions_touching_at_a_corner_are_one_region() -> None:
    masks = np.zeros((1, 8, 8), np.uint8)
    masks[0, 0:2, 0:2] = 1
    masks[0, 2:5, 2:5] = 1
    maps = np.zeros((1, 8, 8), np.float32)
    maps[0, 0:2, 0:2] = 1.0
    # 8-connected: one 13-pixel region, 4 found at FPR 0 -> curve (0, 4/13) -> (1, 1)
    y0 = 4 / 13
    expected = 0.3 * (y0 + (y0 + 0.3 * (1 - y0))) / 2 / 0.3
    assert M.aupro(maps, masks) == pytest.approx(expected, abs=1e-12)
    assert M.aupro(maps, masks) == pytest.approx(brute_aupro(maps, masks), abs=1e-12)


def smooth_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = np.zeros((12, 64, 64), np.uint8)
    yy, xx = np.mgrid[:64, :64]
    for i in range(6, 12):
        for _ in range(2):
            cy, cx, r = rng.integers(10, 54), rng.integers(10, 54), rng.integers(3, 9)
            masks[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
    maps = ndimage.gaussian_filter(masks.astype(np.float64) + 0.8 * rng.random(masks.shape), (0, 3, 3))
    return maps.astype(np.float32), masks


@pytest.mark.parametrize("seed", range(3))
def test_exact_and_reference_aupro_agree_on_smooth_maps(seed: int) -> None:
    maps, masks = smooth_case(seed)
    exact, ref = M.aupro(maps, masks), M.aupro_reference(maps, masks)
    assert 0.2 < exact < 1.0
    assert abs(exact - ref) < 0.03


def test_reference_aupro_matches_official_loop() -> None:
    maps, masks = smooth_case(7)
    gt = masks > 0.5
    regions = []
    for i in range(len(gt)):
        lab, n = ndimage.label(gt[i], structure=np.ones((3, 3)))
        regions += [(i, lab == k) for k in range(1, n + 1)]
    lo, hi = maps.min(), maps.max()
    delta = (hi - lo) / 200
    pros, fprs = [], []
    for th in np.arange(lo, hi, delta):
        pred = maps > th
        pros.append(np.mean([pred[i][r].sum() / r.sum() for i, r in regions]))
        fprs.append((pred & ~gt).sum() / (~gt).sum())
    pros, fprs = np.array(pros), np.array(fprs)
    keep = fprs < 0.3
    f = fprs[keep]
    f = (f - f.min()) / (f.max() - f.min())
    expected = auc(f, pros[keep])
    assert M.aupro_reference(maps, masks) == pytest.approx(expected, abs=1e-9)


def test_perfect_and_inverted_maps() -> None:
    rng = np.random.default_rng(3)
    masks = random_regions(rng, 5, 20, 20)
    masks[0, 3:6, 3:6] = 1
    maps = masks.astype(np.float32) + 0.01 * rng.random(masks.shape).astype(np.float32)
    labels = masks.reshape(5, -1).max(1)
    labels[-1] = 0
    masks[-1] = 0
    out = M.compute_metrics(maps * (masks > 0) + 0.01, masks, labels.astype(float), labels)
    assert out["pixel_auroc"] == pytest.approx(1.0)
    assert out["aupro"] == pytest.approx(1.0)
    assert out["pixel_f1_max"] == pytest.approx(1.0)
    assert M.aupro(1.0 - maps, masks) < 0.05


def test_undefined_metrics_are_nan_with_reason() -> None:
    maps = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    out = M.compute_metrics(maps, [None, np.zeros((8, 8)), None], [0.1, 0.2, 0.3], [0, 0, 0])
    for key in M.METRIC_KEYS:
        assert math.isnan(out[key]), key
    assert "no defective pixels" in out["reason"]["aupro"]
    assert "no anomalous images" in out["reason"]["image_auroc"]
    masks = np.ones((3, 8, 8))
    out = M.compute_metrics(maps, masks, [0.1, 0.2, 0.3], [1, 1, 1])
    assert "no normal pixels" in out["reason"]["pixel_auroc"]
    assert "no normal images" in out["reason"]["image_ap"]


def test_bad_inputs_raise_input_error() -> None:
    maps = np.zeros((2, 8, 8), np.float32)
    with pytest.raises(InputError, match="does not match"):
        M.compute_metrics(maps, np.zeros((2, 8, 9)), [0, 1], [0, 1])
    with pytest.raises(InputError, match="2 maps, 3 image scores"):
        M.compute_metrics(maps, np.zeros((2, 8, 8)), [0, 1, 2], [0, 1, 1])
    bad = maps.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        M.compute_metrics(bad, np.zeros((2, 8, 8)), [0, 1], [0, 1])


def test_memory_is_bounded_on_a_full_size_run() -> None:
    rng = np.random.default_rng(0)
    n, h, w = 300, 240, 240
    masks = np.zeros((n, h, w), np.uint8)
    for i in range(0, n, 2):
        y, x = rng.integers(0, 200, 2)
        masks[i, y : y + 30, x : x + 25] = 1
        masks[i, (y + 100) % 230 : (y + 100) % 230 + 6, 10:16] = 1
    maps = rng.random((n, h, w), dtype=np.float32)
    maps += 0.3 * masks
    scores = rng.random(n)
    labels = masks.reshape(n, -1).max(1)
    tracemalloc.start()
    try:
        out = M.compute_metrics(maps, masks, scores, labels)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert 0.5 < out["pixel_auroc"] <= 1.0 and 0.0 < out["aupro"] <= 1.0
    # one sorted copy of the scores is 1.0x; anything per-threshold or per-region would be far larger
    assert peak < 1.6 * maps.nbytes, f"peak {peak / 2**20:.0f} MiB for {maps.nbytes / 2**20:.0f} MiB of maps"


def test_metrics_module_does_not_import_torch() -> None:
    modules = "anoclip_core.metrics, anoclip_core.datasets, anoclip_core.visualize"
    code = f"import sys, {modules}; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"
