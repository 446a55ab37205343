"""AnoCLIP / AnoCLIP+ zero-shot anomaly localization in PyTorch.

Public names load lazily so that the torch-free modules (``transform``, ``errors``, ``metrics``)
can be imported by the runtime without importing torch.
"""
from __future__ import annotations

from .lazy import lazy_getattr

__version__ = "0.1.0"

_LAZY = {
    "AnoCLIP": "anoclip_core.model",
    "WeightsInfo": "anoclip_core.model",
    "register_model_configs": "anoclip_core.model",
    "DualPathEncoder": "anoclip_core.encoder",
    "TTAConfig": "anoclip_core.tta",
    "adapt_tokens": "anoclip_core.tta",
    "state_sentences": "anoclip_core.prompts",
    "PreprocessConfig": "anoclip_core.transform",
    "preprocess": "anoclip_core.transform",
    "AnoCLIPError": "anoclip_core.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


__getattr__ = lazy_getattr(__name__, _LAZY, globals())
