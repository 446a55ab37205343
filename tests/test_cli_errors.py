"""Every CLI: bad options and usage errors give `error: <one line>` and exit 2, checked before loading."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ENTRY = {
    "anoclip-infer": "from anoclip.runtime.cli import infer_main as m; m()",
    "anoclip": "from anoclip.runtime.cli import main as m; m()",
    "anoclip-bench": "from anoclip.benchmarks.cli import main as m; m()",
    "anoclip-export": "from anoclip.export.cli import main as m; m()",
}


def run(prog: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", ENTRY[prog], *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def assert_one_line(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("opts,needle", [
    (["--tile-size", "1"], "tile size must be >= 2"),
    (["--tile-size", "-5"], "tile size must be >= 2"),
    (["--tile-size", "0"], "tile size must be >= 2"),
    (["--overlap", "-1"], "overlap must be >= 0"),
    (["--tile-size", "64", "--overlap", "40"], "over half the tile size 64"),
    (["--threads", "0"], "threads must be >= 1"),
])
def test_infer_rejects_bad_tiling_and_threads_before_loading(tmp_path: Path, opts: list[str], needle: str):
    # the artifact does not exist: the option error must come first, before any loading
    assert_one_line(run("anoclip-infer", str(tmp_path / "none"), "x.png", "--class", "a", *opts), needle)


def test_unwritable_out_is_found_before_loading(tmp_path: Path):
    f = tmp_path / "file"
    f.write_text("x")
    proc = run("anoclip-infer", str(tmp_path / "none"), "x.png", "--class", "a", "--out", str(f / "sub"))
    assert_one_line(proc, "is not writable")


def test_parity_negative_batch(tmp_path: Path):
    assert_one_line(run("anoclip", "parity", str(tmp_path / "none"), "--batch", "-1"), "--batch must be >= 1")


@pytest.mark.parametrize("prog,args,needle", [
    ("anoclip-infer", ["--nope"], "No such option"),
    ("anoclip", ["calibrate", "art", "--good", "g", "--class", "a", "--batch", "two"], "'two' is not a valid integer"),
    ("anoclip", ["nosuch"], "No such command"),
    ("anoclip-bench", ["--threads", "x"], "not a valid integer"),
    ("anoclip-bench", ["--batch-sizes", "x", "--out", "/nonexistent-i10b"], "--batch-sizes"),
    ("anoclip-export", ["--nope"], "No such option"),
])
def test_usage_errors_are_one_line_exit_2(prog: str, args: list[str], needle: str):
    assert_one_line(run(prog, *args), needle)


@pytest.mark.parametrize("text,needle", [("not json", "is not valid JSON"), ('{"embed_dim": 4}', "lacks vision_cfg")])
def test_bench_model_config_must_be_an_open_clip_json(tmp_path: Path, text: str, needle: str):
    cfg = tmp_path / "m.json"
    cfg.write_text(text)
    assert_one_line(run("anoclip-bench", "--quick", "--model-config", str(cfg), "--out", str(tmp_path / "o")), needle)


@pytest.mark.parametrize("opts,needle", [
    (["--threads", "0"], "threads must be >= 1, got 0"),
    (["--threads", "-2"], "threads must be >= 1, got -2"),
    (["--batch", "0"], "batch must be >= 1"),
    (["--quantile", "0"], "--quantile must be in (0, 1]"),
    (["--quantile", "1.5"], "--quantile must be in (0, 1]"),
])
def test_calibrate_numeric_options_before_loading(tmp_path: Path, opts: list[str], needle: str):
    args = ["calibrate", str(tmp_path / "none"), "--good", str(tmp_path), "--class", "a", *opts]
    assert_one_line(run("anoclip", *args), needle)


def test_parity_negative_seed(tmp_path: Path):
    assert_one_line(run("anoclip", "parity", str(tmp_path / "none"), "--seed", "-1"), "--seed must be >= 0")


@pytest.mark.parametrize("opts,needle", [
    (["--trt-profile", "0,8,32"], "1 <= min <= opt <= max"), (["--trt-profile", "8,4,32"], "1 <= min <= opt <= max"),
    (["--image-size", "0"], "--image-size must be >= 1"),
])
def test_export_numeric_options(tmp_path: Path, opts: list[str], needle: str):
    assert_one_line(run("anoclip-export", "--backbone", "ViT-Nope", "--classes", "a", "--out", str(tmp_path / "o"),
                        *opts), needle)


def test_library_threads_zero_is_refused():
    from anoclip.runtime.backends import create_backend
    from anoclip_core.errors import InputError

    with pytest.raises(InputError, match="threads must be >= 1"):
        create_backend("ort-cpu", "/nonexistent", {}, threads=0)


def test_directory_given_as_an_image_is_reported_as_a_directory(tmp_path: Path):
    import cv2
    import numpy as np

    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "b.png").mkdir()  # what a shell glob '*.png' passes along with the files
    proc = run("anoclip-infer", str(tmp_path / "none"), str(tmp_path / "a.png"), str(tmp_path / "b.png"),
               "--class", "a")
    assert_one_line(proc, f"{tmp_path / 'b.png'} is a directory, not an image file")
