"""The main job end to end (export -> calibrate -> infer) on the bundled images, tiny model."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest
from click.testing import CliRunner

pytest.importorskip("conformal_clip_data")

from anoclip.demo.cli import DemoConfig, main, run_demo, sample_images  # noqa: E402
from tests.conftest import CONFIG_DIR, TINY  # noqa: E402


def test_sample_images_are_disjoint_and_deterministic() -> None:
    calib, good, defect = sample_images(4, 6)
    assert len(calib) == 6 and len(good) == 4 and len(defect) == 4
    assert not set(calib) & set(good)
    assert all("nominal" in str(p) for p in calib + good)
    assert all("nominal" not in str(p) for p in defect)
    assert sample_images(4, 6) == (calib, good, defect)


def test_demo_runs_end_to_end(tmp_path: Path, register_tiny: str) -> None:
    cfg = DemoConfig(backbone=TINY, pretrained="none", images=2, calibration_images=3, out=tmp_path / "demo",
                     model_config=str(CONFIG_DIR))
    summary = run_demo(cfg)
    assert summary["random_weights"] is True
    assert summary["good"]["count"] == 2 and summary["defect"]["count"] == 2
    assert summary["good"]["errors"] == 0 and summary["defect"]["errors"] == 0
    art = tmp_path / "demo" / "artifact"
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["pretrained"]["random_weights"] is True
    assert "textile" in manifest["text"]["classes"]
    sheet = cv2.imread(summary["contact_sheet"])
    assert sheet is not None and sheet.shape[0] >= 256 and sheet.shape[1] == 4 * 256, "one tile per test image"
    lines = (tmp_path / "demo" / "results" / "defect" / "results.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    assert len(recs) == 2 and all(r["random_weights"] for r in recs)
    assert all((tmp_path / "demo" / "results" / "defect" / r["overlay"]).is_file() for r in recs)
    calib = json.loads((art / "calibration.json").read_text())
    assert calib["classes"]["textile"]["images"] == 3
    first_mtime = (art / "encoder.onnx").stat().st_mtime_ns  # not the manifest: calibrate records itself there
    run_demo(cfg)
    assert (art / "encoder.onnx").stat().st_mtime_ns == first_mtime, "a matching artifact must be reused"
    assert json.loads((art / "manifest.json").read_text())["created"] == manifest["created"]


def test_demo_cli_reports_offline_clearly(tmp_path: Path, register_tiny: str, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(main, ["--backbone", TINY, "--pretrained", "no-such-tag", "--out",
                                       str(tmp_path / "d"), "--model-config", str(CONFIG_DIR)])
    assert result.exit_code == 2
    assert "error:" in result.output and "no-such-tag" in result.output
    assert not (tmp_path / "d" / "artifact").exists()
