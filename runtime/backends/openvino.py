"""OpenVINO backend (CPU): the artifact's own ONNX graph, compiled once, shared across threads.

OpenVINO's ONNX frontend reads ``encoder.onnx`` / ``encoder.int8.onnx`` directly (no separate IR
export); with a cache folder the compiled blob is kept (``CACHE_DIR``) so later starts skip the
compilation. Precisions (``--precision``):

* ``fp32``: ``encoder.onnx`` with ``INFERENCE_PRECISION_HINT=f32`` set explicitly: the CPU plugin
  defaults to bf16 on CPUs with native bf16, which would silently change the numbers.
* ``bf16``: ``encoder.onnx`` with ``INFERENCE_PRECISION_HINT=bf16``. Refused (``BackendUnavailable``)
  when the CPU's ``OPTIMIZATION_CAPABILITIES`` lack ``"BF16"`` (AVX512_BF16 / AMX): OpenVINO
  accepts the hint there and quietly runs something else, so the user would not get what they asked.
* ``int8``: the artifact's static QDQ int8 graph (``models.int8.quantization.mode == "static"``,
  exported with ``--int8-mode static``); OpenVINO folds the QDQ pairs into int8 kernels. What the
  graph keeps in float (attention, Softmax, LayerNorm, the patch Conv, the text head) runs in bf16
  on a CPU with native bf16 and in f32 elsewhere (``remainder_hint``): with f32 there, those ops
  took 45% of a ViT-B-16-plus-240 call on an AMX Xeon. The fidelity of the result is the
  benchmark's ``openvino-int8`` row. The dynamic int8 graph (``MatMulInteger``/
  ``DynamicQuantizeLinear``) is an ONNX Runtime graph and is refused with the re-export command.
  On a CPU without int8 dot-product instructions (VNNI / AMX) OpenVINO's int8 kernels are slower
  than its fp32 ones (``slow_int8_reason``): ``auto`` leaves OpenVINO out for int8 there, and asked
  for by name it runs with a warning.

Thread safety (OpenVINO docs, "Inference Request"): a ``CompiledModel`` may be shared by threads,
an ``InferRequest`` may not. Each thread gets its own requests (``threading.local``), reused across
its calls; outputs are copied out of the request's tensors before returning.

Streams (``streams=N``, ``--streams N``): one stream runs one request on all the threads
(``PERFORMANCE_HINT=LATENCY``), which is what a single image wants. With N > 1 the model is
compiled for N streams (``PERFORMANCE_HINT=THROUGHPUT``, ``NUM_STREAMS=N``; OpenVINO gives each
stream threads / N of the threads) and a batch is cut into N contiguous parts inferred at once
(``start_async`` then ``wait`` on N requests), joined in order. Each image is computed by the same
kernels either way (the CPU plugin's results do not depend on the batch it came in: checked
bit-equal on ViT-B-16-plus-240 int8 and bf16); small ops scale poorly over threads, so batches,
tiles and strips gain (1.1-1.3x measured paired on 2 cores), while a batch of one runs on one
stream's threads only: keep N = 1 for single-image latency.

Torch-free: numpy and (lazily) ``openvino``.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from anoclip_core.errors import ArtifactError, BackendUnavailable, InputError

from ..contract import INPUT_NAMES
from ..cpu_features import CpuFeatures
from .base import BaseBackend
from .ort import physical_cores

NAME = "openvino"
DEVICE = "CPU"
REMAINDER = "remainder"  # int8: the float ops left in the QDQ graph take the CPU's fastest exact-enough type
HINTS = {"fp32": "f32", "bf16": "bf16", "int8": REMAINDER}
HINT_ONLY = ("bf16",)  # precisions OpenVINO makes from the fp32 graph (no graph of their own)
INSTALL = "pip install 'anoclip[openvino]'"


def load_openvino(module: Any = None) -> Any:
    """The ``openvino`` module (or an injected fake); ``BackendUnavailable`` when not installed."""
    if module is not None:
        return module
    try:
        import openvino
    except ImportError:
        raise BackendUnavailable(f"backend openvino needs the openvino package, which is not installed ({INSTALL})"
                                 ) from None
    return openvino


def graph_plan(manifest: Mapping[str, Any], precision: str | None) -> tuple[str, str]:
    """(manifest model key, OpenVINO inference precision hint) for a requested precision."""
    wanted = precision or manifest["default_model"]
    if wanted not in HINTS:
        raise BackendUnavailable(
            f"backend openvino runs precision fp32, bf16 or int8, not {wanted!r}; use --backend ort-cpu for it")
    key = "fp32" if wanted in HINT_ONLY else wanted
    models = manifest.get("models", {})
    if key not in models:
        raise ArtifactError(f"artifact has no {key!r} model (available: {', '.join(sorted(models))})")
    if key == "int8":
        mode = (models[key].get("quantization") or {}).get("mode", "dynamic")
        if mode != "static":
            raise BackendUnavailable(
                f"backend openvino needs the static QDQ int8 graph, this artifact's int8 graph is {mode} (an ONNX "
                "Runtime graph); run it with --backend ort-cpu, or re-export with --precision int8 --int8-mode static "
                "--calibration-images DIR (worth it for OpenVINO on CPUs with VNNI / AMX)")
    return key, HINTS[wanted]


def cpu_capabilities(core: Any) -> list[str]:
    """The CPU device's ``OPTIMIZATION_CAPABILITIES`` (e.g. ``['FP32', 'INT8', 'BIN', 'EXPORT_IMPORT']``)."""
    try:
        return [str(c) for c in core.get_property(DEVICE, "OPTIMIZATION_CAPABILITIES")]
    except Exception as err:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses
        raise BackendUnavailable(f"backend openvino: cannot query the CPU device: {type(err).__name__}: {err}"
                                 ) from None


def require_hint(hint: str, capabilities: Sequence[str]) -> None:
    """Refuse a bf16 hint on a CPU without native bf16 (OpenVINO would not honour it)."""
    if hint == "bf16" and "BF16" not in capabilities:
        raise BackendUnavailable(
            "backend openvino --precision bf16 needs a CPU with native bf16 (AVX512_BF16 or AMX); this CPU offers "
            f"{', '.join(capabilities) or 'nothing'}: use --precision fp32, or --precision int8 with --backend auto "
            "(it picks the faster int8 engine for this CPU)")


def slow_int8_reason(features: CpuFeatures) -> str | None:
    """Why OpenVINO's int8 is the wrong engine on this CPU, or None when it is not known to be:
    without VNNI / AMX its int8 kernels run slower than its fp32 ones, and ONNX Runtime's int8
    kernels (which have an AVX2 path) are faster on the same graph."""
    if features.int8_dot is not False:
        return None
    return ("this CPU has no int8 dot-product instructions (AVX512_VNNI, AVX_VNNI or AMX_INT8), where OpenVINO's "
            "int8 runs slower than its fp32 and than ONNX Runtime's int8 (--backend ort-cpu)")


def remainder_hint(capabilities: Sequence[str]) -> str:
    """The precision for the float ops of an int8 graph: bf16 where the CPU has it natively, else f32."""
    return "bf16" if "BF16" in capabilities else "f32"


def precision_note(hint: str, effective: str) -> str:
    """What runs, in the runtime's precision words: ``fp32``, ``bf16`` or ``int8 (float ops in bf16)``."""
    if hint == REMAINDER:
        return f"int8 (float ops in {'fp32' if effective == 'f32' else effective})"
    return "fp32" if effective == "f32" else effective


def compile_config(hint: str, threads: int | None, streams: int = 1) -> dict[str, str]:
    """Compile-time properties: precision hint, the threads in all, and latency mode (one stream) or
    throughput mode with ``streams`` streams sharing those threads."""
    total = int(threads) if threads else physical_cores()
    if streams < 1:
        raise InputError(f"streams must be >= 1, got {streams}")
    if streams > total:
        raise InputError(f"--streams {streams} is more than the {total} thread(s) OpenVINO runs on (--threads, "
                         f"default: the physical cores) and each stream needs one: use --streams {total} or fewer")
    config = {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": str(total)}
    if streams == 1:
        return {**config, "PERFORMANCE_HINT": "LATENCY"}
    return {**config, "PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": str(streams)}


def batch_parts(batch: int, streams: int) -> list[slice]:
    """``batch`` items cut into at most ``streams`` contiguous, near-equal parts, in order."""
    parts = min(batch, streams)
    bounds = [round(k * batch / parts) for k in range(parts + 1)]
    return [slice(bounds[k], bounds[k + 1]) for k in range(parts)]


class OpenVinoBackend(BaseBackend):
    """One compiled OpenVINO model of the artifact's graph (see module docstring)."""

    def __init__(self, model_path: str | os.PathLike, hint: str = "f32", threads: int | None = None,
                 cache_dir: str | os.PathLike | None = None, openvino: Any = None,
                 core_factory: Callable[[], Any] | None = None, streams: int = 1) -> None:
        ov = load_openvino(openvino)
        self.streams = int(streams)
        config = compile_config("f32", threads, self.streams)  # bad streams / threads: refused before compiling
        self.name = NAME
        self.model_path = os.fspath(model_path)
        if not os.path.isfile(self.model_path):
            raise ArtifactError(f"graph file not found: {self.model_path}")
        core = core_factory() if core_factory else ov.Core()
        self.capabilities = cpu_capabilities(core)
        self.hint = remainder_hint(self.capabilities) if hint == REMAINDER else hint
        require_hint(self.hint, self.capabilities)
        self.runs = precision_note(hint, self.hint)
        if cache_dir:
            os.makedirs(cache_dir, exist_ok=True)
            core.set_property({"CACHE_DIR": os.fspath(cache_dir)})
        self.config = {**config, "INFERENCE_PRECISION_HINT": self.hint}
        try:
            self.compiled = core.compile_model(self.model_path, DEVICE, self.config)
        except Exception as err:  # noqa: BLE001 - OpenVINO's own exception types
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise BackendUnavailable(f"backend openvino could not compile {os.path.basename(self.model_path)}: "
                                     f"{type(err).__name__}: {first}") from None
        self.input_names = [p.get_any_name() for p in self.compiled.inputs]
        self.output_names = [p.get_any_name() for p in self.compiled.outputs]
        if sorted(self.input_names) != sorted(INPUT_NAMES):
            raise ArtifactError(f"{os.path.basename(self.model_path)} has inputs {self.input_names}, "
                                f"expected {list(INPUT_NAMES)}")
        self._local = threading.local()
        self.version = str(getattr(ov, "__version__", "?"))

    def _requests(self) -> list[Any]:
        """This thread's infer requests, one per stream (created on its first call)."""
        reqs = getattr(self._local, "requests", None)
        if reqs is None:
            reqs = self._local.requests = [self.compiled.create_infer_request() for _ in range(self.streams)]
        return reqs

    def run_impl(self, pixels: np.ndarray, prototypes: np.ndarray, outputs: tuple[str, ...]
                 ) -> dict[str, np.ndarray]:
        reqs = self._requests()
        parts = batch_parts(pixels.shape[0], self.streams)
        if len(parts) == 1:
            res = reqs[0].infer({INPUT_NAMES[0]: pixels, INPUT_NAMES[1]: prototypes})
            return {name: np.array(res[name], dtype=np.float32, copy=True) for name in outputs}
        busy = reqs[:len(parts)]
        for req, part in zip(busy, parts, strict=True):
            req.start_async({INPUT_NAMES[0]: pixels[part], INPUT_NAMES[1]: prototypes})
        for req in busy:
            req.wait()
        return {name: np.concatenate([np.asarray(req.get_tensor(name).data, dtype=np.float32) for req in busy])
                for name in outputs}

    def close(self) -> None:
        self._local = threading.local()
        self.compiled = None

    def __repr__(self) -> str:
        return f"OpenVinoBackend({os.path.basename(self.model_path)}, hint={self.hint}, streams={self.streams})"
