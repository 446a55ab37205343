"""evaluate() and anoclip-eval on tiny fake datasets with the tiny random config; overlays and PNGs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from anoclip_core import transform
from anoclip_core.cli import main
from anoclip_core.datasets import load_samples
from anoclip_core.errors import AnoCLIPError, InputError
from anoclip_core.evaluate import EvalConfig, evaluate, merge_crops, predict_two_crop, short_side_size
from anoclip_core.metrics import METRIC_KEYS, aupro_reference, compute_metrics
from anoclip_core.visualize import colorize, heatmap_overlay, save_png

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")


def noise_png(path: Path, rng: np.random.Generator, size: tuple[int, int] = (40, 48)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def mask_png(path: Path, rng: np.random.Generator, size: tuple[int, int] = (40, 48)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros(size, np.uint8)
    y, x = rng.integers(0, size[0] - 12), rng.integers(0, size[1] - 12)
    m[y : y + 12, x : x + 10] = 255
    assert cv2.imwrite(str(path), m)


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mvtec")
    rng = np.random.default_rng(0)
    for c in ("bottle", "wood"):
        for i in range(3):
            noise_png(root / c / "test" / "good" / f"{i:03d}.png", rng)
        for d in ("crack", "hole"):
            for i in range(2):
                noise_png(root / c / "test" / d / f"{i:03d}.png", rng)
                mask_png(root / c / "ground_truth" / d / f"{i:03d}_mask.png", rng)
    return root


@pytest.fixture(scope="module")
def visa_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("visa")
    rng = np.random.default_rng(1)
    rows = ["object,split,label,image,mask"]
    for i in range(3):
        noise_png(root / "candle/Data/Images/Normal" / f"{i:04d}.png", rng, (30, 50))
        rows.append(f"candle,test,normal,candle/Data/Images/Normal/{i:04d}.png,")
        noise_png(root / "candle/Data/Images/Anomaly" / f"{i:03d}.png", rng, (30, 50))
        mask_png(root / "candle/Data/Masks/Anomaly" / f"{i:03d}.png", rng, (30, 50))
        rows.append(f"candle,test,anomaly,candle/Data/Images/Anomaly/{i:03d}.png,candle/Data/Masks/Anomaly/{i:03d}.png")
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return root


def check_metrics(r: dict) -> None:
    for key in METRIC_KEYS:
        assert 0.0 <= r[key] <= 1.0, (key, r[key])


# evaluate() --------------------------------------------------------------------------------------
def test_evaluate_mvtec_writes_results(tiny_model, mvtec_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = EvalConfig("mvtec", str(mvtec_root), backbone="anoclip-tiny", pretrained="none", out=str(out),
                     overlays=2, batch_size=3, progress=False)
    res = evaluate(cfg, model=tiny_model)
    assert res["random_weights"] is True and res["views"] is True and res["protocol"] == "single"
    assert list(res["classes"]) == ["bottle", "wood"]
    for r in res["classes"].values():
        check_metrics(r)
        assert r["n_images"] == 7 and r["n_anomalous"] == 4 and r["reason"] == {}
    for key in METRIC_KEYS:
        assert res["mean"][key] == pytest.approx(np.mean([r[key] for r in res["classes"].values()]))
    saved = json.loads((out / "results.json").read_text())
    assert saved["random_weights"] is True
    assert saved["classes"]["bottle"]["aupro"] == pytest.approx(res["classes"]["bottle"]["aupro"])
    md = (out / "results.md").read_text()
    assert "RANDOM WEIGHTS" in md and "| bottle | 7 |" in md and "**mean**" in md and "AUPRO" in md
    for c in ("bottle", "wood"):
        pngs = sorted((out / "overlays" / c).glob("*.png"))
        assert [p.name for p in pngs] == ["crack_000.png", "crack_001.png"]
        img = cv2.imread(str(pngs[0]))
        assert img.shape == (64, 64, 3)


def test_evaluate_equals_direct_prediction(tiny_model, mvtec_root: Path) -> None:
    """The per-class numbers are the metrics of model.predict's maps against the resized masks."""
    cfg = EvalConfig("mvtec", str(mvtec_root), classes=("wood",), views=False, progress=False, batch_size=2)
    res = evaluate(cfg, model=tiny_model)
    samples = load_samples("mvtec", mvtec_root, ["wood"])
    maps, scores = tiny_model.predict(tiny_model.load_images([s.path for s in samples]), "wood")
    masks = [
        transform.resize_mask(transform.read_image(s.mask_path), 64) if s.mask_path else np.zeros((64, 64))
        for s in samples
    ]
    expected = compute_metrics(maps.numpy(), masks, scores.numpy(), [s.label for s in samples])
    for key in METRIC_KEYS:
        assert res["classes"]["wood"][key] == pytest.approx(expected[key], abs=1e-9), key
    ref = aupro_reference(maps.numpy(), masks)
    assert res["classes"]["wood"]["aupro_reference"] == pytest.approx(ref, abs=1e-12)
    assert res["mean"]["aupro_reference"] == pytest.approx(ref, abs=1e-12)
    assert res["views"] is False and list(res["classes"]) == ["wood"]


def test_two_crop_helpers() -> None:
    assert short_side_size(30, 50, 64) == (64, 106)
    assert short_side_size(50, 30, 64) == (106, 64)
    maps = np.stack([np.full((4, 4), 1.0), np.full((4, 4), 3.0)])
    merged = merge_crops(maps, [(0, 0, 4, 4), (0, 2, 4, 4)], (4, 6))
    assert merged.shape == (4, 6)
    np.testing.assert_allclose(merged[:, :2], 1.0)
    np.testing.assert_allclose(merged[:, 2:4], 2.0)
    np.testing.assert_allclose(merged[:, 4:], 3.0)


def test_two_crop_on_a_square_image_equals_single_prediction(tiny_model) -> None:
    rgb = np.random.default_rng(3).random((64, 64, 3)).astype(np.float32)
    maps, scores = predict_two_crop(tiny_model, [rgb], "candle")
    pixels = tiny_model.load_images([rgb])
    ref_maps, ref_scores = tiny_model.predict(pixels, "candle", views=False)
    np.testing.assert_allclose(maps[0], ref_maps[0].numpy(), atol=1e-5)
    assert scores[0] == pytest.approx(float(ref_scores[0]), abs=1e-6)


def test_two_crop_on_a_wide_image(tiny_model) -> None:
    rgb = np.random.default_rng(4).random((30, 50, 3)).astype(np.float32)
    maps, scores = predict_two_crop(tiny_model, [rgb, rgb[:, ::-1].copy()], "candle")
    assert maps[0].shape == (64, 106) and maps[1].shape == (64, 106)
    resized = transform.resize_bilinear_antialias(rgb, 64, 106)
    cfg = tiny_model.preprocess_config
    left = torch.from_numpy(transform.normalize_rgb(resized[:, :64], cfg))[None]
    right = torch.from_numpy(transform.normalize_rgb(resized[:, 42:], cfg))[None]
    (m_left, s_left), (m_right, s_right) = (tiny_model.predict(x, "candle") for x in (left, right))
    np.testing.assert_allclose(maps[0][:, :42], m_left[0, :, :42].numpy(), atol=1e-5)
    np.testing.assert_allclose(maps[0][:, 64:], m_right[0, :, 22:].numpy(), atol=1e-5)
    np.testing.assert_allclose(maps[0][:, 42:64], (m_left[0, :, 42:] + m_right[0, :, :22]).numpy() / 2, atol=1e-5)
    assert scores[0] == pytest.approx((float(s_left[0]) + float(s_right[0])) / 2, abs=1e-6)


def test_evaluate_visa_two_crop(tiny_model, visa_root: Path, tmp_path: Path) -> None:
    res = evaluate(EvalConfig("visa", str(visa_root), out=str(tmp_path), overlays=1, progress=False), tiny_model)
    assert res["protocol"] == "two-crop" and res["views"] is False
    check_metrics(res["classes"]["candle"])
    img = cv2.imread(str(tmp_path / "overlays" / "candle" / "anomaly_000.png"))
    assert img.shape == (64, 106, 3)


def test_evaluate_folder_without_some_masks(tiny_model, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    root = tmp_path / "widget"
    for i in range(3):
        noise_png(root / "good" / f"g{i}.png", rng)
        noise_png(root / "scratch" / f"s{i}.png", rng)
        mask_png(root / "masks" / "scratch" / f"s{i}_mask.png", rng)
    noise_png(root / "dent" / "d0.png", rng)
    res = evaluate(EvalConfig("folder", str(root), progress=False), tiny_model)
    r = res["classes"]["widget"]
    check_metrics(r)
    assert res["views"] is False
    assert r["n_images"] == 7 and r["n_pixel_truth"] == 6
    assert "1 anomalous image(s) without a mask" in r["reason"]["pixel_truth"]


def test_evaluate_nan_with_reason_when_no_defects(tiny_model, tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    for i in range(2):
        noise_png(tmp_path / "only" / "good" / f"{i}.png", rng)
    res = evaluate(EvalConfig("folder", str(tmp_path / "only"), out=str(tmp_path / "o"), progress=False), tiny_model)
    r = res["classes"]["only"]
    assert all(math.isnan(r[k]) for k in METRIC_KEYS)
    assert "no defective pixels" in r["reason"]["aupro"]
    saved = json.loads((tmp_path / "o" / "results.json").read_text())
    assert saved["classes"]["only"]["aupro"] is None
    assert "n/a" in (tmp_path / "o" / "results.md").read_text()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dataset": "kitti"}, "unknown dataset"),
        ({"batch_size": 0}, "batch size"),
        ({"overlays": -1}, "overlays"),
        ({"dataset": "visa", "views": True}, "does not apply to VisA"),
    ],
)
def test_config_errors(kwargs: dict, match: str) -> None:
    args = {"dataset": "mvtec", "root": "/nowhere", **kwargs}
    with pytest.raises(AnoCLIPError, match=match):
        EvalConfig(**args)


# CLI ---------------------------------------------------------------------------------------------
def cli_args(root: Path, *extra: str) -> list[str]:
    return ["--root", str(root), "--backbone", "anoclip-tiny", "--pretrained", "none",
            "--model-config", CONFIGS, "--no-progress", *extra]


def test_cli_mvtec(mvtec_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli-out"
    args = cli_args(mvtec_root, "--dataset", "mvtec", "--out", str(out), "--classes", "bottle",
                    "--batch-size", "4", "--overlays", "1", "--text-cache", str(tmp_path / "tc"))
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "!!! RANDOM WEIGHTS" in res.stderr
    assert "| bottle | 7 |" in res.stdout
    data = json.loads((out / "results.json").read_text())
    assert data["random_weights"] is True and list(data["classes"]) == ["bottle"]
    assert data["config"]["batch_size"] == 4 and data["views"] is True
    check_metrics(data["classes"]["bottle"])
    assert (out / "results.md").is_file()
    assert [p.name for p in (out / "overlays" / "bottle").glob("*.png")] == ["crack_000.png"]


def test_cli_no_views_and_tta(mvtec_root: Path, tmp_path: Path) -> None:
    args = cli_args(mvtec_root, "--dataset", "mvtec", "--classes", "wood", "--no-views", "--tta",
                    "--text-cache", "none")
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "TTA on | views off" in res.stdout


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--dataset", "mvtec", "--root", "/definitely/missing"], "error: dataset root not found: /definitely/missing"),
        (["--dataset", "mvtec", "--classes", "cable"], "error: class(es) cable not found"),
        (["--dataset", "mvtec", "--classes", " , "], "error: --classes ' , ' names no class"),
        (["--dataset", "mvtec", "--backbone", "ViT-Q-99"], "error: unknown backbone 'ViT-Q-99'"),
        (["--dataset", "mvtec", "--batch-size", "0"], "error: batch size must be >= 1"),
        (["--dataset", "visa", "--views"], "error: --views does not apply to VisA"),
        (["--dataset", "mvtec", "--pretrained", "/no/such/weights.pt"], "error: weights file not found"),
        (["--dataset", "mvtec", "--model-config", "/no/such/configs"], "error: model config path not found"),
    ],
)
def test_cli_errors(mvtec_root: Path, extra: list[str], match: str) -> None:
    args = cli_args(mvtec_root) + extra
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith(match), res.stderr
    assert "Traceback" not in res.output


def test_cli_unknown_device(mvtec_root: Path) -> None:
    res = CliRunner().invoke(main, cli_args(mvtec_root, "--dataset", "mvtec", "--device", "tpu"))
    assert res.exit_code == 2 and "error: unknown device 'tpu'" in res.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cli_cuda_unavailable(mvtec_root: Path) -> None:
    res = CliRunner().invoke(main, cli_args(mvtec_root, "--dataset", "mvtec", "--device", "cuda"))
    assert res.exit_code == 2 and "error: device 'cuda' requested but CUDA is not available" in res.stderr


# visualize ---------------------------------------------------------------------------------------
def test_heatmap_overlay() -> None:
    img = np.full((10, 12, 3), 100, np.uint8)
    amap = np.zeros((10, 12), np.float32)
    amap[:, 6:] = 1.0
    out = heatmap_overlay(img, amap, alpha=1.0)
    assert out.dtype == np.uint8 and out.shape == (10, 12, 3)
    assert out[0, 0, 2] > 100 and out[0, 0, 0] == 0  # JET low end is blue (RGB)
    assert out[0, 11, 0] > 100 and out[0, 11, 2] == 0  # high end is red
    np.testing.assert_array_equal(heatmap_overlay(img, amap, alpha=0.0), img)
    half = heatmap_overlay(img.astype(np.float32) / 255, amap, alpha=0.5)
    expected = np.rint(0.5 * 100 + 0.5 * colorize(amap).astype(np.float32)).astype(np.uint8)
    np.testing.assert_array_equal(half, expected)
    small = heatmap_overlay(img, np.full((5, 6), 0.5, np.float32))
    assert small.shape == (10, 12, 3)
    np.testing.assert_array_equal(heatmap_overlay(img, amap * 10, vmin=0, vmax=10), heatmap_overlay(img, amap))
    with pytest.raises(InputError):
        heatmap_overlay(np.zeros((4, 4, 2), np.uint8), np.zeros((4, 4)))
    with pytest.raises(InputError):
        heatmap_overlay(img, amap, vmin=1.0, vmax=1.0)


def test_save_png_is_atomic_and_rgb(tmp_path: Path) -> None:
    rgb = np.zeros((5, 7, 3), np.uint8)
    rgb[..., 0] = 200
    path = save_png(tmp_path / "sub" / "x.png", rgb)
    back = cv2.imread(str(path))
    assert back.shape == (5, 7, 3) and back[0, 0, 2] == 200 and back[0, 0, 0] == 0
    save_png(path, np.full((5, 7, 3), 9, np.uint8))
    assert cv2.imread(str(path))[0, 0, 0] == 9
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.png"]
    with pytest.raises(InputError):
        save_png(tmp_path / "bad.png", np.zeros((4, 4, 3), np.float32))
    assert not (tmp_path / "bad.png").exists()


def test_tta_results_do_not_depend_on_batch_size(tiny_model, mvtec_root: Path) -> None:
    """Each image adapts with the seed stream of its index in the class, whatever the batching."""
    from anoclip_core.evaluate import predict_class

    samples = load_samples("mvtec", mvtec_root, ["bottle"])
    runs = {}
    for bs in (1, 3, 7):
        cfg = EvalConfig("mvtec", str(mvtec_root), classes=("bottle",), views=False, tta=True, progress=False,
                         batch_size=bs)
        runs[bs] = np.stack(predict_class(tiny_model, samples, cfg).maps)
    plain_cfg = EvalConfig("mvtec", str(mvtec_root), classes=("bottle",), views=False, progress=False, batch_size=7)
    plain = np.stack(predict_class(tiny_model, samples, plain_cfg).maps)
    assert np.abs(runs[1] - plain).max() > 1e-6, "TTA must change the maps for this test to mean anything"
    np.testing.assert_allclose(runs[3], runs[1], atol=1e-6)
    np.testing.assert_allclose(runs[7], runs[1], atol=1e-6)
