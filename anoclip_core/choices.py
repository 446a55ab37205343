"""Every user-facing choice and default, in one torch-free place.

The CLIs, the libraries and the manifest read their option values from here (anomalib's deploy
style: a ``str`` Enum per choice), so adding a precision or an exporter is one edit.
"""
from __future__ import annotations

from enum import Enum

from .prompt_grammar import DOMAINS, SENTENCES_PER_STATE

__all__ = [
    "DEFAULT_OPSET", "DEFAULT_TRT_PROFILE", "DOMAINS", "MAX_OPSET", "MIN_OPSET", "SENTENCES_PER_STATE",
    "Exporter", "Int8Mode", "Precision", "TRT_PRECISIONS", "values",
]


class Precision(str, Enum):
    """Graph precisions an artifact can hold (fp32 is always written: the reference)."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"


class Int8Mode(str, Enum):
    """int8 quantization: dynamic (no calibration) or static QDQ (calibrated on good images)."""

    DYNAMIC = "dynamic"
    STATIC = "static"


class Exporter(str, Enum):
    """torch.onnx exporter used for the fp32 graph."""

    DYNAMO = "dynamo"
    LEGACY = "legacy"


TRT_PRECISIONS: tuple[str, ...] = (Precision.FP32.value, Precision.FP16.value, Precision.BF16.value,
                                   Precision.INT8.value)  # int8: from the static QDQ graph only
DEFAULT_OPSET = 18
MIN_OPSET, MAX_OPSET = 17, 23  # LayerNormalization needs 17
DEFAULT_TRT_PROFILE: tuple[int, int, int] = (1, 8, 32)  # TensorRT / ORT-TRT batch profile min, opt, max


def values(choice: type[Enum]) -> tuple[str, ...]:
    """The string values of a choice Enum, in declaration order (for click.Choice and messages)."""
    return tuple(str(member.value) for member in choice)
