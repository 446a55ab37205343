"""anoclip-eval --shots K --seeds N on tiny folder / MVTec / VisA data sets (WinCLIP's few-shot protocol)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from anoclip_core.cli import main
from anoclip_core.datasets import load_samples, load_train_good
from anoclip_core.errors import AnoCLIPError, DatasetError
from anoclip_core.evaluate import EvalConfig, evaluate

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")
TRAIN = [f"t{i}.png" for i in range(6)]


def png(path: Path, rng: np.random.Generator, size: tuple[int, int] = (40, 48)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = cv2.GaussianBlur((rng.random((*size, 3)) * 255).astype(np.uint8), (5, 5), 0)
    assert cv2.imwrite(str(path), img)


def mask(path: Path, size: tuple[int, int] = (40, 48)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros(size, np.uint8)
    m[10:22, 12:24] = 255
    assert cv2.imwrite(str(path), m)


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fs") / "widget"
    rng = np.random.default_rng(5)
    for name in TRAIN:
        png(root / "train" / "good" / name, rng)
    for i in range(3):
        png(root / "good" / f"g{i}.png", rng)
        png(root / "scratch" / f"s{i}.png", rng)
        mask(root / "masks" / "scratch" / f"s{i}.png")
    return root


def by_hand(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def test_folder_few_shot_protocol(tiny_model, folder_root: Path) -> None:
    cfg = EvalConfig("folder", str(folder_root), backbone="anoclip-tiny", pretrained="none", progress=False,
                     shots=2, seeds=3, batch_size=4)
    res = evaluate(cfg, model=tiny_model)
    zero = evaluate(EvalConfig("folder", str(folder_root), backbone="anoclip-tiny", pretrained="none",
                               progress=False, batch_size=4), model=tiny_model)
    assert res["classes"] == zero["classes"]  # the zero-shot numbers are untouched
    assert all(s.defect_type != "train" for s in load_samples("folder", folder_root))
    fs = res["few_shot"]
    assert (fs["shots"], fs["seeds"], fs["visual_weight"], fs["fusion"]) == (2, [0, 1, 2], 0.5, "winclip+")
    draws = [tuple(r["references"]["widget"]["images"]) for r in fs["runs"]]
    assert all(len(set(d)) == 2 and set(d) <= set(TRAIN) for d in draws)
    assert len(set(draws)) > 1
    for key in ("image_auroc", "pixel_auroc", "pixel_ap", "aupro_reference"):
        values = [r["classes"]["widget"][key] for r in fs["runs"]]
        mean, std = by_hand(values)
        assert fs["classes"]["widget"][key]["mean"] == pytest.approx(mean, abs=1e-12)
        assert fs["classes"]["widget"][key]["std"] == pytest.approx(std, abs=1e-12)
        assert fs["mean"][key]["mean"] == pytest.approx(mean, abs=1e-12)
    assert len({r["classes"]["widget"]["pixel_auroc"] for r in fs["runs"]}) > 1


def test_seed_run_equals_direct_prediction(tiny_model, folder_root: Path) -> None:
    cfg = EvalConfig("folder", str(folder_root), backbone="anoclip-tiny", pretrained="none", progress=False,
                     shots=3, seeds=2, batch_size=2)
    res = evaluate(cfg, model=tiny_model)
    samples = load_samples("folder", folder_root)
    for run in res["few_shot"]["runs"]:
        drawn = [str(folder_root / "train" / "good" / n) for n in run["references"]["widget"]["images"]]
        bank = tiny_model.build_references(drawn)
        _, scores = tiny_model.predict(tiny_model.load_images([s.path for s in samples]), "widget", references=bank)
        want = roc_auc_score([s.label for s in samples], scores.numpy())
        assert run["classes"]["widget"]["image_auroc"] == pytest.approx(want, abs=1e-9)


def test_mvtec_and_visa_train_listing_and_few_shot(tiny_model, tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    mv = tmp_path / "mvtec"
    for i in range(3):
        png(mv / "bottle" / "train" / "good" / f"{i:03d}.png", rng)
        png(mv / "bottle" / "test" / "good" / f"{i:03d}.png", rng)
        png(mv / "bottle" / "test" / "crack" / f"{i:03d}.png", rng)
        mask(mv / "bottle" / "ground_truth" / "crack" / f"{i:03d}_mask.png")
    assert [Path(p).name for p in load_train_good("mvtec", mv, "bottle")] == ["000.png", "001.png", "002.png"]
    res = evaluate(EvalConfig("mvtec", str(mv), backbone="anoclip-tiny", pretrained="none", progress=False,
                              shots=1, seeds=2, views=False), model=tiny_model)
    assert len(res["few_shot"]["runs"]) == 2 and res["few_shot"]["runs"][0]["references"]["bottle"]["size"] == 64

    visa = tmp_path / "visa"
    rows = ["object,split,label,image,mask"]
    for i in range(3):
        png(visa / "candle" / f"n{i}.png", rng, (30, 50))
        png(visa / "candle" / f"tr{i}.png", rng, (30, 50))
        png(visa / "candle" / f"a{i}.png", rng, (30, 50))
        mask(visa / "candle" / f"m{i}.png", (30, 50))
        rows += [f"candle,train,normal,candle/tr{i}.png,", f"candle,test,normal,candle/n{i}.png,",
                 f"candle,test,anomaly,candle/a{i}.png,candle/m{i}.png"]
    (visa / "split_csv").mkdir()
    (visa / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    assert [Path(p).name for p in load_train_good("visa", visa, "candle")] == ["tr0.png", "tr1.png", "tr2.png"]
    res = evaluate(EvalConfig("visa", str(visa), backbone="anoclip-tiny", pretrained="none", progress=False,
                              shots=2, seeds=1), model=tiny_model)
    bank = res["few_shot"]["runs"][0]["references"]["candle"]
    assert len(bank["images"]) == 2 and bank["size"] == 2 * 2 * 64  # two crops per image


def test_cli_few_shot_table(folder_root: Path, tmp_path: Path) -> None:
    args = ["--dataset", "folder", "--root", str(folder_root), "--backbone", "anoclip-tiny", "--pretrained", "none",
            "--model-config", CONFIGS, "--no-progress", "--text-cache", str(tmp_path / "tc"), "--shots", "2",
            "--seeds", "2", "--coreset", "40", "--out", str(tmp_path / "out")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "2-shot (reference bank, WinCLIP+ rule, visual weight 0.5, coreset 40 patches)" in res.stdout
    assert "| mean, zero-shot |" in res.stdout and " ± " in res.stdout
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["few_shot"]["runs"][1]["references"]["widget"]["size"] == 40
    assert data["config"]["shots"] == 2


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--shots", "0"], "error: --shots must be >= 1"),
        (["--shots", "7"], "error: asked for 7 shots but class 'widget' (good training images) has only 6"),
        (["--shots", "2", "--tta"], "error: --shots and --tta cannot be combined"),
        (["--shots", "2", "--visual-weight", "2"], "error: visual weight must be in [0, 1]"),
        (["--shots", "2", "--seeds", "0"], "error: --seeds must be >= 1"),
    ],
)
def test_cli_few_shot_errors(folder_root: Path, tmp_path: Path, extra: list[str], match: str) -> None:
    args = ["--dataset", "folder", "--root", str(folder_root), "--backbone", "anoclip-tiny", "--pretrained", "none",
            "--model-config", CONFIGS, "--no-progress", "--text-cache", str(tmp_path / "tc"), *extra]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith(match), res.stderr


def test_missing_training_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    png(tmp_path / "part" / "good" / "g.png", rng)
    with pytest.raises(DatasetError, match=r"missing .*train/good \(good training images, needed for --shots\)"):
        load_train_good("folder", tmp_path / "part", "part")
    (tmp_path / "part" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="has no images"):
        load_train_good("folder", tmp_path / "part", "part")
    with pytest.raises(AnoCLIPError, match="--coreset must be >= 1"):
        EvalConfig("folder", str(tmp_path), shots=1, coreset=0)
