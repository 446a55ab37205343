"""Torch-free AnoCLIP inference runtime (numpy, OpenCV, ONNX Runtime / TensorRT).

``Detector.load(artifact, backend="auto").predict(image, "bottle")``. Public names load lazily so
``import runtime.contract`` stays dependency-free; only ``runtime.tta`` (AnoCLIP+) imports torch.
"""
from __future__ import annotations

from anoclip_core.lazy import lazy_getattr

_LAZY = {
    "Detector": "anoclip.runtime.detector",
    "InferConfig": "anoclip.runtime.config",
    "Result": "anoclip.runtime.result",
    "Region": "anoclip.runtime.postprocess",
    "StripStream": "anoclip.runtime.tiler",
    "predict_tiled": "anoclip.runtime.tiler",
    "parity_check": "anoclip.runtime.backends.base",
    "calibrate": "anoclip.runtime.calibration",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY, globals())
