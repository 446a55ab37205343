"""Test-set listings for MVTec AD, VisA (official split csv) and a generic folder layout. Torch-free.

Layouts:

- ``mvtec``: ``<root>/<class>/test/<defect>/*.png`` with masks at
  ``<root>/<class>/ground_truth/<defect>/<stem>_mask.png``; ``test/good`` has no masks.
- ``visa``: ``<root>/split_csv/1cls.csv`` (or ``<root>/1cls.csv``, or ``root`` the csv itself) with
  columns ``object,split,label,image,mask``; paths relative to the dataset root; rows with
  ``split == "test"`` are used, ``label`` is ``normal`` / ``anomaly`` (or 0 / 1).
- ``folder``: one class, ``<root>/good/*``, ``<root>/<defect>/*`` and optional masks at
  ``<root>/masks/<defect>/<stem>.png`` or ``<stem>_mask.png``. The class name (used in the prompts)
  is the folder's name unless one name is passed in ``classes``.

Good TRAINING images (few-shot references, :func:`load_train_good`): MVTec
``<root>/<class>/train/good/*``; VisA rows with ``split == "train"`` and a normal label; folder
``<root>/train/good/*`` (``train/`` is therefore not a defect folder).

Every problem is a :class:`~anoclip_core.errors.DatasetError` with a one-line message.
"""
from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import transform
from .errors import AnoCLIPError, DatasetError

DATASETS = ("mvtec", "visa", "folder")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GOOD = "good"
MVTEC_LAYOUT = "<root>/<class>/test/<defect>/*.png, <root>/<class>/ground_truth/<defect>/<stem>_mask.png"
VISA_LAYOUT = "<root>/split_csv/1cls.csv with columns object,split,label,image,mask (paths relative to <root>)"
FOLDER_LAYOUT = "<root>/good/*, <root>/<defect>/*, optional <root>/masks/<defect>/<stem>[_mask].png"
VISA_COLUMNS = ("object", "split", "label", "image", "mask")
VISA_CSV = (Path("split_csv") / "1cls.csv", Path("1cls.csv"))
VISA_LABELS = {"normal": 0, "0": 0, "good": 0, "anomaly": 1, "1": 1, "abnormal": 1}
FOLDER_RESERVED = ("masks", "ground_truth", "train")


@dataclass(frozen=True)
class Sample:
    """One test image: ``label`` 1 = defective; ``mask_path`` None means no defect pixels known."""

    path: str
    class_name: str
    label: int
    mask_path: str | None
    defect_type: str

    @property
    def has_pixel_truth(self) -> bool:
        """True when the pixel ground truth is known (normal image, or a mask file exists)."""
        return self.label == 0 or self.mask_path is not None


def _check_dataset(dataset: str) -> str:
    name = dataset.lower()
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {dataset!r} (expected one of {', '.join(DATASETS)})")
    return name


def _check_root(root: str | os.PathLike, layout: str) -> Path:
    path = Path(root)
    if not path.exists():
        raise DatasetError(f"dataset root not found: {path} (expected {layout})")
    if not path.is_dir():
        raise DatasetError(f"dataset root is not a folder: {path} (expected {layout})")
    return path


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _pick(available: Sequence[str], classes: Sequence[str] | None, where: str) -> list[str]:
    if classes is None:
        return list(available)
    missing = [c for c in classes if c not in available]
    if missing:
        raise DatasetError(
            f"class(es) {', '.join(missing)} not found {where} (available: {', '.join(available) or 'none'})"
        )
    return list(dict.fromkeys(classes))


# MVTec AD -----------------------------------------------------------------------------------------
def _mvtec_classes(root: Path) -> list[str]:
    marks = ("test", "train", "ground_truth")
    names = [d.name for d in _subdirs(root) if any((d / m).is_dir() for m in marks)]
    if not names:
        raise DatasetError(f"no MVTec classes under {root} (expected {MVTEC_LAYOUT})")
    return names


def _mvtec_class(root: Path, name: str) -> list[Sample]:
    where = f"MVTec class {name!r} under {root}"
    test = root / name / "test"
    if not test.is_dir():
        raise DatasetError(f"{where}: missing test/ (expected {MVTEC_LAYOUT})")
    defects = _subdirs(test)
    if not defects:
        raise DatasetError(f"{where}: test/ has no defect folders (expected {MVTEC_LAYOUT})")
    samples: list[Sample] = []
    for folder in defects:
        images = _images(folder)
        if not images:
            raise DatasetError(f"{where}: test/{folder.name}/ has no images (expected {MVTEC_LAYOUT})")
        if folder.name == GOOD:
            samples += [Sample(str(p), name, 0, None, GOOD) for p in images]
            continue
        gt = root / name / "ground_truth" / folder.name
        if not gt.is_dir():
            raise DatasetError(f"{where}: missing ground_truth/{folder.name}/ (expected {MVTEC_LAYOUT})")
        for p in images:
            mask = gt / f"{p.stem}_mask.png"
            if not mask.is_file():
                raise DatasetError(f"{where}: missing mask ground_truth/{folder.name}/{mask.name} for {p.name}")
            samples.append(Sample(str(p), name, 1, str(mask), folder.name))
    return samples


# VisA ---------------------------------------------------------------------------------------------
def _visa_csv(root: str | os.PathLike) -> tuple[Path, Path]:
    """(csv file, dataset root) from a root folder or the csv path itself."""
    path = Path(root)
    if path.is_file() and path.suffix.lower() == ".csv":
        base = path.parent.parent if path.parent.name == "split_csv" else path.parent
        return path, base
    base = _check_root(path, VISA_LAYOUT)
    for rel in VISA_CSV:
        if (base / rel).is_file():
            return base / rel, base
    raise DatasetError(f"VisA under {base}: missing split csv split_csv/1cls.csv (expected {VISA_LAYOUT})")


def _visa_rows(csv_path: Path) -> list[dict[str, str]]:
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in VISA_COLUMNS if c not in fields]
            if missing:
                raise DatasetError(
                    f"VisA split csv {csv_path}: missing column(s) {', '.join(missing)} "
                    f"(expected columns {','.join(VISA_COLUMNS)})"
                )
            return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DatasetError(f"VisA split csv {csv_path}: cannot read ({type(err).__name__}: {err})") from None


def _visa_samples(root: str | os.PathLike, classes: Sequence[str] | None) -> list[Sample]:
    csv_path, base = _visa_csv(root)
    rows = [(i + 2, r) for i, r in enumerate(_visa_rows(csv_path)) if r["split"].lower() == "test"]
    available = sorted({r["object"] for _, r in rows})
    if not available:
        raise DatasetError(f"VisA split csv {csv_path}: no rows with split == 'test' (expected {VISA_LAYOUT})")
    wanted = set(_pick(available, classes, f"in VisA split csv {csv_path}"))
    samples: list[Sample] = []
    for line, r in rows:
        if r["object"] not in wanted:
            continue
        where = f"VisA split csv {csv_path} line {line}"
        label = VISA_LABELS.get(r["label"].lower())
        if label is None:
            raise DatasetError(f"{where}: label {r['label']!r} is not 'normal' or 'anomaly'")
        image = base / r["image"]
        if not image.is_file():
            raise DatasetError(f"{where}: image not found: {image}")
        mask: str | None = None
        if label == 1:
            if not r["mask"]:
                raise DatasetError(f"{where}: anomalous image {r['image']} has no mask path")
            if not (base / r["mask"]).is_file():
                raise DatasetError(f"{where}: mask not found: {base / r['mask']}")
            mask = str(base / r["mask"])
        samples.append(Sample(str(image), r["object"], label, mask, "anomaly" if label else GOOD))
    return samples


# generic folder -----------------------------------------------------------------------------------
def _folder_mask(masks: Path, defect: str, stem: str) -> Path | None:
    for suffix in ("", "_mask"):
        for ext in IMAGE_EXTS:
            p = masks / defect / f"{stem}{suffix}{ext}"
            if p.is_file():
                return p
    return None


def _folder_samples(root: Path, class_name: str) -> list[Sample]:
    where = f"folder dataset {root}"
    good = root / GOOD
    if not good.is_dir():
        raise DatasetError(f"{where}: missing good/ (expected {FOLDER_LAYOUT})")
    samples = [Sample(str(p), class_name, 0, None, GOOD) for p in _images(good)]
    if not samples:
        raise DatasetError(f"{where}: good/ has no images (expected {FOLDER_LAYOUT})")
    masks = root / "masks"
    for folder in _subdirs(root):
        if folder.name == GOOD or folder.name in FOLDER_RESERVED:
            continue
        images = _images(folder)
        if not images:
            raise DatasetError(f"{where}: {folder.name}/ has no images (expected {FOLDER_LAYOUT})")
        with_masks = (masks / folder.name).is_dir()
        for p in images:
            mask = _folder_mask(masks, folder.name, p.stem) if with_masks else None
            if with_masks and mask is None:
                raise DatasetError(f"{where}: missing mask masks/{folder.name}/{p.stem}[_mask].png for {p.name}")
            samples.append(Sample(str(p), class_name, 1, None if mask is None else str(mask), folder.name))
    return samples


def _folder_class(root: Path, classes: Sequence[str] | None) -> str:
    if classes is None:
        return root.resolve().name
    if len(classes) != 1:
        raise DatasetError(f"a folder dataset holds one class; got {len(classes)} names ({', '.join(classes)})")
    return classes[0]


# public -------------------------------------------------------------------------------------------
def list_classes(dataset: str, root: str | os.PathLike) -> list[str]:
    """Class names of a dataset, sorted (one name, the folder's, for ``folder``)."""
    name = _check_dataset(dataset)
    if name == "mvtec":
        return _mvtec_classes(_check_root(root, MVTEC_LAYOUT))
    if name == "visa":
        csv_path, _ = _visa_csv(root)
        found = sorted({r["object"] for r in _visa_rows(csv_path) if r["split"].lower() == "test"})
        if not found:
            raise DatasetError(f"VisA split csv {csv_path}: no rows with split == 'test' (expected {VISA_LAYOUT})")
        return found
    return [_folder_class(_check_root(root, FOLDER_LAYOUT), None)]


def load_samples(dataset: str, root: str | os.PathLike, classes: Sequence[str] | None = None) -> list[Sample]:
    """Every test sample of the chosen classes (all when None), grouped by class in class order."""
    name = _check_dataset(dataset)
    if classes is not None and len(classes) == 0:
        raise DatasetError("empty class list")
    if name == "mvtec":
        base = _check_root(root, MVTEC_LAYOUT)
        chosen = _pick(_mvtec_classes(base), classes, f"under {base}")
        return [s for c in chosen for s in _mvtec_class(base, c)]
    if name == "visa":
        samples = _visa_samples(root, classes)
        order = {c: i for i, c in enumerate(dict.fromkeys(classes or sorted({s.class_name for s in samples})))}
        return sorted(samples, key=lambda s: order[s.class_name])
    base = _check_root(root, FOLDER_LAYOUT)
    return _folder_samples(base, _folder_class(base, classes))


def load_image(sample: Sample) -> np.ndarray:
    """The sample's image as stored (see :func:`anoclip_core.transform.read_image`)."""
    return transform.read_image(sample.path)


def load_mask(sample: Sample, height: int, width: int | None = None) -> np.ndarray | None:
    """Ground truth resized to ``height`` x ``width`` (default square) as {0, 1} uint8.

    All zeros for a normal image without a mask; None when a defective image has no mask.
    Resized with the same antialiased bilinear filter and 0.5 threshold as ``transform.resize_mask``.
    """
    width = height if width is None else width
    if sample.mask_path is None:
        return np.zeros((height, width), np.uint8) if sample.label == 0 else None
    try:
        raw = transform.read_image(sample.mask_path)
    except AnoCLIPError as err:
        raise DatasetError(f"mask of {sample.path}: {err}") from None
    if height == width:
        return transform.resize_mask(raw, height)
    m = (np.asarray(raw) > 0).astype(np.float32)
    if m.ndim == 3:
        m = m.max(axis=2)
    return (transform.resize_bilinear_antialias(m, height, width) > 0.5).astype(np.uint8)


def load_train_good(dataset: str, root: str | os.PathLike, class_name: str) -> list[str]:
    """The good training images of one class, sorted (MVTec, folder) or in split-csv order (VisA)."""
    name = _check_dataset(dataset)
    if name == "visa":
        csv_path, base = _visa_csv(root)
        rows = [r for r in _visa_rows(csv_path) if r["split"].lower() == "train" and r["object"] == class_name]
        paths = [base / r["image"] for r in rows if VISA_LABELS.get(r["label"].lower()) == 0]
        where = f"VisA split csv {csv_path}: class {class_name!r}"
        if not paths:
            raise DatasetError(f"{where} has no normal rows with split == 'train' (needed for --shots)")
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise DatasetError(f"{where}: training image not found: {missing[0]}")
        return [str(p) for p in paths]
    base = _check_root(root, MVTEC_LAYOUT if name == "mvtec" else FOLDER_LAYOUT)
    folder = base / class_name / "train" / GOOD if name == "mvtec" else base / "train" / GOOD
    if not folder.is_dir():
        raise DatasetError(f"{name} class {class_name!r}: missing {folder} (good training images, needed for --shots)")
    images = _images(folder)
    if not images:
        raise DatasetError(f"{name} class {class_name!r}: {folder} has no images (needed for --shots)")
    return [str(p) for p in images]
