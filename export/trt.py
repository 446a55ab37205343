"""TensorRT engine builder (``--trt``): a serialised plan next to the ONNX graph.

* ``require_tensorrt()`` runs FIRST in an export with ``--trt`` (before weights are loaded):
  no importable ``tensorrt`` or no CUDA GPU -> ``BackendUnavailable`` with a clear message.
* One optimisation profile: ``pixels`` batch min/opt/max (default 1/8/32) and
  ``text_prototypes`` classes 1/<#classes>/max(64, 2 x #classes), fixed S and D.
* Timing cache: loaded from and saved back to a file (default
  ``~/.cache/anoclip/trt/timing-<trt version>-<gpu>.cache``) so rebuilds are fast; it is a
  machine-local cache, not part of the artifact. ``set_timing_cache`` returns False for a cache
  from another device or version: the build then falls back to a fresh cache; a None from
  ``get_timing_cache`` only skips saving. The plan is written to a temp file and renamed.
* Precision, by TensorRT major version:

  - TensorRT >= 11 removed ``BuilderFlag.FP16``/``BF16``/``INT8`` ("weakly typed" networks):
    every network is strongly typed (NvInfer.h 11.1: ``kSTRONGLY_TYPED = 0`` is "deprecated ...
    always enabled ... ignored", and bit 1 is now ``kPREFER_JIT_PYTHON_PLUGINS``), so the network
    is created with NO creation flags from the graph that already carries the reduced precision
    (``encoder.fp16.onnx``, ``encoder.bf16.onnx``); types are the ONNX graph's.
  - TensorRT 10: the fp32 graph is parsed into a weakly typed network and ``BuilderFlag.FP16``
    (or ``BF16``) lets the builder choose reduced-precision kernels per layer (the classic path
    with the widest kernel choice); fp32 engines get no flag.
  - ``BuilderFlag.TF32`` is ON by default in both (NvInfer.h 10.x/11.1: "Enabled by default"):
    an fp32 engine would round its matmul inputs to 10-bit mantissas. It is cleared for fp32
    engines so they meet the fp32 parity tolerance; the manifest records ``tf32``.
  - int8 (``--trt-precision int8``): explicit quantization from the export's static, calibrated
    QDQ graph (``encoder.int8.onnx`` with ``--int8-mode static``; every zero point 0, per-channel
    weight scales on the MatMul output axis), on every TensorRT version. The network is strongly
    typed (10.x: creation flag ``STRONGLY_TYPED``; 11.x: always), so the Q/DQ pairs decide what
    runs in int8 and no precision flag is set (TensorRT docs, "Explicit Quantization": "Use
    explicit quantization with Strong Typing. Precision-control build flags are not required and
    should not be specified"; TensorRT 10.6 fails ``buildSerializedNetwork`` on a strongly typed
    network with ``kFP16`` set, NVIDIA/TensorRT#4253). The float remainder (attention, LayerNorm,
    GELU, the two output projections) runs in fp32 with TF32 matmuls: ``kTF32`` is "Enabled by
    default" and not deprecated, and trtexec ``--stronglyTyped`` (v10.9.0 sampleOptions.cpp) clears
    only the precision flags, keeping TF32; its error is far below int8's. ``check_qdq_graph``
    refuses, before the parser sees it, what TensorRT cannot take (NvInfer.h v10.9.0 / v11.0
    ``IQuantizeLayer``): a non-zero zero point ("only symmetric quantization is supported"), a
    per-channel activation scale ("Per-channel quantization is supported only for weight inputs"),
    and the dynamic int8 graph (``MatMulInteger``). Weight scales are per output channel, DQ axis 1
    of a MatMul weight [K, N] (the axis ONNX Runtime's TensorRT BERT example quantizes MatMul weights
    on; not stated by NVIDIA, so the first GPU check is where it is confirmed).

* Manifest entry: file, precision, trt_version, gpu, profile, strongly_typed, timing cache path.
"""
from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any

from anoclip.runtime.contract import INPUT_NAMES
from anoclip_core.choices import DEFAULT_TRT_PROFILE, TRT_PRECISIONS
from anoclip_core.errors import AnoCLIPError, BackendUnavailable

from .onnx_export import ExportError

log = logging.getLogger("anoclip.export")

DEFAULT_PROFILE = DEFAULT_TRT_PROFILE
WORKSPACE_BYTES = 4 << 30


def require_tensorrt() -> tuple[Any, str]:
    """(tensorrt module, GPU name) or ``BackendUnavailable`` at once; no heavy work done."""
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except Exception as err:  # noqa: BLE001 - ImportError, or a broken CUDA library load
        raise BackendUnavailable(
            f"--trt needs TensorRT, which is not importable here ({type(err).__name__}: {err}); "
            "install it on a CUDA machine (pip install 'anoclip[trt]') or export without --trt "
            "and build the engine later on the target GPU"
        ) from None
    gpu = cuda_gpu_name()
    if gpu is None:
        raise BackendUnavailable(
            f"--trt needs a CUDA GPU, none is visible (TensorRT {getattr(trt, '__version__', '?')} is installed); "
            "an engine is specific to the GPU it is built on: build it on the target machine"
        )
    return trt, gpu


def cuda_gpu_name() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    return None


def trt_major(trt) -> int:
    match = re.match(r"(\d+)", str(getattr(trt, "__version__", "0")))
    return int(match.group(1)) if match else 0


def choose_trt_precision(precisions: list[str], requested: str | None = None, int8_mode: str = "dynamic") -> str:
    """The engine's precision: ``requested`` (``--trt-precision``) when given, else the most reduced
    float precision among the ONNX graphs (fp16 > bf16), then a static int8 graph, then fp32.
    Independent of which ONNX graphs ONNX Runtime can verify: a bf16 engine needs no ORT-verified
    bf16 graph. int8 needs the export's own static QDQ graph (calibrated, verified)."""
    static_int8 = "int8" in precisions and int8_mode == "static"
    if requested is not None:
        if requested not in TRT_PRECISIONS:
            raise AnoCLIPError(f"--trt-precision must be one of {', '.join(TRT_PRECISIONS)}, got {requested!r}")
        if requested == "int8" and not static_int8:
            have = (f"this export's int8 graph is --int8-mode {int8_mode}" if "int8" in precisions
                    else "this export has no --precision int8")
            raise AnoCLIPError(
                f"--trt-precision int8 builds the engine from the static, calibrated int8 graph, but {have}: "
                "add --precision int8 --int8-mode static --calibration-images DIR (good images of the product)"
            )
        return requested
    for p in ("fp16", "bf16"):
        if p in precisions:
            return p
    if static_int8:
        return "int8"
    if "int8" in precisions and len(precisions) == 2:
        raise AnoCLIPError(
            "--trt with --precision int8: the dynamic int8 graph (MatMulInteger) is an ONNX Runtime graph that "
            "TensorRT cannot build; use --int8-mode static --calibration-images DIR for an int8 engine, or add "
            "--precision fp16 for a float one"
        )
    return "fp32"


#: Operators of ONNX Runtime's dynamic int8 graph, which TensorRT's explicit quantization cannot build.
DYNAMIC_INT8_OPS = ("DynamicQuantizeLinear", "MatMulInteger")


def check_qdq_graph(onnx_path: str | os.PathLike) -> int:
    """An int8 engine's source must be explicit quantization: Q/DQ pairs, every zero point 0 (TensorRT
    quantizes symmetrically), no dynamic-quantization ops. Returns the number of DequantizeLinear nodes;
    ``ExportError`` naming the file and the first offending node otherwise."""
    import onnx
    from onnx import numpy_helper

    name = Path(onnx_path).name
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - protobuf DecodeError, OSError: one line naming the file
        raise ExportError(f"{name}: not a readable ONNX graph ({type(err).__name__}: {err})") from err
    inits = {t.name: t for t in model.graph.initializer}
    dequant = 0
    for node in model.graph.node:
        if node.op_type in DYNAMIC_INT8_OPS:
            raise ExportError(f"{name}: node {node.name!r} is {node.op_type} (dynamic int8, ONNX Runtime only); "
                              "TensorRT needs the static QDQ graph (--int8-mode static)")
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        dequant += node.op_type == "DequantizeLinear"
        scale = inits.get(node.input[1])
        if node.input[0] not in inits and scale is not None and math.prod(scale.dims) > 1:
            raise ExportError(f"{name}: {node.op_type} {node.name!r} quantizes an activation per channel; "
                              "TensorRT quantizes activations per tensor (per-channel is for weights only)")
        zp = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zp is not None and numpy_helper.to_array(zp, base_dir=str(Path(onnx_path).parent)).any():
            raise ExportError(f"{name}: {node.op_type} {node.name!r} has a non-zero zero point; "
                              "TensorRT's explicit quantization is symmetric (zero point 0)")
    if not dequant:
        raise ExportError(f"{name} has no QuantizeLinear/DequantizeLinear nodes: not an int8 QDQ graph")
    return dequant


def default_timing_cache(trt, gpu: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", gpu).strip("_") or "gpu"
    root = Path(os.environ.get("ANOCLIP_TRT_CACHE", Path.home() / ".cache" / "anoclip" / "trt"))
    return root / f"timing-{getattr(trt, '__version__', 'unknown')}-{safe}.cache"


def profile_shapes(image_size: int, embed_dim: int, num_classes: int,
                   batch: tuple[int, int, int] = DEFAULT_PROFILE) -> dict[str, tuple[tuple[int, ...], ...]]:
    """min/opt/max shapes per input for the optimisation profile."""
    bmin, bopt, bmax = batch
    if not 1 <= bmin <= bopt <= bmax:
        raise AnoCLIPError(f"TensorRT batch profile must satisfy 1 <= min <= opt <= max, got {batch}")
    s, d = int(image_size), int(embed_dim)
    c = max(1, int(num_classes))
    cmax = max(64, 2 * c)
    return {
        INPUT_NAMES[0]: ((bmin, 3, s, s), (bopt, 3, s, s), (bmax, 3, s, s)),
        INPUT_NAMES[1]: ((1, 2, d), (c, 2, d), (cmax, 2, d)),
    }


def build_engine(
    trt,
    onnx_path: str | os.PathLike,
    plan_path: str | os.PathLike,
    precision: str,
    image_size: int,
    embed_dim: int,
    num_classes: int,
    gpu: str,
    batch_profile: tuple[int, int, int] = DEFAULT_PROFILE,
    timing_cache: str | os.PathLike | None = None,
    workspace: int = WORKSPACE_BYTES,
) -> dict[str, Any]:
    """Parse ``onnx_path``, build, write ``plan_path``; returns the manifest ``tensorrt`` entry.

    ``onnx_path`` is the graph of ``precision`` for TensorRT >= 11 (strongly typed) and the fp32
    graph for TensorRT 10 (precision by builder flag) -- see ``engine_source``.
    """
    if precision not in TRT_PRECISIONS:
        raise AnoCLIPError(f"TensorRT engine precision must be one of {TRT_PRECISIONS}, got {precision!r}")
    if precision == "int8":
        check_qdq_graph(onnx_path)
    major = trt_major(trt)
    strongly_typed = major >= 11 or precision == "int8"
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "unknown error"
        raise ExportError(f"TensorRT {trt.__version__} could not parse {Path(onnx_path).name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
    if not strongly_typed and precision != "fp32":
        flag = {"fp16": "FP16", "bf16": "BF16"}[precision]
        if not hasattr(trt.BuilderFlag, flag):
            raise AnoCLIPError(f"TensorRT {trt.__version__} has no BuilderFlag.{flag}")
        config.set_flag(getattr(trt.BuilderFlag, flag))
    tf32 = precision != "fp32"
    if not tf32:
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default: fp32 engines must compute in fp32
    shapes = profile_shapes(image_size, embed_dim, num_classes, batch_profile)
    profile = builder.create_optimization_profile()
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    for name in inputs:  # a Triton graph has text_prototypes folded in: pixels only
        if name not in shapes:
            raise ExportError(f"{Path(onnx_path).name} has an unexpected input {name!r} for TensorRT")
        lo, opt, hi = shapes[name]
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)

    cache_path = Path(timing_cache) if timing_cache else default_timing_cache(trt, gpu)
    attach_timing_cache(config, cache_path)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(
            f"TensorRT {trt.__version__} failed to build an engine from {Path(onnx_path).name} (see its log above)"
        )
    plan_path = Path(plan_path)
    write_atomic(plan_path, bytes(plan))
    save_timing_cache(config, cache_path)
    protos = INPUT_NAMES[1]
    return {
        "file": plan_path.name,
        "precision": precision,
        "source_onnx": Path(onnx_path).name,
        "trt_version": str(trt.__version__),
        "gpu": gpu,
        "strongly_typed": strongly_typed,
        "tf32": tf32,
        **({"float_ops": INT8_FLOAT_OPS} if precision == "int8" else {}),
        "profile": {"min": batch_profile[0], "opt": batch_profile[1], "max": batch_profile[2]},
        "classes_profile": ({"min": shapes[protos][0][0], "opt": shapes[protos][1][0], "max": shapes[protos][2][0]}
                            if protos in inputs else None),
        "timing_cache": str(cache_path),
    }


#: What an int8 engine's non-quantized layers compute in (the manifest's ``tensorrt.float_ops``).
INT8_FLOAT_OPS = "fp32 (TF32 matmuls)"


def network_flags(trt, strongly_typed: bool) -> int:
    """``create_network`` flags: none on TensorRT >= 11 (always strongly typed) and for 10.x float
    engines (weakly typed + builder flag); ``STRONGLY_TYPED`` for a strongly typed 10.x network (the
    int8 engine: explicit quantization, the Q/DQ graph's types decide)."""
    if strongly_typed and trt_major(trt) < 11:
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0


def attach_timing_cache(config, cache_path: Path) -> None:
    """Load ``cache_path`` into ``config``; a cache TensorRT refuses (other GPU or version: ``set_timing_cache``
    returns False) is replaced by a fresh one, so the build goes on and overwrites it afterwards."""
    blob = cache_path.read_bytes() if cache_path.is_file() else b""
    if config.set_timing_cache(config.create_timing_cache(blob), False):
        return
    log.warning("TensorRT refused the timing cache %s (built on another GPU or TensorRT version); "
                "starting a fresh one", cache_path)
    if blob and not config.set_timing_cache(config.create_timing_cache(b""), False):
        log.warning("TensorRT refused a fresh timing cache too; building without one")


def save_timing_cache(config, cache_path: Path) -> None:
    """Write the builder's timing cache back (temp file + rename); nothing when there is none."""
    cache = config.get_timing_cache()
    if cache is None:  # documented: None when no timing cache is set
        return
    try:
        write_atomic(cache_path, bytes(cache.serialize()))
    except OSError:
        pass  # a cache we cannot write only costs build time next time


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file next to ``path`` and rename it: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def engine_source(trt, precision: str, graph_files: dict[str, str]) -> str:
    """Which ONNX file the engine is built from: the precision's own graph on TRT >= 11, fp32 on TRT 10,
    the static QDQ graph for int8 on both.
    On TRT >= 11 without an exported graph of ``precision``, ``engine_only_graph(precision)``:
    a graph converted for the engine alone (not verified by ONNX Runtime, not shipped)."""
    if precision == "int8":  # the calibrated graph of the export; never converted for the engine alone
        if "int8" not in graph_files:
            raise AnoCLIPError("an int8 TensorRT engine needs the export's static int8 graph (--precision int8)")
        return graph_files["int8"]
    if trt_major(trt) >= 11 and precision != "fp32":
        return graph_files.get(precision, engine_only_graph(precision))
    return graph_files["fp32"]


def engine_only_graph(precision: str) -> str:
    """Temp name of a reduced-precision graph converted only as a TensorRT >= 11 engine source."""
    return f".encoder.{precision}.engine-source.onnx"


def plan_file(precision: str) -> str:
    return f"encoder.{precision}.plan"
