"""Error types shared by the core, the exporter and the runtime.

Every error a user can cause by bad input is an ``AnoCLIPError``: a one-line message naming the
file, shape, class or manifest field at fault. CLIs print the message without a traceback.
This module imports nothing heavy so the torch-free runtime can use it.
"""
from __future__ import annotations


class AnoCLIPError(ValueError):
    """Bad input or configuration, with a message meant for the user."""


class InputError(AnoCLIPError):
    """An image, array or tensor that cannot be processed (shape, dtype, size, NaN, unreadable)."""


class ModelError(AnoCLIPError):
    """Unknown backbone, missing or mismatched weights, unsupported architecture."""


class DatasetError(AnoCLIPError):
    """A dataset folder that is missing or does not follow the expected layout."""


class ArtifactError(AnoCLIPError):
    """An export artifact that is incomplete, tampered with, or of an unsupported format."""


class BankError(ArtifactError):
    """A reference bank (few-shot) that is empty, corrupt, or does not match the model."""


class BackendUnavailable(AnoCLIPError):
    """A requested inference backend (CUDA, TensorRT, ...) is not available on this machine."""


class InferenceError(AnoCLIPError):
    """A graph output that cannot be used for one image (NaN or infinite score or map)."""
