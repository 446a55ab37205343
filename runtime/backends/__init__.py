"""Backend registry: ``create_backend("auto" | "ort-cpu" | "openvino" | "ort-cuda" | "ort-trt" | "trt", ...)``.

``auto`` tries the fastest first (trt > ort-trt > ort-cuda > openvino > ort-cpu) and returns the
first that starts, with the reasons the others were skipped (``BackendChoice.skipped``), so the
caller can say which one it picked and why. On a CPU, OpenVINO (when installed) comes before ONNX
Runtime: it is the CPU engine with bf16 and static-int8 kernels; ``ort-cpu`` is the fallback
that always works (and the fp32 reference). For int8, ``auto`` leaves OpenVINO out on a CPU
without VNNI / AMX (``cpu_features``), where its int8 kernels are slower than ONNX Runtime's; asked
for by name there, it runs with a warning.
"""
from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from anoclip_core.errors import ArtifactError, BackendUnavailable, InputError

from ..cpu_features import CpuFeatures, read_cpu_features
from .base import ALL_OUTPUTS, DEFAULT_OUTPUTS, Backend, ParityReport, check_graph, parity_check

log = logging.getLogger("anoclip.runtime")

BACKENDS = ("trt", "ort-trt", "ort-cuda", "openvino", "ort-cpu")
CHOICES = ("auto",) + BACKENDS

__all__ = ["ALL_OUTPUTS", "DEFAULT_OUTPUTS", "BACKENDS", "CHOICES", "Backend", "BackendChoice", "ParityReport",
           "check_backend_graph", "check_precision", "create_backend", "parity_check", "running_precision"]


@dataclass
class BackendChoice:
    backend: Any
    name: str
    requested: str
    skipped: dict[str, str] = field(default_factory=dict)
    precision: str | None = None  # what the backend computes in (``running_precision``)

    def describe(self) -> str:
        runs = f", precision {self.precision}" if self.precision else ""
        if self.requested != "auto":
            return f"backend {self.name}{runs}"
        why = "; ".join(f"{k}: {v}" for k, v in self.skipped.items())
        reason = f"first to start of {' > '.join(BACKENDS)}"
        return f"backend auto -> {self.name}{runs}, {reason}" + (f" (skipped {why})" if why else "")


def running_precision(backend: Any, name: str, manifest: Mapping[str, Any], precision: str | None) -> str:
    """The precision a started backend computes in, as the user should read it: the backend's own
    word when it has one (OpenVINO: ``int8 (float ops in bf16)``), the engine's for ``trt``, else the
    graph's key with its int8 mode (``int8 (dynamic)``)."""
    runs = getattr(backend, "runs", None)
    if isinstance(runs, str):
        return runs
    if name == "trt":
        engine = manifest.get("tensorrt") or {}
        float_ops = f", float ops in {engine['float_ops']}" if engine.get("float_ops") else ""
        return f"{engine.get('precision', '?')} (TensorRT engine{float_ops})"
    key = precision or manifest["default_model"]
    mode = ((manifest.get("models", {}).get(key) or {}).get("quantization") or {}).get("mode")
    return f"{key} ({mode})" if mode else str(key)


def _start(name: str, artifact_dir: Path, manifest: Mapping[str, Any], precision: str | None,
           opts: Mapping[str, Any]) -> Any:
    from ..contract import model_entry

    if name == "trt":
        from .trt import TrtBackend

        trt_entry = manifest.get("tensorrt")
        if not trt_entry:
            raise BackendUnavailable(
                "the artifact has no TensorRT engine (export it with anoclip-export --trt on a GPU machine)"
            )
        return TrtBackend(artifact_dir / trt_entry["file"], trt=opts.get("trt_module"),
                          cudart=opts.get("cudart_module"), device_id=opts.get("device_id", 0))
    if name == "openvino":
        return _start_openvino(artifact_dir, manifest, precision, opts)
    from .ort import OrtBackend

    entry = model_entry(manifest, precision)
    model = artifact_dir / entry["file"]
    kind = {"ort-cpu": "cpu", "ort-cuda": "cuda", "ort-trt": "trt"}[name]
    cache_root = opts.get("cache_dir")
    trt_cache = None
    if kind == "trt":
        # engines are specific to graph + GPU + TensorRT: keyed by the graph's sha256, outside the artifact
        graph_id = str(manifest.get("files", {}).get(entry["file"], "unknown"))[:16]
        base = cache_root or os.environ.get("ANOCLIP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                               "anoclip")
        trt_cache = opts.get("trt_cache_dir") or os.path.join(base, "ort-trt", graph_id)
    return OrtBackend(
        model,
        kind,
        intra_threads=opts.get("threads"),
        optimized_cache_dir=opts.get("optimized_cache_dir")
        or (os.path.join(cache_root, "ort-opt") if cache_root else None),
        trt_cache_dir=trt_cache,
        trt_fp16=False,  # the fp16 graph is typed fp16 already; the flag would make the network weakly typed
        trt_profile=_ort_trt_profile(manifest) if kind == "trt" else None,
        device_id=opts.get("device_id", 0),
        available=opts.get("available_providers"),
        session_factory=opts.get("session_factory"),
    )


def _ort_trt_profile(manifest: Mapping[str, Any]) -> dict | None:
    """The ORT TensorRT EP profile (same as the native engine's); None when the manifest lacks the sizes."""
    from .ort import manifest_profile

    try:
        return manifest_profile(manifest)
    except (KeyError, TypeError, ValueError):
        return None


def _start_openvino(artifact_dir: Path, manifest: Mapping[str, Any], precision: str | None,
                    opts: Mapping[str, Any]) -> Any:
    from . import openvino as ov_backend

    ov = ov_backend.load_openvino(opts.get("openvino_module"))  # not installed: refused before reading anything
    key, hint = ov_backend.graph_plan(manifest, precision)
    slow = ov_backend.slow_int8_reason(_cpu_features(opts)) if key == "int8" else None
    if slow and opts.get("auto"):
        raise BackendUnavailable(f"not picked for int8: {slow}")
    cache_root = opts.get("cache_dir")
    backend = ov_backend.OpenVinoBackend(
        artifact_dir / manifest["models"][key]["file"], hint, threads=opts.get("threads"),
        cache_dir=opts.get("openvino_cache_dir") or (os.path.join(cache_root, "openvino") if cache_root else None),
        openvino=ov, core_factory=opts.get("openvino_core_factory"), streams=opts.get("streams") or 1,
    )
    if slow:  # once it runs: a warning before a refusal (e.g. --streams over --threads) would only be noise
        log.warning("backend openvino --precision int8: %s", slow)
    return backend


def _cpu_features(opts: Mapping[str, Any]) -> CpuFeatures:
    """The CPU's features (``opts["cpu_features"]`` injects them in tests)."""
    return opts.get("cpu_features") or read_cpu_features()


def _raise_last(err: Exception, precision: str | None, refusals: Mapping[str, Exception]) -> NoReturn:
    """``auto`` found no backend: for an OpenVINO-only precision (bf16) OpenVINO's reason is the one
    that matters (ONNX Runtime's "no 'bf16' model" would send the user looking for a graph that never exists)."""
    from .openvino import HINT_ONLY

    if precision in HINT_ONLY and "openvino" in refusals:
        raise refusals["openvino"] from None
    raise err


def check_precision(name: str, manifest: Mapping[str, Any], precision: str | None) -> None:
    """Refuse early a precision the artifact has no graph for (bf16 is OpenVINO's hint on the fp32 graph)."""
    from ..contract import model_entry
    from .openvino import HINT_ONLY, graph_plan

    if name == "openvino":  # a precision OpenVINO does not run is refused as such, before "no such graph"
        graph_plan(manifest, precision)
        return
    if name == "auto" and precision in HINT_ONLY:
        model_entry(manifest, "fp32")
        return
    model_entry(manifest, precision)


def check_backend_graph(name: str, artifact_dir: str | os.PathLike, manifest: Mapping[str, Any],
                        precision: str | None) -> None:
    """Check the ONNX graph backend ``name`` would load against the manifest (``base.check_graph``),
    so a broken or mismatched graph is one clear error at load, whichever engine reads it.
    The native TensorRT backend loads an engine, not the graph: nothing to check."""
    from .openvino import HINT_ONLY

    if name == "trt":
        return
    key = "fp32" if precision in HINT_ONLY else (precision or manifest["default_model"])
    if key in manifest["models"]:
        check_graph(Path(artifact_dir) / manifest["models"][key]["file"], artifact_dir, manifest)


def create_backend(name: str, artifact_dir: str | os.PathLike, manifest: Mapping[str, Any],
                   precision: str | None = None, **opts: Any) -> BackendChoice:
    """Start backend ``name`` for a (validated) artifact; ``auto`` picks the fastest available."""
    if name not in CHOICES:
        raise BackendUnavailable(f"unknown backend {name!r} (expected one of {', '.join(CHOICES)})")
    threads = opts.get("threads")
    if threads is not None and int(threads) < 1:  # 0 would silently mean "all cores" to the engines
        raise InputError(f"threads must be >= 1, got {threads}")
    streams = opts.get("streams")
    if streams is not None and (isinstance(streams, bool) or not isinstance(streams, numbers.Integral) or streams < 1):
        raise InputError(f"streams must be a whole number >= 1, got {streams!r}")  # 0 / 2.5 were silently 1 / 2
    if streams is not None and streams != 1 and name != "openvino":
        raise InputError(f"streams ({streams}) are an OpenVINO option: use --backend openvino, or streams 1")
    root = Path(artifact_dir)
    if name != "auto":
        backend = _start(name, root, manifest, precision, opts)
        return BackendChoice(backend, name, name, precision=running_precision(backend, name, manifest, precision))
    skipped: dict[str, str] = {}
    refusals: dict[str, Exception] = {}
    for cand in BACKENDS:
        try:
            backend = _start(cand, root, manifest, precision, {**opts, "auto": True})
        except (BackendUnavailable, ArtifactError) as err:
            if cand == "ort-cpu":
                _raise_last(err, precision, refusals)
            skipped[cand], refusals[cand] = str(err).split(";")[0], err
            continue
        choice = BackendChoice(backend, cand, "auto", skipped, running_precision(backend, cand, manifest, precision))
        log.info(choice.describe())
        return choice
    raise BackendUnavailable("no backend available")  # pragma: no cover - ort-cpu always starts or raises
