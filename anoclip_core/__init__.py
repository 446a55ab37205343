"""AnoCLIP / AnoCLIP+ zero-shot anomaly localization in PyTorch.

Public names load lazily so that the torch-free modules (``transform``, ``errors``, ``metrics``)
can be imported by the runtime without importing torch.
"""
from __future__ import annotations

import importlib
from typing import Any

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


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'anoclip_core' has no attribute {name!r}")
