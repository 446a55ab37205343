"""End to end on the tiny model with a very quick effort: the report files and their content.

No timing is asserted: only that every figure is there and well-formed, that unavailable
contenders say why, and that the fp32 runtime agrees with the fp32 core as an exact export must.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from anoclip.benchmarks.cli import bench
from anoclip.benchmarks.config import BenchConfig, Effort
from anoclip.benchmarks.report import JSON_NAME, MD_NAME, PNG_NAME, write_report
from anoclip.benchmarks.runner import run_benchmark

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

TINY_EFFORT = Effort(
    warmup=1, latency_repeats=3, latency_min_repeats=2, latency_budget_s=0.0,
    throughput_repeats=2, throughput_min_repeats=1, throughput_budget_s=0.0, max_call_s=60.0,
    fidelity_images=2, tta_repeats=1, linescan_repeats=1, gemm_size=128, gemm_repeats=2,
)


@pytest.fixture(scope="module")
def tiny_run(register_tiny, text_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-report")
    cfg = BenchConfig(
        backbone=register_tiny,
        pretrained="none",
        batch_sizes=(1, 2),
        contenders=("reference", "core", "open_clip", "ort-cpu-fp32", "ort-cpu-bf16", "ort-cuda-fp32", "trt-fp16"),
        out=out,
        artifact=out / "artifact",
        effort=TINY_EFFORT,
        linescan_size=(64, 300),
        command="anoclip-bench --backbone anoclip-tiny --very-quick-test",
        progress=False,
        text_cache=str(text_cache),
        device="cpu",
    )
    results = run_benchmark(cfg)
    paths = write_report(results, out)
    return cfg, results, paths


def test_report_files_exist_with_command_and_versions(tiny_run):
    cfg, results, paths = tiny_run
    import onnxruntime
    import torch

    assert {p.name for p in paths.values()} == {JSON_NAME, MD_NAME, PNG_NAME}
    md = paths["markdown"].read_text()
    assert cfg.command in md
    assert f"torch {torch.__version__}" in md and f"onnxruntime {onnxruntime.__version__}" in md
    assert "RANDOM WEIGHTS" in md and "Shared machine" in md
    data = json.loads(paths["json"].read_text())
    assert data["command"] == cfg.command
    assert data["versions"]["torch"] == torch.__version__
    assert data["model"]["random_weights"] is True
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    h, w = matplotlib.image.imread(paths["png"]).shape[:2]
    assert h > 200 and w > 400


def test_every_contender_is_measured_or_says_why(tiny_run):
    _, results, paths = tiny_run
    by = {e["name"]: e for e in results["contenders"]}
    for name in ("reference", "core", "open_clip", "ort-cpu-fp32"):
        e = by[name]
        assert e["available"], e.get("reason")
        lat = e["latency"]
        assert lat["n"] == 2 and lat["p50_ms"] > 0 and lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"]
        assert set(e["throughput"]) == {"1", "2"} and e["throughput"]["2"]["img_s"] > 0
        assert e["memory"]["rss_peak_mb"] > 0 and e["first_call_s"] > 0
        assert e["ratios"]["peak_fraction_b1"] > 0
    assert by["open_clip"]["ratios"]["latency_p50_vs_open_clip"] == pytest.approx(1.0)
    assert by["reference"]["forwards_per_image"] == 23
    assert by["reference"]["gflops_per_image"] == pytest.approx(23 * by["core"]["gflops_per_image"])
    assert by["core"]["gflops_per_image"] > by["open_clip"]["gflops_per_image"]
    md = paths["markdown"].read_text()
    for name in ("ort-cpu-bf16", "ort-cuda-fp32", "trt-fp16"):
        if not by[name]["available"]:
            assert by[name]["reason"]
            assert f"`{name}`" in md and "unavailable:" in md


def test_flop_cross_check_and_gemm_limit(tiny_run):
    _, results, _ = tiny_run
    cnt = results["flops"]["counter"]
    assert cnt["dual_rel_diff"] == 0.0 and cnt["plain_rel_diff"] == 0.0
    assert results["hardware_limit"]["gflops"] > 0


def test_fp32_runtime_fidelity_vs_core(tiny_run):
    _, results, _ = tiny_run
    f = results["fidelity"]["by_contender"]["ort-cpu-fp32"]
    assert f["images"] == 2
    assert f["map_max_abs"] < 1e-4 and f["score_max_abs"] < 1e-4
    assert f["pearson"]["worst"] > 0.999
    assert f["top_iou"]["worst"] > 0.5
    assert f["prototype_max_abs"] < 1e-5


def test_linescan_and_tta_sections(tiny_run):
    _, results, _ = tiny_run
    ls = results["linescan"]
    assert "error" not in ls, ls
    assert ls["strip"] == {"height": 64, "width": 300} and ls["tiles_per_strip"] >= 5
    assert ls["strips_per_s"] > 0 and ls["map_shape"] == [64, 300]
    tta = results["tta"]
    assert tta["steps"] == 5 and tta["predict_tta_ms"]["n"] == 1
    assert math.isfinite(tta["overhead_ms_p50"])


def test_cli_quick_torch_only(register_tiny, text_cache, tmp_path, monkeypatch):
    """The console entry point: options -> BenchConfig -> report with the exact command."""
    import anoclip.benchmarks.config as bc

    monkeypatch.setattr(bc, "QUICK", TINY_EFFORT)
    monkeypatch.setenv("ANOCLIP_CACHE", str(text_cache))
    out = tmp_path / "cli"
    args = ["--backbone", register_tiny, "--pretrained", "none", "--quick", "--batch-sizes", "1,2",
            "--contenders", "core,open_clip", "--skip", "linescan,tta,fidelity", "--model-config", str(CONFIGS),
            "--out", str(out), "--no-progress", "--device", "cpu"]
    res = CliRunner().invoke(bench, args, prog_name="anoclip-bench", obj={"argv": args, "prog": "anoclip-bench"})
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    md = (out / MD_NAME).read_text()
    assert "anoclip-bench --backbone anoclip-tiny --pretrained none --quick --batch-sizes 1,2" in md
    data = json.loads((out / JSON_NAME).read_text())
    assert data["config"]["quick"] is True and data["config"]["contenders"] == ["core", "open_clip"]
    assert (out / PNG_NAME).is_file()


@pytest.mark.parametrize("args,message", [
    (["--contenders", "core,warp-drive"], "unknown contender"),
    (["--skip", "everything"], "unknown section"),
    (["--linescan-size", "2048"], "Invalid value for '--linescan-size': expected WIDTHxHEIGHT"),
    (["--linescan-size", "0x128"], "Invalid value for '--linescan-size': line-scan strip sides must be >= 2"),
    # 1e13 pixels: once failed with MemoryError in the report, after every other section had run
    (["--linescan-size", "99999999x99999"], "Invalid value for '--linescan-size': '99999999x99999' is "
                                            "9,999,899,900,001 pixels, over the 40,000,000"),
])
def test_cli_rejects_bad_options(tmp_path, args, message):
    """As the user sees it: exit status 2, the problem named on an error line, no traceback, nothing written."""
    res = subprocess.run([sys.executable, "-m", "anoclip.benchmarks.cli", *args, "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr and res.stderr.startswith("error: ")  # the one-line rule of every CLI
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert not (tmp_path / "out").exists()


def test_fewshot_section(tiny_run):
    _, results, paths = tiny_run
    fs = results["fewshot"]
    assert "error" not in fs, fs
    sizes = {name: v["bank_size"] for name, v in fs["variants"].items()}
    # tiny model: 8 x 8 = 64 patches per good image
    assert sizes == {"zero-shot": 0, "1-shot": 64, "4-shot": 256, "16-shot": 1024, "10k coreset": 10000}
    assert [fs["variants"][k]["shots"] for k in ("zero-shot", "1-shot", "4-shot", "16-shot")] == [0, 1, 4, 16]
    assert fs["variants"]["zero-shot"]["ratio_to_zero_shot"] == 1.0
    assert all(v["latency"]["n"] == fs["rounds"] >= 2 and v["ratio_to_zero_shot"] > 0 for v in fs["variants"].values())
    md = paths["markdown"].read_text()
    assert "## Few-shot reference bank cost" in md and "| 4-shot | 256 |" in md


def test_linescan_baseline_ratio_and_reduced_peaks_are_reported():
    """Issue 12: the strip figure is compared with ort-cpu-int8 in the same run; bf16/int8 peaks are measured."""
    from anoclip.benchmarks.report import _md_linescan
    from anoclip.benchmarks.runner import reduced_precision_peaks

    def strip(backend: str, per_s: float) -> dict:
        return {"strip": {"width": 16384, "height": 1024}, "call": "Detector.predict(strip, tile=True)",
                "backend": backend, "tiles_per_strip": 21, "tile": 1024, "overlap": 256, "tile_batch": 4,
                "strips_per_s": per_s, "seconds_per_strip": {"p50_ms": 1000.0 / per_s}, "tiles_per_s": 21 * per_s,
                "megapixels_per_s": 16.8 * per_s, "repeats": 1}

    text = "\n".join(
        _md_linescan({"linescan": strip("openvino-bf16", 0.6), "linescan_baseline": strip("ort-cpu-int8", 0.2)})
    )
    assert "runs the strip **3.00x faster** than `ort-cpu-int8` in this run (ratio of the medians)" in text
    paired = strip("openvino-int8", 0.6) | {"speedup_vs_baseline_paired": 2.5, "label": "openvino-int8 (2 streams)",
                                            "streams": 2, "speedup_vs_one_stream_paired": 1.2}
    one = strip("openvino-int8", 0.5)
    text = "\n".join(_md_linescan({"linescan": paired, "linescan_variants": [one, paired],
                                   "linescan_baseline": strip("ort-cpu-int8", 0.2)}))
    assert ("The fastest runtime contender by batch throughput, `openvino-int8 (2 streams)`, runs the strip "
            "**2.50x faster** than `ort-cpu-int8`") in text
    assert "(median of the per-round ratios)" in text
    assert "2 OpenVINO streams vs one, paired by round: **1.20x**" in text
    assert text.count("strips/s") == 3  # both variants and the baseline listed
    alone = "\n".join(_md_linescan({"linescan": strip("ort-cpu-int8", 0.4),
                                    "linescan_baseline": {"error": "the fastest is the baseline itself"}}))
    assert "timed interleaved" not in alone and "No baseline figure: the fastest is the baseline itself." in alone
    import importlib.util

    peaks = reduced_precision_peaks(64, 1)
    with_ov = importlib.util.find_spec("openvino") is not None
    expected = {"bf16", "int8", "int8_onnxruntime"} | ({"bf16_openvino", "int8_openvino"} if with_ov else set())
    assert set(peaks) == expected
    assert all(("gflops" in v and v["gflops"] > 0) or "error" in v or "skipped" in v for v in peaks.values())
    assert peaks["int8_onnxruntime"]["gflops"] > 0  # MLAS has int8 kernels on every x86 CPU


def test_peaks_of_what_the_cpu_lacks_are_not_timed_and_say_why():
    """An AVX2-only CPU: torch's bf16 / int8 matmuls ran at 0.9 / 1.7 GFLOP/s there (emulations), and
    OpenVINO's 'bf16' ran f32 under a bf16 label: none of them is a ceiling, so none is timed."""
    from anoclip.benchmarks.report import _reduced_peak_line
    from anoclip.benchmarks.runner import best_reduced_peak, reduced_precision_peaks
    from anoclip.runtime.cpu_features import CpuFeatures

    avx2 = reduced_precision_peaks(64, 1, features=CpuFeatures(frozenset({"avx2"}), "test"))
    for name in ("bf16", "int8") + (("bf16_openvino",) if "bf16_openvino" in avx2 else ()):
        assert set(avx2[name]) == {"skipped"}, name
    assert "no native bf16" in avx2["bf16"]["skipped"] and "VNNI / AMX" in avx2["int8"]["skipped"]
    assert avx2["int8_onnxruntime"]["gflops"] > 0
    assert best_reduced_peak(avx2, "bf16") is None and best_reduced_peak(avx2, "int8") > 0
    line = _reduced_peak_line("bf16", avx2["bf16"])
    assert line.startswith("- bf16 GEMM peak (torch on the CPU): not measured: this CPU has no native bf16")
    full = reduced_precision_peaks(64, 1, features=CpuFeatures(frozenset({"avx512_vnni", "avx512_bf16"}), "test"))
    assert not [k for k, v in full.items() if "skipped" in v]
    assert "ONNX Runtime's MatMulInteger" in _reduced_peak_line("int8_onnxruntime", full["int8_onnxruntime"])


def test_int8_peaks_are_in_integer_operations_and_bf16_in_flops():
    from anoclip.benchmarks.report import _reduced_peak_line

    peak = {"gflops": 257.0, "n": 1536, "calls": 5}
    assert _reduced_peak_line("int8_onnxruntime", peak).endswith("**257 GOP/s**")  # as the README writes it
    assert _reduced_peak_line("bf16_openvino", peak).endswith("**257 GFLOP/s**")


def test_a_fastest_contender_slower_on_the_strip_than_the_baseline_reads_as_slower():
    """Seen on an AVX2 EPYC: the best-throughput contender ran the strip 0.87x as fast as ort-cpu-int8, and
    the report called it 'The fastest ... 0.87x the speed of' (read: faster)."""
    from anoclip.benchmarks.report import _md_linescan

    def strip(backend: str, per_s: float) -> dict:
        return {"strip": {"width": 2048, "height": 256}, "call": "Detector.predict(strip, tile=True)",
                "backend": backend, "tiles_per_strip": 11, "tile": 256, "overlap": 64, "tile_batch": 4,
                "strips_per_s": per_s, "seconds_per_strip": {"p50_ms": 1000.0 / per_s}, "tiles_per_s": 11 * per_s,
                "megapixels_per_s": 0.5 * per_s, "repeats": 3}

    text = "\n".join(_md_linescan({"linescan": strip("ort-cpu-int8s", 8.0) | {"speedup_vs_baseline_paired": 0.8},
                                   "linescan_baseline": strip("ort-cpu-int8", 12.5)}))
    assert "runs the strip **1.25x slower** than `ort-cpu-int8`" in text and "0.80x" not in text


def test_a_ratio_below_one_reads_as_slower_not_as_a_fraction_faster():
    from anoclip.benchmarks.report import _isa, _runtime_ratios

    text = _runtime_ratios({"core_over_runtime_latency": 1.04, "ort_fp32_over_runtime_latency": 0.8})
    assert text == "**1.04x faster** than the core, 1.25x slower than `ort-cpu-fp32` at batch 1"  # 1 / 0.8
    assert _runtime_ratios({"core_over_runtime_latency": 0.5}) == "**2.00x slower** than the core at batch 1"
    assert _isa({"cpu_features": {"int8_dot": False, "native_bf16": None}}) == (
        "; int8 dot-product (VNNI / AMX): no; native bf16 (AVX512_BF16 / AMX): unknown")
    assert _isa({}) == ""


def test_a_precisions_peak_is_the_best_library_that_measured_it():
    from anoclip.benchmarks.runner import best_reduced_peak

    reduced = {"bf16": {"gflops": 2500.0}, "int8": {"gflops": 3000.0}, "bf16_openvino": {"gflops": 1400.0},
               "int8_openvino": {"gflops": 3500.0}}
    assert best_reduced_peak(reduced, "bf16") == 2500.0 and best_reduced_peak(reduced, "int8") == 3500.0
    assert best_reduced_peak({"bf16": {"error": "x"}, "int8_openvino": {"gflops": 9.0}}, "bf16") is None
    assert best_reduced_peak({}, "int8") is None


def test_key_ratios_name_only_what_was_measured():
    from anoclip.benchmarks.report import _runtime_ratios

    full = {"core_over_runtime_latency": 5.0, "ort_fp32_over_runtime_latency": 4.0,
            "runtime_over_core_throughput": 3.0, "runtime_over_open_clip_throughput": 2.0,
            "peak_fraction_best": 1.5, "own_peak": "int8", "own_peak_fraction_best": 0.5, "own_peak_fraction_b1": 0.25}
    assert _runtime_ratios(full) == (
        "**5.00x faster** than the core, 4.00x faster than `ort-cpu-fp32` at batch 1; throughput 3.00x the core's, "
        "2.00x plain open_clip's; 150.0% of the fp32 GEMM peak, 50.0% of the int8 GEMM peak at its best batch "
        "(25.0% at batch 1)")
    no_core = {"ort_fp32_over_runtime_latency": 2.0, "runtime_over_core_throughput": None,
               "runtime_over_open_clip_throughput": 1.5, "peak_fraction_best": 0.8}
    text = _runtime_ratios(no_core)
    assert "-" not in text.replace("ort-cpu-fp32", "") and "the core" not in text
    assert text == ("2.00x faster than `ort-cpu-fp32` at batch 1; throughput 1.50x plain open_clip's; "
                    "80.0% of the fp32 GEMM peak")
    assert _runtime_ratios({}) == "no ratio measured (its reference contenders did not run)"
