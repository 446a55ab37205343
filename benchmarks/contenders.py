"""The contenders: same backbone, image size and inputs; each times one call on a pixel batch.

Every contender takes the same host inputs: normalised pixels ``float32 [B, 3, S, S]`` as a
numpy array and as a CPU torch tensor sharing its memory, so each call includes its own
host-to-device transfer where it has one. ``predict`` returns ``(maps [B, S, S], scores [B])``
as numpy for the fidelity comparison, or None for contenders without maps (plain open_clip).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from anoclip.runtime import contract as mf

from .config import RUNTIME_CONTENDERS, STATIC_INT8_CONTENDERS

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
    def unavailable(cls, name: str, reason: str, group: str = "runtime") -> Contender:
        backend, _, precision = name.rpartition("-")
        return cls(name, runtime_label(name) if group == "runtime" else DESCRIPTIONS.get(name, name), group,
                   "?", precision, available=False, reason=_one_line(reason))


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


# what each contender's precision token means, where it is not just the graph's precision
PRECISION_LABELS = {
    "ort-cpu-int8": "int8 dynamic",
    "ort-cpu-int8s": "int8 static QDQ (calibrated)",
    "openvino-int8": "int8 static QDQ (calibrated), its float ops in bf16 on a bf16 CPU (else f32)",
    "openvino-bf16": "bf16 (inference hint on the fp32 graph)",
}
# the artifact graph a contender's precision token runs ("int8s": the static artifact's int8)
GRAPH_PRECISION = {"int8s": "int8"}


def runtime_label(name: str) -> str:
    backend, _, precision = name.rpartition("-")
    what = {
        "ort-cpu": "ONNX Runtime CPU EP",
        "openvino": "OpenVINO CPU",
        "ort-cuda": "ONNX Runtime CUDA EP",
        "ort-trt": "ONNX Runtime TensorRT EP",
        "trt": "native TensorRT engine",
    }.get(backend, backend)
    return f"(d) runtime, {what}, {PRECISION_LABELS.get(name, precision)}"


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
            from anoclip.export.quantize import bf16_support

            ok, why = bf16_support()
            if not ok:
                return f"not exported: {why}"
        except Exception:  # noqa: BLE001 - the exporter is optional for this message
            pass
    return f"no {precision} graph in the artifact (it has: {have})"


def _missing_graph(backend_name: str, precision: str, graph_precision: str, manifest: dict, skipped: dict
                   ) -> str | None:
    """Why the artifact has nothing for this backend/precision to run (None: it has)."""
    models = manifest.get("models", {})
    if backend_name == "openvino":
        return None  # the backend picks its graph (bf16 is a hint on fp32) and refuses with the reason itself
    if backend_name == "trt":
        trt = manifest.get("tensorrt") or {}
        if not trt:
            return skipped.get("tensorrt") or "the artifact has no TensorRT engine (export with TensorRT on a GPU)"
        if trt.get("precision", precision) != precision:
            return f"the artifact's TensorRT engine is {trt.get('precision')}, not {precision}"
        return None
    if graph_precision not in models:
        if graph_precision in skipped:
            return f"not exported: {skipped[graph_precision]}"
        return missing_precision_reason(graph_precision, models)
    return None


def runtime_contender(
    name: str,
    artifact_dir,
    manifest: dict,
    class_name: str,
    image_size: int,
    threads: int | None,
    cache_dir: str | None = None,
    skipped: dict | None = None,
    static_int8: tuple[Path, dict] | str | None = None,
) -> Contender:
    """``runtime.Detector.load(ART, backend=..., precision=...)`` for ``name``; unavailable (with the
    reason) when that backend/precision cannot run here. Static-int8 contenders run the second
    artifact ``static_int8`` = (folder, manifest) from ``static_int8_artifact`` (or its failure
    reason). The timed call is ``detector.infer_pixels`` plus the runtime's map post-processing at
    S x S, on the same normalised pixels as the core."""
    import time

    backend_name, precision = split_runtime_name(name)
    if name in STATIC_INT8_CONTENDERS:
        if not isinstance(static_int8, tuple):
            return Contender.unavailable(name, static_int8 or "no static int8 artifact was built in this run")
        artifact_dir, manifest = static_int8
    graph_precision = GRAPH_PRECISION.get(precision, precision)
    models = manifest.get("models", {})
    why = _missing_graph(backend_name, precision, graph_precision, manifest, skipped or {})
    if why:
        return Contender.unavailable(name, why)
    from anoclip.runtime import postprocess
    from anoclip.runtime.detector import Detector
    from anoclip_core.errors import AnoCLIPError

    opts: dict[str, Any] = {}
    if threads:
        opts["threads"] = threads
    if cache_dir:
        opts["cache_dir"] = cache_dir
    t0 = time.perf_counter()
    try:
        det = Detector.load(artifact_dir, backend=backend_name,
                            precision=None if backend_name == "trt" else graph_precision, **opts)
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

    device = "cpu" if backend_name in ("ort-cpu", "openvino") else "cuda"
    c = Contender(name, runtime_label(name), "runtime", device, precision, call=call, predict=predict,
                  close=det.close, engine=engine)
    c.load_s = load_s
    c.load_note = "Detector.load: manifest + sha256 of every file + backend start (session / engine)"
    c.info = {"backend": det.backend_name, "note": det.backend_note,
              "providers": list(getattr(det.backend, "providers", []) or []),
              "quantization": (models.get(graph_precision) or {}).get("quantization")}
    c.detector = det
    return c


def static_int8_artifact(cfg: Any, main_dir: Path, main_manifest: dict, names: tuple[str, ...],
                         say: Callable[[str], None] = lambda m: None) -> tuple[Path, dict] | str | None:
    """The artifact with the static QDQ int8 graph for ``STATIC_INT8_CONTENDERS`` -> (folder, manifest),
    or the reason it is unavailable, or None when no contender needs it.

    One artifact holds one int8 graph, so the static one (the dynamic one stays in the main
    artifact) goes to ``<main>-int8-static`` beside it: reused when present and of the same
    backbone / size, else exported with ``anoclip.export.api``, calibrated on 8 synthetic images like the
    timed ones (seed + 1000, so not the timed inputs; the benchmark has no product images) written
    as PNGs, read the way ``--calibration-images`` reads them.
    """
    import tempfile

    if not any(n in STATIC_INT8_CONTENDERS for n in names):
        return None
    folder = Path(main_dir).parent / f"{Path(main_dir).name}-int8-static"
    try:
        if not (folder / mf.MANIFEST_NAME).is_file():
            say(f"exporting the static int8 artifact (calibrated QDQ) -> {folder}")
            with tempfile.TemporaryDirectory(prefix="anoclip-bench-calib-") as calib:
                _export_static_int8(cfg, folder, _write_calibration_images(Path(calib) / "good", cfg.seed + 1000))
        manifest = mf.read_manifest(folder, check_files=False)
    except Exception as err:  # noqa: BLE001 - export/verification failures make the contenders unavailable
        return _one_line(f"no static int8 artifact: {type(err).__name__}: {err}")
    same = all(manifest.get(k) == main_manifest.get(k) for k in ("backbone", "image_size"))
    mode = ((manifest.get("models", {}).get("int8") or {}).get("quantization") or {}).get("mode")
    if not same or mode != "static":
        return f"{folder} is not a static int8 artifact of this backbone/size (int8 mode {mode}); remove it"
    return folder, manifest


def _write_calibration_images(folder: Path, seed: int, n: int = 8) -> list[str]:
    import cv2

    from .runner import synthetic_images

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(synthetic_images(n, 256, 256, seed)):
        path = folder / f"good_{i:02d}.png"
        cv2.imwrite(str(path), img[:, :, ::-1])
        paths.append(str(path))
    return paths


def _export_static_int8(cfg: Any, folder: Path, images: list[str]) -> None:
    from anoclip.export import api

    api.export_artifact(api.ExportConfig(
        backbone=cfg.backbone, classes=(cfg.class_name,), pretrained=cfg.pretrained, image_size=cfg.image_size,
        precisions=("int8",), int8_mode="static", calibration_images=images, out=folder, force=False,
        model_config=cfg.model_config, text_cache=cfg.text_cache, progress=cfg.progress,
    ))
