"""``anoclip-export`` through click's CliRunner: default command, explicit export, add-class, errors."""
from __future__ import annotations

import sys

import pytest
from click.testing import CliRunner

from anoclip.runtime import contract as mf


@pytest.fixture()
def runner():
    return CliRunner()


@pytest.fixture(scope="module")
def configs():
    from pathlib import Path

    return str(Path(__file__).resolve().parents[1] / "configs")


def _error_line(result) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_default_command_export_then_add_class(runner, configs, tmp_path, artifact):
    from anoclip.export.cli import main

    out = tmp_path / "art"
    args = ["--backbone", "anoclip-tiny", "--pretrained", "none", "--classes", "bottle", "--model-config", configs,
            "--out", str(out), "--text-cache", "none", "--quiet", "--exporter", "legacy"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "RANDOM WEIGHTS" in result.output
    assert f"artifact: {out}" in result.output and "verify fp32" in result.output
    data = mf.read_manifest(out)
    assert data["pretrained"]["random_weights"] is True and data["exporter"] == "legacy"

    result = runner.invoke(
        main, ["add-class", str(out), "carpet", "--domain", "texture", "--text-cache", "none", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert "added 'carpet'" in result.output
    assert mf.read_manifest(out)["text"]["classes"] == {"bottle": "object", "carpet": "texture"}

    # refusing to overwrite: one-line error, exit 2
    result = runner.invoke(main, args)
    assert result.exit_code == 2
    assert "already exists" in _error_line(result)


def test_explicit_export_command_form(runner, configs, tmp_path, monkeypatch):
    """`anoclip-export export ...` parses the same options (stopped before any heavy work)."""
    from anoclip.export.cli import main

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    result = runner.invoke(main, ["export", "--backbone", "anoclip-tiny", "--classes", "a,b", "--trt",
                                  "--model-config", configs, "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "--trt needs TensorRT" in _error_line(result)
    assert not (tmp_path / "x").exists()


def test_cli_precision_and_classes_errors(runner, configs, tmp_path):
    from anoclip.export.cli import main

    base = ["--backbone", "anoclip-tiny", "--model-config", configs, "--out", str(tmp_path / "x")]
    result = runner.invoke(main, base + ["--classes", "a", "--precision", "fp8"])
    assert result.exit_code == 2 and "unknown precision 'fp8'" in _error_line(result)
    result = runner.invoke(main, base + ["--classes", "a", "--precision", "fp16,bf16"])
    assert result.exit_code == 2 and "bf16 is not available" in _error_line(result)
    result = runner.invoke(main, base + ["--triton", str(tmp_path / "tr")])
    assert result.exit_code == 2 and "--triton folds the classes' prototypes" in _error_line(result)
    result = runner.invoke(main, ["--backbone", "ViT-Nope", "--classes", "a", "--out", str(tmp_path / "y")])
    assert result.exit_code == 2 and "unknown backbone" in _error_line(result)
    result = runner.invoke(main, ["add-class", str(tmp_path / "missing"), "carpet"])
    assert result.exit_code == 2 and "artifact folder not found" in _error_line(result)


def test_backbone_alone_exports_a_classless_artifact_named_after_it(runner, configs, tmp_path, monkeypatch):
    """Issue 11 item 8: `anoclip-export --backbone X` (no --out, no classes) writes ./X, then add-class + infer work."""
    import numpy as np

    from anoclip.export.cli import main
    from anoclip.runtime import Detector

    monkeypatch.chdir(tmp_path)
    result = runner.invoke(main, ["--backbone", "anoclip-tiny", "--pretrained", "none", "--model-config", configs,
                                  "--text-cache", "none", "--quiet", "--exporter", "legacy"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "anoclip-tiny"
    data = mf.read_manifest(out)
    assert data["text"]["classes"] == {} and data["models"]["fp32"]["verification"]["passed"] is True
    assert f"add-class {out} bottle" in result.output and "anoclip-infer" in result.output
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".anoclip-tiny.tmp")]  # no temp folder left

    with pytest.raises(Exception, match="text.classes: none"):
        Detector.load(out).predict(np.zeros((64, 64, 3), np.uint8), "bottle")
    result = runner.invoke(main, ["add-class", str(out), "bottle", "--text-cache", "none", "--quiet"])
    assert result.exit_code == 0, result.output
    res = Detector.load(out).predict(np.zeros((64, 64, 3), np.uint8), "bottle")
    assert res.anomaly_map.shape == (64, 64) and 0.0 <= float(res.score) <= 1.0


def test_default_out_is_a_safe_folder_name():
    from anoclip.export.api import default_out

    assert str(default_out("ViT-L-14")) == "ViT-L-14"
    assert str(default_out("hf-hub:org/model")) == "hf-hub-org-model"


def test_classes_file(tmp_path):
    from anoclip.export.text import read_classes_file

    f = tmp_path / "c.txt"
    f.write_text("bottle\n# comment\ncarpet, grid\n\nbottle\n")
    assert read_classes_file(f) == ["bottle", "carpet", "grid"]


def test_help_lists_both_commands(runner):
    from anoclip.export.cli import main

    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "add-class" in result.output and "export" in result.output
    result = runner.invoke(main, ["export", "--help"])
    assert result.exit_code == 0 and "--precision" in result.output and "--triton" in result.output


def test_add_class_console_script_self_contained(artifact, tmp_path):
    """A fresh process that never saw tests/configs: the manifest's open_clip_config rebuilds the backbone."""
    import shutil
    import subprocess

    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    proc = subprocess.run(
        [sys.executable, "-m", "anoclip.export.cli", "add-class", str(copy), "grid", "--text-cache", "none", "--quiet"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert mf.read_manifest(copy)["text"]["classes"]["grid"] == "texture"


def test_opset_below_18_needs_legacy(runner, configs, tmp_path):
    from anoclip.export.cli import main

    result = runner.invoke(main, ["--backbone", "anoclip-tiny", "--classes", "a", "--opset", "17",
                                  "--model-config", configs, "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--exporter legacy" in _error_line(result)


def test_force_reexport_says_calibration_and_banks_are_not_carried_over(runner, configs, tmp_path):
    from anoclip.export.cli import main

    out = tmp_path / "art"
    args = ["--backbone", "anoclip-tiny", "--pretrained", "none", "--classes", "bottle", "--model-config", configs,
            "--out", str(out), "--text-cache", "none", "--quiet", "--exporter", "legacy"]
    assert runner.invoke(main, args).exit_code == 0
    (out / "refs").mkdir()
    result = runner.invoke(main, [*args, "--force"])
    assert result.exit_code == 0, result.output
    assert "note: --force replaces" in result.output and "refs" in result.output
    result = runner.invoke(main, [*args, "--force"])  # nothing to lose now: no note
    assert "note: --force replaces" not in result.output
