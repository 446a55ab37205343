"""AnoCLIP artifact exporter: ONNX graphs, text embeddings, manifest, TensorRT, Triton.

Public names load lazily (PEP 562) so ``import export`` alone does not import torch::

    from export import ExportConfig, export_artifact, add_class
    export_artifact(ExportConfig(backbone="ViT-B-16-plus-240", classes=["bottle"], out="art"))
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ExportConfig": "export.api",
    "export_artifact": "export.api",
    "add_class": "export.api",
    "AnoCLIPExportWrapper": "export.wrapper",
    "VerificationError": "export.verify",
    "ExportError": "export.onnx_export",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'export' has no attribute {name!r}")
