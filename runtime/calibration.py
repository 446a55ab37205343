"""Per-class thresholds: the ``calibration.json`` file (read, validate, write) and ``calibrate``.

The file lives in the artifact folder beside the manifest. It is not in the manifest's ``files``
set (the graphs and text are never modified by it); instead ``anoclip calibrate`` records its
sha256 and provenance in the manifest's ``calibration`` field, and a load refuses a file that
no longer matches that record (hand-edited or half-copied). Each class entry records what it
depends on (``binding``: the sha256 of the graph file and of the class's prototypes); ``Detector``
ignores, with a warning, a class whose binding no longer matches (re-exported graph, re-encoded
text), while ``add-class`` keeps existing calibrations valid. Format::

    {"format": "anoclip-calibration", "format_version": 1,
     "classes": {"bottle": {"image_threshold": 0.61, "pixel_threshold": 0.58, "quantile": 0.99,
                            "images": 209, "pixels": 1234567, "backend": "ort-cpu", "tile": false,
                            "created": "2026-...Z",
                            "binding": {"model": "fp32", "graph_sha256": "...", "prototypes_sha256": "..."}}}}

and in the manifest::

    "calibration": {"file": "calibration.json", "sha256": "...", "modified": "2026-...Z",
                    "classes": {"bottle": {"images": 209, "quantile": 0.99, "created": "2026-...Z"}}}

Thresholds are quantiles of the good images' own scores (image score; anomaly-map values at the
original image size, subsampled to at most ``MAX_PIXELS_PER_IMAGE`` per image), i.e. in the
scores' units, probabilities: ``check_threshold`` is the one rule for every threshold (given on
the command line or read from the file): a real number, finite, inside [0, 1]. The write runs
under the artifact's lock and re-reads the file and the manifest there, so concurrent runs for
different classes all land; other classes already in the file are kept.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np

from anoclip_core.errors import InputError

from .contract import (  # noqa: F401  (the calibration file is part of the contract; re-exported)
    CALIBRATION_NAME,
    THRESHOLD_FIELDS,
    check_threshold,
    load_calibration,
    validate_calibration,
    write_calibration,
)
from .inputs import collect_inputs

if TYPE_CHECKING:
    from .detector import Detector, InferConfig

log = logging.getLogger("anoclip.runtime")
MAX_PIXELS_PER_IMAGE = 1 << 16


def _subsample(amap: np.ndarray, limit: int = MAX_PIXELS_PER_IMAGE) -> np.ndarray:
    if amap.size <= limit:
        return amap.ravel()
    step = int(np.ceil(np.sqrt(amap.size / limit)))
    return amap[::step, ::step].ravel()


def calibrate(detector: Detector, good: Iterable[str | os.PathLike], class_name: str, quantile: float = 0.99,
              config: InferConfig | None = None, write: bool = True, progress=None) -> dict[str, Any]:
    """Compute (and by default store) the class's thresholds; returns the class entry."""
    from .detector import InferConfig
    if not 0.0 < quantile <= 1.0:
        raise InputError(f"quantile must be in (0, 1], got {quantile}")
    if detector.artifact_dir is None and write:
        raise InputError("cannot store a calibration for a detector without an artifact folder")
    files = collect_inputs(good)
    if not files:
        raise InputError("no good images given for calibration")
    cfg = (config or InferConfig(class_name=class_name)).replace(class_name=class_name, threshold=None,
                                                                   pixel_threshold=None)
    scores: list[float] = []
    pixels: list[np.ndarray] = []
    errors: list[str] = []
    for res in detector.iter_predict(files, class_name, cfg):
        if progress is not None:
            progress(res)
        if not res.ok:
            errors.append(f"{res.path}: {res.error}")
            continue
        scores.append(float(res.score))
        pixels.append(_subsample(res.anomaly_map))
    if not scores:
        raise InputError(f"calibration failed: none of the {len(files)} good images could be processed "
                         f"({errors[0] if errors else 'no images'})")
    allpix = np.concatenate(pixels)
    entry = {
        "image_threshold": float(np.quantile(np.asarray(scores, np.float64), quantile)),
        "pixel_threshold": float(np.quantile(allpix.astype(np.float64), quantile)),
        "quantile": float(quantile),
        "images": len(scores),
        "failed": len(errors),
        "pixels": int(allpix.size),
        "backend": detector.backend_name,
        "tile": bool(cfg.tile),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "binding": detector.calibration_binding(class_name),
    }
    if write:
        assert detector.artifact_dir is not None  # checked above
        data = write_calibration(detector.artifact_dir, class_name, entry)
        detector.calibration = detector._check_calibration(data)
    entry["errors"] = errors
    return entry
