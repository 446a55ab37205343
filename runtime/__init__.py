"""Torch-free AnoCLIP inference runtime (numpy, OpenCV, ONNX Runtime / TensorRT).

``Detector.load(artifact, backend="auto").predict(image, "bottle")``. Public names load lazily so
``import runtime.contract`` stays dependency-free; only ``runtime.tta`` (AnoCLIP+) imports torch.
"""
from __future__ import annotations

from anoclip_core.lazy import lazy_getattr

_LAZY = {
    "Detector": "runtime.detector",
    "InferConfig": "runtime.config",
    "Result": "runtime.result",
    "Region": "runtime.postprocess",
    "StripStream": "runtime.tiler",
    "predict_tiled": "runtime.tiler",
    "parity_check": "runtime.backends.base",
    "calibrate": "runtime.calibration",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY, globals())
