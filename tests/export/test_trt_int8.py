"""int8 TensorRT engines from the static QDQ graph (issue 12, item 2): which graph, which network flags,
which graphs are refused -- against the header-faithful fake TensorRT (trt_fakes) and hand-built ONNX graphs."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from trt_fakes import fake_tensorrt

from anoclip.runtime import contract as mf
from anoclip_core.errors import AnoCLIPError


def _save(tmp_path: Path, name: str, nodes: list, inits: list, external: bool = False) -> Path:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], initializer=inits)
    path = tmp_path / name
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path),
              save_as_external_data=external, location=f"{name}.data", size_threshold=0)
    return path


def _qdq_graph(tmp_path: Path, act_zero_point: int = 0, name: str = "qdq.onnx", act_channels: int = 0,
               external: bool = False) -> Path:
    """x -> Q/DQ (per-tensor; per-channel on axis 1 with ``act_channels``) -> MatMul with a DQ'd int8 weight [4, 3]
    (per-channel on axis 1): 2 DequantizeLinear."""
    shape = (act_channels,) if act_channels else ()
    inits = [
        numpy_helper.from_array(np.full(shape, 0.02, np.float32), "xs"),
        numpy_helper.from_array(np.full(shape, act_zero_point, np.int8), "xz"),
        numpy_helper.from_array(np.arange(12, dtype=np.int8).reshape(4, 3), "w"),
        numpy_helper.from_array(np.array([0.1, 0.2, 0.3], np.float32), "ws"),
        numpy_helper.from_array(np.zeros(3, np.int8), "wz"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q_x", axis=1),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq_x", axis=1),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="dq_w", axis=1),
        helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm"),
    ]
    return _save(tmp_path, name, nodes, inits, external)


def test_qdq_graph_is_accepted_and_counted(tmp_path):
    from anoclip.export.trt import check_qdq_graph

    assert check_qdq_graph(_qdq_graph(tmp_path)) == 2


def test_non_zero_zero_point_is_refused_naming_file_and_node(tmp_path):
    from anoclip.export.onnx_export import ExportError
    from anoclip.export.trt import check_qdq_graph

    with pytest.raises(ExportError, match=r"asym\.onnx: QuantizeLinear 'q_x' has a non-zero zero point"):
        check_qdq_graph(_qdq_graph(tmp_path, act_zero_point=3, name="asym.onnx"))
    with pytest.raises(ExportError, match="non-zero zero point"):  # also when the zero point is external data
        check_qdq_graph(_qdq_graph(tmp_path, act_zero_point=3, name="asym-ext.onnx", external=True))


def test_per_channel_activation_scale_is_refused(tmp_path):
    """NvInfer.h v10.9.0 IQuantizeLayer: "Per-channel quantization is supported only for weight inputs"."""
    from anoclip.export.onnx_export import ExportError
    from anoclip.export.trt import check_qdq_graph

    with pytest.raises(ExportError, match=r"'q_x' quantizes an activation per channel"):
        check_qdq_graph(_qdq_graph(tmp_path, act_channels=4))


def test_unreadable_graph_is_one_error_naming_it(tmp_path):
    from anoclip.export.onnx_export import ExportError
    from anoclip.export.trt import check_qdq_graph

    (tmp_path / "cut.onnx").write_bytes(_qdq_graph(tmp_path).read_bytes()[:40])  # truncated mid-message
    with pytest.raises(ExportError, match=r"^cut\.onnx: not a readable ONNX graph"):
        check_qdq_graph(tmp_path / "cut.onnx")
    with pytest.raises(ExportError, match=r"^missing\.onnx: not a readable ONNX graph"):
        check_qdq_graph(tmp_path / "missing.onnx")


def test_dynamic_int8_graph_is_refused(tmp_path):
    from anoclip.export.onnx_export import ExportError
    from anoclip.export.trt import check_qdq_graph

    inits = [numpy_helper.from_array(np.ones((4, 3), np.uint8), "w"),
             numpy_helper.from_array(np.array(0, np.uint8), "wz")]
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"], name="dql"),
             helper.make_node("MatMulInteger", ["xq", "w", "xz", "wz"], ["yi"], name="mmi"),
             helper.make_node("Cast", ["yi"], ["y"], to=TensorProto.FLOAT)]
    path = _save(tmp_path, "dyn.onnx", nodes, inits)
    with pytest.raises(ExportError, match=r"dyn\.onnx: node 'dql' is DynamicQuantizeLinear .*--int8-mode static"):
        check_qdq_graph(path)


def test_float_graph_is_not_an_int8_graph(tmp_path):
    from anoclip.export.onnx_export import ExportError
    from anoclip.export.trt import check_qdq_graph

    path = _save(tmp_path, "float.onnx", [helper.make_node("MatMul", ["x", "w"], ["y"])],
                 [numpy_helper.from_array(np.ones((4, 3), np.float32), "w")])
    with pytest.raises(ExportError, match="float.onnx has no QuantizeLinear/DequantizeLinear"):
        check_qdq_graph(path)


def test_export_graphs_static_accepted_dynamic_refused(static_int8_artifact, artifact):
    """The export's own graphs: static int8 is a TensorRT QDQ graph, ONNX Runtime's dynamic int8 is not."""
    from anoclip.export.onnx_export import ExportError
    from anoclip.export.trt import check_qdq_graph

    static = onnx.load(str(static_int8_artifact / "encoder.int8.onnx"), load_external_data=False)
    int8_weights = sum(t.data_type == TensorProto.INT8 and len(t.dims) == 2 for t in static.graph.initializer)
    assert check_qdq_graph(static_int8_artifact / "encoder.int8.onnx") > int8_weights > 0  # + activation DQs
    with pytest.raises(ExportError, match="encoder.int8.onnx: node .* is (MatMulInteger|DynamicQuantizeLinear)"):
        check_qdq_graph(artifact / "encoder.int8.onnx")


def test_precision_choice_int8_needs_the_static_graph():
    from anoclip.export.trt import choose_trt_precision

    assert choose_trt_precision(["fp32", "int8"], "int8", "static") == "int8"
    assert choose_trt_precision(["fp32", "int8"], None, "static") == "int8"  # the most reduced graph there is
    assert choose_trt_precision(["fp32", "fp16", "int8"], None, "static") == "fp16"  # float first, as before
    with pytest.raises(AnoCLIPError, match="--int8-mode dynamic.*--int8-mode static --calibration-images DIR"):
        choose_trt_precision(["fp32", "int8"], "int8", "dynamic")
    with pytest.raises(AnoCLIPError, match="no --precision int8"):
        choose_trt_precision(["fp32", "fp16"], "int8", "static")
    with pytest.raises(AnoCLIPError, match="TensorRT cannot build.*--int8-mode static"):
        choose_trt_precision(["fp32", "int8"], None, "dynamic")


@pytest.mark.parametrize("version", ["10.9.0", "11.1.0"])
def test_int8_engine_source_is_the_static_graph(version):
    from anoclip.export.trt import engine_source

    trt = fake_tensorrt(version)
    graphs = {"fp32": "encoder.onnx", "int8": "encoder.int8.onnx"}
    assert engine_source(trt, "int8", graphs) == "encoder.int8.onnx"
    assert engine_source(trt, "fp32", graphs) == "encoder.onnx"
    with pytest.raises(AnoCLIPError, match="static int8 graph"):
        engine_source(trt, "int8", {"fp32": "encoder.onnx"})


@pytest.mark.parametrize("version,network_flags", [("10.9.0", 2), ("11.1.0", 0)])
def test_int8_engine_is_strongly_typed_without_precision_flags(static_int8_artifact, tmp_path, version,
                                                               network_flags):
    """10.9.0: kSTRONGLY_TYPED = 1 -> flags 1 << 1; 11.1: always strongly typed, flag 0 (trt_fakes' header notes).
    No FP16/INT8/BF16 builder flag; TF32 stays on for the float remainder."""
    from anoclip.export import trt as trt_mod

    trt = fake_tensorrt(version)
    entry = trt_mod.build_engine(trt, static_int8_artifact / "encoder.int8.onnx", tmp_path / "encoder.int8.plan",
                                 "int8", 64, 32, 2, "Fake GPU", (1, 4, 16), tmp_path / "t.cache")
    assert [c for c in trt.calls if c[0] == "network"] == [("network", network_flags)]
    assert [c[1] for c in trt.calls if c[0] == "build"] == [frozenset({trt.BuilderFlag.TF32})]
    assert ("parse", "encoder.int8.onnx") in trt.calls
    assert entry["strongly_typed"] is True and entry["tf32"] is True and entry["precision"] == "int8"
    assert entry["float_ops"] == "fp32 (TF32 matmuls)"


def test_int8_engine_from_a_dynamic_graph_never_reaches_the_parser(artifact, tmp_path):
    from anoclip.export import trt as trt_mod
    from anoclip.export.onnx_export import ExportError

    trt = fake_tensorrt("10.9.0")
    with pytest.raises(ExportError, match="dynamic int8"):
        trt_mod.build_engine(trt, artifact / "encoder.int8.onnx", tmp_path / "e.plan", "int8", 64, 32, 2,
                             "Fake GPU", (1, 4, 16), tmp_path / "t.cache")
    assert trt.calls == [] and not list(tmp_path.iterdir())


@pytest.mark.parametrize("version", ["10.9.0", "11.1.0"])
def test_export_builds_the_int8_engine_from_the_static_graph(make_config, register_tiny, tmp_path, monkeypatch,
                                                             version):
    from anoclip.export import trt as trt_mod
    from anoclip.export.api import export_artifact
    from anoclip.runtime.backends import running_precision

    fake = fake_tensorrt(version)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_mod, "cuda_gpu_name", lambda: "Fake GPU")
    cfg = make_config(tmp_path / "art", classes=["bottle"], precisions=["int8"], int8_mode="static", trt=True,
                      trt_timing_cache=tmp_path / "t.cache", verify_batch_sizes=(1,))
    out = export_artifact(cfg)
    data = mf.read_manifest(out, check_files=True)
    engine = data["tensorrt"]
    assert (engine["precision"], engine["source_onnx"], engine["file"]) == ("int8", "encoder.int8.onnx",
                                                                            "encoder.int8.plan")
    assert data["models"]["int8"]["quantization"]["mode"] == "static"
    assert running_precision(None, "trt", data, None) == "int8 (TensorRT engine, float ops in fp32 (TF32 matmuls))"


def test_gpu_check_plans_the_int8_engine_not_the_cpu_int8_graph(tmp_path, monkeypatch):
    from anoclip.benchmarks import gpu_check as gc

    manifest = {"tensorrt": {"precision": "int8"}, "models": {"fp32": {}, "int8": {}}}
    assert gc.parity_plan(manifest) == [("trt", None, "int8"), ("ort-cuda", "fp32", "fp32"),
                                        ("ort-trt", "fp32", "fp32")]
    seen: list = []
    monkeypatch.setattr("anoclip.export.api.export_artifact", lambda cfg: seen.append(cfg) or tmp_path)
    gc.default_export(gc.CheckConfig(out=tmp_path, trt_precision="int8"))
    gc.default_export(gc.CheckConfig(out=tmp_path))
    got = [(c.precisions, c.int8_mode, c.trt, c.trt_precision) for c in seen]
    assert got == [(["fp32", "int8"], "static", True, "int8"), (["fp32", "fp16"], "dynamic", True, None)]



def test_fake_refuses_fp16_flag_on_a_strongly_typed_network():
    """The fake's strictness (NVIDIA/TensorRT#4253) is live, so the int8 test above would catch a precision flag."""
    trt = fake_tensorrt("10.9.0")
    builder = trt.Builder(None)
    for network_flags, built in ((0, True), (1 << trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED, False)):
        config = builder.create_builder_config()
        config.set_flag(trt.BuilderFlag.FP16)
        assert (builder.build_serialized_network(builder.create_network(network_flags), config) is not None) is built
