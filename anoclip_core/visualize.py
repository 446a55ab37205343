"""Heat-map overlays and atomic PNG writing (numpy + OpenCV only; the runtime reuses this)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import InputError
from .fileio import atomic_write_bytes


def _rgb_uint8(image: np.ndarray) -> np.ndarray:
    """H x W x 3 (or H x W gray) uint8, or float in [0, 1] -> H x W x 3 uint8."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] != 3:
        raise InputError(f"overlay image: expected H x W x 3 RGB, got shape {img.shape}")
    if img.dtype == np.uint8:
        return img
    if np.issubdtype(img.dtype, np.floating):
        if not np.isfinite(img).all():
            raise InputError("overlay image contains NaN or infinite values")
        return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    raise InputError(f"overlay image: expected uint8 or float in [0, 1], got {img.dtype}")


def colorize(amap: np.ndarray, vmin: float = 0.0, vmax: float = 1.0) -> np.ndarray:
    """H x W scores -> H x W x 3 uint8 RGB with the JET colormap over [vmin, vmax]."""
    import cv2

    a = np.asarray(amap, dtype=np.float32)
    if a.ndim != 2:
        raise InputError(f"anomaly map: expected H x W, got shape {a.shape}")
    if not vmax > vmin:
        raise InputError(f"colour range needs vmax > vmin, got vmin={vmin}, vmax={vmax}")
    scaled = np.clip((np.nan_to_num(a, nan=vmin) - vmin) / (vmax - vmin), 0.0, 1.0)
    heat = cv2.applyColorMap(np.rint(scaled * 255.0).astype(np.uint8), cv2.COLORMAP_JET)
    return heat[:, :, ::-1]


def heatmap_overlay(
    image: np.ndarray, amap: np.ndarray, alpha: float = 0.5, vmin: float = 0.0, vmax: float = 1.0
) -> np.ndarray:
    """Blend a JET-coloured anomaly map over an RGB image -> H x W x 3 uint8 RGB.

    ``image`` is uint8 or float in [0, 1]; a map of another size is resized (bilinear) to the image.
    """
    import cv2

    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must lie in [0, 1], got {alpha}")
    rgb = _rgb_uint8(image)
    a = np.asarray(amap, dtype=np.float32)
    if a.ndim != 2:
        raise InputError(f"anomaly map: expected H x W, got shape {a.shape}")
    h, w = rgb.shape[:2]
    if a.shape != (h, w):
        a = np.asarray(cv2.resize(a, (w, h), interpolation=cv2.INTER_LINEAR), dtype=np.float32)
    heat = colorize(a, vmin, vmax).astype(np.float32)
    out = (1.0 - alpha) * rgb.astype(np.float32) + alpha * heat
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def save_png(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    """Write an RGB (or gray) uint8 image as PNG atomically: temp file in the folder, then os.replace."""
    import cv2

    img = np.asarray(rgb)
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        raise InputError(f"save_png: expected H x W x 3 or H x W uint8, got {img.dtype} {img.shape}")
    ok, data = cv2.imencode(".png", img[:, :, ::-1] if img.ndim == 3 else img)
    if not ok:
        raise InputError(f"cannot encode PNG for {path}")
    return atomic_write_bytes(path, data.tobytes())
