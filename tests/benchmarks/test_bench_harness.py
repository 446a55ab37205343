"""Harness logic without models: config parsing, interleaving, skipping, ratios, report writing."""
from __future__ import annotations

import json

import numpy as np
import pytest

from anoclip.benchmarks.config import (
    ALL_CONTENDERS,
    QUICK,
    BenchConfig,
    ConfigError,
    Effort,
    parse_batch_sizes,
    parse_contenders,
)
from anoclip.benchmarks.contenders import Contender
from anoclip.benchmarks.report import markdown, write_report
from anoclip.benchmarks.runner import derive_ratios, headline, interleaved_samples, prepare_contender

FAST = Effort(
    warmup=2, latency_repeats=3, latency_min_repeats=2, latency_budget_s=0.0,
    throughput_repeats=2, throughput_min_repeats=1, throughput_budget_s=0.0, max_call_s=1e9,
    fidelity_images=2, tta_repeats=1, linescan_repeats=1, gemm_size=64, gemm_repeats=1,
)


def test_parse_contenders_groups_and_order():
    assert parse_contenders(None) == ALL_CONTENDERS
    assert parse_contenders("core,open_clip,core") == ("core", "open_clip")
    cpu = parse_contenders("cpu")
    assert "ort-cpu-int8" in cpu and "reference" in cpu and not any("cuda" in c or "trt" in c for c in cpu)
    with pytest.raises(ConfigError, match="unknown contender 'nope'"):
        parse_contenders("core,nope")


def test_parse_batch_sizes():
    assert parse_batch_sizes("4,1,2,2") == (1, 2, 4)
    for bad in ("", "0,1", "a,b"):
        with pytest.raises(ConfigError):
            parse_batch_sizes(bad)


def test_bench_config_validation_and_plan():
    cfg = BenchConfig(quick=True)
    assert cfg.plan == QUICK
    assert BenchConfig(effort=FAST).plan == FAST
    with pytest.raises(ConfigError):
        BenchConfig(sections=("latency", "nope"))
    with pytest.raises(ConfigError):
        BenchConfig(batch_sizes=(0,))
    with pytest.raises(ConfigError):
        BenchConfig(device="tpu")
    d = BenchConfig(contenders=("core", "ort-cpu-fp32")).to_dict()
    assert json.loads(json.dumps(d))["contenders"] == ["core", "ort-cpu-fp32"]


def fake(name: str, log: list[str]) -> Contender:
    def call(px, pt):
        log.append(f"{name}:{px.shape[0]}")

    return Contender(name, f"fake {name}", "torch", "cpu", "fp32", call=call)


def test_interleaved_rounds_and_stop_rules():
    log: list[str] = []
    a, b = fake("a", log), fake("b", log)
    x = np.zeros((1, 3, 4, 4), np.float32)
    out = interleaved_samples([a, b], x, x, {}, repeats=3, budget_s=1e9, min_repeats=1)
    # one call of each per round, the order rotating from round to round
    assert log == ["a:1", "b:1", "b:1", "a:1", "a:1", "b:1"]
    assert len(out["a"]) == len(out["b"]) == 3
    log.clear()
    out = interleaved_samples([a, b], x, x, {}, repeats=10, budget_s=0.0, min_repeats=2)
    assert len(out["a"]) == len(out["b"]) == 2 and len(log) == 4


def test_prepare_skips_batches_it_cannot_or_should_not_run():
    log: list[str] = []
    c = fake("a", log)
    px = np.zeros((2, 3, 4, 4), np.float32)
    cfg = BenchConfig(batch_sizes=(1, 2, 4), effort=FAST)
    prep = prepare_contender(c, px, px, cfg)
    assert log == ["a:1", "a:1", "a:2"]  # first call, one more warm-up, one warm-up at batch 2
    assert set(prep["warm_s"]) == {"1", "2"}
    assert "only 2 input images" in prep["skipped"]["4"]
    assert prep["memory"]["rss_peak_mb"] >= prep["memory"]["rss_start_mb"] > 0
    log.clear()
    slow = BenchConfig(batch_sizes=(1, 2), effort=Effort(**{**FAST.__dict__, "max_call_s": 0.0}))
    prep = prepare_contender(c, px, px, slow)
    assert "limit of this effort" in prep["skipped"]["2"] and log == ["a:1", "a:1"]


def _entry(name, lat_ms, b2_ms, gflops, group="torch"):
    """Samples in round order: latency at batch 1 and calls at batch 2 (ms)."""
    p50 = float(np.median(lat_ms))
    return {"name": name, "label": name, "group": group, "device": "cpu", "precision": "fp32", "available": True,
            "gflops_per_image": gflops,
            "latency": {"p50_ms": p50, "p90_ms": max(lat_ms), "p99_ms": max(lat_ms), "n": len(lat_ms),
                        "samples_ms": list(lat_ms)},
            "throughput": {"1": {"img_s": 1000.0 / p50},
                           "2": {"img_s": 2000.0 / float(np.median(b2_ms)), "samples_ms": list(b2_ms)}}}


def synthetic_results() -> dict:
    return {
        "command": "anoclip-bench --backbone X --quick",
        "config": {"batch_sizes": [1, 2], "quick": True, "effort": {"warmup": 1}},
        "machine": {"cpu": "Test CPU", "cpu_count": {"usable": 2}, "gpu": None,
                    "load_average_start": [1.0, 1.0, 1.0], "load_average_end": [2.0, 1.0, 1.0]},
        "versions": {"python": "3.x", "torch": "9.9.9-test"},
        "model": {"backbone": "X", "image_size": 64, "random_weights": True},
        "device": "cpu",
        "hardware_limit": {"gflops": 100.0, "spread": 0.1, "what": "fp32 GEMM"},
        "contenders": [
            # round 2 was hit by a burst of load (every contender 3x slower in that round)
            _entry("open_clip", [10.0, 30.0, 10.0], [12.5, 12.5], 1.0),
            _entry("core", [12.0, 36.0, 12.0], [16.0, 16.0], 1.2),
            _entry("ort-cpu-fp32", [5.0, 15.0, 5.0, 5.0, 5.0], [5.0, 5.0], 1.2, group="runtime"),
            {"name": "ort-cuda-fp32", "label": "cuda", "group": "runtime", "device": "?", "precision": "fp32",
             "available": False, "reason": "no CUDA here", "gflops_per_image": 1.2},
        ],
        "notes": [],
    }


def test_paired_ratio_cancels_a_burst():
    from anoclip.benchmarks.stats import paired_ratio

    a = [10.0, 100.0, 10.0, 10.0, 10.0]
    b = [20.0, 200.0]  # the same burst in round 2; b (slow) stopped after two rounds
    assert paired_ratio(a, b) == pytest.approx(0.5)  # the ratio of the medians would say 10 / 110
    assert paired_ratio([], b) is None


def test_derive_ratios_by_hand():
    res = synthetic_results()
    derive_ratios(res)
    r = {e["name"]: e.get("ratios") for e in res["contenders"]}
    assert r["open_clip"]["latency_vs_open_clip"] == pytest.approx(1.0)
    assert r["core"]["latency_vs_open_clip"] == pytest.approx(1.2)
    assert r["core"]["throughput_vs_open_clip"] == {"1": pytest.approx(1 / 1.2), "2": pytest.approx(12.5 / 16)}
    assert r["ort-cpu-fp32"]["latency_vs_open_clip"] == pytest.approx(0.5)  # rounds 1-3 paired
    assert r["ort-cpu-fp32"]["best_batch"] == 2  # 400 img/s at batch 2 > 200 at batch 1
    assert r["ort-cpu-fp32"]["best_throughput_vs_open_clip"] == pytest.approx(12.5 / 5)
    # 1.2 GFLOPs at 5 ms = 240 GFLOP/s at batch 1; at 400 img/s = 480 GFLOP/s; peak 100
    assert r["ort-cpu-fp32"]["achieved_gflops_b1"] == pytest.approx(240.0)
    assert r["ort-cpu-fp32"]["peak_fraction_best"] == pytest.approx(4.8)
    assert r["ort-cuda-fp32"] is None
    h = headline(res)
    assert h["core_over_open_clip_latency"] == pytest.approx(1.2)
    assert h["runtime"]["ort-cpu-fp32"]["core_over_runtime_latency"] == pytest.approx(12 / 5)
    assert h["runtime"]["ort-cpu-fp32"]["runtime_over_core_throughput"] == pytest.approx(16 / 5)
    assert h["reference_over_core_latency"] is None


def test_report_files_from_synthetic_results(tmp_path):
    res = synthetic_results()
    derive_ratios(res)
    paths = write_report(res, tmp_path / "out")
    md = paths["markdown"].read_text()
    assert "anoclip-bench --backbone X --quick" in md
    assert "torch 9.9.9-test" in md
    assert "RANDOM WEIGHTS" in md and "Shared machine" in md
    assert "unavailable: no CUDA here" in md
    assert "| `core` | fp32 | 12.00 |" in md and "| 1.20x |" in md
    assert json.loads(paths["json"].read_text())["command"] == res["command"]
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "latency_vs_batch.png" in md


def test_markdown_without_measurements_says_so():
    res = synthetic_results()
    res["contenders"] = []
    md = markdown(res, png_name=None)
    assert "Not measured" in md and "![" not in md


def test_reused_artifact_must_match_the_benchmark():
    from anoclip.benchmarks.runner import check_artifact_matches

    cfg = BenchConfig(backbone="ViT-B-16-plus-240")
    good = {"backbone": "ViT-B-16-plus-240", "image_size": 240, "pretrained": {"random_weights": True}}
    check_artifact_matches(good, cfg, 240, random_weights=True)
    with pytest.raises(RuntimeError, match="backbone ViT-B-16 != ViT-B-16-plus-240"):
        check_artifact_matches({**good, "backbone": "ViT-B-16"}, cfg, 240, True)
    with pytest.raises(RuntimeError, match="image size 240 != 320"):
        check_artifact_matches(good, cfg, 320, True)
    with pytest.raises(RuntimeError, match="random_weights"):
        check_artifact_matches(good, cfg, 240, False, "laion400m_e32")
    tagged = {**good, "pretrained": {"random_weights": False, "source": "laion400m_e31"}}
    with pytest.raises(RuntimeError, match="weights laion400m_e31 != laion400m_e32"):
        check_artifact_matches(tagged, cfg, 240, False, "laion400m_e32")


def test_artifact_precisions_follow_the_contenders():
    from anoclip.benchmarks.runner import artifact_precisions

    assert artifact_precisions(("core", "ort-cpu-fp32")) == ["fp32"]
    assert artifact_precisions(("ort-cpu-int8", "ort-cuda-fp16", "trt-fp16", "ort-cpu-bf16")) == \
        ["fp32", "int8", "fp16", "bf16"]
