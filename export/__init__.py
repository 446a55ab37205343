"""AnoCLIP artifact exporter: ONNX graphs, text embeddings, manifest, TensorRT, Triton.

Public names load lazily (PEP 562) so ``import export`` alone does not import torch::

    from export import ExportConfig, export_artifact, add_class
    export_artifact(ExportConfig(backbone="ViT-B-16-plus-240", classes=["bottle"], out="art"))
"""
from __future__ import annotations

from anoclip_core.lazy import lazy_getattr

_LAZY = {
    "ExportConfig": "export.api",
    "export_artifact": "export.api",
    "add_class": "export.api",
    "AnoCLIPExportWrapper": "export.wrapper",
    "VerificationError": "export.verify",
    "ExportError": "export.onnx_export",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY, globals())
