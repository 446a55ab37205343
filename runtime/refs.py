"""Few-shot reference banks in an artifact: build them with the artifact's own graph, store, load, apply.

Torch-free. The bank format, the shot draw, the coreset, the host search and the fusion rule are
``anoclip_core.refbank``'s (the core uses the same functions); this module only connects them to
an artifact folder and to ``Detector``:

* ``build_bank``: good images -> the graph's ``local_embeddings`` (pre-processed exactly as for
  inference) -> ``ReferenceBank``, merged into the class's existing bank unless replaced, and
  optionally reduced by PatchCore's greedy coreset.
* ``write_bank``: the ONE function that changes the artifact (the writer lock wraps it). The bank
  goes to a content-addressed file ``refs/<class>-<name hash>.<sha12>.npz`` (temp file, then rename), then the
  manifest (``files`` + ``references.<class>``) is replaced atomically, then the old bank file is
  removed: a crash at any point leaves a manifest whose files all match their sha256.
* ``FewShot``: what ``Detector`` applies per batch. The WinCLIP+ rule is linear in the maps, so
  it is applied on the patch grid, before the §4 smoothing and upsampling that both parts share::

      probs' = fuse(probs, visual)                      == fuse of the two post-processed maps
      score' = fuse_image_score(score, max(smooth(visual)))
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from anoclip_core.artlock import artifact_lock
from anoclip_core.errors import AnoCLIPError, BankError
from anoclip_core.fileio import sha256_file
from anoclip_core.refbank import (
    ReferenceBank,
    coverage_radius,
    fuse,
    fuse_image_score,
    greedy_coreset,
    list_images,
    select_shots,
)
from anoclip_core.transform import normalize_rgb, read_image, to_rgb_float

from . import contract as mf
from .postprocess import smooth_patch_probs
from .refsearch import SearchFn

log = logging.getLogger("anoclip.runtime")



# building ---------------------------------------------------------------------------------------
def encode_images(detector: Any, class_name: str, paths: Sequence[Path], batch: int = 8) -> np.ndarray:
    """Good image files -> their L2-normalised local embeddings [n * h * w, D] from the artifact's graph."""
    cfg = detector.preprocess_config
    out = []
    for i in range(0, len(paths), batch):
        px = []
        for p in paths[i : i + batch]:
            try:
                px.append(normalize_rgb(to_rgb_float(read_image(os.fspath(p)), "RGB", name=os.fspath(p)), cfg))
            except AnoCLIPError as err:
                raise BankError(f"good image {p} cannot be used: {err}") from None
        local = detector.run_graph(np.stack(px), class_name, ("local_embeddings",))["local_embeddings"]
        out.append(np.asarray(local, np.float32).reshape(-1, local.shape[-1]))
    return np.concatenate(out)


def images_digest(names: Sequence[str]) -> str:
    """sha256 of the bank's image names (in order): a short way to tell two banks' image lists apart."""
    return hashlib.sha256(json.dumps(list(names)).encode("utf-8")).hexdigest()


def reduce(bank: ReferenceBank, coreset: int | None, seed: int) -> ReferenceBank:
    """``bank`` bounded by PatchCore's greedy coreset to ``coreset`` patches (unchanged when it is smaller)."""
    if coreset is None or coreset >= bank.size:
        return bank
    idx = greedy_coreset(bank.embeddings, coreset, seed)
    info = {"size": int(coreset), "seed": int(seed), "projection_dim": None,
            "radius": coverage_radius(bank.embeddings, idx)}
    return ReferenceBank(bank.embeddings[idx], bank.backbone, bank.image_size, bank.patch_grid, bank.images,
                         bank.source, bank.patches, info, dict(bank.extra))


def build_bank(detector: Any, class_name: str, good: str | os.PathLike, shots: int | None = None,
               coreset: int | None = None, seed: int = 0, replace: bool = False, batch: int = 8
               ) -> ReferenceBank:
    """Encode ``shots`` good images of ``good`` (all when None) into a bank of those images only;
    ``write_bank`` merges it with the class's stored bank (unless ``replace``) under the lock.

    Images whose names are already in the bank are skipped (a folder that grows on the line can be
    passed again); the shot draw picks among the others."""
    mf.require_class(detector.manifest, class_name)
    if coreset is not None and coreset < 1:
        raise BankError(f"--coreset must be >= 1, got {coreset}")
    old = detector.references.get(class_name) if not replace else None
    found = list_images(good)
    fresh = [p for p in found if old is None or p.name not in old.images]
    if not fresh:
        raise BankError(f"all {len(found)} image(s) of {good} are already in the {class_name!r} bank "
                        "(use --replace to rebuild it)")
    paths = select_shots(fresh, shots, seed, f"good-image folder {good} (images not yet in the bank)")
    m = detector.manifest
    return ReferenceBank(encode_images(detector, class_name, paths, batch), m["backbone"], m["image_size"],
                         tuple(m["patch_grid"]), tuple(p.name for p in paths), os.fspath(good))


# storing ----------------------------------------------------------------------------------------
def _file_stem(class_name: str) -> str:
    """A short, safe file stem that is unique per class ("metal nut" and "metal_nut" differ)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", class_name)[:48] or "class"
    return f"{safe}-{hashlib.sha256(class_name.encode('utf-8')).hexdigest()[:8]}"


def manifest_entry(file: str, bank: ReferenceBank) -> dict[str, Any]:
    """The manifest's ``references.<class>`` entry for a stored bank (see ``runtime.contract``)."""
    return {
        "file": file, "shots": bank.shots, "size": bank.size, "patches": int(bank.patches or bank.size),
        "coreset": bank.coreset, "backbone": bank.backbone, "embed_dim": bank.embed_dim,
        "images_sha256": images_digest(bank.images), "source": bank.source,
        "updated": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def write_bank(artifact_dir: str | os.PathLike, class_name: str, bank: ReferenceBank, merge: bool = False,
               coreset: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Store ``bank`` as the class's reference bank in the artifact (see module docstring); returns its
    manifest entry. The graph and the other files are not touched. Runs under the artifact's writer
    lock and re-reads the manifest and the stored bank there: with ``merge`` the bank is added to the
    CURRENT stored bank (so two concurrent ``anoclip refs`` runs both land), then bounded by a coreset
    of ``coreset`` patches (default: the stored bank's coreset size, so a merge keeps the bound)."""
    root = Path(artifact_dir)
    with artifact_lock(root, what="anoclip refs"):
        data = mf.read_manifest(root, check_files=False)
        mf.require_class(data, class_name)
        bank.check_compatible(data["backbone"], data["embed_dim"], data["image_size"], "the reference bank")
        current = _stored_bank(root, data, class_name) if merge else None
        if current is not None:
            coreset = coreset or (current.coreset or {}).get("size")
            bank = current.merge(bank)
        return _write_bank_locked(root, data, class_name, reduce(bank, coreset, seed))


def _stored_bank(root: Path, data: Mapping[str, Any], class_name: str) -> ReferenceBank | None:
    entry = mf.reference_entry(data, class_name)
    return ReferenceBank.load(root / entry["file"]) if entry else None


def _write_bank_locked(root: Path, data: dict[str, Any], class_name: str, bank: ReferenceBank) -> dict[str, Any]:
    staged = bank.save(root / mf.REFS_DIR / f".{_file_stem(class_name)}.staged-{os.getpid()}.npz")
    digest = sha256_file(staged)
    name = f"{mf.REFS_DIR}/{_file_stem(class_name)}.{digest[:12]}.npz"
    os.replace(staged, root / name)
    old = mf.reference_entry(data, class_name)
    files = {k: v for k, v in data["files"].items() if old is None or k != old["file"]}
    entry = manifest_entry(name, bank)
    data = {**data, "files": {**files, name: digest},
            mf.REFS_FIELD: {**mf.references(data), class_name: entry}}
    mf.write_manifest(root, data)
    if old is not None and old["file"] != name:
        (root / old["file"]).unlink(missing_ok=True)
    return entry


# loading and applying ---------------------------------------------------------------------------
def load_banks(artifact_dir: str | os.PathLike, manifest: Mapping[str, Any]) -> dict[str, ReferenceBank]:
    """Every class's bank named by the manifest, checked against the artifact's backbone, D and size."""
    banks = {}
    for cls_name, entry in mf.references(manifest).items():
        bank = ReferenceBank.load(Path(artifact_dir) / entry["file"])
        bank.check_compatible(manifest["backbone"], manifest["embed_dim"], manifest["image_size"],
                              f"reference bank {entry['file']}")
        if bank.shots != entry["shots"] or bank.size != entry["size"]:
            raise BankError(f"reference bank {entry['file']} holds {bank.shots} shots / {bank.size} patches, "
                            f"the manifest says {entry['shots']} / {entry['size']}")
        banks[cls_name] = bank
    return banks


@dataclass(frozen=True)
class FewShot:
    """A class's bank, the visual weight and the search that runs it (``runtime.refsearch``); applied per
    batch on the grid."""

    bank: ReferenceBank
    weight: float
    search: SearchFn

    @property
    def shots(self) -> int:
        return self.bank.shots

    def apply(self, probs: np.ndarray, scores: np.ndarray, local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Text patch probabilities [B, h, w] and scores [B] -> the WinCLIP+ fused ones."""
        visual = np.asarray(self.search(local), np.float32)
        peak = smooth_patch_probs(visual).max(axis=(-2, -1))
        fused = fuse(np.asarray(probs, np.float32), visual, self.weight)
        return fused.astype(np.float32), np.asarray(fuse_image_score(scores, peak, self.weight), np.float32)
