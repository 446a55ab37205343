"""``python -m anoclip.benchmarks.gpu_check``: the one GPU end-to-end command. Its logic runs here against fakes
(backends = ONNX Runtime CPU sessions, optionally perturbed); the real run is marked ``gpu``."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from anoclip.benchmarks import gpu_check as gc
from anoclip.runtime import contract as mf
from anoclip_core.errors import BackendUnavailable

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def _with_engine(artifact: Path, dst: Path) -> Path:
    """Copy of the session artifact with a (fake) TensorRT fp16 engine entry, hashes updated."""
    shutil.copytree(artifact, dst)
    (dst / "encoder.fp16.plan").write_bytes(b"PLAN")
    data = mf.read_manifest(dst)
    data["tensorrt"] = {"file": "encoder.fp16.plan", "precision": "fp16", "trt_version": "11.1.0", "gpu": "Fake GPU",
                        "profile": {"min": 1, "opt": 8, "max": 32}}
    data["files"] = mf.file_hashes(
        dst, sorted(p.name for p in dst.iterdir() if p.is_file() and p.name != mf.MANIFEST_NAME)
    )
    mf.write_manifest(dst, data)
    return dst


class Shifted:
    def __init__(self, base, delta: float) -> None:
        self.base, self.delta, self.name = base, delta, "shifted"

    def run(self, pixels, prototypes, outputs):
        return {k: v + self.delta for k, v in self.base.run(pixels, prototypes, outputs).items()}


def _factory(shift: dict[str, float] | None = None, broken: str | None = None):
    from anoclip.runtime.backends import create_backend

    def make(name, artifact, graph):
        if name == broken:
            raise BackendUnavailable(f"backend {name} needs a GPU (fake)")
        data = mf.read_manifest(artifact)
        precision = graph or data["tensorrt"]["precision"]  # the engine behaves like its precision's graph
        base = create_backend("ort-cpu", artifact, data, precision).backend
        return Shifted(base, (shift or {}).get(f"{name}/{graph}", 0.0))

    return make


def _run(artifact, tmp_path, **kw):
    art = _with_engine(artifact, tmp_path / "art")
    bench_calls = []
    bench_rc = kw.pop("bench_rc", 0)

    def bench(cfg, a):
        bench_calls.append(a)
        return bench_rc, cfg.out / "bench"

    lines: list[str] = []
    cfg = gc.CheckConfig(out=tmp_path / "out", batch=2)
    steps = gc.run_check(cfg, export_fn=kw.pop("export_fn", lambda c: art), bench_fn=bench,
                         backend_factory=_factory(**kw), say=lines.append)
    return steps, lines, bench_calls, cfg


def test_all_gpu_backends_checked_and_passing(artifact, tmp_path):
    steps, lines, bench_calls, cfg = _run(artifact, tmp_path)
    names = [st.name for st in steps]
    # artifact: fp32 + fp16 + int8 graphs and an fp16 engine -> trt + ort-cuda/ort-trt x {fp32, fp16}; int8 is CPU-only
    assert names == ["export --trt", "parity trt (engine fp16) vs ort-cpu",
                     "parity ort-cuda (fp32) vs ort-cpu", "parity ort-trt (fp32) vs ort-cpu",
                     "parity ort-cuda (fp16) vs ort-cpu", "parity ort-trt (fp16) vs ort-cpu", "benchmark"]
    assert all(st.passed for st in steps) and len(bench_calls) == 1
    assert lines[-1].startswith("GPU CHECK PASSED (5 parity checks, export and benchmark)")
    report = json.loads((cfg.out / "gpu_check.json").read_text())
    assert [s["passed"] for s in report["steps"]] == [True] * 7


def test_a_parity_miss_fails_the_check(artifact, tmp_path):
    steps, lines, _, _ = _run(artifact, tmp_path, shift={"ort-trt/fp16": 0.05})  # 5x the fp16 tolerance
    failed = [st.name for st in steps if not st.passed]
    assert failed == ["parity ort-trt (fp16) vs ort-cpu"]
    assert lines[-1] == "GPU CHECK FAILED: parity ort-trt (fp16) vs ort-cpu"


def test_fp32_tolerance_is_tight(artifact, tmp_path):
    steps, _, _, _ = _run(artifact, tmp_path, shift={"ort-cuda/fp32": 1e-3})  # fine for fp16, not for fp32
    assert [st.name for st in steps if not st.passed] == ["parity ort-cuda (fp32) vs ort-cpu"]


def test_a_backend_that_cannot_start_is_a_failure_not_a_skip(artifact, tmp_path):
    steps, lines, _, _ = _run(artifact, tmp_path, broken="trt")
    bad = [st for st in steps if not st.passed]
    assert [st.name for st in bad] == ["parity trt (engine fp16) vs ort-cpu"] and "needs a GPU" in bad[0].detail
    assert lines[-1].startswith("GPU CHECK FAILED")


def test_failed_export_stops_and_benchmark_failure_counts(artifact, tmp_path):
    def boom(cfg):
        raise BackendUnavailable("--trt needs a CUDA GPU, none is visible")

    steps, lines, bench_calls, _ = _run(artifact, tmp_path / "a", export_fn=boom)
    assert [(st.name, st.passed) for st in steps] == [("export --trt", False)] and not bench_calls
    assert "--trt needs a CUDA GPU" in lines[0]
    steps, lines, _, _ = _run(artifact, tmp_path / "b", bench_rc=1)
    assert lines[-1] == "GPU CHECK FAILED: benchmark"


def test_main_without_gpu_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setattr(gc, "cuda_available", lambda: "no CUDA GPU is visible to torch")
    assert gc.main(["--out", "unused"]) == 2
    assert capsys.readouterr().err.strip() == "error: the GPU check needs a CUDA GPU: no CUDA GPU is visible to torch"


@pytest.mark.gpu
def test_real_gpu_check(register_tiny, tmp_path):
    why = gc.cuda_available()
    try:
        import tensorrt  # noqa: F401
    except Exception as err:  # noqa: BLE001
        why = why or f"tensorrt not importable ({type(err).__name__})"
    if why:
        pytest.skip(f"the end-to-end GPU check needs a CUDA GPU and TensorRT: {why}")
    cfg = gc.CheckConfig(out=tmp_path, backbone=register_tiny, model_config=str(CONFIG_DIR), batch=2)
    steps = gc.run_check(cfg)
    assert all(st.passed for st in steps), [(st.name, st.detail) for st in steps if not st.passed]
    assert len(steps) == 7 and (tmp_path / "gpu_check.json").is_file()
