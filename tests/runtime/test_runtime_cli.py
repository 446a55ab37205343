"""The ``anoclip-infer`` / ``anoclip`` command line."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from anoclip.runtime.cli import infer_main, main


def _write_images(folder, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        cv2.imwrite(str(folder / f"img{i}.png"), (rng.random((40 + 10 * i, 60, 3)) * 255).astype(np.uint8))
    return folder


def _lines(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_infer_to_stdout_with_folder_glob_and_bad_file(tiny_artifact, tmp_path):
    imgs = _write_images(tmp_path / "imgs")
    (tmp_path / "broken.png").write_bytes(b"nope")
    runner = CliRunner()
    res = runner.invoke(infer_main, [str(tiny_artifact), str(imgs), str(tmp_path / "imgs" / "img1.*"),
                                     str(tmp_path / "broken.png"), "--class", "bottle", "--batch", "2", "--quiet",
                                     "--threshold", "0.4"])
    lines = _lines(res.stdout)
    assert res.exit_code == 1, res.output  # one image failed
    assert len(lines) == 4  # img1 listed twice -> deduplicated
    ok = [ln for ln in lines if "error" not in ln]
    assert len(ok) == 3 and all(ln["random_weights"] is True and "RANDOM WEIGHTS" in ln["warning"] for ln in lines)
    assert all(ln["label"] == ("anomaly" if ln["score"] > 0.4 else "normal") for ln in ok)
    assert {"path", "score", "label", "regions", "timing", "backend"} <= set(ok[0])
    assert "cannot decode" in lines[-1]["error"]
    assert "WARNING" in res.stderr and "RANDOM WEIGHTS" in res.stderr
    n_anom = sum(ln["label"] == "anomaly" for ln in ok)
    assert f"{n_anom} anomal{'y' if n_anom == 1 else 'ies'}, 1 error(s)" in res.stderr
    cpu_backend = "openvino" if importlib.util.find_spec("openvino") else "ort-cpu"  # auto on a CPU
    assert f"backend {cpu_backend}" in res.stderr


def test_infer_out_dir_writes_jsonl_overlays_masks_summary(tiny_artifact, tmp_path):
    imgs = _write_images(tmp_path / "imgs", 2)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["infer", str(tiny_artifact), str(imgs / "*.png"), "--class", "carpet", "--out",
                                    str(out), "--backend", "ort-cpu", "--pixel-threshold", "0.3", "--quiet"])
    assert res.exit_code == 0, res.output
    lines = _lines((out / "results.jsonl").read_text())
    assert len(lines) == 2 and res.stdout.strip() == ""
    for ln in lines:
        overlay = cv2.imread(str(out / ln["overlay"]))
        mask = cv2.imread(str(out / ln["mask"]), cv2.IMREAD_UNCHANGED)
        h, w = ln["size"]
        assert overlay.shape == (h, w, 3) and mask.shape == (h, w)
        assert set(np.unique(mask)) <= {0, 255}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["count"] == 2 and summary["errors"] == 0 and summary["backend"] == "ort-cpu"
    assert summary["mean_latency_ms"] > 0


def test_infer_tiled_strip(tiny_artifact, tmp_path):
    strip = (np.random.default_rng(0).random((64, 1000, 3)) * 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "strip.png"), strip)
    res = CliRunner().invoke(infer_main, [str(tiny_artifact), str(tmp_path / "strip.png"), "--class", "bottle",
                                          "--tile", "--overlap", "16", "--quiet"])
    assert res.exit_code == 0, res.output
    (line,) = _lines(res.stdout)
    assert line["size"] == [64, 1000] and line["tiles"] == len(range(0, 1000 - 64, 48)) + 1


@pytest.mark.parametrize("args,needle", [
    (["--class", "screw"], "not in this artifact"),
    (["--class", "bottle", "--backend", "ort-cuda"], "onnxruntime-gpu"),
    (["--class", "bottle", "--threshold", "7"], "threshold"),
])
def test_infer_user_errors_exit_2_without_traceback(tiny_artifact, tmp_path, args, needle):
    imgs = _write_images(tmp_path / "imgs", 1)
    res = CliRunner().invoke(infer_main, [str(tiny_artifact), str(imgs), *args, "--quiet"])
    assert res.exit_code == 2, res.output
    assert needle in res.stderr and "Traceback" not in res.output


def test_tampered_artifact_cli(artifact_copy, tmp_path):
    imgs = _write_images(tmp_path / "imgs", 1)
    (artifact_copy / "text_embeddings.npz").write_bytes(b"x")
    res = CliRunner().invoke(infer_main, [str(artifact_copy), str(imgs), "--class", "bottle"])
    assert res.exit_code == 2 and "sha256 mismatch" in res.stderr


def test_calibrate_then_infer_uses_calibration(artifact_copy, tmp_path):
    good = _write_images(tmp_path / "good", 4)
    res = CliRunner().invoke(main, ["calibrate", str(artifact_copy), "--good", str(good), "--class", "bottle",
                                    "--quantile", "0.5"])
    assert res.exit_code == 0, res.output
    entry = _lines(res.stdout)[0]
    assert entry["images"] == 4 and 0 <= entry["pixel_threshold"] <= 1
    assert (artifact_copy / "calibration.json").is_file()
    res = CliRunner().invoke(infer_main, [str(artifact_copy), str(good), "--class", "bottle", "--quiet"])
    lines = _lines(res.stdout)
    assert all(ln["threshold_source"] == "calibration" for ln in lines)
    assert sum(ln["label"] == "anomaly" for ln in lines) == 2  # median threshold: 2 of 4 above


def test_calibrate_precision_makes_thresholds_the_int8_run_uses(static_int8_artifact, tmp_path, caplog):
    """`anoclip calibrate` had no --precision: it always calibrated the fp32 graph, and an int8 run ignored
    those thresholds with "re-run anoclip calibrate", which could only make fp32 ones again."""
    art = tmp_path / "art"
    shutil.copytree(static_int8_artifact, art)
    good = _write_images(tmp_path / "good", 4)
    calibrate = ["calibrate", str(art), "--good", str(good), "--class", "bottle", "--quantile", "0.5",
                 "--backend", "ort-cpu", "--quiet"]
    infer = [str(art), str(good), "--class", "bottle", "--backend", "ort-cpu", "--precision", "int8", "--quiet"]
    assert CliRunner().invoke(main, calibrate).exit_code == 0
    with caplog.at_level("WARNING", logger="anoclip.runtime"):
        res = CliRunner().invoke(infer_main, infer)
    assert all(ln["threshold_source"] == "default" for ln in _lines(res.stdout))
    assert any("made with the fp32 graph, this run uses int8" in r.getMessage()
               and r.getMessage().endswith("re-run anoclip calibrate --precision int8") for r in caplog.records)
    res = CliRunner().invoke(main, calibrate + ["--precision", "int8"])
    assert res.exit_code == 0, res.output
    assert _lines(res.stdout)[0]["binding"]["model"] == "int8"
    res = CliRunner().invoke(infer_main, infer)
    assert [ln["threshold_source"] for ln in _lines(res.stdout)] == ["calibration"] * 4


def test_summary_json_says_auto_was_asked_for_and_why_it_picked_the_backend(tiny_artifact, tmp_path):
    """The stderr line said 'backend auto -> ort-cpu ... (skipped openvino: ...)'; summary.json only 'ort-cpu'."""
    imgs = _write_images(tmp_path / "imgs", 1)
    out = tmp_path / "out"
    res = CliRunner().invoke(infer_main, [str(tiny_artifact), str(imgs), "--class", "bottle", "--out", str(out),
                                          "--quiet", "--no-overlays", "--no-masks"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend_requested"] == "auto"
    assert summary["backend_note"].startswith(f"backend auto -> {summary['backend']}, precision ")
    assert summary["backend_note"] in res.stderr  # the same words as the first stderr line


class _Shifted:
    """A backend proxy whose ``patch_probs`` are shifted by ``delta`` (everything else as is)."""

    def __init__(self, inner, delta: float) -> None:
        self.inner, self.delta, self.name = inner, delta, f"shifted({inner.name})"

    def run(self, pixels, prototypes, outputs):
        out = dict(self.inner.run(pixels, prototypes, outputs))
        if "patch_probs" in out:
            out["patch_probs"] = np.asarray(out["patch_probs"]) + np.float32(self.delta)
        return out


@pytest.mark.parametrize("delta,code", [(1e-7, 0), (1e-2, 1)])
def test_parity_command(tiny_artifact, monkeypatch, delta, code):
    """Backend b differs from a by ``delta`` on patch_probs only: below tolerance passes, 1e-2 fails (exit 1)."""
    from anoclip.runtime import Detector

    real_load = Detector.load.__func__

    def load(cls, artifact, backend="auto", *args, verify=True, **kw):
        det = real_load(cls, artifact, backend, *args, verify=verify, **kw)
        if not verify:  # parity loads backend b with verify=False
            det.backend = _Shifted(det.backend, delta)
        return det

    monkeypatch.setattr(Detector, "load", classmethod(load))
    res = CliRunner().invoke(main, ["parity", str(tiny_artifact), "--a", "ort-cpu", "--b", "ort-cpu"])
    assert res.exit_code == code, res.output
    report = _lines(res.stdout)[0]
    assert report["passed"] is (code == 0)
    assert report["a"] == "ort-cpu" and report["b"] == "shifted(ort-cpu)"
    assert report["outputs"]["patch_probs"]["max_abs"] == pytest.approx(delta, rel=0.1, abs=2e-7)
    assert all(d["passed"] for k, d in report["outputs"].items() if k != "patch_probs")


def test_console_scripts_installed(tiny_artifact, tmp_path):
    """The declared entry points exist and run; executed from PATH when installed, else via the declared target."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parents[2] / "setup.cfg")
    scripts = dict(line.split(" = ") for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines())
    assert (
        scripts["anoclip-infer"] == "anoclip.runtime.cli:infer_main"
        and scripts["anoclip"] == "anoclip.runtime.cli:main"
    )

    def command(name: str) -> list[str]:
        exe = shutil.which(name)
        if exe is not None:
            return [exe]
        mod, attr = scripts[name].split(":")
        return [sys.executable, "-c", f"import sys; from {mod} import {attr}; sys.exit({attr}())"]

    exe = command("anoclip-infer")
    imgs = _write_images(tmp_path / "imgs", 1)
    out = subprocess.run([*exe, str(tiny_artifact), str(imgs), "--class", "bottle"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert len(_lines(out.stdout)) == 1
    out = subprocess.run([*command("anoclip"), "--help"], capture_output=True, text=True, timeout=120)
    assert "calibrate" in out.stdout and "infer" in out.stdout
