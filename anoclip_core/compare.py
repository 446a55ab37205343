"""The one comparison routine: errors, Pearson and top-k agreement of outputs against a reference.

Torch-free (numpy only). Export verification (graph vs the PyTorch core), the runtime's parity
check (backend vs backend) and the benchmark's fidelity (contender vs the fp32 core) all measure
with these functions, so a figure means the same thing everywhere. Maps are ``[B, H, W]`` and
scores ``[B]``; per-image metrics are aggregated as mean and worst case over the batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Diff:
    """Absolute error of one array against its reference; a shape mismatch or NaN/Inf is infinite."""

    shape: tuple[int, ...]
    max_abs: float
    mean_abs: float

    @property
    def finite(self) -> bool:
        return math.isfinite(self.max_abs)


def diff(got: np.ndarray, ref: np.ndarray) -> Diff:
    """Max and mean absolute error in float64 (an empty array has error 0)."""
    x = np.asarray(got, dtype=np.float64)
    y = np.asarray(ref, dtype=np.float64)
    if x.shape != y.shape:
        return Diff(tuple(x.shape), math.inf, math.inf)
    d = np.abs(x - y)
    if not d.size:
        return Diff(tuple(x.shape), 0.0, 0.0)
    if not np.isfinite(d).all():
        return Diff(tuple(x.shape), math.inf, math.inf)
    return Diff(tuple(x.shape), float(d.max()), float(d.mean()))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two equally shaped arrays (flattened), in float64.

    Two constant arrays that are equal give 1.0; a constant array against a varying one gives NaN.
    """
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch: {np.shape(a)} vs {np.shape(b)}")
    x = x - x.mean()
    y = y - y.mean()
    sx, sy = math.sqrt(float(x @ x)), math.sqrt(float(y @ y))
    if sx == 0.0 and sy == 0.0:
        return 1.0 if np.allclose(a, b) else float("nan")
    if sx == 0.0 or sy == 0.0:
        return float("nan")
    return float(x @ y) / (sx * sy)


def top_fraction_mask(m: np.ndarray, fraction: float = 0.01) -> np.ndarray:
    """Boolean mask of the ``ceil(fraction * size)`` highest values (ties broken by a stable sort)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    flat = np.asarray(m, dtype=np.float64).ravel()
    k = max(1, int(math.ceil(fraction * flat.size)))
    order = np.argsort(-flat, kind="stable")[:k]
    mask = np.zeros(flat.size, dtype=bool)
    mask[order] = True
    return mask.reshape(np.shape(m))


def top_fraction_iou(a: np.ndarray, b: np.ndarray, fraction: float = 0.01) -> float:
    """Intersection over union of the top-``fraction`` pixel sets of two maps."""
    if np.shape(a) != np.shape(b):
        raise ValueError(f"shape mismatch: {np.shape(a)} vs {np.shape(b)}")
    ma, mb = top_fraction_mask(a, fraction), top_fraction_mask(b, fraction)
    union = np.logical_or(ma, mb).sum()
    return float(np.logical_and(ma, mb).sum() / union)


def _agg(values: list[float], worst: str) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(np.nanmean(arr)), "worst": float(np.nanmin(arr) if worst == "min" else np.nanmax(arr))}


def compare(
    maps: np.ndarray, scores: np.ndarray, ref_maps: np.ndarray, ref_scores: np.ndarray, fraction: float = 0.01
) -> dict:
    """Errors of (maps, scores) against the reference (fp32 core) on the same inputs.

    Returns map max/mean absolute error, score max absolute error, per-image Pearson correlation
    of the maps and IoU of their top-``fraction`` pixels (mean and worst image).
    """
    maps = np.asarray(maps, dtype=np.float64)
    ref_maps = np.asarray(ref_maps, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    ref_scores = np.asarray(ref_scores, dtype=np.float64).reshape(-1)
    if maps.shape != ref_maps.shape:
        raise ValueError(f"map shapes differ: {maps.shape} vs reference {ref_maps.shape}")
    if scores.shape != ref_scores.shape:
        raise ValueError(f"score shapes differ: {scores.shape} vs reference {ref_scores.shape}")
    if maps.ndim == 2:
        maps, ref_maps = maps[None], ref_maps[None]
    maps_diff, scores_diff = diff(maps, ref_maps), diff(scores, ref_scores)
    pear = [pearson(m, r) for m, r in zip(maps, ref_maps, strict=True)]
    iou = [top_fraction_iou(m, r, fraction) for m, r in zip(maps, ref_maps, strict=True)]
    return {
        "images": int(maps.shape[0]),
        "map_max_abs": maps_diff.max_abs,
        "map_mean_abs": maps_diff.mean_abs,
        "score_max_abs": scores_diff.max_abs,
        "score_mean_abs": scores_diff.mean_abs,
        "pearson": _agg(pear, "min"),
        "top_iou": _agg(iou, "min"),
        "top_fraction": fraction,
    }
