"""Triton model repository written by ``--triton``."""
from __future__ import annotations

import numpy as np
import pytest


def test_triton_layout(artifact, manifest):
    repo = artifact.parent / "triton"
    model_dir = repo / "anoclip"
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "classes.txt", "config.pbtxt"]
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == ["model.onnx"]
    assert (model_dir / "classes.txt").read_text().split() == ["bottle", "carpet"]
    assert manifest["triton"]["model"] == "anoclip" and manifest["triton"]["platform"] == "onnxruntime_onnx"
    assert not [p for p in repo.iterdir() if p.name.startswith(".")]


def test_config_pbtxt(artifact):
    text = (artifact.parent / "triton" / "anoclip" / "config.pbtxt").read_text()
    for line in [
        'name: "anoclip"',
        'platform: "onnxruntime_onnx"',
        "max_batch_size: 32",
        'name: "pixels"',
        "dims: [ 3, 64, 64 ]",
        'name: "global_embedding"',
        "dims: [ 32 ]",
        "dims: [ 8, 8, 32 ]",
        'name: "patch_probs"',
        "dims: [ 2, 8, 8 ]",
        'name: "image_scores"',
        "dims: [ 2 ]",
        'label_filename: "classes.txt"',
        "dynamic_batching {",
        "preferred_batch_size: [ 4, 8, 16 ]",
        "max_queue_delay_microseconds: 2000",
        'string_value: "bottle,carpet"',
    ]:
        assert line in text, line
    assert "text_prototypes" not in text  # folded: Triton batches every input along dim 0
    assert text.count("data_type: TYPE_FP32") == 6


def test_triton_graph_equals_artifact_graph(artifact):
    import onnxruntime as ort

    from anoclip.export.text import prototypes_array, read_npz

    protos = prototypes_array(read_npz(artifact / "text_embeddings.npz"), ["bottle", "carpet"])
    pixels = np.random.default_rng(5).standard_normal((3, 3, 64, 64)).astype(np.float32)
    tri = ort.InferenceSession(str(artifact.parent / "triton" / "anoclip" / "1" / "model.onnx"),
                               providers=["CPUExecutionProvider"])
    assert [i.name for i in tri.get_inputs()] == ["pixels"]
    ref = ort.InferenceSession(str(artifact / "encoder.onnx"), providers=["CPUExecutionProvider"])
    a = tri.run(None, {"pixels": pixels})
    b = ref.run(None, {"pixels": pixels, "text_prototypes": protos})
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_triton_existing_model_refused(artifact, tmp_path):
    from anoclip.export.triton import write_repository
    from anoclip_core.errors import AnoCLIPError

    repo = artifact.parent / "triton"
    with pytest.raises(AnoCLIPError, match="already exists"):
        write_repository(repo, "anoclip", artifact / "encoder.onnx", np.zeros((1, 2, 32), np.float32), ["x"], 64,
                         (8, 8), 32)
