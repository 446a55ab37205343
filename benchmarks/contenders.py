"""The contenders: same backbone, image size and inputs; each times one call on a pixel batch.

Every contender takes the same host inputs: normalised pixels ``float32 [B, 3, S, S]`` as a
numpy array and as a CPU torch tensor sharing its memory, so each call includes its own
host-to-device transfer where it has one. ``predict`` returns ``(maps [B, S, S], scores [B])``
as numpy for the fidelity comparison, or None for contenders without maps (plain open_clip).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .config import RUNTIME_CONTENDERS

DESCRIPTIONS = {
    "reference": "(a) reference-style PyTorch: 22-view image score + a forward for the map (23 dual forwards)",
    "core": "(b) core, one fused dual-path forward (predict, views=False)",
    "open_clip": "(c) plain open_clip encode_image: one forward, no V-V path (the floor)",
}


@dataclass
class Contender:
    """One thing to time. ``call(px_np, px_torch)`` runs one batch; ``sync`` waits for the device."""

    name: str
    label: str
    group: str  # "torch" | "runtime"
    device: str
    precision: str
    forwards_per_image: int = 1
    dual_path: bool = True
    available: bool = True
    reason: str | None = None
    load_s: float | None = None
    load_note: str = ""
    call: Callable[[np.ndarray, Any], Any] | None = None
    predict: Callable[[np.ndarray, Any], tuple[np.ndarray, np.ndarray]] | None = None
    sync: Callable[[], None] | None = None
    close: Callable[[], None] | None = None
    engine: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None  # px -> (patch_probs, scores)
    detector: Any = None  # the runtime.Detector of a runtime contender
    info: dict = field(default_factory=dict)

    @classmethod
    def unavailable(cls, name: str, reason: str, group: str = "runtime") -> "Contender":
        backend, _, precision = name.rpartition("-")
        return cls(name, runtime_label(name) if group == "runtime" else DESCRIPTIONS.get(name, name), group,
                   "?", precision, available=False, reason=_one_line(reason))


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def runtime_label(name: str) -> str:
    backend, _, precision = name.rpartition("-")
    what = {
        "ort-cpu": "ONNX Runtime CPU EP",
        "ort-cuda": "ONNX Runtime CUDA EP",
        "ort-trt": "ONNX Runtime TensorRT EP",
        "trt": "native TensorRT engine",
    }.get(backend, backend)
    return f"(d) runtime, {what}, {precision}"


def split_runtime_name(name: str) -> tuple[str, str]:
    """'ort-cpu-int8' -> ('ort-cpu', 'int8')."""
    if name not in RUNTIME_CONTENDERS:
        raise ValueError(f"not a runtime contender: {name!r}")
    backend, _, precision = name.rpartition("-")
    return backend, precision


# torch ---------------------------------------------------------------------------------------
def torch_contenders(model, class_name: str, names: tuple[str, ...], load_s: float) -> list[Contender]:
    """(a) reference-style, (b) core fused forward, (c) plain open_clip on the same ``model``."""
    import torch

    device = str(model.device)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else None
    out: list[Contender] = []

    def as_np(maps: torch.Tensor, scores: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return maps.float().cpu().numpy(), scores.float().cpu().numpy()

    for name in names:
        if name == "reference":
            def call(px, pt, _m=model):
                return _m.predict(pt, class_name, views=True)

            c = Contender(name, DESCRIPTIONS[name], "torch", device, "fp32", forwards_per_image=23,
                          call=call, predict=lambda px, pt, _c=call: as_np(*_c(px, pt)), sync=sync)
        elif name == "core":
            def call(px, pt, _m=model):
                return _m.predict(pt, class_name)

            c = Contender(name, DESCRIPTIONS[name], "torch", device, "fp32",
                          call=call, predict=lambda px, pt, _c=call: as_np(*_c(px, pt)), sync=sync)
        elif name == "open_clip":
            def call(px, pt, _m=model):
                with torch.no_grad():
                    return _m.clip.encode_image(pt.to(_m.device))

            c = Contender(name, DESCRIPTIONS[name], "torch", device, "fp32", dual_path=False, call=call, sync=sync)
        else:
            raise ValueError(f"not a torch contender: {name!r}")
        c.load_s = load_s
        c.load_note = "shared AnoCLIP.create (one model for (a), (b), (c))"
        out.append(c)
    return out


# runtime -------------------------------------------------------------------------------------
def missing_precision_reason(precision: str, models) -> str:
    """Why an artifact has no graph of ``precision`` (asks the exporter where it can tell)."""
    have = ", ".join(models) or "none"
    if precision == "bf16":
        try:
            from export.quantize import bf16_support

            ok, why = bf16_support()
            if not ok:
                return f"not exported: {why}"
        except Exception:  # noqa: BLE001 - the exporter is optional for this message
            pass
    return f"no {precision} graph in the artifact (it has: {have})"


def runtime_contender(
    name: str,
    artifact_dir,
    manifest: dict,
    class_name: str,
    image_size: int,
    threads: int | None,
    cache_dir: str | None = None,
    skipped: dict | None = None,
) -> Contender:
    """``runtime.Detector.load(ART, backend=..., precision=...)`` for ``name``; unavailable (with the
    reason) when that backend/precision cannot run here. The timed call is ``detector.infer_pixels``
    plus the runtime's map post-processing at S x S, on the same normalised pixels as the core."""
    import time

    backend_name, precision = split_runtime_name(name)
    models = manifest.get("models", {})
    skipped = skipped or {}
    if backend_name == "trt":
        trt = manifest.get("tensorrt") or {}
        if not trt:
            why = skipped.get("tensorrt") or "the artifact has no TensorRT engine (export with TensorRT on a GPU)"
            return Contender.unavailable(name, why)
        if trt.get("precision", precision) != precision:
            return Contender.unavailable(name, f"the artifact's TensorRT engine is {trt.get('precision')}, not {precision}")
    elif precision not in models:
        if precision in skipped:
            return Contender.unavailable(name, f"not exported: {skipped[precision]}")
        return Contender.unavailable(name, missing_precision_reason(precision, models))
    from anoclip_core.errors import AnoCLIPError
    from runtime import postprocess
    from runtime.detector import Detector

    opts: dict[str, Any] = {}
    if threads:
        opts["threads"] = threads
    if cache_dir:
        opts["cache_dir"] = cache_dir
    t0 = time.perf_counter()
    try:
        det = Detector.load(artifact_dir, backend=backend_name,
                            precision=None if backend_name == "trt" else precision, **opts)
    except AnoCLIPError as err:
        return Contender.unavailable(name, str(err))
    except Exception as err:  # noqa: BLE001 - ORT/TensorRT raise their own types (e.g. no kernel for a type)
        return Contender.unavailable(name, f"{type(err).__name__}: {err}")
    load_s = time.perf_counter() - t0

    def engine(px):
        return det.infer_pixels(px, class_name)

    def call(px, pt=None):
        probs, scores = engine(px)
        return postprocess.anomaly_map(probs, (image_size, image_size)), scores

    def predict(px, pt=None):
        maps, scores = call(px)
        return np.asarray(maps, dtype=np.float32), np.asarray(scores, dtype=np.float32)

    device = "cpu" if backend_name == "ort-cpu" else "cuda"
    c = Contender(name, runtime_label(name), "runtime", device, precision, call=call, predict=predict,
                  close=det.close, engine=engine)
    c.load_s = load_s
    c.load_note = "Detector.load: manifest + sha256 of every file + backend start (session / engine)"
    c.info = {"backend": det.backend_name, "note": det.backend_note,
              "providers": list(getattr(det.backend, "providers", []) or [])}
    c.detector = det
    return c
