"""``--max-pixels``: the decoder's refusal of an oversized image names it, so every CLI that decodes user
images offers it (anoclip-infer, anoclip calibrate / refs, anoclip-eval, anoclip-export --calibration-images)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from anoclip_core import transform
from tests.conftest import CONFIG_DIR


@pytest.fixture(autouse=True)
def _restore_decode_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLIs set a process-wide limit; put it (and OpenCV's) back after each test."""
    monkeypatch.setattr(transform, "_max_pixels", transform._max_pixels)
    monkeypatch.setenv("OPENCV_IO_MAX_IMAGE_PIXELS", str(1 << 30))


def _png(path: Path, h: int = 40, w: int = 48, seed: int = 0) -> None:
    """An h x w noise PNG (40 x 48 = 1920 pixels by default)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _one_error(res) -> str:
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert "Traceback" not in res.output
    return lines[0]


def _commands() -> dict[str, tuple[object, list[str]]]:
    from anoclip.export.cli import cli as export_cli
    from anoclip.runtime.cli import infer_main
    from anoclip.runtime.cli import main as runtime_main
    from anoclip_core.cli import main as eval_main

    return {"anoclip-infer": (infer_main, []), "anoclip calibrate": (runtime_main, ["calibrate"]),
            "anoclip refs": (runtime_main, ["refs"]), "anoclip-eval": (eval_main, []),
            "anoclip-export": (export_cli, ["export"])}


@pytest.mark.parametrize("name", ["anoclip-infer", "anoclip calibrate", "anoclip refs", "anoclip-eval",
                                  "anoclip-export"])
def test_every_image_decoding_cli_offers_max_pixels(name):
    command, sub = _commands()[name]
    res = CliRunner().invoke(command, [*sub, "--help"])
    assert res.exit_code == 0 and "--max-pixels" in res.output, res.output


def _folder_dataset(root: Path) -> Path:
    for i in range(2):
        _png(root / "good" / f"{i}.png", seed=i)
        _png(root / "crack" / f"{i}.png", seed=10 + i)
    return root


def test_eval_max_pixels_is_the_decode_limit(tmp_path):
    from anoclip_core.cli import main

    root = _folder_dataset(tmp_path / "parts")
    args = ["--dataset", "folder", "--root", str(root), "--backbone", "anoclip-tiny", "--pretrained", "none",
            "--model-config", str(CONFIG_DIR), "--text-cache", "none", "--no-progress", "--no-views"]
    line = _one_error(CliRunner().invoke(main, [*args, "--max-pixels", "1919"]))
    assert "over the decode limit of 1919 pixels" in line and "--max-pixels" in line
    assert ".png is 48 x 40 (1920 pixels)" in line
    res = CliRunner().invoke(main, [*args, "--max-pixels", "1920"])  # the limit is inclusive
    assert res.exit_code == 0, res.output
    assert "max image pixels must be >= 4, got 3" in _one_error(CliRunner().invoke(main, [*args, "--max-pixels", "3"]))


def test_export_max_pixels_applies_to_calibration_images(tmp_path):
    from anoclip.export.cli import cli

    _png(tmp_path / "good" / "a.png", h=64, w=64)  # 4096 pixels
    base = ["export", "--backbone", "anoclip-tiny", "--pretrained", "none", "--classes", "bottle", "--quiet",
            "--text-cache", "none", "--model-config", str(CONFIG_DIR), "--out", str(tmp_path / "art"),
            "--precision", "int8", "--calibration-images", str(tmp_path / "good")]
    line = _one_error(CliRunner().invoke(cli, [*base, "--max-pixels", "4095"]))
    assert "a.png" in line and "over the decode limit of 4095 pixels" in line and "--max-pixels" in line
    assert not (tmp_path / "art").exists()
    assert "max image pixels must be >= 4" in _one_error(CliRunner().invoke(cli, [*base, "--max-pixels", "0"]))
