"""Reading one artifact folder for inference: manifest, prototypes and calibration as one snapshot.

``read_artifact`` checks what ``Detector.load`` relies on before any engine starts: the manifest
(and the sha256 of every file), every class's prototypes ``[2, D]`` finite and unit-norm, and
the calibration file against the manifest's record; a writer half-way (``add-class``,
``calibrate``) is waited for under the artifact's shared lock, and leftovers of a killed writer
are recovered first. Per-sentence embeddings (AnoCLIP+ only) are read on demand.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from anoclip_core import staging
from anoclip_core.artlock import consistent_read
from anoclip_core.errors import ArtifactError

from . import contract as mf
from .contract import load_calibration
from .refs import StoredBanks, load_banks

log = logging.getLogger("anoclip.runtime")

#: Largest accepted deviation of a stored prototype's L2 norm from 1 (float32 rounding is ~1e-7).
UNIT_NORM_TOL = 1e-3


def check_prototypes(protos: Mapping[str, np.ndarray], text_file: str) -> None:
    """Every class's prototypes [2, D] finite and L2-normalised, as the exporter writes them."""
    for name, p in protos.items():
        arr = np.asarray(p, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[0] != 2:
            raise ArtifactError(f"{text_file}: prototypes of class {name!r} must be [2, D], got {list(arr.shape)}")
        if not np.isfinite(arr).all():
            raise ArtifactError(f"{text_file}: prototypes of class {name!r} contain NaN or infinite values")
        norms = np.linalg.norm(arr, axis=1)
        if np.abs(norms - 1.0).max() > UNIT_NORM_TOL:
            raise ArtifactError(f"{text_file}: prototypes of class {name!r} are not unit-norm "
                                f"(norms {norms[0]:.4g}, {norms[1]:.4g})")


def read_prototypes(artifact_dir: str | os.PathLike, manifest: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Every listed class's prototypes from the text file, each checked to be [2, embed_dim]
    (the graph's declared ``text_prototypes`` width), so a mismatch fails here, not mid-batch."""
    text_path = Path(artifact_dir) / manifest["text"]["file"]
    try:
        with np.load(text_path) as npz:
            protos = {c: npz[f"{c}/prototypes"] for c in manifest["text"]["classes"] if f"{c}/prototypes" in npz}
    except Exception as err:  # noqa: BLE001 - OSError, BadZipFile, ValueError, pickle refusals
        raise ArtifactError(f"cannot read text embeddings {text_path}: {type(err).__name__}: {err}") from None
    width = int(manifest["embed_dim"])
    for name, arr in protos.items():
        if arr.shape != (2, width):
            raise ArtifactError(f"{text_path.name}: prototypes of class {name!r} have shape {list(arr.shape)}, "
                                f"the graph takes [2, {width}] (manifest embed_dim)")
    return protos


def read_artifact(root: Path, verify: bool = True, calibration: bool = True
                  ) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any], StoredBanks]:
    """Manifest (sha256 of every file with ``verify``), prototypes, calibration (skipped when
    ``calibration`` is False: ``anoclip calibrate`` rewrites a broken one) and reference banks of one
    artifact, read as one consistent snapshot (re-read under the shared lock when a writer was half-way).

    A damaged reference bank does not fail the read: it is listed in ``StoredBanks.broken`` (after
    one re-read under the lock, so a bank being replaced is not mistaken for a damaged one)."""
    attempts = []

    def read() -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any], StoredBanks]:
        attempts.append(1)
        manifest = mf.read_manifest(root, check_files=verify)
        protos = read_prototypes(root, manifest)
        check_prototypes(protos, manifest["text"]["file"])
        cal = load_calibration(root, manifest if verify else None) if calibration else {}
        banks = load_banks(root, manifest, verify)
        if banks.broken and len(attempts) == 1:
            raise ArtifactError(next(iter(banks.broken.values())))  # consistent_read re-reads under the lock
        return manifest, protos, cal, banks

    if staging.has_leftovers(root):
        for note in mf.recover_artifact(root):
            log.warning("%s", note)
    return consistent_read(root, read)


def read_sentences(artifact_dir: Path | None, manifest: Mapping[str, Any], class_name: str) -> np.ndarray:
    """[924, D] per-sentence text embeddings of a class (needed by AnoCLIP+ only)."""
    if artifact_dir is None:
        raise ArtifactError("this detector has no artifact folder to read sentence embeddings from")
    key = f"{class_name}/sentences"
    with np.load(artifact_dir / manifest["text"]["file"]) as npz:
        if key not in npz:
            raise ArtifactError(f"artifact text embeddings lack {key!r} (needed by --tta)")
        return np.asarray(npz[key], dtype=np.float32)
