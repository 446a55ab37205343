"""Dataset listings on tiny fake trees: records and every error path."""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from anoclip_core import datasets as D
from anoclip_core.errors import DatasetError


def png(path: Path, value: int = 128, size: tuple[int, int] = (12, 16), mask: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mask:
        img = np.zeros(size, np.uint8)
        img[: size[0] // 2, : size[1] // 2] = 255
    else:
        img = np.full((*size, 3), value, np.uint8)
    assert cv2.imwrite(str(path), img)
    return path


def make_mvtec(root: Path, classes=("bottle", "carpet")) -> Path:
    for c in classes:
        png(root / c / "train" / "good" / "000.png")
        for i in range(2):
            png(root / c / "test" / "good" / f"{i:03d}.png")
        for defect in ("crack", "hole"):
            png(root / c / "test" / defect / "000.png")
            png(root / c / "ground_truth" / defect / "000_mask.png", mask=True)
    (root / "license.txt").write_text("x")
    (root / "notes").mkdir()
    return root


def make_visa(root: Path) -> Path:
    rows = ["object,split,label,image,mask"]
    for c in ("candle", "pcb1"):
        png(root / c / "Data" / "Images" / "Normal" / "000.png")
        png(root / c / "Data" / "Images" / "Normal" / "001.png")
        png(root / c / "Data" / "Images" / "Anomaly" / "000.png")
        png(root / c / "Data" / "Masks" / "Anomaly" / "000.png", mask=True)
        rows.append(f"{c},train,normal,{c}/Data/Images/Normal/001.png,")
        rows.append(f"{c},test,normal,{c}/Data/Images/Normal/000.png,")
        rows.append(f"{c},test,anomaly,{c}/Data/Images/Anomaly/000.png,{c}/Data/Masks/Anomaly/000.png")
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return root


def make_folder(root: Path) -> Path:
    png(root / "good" / "a.png")
    png(root / "good" / "b.jpg")
    png(root / "scratch" / "s1.png")
    png(root / "scratch" / "s2.png")
    png(root / "masks" / "scratch" / "s1_mask.png", mask=True)
    png(root / "masks" / "scratch" / "s2.png", mask=True)
    png(root / "dent" / "d1.png")
    return root


# MVTec -------------------------------------------------------------------------------------------
def test_mvtec_records(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    assert D.list_classes("mvtec", root) == ["bottle", "carpet"]
    samples = D.load_samples("mvtec", root)
    assert len(samples) == 8
    assert [s.class_name for s in samples] == ["bottle"] * 4 + ["carpet"] * 4
    bottle = samples[:4]
    assert [(s.defect_type, s.label) for s in bottle] == [("crack", 1), ("good", 0), ("good", 0), ("hole", 1)]
    crack = bottle[0]
    assert crack.path == str(root / "bottle" / "test" / "crack" / "000.png")
    assert crack.mask_path == str(root / "bottle" / "ground_truth" / "crack" / "000_mask.png")
    assert all(s.mask_path is None for s in bottle if s.label == 0)
    only = D.load_samples("MVTec", root, classes=["carpet"])
    assert {s.class_name for s in only} == {"carpet"} and len(only) == 4


def test_mvtec_masks_and_images_load(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec", classes=("bottle",))
    s = D.load_samples("mvtec", root)[0]
    assert D.load_image(s).shape == (12, 16, 3)
    m = D.load_mask(s, 8)
    assert m.shape == (8, 8) and m.dtype == np.uint8 and set(np.unique(m)) == {0, 1}
    assert m[:4, :4].all() and not m[4:, 4:].any()
    rect = D.load_mask(s, 6, 8)
    assert rect.shape == (6, 8) and rect[:3, :4].all() and not rect[3:].any()
    good = next(x for x in D.load_samples("mvtec", root) if x.label == 0)
    assert not D.load_mask(good, 8).any()


@pytest.mark.parametrize(
    "breakage, match",
    [
        (lambda r: shutil.rmtree(r / "bottle" / "test"), r"MVTec class 'bottle' under .*: missing test/ \(expected"),
        (lambda r: shutil.rmtree(r / "bottle" / "ground_truth" / "hole"), r"missing ground_truth/hole/"),
        (
            lambda r: (r / "bottle" / "ground_truth" / "crack" / "000_mask.png").unlink(),
            r"missing mask ground_truth/crack/000_mask.png for 000.png",
        ),
        (lambda r: (r / "bottle" / "test" / "hole" / "000.png").unlink(), r"test/hole/ has no images"),
    ],
)
def test_mvtec_malformed(tmp_path: Path, breakage, match: str) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    breakage(root)
    with pytest.raises(DatasetError, match=match):
        D.load_samples("mvtec", root)


def test_mvtec_missing_root_and_classes(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"dataset root not found: .*nope \(expected <root>/<class>/test"):
        D.load_samples("mvtec", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no MVTec classes under"):
        D.list_classes("mvtec", tmp_path / "empty")
    root = make_mvtec(tmp_path / "mvtec")
    with pytest.raises(DatasetError, match=r"class\(es\) cable not found .*available: bottle, carpet"):
        D.load_samples("mvtec", root, classes=["cable"])
    with pytest.raises(DatasetError, match="empty class list"):
        D.load_samples("mvtec", root, classes=[])
    with pytest.raises(DatasetError, match="unknown dataset 'kitti'"):
        D.load_samples("kitti", root)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatasetError, match="not a folder"):
        D.load_samples("mvtec", tmp_path / "file")


def test_mvtec_test_without_defect_folders(tmp_path: Path) -> None:
    root = tmp_path / "m"
    (root / "bottle" / "test").mkdir(parents=True)
    with pytest.raises(DatasetError, match="test/ has no defect folders"):
        D.load_samples("mvtec", root)


# VisA --------------------------------------------------------------------------------------------
def test_visa_records(tmp_path: Path) -> None:
    root = make_visa(tmp_path / "visa")
    assert D.list_classes("visa", root) == ["candle", "pcb1"]
    samples = D.load_samples("visa", root)
    assert len(samples) == 4
    assert [(s.class_name, s.label, s.defect_type) for s in samples] == [
        ("candle", 0, "good"), ("candle", 1, "anomaly"), ("pcb1", 0, "good"), ("pcb1", 1, "anomaly")
    ]
    assert samples[1].path == str(root / "candle/Data/Images/Anomaly/000.png")
    assert samples[1].mask_path == str(root / "candle/Data/Masks/Anomaly/000.png")
    assert samples[0].mask_path is None
    by_csv = D.load_samples("visa", root / "split_csv" / "1cls.csv", classes=["pcb1", "candle"])
    assert [s.class_name for s in by_csv] == ["pcb1", "pcb1", "candle", "candle"]
    assert by_csv[0].path == str(root / "pcb1/Data/Images/Normal/000.png")


def _rewrite_csv(root: Path, old: str, new: str) -> None:
    p = root / "split_csv" / "1cls.csv"
    p.write_text(p.read_text().replace(old, new))


@pytest.mark.parametrize(
    "old, new, match",
    [
        (
            "object,split,label,image,mask",
            "object,split,label,image",
            r"missing column\(s\) mask \(expected columns object,split,label,image,mask\)",
        ),
        ("candle,test,anomaly", "candle,test,broken", r"line 4: label 'broken' is not 'normal' or 'anomaly'"),
        (
            "Anomaly/000.png,candle/Data/Masks/Anomaly/000.png",
            "Anomaly/000.png,",
            r"line 4: anomalous image .* has no mask path",
        ),
        ("candle/Data/Masks/Anomaly/000.png", "candle/Data/Masks/Anomaly/999.png", r"mask not found: .*999.png"),
        ("candle/Data/Images/Normal/000.png", "candle/Data/Images/Normal/404.png", r"image not found: .*404.png"),
        (",test,", ",train,", r"no rows with split == 'test'"),
    ],
)
def test_visa_malformed(tmp_path: Path, old: str, new: str, match: str) -> None:
    root = make_visa(tmp_path / "visa")
    _rewrite_csv(root, old, new)
    with pytest.raises(DatasetError, match=match):
        D.load_samples("visa", root)


def test_visa_missing_csv_and_class(tmp_path: Path) -> None:
    (tmp_path / "v").mkdir()
    with pytest.raises(DatasetError, match=r"missing split csv split_csv/1cls.csv \(expected"):
        D.load_samples("visa", tmp_path / "v")
    root = make_visa(tmp_path / "visa")
    with pytest.raises(DatasetError, match=r"class\(es\) fryum not found in VisA split csv"):
        D.load_samples("visa", root, classes=["fryum"])


# folder ------------------------------------------------------------------------------------------
def test_folder_records(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "widget")
    assert D.list_classes("folder", root) == ["widget"]
    samples = D.load_samples("folder", root)
    assert {s.class_name for s in samples} == {"widget"}
    got = {(Path(s.path).name, s.label, s.defect_type, s.mask_path and Path(s.mask_path).name) for s in samples}
    assert got == {
        ("a.png", 0, "good", None),
        ("b.jpg", 0, "good", None),
        ("s1.png", 1, "scratch", "s1_mask.png"),
        ("s2.png", 1, "scratch", "s2.png"),
        ("d1.png", 1, "dent", None),
    }
    dent = next(s for s in samples if s.defect_type == "dent")
    assert not dent.has_pixel_truth and D.load_mask(dent, 8) is None
    assert {s.class_name for s in D.load_samples("folder", root, classes=["screw"])} == {"screw"}


def test_folder_malformed(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "w")
    (root / "masks" / "scratch" / "s2.png").unlink()
    with pytest.raises(DatasetError, match=r"missing mask masks/scratch/s2\[_mask\].png for s2.png"):
        D.load_samples("folder", root)
    (root / "empty_defect").mkdir()
    png(root / "masks" / "scratch" / "s2.png", mask=True)
    with pytest.raises(DatasetError, match=r"empty_defect/ has no images"):
        D.load_samples("folder", root)
    bare = tmp_path / "bare"
    png(bare / "scratch" / "x.png")
    with pytest.raises(DatasetError, match=r"folder dataset .*bare: missing good/ \(expected <root>/good/\*"):
        D.load_samples("folder", bare)
    (tmp_path / "nogood" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="good/ has no images"):
        D.load_samples("folder", tmp_path / "nogood")
    with pytest.raises(DatasetError, match="holds one class; got 2"):
        D.load_samples("folder", make_folder(tmp_path / "w2"), classes=["a", "b"])


def test_unreadable_mask_is_a_dataset_error(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec", classes=("bottle",))
    (root / "bottle" / "ground_truth" / "crack" / "000_mask.png").write_bytes(b"not a png")
    s = D.load_samples("mvtec", root)[0]
    with pytest.raises(DatasetError, match="mask of .*000.png: cannot decode"):
        D.load_mask(s, 8)
