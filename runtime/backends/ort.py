"""ONNX Runtime backends: CPU (tuned), CUDA (IOBinding) and the TensorRT execution provider.

One class, ``OrtBackend``, three flavours (``kind``):

* ``"cpu"``  - ``CPUExecutionProvider``; intra-op threads = physical cores, inter-op 1,
  sequential execution, ``ORT_ENABLE_ALL`` graph optimisation, optional optimised-model cache
  (``optimized_model_path``: written on first load, loaded afterwards).
* ``"cuda"`` - ``CUDAExecutionProvider`` (+ CPU for unsupported ops), inputs/outputs through an
  ``IOBinding`` per call (outputs allocated on the device, copied back once).
* ``"trt"``  - ``TensorrtExecutionProvider`` (+ CUDA + CPU) with an engine cache folder
  (``trt_engine_cache_enable``), so the first session builds engines and later ones reuse them.
  It gets EXPLICIT profile ranges (``trt_profile_min_shapes`` / ``_opt_`` / ``_max_``, format
  ``name:d0xd1x...,name2:...``), the same as the native engine's profile: without them the
  provider sizes its profile from the shapes seen so far and rebuilds the engine whenever a call
  falls outside (minutes on ViT-L). ``trt_fp16_enable`` stays OFF for the fp16 graph: it would make
  ONNX Runtime build a weakly typed network in which TensorRT may override the graph's fp32
  LayerNorm islands; the graph's own types already run it in fp16.

Thread safety: ``InferenceSession.run`` (and ``run_with_iobinding`` with a fresh binding per
call) may be called from several threads at once; nothing here is mutated after ``__init__``.

ONNX Runtime silently falls back to CPU when a GPU provider fails to initialise; we check
``session.get_providers()`` and raise ``BackendUnavailable`` instead of pretending.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from anoclip_core.choices import DEFAULT_TRT_PROFILE
from anoclip_core.errors import ArtifactError, BackendUnavailable

from ..contract import INPUT_NAMES
from .base import BaseBackend

log = logging.getLogger("anoclip.runtime")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TRT = "TensorrtExecutionProvider"
KINDS = {"cpu": "ort-cpu", "cuda": "ort-cuda", "trt": "ort-trt"}
DEFAULT_BATCH_PROFILE = DEFAULT_TRT_PROFILE

Shapes = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def manifest_profile(manifest: Any) -> dict[str, Shapes]:
    """min/opt/max shapes per graph input, as the native engine's profile (export.trt.profile_shapes):
    pixels batch from ``manifest["tensorrt"]["profile"]`` (default 1/8/32), classes 1/C/max(64, 2C)."""
    s, d = int(manifest["image_size"]), int(manifest["embed_dim"])
    trt_entry = manifest.get("tensorrt") or {}
    batch = trt_entry.get("profile") or dict(zip(("min", "opt", "max"), DEFAULT_BATCH_PROFILE, strict=True))
    c = max(1, len(manifest.get("text", {}).get("classes", {})))
    classes = trt_entry.get("classes_profile") or {"min": 1, "opt": c, "max": max(64, 2 * c)}
    px: Shapes = ((int(batch["min"]), 3, s, s), (int(batch["opt"]), 3, s, s), (int(batch["max"]), 3, s, s))
    pr: Shapes = ((int(classes["min"]), 2, d), (int(classes["opt"]), 2, d), (int(classes["max"]), 2, d))
    return {INPUT_NAMES[0]: px, INPUT_NAMES[1]: pr}


def trt_profile_options(shapes: dict[str, Shapes]) -> dict[str, str]:
    """ONNX Runtime TensorRT EP profile options: ``{"trt_profile_min_shapes": "pixels:1x3x224x224,..."}``
    (names and ``input:d0xd1,...`` format: onnxruntime.ai/docs/execution-providers/TensorRT-ExecutionProvider.html,
    "Explicit shape range for dynamic shape input")."""
    opts = {}
    for i, key in enumerate(("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")):
        opts[key] = ",".join(f"{name}:" + "x".join(str(int(v)) for v in dims[i]) for name, dims in shapes.items())
    return opts


def physical_cores() -> int:
    """Physical cores usable by this process (psutil when present; affinity-aware fallback)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    try:
        import psutil

        phys = psutil.cpu_count(logical=False) or usable
    except ImportError:  # psutil is optional at runtime
        phys = max(1, (os.cpu_count() or 1) // 2) if (os.cpu_count() or 1) > 1 else 1
    return max(1, min(phys, usable))


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def select_providers(
    kind: str,
    available: Sequence[str] | None = None,
    device_id: int = 0,
    trt_cache_dir: str | None = None,
    trt_fp16: bool = False,
    trt_profile: dict[str, Shapes] | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """The provider list (with options) for ``kind``; ``BackendUnavailable`` when it cannot run here."""
    if kind not in KINDS:
        raise BackendUnavailable(f"unknown ONNX Runtime backend kind {kind!r} (expected one of {sorted(KINDS)})")
    avail = list(available) if available is not None else available_providers()
    if kind == "cpu":
        return [(CPU, {})]
    cuda_opts = {"device_id": int(device_id), "arena_extend_strategy": "kNextPowerOfTwo",
                 "cudnn_conv_algo_search": "EXHAUSTIVE", "do_copy_in_default_stream": "1"}
    if CUDA not in avail:
        raise BackendUnavailable(
            f"backend {KINDS[kind]} needs ONNX Runtime's {CUDA if kind == 'cuda' else TRT}, but this onnxruntime "
            f"only has {', '.join(avail) or 'no providers'}; install onnxruntime-gpu (pip install anoclip[gpu]) "
            "on a machine with an NVIDIA GPU, or use --backend ort-cpu"
        )
    if kind == "cuda":
        return [(CUDA, cuda_opts), (CPU, {})]
    if TRT not in avail:
        raise BackendUnavailable(
            f"backend ort-trt needs {TRT}, but this onnxruntime only has {', '.join(avail)}; install TensorRT "
            "libraries for onnxruntime-gpu, or use --backend ort-cuda"
        )
    trt_opts: dict[str, Any] = {"device_id": int(device_id), "trt_fp16_enable": bool(trt_fp16)}
    if trt_profile:
        trt_opts.update(trt_profile_options(trt_profile))
    if trt_cache_dir:
        os.makedirs(trt_cache_dir, exist_ok=True)
        trt_opts.update({"trt_engine_cache_enable": True, "trt_engine_cache_path": str(trt_cache_dir),
                         "trt_timing_cache_enable": True, "trt_timing_cache_path": str(trt_cache_dir)})
    return [(TRT, trt_opts), (CUDA, cuda_opts), (CPU, {})]


def session_options(kind: str, intra_threads: int | None = None, optimized_model_path: str | None = None):
    """Tuned ``SessionOptions``: physical cores, sequential, all graph optimisations."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(intra_threads) if intra_threads else (physical_cores() if kind == "cpu" else 1)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if optimized_model_path and kind == "cpu":
        so.optimized_model_filepath = str(optimized_model_path)
    return so


def _default_session_factory(model_path: str, so: Any, providers: list) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(model_path, sess_options=so, providers=providers)


class OrtBackend(BaseBackend):
    """ONNX Runtime session for the exported graph (see module docstring)."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        kind: str = "cpu",
        intra_threads: int | None = None,
        optimized_cache_dir: str | os.PathLike | None = None,
        trt_cache_dir: str | os.PathLike | None = None,
        trt_fp16: bool = False,
        trt_profile: dict[str, Shapes] | None = None,
        device_id: int = 0,
        available: Sequence[str] | None = None,
        session_factory: Callable[[str, Any, list], Any] | None = None,
    ) -> None:
        self.kind = kind
        self.name = KINDS.get(kind, kind)
        self.device_id = int(device_id)
        providers = select_providers(kind, available, device_id, os.fspath(trt_cache_dir) if trt_cache_dir else None,
                                     trt_fp16, trt_profile)
        model_path = os.fspath(model_path)
        load_path = model_path
        opt_path = None
        if optimized_cache_dir and kind == "cpu":
            os.makedirs(optimized_cache_dir, exist_ok=True)
            base = os.path.splitext(os.path.basename(model_path))[0]
            import onnxruntime as ort

            try:  # graph identity + ORT version: an optimised graph is specific to both (and to this CPU)
                stamp = f"{os.path.getsize(model_path)}-{int(os.path.getmtime(model_path))}-ort{ort.__version__}"
            except OSError:
                stamp = f"x-ort{ort.__version__}"
            cached = os.path.join(os.fspath(optimized_cache_dir), f"{base}.{stamp}.ort-opt.onnx")
            if os.path.isfile(cached):
                load_path = cached  # already optimised: loading it skips the optimiser passes
            else:
                opt_path = cached
        so = session_options(kind, intra_threads, opt_path)
        factory = session_factory or _default_session_factory
        try:
            self.session = factory(load_path, so, providers)
        except Exception as err:  # noqa: BLE001 - ORT raises its own exception types
            if kind == "cpu":
                first = (str(err).strip().splitlines() or [""])[0]
                raise ArtifactError(f"{model_path}: ONNX Runtime cannot load this graph ({type(err).__name__}: "
                                    f"{first})") from None
            raise BackendUnavailable(f"backend {self.name} failed to start: {type(err).__name__}: {err}") from None
        wanted = providers[0][0]
        active = list(self.session.get_providers())
        if wanted not in active:
            raise BackendUnavailable(
                f"backend {self.name}: ONNX Runtime could not start {wanted} (session fell back to "
                f"{', '.join(active) or 'nothing'}); check the CUDA/cuDNN/TensorRT libraries and the GPU driver"
            )
        self.providers = active
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._use_iobinding = kind in ("cuda", "trt")

    def run_impl(self, pixels: np.ndarray, prototypes: np.ndarray, outputs: tuple[str, ...]
                 ) -> dict[str, np.ndarray]:
        outs = outputs
        feeds = {INPUT_NAMES[0]: pixels, INPUT_NAMES[1]: prototypes}
        if not self._use_iobinding:
            res = self.session.run(list(outs), feeds)
            return dict(zip(outs, res, strict=True))
        binding = self.session.io_binding()  # one per call: bindings are not shared between threads
        for k, v in feeds.items():
            binding.bind_cpu_input(k, v)
        for name in outs:
            binding.bind_output(name, "cuda", self.device_id)
        self.session.run_with_iobinding(binding)
        res = binding.copy_outputs_to_cpu()
        return dict(zip(outs, res, strict=True))

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"OrtBackend({self.name}, providers={self.providers})"
