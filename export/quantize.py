"""Reduced-precision graphs from the verified fp32 ONNX graph.

* ``fp16``: ``onnxruntime.transformers.float16.convert_float_to_float16`` (the maintained copy of
  onnxconverter-common's pass that ships inside onnxruntime: no extra dependency) with
  ``keep_io_types=True`` so the graph's inputs and outputs stay float32 (same runtime code for
  every precision). ``LayerNormalization`` stays fp32 (its mean/variance over 640-1024 channels
  is where fp16 loses most, and TensorRT warns about fp16 LayerNorm overflow); everything else
  (MatMul, Softmax, GELU, ...) is fp16. ONNX Runtime's CPU provider runs fp16 nodes it has no
  kernel for by inserting casts, so the fp16 graph verifies on CPU; it is meant for GPUs.
* ``bf16``: the same pass followed by a FLOAT16 -> BFLOAT16 retyping (weights rounded from the
  fp32 originals, not via fp16). **ONNX Runtime 1.x's CPU provider has no bf16 MatMul/Add/Mul/
  Sigmoid kernels** (checked by ``bf16_support()`` at run time: NOT_IMPLEMENTED for MatMul(13)
  with onnxruntime 1.32), so a bf16 graph cannot be verified here and ``--precision bf16``
  fails at once with that message instead of shipping an unverified graph.
* ``int8`` (``int8_mode="dynamic"``, the default): ``onnxruntime.quantization.quantize_dynamic``:
  int8 weights (per-tensor) for every
  MatMul whose B is a constant (``MatMulConstBOnly``: the Linear layers); activations quantised
  dynamically per call. Attention score/value matmuls (both inputs activations), Softmax,
  LayerNorm, the patch-embedding Conv and the text-prototype head stay fp32. Dynamic
  quantisation needs no calibration set (a static QDQ graph calibrated on random images would
  be meaningless for real data). The result uses ``MatMulInteger``/``DynamicQuantizeLinear``:
  an ONNX Runtime (CPU) graph; TensorRT needs explicit static QDQ and is refused for int8.
* Both int8 modes quantise weights with ``reduce_range=True`` (7-bit weight range). On x86 CPUs
  without VNNI (AVX2 only), ONNX Runtime's u8s8/s8s8 kernels use ``VPMADDUBSW``, whose 16-bit
  pair sums saturate with full-range weights (ONNX Runtime quantization docs, "When and why do I
  need to try U8U8?" / ``reduce_range``). Measured on an AVX2-only EPYC with the tiny test model:
  token relative error 0.216 (dynamic) and 0.203 (static) with full range, above the 0.15
  tolerance; within it with ``reduce_range``. The artifact must verify on whatever CPU exports it.
* ``int8`` with ``int8_mode="static"``: ``quantize_static`` in QDQ format, per-channel symmetric
  int8 weights, MinMax activations calibrated on ``calibration_images`` (preprocessed like the
  runtime does) or, without them, on the seeded random verification-style set (recorded as
  ``calibration.source: "random"``: it verifies, but real images calibrate real activations; with
  images the manifest records their count, folder name and the sha256 of the file list). The
  same MatMuls as dynamic are quantised except the two output projections (global and local
  tokens -> embedding; ``STATIC_KEPT_FLOAT``), whose per-tensor int8 inputs cost the most map
  fidelity: ViT-B-16-plus-240 random weights on OpenVINO (bf16 remainder), 8 synthetic images,
  map Pearson mean 0.99928 -> 0.99967 and worst 0.99883 -> 0.99932, same latency (they are 0.3% of
  the FLOPs). Attention, Softmax, LayerNorm stay fp32.
* Both int8 modes first fold ``Transpose(weight)`` into a transposed weight
  (``fold_weight_transposes``): the exporter writes the attention ``out_proj`` of both paths that
  way, and the quantizers left those 24 Linear layers (of 62 on ViT-B-16-plus-240) in float. The QDQ graph
  runs in ONNX Runtime (CPU) and OpenVINO (``--backend openvino --precision int8``).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from anoclip.runtime.contract import INPUT_NAMES
from anoclip_core.choices import Int8Mode, Precision, values
from anoclip_core.errors import AnoCLIPError

from .onnx_export import TWO_GB, ExportError, save_onnx

PRECISIONS = values(Precision)
FP16_KEEP_FP32_OPS = ("LayerNormalization",)


def check_precisions(values) -> list[str]:
    """Normalise ``--precision`` values (repeatable, comma lists) -> ordered list, fp32 first."""
    out = ["fp32"]
    for v in values or ():
        for item in str(v).split(","):
            item = item.strip().lower()
            if not item:
                continue
            if item not in PRECISIONS:
                raise AnoCLIPError(f"unknown precision {item!r} (expected one of {', '.join(PRECISIONS)})")
            if item not in out:
                out.append(item)
    return out


def bf16_support() -> tuple[bool, str]:
    """Can ONNX Runtime's CPU provider run a bf16 MatMul/Add graph? (ok, reason)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2, 4])
    w = helper.make_tensor("w", TensorProto.BFLOAT16, [4, 4], [0] * 16)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "x"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "bf16probe", [x], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = min(model.ir_version, onnx.IR_VERSION)
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001
        msg = str(err).split(":")[-1].strip() or type(err).__name__
        return False, f"onnxruntime {ort.__version__} CPU has no bf16 kernels ({msg})"
    return True, ""


def require_bf16() -> None:
    ok, reason = bf16_support()
    if not ok:
        raise AnoCLIPError(
            f"--precision bf16 is not available: {reason}, so a bf16 graph could not be verified. "
            "Use --precision fp16 (same memory, verified on CPU), or on a GPU machine build a bf16 TensorRT engine "
            "without a bf16 ONNX graph: --precision fp32 --trt --trt-precision bf16"
        )


def _load(src: str | os.PathLike):
    import onnx

    return onnx.load(str(src), load_external_data=True)


def _size(model) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def convert_fp16(src: str | os.PathLike, dst: str | os.PathLike, external_data_threshold: int = TWO_GB) -> list[str]:
    """fp32 graph -> fp16 graph with fp32 inputs/outputs (and fp32 LayerNorm)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = _load(src)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model16 = convert_float_to_float16(
                model,
                keep_io_types=True,
                op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(FP16_KEEP_FP32_OPS),
                disable_shape_infer=_size(model) > TWO_GB - (64 << 20),
            )
    except Exception as err:  # noqa: BLE001
        raise ExportError(f"fp16 conversion failed: {type(err).__name__}: {err}") from err
    topological_sort(model16)
    return save_onnx(model16, dst, external=_size(model16) > external_data_threshold)


def topological_sort(model) -> None:
    """Re-order ``model.graph.node`` topologically (in place).

    The float16 pass appends its input Casts at the end of the node list; ONNX Runtime does not
    care, but the ONNX checker and TensorRT's parser require sorted nodes.
    """
    graph = model.graph
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    nodes = list(graph.node)
    producers: dict[str, int] = {}
    for idx, node in enumerate(nodes):
        for out in node.output:
            producers[out] = idx
    order: list[int] = []
    state = [0] * len(nodes)  # 0 new, 1 visiting, 2 done

    def visit(root: int) -> None:
        stack = [(root, False)]
        while stack:
            idx, expanded = stack.pop()
            if state[idx] == 2:
                continue
            if expanded:
                state[idx] = 2
                order.append(idx)
                continue
            state[idx] = 1
            stack.append((idx, True))
            for name in nodes[idx].input:
                dep = producers.get(name)
                if name not in available and dep is not None and state[dep] == 0:
                    stack.append((dep, False))

    for idx in range(len(nodes)):
        if state[idx] == 0:
            visit(idx)
    if order != list(range(len(nodes))):
        sorted_nodes = [nodes[i] for i in order]
        del graph.node[:]
        graph.node.extend(sorted_nodes)


def _fp32_to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even fp32 -> bf16 bit patterns (uint16)."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype(np.uint16)


def convert_bf16(src: str | os.PathLike, dst: str | os.PathLike, external_data_threshold: int = TWO_GB) -> list[str]:
    """fp32 graph -> bf16 graph (fp32 inputs/outputs): the fp16 pass, retyped to BFLOAT16."""
    import onnx
    from onnx import TensorProto, numpy_helper
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = _load(src)
    originals = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model16 = convert_float_to_float16(
            model, keep_io_types=True, op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(FP16_KEEP_FP32_OPS)
        )
    topological_sort(model16)

    def retype_tensor(t, source=None) -> None:
        if t.data_type != TensorProto.FLOAT16:
            return
        arr = source if source is not None else numpy_helper.to_array(t).astype(np.float32)
        bits = _fp32_to_bf16_bits(arr)
        dims = list(t.dims)
        t.Clear()
        t.CopyFrom(onnx.helper.make_tensor(t.name or "", TensorProto.BFLOAT16, dims, bits.tobytes(), raw=True))

    for init in model16.graph.initializer:
        name = init.name
        retype_tensor(init, originals.get(name))
        init.name = name
    for node in model16.graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT16:
                attr.i = TensorProto.BFLOAT16
            if attr.type == onnx.AttributeProto.TENSOR:
                retype_tensor(attr.t)
    for vi in list(model16.graph.value_info) + list(model16.graph.input) + list(model16.graph.output):
        tt = vi.type.tensor_type
        if tt.elem_type == TensorProto.FLOAT16:
            tt.elem_type = TensorProto.BFLOAT16
    return save_onnx(model16, dst, external=_size(model16) > external_data_threshold)


@contextlib.contextmanager
def _quiet_quantizer(what: str, scratch: str | os.PathLike):
    """ONNX Runtime's quantizer prints and logs per node: silence it, and turn its failure into one
    ``ExportError`` naming ``what``. Its own temporary folder (``ort.quant.*``: the augmented graph,
    hundreds of MB on ViT-B) goes under ``scratch`` (the export's staging folder, which the next
    export removes after a kill), not the system temp folder where a SIGKILL would leave it.
    ``tempfile.tempdir`` is process-wide: the exporter runs one quantisation at a time."""
    root = logging.getLogger()
    level = root.level
    saved_tempdir = tempfile.tempdir
    root.setLevel(logging.ERROR)
    try:
        tempfile.tempdir = os.fspath(scratch)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    except Exception as err:  # noqa: BLE001
        raise ExportError(f"{what} failed: {type(err).__name__}: {err}") from err
    finally:
        tempfile.tempdir = saved_tempdir
        root.setLevel(level)


def fold_weight_transposes(model) -> int:
    """Replace every ``Transpose`` of an initializer by a transposed initializer (in place).

    The exporter writes some Linear layers (the attention ``out_proj`` of both paths) as
    ``MatMul(x, Transpose(W))``: the quantizer sees an activation there, not a weight, and leaves
    the layer in float. Folding is exact (a transpose moves values, it computes nothing); one
    transposed copy serves every consumer of the same (initializer, perm). Returns the number of
    Transpose nodes removed.
    """
    from onnx import numpy_helper

    graph = model.graph
    outputs = {o.name for o in graph.output}
    inits = {t.name: t for t in graph.initializer}
    names = set(inits) | {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    folded: dict[tuple[str, tuple[int, ...] | None], str] = {}
    rename: dict[str, str] = {}
    dropped = []
    for node in graph.node:
        if node.op_type != "Transpose" or node.input[0] not in inits or node.output[0] in outputs:
            continue
        perm = next((tuple(a.ints) for a in node.attribute if a.name == "perm"), None)
        key = (node.input[0], perm)
        if key not in folded:
            array = numpy_helper.to_array(inits[node.input[0]])
            name = _unique(f"{node.input[0]}.transposed", names)
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(np.transpose(array, perm)), name))
            folded[key] = name
        rename[node.output[0]] = folded[key]
        dropped.append(node)
    for node in dropped:
        graph.node.remove(node)
    for node in graph.node:
        for j, name in enumerate(node.input):
            if name in rename:
                node.input[j] = rename[name]
    used = {i for n in graph.node for i in n.input} | outputs
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return len(dropped)


def _unique(base: str, taken: set[str]) -> str:
    """``base``, or ``base.N`` for the first N that is not yet a tensor name (and claim it)."""
    name, k = base, 1
    while name in taken:
        name, k = f"{base}.{k}", k + 1
    taken.add(name)
    return name


def _folded_source(src: Path):
    """The fp32 graph loaded with its Linear weights' transposes folded (see ``fold_weight_transposes``)."""
    model = _load(src)
    fold_weight_transposes(model)
    return model


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike, external_data_threshold: int = TWO_GB) -> list[str]:
    """Dynamic int8 (weights int8 per tensor, activations dynamic uint8) of the Linear MatMuls."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    external = (src.parent / (src.name + ".data")).exists()
    with _quiet_quantizer("int8 quantisation", dst.parent):
        quantize_dynamic(
            _folded_source(src),
            str(dst),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            per_channel=False,
            reduce_range=True,
            use_external_data_format=external,
            extra_options={"MatMulConstBOnly": True},
        )
    model = _load(dst)
    return save_onnx(model, dst, external=_size(model) > external_data_threshold)


def _activation_matmuls(model) -> list[str]:
    """MatMul nodes with no constant input (attention q.k^T / p.v, the text-prototype head)."""
    consts = {t.name for t in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not any(i in consts for i in n.input)]


def output_projections(model) -> list[str]:
    """The Linear MatMuls nearest the graph's outputs (no other Linear between them and an output):
    the visual tower's projections of the global and local tokens."""
    linear_out = set(_activation_matmuls(model))
    producer = {o: n for n in model.graph.node for o in n.output}
    found: set[str] = set()
    seen: set[str] = set()
    stack = [o.name for o in model.graph.output]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type == "MatMul" and node.name not in linear_out:
            found.add(node.name)
        else:
            stack.extend(node.input)
    return sorted(found)


def quantize_int8_static(src: str | os.PathLike, dst: str | os.PathLike, calibration: np.ndarray,
                         prototypes: np.ndarray, external_data_threshold: int = TWO_GB) -> list[str]:
    """Static int8 QDQ (per-channel symmetric weights, MinMax-calibrated SYMMETRIC activations: every
    zero point is 0, which TensorRT's explicit quantization requires, and ONNX Runtime and OpenVINO
    run too) of the blocks' Linear MatMuls only. Attention MatMuls (activation x activation), Softmax,
    LayerNorm, Conv, the text head and the two output projections (``output_projections``: 0.3% of
    the FLOPs, but a per-tensor int8 input there cost the most map fidelity) stay fp32.
    ``calibration``: normalised pixels [N, 3, S, S] (real images of the target domain; the seeded
    random set makes a graph that verifies but is not representative).
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    src, dst = Path(src), Path(dst)
    model = _folded_source(src)
    exclude = _activation_matmuls(model) + output_projections(model)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._items = iter([{INPUT_NAMES[0]: calibration[i:i + 1], INPUT_NAMES[1]: prototypes}
                                for i in range(calibration.shape[0])])

        def get_next(self):
            return next(self._items, None)

    external = (src.parent / (src.name + ".data")).exists()
    with _quiet_quantizer("static int8 quantisation", dst.parent):
        quantize_static(
            model, str(dst), Reader(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"],
            nodes_to_exclude=exclude,
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            use_external_data_format=external,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
    model = _load(dst)
    return save_onnx(model, dst, external=_size(model) > external_data_threshold)


#: What the static int8 graph keeps in float besides attention (the manifest's ``quantization.kept_float``).
STATIC_KEPT_FLOAT = ("MatMul (output projections, global and local)",)
INT8_MODES = values(Int8Mode)
CONVERTERS = {"fp16": convert_fp16, "bf16": convert_bf16, "int8": quantize_int8}


def graph_file(precision: str) -> str:
    """``encoder.onnx`` for fp32, ``encoder.<precision>.onnx`` otherwise."""
    return "encoder.onnx" if precision == "fp32" else f"encoder.{precision}.onnx"
