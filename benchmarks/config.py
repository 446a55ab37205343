"""``BenchConfig``: everything one benchmark run needs, typed, from the CLI to the library."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

# (a) reference-style pipeline, (b) the core's fused forward, (c) plain open_clip (the floor)
TORCH_CONTENDERS = ("reference", "core", "open_clip")
BASELINE = "open_clip"
# runtime contenders: "<backend>-<precision>"; GPU ones are listed as unavailable without a GPU.
# CPU: ONNX Runtime fp32 / dynamic int8 ("int8") / static calibrated QDQ int8 ("int8s"), and
# OpenVINO f32 / bf16 (hint; needs native bf16) / int8 (the static QDQ graph).
RUNTIME_CONTENDERS = (
    "ort-cpu-fp32", "ort-cpu-int8", "ort-cpu-int8s", "ort-cpu-bf16", "ort-cpu-fp16",
    "openvino-fp32", "openvino-bf16", "openvino-int8",
    "ort-cuda-fp32", "ort-cuda-fp16",
    "ort-trt-fp32", "ort-trt-fp16",
    "trt-fp16",
)
CPU_BACKENDS = ("ort-cpu-", "openvino-")
# contenders that run the static (calibrated QDQ) int8 graph, exported into a second artifact
STATIC_INT8_CONTENDERS = ("ort-cpu-int8s", "openvino-int8")
ALL_CONTENDERS = TORCH_CONTENDERS + RUNTIME_CONTENDERS
GROUPS = {
    "all": ALL_CONTENDERS,
    "torch": TORCH_CONTENDERS,
    "runtime": RUNTIME_CONTENDERS,
    "cpu": TORCH_CONTENDERS + tuple(c for c in RUNTIME_CONTENDERS if c.startswith(CPU_BACKENDS)),
    "gpu": tuple(c for c in RUNTIME_CONTENDERS if not c.startswith(CPU_BACKENDS)),
}
SECTIONS = ("latency", "throughput", "fidelity", "linescan", "tta", "fewshot")


class ConfigError(ValueError):
    """A benchmark setting that cannot work; the message says which and why."""


def parse_contenders(text: str | None) -> tuple[str, ...]:
    """Comma-separated names and groups (all, torch, runtime, cpu, gpu) -> ordered unique names."""
    if text is None or not text.strip():
        return ALL_CONTENDERS
    out: list[str] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        names = GROUPS.get(item, (item,))
        for name in names:
            if name not in ALL_CONTENDERS:
                raise ConfigError(
                    f"unknown contender {name!r}; choose from {', '.join(ALL_CONTENDERS)} "
                    f"or the groups {', '.join(GROUPS)}"
                )
            if name not in out:
                out.append(name)
    return tuple(out)


def parse_batch_sizes(text: str | None) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4); sorted, unique, all >= 1."""
    if text is None or not str(text).strip():
        raise ConfigError("--batch-sizes is empty")
    try:
        sizes = sorted({int(t) for t in str(text).split(",") if t.strip()})
    except ValueError:
        raise ConfigError(f"--batch-sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise ConfigError(f"batch sizes must be >= 1, got {text!r}")
    return tuple(sizes)


@dataclass(frozen=True)
class Effort:
    """How long to measure: warm-up calls, repeats and per-measurement time budgets (seconds).

    The timed loop stops at ``repeats`` calls or once ``budget_s`` is spent, never before
    ``min_repeats``. A throughput batch whose estimated call time exceeds ``max_call_s`` is
    skipped (and says so), so one slow contender cannot eat the run.
    """

    warmup: int
    latency_repeats: int
    latency_min_repeats: int
    latency_budget_s: float
    throughput_repeats: int
    throughput_min_repeats: int
    throughput_budget_s: float
    max_call_s: float
    fidelity_images: int
    tta_repeats: int
    linescan_repeats: int
    gemm_size: int
    gemm_repeats: int


# --quick: a few minutes for ViT-B-16-plus-240 on 2 quiet CPU cores (about 8 when they are busy)
QUICK = Effort(
    warmup=1, latency_repeats=20, latency_min_repeats=3, latency_budget_s=12.0,
    throughput_repeats=5, throughput_min_repeats=1, throughput_budget_s=8.0, max_call_s=12.0,
    fidelity_images=4, tta_repeats=5, linescan_repeats=1, gemm_size=1536, gemm_repeats=5,
)
FULL = Effort(
    warmup=3, latency_repeats=100, latency_min_repeats=10, latency_budget_s=60.0,
    throughput_repeats=20, throughput_min_repeats=3, throughput_budget_s=30.0, max_call_s=300.0,
    fidelity_images=16, tta_repeats=10, linescan_repeats=3, gemm_size=4096, gemm_repeats=10,
)


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run. ``command`` is the exact command line, written into the report."""

    backbone: str = "ViT-B-16-plus-240"
    pretrained: str = "none"
    image_size: int | None = None
    quick: bool = False
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    contenders: tuple[str, ...] = ALL_CONTENDERS
    sections: tuple[str, ...] = SECTIONS
    out: Path = Path("benchmarks/results/run")
    model_config: Path | None = None
    artifact: Path | None = None
    class_name: str = "bottle"
    device: str = "auto"
    threads: int | None = None
    linescan_size: tuple[int, int] = (1024, 16384)  # (height, width) of one line-scan strip
    seed: int = 0
    effort: Effort | None = None
    command: str = ""
    progress: bool = True
    text_cache: str | None = "default"

    def __post_init__(self) -> None:
        if self.image_size is not None and self.image_size < 1:
            raise ConfigError(f"--image-size must be positive, got {self.image_size}")
        for c in self.contenders:
            if c not in ALL_CONTENDERS:
                raise ConfigError(f"unknown contender {c!r}")
        for s in self.sections:
            if s not in SECTIONS:
                raise ConfigError(f"unknown section {s!r}; choose from {', '.join(SECTIONS)}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ConfigError(f"batch sizes must be >= 1, got {self.batch_sizes}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")

    @property
    def plan(self) -> Effort:
        """The measurement effort: explicit, else the quick or full preset."""
        return self.effort or (QUICK if self.quick else FULL)

    @property
    def runtime_contenders(self) -> tuple[str, ...]:
        return tuple(c for c in self.contenders if c in RUNTIME_CONTENDERS)

    @property
    def torch_contenders(self) -> tuple[str, ...]:
        return tuple(c for c in self.contenders if c in TORCH_CONTENDERS)

    def with_(self, **changes) -> BenchConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        d["model_config"] = str(self.model_config) if self.model_config else None
        d["artifact"] = str(self.artifact) if self.artifact else None
        d["effort"] = asdict(self.plan)
        d["batch_sizes"] = list(self.batch_sizes)
        d["contenders"] = list(self.contenders)
        d["sections"] = list(self.sections)
        d["linescan_size"] = list(self.linescan_size)
        return d


def default_batch_sizes(quick: bool) -> tuple[int, ...]:
    return (1, 2, 4) if quick else (1, 2, 4, 8, 16, 32)


__all__ = [
    "ALL_CONTENDERS",
    "BASELINE",
    "BenchConfig",
    "CPU_BACKENDS",
    "ConfigError",
    "Effort",
    "FULL",
    "GROUPS",
    "QUICK",
    "RUNTIME_CONTENDERS",
    "SECTIONS",
    "STATIC_INT8_CONTENDERS",
    "TORCH_CONTENDERS",
    "default_batch_sizes",
    "parse_batch_sizes",
    "parse_contenders",
]
