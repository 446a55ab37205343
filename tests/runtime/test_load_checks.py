"""At load, what the graph declares is checked against the manifest: one clear error, never an
engine's traceback, never a failure mid-batch (issue 10 item 5)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anoclip.runtime import Detector
from anoclip.runtime import contract as mf
from anoclip.runtime.backends.onnx_info import read_graph_info
from anoclip_core.errors import ArtifactError

CPU_BACKENDS = ["ort-cpu", "openvino"]


def _rehash(root: Path, data: dict | None = None) -> dict:
    """Re-record every file's sha256 (a tamper the checksums cannot see) and rewrite the manifest."""
    data = data or json.loads((root / "manifest.json").read_text())
    data["files"] = mf.file_hashes(root, data["files"])
    mf.write_manifest(root, data, validate=False)
    return data


def _edit_manifest(root: Path, edit) -> None:
    data = json.loads((root / "manifest.json").read_text())
    edit(data)
    (root / "manifest.json").write_text(json.dumps(data))


def _infer(root: Path, image: Path, *args: str) -> subprocess.CompletedProcess:
    code = "from anoclip.runtime.cli import infer_main as m; m()"
    return subprocess.run([sys.executable, "-c", code, str(root), str(image), "--class", "bottle", "--quiet", *args],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.fixture()
def image(tmp_path: Path) -> Path:
    import cv2

    path = tmp_path / "img.png"
    cv2.imwrite(str(path), np.full((40, 50, 3), 128, np.uint8))
    return path


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("content", ["truncated", "text"])
def test_graph_not_onnx_with_matching_sha_is_one_line(artifact_copy: Path, image: Path, backend: str, content: str):
    graph = artifact_copy / "encoder.onnx"
    raw = graph.read_bytes()
    graph.write_bytes(raw[: len(raw) // 2] if content == "truncated" else b"this is not a graph\n" * 10)
    _rehash(artifact_copy)
    line = _one_error_line(_infer(artifact_copy, image, "--backend", backend))
    assert f"{graph}: not a valid ONNX graph (" in line


def test_graph_reader_sees_declared_inputs(tiny_artifact: Path):
    # tiny model: 64 px input, D = 32 (tests/configs/anoclip-tiny.json); batch/classes symbolic
    info = read_graph_info(tiny_artifact / "encoder.onnx")
    assert info.inputs["pixels"][1:] == [3, 64, 64] and isinstance(info.inputs["pixels"][0], str)
    assert info.inputs["text_prototypes"][1:] == [2, 32]
    assert info.external_locations == []


def _externalise(root: Path, location: str) -> None:
    """Rewrite the graph with its weights as external data at ``location`` (relative to the graph;
    onnx refuses to write ``..`` itself, so the locations are edited in the proto afterwards)."""
    import onnx

    model = onnx.load(str(root / "encoder.onnx"))
    onnx.save_model(model, str(root / "encoder.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="w.data", size_threshold=1024)
    os.replace(root / "w.data", root / location)
    model = onnx.load(str(root / "encoder.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    (root / "encoder.onnx").write_bytes(model.SerializeToString())
    _rehash(root)


def test_external_data_inside_the_artifact_loads(artifact_copy: Path):
    _externalise(artifact_copy, "encoder.onnx.data")
    assert read_graph_info(artifact_copy / "encoder.onnx").external_locations[0] == "encoder.onnx.data"
    Detector.load(artifact_copy, backend="ort-cpu", verify=False).close()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_external_data_outside_the_artifact_is_refused(artifact_copy: Path, backend: str):
    _externalise(artifact_copy, "../outside.data")
    assert (artifact_copy.parent / "outside.data").is_file()  # the data is really there: only the place is wrong
    with pytest.raises(ArtifactError, match=r"external data '\.\./outside\.data' lies outside the artifact folder"):
        Detector.load(artifact_copy, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_manifest_image_size_not_the_graph_is_refused_at_load(artifact_copy: Path, backend: str):
    def edit(d):
        d["image_size"] = d["preprocess"]["image_size"] = 96  # the graph declares 64

    _edit_manifest(artifact_copy, edit)
    with pytest.raises(ArtifactError, match=r"declares pixels \[\w+, 3, 64, 64\] .* needs \[B, 3, 96, 96\]"):
        Detector.load(artifact_copy, backend=backend)


def test_prototype_width_not_the_graph_is_refused_at_load(artifact_copy: Path, image: Path):
    npz = artifact_copy / "text_embeddings.npz"
    with np.load(npz) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["carpet/prototypes"] = arrays["carpet/prototypes"][:, :16]  # D 32 -> 16
    np.savez(npz, **arrays)
    _rehash(artifact_copy)
    line = _one_error_line(_infer(artifact_copy, image, "--backend", "ort-cpu"))
    assert "prototypes of class 'carpet' have shape [2, 16]" in line and "[2, 32]" in line


def test_manifest_embed_dim_not_the_graph_is_refused_at_load(artifact_copy: Path):
    _edit_manifest(artifact_copy, lambda d: d.update(embed_dim=48))
    with pytest.raises(ArtifactError, match=r"text_prototypes|embed_dim"):
        Detector.load(artifact_copy, backend="ort-cpu")
