"""Export -> ONNX Runtime parity, manifest contents, precisions, atomicity, add-class, external data."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from anoclip.runtime import contract as mf
from anoclip_core.errors import AnoCLIPError, ArtifactError

CLASSES = ["bottle", "carpet"]

ARCH_FIELDS = [
    "format", "format_version", "created", "backbone", "pretrained", "image_size", "preprocess", "patch_grid",
    "embed_dim", "dual_blocks", "temperature", "opset", "models", "default_model", "io", "text", "tensorrt",
    "versions", "files",
]


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _protos(artifact, classes):
    from anoclip.export.text import prototypes_array, read_npz

    return prototypes_array(read_npz(artifact / "text_embeddings.npz"), classes)


@pytest.mark.parametrize("batch", [1, 3])
def test_fp32_parity_with_core(artifact, tiny_model, batch):
    """Fresh inputs (not the export's verification set): maps, scores, embeddings, tokens within 1e-4."""
    from anoclip_core.scores import smooth_and_upsample

    protos = _protos(artifact, CLASSES)
    g = torch.Generator().manual_seed(1234 + batch)
    pixels = torch.randn(batch, 3, 64, 64, generator=g)
    out = dict(
        zip(
            ["global_embedding", "local_embeddings", "local_tokens", "patch_probs", "image_scores"],
            _session(artifact / "encoder.onnx").run(None, {"pixels": pixels.numpy(), "text_prototypes": protos}),
            strict=True,
        )
    )
    assert out["patch_probs"].shape == (batch, 2, 8, 8)
    assert out["image_scores"].shape == (batch, 2)
    glob, local = tiny_model.encode_tokens(pixels)
    np.testing.assert_allclose(out["local_tokens"], local.numpy(), atol=1e-4)
    np.testing.assert_allclose(out["global_embedding"], torch.nn.functional.normalize(glob, dim=-1).numpy(), atol=1e-4)
    np.testing.assert_allclose(out["local_embeddings"], torch.nn.functional.normalize(local, dim=-1).numpy(), atol=1e-4)
    for c, name in enumerate(CLASSES):
        np.testing.assert_allclose(protos[c], tiny_model.encode_states(name).numpy(), atol=1e-6)
        maps, scores = tiny_model.predict(pixels, name)
        got = smooth_and_upsample(torch.from_numpy(out["patch_probs"][:, c]), (64, 64)).numpy()
        assert np.abs(got - maps.numpy()).max() <= 1e-4
        assert np.abs(out["image_scores"][:, c] - scores.numpy()).max() <= 1e-4


def test_manifest_fields(artifact, manifest, tiny_model):
    for key in ARCH_FIELDS:
        assert key in manifest, key
    assert manifest["format"] == "anoclip-artifact" and manifest["format_version"] == 1
    assert manifest["backbone"] == "anoclip-tiny"
    assert manifest["pretrained"]["random_weights"] is True
    assert manifest["pretrained"]["source"] == "none" and manifest["pretrained"]["sha256"] is None
    assert manifest["image_size"] == 64 and manifest["patch_grid"] == [8, 8] and manifest["embed_dim"] == 32
    assert manifest["dual_blocks"] == 2 and manifest["temperature"] == 1.0 and manifest["opset"] == 18
    assert manifest["preprocess"] == tiny_model.preprocess_config.to_dict()
    assert manifest["io"]["inputs"] == ["pixels", "text_prototypes"]
    assert manifest["io"]["outputs"] == [
        "global_embedding",
        "local_embeddings",
        "local_tokens",
        "patch_probs",
        "image_scores",
    ]
    assert manifest["text"]["classes"] == {"bottle": "object", "carpet": "texture"}
    assert manifest["text"]["sentences_per_state"] == 462
    assert set(manifest["models"]) == {"fp32", "fp16", "int8"}
    assert manifest["default_model"] == "fp32"
    for key in ("anoclip", "torch", "open_clip", "onnx", "onnxruntime"):
        assert manifest["versions"][key]
    on_disk = {p.name for p in artifact.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    for name, digest in manifest["files"].items():
        assert mf.sha256_file(artifact / name) == digest
    v = manifest["models"]["fp32"]["verification"]
    assert v["passed"] and v["batch_sizes"] == [1, 3] and v["inputs"] == 3
    assert v["map_max_abs"] <= 1e-4 and v["score_max_abs"] <= 1e-4 and v["embedding_max_abs"] <= 1e-4
    assert v["tolerance"]["map"] == 1e-4
    # text npz layout
    with np.load(artifact / "text_embeddings.npz") as data:
        assert sorted(data.files) == sorted(f"{c}/{k}" for c in CLASSES for k in ("prototypes", "sentences"))
        assert data["bottle/prototypes"].shape == (2, 32) and data["bottle/sentences"].shape == (924, 32)


def test_graph_io_names_and_dynamic_dims(artifact):
    import onnx

    model = onnx.load(str(artifact / "encoder.onnx"))
    assert [i.name for i in model.graph.input] == ["pixels", "text_prototypes"]
    assert [o.name for o in model.graph.output] == [
        "global_embedding", "local_embeddings", "local_tokens", "patch_probs", "image_scores"]
    pix = model.graph.input[0].type.tensor_type.shape.dim
    assert pix[0].dim_param and [d.dim_value for d in pix[1:]] == [3, 64, 64]
    assert model.graph.input[1].type.tensor_type.shape.dim[0].dim_param


def test_manifest_round_trip_and_tamper(artifact, tmp_path):
    data = mf.read_manifest(artifact)
    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    mf.write_manifest(copy, data)
    assert mf.read_manifest(copy) == data
    with open(copy / "encoder.onnx", "r+b") as f:  # flip one byte in the graph
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ArtifactError, match="encoder.onnx"):
        mf.read_manifest(copy)


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_recorded_within_bound(artifact, manifest, precision):
    from anoclip.export.verify import TOLERANCES

    entry = manifest["models"][precision]
    v = entry["verification"]
    assert entry["file"] == f"encoder.{precision}.onnx"
    assert v["passed"]
    assert v["tolerance"] == TOLERANCES[precision]
    assert 0 < v["map_max_abs"] <= TOLERANCES[precision]["map"]
    assert v["score_max_abs"] <= TOLERANCES[precision]["score"]
    assert v["embedding_max_abs"] <= TOLERANCES[precision]["embedding"]
    for key in ("map_max_abs", "map_mean_abs", "score_max_abs", "embedding_max_abs"):
        assert key in v["vs_fp32"]
    # inputs/outputs stay fp32
    sess = _session(artifact / entry["file"])
    assert all(i.type == "tensor(float)" for i in sess.get_inputs())
    assert all(o.type == "tensor(float)" for o in sess.get_outputs())


def test_int8_quantises_linear_layers_only(artifact):
    import onnx

    ops = [n.op_type for n in onnx.load(str(artifact / "encoder.int8.onnx")).graph.node]
    assert "MatMulInteger" in ops and "Softmax" in ops and "LayerNormalization" in ops
    assert "QuantizeLinear" not in ops  # dynamic, not QDQ


def test_quantizer_failure_is_one_export_error_and_restores_logging(tmp_path):
    import logging

    from anoclip.export import quantize
    from anoclip.export.onnx_export import ExportError

    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not an onnx model")
    root = logging.getLogger()
    before = root.level
    with pytest.raises(ExportError, match="^int8 quantisation failed: "):
        quantize.quantize_int8(bad, tmp_path / "out.onnx")
    assert root.level == before


def test_fp16_keeps_layernorm_fp32(artifact):
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(artifact / "encoder.fp16.onnx"))
    halves = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT16]
    assert halves, "weights should be fp16"
    ln_inputs = {i for n in model.graph.node if n.op_type == "LayerNormalization" for i in n.input[1:]}
    for t in model.graph.initializer:
        if t.name in ln_inputs:
            assert t.data_type == TensorProto.FLOAT


def test_bf16_fails_at_once_with_clear_message(make_config, register_tiny, tmp_path, monkeypatch):
    from anoclip.export import quantize
    from anoclip.export.api import export_artifact
    from anoclip_core import model as core_model

    ok, reason = quantize.bf16_support()
    if ok:  # pragma: no cover - a future ORT with CPU bf16 kernels
        pytest.skip("this onnxruntime runs bf16 on CPU")
    monkeypatch.setattr(core_model.AnoCLIP, "create", classmethod(lambda *a, **k: pytest.fail("loaded weights")))
    with pytest.raises(AnoCLIPError, match="bf16 is not available: onnxruntime .* no bf16 kernels"):
        export_artifact(make_config(tmp_path / "a", precisions=["bf16"]))
    assert not (tmp_path / "a").exists()


def test_bf16_converter_produces_valid_bf16_graph(artifact, tmp_path):
    """The converter exists and is correct structurally (ORT CPU cannot run it, see quantize.py)."""
    import onnx
    from onnx import TensorProto

    from anoclip.export.quantize import _fp32_to_bf16_bits, convert_bf16

    files = convert_bf16(artifact / "encoder.onnx", tmp_path / "encoder.bf16.onnx")
    model = onnx.load(str(tmp_path / files[0]))
    onnx.checker.check_model(model)
    assert any(t.data_type == TensorProto.BFLOAT16 for t in model.graph.initializer)
    assert not any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer)
    assert all(i.type.tensor_type.elem_type == TensorProto.FLOAT for i in model.graph.input)
    bits = _fp32_to_bf16_bits(np.array([1.0, -2.5, 3.14159], dtype=np.float32))
    back = (bits.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_allclose(back, [1.0, -2.5, 3.140625])


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_failed_verification_leaves_nothing(make_config, register_tiny, tmp_path, monkeypatch, artifact):
    from anoclip.export import verify
    from anoclip.export.api import export_artifact

    monkeypatch.setitem(verify.TOLERANCES, "fp32", {"map": 0.0, "score": 0.0, "embedding": 0.0})
    parent = tmp_path / "p"
    parent.mkdir()
    with pytest.raises(verify.VerificationError, match="verification failed for the fp32 graph"):
        export_artifact(make_config(parent / "art", classes=["bottle"], exporter="legacy"))
    assert _listing(parent) == []
    # an existing artifact at --out survives a failed --force re-export, byte for byte
    old = parent / "old"
    shutil.copytree(artifact, old)
    before = mf.file_hashes(old, _listing(old))
    with pytest.raises(verify.VerificationError):
        export_artifact(make_config(old, classes=["bottle"], exporter="legacy", force=True))
    assert mf.file_hashes(old, _listing(old)) == before
    assert _listing(parent) == ["old"]


def test_existing_out_refused_without_force(make_config, artifact, monkeypatch):
    from anoclip.export.api import export_artifact
    from anoclip_core import model as core_model

    monkeypatch.setattr(core_model.AnoCLIP, "create", classmethod(lambda *a, **k: pytest.fail("loaded weights")))
    with pytest.raises(AnoCLIPError, match="already exists.*--force"):
        export_artifact(make_config(artifact))


def test_add_class_matches_full_export(make_config, artifact, manifest, tmp_path):
    from anoclip.export.api import add_class, export_artifact
    from anoclip.export.text import read_npz

    single = export_artifact(make_config(tmp_path / "single", classes=["bottle"], exporter="legacy"))
    graph_sha = mf.sha256_file(single / "encoder.onnx")
    mtime = os.stat(single / "encoder.onnx").st_mtime_ns
    add_class(single, "carpet", model_config=None, text_cache=None, progress=False)
    data = mf.read_manifest(single)  # sha256 of the rewritten npz checks out
    assert data["text"]["classes"] == manifest["text"]["classes"]
    assert mf.sha256_file(single / "encoder.onnx") == graph_sha
    assert os.stat(single / "encoder.onnx").st_mtime_ns == mtime
    got, full = read_npz(single / "text_embeddings.npz"), read_npz(artifact / "text_embeddings.npz")
    assert sorted(got) == sorted(full) == CLASSES
    for name in CLASSES:
        np.testing.assert_allclose(got[name][0], full[name][0], atol=1e-6)
        np.testing.assert_allclose(got[name][1], full[name][1], atol=1e-6)
    with pytest.raises(AnoCLIPError, match="already in"):
        add_class(single, "carpet", text_cache=None, progress=False)
    assert not [p for p in single.iterdir() if p.name.startswith(".")]


def test_add_class_refuses_other_weights(artifact, tmp_path):
    from anoclip.export.api import add_class

    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    data = mf.read_manifest(copy)
    data["pretrained"]["state_sha256"] = "0" * 64
    mf.write_manifest(copy, data)
    with pytest.raises(ArtifactError, match="do not match the artifact"):
        add_class(copy, "cable", text_cache=None, progress=False)
    assert mf.read_manifest(copy)["text"]["classes"] == data["text"]["classes"]


def test_external_data_path(make_config, register_tiny, tmp_path):
    """Threshold lowered to 1 byte: weights go to encoder.onnx.data (the >2 GB path of ViT-L-14 class models)."""
    from anoclip.export.api import export_artifact

    out = export_artifact(
        make_config(tmp_path / "ext", classes=["bottle"], precisions=["fp16"], external_data_threshold=1)
    )
    data = mf.read_manifest(out)
    assert _listing(out) == sorted(["encoder.onnx", "encoder.onnx.data", "encoder.fp16.onnx", "encoder.fp16.onnx.data",
                                    "manifest.json", "refsearch.onnx", "text_embeddings.npz"])
    assert data["models"]["fp32"]["external_data"] == ["encoder.onnx.data"]
    assert data["models"]["fp16"]["external_data"] == ["encoder.fp16.onnx.data"]
    assert os.path.getsize(out / "encoder.onnx") < os.path.getsize(out / "encoder.onnx.data")
    assert data["models"]["fp32"]["verification"]["passed"]
    (out / "encoder.onnx.data").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        mf.read_manifest(out)


def test_legacy_exporter_deep_model(make_config, register_tiny, tmp_path):
    """The TorchScript exporter also works, including plain open_clip blocks (MHA fast path disabled)."""
    from anoclip.export.api import export_artifact

    out = export_artifact(
        make_config(tmp_path / "legacy", backbone="anoclip-tiny-24", classes=["bottle"], exporter="legacy")
    )
    data = mf.read_manifest(out)
    assert data["exporter"] == "legacy" and data["dual_blocks"] == 12
    assert data["models"]["fp32"]["verification"]["map_max_abs"] <= 1e-4


def test_reduced_graphs_pass_onnx_checker(artifact):
    """Topologically sorted, valid graphs (TensorRT's parser needs sorted nodes)."""
    import onnx

    for name in ("encoder.onnx", "encoder.fp16.onnx", "encoder.int8.onnx"):
        onnx.checker.check_model(onnx.load(str(artifact / name)))


def test_cached_tag_file_found_in_hf_cache(tmp_path):
    """A pretrained tag records the sha256 of open_clip's cached file: find it in an HF-hub cache."""
    import open_clip

    from anoclip.export.api import cached_tag_file

    hub = open_clip.get_pretrained_cfg("ViT-B-16-plus-240", "laion400m_e32")["hf_hub"]
    repo_id, filename = os.path.split(hub)
    filename = filename or "open_clip_pytorch_model.bin"
    repo = tmp_path / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / filename).write_bytes(b"weights")
    assert cached_tag_file("ViT-B-16-plus-240", "laion400m_e32", str(tmp_path)) == str(snap / filename)
    assert cached_tag_file("ViT-B-16-plus-240", "laion400m_e32", str(tmp_path / "empty")) is None


def test_static_int8_qdq(make_config, register_tiny, tmp_path):
    """int8_mode='static': QDQ graph, attention/LayerNorm/Softmax unquantised, verified within the int8 bound."""
    import cv2
    import onnx

    from anoclip.export.api import export_artifact

    imgs = []
    rng = np.random.default_rng(3)
    for i in range(2):
        p = tmp_path / f"img{i}.png"
        cv2.imwrite(str(p), (rng.random((80, 90, 3)) * 255).astype(np.uint8))
        imgs.append(str(p))
    out = export_artifact(make_config(tmp_path / "s", classes=["bottle"], precisions=["int8"], int8_mode="static",
                                      calibration_images=imgs, exporter="legacy"))
    data = mf.read_manifest(out)
    entry = data["models"]["int8"]
    assert {k: v for k, v in entry["quantization"].items() if k != "calibration"} == {
        "mode": "static", "weights": "int8", "ops": ["MatMul (Linear layers)"], "format": "QDQ",
        "activations": "int8 symmetric (zero point 0)", "kept_float": ["MatMul (output projections, global and local)"]}
    assert entry["quantization"]["calibration"]["images"] == 2
    assert entry["verification"]["passed"] and entry["verification"]["map_max_abs"] <= 5e-2
    graph = onnx.load(str(out / "encoder.int8.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops and "MatMulInteger" not in ops
    produced_by = {o: n.op_type for n in graph.node for o in n.output}
    for n in graph.node:  # Softmax and LayerNorm read float, never a DequantizeLinear
        if n.op_type in ("Softmax", "LayerNormalization"):
            assert produced_by.get(n.input[0]) != "DequantizeLinear"


def test_late_failure_leaves_no_artifact_and_no_triton(make_config, register_tiny, tmp_path, monkeypatch):
    """A failure after the Triton model is staged (here: writing the manifest) leaves neither behind."""
    from anoclip.export import api

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(api.mf, "write_manifest", boom)
    parent = tmp_path / "p"
    parent.mkdir()
    with pytest.raises(OSError, match="disk full"):
        api.export_artifact(make_config(parent / "art", classes=["bottle"], exporter="legacy",
                                        triton=tmp_path / "tri"))
    assert _listing(parent) == []
    assert _listing(tmp_path / "tri") == []
