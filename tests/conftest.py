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
