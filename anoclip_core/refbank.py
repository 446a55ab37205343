"""Few-shot reference bank: good-image patch embeddings, their search and the fusion rule. Torch-free.

The core (``AnoCLIP.predict(..., references=bank)``) and the torch-free runtime share this module:
the bank file format, the shot draw, PatchCore's greedy coreset, the nearest-neighbour search on
the host, and the rule that fuses the visual map with the zero-shot text map.

Fusion follows WinCLIP+ (Jeong et al., "WinCLIP: Zero-/Few-Shot Anomaly Classification and
Segmentation", CVPR 2023; anomalib's ``WinClipModel`` with ``k_shot``): the few-shot score of a
patch is ``(1 - max_j cos(l, b_j)) / 2`` (the paper's Eq. 4, ``visual_association_score``), the
pixel map is the mean of the zero-shot and few-shot maps, and the image score is the mean of the
zero-shot image score and the maximum of the few-shot map. Here the visual part has a weight
``w`` (default 0.5, which is WinCLIP+ exactly)::

    visual = 1 - max_j cos(l, b_j)                      in [0, 2], per patch
    map    = (1 - w) * text_map + w * visual_map / 2
    score  = (1 - w) * text_score + w * peak / 2,      peak = max of the smoothed visual grid

``visual_map`` is post-processed exactly like the text map (ALGORITHM.md §4: replicate-pad, 3 x 3
mean, bilinear upsampling). ``peak`` is taken on the smoothed h x w grid, before upsampling, so
it does not depend on the output size (core: S x S, runtime: the original H x W).
"""
from __future__ import annotations

import io
import json
import math
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .errors import BankError
from .fileio import atomic_write_bytes

FORMAT = "anoclip-refbank"
FORMAT_VERSION = 1
DEFAULT_VISUAL_WEIGHT = 0.5
DEFAULT_CHUNK = 4096
NORM_TOLERANCE = 1e-3
FUSION_RULE = "winclip+"

T = TypeVar("T")


@dataclass(frozen=True, eq=False)
class ReferenceBank:
    """L2-normalised local embeddings [N, D] of good images, with where they came from.

    ``images`` names the good images (``shots`` = their count); ``image_sha256`` holds the sha256
    of each image file's bytes, in the same order ("" where unknown: banks written before it was
    kept, or built from arrays), so "already in the bank" can compare content, not names;
    ``patches`` is the number of patch embeddings before a coreset (``coreset`` = {"size", "seed",
    "projection_dim", "radius"} when one was taken, else None).
    """

    embeddings: np.ndarray
    backbone: str
    image_size: int
    patch_grid: tuple[int, int]
    images: tuple[str, ...]
    source: str = ""
    patches: int | None = None
    coreset: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    image_sha256: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "embeddings", np.ascontiguousarray(self.embeddings, dtype=np.float32))
        object.__setattr__(self, "patch_grid", tuple(int(v) for v in self.patch_grid))
        object.__setattr__(self, "images", tuple(str(v) for v in self.images))
        hashes = tuple(str(v) for v in self.image_sha256) or ("",) * len(self.images)
        if len(hashes) != len(self.images):
            raise BankError(f"reference bank: {len(hashes)} image sha256 for {len(self.images)} images")
        object.__setattr__(self, "image_sha256", hashes)
        if self.patches is None:
            object.__setattr__(self, "patches", int(self.embeddings.shape[0]) if self.embeddings.ndim == 2 else 0)
        check_embeddings(self.embeddings, "reference bank")
        if len(self.patch_grid) != 2 or min(self.patch_grid) < 1 or int(self.image_size) < 1:
            raise BankError(f"reference bank: bad geometry image_size={self.image_size} patch_grid={self.patch_grid}")
        if not self.images:
            raise BankError("reference bank: no good images named (shots = 0)")

    @property
    def shots(self) -> int:
        """How many good images the bank was built from."""
        return len(self.images)

    @property
    def size(self) -> int:
        """Number of patch embeddings N."""
        return int(self.embeddings.shape[0])

    @property
    def embed_dim(self) -> int:
        return int(self.embeddings.shape[1])

    def provenance(self) -> dict[str, Any]:
        """Everything but the embeddings, as JSON-ready data (also what outputs report)."""
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "backbone": self.backbone,
            "image_size": int(self.image_size), "patch_grid": list(self.patch_grid), "embed_dim": self.embed_dim,
            "shots": self.shots, "images": list(self.images), "source": self.source, "size": self.size,
            "patches": int(self.patches or 0), "coreset": self.coreset, "image_sha256": list(self.image_sha256),
            **({"extra": self.extra} if self.extra else {}),
        }

    def check_compatible(self, backbone: str, embed_dim: int, image_size: int, where: str = "reference bank") -> None:
        """Refuse a bank from another backbone, width or input size (one-line ``BankError``)."""
        if self.backbone != backbone:
            raise BankError(f"{where} was built with backbone {self.backbone!r}, the model is {backbone!r}")
        if self.embed_dim != int(embed_dim):
            raise BankError(f"{where} has embedding width D = {self.embed_dim}, the model has D = {embed_dim}")
        if int(self.image_size) != int(image_size):
            raise BankError(f"{where} was built at image size {self.image_size}, the model uses {image_size}")

    def merge(self, other: ReferenceBank) -> ReferenceBank:
        """This bank plus ``other``'s embeddings and images (same model; a coreset is not re-taken)."""
        other.check_compatible(self.backbone, self.embed_dim, self.image_size, "the added reference bank")
        return ReferenceBank(
            np.concatenate([self.embeddings, other.embeddings]), self.backbone, self.image_size, self.patch_grid,
            self.images + other.images, self.source, int(self.patches or 0) + int(other.patches or 0),
            None, dict(self.extra), self.image_sha256 + other.image_sha256,
        )

    def select_images(self, keep: Sequence[int]) -> ReferenceBank:
        """The bank of images ``keep`` (indices, in order) alone. Needs rows grouped per image (``patch_grid``
        rows each, as encoded, no coreset): ``BankError`` otherwise, since a coreset row has no one image."""
        per = self.patch_grid[0] * self.patch_grid[1]
        if self.coreset is not None or self.size != per * self.shots:
            raise BankError(f"reference bank: its {self.size} rows are not {per} per image (a coreset was taken), "
                            "so single images cannot be taken out of it")
        rows = np.concatenate([np.arange(i * per, (i + 1) * per) for i in keep]) if keep else np.zeros(0, int)
        return ReferenceBank(
            self.embeddings[rows], self.backbone, self.image_size, self.patch_grid,
            tuple(self.images[i] for i in keep), self.source, int(rows.size), None, dict(self.extra),
            tuple(self.image_sha256[i] for i in keep),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write one .npz (``embeddings`` + JSON ``provenance``) atomically: temp file, then rename."""
        buf = io.BytesIO()
        np.savez(buf, embeddings=self.embeddings, provenance=np.array(json.dumps(self.provenance())))
        return atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceBank:
        """Read and validate a bank written by :meth:`save` (one-line ``BankError`` on any problem)."""
        arrays = _read_npz(Path(path))
        meta = _provenance(arrays, path)
        try:
            bank = cls(
                arrays["embeddings"], str(meta["backbone"]), int(meta["image_size"]), tuple(meta["patch_grid"]),
                tuple(meta["images"]), str(meta.get("source", "")), int(meta.get("patches") or 0) or None,
                meta.get("coreset"), dict(meta.get("extra", {})), tuple(meta.get("image_sha256") or ()),
            )
        except BankError as err:
            raise BankError(f"{path}: {err}") from None
        if bank.shots != int(meta.get("shots", bank.shots)) or bank.embed_dim != int(
            meta.get("embed_dim", bank.embed_dim)
        ):
            raise BankError(f"reference bank {path}: provenance (shots, embed_dim) does not match its contents")
        return bank


def check_embeddings(embeddings: np.ndarray, where: str) -> None:
    """[N, D] float, N >= 1, finite, rows of unit L2 norm (within 1e-3)."""
    if embeddings.ndim != 2 or embeddings.shape[0] < 1 or embeddings.shape[1] < 1:
        raise BankError(f"{where}: embeddings must be [N >= 1, D >= 1], got shape {tuple(embeddings.shape)}")
    if not np.isfinite(embeddings).all():
        raise BankError(f"{where}: embeddings contain NaN or infinite values")
    norms = np.linalg.norm(embeddings.astype(np.float64), axis=1)
    worst = float(np.abs(norms - 1.0).max())
    if worst > NORM_TOLERANCE:
        raise BankError(f"{where}: embeddings are not L2-normalised (a row norm is off by {worst:.3g})")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise BankError(f"reference bank not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in ("embeddings", "provenance") if k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise BankError(f"reference bank {path}: not a readable .npz ({type(err).__name__})") from None
    missing = [k for k in ("embeddings", "provenance") if k not in arrays]
    if missing:
        raise BankError(f"reference bank {path}: missing entry {', '.join(missing)}")
    return arrays


def _provenance(arrays: dict[str, np.ndarray], path: str | os.PathLike) -> dict[str, Any]:
    try:
        meta = json.loads(str(arrays["provenance"]))
    except ValueError:
        raise BankError(f"reference bank {path}: provenance is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BankError(f"reference bank {path}: not an {FORMAT} file")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise BankError(
            f"reference bank {path}: format_version {meta['format_version']} is newer than {FORMAT_VERSION}"
        )
    missing = [k for k in ("backbone", "image_size", "patch_grid", "images") if k not in meta]
    if missing:
        raise BankError(f"reference bank {path}: provenance lacks {', '.join(missing)}")
    return meta


# good images ------------------------------------------------------------------------------------
def select_shots(items: Sequence[T], shots: int | None, seed: int = 0, where: str = "good images") -> list[T]:
    """``shots`` items drawn without replacement with ``seed`` (kept in their listed order); all when None."""
    if shots is None:
        return list(items)
    if shots < 1:
        raise BankError(f"shots must be >= 1, got {shots}")
    if shots > len(items):
        raise BankError(f"asked for {shots} shots but {where} has only {len(items)} image(s)")
    picked = np.random.default_rng(seed).choice(len(items), size=shots, replace=False)
    return [items[i] for i in sorted(int(i) for i in picked)]


# coreset ----------------------------------------------------------------------------------------
def greedy_coreset(
    features: np.ndarray, size: int, seed: int = 0, projection_dim: int | None = None
) -> np.ndarray:
    """PatchCore's greedy k-center coreset: indices [size] in selection order.

    Start at a point drawn with ``seed``, then repeatedly add the point farthest (Euclidean) from
    the selected set. ``projection_dim`` projects the features with a seeded Gaussian random
    matrix for the distance computation only, as PatchCore does to make it cheaper. All indices
    (in order) when ``size`` >= N.
    """
    n = int(features.shape[0])
    if size < 1:
        raise BankError(f"coreset size must be >= 1, got {size}")
    if size >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    x = np.asarray(features, dtype=np.float32)
    if projection_dim is not None and projection_dim < x.shape[1]:
        x = x @ (rng.standard_normal((x.shape[1], projection_dim)) / math.sqrt(projection_dim)).astype(np.float32)
    sq = np.einsum("nd,nd->n", x, x)
    chosen = [int(rng.integers(n))]
    nearest = _sq_dist(x, sq, chosen[0])
    for _ in range(size - 1):
        i = int(np.argmax(nearest))
        chosen.append(i)
        np.minimum(nearest, _sq_dist(x, sq, i), out=nearest)
    return np.asarray(chosen, dtype=np.int64)


def _sq_dist(x: np.ndarray, sq: np.ndarray, i: int) -> np.ndarray:
    """Squared Euclidean distances of every row of ``x`` to row ``i`` (clamped at 0)."""
    return np.maximum(sq + sq[i] - 2.0 * (x @ x[i]), 0.0)


def coverage_radius(features: np.ndarray, indices: np.ndarray, chunk: int = DEFAULT_CHUNK) -> float:
    """max over points of the Euclidean distance to the nearest selected point."""
    sel = np.asarray(features, np.float32)[np.asarray(indices)]
    worst = 0.0
    for i in range(0, features.shape[0], chunk):
        q = np.asarray(features[i : i + chunk], np.float32)
        d = (q * q).sum(1)[:, None] + (sel * sel).sum(1)[None, :] - 2.0 * (q @ sel.T)
        worst = max(worst, float(np.maximum(d.min(1), 0.0).max()))
    return math.sqrt(worst)


# search and fusion ------------------------------------------------------------------------------
def visual_anomaly(local: np.ndarray, bank: np.ndarray, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """Normalised local embeddings [B, h, w, D] -> 1 - max cosine similarity to ``bank`` [N, D], [B, h, w].

    Chunked matmuls (``chunk`` queries x ``chunk`` bank rows at a time) keep memory bounded.
    """
    if local.ndim != 4 or bank.ndim != 2 or local.shape[-1] != bank.shape[-1] or bank.shape[0] < 1:
        raise BankError(
            f"visual_anomaly: local embeddings {tuple(local.shape)} and bank {tuple(bank.shape)} do not fit "
            "(expected [B, h, w, D] and [N >= 1, D])"
        )
    if chunk < 1:
        raise BankError(f"visual_anomaly: chunk must be >= 1, got {chunk}")
    q = np.asarray(local, np.float32).reshape(-1, local.shape[-1])
    b = np.asarray(bank, np.float32)
    best = np.full(q.shape[0], -np.inf, np.float32)
    for i in range(0, q.shape[0], chunk):
        for j in range(0, b.shape[0], chunk):
            sims = q[i : i + chunk] @ b[j : j + chunk].T
            np.maximum(best[i : i + chunk], sims.max(axis=1), out=best[i : i + chunk])
    return (1.0 - best).reshape(local.shape[:-1])


def check_weight(weight: float) -> float:
    """The visual part's weight must lie in [0, 1]."""
    w = float(weight)
    if not 0.0 <= w <= 1.0 or math.isnan(w):
        raise BankError(f"visual weight must be in [0, 1], got {weight}")
    return w


def fuse(text_map: Any, visual_map: Any, weight: float = DEFAULT_VISUAL_WEIGHT) -> Any:
    """WinCLIP+ map: (1 - w) * text + w * visual / 2 (numpy arrays or torch tensors alike)."""
    w = check_weight(weight)
    return (1.0 - w) * text_map + (w / 2.0) * visual_map


def fuse_image_score(text_score: Any, visual_peak: Any, weight: float = DEFAULT_VISUAL_WEIGHT) -> Any:
    """WinCLIP+ image score: (1 - w) * text score + w * peak / 2, ``peak`` = max of the smoothed visual grid."""
    w = check_weight(weight)
    return (1.0 - w) * text_score + (w / 2.0) * visual_peak
