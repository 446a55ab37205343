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

import hashlib
import json
import logging
import math
import numbers
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import numpy as np

from anoclip_core.artlock import artifact_lock
from anoclip_core.errors import ArtifactError, InputError

from . import contract as mf
from .inputs import collect_inputs

if TYPE_CHECKING:
    from .detector import Detector, InferConfig

log = logging.getLogger("anoclip.runtime")
MAX_PIXELS_PER_IMAGE = 1 << 16
CALIBRATION_NAME = "calibration.json"
FORMAT = "anoclip-calibration"
FORMAT_VERSION = 1
THRESHOLD_FIELDS = ("image_threshold", "pixel_threshold")


def check_threshold(value: Any, where: str, error: type[Exception] = InputError) -> float:
    """The one threshold rule: a real number (not a bool or string), finite, in [0, 1] (score units)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok and math.isfinite(float(value)) and 0.0 <= float(value) <= 1.0:
        return float(value)
    raise error(f"{where} must be a finite number in [0, 1] (score units), got {value!r}")


def validate_calibration(data: Any, path: str | os.PathLike) -> dict[str, Any]:
    """Format, version and every class's thresholds; ``ArtifactError`` naming the class and field."""
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("classes"), dict):
        raise ArtifactError(f"{path} is not an anoclip calibration file")
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        raise ArtifactError(f"{path} has format_version {version!r}; this anoclip reads {FORMAT_VERSION}")
    for name, entry in data["classes"].items():
        if not isinstance(entry, dict):
            raise ArtifactError(f"{path}: class {name!r} must be an object, got {type(entry).__name__}")
        for field in THRESHOLD_FIELDS:
            if field not in entry:
                raise ArtifactError(f"{path}: class {name!r} has no '{field}'")
            check_threshold(entry[field], f"{path}: class {name!r} field '{field}'", ArtifactError)
    return data


def load_calibration(artifact_dir: str | os.PathLike, manifest: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``calibration.json`` of an artifact, validated ({} when absent). With ``manifest``, the file
    must match the manifest's ``calibration`` record (sha256), when there is one."""
    path = Path(artifact_dir) / CALIBRATION_NAME
    record = (manifest or {}).get("calibration")
    if not path.is_file():
        if record:
            raise ArtifactError(f"{path} is missing but the manifest records a calibration (calibration.sha256); "
                                "re-run anoclip calibrate")
        return {}
    try:
        raw = path.read_bytes()
        data = json.loads(raw.decode("utf-8"))  # NaN / Infinity parse; check_threshold names them
    except (OSError, ValueError) as err:
        raise ArtifactError(f"cannot read {path}: {err}") from None
    if record and hashlib.sha256(raw).hexdigest() != record["sha256"]:
        raise ArtifactError(f"{path} changed since anoclip calibrate wrote it (sha256 differs from the manifest's "
                            "calibration.sha256); re-run anoclip calibrate")
    return validate_calibration(data, path)


def write_calibration(artifact_dir: str | os.PathLike, class_name: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    """Store one class's entry, keeping the others; returns the whole file's content.

    Under the artifact's exclusive lock: re-read the file and the manifest, write the file (temp +
    rename), then the manifest with the file's sha256 and provenance (last: a reader pairing the
    new file with the old manifest sees a mismatch and re-reads under the lock)."""
    root = Path(artifact_dir)
    for field in THRESHOLD_FIELDS:
        check_threshold(entry[field], f"calibrated class {class_name!r} field '{field}'")
    with artifact_lock(root, what="anoclip calibrate"):
        manifest = mf.read_manifest(root, check_files=False)
        try:
            old = load_calibration(root, manifest)
        except ArtifactError as err:
            log.warning("starting a new calibration file: the old one is unusable (%s)", err)
            old = {}
        data = {"format": FORMAT, "format_version": FORMAT_VERSION, "classes": dict(old.get("classes", {}))}
        data["classes"][class_name] = dict(entry)
        text = json.dumps(data, indent=2, allow_nan=False) + "\n"
        mf.atomic_write_text(root / CALIBRATION_NAME, text)
        record = dict(manifest.get("calibration") or {"classes": {}})
        record["classes"] = {k: v for k, v in dict(record.get("classes", {})).items() if k in data["classes"]}
        record["classes"][class_name] = {k: entry[k] for k in ("images", "quantile", "created") if k in entry}
        record.update(file=CALIBRATION_NAME, sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(), modified=entry.get("created"))
        manifest["calibration"] = record
        mf.write_manifest(root, manifest)
    return data


def _subsample(amap: np.ndarray, limit: int = MAX_PIXELS_PER_IMAGE) -> np.ndarray:
    if amap.size <= limit:
        return amap.ravel()
    step = int(np.ceil(np.sqrt(amap.size / limit)))
    return amap[::step, ::step].ravel()


def calibrate(detector: "Detector", good: Iterable[str | os.PathLike], class_name: str, quantile: float = 0.99,
              config: "InferConfig | None" = None, write: bool = True, progress=None) -> dict[str, Any]:
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
        data = write_calibration(detector.artifact_dir, class_name, entry)
        detector.calibration = detector._check_calibration(data)
    entry["errors"] = errors
    return entry
