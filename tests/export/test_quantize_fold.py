"""Folding ``Transpose(weight)`` before quantisation: exact, and every Linear layer gets quantised (the static
graph keeps the two output projections float on purpose)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

WIDE_EMBED = 32  # tests/configs/anoclip-wide.json embed_dim: the visual projection is 576 x 32


def _graph_with_transposed_weights() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """y = relu(x @ W^T) @ W^T + x @ V^T (default perm): W's transpose is written twice, V's once."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 6)).astype(np.float32)
    v = rng.standard_normal((6, 6)).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["W"], ["Wt1"], perm=[1, 0]),
        helper.make_node("Transpose", ["W"], ["Wt2"], perm=[1, 0]),
        helper.make_node("Transpose", ["V"], ["Vt"]),
        helper.make_node("MatMul", ["x", "Wt1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "Wt2"], ["a"]),
        helper.make_node("MatMul", ["x", "Vt"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 6])],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(v, "V")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), w, v


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_fold_is_exact_and_leaves_plain_weight_matmuls():
    from anoclip.export.quantize import fold_weight_transposes

    model, w, v = _graph_with_transposed_weights()
    x = np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32)
    expected = np.maximum(x @ w.T, 0) @ w.T + x @ v.T  # numpy, independent of ONNX
    before = _run(model, x)
    assert fold_weight_transposes(model) == 3
    onnx.checker.check_model(model)
    after = _run(model, x)
    np.testing.assert_allclose(before, expected, rtol=1e-5, atol=1e-5)
    assert np.array_equal(before, after)  # moving values computes nothing: bit for bit
    assert not any(n.op_type == "Transpose" for n in model.graph.node)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert len(inits) == 2  # one transposed copy per weight, the untransposed originals dropped
    assert sorted(inits) == ["V.transposed", "W.transposed"]
    np.testing.assert_array_equal(inits["W.transposed"], w.T)
    np.testing.assert_array_equal(inits["V.transposed"], v.T)


def test_fold_keeps_a_transpose_of_an_activation_and_a_graph_output():
    from anoclip.export.quantize import fold_weight_transposes

    model, _, _ = _graph_with_transposed_weights()
    model.graph.node.append(helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0]))
    model.graph.output.append(helper.make_tensor_value_info("xt", TensorProto.FLOAT, [6, 3]))
    model.graph.output.append(helper.make_tensor_value_info("Vt", TensorProto.FLOAT, [6, 6]))
    assert fold_weight_transposes(model) == 2  # W twice; V's transpose is a graph output, x is no weight
    onnx.checker.check_model(model)
    kinds = [n.op_type for n in model.graph.node]
    assert kinds.count("Transpose") == 2


def _float_weight_matmuls(path, through_transpose_only: bool = False) -> list[str]:
    """MatMuls whose second input is a float weight (an initializer, or a Transpose of one)."""
    model = onnx.load(str(path))
    inits = {t.name for t in model.graph.initializer}
    produced = {o: n for n in model.graph.node for o in n.output}

    def is_weight(name: str) -> bool:
        node = produced.get(name)
        transposed = node is not None and node.op_type == "Transpose" and node.input[0] in inits
        return transposed if through_transpose_only else (name in inits or transposed)

    return [n.name for n in model.graph.node if n.op_type == "MatMul" and is_weight(n.input[1])]


@pytest.fixture(scope="module")
def wide_artifacts(register_tiny, text_cache, tmp_path_factory):
    """anoclip-wide (one block, width 576) exported with dynamic and with static int8.

    576 x 576 weights are above the exporter's constant-folding size limit (onnxscript folds
    outputs up to 262,144 elements), so the fp32 graph keeps ``MatMul(x, Transpose(W))`` for the
    attention out-proj, as ViT-B-16-plus-240 (896 wide) does; anoclip-tiny's are folded already.
    """
    from anoclip.export.api import ExportConfig, export_artifact

    root = tmp_path_factory.mktemp("wide")
    out = {}
    for mode in ("dynamic", "static"):
        out[mode] = export_artifact(ExportConfig(
            backbone="anoclip-wide", classes=["bottle"], pretrained=None, out=root / mode, text_cache=text_cache,
            progress=False, precisions=["int8"], int8_mode=mode))
    return out


@pytest.mark.parametrize("which", ["dynamic", "static"])
def test_every_linear_layer_is_quantised(wide_artifacts, which):
    """The fp32 graph's weight MatMuls (Transposes of weights included) all become int8 ones."""
    art = wide_artifacts[which]
    fp32 = _float_weight_matmuls(art / "encoder.onnx")
    transposed = _float_weight_matmuls(art / "encoder.onnx", through_transpose_only=True)
    assert len(transposed) == 2  # out-proj of the q-k path and of the V-V path
    assert len(fp32) == 7  # + qkv, fc1, fc2, and the visual proj for the global and for the local tokens
    graph = onnx.load(str(art / "encoder.int8.onnx")).graph
    left = _float_weight_matmuls(art / "encoder.int8.onnx")
    if which == "dynamic":
        assert left == []
    else:  # the static graph keeps exactly the two visual projections float (export.quantize.STATIC_KEPT_FLOAT)
        weights = {t.name: tuple(t.dims) for t in graph.initializer}
        assert sorted(weights[n.input[1]] for n in graph.node if n.name in left) == [(576, WIDE_EMBED)] * 2
    if which == "dynamic":
        quantised = [n for n in graph.node if n.op_type == "MatMulInteger"]
    else:
        inits = {t.name for t in graph.initializer}
        produced = {o: n for n in graph.node for o in n.output}
        quantised = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in produced
                     and produced[n.input[1]].op_type == "DequantizeLinear" and produced[n.input[1]].input[0] in inits]
    assert len(quantised) == len(fp32) - len(left)


@pytest.mark.parametrize("which", ["dynamic", "static"])
def test_quantizer_scratch_goes_under_the_staging_folder(artifact, tmp_path, monkeypatch, which):
    """ONNX Runtime's quantizer makes its own temporary folder (``ort.quant.*``); it must be created in
    the export's staging folder (removed by the next export after a kill), not the system temp."""
    import tempfile

    from anoclip.export import quantize

    made: list[str] = []
    real = tempfile.mkdtemp

    def spy(*args, **kwargs):
        path = real(*args, **kwargs)
        made.append(path)
        return path

    monkeypatch.setattr(tempfile, "mkdtemp", spy)
    stage = tmp_path / "stage"
    stage.mkdir()
    before = tempfile.gettempdir()
    if which == "dynamic":
        quantize.quantize_int8(artifact / "encoder.onnx", stage / "encoder.int8.onnx")
    else:
        px = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
        protos = np.random.default_rng(1).standard_normal((1, 2, 32)).astype(np.float32)
        quantize.quantize_int8_static(artifact / "encoder.onnx", stage / "encoder.int8.onnx", px, protos)
    ort_dirs = [p for p in made if "ort.quant" in p]
    assert ort_dirs, made  # the quantizer does make one (else this test checks nothing)
    assert all(str(stage) in p for p in ort_dirs), ort_dirs
    assert tempfile.gettempdir() == before  # restored afterwards
