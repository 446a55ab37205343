"""Calibration is checked, not trusted (issue 10 item 3): thresholds, prototypes, the file's sha256
recorded in the manifest, NaN scores as per-image errors, strict JSON output."""
from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from rt_fakes import PatchMeanBackend, fake_detector

from anoclip.runtime import Detector, InferConfig
from anoclip.runtime.calibration import calibrate
from anoclip_core.errors import ArtifactError, InputError

ROOT = Path(__file__).resolve().parents[2]


def _write_cal(art: Path, image_thr, pixel_thr=0.5) -> None:
    entry = {"image_threshold": image_thr, "pixel_threshold": pixel_thr}
    (art / "calibration.json").write_text(json.dumps(
        {"format": "anoclip-calibration", "format_version": 1, "classes": {"carpet": entry}}))


@pytest.mark.parametrize("value", [float("nan"), float("-inf"), -5, 2.0, "0.5", None, True])
def test_bad_threshold_is_refused_naming_class_and_field(artifact_copy, value):
    _write_cal(artifact_copy, 0.4, value)
    with pytest.raises(ArtifactError) as err:
        Detector.load(artifact_copy, backend="ort-cpu")
    msg = str(err.value)
    assert "class 'carpet' field 'pixel_threshold'" in msg and "[0, 1]" in msg and "\n" not in msg


def test_bad_threshold_through_the_cli_is_one_line_exit_2(artifact_copy, tmp_path):
    _write_cal(artifact_copy, float("nan"))
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), np.full((32, 32, 3), 128, np.uint8))
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from anoclip.runtime.cli import main; main()",
            "infer",
            str(artifact_copy),
            str(img),
            "--class",
            "carpet",
            "--backend",
            "ort-cpu",
        ],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "class 'carpet' field 'image_threshold'" in last and "nan" in last
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("value", [0.0, 1.0, 0.37])
def test_thresholds_on_the_edge_of_the_range_are_accepted(artifact_copy, value):
    _write_cal(artifact_copy, value, value)
    det = Detector.load(artifact_copy, backend="ort-cpu")
    assert det.thresholds("carpet")[:2] == (value, value)


@pytest.mark.parametrize("value", [float("nan"), 1.5, "0.5"])
def test_given_thresholds_follow_the_same_rule(value):
    with pytest.raises(InputError, match=r"threshold must be a finite number in \[0, 1\]"):
        InferConfig(class_name="bottle", threshold=value)


def test_calibrate_records_the_files_sha256_and_a_later_edit_is_refused(artifact_copy, tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    for i in range(3):
        cv2.imwrite(str(good / f"{i}.png"), np.full((40, 40, 3), 60 * i, np.uint8))
    det = Detector.load(artifact_copy, backend="ort-cpu")
    calibrate(det, [good], "bottle", quantile=0.5)
    raw = (artifact_copy / "calibration.json").read_bytes()
    record = json.loads((artifact_copy / "manifest.json").read_text())["calibration"]
    assert record["file"] == "calibration.json" and record["sha256"] == hashlib.sha256(raw).hexdigest()
    assert record["classes"]["bottle"]["images"] == 3 and record["classes"]["bottle"]["created"].endswith("Z")
    Detector.load(artifact_copy, backend="ort-cpu")
    edited = json.loads(raw)
    edited["classes"]["bottle"]["image_threshold"] = 0.999  # still a valid value: only the sha256 can tell
    (artifact_copy / "calibration.json").write_text(json.dumps(edited))
    with pytest.raises(ArtifactError, match="calibration.json changed since anoclip calibrate wrote it"):
        Detector.load(artifact_copy, backend="ort-cpu")
    (artifact_copy / "calibration.json").unlink()
    with pytest.raises(ArtifactError, match="calibration.json is missing but the manifest records"):
        Detector.load(artifact_copy, backend="ort-cpu")


def _replace_prototypes(art: Path, cls: str, protos: np.ndarray) -> None:
    """Tamper with the npz AND re-sign it in the manifest, as a careless tool would."""
    path = art / "text_embeddings.npz"
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays[f"{cls}/prototypes"] = protos.astype(np.float32)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["files"]["text_embeddings.npz"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (art / "manifest.json").write_text(json.dumps(manifest))


def test_nan_prototypes_are_refused_at_load(artifact_copy):
    protos = np.full((2, 32), np.nan)
    _replace_prototypes(artifact_copy, "carpet", protos)
    with pytest.raises(ArtifactError, match="prototypes of class 'carpet' contain NaN"):
        Detector.load(artifact_copy, backend="ort-cpu")


def test_prototypes_that_are_not_unit_norm_are_refused(artifact_copy):
    with np.load(artifact_copy / "text_embeddings.npz") as npz:
        protos = npz["bottle/prototypes"] * 1.01  # norm 1.01: off by 1e-2, over the 1e-3 tolerance
    _replace_prototypes(artifact_copy, "bottle", protos)
    with pytest.raises(ArtifactError, match=r"prototypes of class 'bottle' are not unit-norm \(norms 1.01"):
        Detector.load(artifact_copy, backend="ort-cpu")


class NaNForDarkImages(PatchMeanBackend):
    """Image score NaN for images darker than mid-gray; the others as PatchMeanBackend."""

    def run(self, pixels, prototypes, outputs=("patch_probs", "image_scores")):
        out = super().run(pixels, prototypes, outputs)
        dark = out["patch_probs"].mean(axis=(1, 2, 3)) < 0.5
        if "image_scores" in out:
            out["image_scores"] = np.where(dark[:, None], np.float32(np.nan), out["image_scores"])
        return out


def test_a_nan_score_is_an_error_for_that_image_and_the_batch_goes_on():
    det = fake_detector(NaNForDarkImages())
    dark, bright = np.full((64, 64, 3), 20, np.uint8), np.full((64, 64, 3), 230, np.uint8)
    results = det.predict_batch([bright, dark, bright], "bottle", threshold=0.99)
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].label is None and "score is NaN or infinite" in results[1].error
    assert results[0].label == "normal" and results[0].score == pytest.approx(230 / 255, abs=1e-5)


def test_results_are_strict_json_with_a_nan_image(tmp_path, monkeypatch):
    from anoclip.runtime import cli

    det = fake_detector(NaNForDarkImages())
    monkeypatch.setattr(cli.Detector, "load", classmethod(lambda cls, *a, **k: det))
    for name, v in (("dark", 20), ("bright", 230)):
        cv2.imwrite(str(tmp_path / f"{name}.png"), np.full((64, 64, 3), v, np.uint8))
    out = tmp_path / "out"
    summary = cli.run_infer("unused", [str(tmp_path / "dark.png"), str(tmp_path / "bright.png")],
                            InferConfig(class_name="bottle", out_dir=str(out), overlays=False), progress=False)
    assert summary["errors"] == 1 and summary["ok"] == 1

    def refuse(name: str) -> float:
        raise AssertionError(f"non-JSON constant {name}")

    lines = [json.loads(ln, parse_constant=refuse) for ln in (out / "results.jsonl").read_text().splitlines()]
    assert [("error" in d, d.get("label")) for d in lines] == [(True, None), (False, "anomaly")]  # bright: 0.9 > 0.5
    assert not any(isinstance(v, float) and math.isnan(v) for d in lines for v in d.values())
