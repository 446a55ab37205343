"""One command that checks the whole GPU path on this machine: ``python -m anoclip.benchmarks.gpu_check``.

Steps, each printed as one ``[gpu-check]`` line, all recorded in ``OUT/gpu_check.json``:

1. export a (random-weight by default) artifact with ``--precision fp32,fp16 --trt``; with
   ``--trt-precision int8``: ``--precision fp32,int8 --int8-mode static --trt --trt-precision int8``
   (seeded random calibration: the check is about the engine path, not about real data);
2. parity of every GPU backend against ``ort-cpu`` on the fp32 graph, same random inputs:
   native ``trt`` (the engine's precision) and ``ort-cuda`` / ``ort-trt`` on every exported graph,
   on ``patch_probs`` and ``image_scores`` with the tolerance of the backend's precision
   (``TOLERANCE``); a GPU backend that does not start is a failure, not a skip;
3. the GPU benchmark (``python -m anoclip.benchmarks --artifact OUT/artifact --device cuda``), report in ``OUT/bench``.

Exit status 0 and a last line ``GPU CHECK PASSED ...`` when every step passed, else 1 and
``GPU CHECK FAILED: <steps>``; ``error: <one line>`` and exit 2 when there is nothing to check
(no CUDA GPU, bad option).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PARITY_OUTPUTS = ("patch_probs", "image_scores")
TOLERANCE = {  # max-abs on probabilities; fp32 = runtime.backends.base.DEFAULT_TOLERANCE
    "fp32": {"patch_probs": 1e-4, "image_scores": 1e-5},
    "fp16": {"patch_probs": 1e-2, "image_scores": 1e-2},
    "bf16": {"patch_probs": 3e-2, "image_scores": 3e-2},
    "int8": {"patch_probs": 5e-2, "image_scores": 5e-2},  # = export.verify.TOLERANCES["int8"] map / score
}
GRAPH_BACKENDS = ("ort-cuda", "ort-trt")
GRAPH_PRECISIONS = ("fp32", "fp16", "bf16")  # int8 graphs are CPU graphs; only the int8 engine is checked


@dataclass
class CheckConfig:
    out: Path
    backbone: str = "ViT-B-16-plus-240"
    pretrained: str = "none"
    classes: Sequence[str] = ("bottle",)
    precisions: Sequence[str] = ("fp32", "fp16")
    batch: int = 4
    quick_bench: bool = True
    seed: int = 0
    model_config: str | None = None  # extra open_clip config folder (tests' tiny backbone)
    trt_precision: str | None = None  # engine precision; "int8" exports the static QDQ graph for it


@dataclass
class Step:
    name: str
    passed: bool
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


def default_export(cfg: CheckConfig) -> Path:
    from anoclip.export.api import ExportConfig, export_artifact

    int8 = cfg.trt_precision == "int8"
    precisions = ["fp32", "int8"] if int8 else list(cfg.precisions)
    return export_artifact(ExportConfig(
        backbone=cfg.backbone, classes=list(cfg.classes),
        pretrained=None if cfg.pretrained.lower() in ("none", "random") else cfg.pretrained,
        precisions=precisions, int8_mode="static" if int8 else "dynamic", trt=True, trt_precision=cfg.trt_precision,
        out=cfg.out / "artifact", force=True, progress=False, model_config=cfg.model_config))


def default_bench(cfg: CheckConfig, artifact: Path) -> tuple[int, Path]:
    out = cfg.out / "bench"
    cmd = [sys.executable, "-m", "benchmarks", "--backbone", cfg.backbone, "--pretrained", cfg.pretrained,
           "--artifact", str(artifact), "--device", "cuda", "--out", str(out), "--no-progress"]
    cmd += ["--model-config", str(cfg.model_config)] if cfg.model_config else []
    return subprocess.run(cmd + (["--quick"] if cfg.quick_bench else []), check=False).returncode, out


def default_backend(name: str, artifact: Path, precision: str | None) -> Any:
    from anoclip.runtime.backends import create_backend
    from anoclip.runtime.contract import read_manifest

    return create_backend(name, artifact, read_manifest(artifact), precision).backend


def parity_plan(manifest: dict[str, Any]) -> list[tuple[str, str | None, str]]:
    """(backend, graph precision or None for the engine, tolerance precision) for every GPU backend."""
    plan: list[tuple[str, str | None, str]] = []
    if manifest.get("tensorrt"):
        plan.append(("trt", None, manifest["tensorrt"]["precision"]))
    for precision in manifest.get("models", {}):
        if precision in GRAPH_PRECISIONS:
            plan += [(name, precision, precision) for name in GRAPH_BACKENDS]
    return plan


def check_parity(artifact: Path, manifest: dict[str, Any], cfg: CheckConfig,
                 backend_factory: Callable[[str, Path, str | None], Any]) -> list[Step]:
    """Every GPU backend of ``parity_plan`` against ort-cpu (fp32 graph) on the same inputs."""
    from anoclip.runtime.backends import parity_check
    from anoclip.runtime.detector import Detector

    ref = Detector.load(artifact, backend="ort-cpu", precision="fp32")
    s = int(manifest["image_size"])
    px = np.random.default_rng(cfg.seed).standard_normal((cfg.batch, 3, s, s)).astype(np.float32)
    protos = ref.prototypes(ref.classes[0])
    steps = []
    for name, graph, tol_precision in parity_plan(manifest):
        label = f"parity {name} ({graph or 'engine ' + tol_precision}) vs ort-cpu"
        try:
            backend = backend_factory(name, artifact, graph)
            report = parity_check(ref.backend, backend, px, protos, PARITY_OUTPUTS, TOLERANCE[tol_precision])
        except Exception as err:  # noqa: BLE001 - a GPU backend that cannot run fails the check
            steps.append(Step(label, False, f"{type(err).__name__}: {str(err).splitlines()[0]}"))
            continue
        detail = "; ".join(f"{k} max_abs={d.max_abs:.3g} tol={d.tolerance:g}" for k, d in report.outputs.items())
        steps.append(Step(label, report.passed, detail, report.to_dict()))
    return steps


def run_check(cfg: CheckConfig, export_fn: Callable = default_export, bench_fn: Callable = default_bench,
              backend_factory: Callable = default_backend, say: Callable[[str], None] = print) -> list[Step]:
    """Export, parity, benchmark; a failed export stops the rest. Writes OUT/gpu_check.json."""
    from anoclip.runtime.contract import read_manifest

    cfg.out.mkdir(parents=True, exist_ok=True)
    steps: list[Step] = []
    try:
        artifact = Path(export_fn(cfg))
        manifest = read_manifest(artifact)
        t = manifest.get("tensorrt") or {}
        steps.append(Step("export --trt", bool(t), f"artifact={artifact} engine={t.get('file')} "
                          f"({t.get('precision')}, TensorRT {t.get('trt_version')}, {t.get('gpu')})"))
    except Exception as err:  # noqa: BLE001
        steps.append(Step("export --trt", False, f"{type(err).__name__}: {str(err).splitlines()[0]}"))
    if steps[0].passed:
        steps += check_parity(artifact, manifest, cfg, backend_factory)
        code, bench_out = bench_fn(cfg, artifact)
        steps.append(Step("benchmark", code == 0, f"exit {code}, report {bench_out / 'report.md'}"))
    for st in steps:
        say(f"[gpu-check] {st.name}: {'PASSED' if st.passed else 'FAILED'}  {st.detail}")
    report = cfg.out / "gpu_check.json"
    report.write_text(json.dumps({"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
                                  "steps": [asdict(st) for st in steps]}, indent=2, default=list))
    failed = [st.name for st in steps if not st.passed]
    say(f"GPU CHECK FAILED: {', '.join(failed)}" if failed
        else f"GPU CHECK PASSED ({len(steps) - 2} parity checks, export and benchmark) -> {report}")
    return steps


def cuda_available() -> str | None:
    """None when a CUDA GPU is usable, else why not."""
    try:
        import torch
    except ImportError as err:
        return f"torch is not importable ({err})"
    return None if torch.cuda.is_available() else "no CUDA GPU is visible to torch"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m anoclip.benchmarks.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("gpu-check"))
    p.add_argument("--backbone", default="ViT-B-16-plus-240")
    p.add_argument("--pretrained", default="none")
    p.add_argument("--classes", default="bottle")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--model-config", default=None, help="extra open_clip model-config folder")
    p.add_argument("--full-bench", action="store_true", help="full benchmark instead of --quick")
    p.add_argument("--trt-precision", choices=sorted(TOLERANCE), default=None,
                   help="engine precision (default: fp16 from the fp16 graph); int8: the static QDQ graph's engine")
    args = p.parse_args(argv)
    why = cuda_available()
    if why:
        print(f"error: the GPU check needs a CUDA GPU: {why}", file=sys.stderr)
        return 2
    cfg = CheckConfig(out=args.out, backbone=args.backbone, pretrained=args.pretrained,
                      classes=[c for c in args.classes.split(",") if c], batch=args.batch,
                      quick_bench=not args.full_bench, model_config=args.model_config,
                      trt_precision=args.trt_precision)
    steps = run_check(cfg)
    return 0 if all(st.passed for st in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
