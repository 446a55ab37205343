"""The mixed-precision ceiling of an int8 contender: the rate its graph's FLOPs would run at if
every part ran at the measured GEMM peak of the precision it actually runs in.

An int8 graph is not int8 throughout: its Linear layers are (``INT8_PARTS``), while the
attention products (activation x activation), the patch embedding and, in the static graph, the
output projections (``anoclip.export.quantize.STATIC_KEPT_FLOAT``) stay float, and run in bf16
where OpenVINO's remainder hint says so (``float ops in bf16``), else in fp32. Charging the whole
graph at the int8 rate (the ``own_peak`` figure) asks those float FLOPs to run at a rate no
kernel offers them; this ceiling times each part at its own precision's peak:

    t = F_int8 / peak_int8 + F_float / peak_float,    ceiling = F_total / t

Both figures are reported; neither replaces the other.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: ``flops.flop_breakdown`` parts that every int8 graph of the exporter runs in int8 (its Linear layers).
INT8_PARTS = ("blocks.qkv", "blocks.out_proj", "blocks.mlp", "vv.out_proj")
#: The output projections: int8 in the dynamic graph, float in a static graph that records ``kept_float``.
PROJECTION_PART = "head.proj"


def int8_parts(quantization: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The breakdown parts this graph runs in int8, from its manifest ``quantization`` record."""
    q = quantization or {}
    kept = " ".join(q.get("kept_float") or [])
    return INT8_PARTS if "output projections" in kept else INT8_PARTS + (PROJECTION_PART,)


def float_precision(note: str) -> str:
    """The precision an int8 contender's float ops run in, from its backend note."""
    return "bf16" if "float ops in bf16" in (note or "") else "fp32"


def mixed_ceiling(breakdown: Mapping[str, int], parts: tuple[str, ...], int8_peak: float | None,
                  float_peak: float | None) -> float | None:
    """GFLOP/s of the whole graph at ``int8_peak`` for ``parts`` and ``float_peak`` for the rest
    (both GFLOP/s); None when a peak or the breakdown is missing."""
    if not breakdown or not int8_peak or not float_peak:
        return None
    unknown = [p for p in parts if p not in breakdown]
    if unknown:
        raise KeyError(f"FLOP breakdown has no part(s) {unknown}")
    f_int8 = sum(breakdown[p] for p in parts)
    f_float = sum(v for k, v in breakdown.items() if k not in parts)
    seconds = f_int8 / (int8_peak * 1e9) + f_float / (float_peak * 1e9)
    return (f_int8 + f_float) / seconds / 1e9


def contender_ceiling(entry: Mapping[str, Any], breakdown: Mapping[str, int], int8_peak: float | None,
                      bf16_peak: float | None, fp32_peak: float | None) -> dict[str, Any] | None:
    """``{gflops, float_precision, int8_share}`` for an int8 contender's results entry, else None."""
    if entry.get("precision") not in ("int8", "int8s"):
        return None
    info = entry.get("info") or {}
    parts = int8_parts(info.get("quantization"))
    precision = float_precision(info.get("note", ""))
    rate = mixed_ceiling(breakdown, parts, int8_peak, bf16_peak if precision == "bf16" else fp32_peak)
    if rate is None:
        return None
    total = sum(breakdown.values())
    return {"gflops": rate, "float_precision": precision,
            "int8_share": sum(breakdown[p] for p in parts) / total if total else None}
