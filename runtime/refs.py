"""Few-shot reference banks in an artifact: build them with the artifact's own graph, store, load, apply.

Torch-free. The bank format, the shot draw, the coreset, the host search and the fusion rule are
``anoclip_core.refbank``'s (the core uses the same functions); this module only connects them to
an artifact folder and to ``Detector``:

* ``build_bank``: good images (listed by ``runtime.inputs.folder_images``, as ``infer`` and
  ``calibrate`` list a folder) -> the graph's ``local_embeddings`` (pre-processed exactly as for
  inference) -> ``ReferenceBank``, merged into the class's existing bank unless replaced, and
  optionally reduced by PatchCore's greedy coreset. An image is "already in the bank" when its
  content (sha256 of the file) is, whatever its name or folder; ``write_bank`` checks it again
  against the bank it re-reads under the lock, so concurrent runs adding one image keep it once.
* ``write_bank``: the ONE function that changes the artifact (the writer lock wraps it). The bank
  goes to a content-addressed file ``refs/<class>-<name hash>.<sha12>.npz`` (temp file, then rename), then the
  manifest (``files`` + ``references.<class>``) is replaced atomically, then the old bank file is
  removed: a crash at any point leaves a manifest whose files all match their sha256.
* ``read_bank`` / ``load_banks``: a stored bank, checked (sha256, format, model, manifest entry).
  A damaged bank blocks only its own class: ``load_banks`` sets it aside in ``StoredBanks.broken``,
  and using it names the file and the repair command (``anoclip refs ... --replace``).
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from anoclip_core.artlock import artifact_lock
from anoclip_core.errors import AnoCLIPError, ArtifactError, BankError
from anoclip_core.fileio import sha256_file
from anoclip_core.refbank import (
    ReferenceBank,
    coverage_radius,
    fuse,
    fuse_image_score,
    greedy_coreset,
    select_shots,
)
from anoclip_core.transform import normalize_rgb, read_image, to_rgb_float

from . import contract as mf
from .inputs import folder_images
from .postprocess import smooth_patch_probs
from .refsearch import SearchFn

log = logging.getLogger("anoclip.runtime")


# building ---------------------------------------------------------------------------------------
def encode_images(detector: Any, class_name: str, paths: Sequence[Path], batch: int = 8,
                  progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Good image files -> their L2-normalised local embeddings [n * h * w, D] from the artifact's graph
    (``progress(n)`` after each batch of ``n`` images)."""
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
        if progress is not None:
            progress(len(px))
    return np.concatenate(out)


def images_digest(names: Sequence[str]) -> str:
    """sha256 of a JSON list of strings (the bank's image names, or their content sha256, in order):
    a short way to tell two banks' image lists apart."""
    return hashlib.sha256(json.dumps(list(names)).encode("utf-8")).hexdigest()


def reduce(bank: ReferenceBank, coreset: int | None, seed: int) -> ReferenceBank:
    """``bank`` bounded by PatchCore's greedy coreset to ``coreset`` patches (unchanged when it is smaller)."""
    if coreset is None or coreset >= bank.size:
        return bank
    idx = greedy_coreset(bank.embeddings, coreset, seed)
    info = {"size": int(coreset), "seed": int(seed), "projection_dim": None,
            "radius": coverage_radius(bank.embeddings, idx)}
    return ReferenceBank(bank.embeddings[idx], bank.backbone, bank.image_size, bank.patch_grid, bank.images,
                         bank.source, bank.patches, info, dict(bank.extra), bank.image_sha256)


def build_bank(detector: Any, class_name: str, good: str | os.PathLike, shots: int | None = None,
               coreset: int | None = None, seed: int = 0, replace: bool = False, batch: int = 8,
               progress: Any = None) -> ReferenceBank:
    """Encode ``shots`` good images of the folder ``good`` (recursively; all when None) into a bank of
    those images only; ``write_bank`` merges it with the class's stored bank (unless ``replace``).

    Images whose content is already in the bank are skipped, and so is a second copy of one image
    under another name (a folder that grows on the line can be passed again); the shot draw picks
    among the others. Banks written before content hashes were kept are matched by name.
    ``progress``: a bar (``anoclip_core.progress``), reset to the number of images, advanced per batch."""
    mf.require_class(detector.manifest, class_name, detector.artifact_dir)
    mf.refuse_case_collision(detector.manifest["text"]["classes"], class_name, "this artifact")
    if coreset is not None and coreset < 1:
        raise BankError(f"--coreset must be >= 1, got {coreset}")
    old = None if replace else _current_bank(detector, class_name)
    root = Path(good)
    if not root.is_dir():
        raise BankError(f"good-image folder not found: {root}")
    found = [Path(p) for p in folder_images(root)]
    fresh = _not_in_bank(found, old)
    if not fresh:
        raise BankError(f"all {len(found)} image(s) of {good} are already in the {class_name!r} bank "
                        "(same content; use --replace to rebuild it)")
    picked = select_shots(list(fresh.items()), shots, seed, f"good-image folder {good} (images not yet in the bank)")
    paths = [p for p, _ in picked]
    if progress is not None:
        progress.reset(total=len(paths))
    m = detector.manifest
    return ReferenceBank(encode_images(detector, class_name, paths, batch, progress and progress.update), m["backbone"],
                         m["image_size"], tuple(m["patch_grid"]), tuple(p.relative_to(root).as_posix() for p in paths),
                         os.fspath(good), image_sha256=tuple(h for _, h in picked))


def _current_bank(detector: Any, class_name: str) -> ReferenceBank | None:
    """The class's stored bank (None without one); a damaged one is an error naming the repair."""
    broken = getattr(detector, "broken_references", {}).get(class_name)
    if broken is not None:
        raise BankError(broken)
    return detector.references.get(class_name)


@dataclass(frozen=True)
class _Known:
    """What counts as "already in a bank": its images' content sha256, and the names of its images
    stored without one (banks written before content hashes were kept), matched by file name."""

    hashes: frozenset[str]
    legacy_names: frozenset[str]

    @classmethod
    def of(cls, bank: ReferenceBank | None) -> _Known:
        if bank is None:
            return cls(frozenset(), frozenset())
        pairs = list(zip(bank.images, bank.image_sha256, strict=True))
        return cls(frozenset(h for _, h in pairs if h), frozenset(Path(n).name for n, h in pairs if not h))

    def has(self, name: str, digest: str) -> bool:
        return (bool(digest) and digest in self.hashes) or Path(name).name in self.legacy_names


def _not_in_bank(found: Sequence[Path], old: ReferenceBank | None) -> dict[Path, str]:
    """``{path: content sha256}`` of the images whose content is neither in ``old`` nor earlier in
    ``found`` (first copy kept); an ``old`` image without a stored hash is matched by its name."""
    known = _Known.of(old)
    seen: set[str] = set()
    fresh: dict[Path, str] = {}
    for p in found:
        digest = sha256_file(p)
        if digest not in seen and not known.has(p.name, digest):
            fresh[p] = digest
            seen.add(digest)
    return fresh


def _new_images(bank: ReferenceBank, stored: ReferenceBank, class_name: str) -> ReferenceBank | None:
    """``bank`` without the images already in ``stored`` (None when none is left). The stored bank is
    re-read under the writer lock, so this catches images that another ``anoclip refs`` run added
    after this run's own check in ``build_bank``."""
    known = _Known.of(stored)
    keep = [i for i, (n, h) in enumerate(zip(bank.images, bank.image_sha256, strict=True)) if not known.has(n, h)]
    if len(keep) < bank.shots:
        log.warning("%d image(s) for the %r bank are already in it (added meanwhile by another anoclip refs run); "
                    "skipped", bank.shots - len(keep), class_name)
    if not keep:
        return None
    try:
        return bank if len(keep) == bank.shots else bank.select_images(keep)
    except BankError as err:
        raise BankError(f"cannot add to the {class_name!r} bank without repeating images already in it: {err}; "
                        "build the new bank without them, or use --replace") from None


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
        "images_sha256": images_digest(bank.images), "contents_sha256": images_digest(bank.image_sha256),
        "source": bank.source,
        "updated": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def write_bank(artifact_dir: str | os.PathLike, class_name: str, bank: ReferenceBank, merge: bool = False,
               coreset: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Store ``bank`` as the class's reference bank in the artifact (see module docstring); returns its
    manifest entry. The graph and the other files are not touched. Runs under the artifact's writer
    lock and re-reads the manifest and the stored bank there: with ``merge`` the bank's images whose
    content is not yet in the CURRENT stored bank are added to it (so two concurrent ``anoclip refs``
    runs both land, and an image both add is kept once; when none is new, nothing is written and the
    stored entry is returned), then bounded by a coreset of ``coreset`` patches (default: the stored
    bank's coreset size, so a merge keeps the bound)."""
    root = Path(artifact_dir)
    with artifact_lock(root, what="anoclip refs"):
        data = mf.read_manifest(root, check_files=False)
        mf.require_class(data, class_name)
        bank.check_compatible(data["backbone"], data["embed_dim"], data["image_size"], "the reference bank")
        current = _stored_bank(root, data, class_name) if merge else None
        if current is not None:
            added = _new_images(bank, current, class_name)
            if added is None:
                return dict(mf.reference_entry(data, class_name) or {})  # nothing new: the stored bank stays
            coreset = coreset or (current.coreset or {}).get("size")
            bank = current.merge(added)
        return _write_bank_locked(root, data, class_name, reduce(bank, coreset, seed))


def _stored_bank(root: Path, data: Mapping[str, Any], class_name: str) -> ReferenceBank | None:
    if mf.reference_entry(data, class_name) is None:
        return None
    try:
        return read_bank(root, data, class_name)
    except BankError as err:
        raise BankError(f"{err}; {mf.bank_repair_hint(root, class_name)}") from None


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
def read_bank(artifact_dir: str | os.PathLike, manifest: Mapping[str, Any], class_name: str,
              verify: bool = True) -> ReferenceBank:
    """The class's stored bank, checked: its sha256 (with ``verify``), its format and contents, the
    artifact's backbone, D and image size, and the manifest entry's shots / size. ``BankError``
    naming the file and the class otherwise."""
    root = Path(artifact_dir)
    entry = mf.reference_entry(manifest, class_name)
    if entry is None:
        raise BankError(f"class {class_name!r} has no reference bank")
    where = f"reference bank {entry['file']} of class {class_name!r}"
    try:
        if verify:
            mf.verify_files(root, manifest, [entry["file"]])
        bank = ReferenceBank.load(root / entry["file"])
        bank.check_compatible(manifest["backbone"], manifest["embed_dim"], manifest["image_size"], where)
    except ArtifactError as err:  # BankError included
        raise BankError(f"{where} is unusable: {err}") from None
    if bank.shots != entry["shots"] or bank.size != entry["size"]:
        raise BankError(f"{where} holds {bank.shots} shots / {bank.size} patches, "
                        f"the manifest says {entry['shots']} / {entry['size']}")
    return bank


@dataclass(frozen=True)
class StoredBanks:
    """An artifact's banks: ``usable`` by class, and ``broken``: class -> why its bank cannot be used."""

    usable: dict[str, ReferenceBank] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)


def load_banks(artifact_dir: str | os.PathLike, manifest: Mapping[str, Any], verify: bool = True) -> StoredBanks:
    """Every class's bank named by the manifest (``read_bank``); a damaged one is set aside in
    ``broken`` (with the repair command) so the artifact's other classes, and ``--no-refs``, still work."""
    out = StoredBanks()
    for cls_name in mf.references(manifest):
        try:
            out.usable[cls_name] = read_bank(artifact_dir, manifest, cls_name, verify)
        except BankError as err:
            out.broken[cls_name] = f"{err}; {mf.bank_repair_hint(artifact_dir, cls_name)}"
    return out


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
