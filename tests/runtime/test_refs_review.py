"""Hostile review of ``anoclip refs``: a damaged bank blocks only its class and ``--replace`` repairs it; one
folder listing for refs / infer / calibrate; "already in the bank" by content; the visual weight in JSON lines
and in the calibration binding; progress; ``--max-pixels``; class names that differ only in case."""
from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from test_refs import manifest, refs, sha, smooth_image, write_images

from anoclip.runtime import contract as mf
from anoclip.runtime.cli import main
from anoclip_core.errors import ArtifactError, BankError
from anoclip_core.refbank import ReferenceBank


def error_lines(res) -> list[str]:
    return [ln for ln in res.output.splitlines() if ln.startswith("error:")]


def json_lines(res) -> list[dict]:
    return [json.loads(ln) for ln in res.output.splitlines() if ln.startswith("{")]


def infer(art: Path, img: Path, *args: str):
    return CliRunner().invoke(main, ["infer", str(art), str(img), "--class", "bottle", "--backend", "ort-cpu",
                                     "--quiet", *args])


# 1. a damaged bank -------------------------------------------------------------------------------
def _damage(art: Path, how: str) -> str:
    """Damage the bottle bank in place; returns its file name (the manifest still names it)."""
    name = manifest(art)["references"]["bottle"]["file"]
    path = art / name
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "not-npz":
        path.write_bytes(b"this is not a zip archive at all")
    else:  # a valid npz of the wrong shape, with the manifest's sha256 updated: only the content is wrong
        meta = ReferenceBank.load(path).provenance()
        buf = io.BytesIO()
        np.savez(buf, embeddings=np.ones(7, np.float32), provenance=np.array(json.dumps(meta)))
        path.write_bytes(buf.getvalue())
        m = manifest(art)
        m["files"][name] = sha(path)
        (art / "manifest.json").write_text(json.dumps(m))
    return name


@pytest.fixture()
def two_banks(banked: Path, tmp_path: Path) -> Path:
    write_images(tmp_path / "carpet_good", [3])
    assert refs(banked, "--class", "carpet", "--good", str(tmp_path / "carpet_good")).exit_code == 0
    return banked


@pytest.mark.parametrize("how", ["truncated", "not-npz", "wrong-shape"])
def test_a_damaged_bank_blocks_only_its_class_and_replace_repairs_it(two_banks, tiny_detector, tmp_path, how,
                                                                   caplog):
    from anoclip.runtime import Detector

    art = two_banks
    name = _damage(art, how)
    rgb = (np.random.default_rng(2).random((64, 64, 3)) * 255).astype(np.uint8)
    with caplog.at_level(logging.WARNING, logger="anoclip.runtime"), Detector.load(art, backend="ort-cpu") as det:
        assert det.predict(rgb, "carpet").shots == 1  # the other class keeps its bank
        off = det.predict(rgb, "bottle", use_refs=False)
        with pytest.raises(BankError) as err:
            det.predict(rgb, "bottle")
    assert any(name in r.getMessage() and "'bottle'" in r.getMessage() for r in caplog.records)
    plain = tiny_detector.predict(rgb, "bottle")
    assert np.array_equal(off.anomaly_map, plain.anomaly_map) and off.score == plain.score
    assert name in str(err.value) and "'bottle'" in str(err.value) and "--replace" in str(err.value)
    img = tmp_path / "x.png"
    cv2.imwrite(str(img), smooth_image(11))
    used = infer(art, img)
    assert used.exit_code == 2 and len(error_lines(used)) == 1, used.output
    assert name in error_lines(used)[0] and f"anoclip refs {art} --class 'bottle'" in error_lines(used)[0]
    assert infer(art, img, "--no-refs").exit_code == 0
    added = refs(art, "--class", "bottle", "--good", str(tmp_path / "good"))
    assert added.exit_code == 2 and name in error_lines(added)[0] and "--replace" in error_lines(added)[0]
    write_images(tmp_path / "fresh", [6])
    fixed = refs(art, "--class", "bottle", "--good", str(tmp_path / "fresh"), "--replace")
    assert fixed.exit_code == 0, fixed.output
    mf.read_manifest(art)
    assert not (art / name).exists() and manifest(art)["references"]["bottle"]["shots"] == 1
    with Detector.load(art, backend="ort-cpu") as det:
        assert det.broken_references == {} and det.predict(rgb, "bottle").shots == 1


# 2. one listing for refs, infer and calibrate ----------------------------------------------------
def _nested(folder: Path) -> list[str]:
    """a/x.png, b/x.png (same name, other content), c/deep/y.webp, z.png; sorted by path."""
    for rel, seed in (("a/x.png", 1), ("b/x.png", 2), ("c/deep/y.webp", 3), ("z.png", 4)):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(folder / rel), smooth_image(seed))
    return ["a/x.png", "b/x.png", "c/deep/y.webp", "z.png"]


def test_refs_infer_and_calibrate_list_a_folder_alike(artifact_copy, tmp_path):
    expected = _nested(tmp_path / "good")
    res = refs(artifact_copy, "--class", "bottle", "--good", str(tmp_path / "good"))
    assert res.exit_code == 0, res.output
    bank = ReferenceBank.load(artifact_copy / manifest(artifact_copy)["references"]["bottle"]["file"])
    assert list(bank.images) == expected
    out = CliRunner().invoke(main, ["infer", str(artifact_copy), str(tmp_path / "good"), "--class", "bottle",
                                    "--backend", "ort-cpu", "--quiet"])
    assert [str(Path(d["path"]).relative_to(tmp_path / "good")) for d in json_lines(out)] == expected
    cal = CliRunner().invoke(main, ["calibrate", str(artifact_copy), "--good", str(tmp_path / "good"), "--class",
                                    "bottle", "--backend", "ort-cpu", "--quiet"])
    assert cal.exit_code == 0 and json_lines(cal)[-1]["images"] == len(expected), cal.output


# 3. "already in the bank" by content ------------------------------------------------------------
def test_already_in_the_bank_means_same_content(banked, tmp_path):
    folder = tmp_path / "more"
    folder.mkdir()
    (folder / "renamed.png").write_bytes((tmp_path / "good" / "good_01.png").read_bytes())  # in the bank already
    cv2.imwrite(str(folder / "good_02.png"), smooth_image(5))  # a bank image's name, other content
    (folder / "twice.png").write_bytes((folder / "good_02.png").read_bytes())  # the same image again
    res = refs(banked, "--class", "bottle", "--good", str(folder))
    assert res.exit_code == 0, res.output
    entry = manifest(banked)["references"]["bottle"]
    bank = ReferenceBank.load(banked / entry["file"])
    assert bank.images == ("good_01.png", "good_02.png", "good_02.png") and bank.shots == entry["shots"] == 3
    files = [tmp_path / "good" / "good_01.png", tmp_path / "good" / "good_02.png", folder / "good_02.png"]
    hashes = [hashlib.sha256(p.read_bytes()).hexdigest() for p in files]
    assert list(bank.image_sha256) == hashes
    assert entry["contents_sha256"] == hashlib.sha256(json.dumps(hashes).encode()).hexdigest()
    again = refs(banked, "--class", "bottle", "--good", str(folder))
    assert again.exit_code == 2 and "already in the 'bottle' bank" in error_lines(again)[0]


def test_a_bank_without_content_hashes_is_matched_by_name(banked, tmp_path):
    """Banks written before content hashes were kept: provenance without image_sha256."""
    entry = manifest(banked)["references"]["bottle"]
    path = banked / entry["file"]
    with np.load(path) as npz:
        emb, meta = npz["embeddings"], json.loads(str(npz["provenance"]))
    del meta["image_sha256"]
    buf = io.BytesIO()
    np.savez(buf, embeddings=emb, provenance=np.array(json.dumps(meta)))
    path.write_bytes(buf.getvalue())
    m = manifest(banked)
    m["files"][entry["file"]] = sha(path)
    del m["references"]["bottle"]["contents_sha256"]
    (banked / "manifest.json").write_text(json.dumps(m))
    assert ReferenceBank.load(path).image_sha256 == ("", "")
    write_images(tmp_path / "good", [7])  # good_01, good_02 (by name in the bank) + good_07
    res = refs(banked, "--class", "bottle", "--good", str(tmp_path / "good"))
    assert res.exit_code == 0, res.output
    bank = ReferenceBank.load(banked / manifest(banked)["references"]["bottle"]["file"])
    assert bank.images == ("good_01.png", "good_02.png", "good_07.png") and bank.image_sha256[:2] == ("", "")


# 4. the visual weight: JSON lines and calibration -----------------------------------------------
def test_visual_weight_is_in_json_lines_and_binds_the_calibration(banked, tmp_path):
    img = tmp_path / "x.png"
    cv2.imwrite(str(img), smooth_image(11))
    assert json_lines(infer(banked, img, "--visual-weight", "0.3"))[0]["visual_weight"] == 0.3
    assert json_lines(infer(banked, img, "--no-refs"))[0]["visual_weight"] is None
    cal = CliRunner().invoke(main, ["calibrate", str(banked), "--good", str(tmp_path / "good"), "--class", "bottle",
                                    "--backend", "ort-cpu", "--visual-weight", "0.3", "--quiet"])
    assert cal.exit_code == 0, cal.output
    stored = json.loads((banked / "calibration.json").read_text())["classes"]["bottle"]
    assert stored["binding"]["visual_weight"] == 0.3
    same = infer(banked, img, "--visual-weight", "0.3")
    assert json_lines(same)[0]["threshold_source"] == "calibration"
    assert json_lines(same)[0]["image_threshold"] == stored["image_threshold"]
    for args, said in ((("--visual-weight", "0.5"), "few-shot with --visual-weight 0.5"),
                       (("--no-refs",), "zero-shot")):
        other = infer(banked, img, *args)
        line = json_lines(other)[0]
        assert line["threshold_source"] == "default" and line["image_threshold"] == 0.5, args
        assert "made few-shot with --visual-weight 0.3" in other.output and said in other.output, other.output


def test_old_calibration_entries_count_as_made_with_the_weight_of_their_time():
    from anoclip.runtime.calibration import calibrated_weight, resolve_thresholds

    with_bank = {"image_threshold": 0.7, "pixel_threshold": 0.6, "binding": {"references_sha256": "ab" * 32}}
    zero = {"image_threshold": 0.7, "pixel_threshold": 0.6, "binding": {"model": "fp32"}}
    assert calibrated_weight(with_bank) == 0.5 and calibrated_weight(zero) is None
    cal = {"classes": {"bottle": with_bank}}
    assert resolve_thresholds(cal, "bottle", visual_weight=0.5) == (0.7, 0.6, "calibration")
    assert resolve_thresholds(cal, "bottle", visual_weight=0.25) == (0.5, 0.5, "default")
    assert resolve_thresholds(cal, "bottle", visual_weight=None) == (0.5, 0.5, "default")


# 5./6. progress and --max-pixels ----------------------------------------------------------------
def test_refs_and_calibrate_show_progress_unless_quiet(artifact_copy, tmp_path, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    write_images(tmp_path / "good", [1, 2, 3])
    shown = refs(artifact_copy, "--class", "bottle", "--good", str(tmp_path / "good"), "--batch", "2")
    assert shown.exit_code == 0 and "anoclip refs: 3/3 img" in shown.output, shown.output
    quiet = refs(artifact_copy, "--class", "carpet", "--good", str(tmp_path / "good"), "--quiet")
    assert quiet.exit_code == 0 and "anoclip refs:" not in quiet.output
    base = ["calibrate", str(artifact_copy), "--good", str(tmp_path / "good"), "--class", "bottle", "--backend",
            "ort-cpu"]
    assert "anoclip calibrate: 3/3 img" in CliRunner().invoke(main, base).output
    assert "anoclip calibrate:" not in CliRunner().invoke(main, [*base, "--quiet"]).output


@pytest.mark.parametrize("command", ["refs", "calibrate"])
def test_max_pixels_named_by_the_decoder_is_an_option_of_refs_and_calibrate(artifact_copy, tmp_path, monkeypatch,
                                                                            command):
    from anoclip_core import transform

    monkeypatch.setattr(transform, "_max_pixels", transform._max_pixels)  # restored after the test
    monkeypatch.delenv("OPENCV_IO_MAX_IMAGE_PIXELS", raising=False)
    write_images(tmp_path / "good", [1])  # 64 x 64 = 4096 pixels
    args = [command, str(artifact_copy), "--class", "bottle", "--good", str(tmp_path / "good"), "--backend",
            "ort-cpu", "--quiet"]
    res = CliRunner().invoke(main, [*args, "--max-pixels", "1000"])
    assert res.exit_code == 2 and len(error_lines(res)) == 1, res.output
    assert "over the decode limit of 1000 pixels" in res.output and "--max-pixels" in res.output
    assert CliRunner().invoke(main, [*args, "--max-pixels", "5000"]).exit_code == 0


# 7. class names that differ only in case --------------------------------------------------------
def test_class_names_differing_only_in_case_are_refused(artifact_copy, tmp_path):
    from anoclip.export.cli import main as export_main
    from anoclip.export.text import parse_classes

    with pytest.raises(ArtifactError, match="'bottle' and class 'Bottle'.*differ only in letter case"):
        parse_classes("Bottle, carpet, bottle")
    res = CliRunner().invoke(export_main, ["add-class", str(artifact_copy), "Bottle"])
    assert res.exit_code == 2 and "class 'Bottle' and class 'bottle'" in error_lines(res)[0], res.output
    assert "Bottle" not in manifest(artifact_copy)["text"]["classes"]
    wrong = infer(artifact_copy, tmp_path / "x.png", "--class", "BOTTLE")
    assert "did you mean 'bottle'?" in error_lines(wrong)[0], wrong.output
    m = manifest(artifact_copy)  # an artifact from before the rule, holding both
    m["text"]["classes"]["Bottle"] = "object"
    (artifact_copy / "manifest.json").write_text(json.dumps(m))
    write_images(tmp_path / "good", [1])
    res = refs(artifact_copy, "--class", "bottle", "--good", str(tmp_path / "good"))
    assert res.exit_code == 2 and "class 'bottle' and class 'Bottle'" in error_lines(res)[0], res.output


def test_bank_entry_keeps_validating(banked):
    m = manifest(banked)
    m["references"]["bottle"]["contents_sha256"] = 5
    with pytest.raises(ArtifactError, match="'references.bottle.contents_sha256' must be string"):
        mf.validate_manifest(m)
