"""The mixed-precision ceiling of int8 contenders: each part of the graph timed at the measured
peak of the precision it runs in (hand-computed figures)."""
from __future__ import annotations

import pytest

from anoclip.benchmarks.ceiling import (
    INT8_PARTS,
    PROJECTION_PART,
    contender_ceiling,
    float_precision,
    int8_parts,
    mixed_ceiling,
)

# 10 GFLOP: 8 in the blocks' Linear layers, 1 in attention, 1 in the output projections
BREAKDOWN = {"patch_embed": 0, "blocks.qkv": 6_000_000_000, "blocks.attention": 1_000_000_000,
             "blocks.out_proj": 1_000_000_000, "blocks.mlp": 1_000_000_000, "vv.attention": 0,
             "vv.out_proj": 0, "head.proj": 1_000_000_000}
STATIC = {"mode": "static", "kept_float": ["MatMul (output projections, global and local)"]}


def test_static_graph_keeps_the_projections_float_dynamic_quantises_them():
    assert int8_parts(STATIC) == INT8_PARTS and PROJECTION_PART not in INT8_PARTS
    assert int8_parts({"mode": "dynamic"}) == INT8_PARTS + (PROJECTION_PART,)
    assert int8_parts({"mode": "static"}) == INT8_PARTS + (PROJECTION_PART,)  # artifacts before kept_float
    assert int8_parts(None) == INT8_PARTS + (PROJECTION_PART,)


def test_ceiling_times_each_part_at_its_own_peak():
    # static: 8 GFLOP / 800 GOP/s = 10 ms, 2 GFLOP / 200 GFLOP/s = 10 ms -> 10 GFLOP in 20 ms = 500
    assert mixed_ceiling(BREAKDOWN, int8_parts(STATIC), 800.0, 200.0) == pytest.approx(500.0, rel=1e-12)
    # dynamic: 9 / 800 = 11.25 ms, 1 / 200 = 5 ms -> 10 GFLOP in 16.25 ms
    assert mixed_ceiling(BREAKDOWN, int8_parts(None), 800.0, 200.0) == pytest.approx(10 / 0.01625, rel=1e-12)
    assert mixed_ceiling(BREAKDOWN, INT8_PARTS, None, 200.0) is None
    assert mixed_ceiling({}, INT8_PARTS, 800.0, 200.0) is None
    with pytest.raises(KeyError, match="blocks.mlp"):
        mixed_ceiling({"blocks.qkv": 1}, INT8_PARTS, 800.0, 200.0)


def test_float_ops_run_in_bf16_only_where_openvino_says_so():
    assert float_precision("backend openvino, precision int8 (float ops in bf16)") == "bf16"
    assert float_precision("backend openvino, precision int8 (float ops in fp32)") == "fp32"
    assert float_precision("backend ort-cpu, precision int8 (static)") == "fp32"


def test_contender_ceiling_picks_the_float_peak_of_its_backend():
    ov = {"precision": "int8", "info": {"note": "precision int8 (float ops in bf16)", "quantization": STATIC}}
    ort = {"precision": "int8", "info": {"note": "backend ort-cpu, precision int8 (dynamic)",
                                         "quantization": {"mode": "dynamic"}}}
    got = contender_ceiling(ov, BREAKDOWN, 800.0, 200.0, 100.0)
    assert got == {"gflops": pytest.approx(500.0), "float_precision": "bf16", "int8_share": pytest.approx(0.8)}
    # fp32 remainder at 100: 9 / 800 + 1 / 100 = 21.25 ms
    got = contender_ceiling(ort, BREAKDOWN, 800.0, 200.0, 100.0)
    assert got == {"gflops": pytest.approx(10 / 0.02125), "float_precision": "fp32", "int8_share": pytest.approx(0.9)}
    assert contender_ceiling({"precision": "bf16", "info": {}}, BREAKDOWN, 800.0, 200.0, 100.0) is None


def test_headline_and_report_give_both_the_int8_and_the_mixed_fraction():
    from anoclip.benchmarks.report import _runtime_ratios
    from anoclip.benchmarks.runner import headline

    entry = {"name": "openvino-int8", "group": "runtime", "available": True, "precision": "int8",
             "info": {"note": "precision int8 (float ops in bf16)", "quantization": STATIC},
             "latency": {"p50_ms": 40.0, "samples_ms": [40.0]},
             "ratios": {"achieved_gflops_best": 250.0, "achieved_gflops_b1": 200.0, "peak_fraction_best": 1.0}}
    results = {"contenders": [entry], "flops": {"dual_breakdown": BREAKDOWN}, "hardware_limit": {"gflops": 100.0},
               "gemm_reduced": {"int8": {"gflops": 800.0}, "bf16": {"gflops": 200.0}}}
    r = headline(results)["runtime"]["openvino-int8"]
    assert r["own_peak_fraction_best"] == pytest.approx(250 / 800)  # everything charged at the int8 rate
    assert r["mixed_peak_fraction_best"] == pytest.approx(250 / 500)
    assert r["mixed_peak_fraction_b1"] == pytest.approx(200 / 500)
    text = _runtime_ratios(r)
    assert "31.2% of the int8 GEMM peak at its best batch" in text
    assert ("50.0% of its mixed-precision ceiling (500 GOP/s: its int8 Linear layers, 80.0% of the FLOPs, at the "
            "int8 peak, the rest at the bf16 peak; 40.0% at batch 1)") in text
