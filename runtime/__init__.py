"""Torch-free AnoCLIP inference runtime (numpy, OpenCV, ONNX Runtime / TensorRT).

``Detector.load(artifact, backend="auto").predict(image, "bottle")``. Public names load lazily so
``import runtime.manifest`` stays dependency-free; only ``runtime.tta`` (AnoCLIP+) imports torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Detector": "runtime.detector",
    "InferConfig": "runtime.detector",
    "Result": "runtime.detector",
    "Region": "runtime.postprocess",
    "StripStream": "runtime.tiler",
    "predict_tiled": "runtime.tiler",
    "parity_check": "runtime.backends.base",
    "calibrate": "runtime.calibration",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
