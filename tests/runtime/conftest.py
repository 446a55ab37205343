"""Runtime test fixtures: artifacts of the tiny model built once per session with ``export.api``."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_artifact(register_tiny: str, text_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """anoclip-tiny (64 px, 8 x 8 grid, D = 32, seeded random weights), classes bottle + carpet."""
    from anoclip.export.api import ExportConfig, export_artifact

    out = tmp_path_factory.mktemp("rt-art") / "tiny"
    return Path(export_artifact(ExportConfig(backbone=register_tiny, classes=["bottle", "carpet"], pretrained="none",
                                             out=out, text_cache=text_cache, progress=False)))


@pytest.fixture()
def artifact_copy(tiny_artifact: Path, tmp_path: Path) -> Path:
    """A private copy a test may tamper with."""
    dst = tmp_path / "art"
    shutil.copytree(tiny_artifact, dst)
    return dst


@pytest.fixture(scope="session")
def tiny_detector(tiny_artifact: Path):
    from anoclip.runtime import Detector

    det = Detector.load(tiny_artifact, backend="ort-cpu")
    yield det
    det.close()


@pytest.fixture()
def banked(artifact_copy: Path, tmp_path: Path) -> Path:
    """The tiny artifact with a 2-shot bottle bank built by the CLI (good images in ``tmp_path / "good"``)."""
    from test_refs import refs, write_images

    write_images(tmp_path / "good", [1, 2])
    res = refs(artifact_copy, "--class", "bottle", "--good", str(tmp_path / "good"))
    assert res.exit_code == 0, res.output
    return artifact_copy
