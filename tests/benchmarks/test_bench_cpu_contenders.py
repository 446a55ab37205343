"""Every CPU contender in one run: ONNX Runtime fp32 / dynamic int8 / static int8 and OpenVINO
fp32 / bf16 / int8, measured with fidelity or listed with the reason they cannot run here.

No timing is asserted (a shared 2-core machine): only presence, reasons and fidelity bounds.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from anoclip.benchmarks.cli import main
from anoclip.benchmarks.config import GROUPS, Effort, parse_contenders
from anoclip.benchmarks.contenders import runtime_label, split_runtime_name
from anoclip.benchmarks.report import JSON_NAME, MD_NAME

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CPU_RUNTIME = ("ort-cpu-fp32", "ort-cpu-int8", "ort-cpu-int8s", "openvino-fp32", "openvino-bf16", "openvino-int8")
TINY_EFFORT = Effort(
    warmup=1, latency_repeats=2, latency_min_repeats=2, latency_budget_s=0.0,
    throughput_repeats=1, throughput_min_repeats=1, throughput_budget_s=0.0, max_call_s=60.0,
    fidelity_images=2, tta_repeats=1, linescan_repeats=1, gemm_size=128, gemm_repeats=2,
)


def test_cpu_group_lists_every_cpu_contender_and_gpu_none_of_them():
    cpu = parse_contenders("cpu")
    assert set(CPU_RUNTIME) <= set(cpu)
    assert not set(CPU_RUNTIME) & set(GROUPS["gpu"])
    assert split_runtime_name("ort-cpu-int8s") == ("ort-cpu", "int8s")
    assert split_runtime_name("openvino-bf16") == ("openvino", "bf16")
    assert runtime_label("ort-cpu-int8") == "(d) runtime, ONNX Runtime CPU EP, int8 dynamic"
    assert runtime_label("ort-cpu-int8s") == "(d) runtime, ONNX Runtime CPU EP, int8 static QDQ (calibrated)"
    assert runtime_label("openvino-fp32") == "(d) runtime, OpenVINO CPU, fp32"


def _bf16_cpu() -> bool:
    import openvino

    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@pytest.fixture(scope="module")
def cpu_run(register_tiny, text_cache, tmp_path_factory):
    """``anoclip-bench`` (quick, tiny model) with the core and every CPU runtime contender."""
    import anoclip.benchmarks.config as bc

    out = tmp_path_factory.mktemp("bench-cpu")
    mp = pytest.MonkeyPatch()
    mp.setattr(bc, "QUICK", TINY_EFFORT)
    mp.setenv("ANOCLIP_CACHE", str(text_cache))
    args = ["--backbone", register_tiny, "--pretrained", "none", "--quick", "--batch-sizes", "1",
            "--contenders", "core," + ",".join(CPU_RUNTIME), "--skip", "linescan,tta,throughput",
            "--model-config", str(CONFIGS), "--artifact", str(out / "artifact"), "--out", str(out / "report"),
            "--no-progress", "--device", "cpu"]
    try:
        main(args, standalone_mode=False)
    finally:
        mp.undo()
    return out


def test_every_cpu_contender_is_listed_measured_or_with_reason(cpu_run):
    data = json.loads((cpu_run / "report" / JSON_NAME).read_text())
    by = {e["name"]: e for e in data["contenders"]}
    assert set(CPU_RUNTIME) <= set(by)
    md = (cpu_run / "report" / MD_NAME).read_text()
    for name in ("ort-cpu-fp32", "ort-cpu-int8", "ort-cpu-int8s"):
        assert by[name]["available"], by[name].get("reason")
        assert by[name]["latency"]["p50_ms"] > 0
    have_ov = importlib.util.find_spec("openvino") is not None
    for name in ("openvino-fp32", "openvino-int8"):
        assert by[name]["available"] is have_ov, by[name].get("reason")
        if not have_ov:
            assert "not installed" in by[name]["reason"]
    if have_ov and not _bf16_cpu():
        assert not by["openvino-bf16"]["available"] and "native bf16" in by["openvino-bf16"]["reason"]
    for name in CPU_RUNTIME:
        assert f"`{name}`" in md
        if not by[name]["available"]:
            assert "unavailable:" in md
    assert (cpu_run / "artifact-int8-static" / "manifest.json").is_file()
    modes = {n: (by[n]["info"].get("quantization") or {}).get("mode") for n in by if by[n]["available"]}
    assert modes["ort-cpu-int8"] == "dynamic" and modes["ort-cpu-int8s"] == "static"  # each runs its own graph
    if have_ov:
        assert modes["openvino-int8"] == "static" and by["openvino-fp32"]["info"]["backend"] == "openvino"


def test_cpu_contenders_fidelity_against_the_fp32_core(cpu_run):
    data = json.loads((cpu_run / "report" / JSON_NAME).read_text())
    fid = data["fidelity"]["by_contender"]
    available = {e["name"] for e in data["contenders"] if e["available"]}
    for name in ("ort-cpu-fp32", "openvino-fp32"):
        if name in available:
            assert fid[name]["map_max_abs"] < 1e-4 and fid[name]["pearson"]["worst"] > 0.999, (name, fid[name])
    for name in ("ort-cpu-int8", "ort-cpu-int8s", "openvino-int8"):
        if name in available:
            f = fid[name]
            assert 0 < f["map_max_abs"] <= 5e-2, (name, f)  # quantised: not exact, within the int8 bound
    static = json.loads((cpu_run / "artifact-int8-static" / "manifest.json").read_text())
    calib = static["models"]["int8"]["quantization"]["calibration"]
    assert calib["source"] == "images" and calib["images"] == 8 and calib["folder"] == "good"
