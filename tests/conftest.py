"""Shared fixtures: tiny random-initialised open_clip configs, built once per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

CONFIG_DIR = Path(__file__).parent / "configs"
TINY = "anoclip-tiny"
TINY24 = "anoclip-tiny-24"


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def register_tiny() -> str:
    import open_clip

    open_clip.add_model_config(CONFIG_DIR)
    return TINY


@pytest.fixture(scope="session")
def text_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("text-cache")


@pytest.fixture(scope="session")
def tiny_model(register_tiny: str, text_cache: Path):
    """A 2-block, 64 px, patch-8 ViT (8 x 8 grid, D = 32) with seeded random weights."""
    from anoclip_core import AnoCLIP

    return AnoCLIP.create(TINY, pretrained=None, cache_dir=text_cache)


@pytest.fixture(scope="session")
def tiny24_model(register_tiny: str, text_cache: Path):
    """A 24-block, 32 px tiny ViT: the dual path must cover only its last 12 blocks."""
    from anoclip_core import AnoCLIP

    return AnoCLIP.create(TINY24, pretrained=None, cache_dir=text_cache)


def write_good_images(folder: Path, n: int = 6, seed: int = 3) -> Path:
    """``n`` smooth random RGB PNGs ("good" product images) of varied sizes, for int8 calibration."""
    import cv2
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = cv2.GaussianBlur((rng.random((48 + 8 * i, 72, 3)) * 255).astype(np.uint8), (5, 5), 0)
        cv2.imwrite(str(folder / f"good_{i:02d}.png"), img)
    return folder


@pytest.fixture(scope="session")
def static_int8_artifact(register_tiny: str, text_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """anoclip-tiny with fp32 + a static QDQ int8 graph calibrated on 6 'good' PNGs (folder ``good``)."""
    from anoclip.export.api import ExportConfig, export_artifact

    root = tmp_path_factory.mktemp("static-int8")
    good = write_good_images(root / "good")
    images = sorted(str(p) for p in good.glob("*.png"))
    return Path(export_artifact(ExportConfig(
        backbone=register_tiny, classes=["bottle", "carpet"], pretrained=None, out=root / "art",
        text_cache=text_cache, progress=False, precisions=["int8"], int8_mode="static", calibration_images=images)))
