"""``refsearch.onnx``: the few-shot nearest-neighbour search as a small ONNX graph, for GPU backends.

Inputs ``local_embeddings`` float32 [B, h, w, D] (the encoder graph's output, L2-normalised) and
``references`` float32 [N, D] (the class's bank, any N); output ``visual_anomaly`` [B, h, w] =
1 - max_j <l, b_j> (``anoclip_core.refbank.visual_anomaly``). The runtime runs it on ONNX
Runtime's CUDA execution provider with the bank bound once on the device, so a bank can grow
without re-exporting anything. It holds no weights: the same graph serves every class and bank.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

FILE = "refsearch.onnx"
INPUTS = ("local_embeddings", "references")
OUTPUT = "visual_anomaly"
IR_VERSION = 8  # opset 18 needs IR >= 8; ONNX Runtime >= 1.14 reads it


def build_graph(embed_dim: int, opset: int = 18) -> Any:
    """The search graph for embeddings of width ``embed_dim`` (checked by ``onnx.checker``)."""
    import onnx
    from onnx import TensorProto, helper

    d = int(embed_dim)
    inputs = [helper.make_tensor_value_info(INPUTS[0], TensorProto.FLOAT, ["B", "h", "w", d]),
              helper.make_tensor_value_info(INPUTS[1], TensorProto.FLOAT, ["N", d])]
    output = helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["B", "h", "w"])
    consts = [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
              helper.make_tensor("last_axis", TensorProto.INT64, [1], [-1])]
    nodes = [
        helper.make_node("Transpose", [INPUTS[1]], ["references_t"], perm=[1, 0]),
        helper.make_node("MatMul", [INPUTS[0], "references_t"], ["similarity"]),  # [B, h, w, N]
        helper.make_node("ReduceMax", ["similarity", "last_axis"], ["best"], keepdims=0),
        helper.make_node("Sub", ["one", "best"], [OUTPUT]),
    ]
    graph = helper.make_graph(nodes, "anoclip_refsearch", inputs, [output], initializer=consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", max(18, int(opset)))],
                              producer_name="anoclip")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def write(folder: str | Path, embed_dim: int, opset: int = 18) -> dict[str, Any]:
    """Write ``folder/refsearch.onnx``; returns the manifest's ``refsearch`` entry."""
    import onnx

    onnx.save(build_graph(embed_dim, opset), str(Path(folder) / FILE))
    return {"file": FILE, "inputs": list(INPUTS), "outputs": [OUTPUT]}
