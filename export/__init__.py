"""AnoCLIP artifact exporter: ONNX graphs, text embeddings, manifest, TensorRT, Triton.

Public names load lazily (PEP 562) so ``import export`` alone does not import torch::

    from anoclip.export import ExportConfig, export_artifact, add_class
    export_artifact(ExportConfig(backbone="ViT-B-16-plus-240", classes=["bottle"], out="art"))
"""
from __future__ import annotations

from anoclip_core.lazy import lazy_getattr

_LAZY = {
    "ExportConfig": "anoclip.export.api",
    "export_artifact": "anoclip.export.api",
    "add_class": "anoclip.export.api",
    "AnoCLIPExportWrapper": "anoclip.export.wrapper",
    "VerificationError": "anoclip.export.verify",
    "ExportError": "anoclip.export.onnx_export",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY, globals())
