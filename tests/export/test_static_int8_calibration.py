"""Static (calibrated) int8: ``--calibration-images``, the manifest's calibration record, refusal
over tolerance, the QDQ graph's structure, and that ONNX Runtime and OpenVINO both run it."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from anoclip_core.errors import AnoCLIPError
from tests.conftest import CONFIG_DIR, write_good_images


def _sha_of_listing(names: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()


# --- calibration record and pixels ---------------------------------------------------------------
def test_calibration_record_names_count_folder_and_listing_sha(tmp_path):
    from anoclip.export.api import calibration_record

    root = tmp_path / "good_parts"
    (root / "sub").mkdir(parents=True)
    files = [root / "b.png", root / "sub" / "a.png", root / "c.png"]
    rec = calibration_record([str(f) for f in files])
    assert rec == {"source": "images", "images": 3, "folder": "good_parts",
                   "files_sha256": _sha_of_listing(["b.png", "c.png", "sub/a.png"])}
    assert calibration_record(list(reversed([str(f) for f in files]))) == rec  # order-independent
    assert calibration_record([str(root / "b.png")])["files_sha256"] != rec["files_sha256"]
    assert calibration_record([]) == {"source": "random", "images": 8, "seed": 1}


def test_calibration_pixels_are_the_runtime_preprocessing(tiny_model, tmp_path):
    from anoclip.export.api import _calibration_pixels
    from anoclip_core.transform import preprocess

    good = write_good_images(tmp_path / "good", n=3)
    files = sorted(str(p) for p in good.glob("*.png"))
    px = _calibration_pixels(tiny_model, files)
    expected = np.stack([preprocess(f, tiny_model.preprocess_config) for f in files])
    assert px.shape == (3, 3, 64, 64) and px.dtype == np.float32
    np.testing.assert_array_equal(px, expected)
    (tmp_path / "good" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(AnoCLIPError, match=r"calibration image .*broken\.png: cannot decode"):
        _calibration_pixels(tiny_model, files + [str(tmp_path / "good" / "broken.png")])


# --- CLI errors -------------------------------------------------------------------------------------
def _export(args: list[str], tmp_path: Path):
    from anoclip.export.cli import cli

    base = ["export", "--backbone", "anoclip-tiny", "--pretrained", "none", "--classes", "bottle", "--quiet",
            "--text-cache", "none", "--model-config", str(CONFIG_DIR), "--out", str(tmp_path / "art")]
    return CliRunner().invoke(cli, base + args)


def test_cli_empty_calibration_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    res = _export(["--precision", "int8", "--calibration-images", str(tmp_path / "empty")], tmp_path)
    assert res.exit_code == 2
    assert "error: --calibration-images" in res.output and "no images found" in res.output
    assert not (tmp_path / "art").exists()


def test_cli_calibration_without_static_int8_is_refused(tmp_path):
    good = write_good_images(tmp_path / "good", n=2)
    res = _export(["--calibration-images", str(good)], tmp_path)
    assert res.exit_code == 2 and "add --precision int8" in res.output
    res = _export(["--precision", "int8", "--int8-mode", "dynamic", "--calibration-images", str(good)], tmp_path)
    assert res.exit_code == 2 and "static int8" in res.output
    assert "--int8-mode dynamic takes none: drop one of them" in res.output
    assert "add --precision int8" not in res.output  # it was given: the old message told the user to add it
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_cli_int8_mode_without_int8_precision_is_refused_not_ignored(tmp_path, mode):
    res = _export(["--int8-mode", mode, "--precision", "fp16"], tmp_path)
    assert res.exit_code == 2, res.output
    assert res.output.strip() == f"error: --int8-mode {mode} chooses how the int8 graph is made: add --precision int8"
    assert not (tmp_path / "art").exists()


def test_static_int8_without_calibration_images_warns_and_records_random(register_tiny, tmp_path):
    res = _export(["--precision", "int8", "--int8-mode", "static"], tmp_path)
    assert res.exit_code == 0, res.output
    assert "warning: static int8 calibrated on 8 seeded random images" in res.output
    assert "--calibration-images DIR" in res.output
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["models"]["int8"]["quantization"]["calibration"]["source"] == "random"
    with_images = _export(["--precision", "int8", "--calibration-images", str(write_good_images(tmp_path / "g", 2)),
                           "--out", str(tmp_path / "art2")], tmp_path)
    assert with_images.exit_code == 0 and "seeded random" not in with_images.output


def test_cli_unreadable_calibration_image_names_it_and_ships_nothing(register_tiny, tmp_path):
    good = write_good_images(tmp_path / "good", n=2)
    (good / "zz_broken.png").write_bytes(b"\x89PNG garbage")
    res = _export(["--precision", "int8", "--calibration-images", str(good)], tmp_path)
    assert res.exit_code == 2, res.output
    assert "zz_broken.png" in res.output and "cannot decode" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "art").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".art.tmp")]


# --- the exported static int8 graph ---------------------------------------------------------------
def test_manifest_records_calibration_and_verification(static_int8_artifact):
    data = json.loads((static_int8_artifact / "manifest.json").read_text())
    q = data["models"]["int8"]["quantization"]
    assert q["mode"] == "static" and q["format"] == "QDQ"
    names = [f"good_{i:02d}.png" for i in range(6)]  # what write_good_images wrote
    assert q["calibration"] == {"source": "images", "images": 6, "folder": "good",
                                "files_sha256": _sha_of_listing(names)}
    v = data["models"]["int8"]["verification"]
    assert v["passed"] and v["map_max_abs"] <= v["tolerance"]["map"] == 5e-2


def test_graph_weights_are_symmetric_per_channel_int8(static_int8_artifact):
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(static_int8_artifact / "encoder.int8.onnx")).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    weight_dq = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                 and inits[n.input[0]].ndim == 2]
    assert len(weight_dq) >= 4  # tiny: 2 blocks x (qkv-in, out-proj, fc1, fc2) Linear weights
    for n in weight_dq:
        w, scale = inits[n.input[0]], inits[n.input[1]]
        zero = inits[n.input[2]] if len(n.input) > 2 else np.zeros_like(scale, np.int8)
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        assert w.dtype == np.int8 and np.all(zero == 0), n.name
        assert scale.ndim == 1 and scale.shape[0] == w.shape[axis] > 1, n.name  # one scale per output channel
        assert np.abs(w).max() <= 64  # reduce_range: 7-bit weights (AVX2 without VNNI, see export/quantize.py)


def test_output_projections_stay_float_and_block_linears_are_int8(static_int8_artifact, tiny_model):
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(static_int8_artifact / "encoder.int8.onnx")).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    proj_shape = tuple(tiny_model.encoder.visual.proj.shape)  # [width, embed_dim] = [64, 32]: no block Linear has it
    float_proj, int8_linear = [], []
    for n in graph.node:
        if n.op_type != "MatMul":
            continue
        b = producer.get(n.input[1])
        if n.input[1] in inits and inits[n.input[1]].dtype == np.float32:
            float_proj.append((n, inits[n.input[1]].shape))
        elif b is not None and b.op_type == "DequantizeLinear" and b.input[0] in inits:
            int8_linear.append(n)
    assert [shape for _, shape in float_proj] == [proj_shape, proj_shape]  # global and local, in float
    for n, _ in float_proj:  # nor is their input quantised
        assert producer[n.input[0]].op_type != "DequantizeLinear", n.name
    assert len(int8_linear) == 2 * 5  # 2 blocks x (qkv, out_proj of both paths, fc1, fc2)
    q = json.loads((static_int8_artifact / "manifest.json").read_text())["models"]["int8"]["quantization"]
    assert q["kept_float"] == ["MatMul (output projections, global and local)"]


def test_output_projections_are_the_linears_nearest_every_output():
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from anoclip.export.quantize import output_projections

    def weight(name: str) -> onnx.TensorProto:
        return numpy_helper.from_array(np.ones((4, 4), np.float32), name)

    nodes = [
        helper.make_node("MatMul", ["x", "w_block"], ["h"], name="block"),
        helper.make_node("Relu", ["h"], ["r"], name="act"),
        helper.make_node("MatMul", ["r", "w_a"], ["a"], name="proj_a"),
        helper.make_node("MatMul", ["r", "w_b"], ["b"], name="proj_b"),
        helper.make_node("MatMul", ["b", "p"], ["probs"], name="head"),  # activation x input: not a Linear
        helper.make_node("Identity", ["a"], ["emb"], name="id"),
    ]
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [4, 4])  # noqa: E731
    graph = helper.make_graph(nodes, "g", [vi("x"), vi("p")], [vi("emb"), vi("probs")],
                              [weight("w_block"), weight("w_a"), weight("w_b")])
    assert output_projections(helper.make_model(graph)) == ["proj_a", "proj_b"]


def test_activations_are_symmetric_for_tensorrt(static_int8_artifact):
    """TensorRT's explicit quantization takes only zero-point-0 (symmetric) Q/DQ pairs (TensorRT Developer
    Guide, "Working with Quantized Types": quantization is symmetric, zero points must be 0)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(static_int8_artifact / "encoder.int8.onnx")).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    quant = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert len(quant) >= 4
    for n in quant:
        zero = inits[n.input[2]]
        assert zero.dtype == np.int8 and np.all(zero == 0), (n.name, zero)
    data = json.loads((static_int8_artifact / "manifest.json").read_text())
    assert data["models"]["int8"]["quantization"]["activations"] == "int8 symmetric (zero point 0)"


def _int8_vs_fp32(artifact: Path, backend: str) -> tuple[float, float]:
    from anoclip.runtime import Detector

    px = np.random.default_rng(5).standard_normal((3, 3, 64, 64)).astype(np.float32) * 0.5
    ref = Detector.load(artifact, backend="ort-cpu")
    det = Detector.load(artifact, backend=backend, precision="int8", verify=False)
    try:
        assert det.backend_name == backend
        pr = ref.prototypes("bottle")
        a = ref.backend.run(px, pr)["patch_probs"].ravel()
        b = det.backend.run(px, pr)["patch_probs"].ravel()
    finally:
        ref.close()
        det.close()
    assert np.isfinite(b).all()
    return float(np.abs(a - b).max()), float(np.corrcoef(a, b)[0, 1])


def test_onnx_runtime_runs_the_static_int8_graph_within_int8_tolerance(static_int8_artifact):
    err, r = _int8_vs_fp32(static_int8_artifact, "ort-cpu")
    assert 0 < err <= 5e-2 and r >= 0.99, (err, r)  # quantised (not bit-equal to fp32), within tolerance


def test_openvino_runs_the_static_int8_graph_with_int8_kernels(static_int8_artifact):
    pytest.importorskip("openvino", reason="openvino not installed (pip install 'anoclip[openvino]')")
    err, r = _int8_vs_fp32(static_int8_artifact, "openvino")
    assert 0 < err <= 5e-2 and r >= 0.99, (err, r)
    from anoclip.runtime.backends.openvino import OpenVinoBackend

    be = OpenVinoBackend(static_int8_artifact / "encoder.int8.onnx")
    precisions = {op.get_rt_info()["runtimePrecision"].astype(str) for op in be.compiled.get_runtime_model().get_ops()}
    assert "i8" in precisions or "u8" in precisions, precisions  # QDQ folded into int8 kernels, not float emulation


def test_over_tolerance_int8_is_refused_and_never_shipped(register_tiny, make_config, tmp_path, monkeypatch):
    from anoclip.export import verify
    from anoclip.export.api import export_artifact

    good = write_good_images(tmp_path / "good", n=2)
    monkeypatch.setitem(verify.TOLERANCES, "int8", {"map": 1e-7, "score": 1e-7, "embedding": 1e-7})
    with pytest.raises(verify.VerificationError, match="int8"):
        export_artifact(make_config(tmp_path / "art", precisions=["int8"], int8_mode="static",
                                    calibration_images=sorted(str(p) for p in good.glob("*.png"))))
    assert not (tmp_path / "art").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["good"]


# --- the demo calibrates on the bundled good images -------------------------------------------------
def test_demo_int8_calibrates_on_bundled_good_images(register_tiny, tmp_path):
    ccd = pytest.importorskip(
        "conformal_clip_data", reason="sample data not installed (pip install conformal-clip-data)"
    )
    from anoclip.demo.cli import DemoConfig, run_demo, sample_images

    cfg = DemoConfig(backbone=register_tiny, pretrained="none", images=2, calibration_images=3, out=tmp_path / "demo",
                     model_config=str(CONFIG_DIR), int8=True, backend="ort-cpu")
    summary = run_demo(cfg)
    assert summary["precision"] == "int8" and summary["good"]["errors"] == 0 and summary["defect"]["errors"] == 0
    manifest = json.loads((tmp_path / "demo" / "artifact" / "manifest.json").read_text())
    calib = manifest["models"]["int8"]["quantization"]["calibration"]
    files = sample_images(2, 3)[0]
    assert calib["images"] == 3 and calib["folder"] == Path(ccd.nominal_dir()).name
    assert calib["files_sha256"] == _sha_of_listing([p.name for p in files])
    rec = json.loads((tmp_path / "demo" / "results" / "good" / "results.jsonl").read_text().splitlines()[0])
    assert rec["backend"] == "ort-cpu"
