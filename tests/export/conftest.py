"""Export fixtures: one tiny artifact per session (fp32 + fp16 + int8 + Triton), built once."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CLASSES = ["bottle", "carpet"]


def tiny_config(out, **kw):
    from anoclip.export.api import ExportConfig

    base = dict(
        backbone="anoclip-tiny",
        pretrained=None,
        classes=list(CLASSES),
        out=out,
        model_config=str(CONFIG_DIR),
        text_cache=None,
        progress=False,
    )
    base.update(kw)
    return ExportConfig(**base)


@pytest.fixture(scope="session")
def make_config():
    """``make_config(out, **overrides)`` -> an ``ExportConfig`` for the tiny model."""
    return tiny_config


@pytest.fixture(scope="session")
def artifact(register_tiny, tmp_path_factory) -> Path:
    """anoclip-tiny, classes bottle+carpet, precisions fp32/fp16/int8, a Triton repository."""
    from anoclip.export.api import export_artifact

    root = tmp_path_factory.mktemp("export")
    cfg = tiny_config(root / "art", precisions=["fp16", "int8"], triton=root / "triton")
    return export_artifact(cfg)


@pytest.fixture(scope="session")
def manifest(artifact) -> dict:
    return json.loads((artifact / "manifest.json").read_text())
