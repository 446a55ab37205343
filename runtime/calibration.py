"""Per-class thresholds: the threshold rule, the calibration binding, and ``calibrate``.

``resolve_thresholds`` is the one rule a ``Detector`` applies (given > calibration > 0.5),
``bind_calibration`` keeps the classes whose binding still matches; the file itself (read,
validate, write, ``check_threshold``) is part of the contract (``runtime.contract``).

The file lives in the artifact folder beside the manifest. It is not in the manifest's ``files``
set (the graphs and text are never modified by it); instead ``anoclip calibrate`` records its
sha256 and provenance in the manifest's ``calibration`` field, and a load refuses a file that
no longer matches that record (hand-edited or half-copied). Each class entry records what it
depends on (``binding``: the sha256 of the graph file, of the class's prototypes and of its
reference bank, and the few-shot ``visual_weight`` the scores were fused with, null for zero-shot);
``Detector`` ignores, with a warning, a class whose binding no longer matches (re-exported graph,
re-encoded text, another bank), and, per run, a calibration made with another visual weight (or
with the bank when the run is zero-shot, or the other way round), while ``add-class`` keeps
existing calibrations valid. Entries written before the weight was recorded count as made with
the default weight 0.5 when their binding names a bank (``calibrate`` had no other), else
zero-shot. Format::

    {"format": "anoclip-calibration", "format_version": 1,
     "classes": {"bottle": {"image_threshold": 0.61, "pixel_threshold": 0.58, "quantile": 0.99,
                            "images": 209, "pixels": 1234567, "backend": "ort-cpu", "tile": false,
                            "created": "2026-...Z",
                            "binding": {"model": "fp32", "graph_sha256": "...", "prototypes_sha256": "...",
                                        "references_sha256": "...", "visual_weight": 0.5}}}}

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

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np

from anoclip_core.errors import InputError
from anoclip_core.refbank import DEFAULT_VISUAL_WEIGHT

from . import contract as mf
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
DEFAULT_IMAGE_THRESHOLD = 0.5
DEFAULT_PIXEL_THRESHOLD = 0.5


#: The binding field holding the few-shot visual weight (null: zero-shot), checked per run, not at load.
BINDING_WEIGHT = "visual_weight"


def calibrated_weight(entry: Mapping[str, Any]) -> float | None:
    """The visual weight a calibration entry was made with (None: zero-shot); see the module docstring
    for entries written before it was recorded."""
    binding = entry.get("binding") or {}
    if BINDING_WEIGHT in binding:
        weight = binding[BINDING_WEIGHT]
        return None if weight is None else float(weight)
    return DEFAULT_VISUAL_WEIGHT if binding.get("references_sha256") else None


def weight_mismatch(calibration: Mapping[str, Any], class_name: str, visual_weight: float | None) -> str | None:
    """Why the class's calibration does not apply to a run with ``visual_weight`` (None: zero-shot), or None."""
    entry = calibration.get("classes", {}).get(class_name) if calibration else None
    if not entry or calibrated_weight(entry) == visual_weight:
        return None

    def say(w: float | None) -> str:
        return "zero-shot (no reference bank)" if w is None else f"few-shot with --visual-weight {w:g}"

    again = "--no-refs" if visual_weight is None else f"--visual-weight {visual_weight:g}"
    return (f"calibration for {class_name!r} was made {say(calibrated_weight(entry))}, this run is "
            f"{say(visual_weight)}; its thresholds do not apply, using the defaults: re-run "
            f"anoclip calibrate --class {class_name!r} {again}")


def resolve_thresholds(calibration: Mapping[str, Any], class_name: str, threshold: float | None = None,
                       pixel_threshold: float | None = None, visual_weight: float | None = None
                       ) -> tuple[float, float, str]:
    """(image threshold, pixel threshold, source) of a class: explicit > calibration > default 0.5.

    The calibration counts only when made with the run's ``visual_weight`` (None: zero-shot).
    ``source`` is "given", "calibration" or "default", or "image:<s1>,pixel:<s2>" when they differ.
    """
    cal = calibration.get("classes", {}).get(class_name) if calibration else None
    if weight_mismatch(calibration, class_name, visual_weight):
        cal = None

    def pick(given: float | None, field: str, default: float) -> tuple[float, str]:
        if given is not None:
            return float(given), "given"
        if cal:
            return float(cal[field]), "calibration"
        return default, "default"

    img, s1 = pick(threshold, "image_threshold", DEFAULT_IMAGE_THRESHOLD)
    px, s2 = pick(pixel_threshold, "pixel_threshold", DEFAULT_PIXEL_THRESHOLD)
    return img, px, (s1 if s1 == s2 else f"image:{s1},pixel:{s2}")


def calibration_binding(manifest: Mapping[str, Any], precision: str | None,
                        prototypes: np.ndarray | None, class_name: str | None = None,
                        visual_weight: float | None = None) -> dict[str, Any]:
    """What a class's calibration depends on: the graph file's sha256, the class prototypes and,
    when the class has a few-shot reference bank, the bank file's sha256 (a new or replaced bank
    changes the scores, so thresholds calibrated before it no longer apply) and the ``visual_weight``
    the scores were fused with (None: zero-shot, also for a class without a bank).

    (Not the manifest: ``add-class`` rewrites it without changing existing classes' scores.)
    """
    files = manifest.get("files", {})
    model_file = manifest.get("models", {}).get(precision, {}).get("file")
    binding = {
        "model": precision,
        "graph_sha256": files.get(model_file),
        "prototypes_sha256": hashlib.sha256(prototypes.tobytes()).hexdigest() if prototypes is not None else None,
    }
    bank = mf.reference_entry(manifest, class_name) if class_name is not None else None
    if bank is not None:
        binding["references_sha256"] = files.get(bank["file"])
    binding[BINDING_WEIGHT] = None if bank is None or visual_weight is None else float(visual_weight)
    return binding


def _load_time(binding: Mapping[str, Any]) -> dict[str, Any]:
    """The binding without the visual weight (a per-run choice, checked by ``weight_mismatch``)."""
    return {k: v for k, v in binding.items() if k != BINDING_WEIGHT}


def _stale_message(class_name: str, made: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    """Why a class's calibration is ignored, and the command that makes one for this run."""
    if made.get("model") != now.get("model"):  # another precision: `calibrate` must be told which
        return (f"calibration for {class_name!r} was made with the {made.get('model')} graph, this run uses "
                f"{now.get('model')}; ignoring it (default thresholds), re-run anoclip calibrate --precision "
                f"{now.get('model')}")
    return (f"calibration for {class_name!r} was made with another graph, other text embeddings or another "
            "reference bank; ignoring it (default thresholds), re-run anoclip calibrate")


def bind_calibration(data: Mapping[str, Any], binding: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """The calibration file's content, keeping only the classes whose ``binding`` still matches
    ``binding(class)`` (this graph, these prototypes); the others are dropped with a warning."""
    if not data:
        return {}
    validate_calibration(data, CALIBRATION_NAME)
    kept = {}
    for cls_name, entry in data.get("classes", {}).items():
        now = binding(cls_name)
        if "binding" in entry and _load_time(entry["binding"]) != _load_time(now):
            log.warning("%s", _stale_message(cls_name, entry["binding"], now))
        else:
            kept[cls_name] = entry
    return {**data, "classes": kept}


def _subsample(amap: np.ndarray, limit: int = MAX_PIXELS_PER_IMAGE) -> np.ndarray:
    if amap.size <= limit:
        return amap.ravel()
    step = int(np.ceil(np.sqrt(amap.size / limit)))
    return amap[::step, ::step].ravel()


def calibrate(detector: Detector, good: Iterable[str | os.PathLike], class_name: str, quantile: float = 0.99,
              config: InferConfig | None = None, write: bool = True,
              progress: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Compute (and by default store) the class's thresholds; returns the class entry. The binding
    records ``config``'s visual weight when the class's bank is used (``use_refs``), else None.
    ``progress(result)`` is called after each image."""
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
        assert res.score is not None and res.anomaly_map is not None  # an ok result has both
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
        "binding": detector.calibration_binding(class_name, cfg),
    }
    if write:
        assert detector.artifact_dir is not None  # checked above
        data = write_calibration(detector.artifact_dir, class_name, entry)
        detector.calibration = bind_calibration(data, detector.calibration_binding)
    entry["errors"] = errors
    return entry
