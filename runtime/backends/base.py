"""The one small interface every inference backend implements, and the parity checker.

Polygraphy-style: a backend is anything with ``name``, ``run(pixels, prototypes, outputs)`` and
``close()``. ``pixels`` is float32 ``[B, 3, S, S]`` (normalised), ``prototypes`` float32
``[C, 2, D]`` (L2-normalised normal/abnormal per class); ``run`` returns the requested graph
outputs (names from docs/ARCHITECTURE.md) as host numpy arrays. ``parity_check`` runs any two
backends on the same inputs and reports per-output errors: the first-class tool to trust a new
backend (or precision) against the fp32 ONNX Runtime CPU reference.

Torch-free: numpy only.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from anoclip_core.compare import diff, pearson
from anoclip_core.errors import ArtifactError, InputError

from ..contract import DEFAULT_OUTPUTS, INPUT_NAMES, OUTPUT_NAMES
from .onnx_info import Dim, read_graph_info

ALL_OUTPUTS = OUTPUT_NAMES


@runtime_checkable
class Backend(Protocol):
    """An inference engine for the exported graph (see module docstring)."""

    name: str

    def run(
        self, pixels: np.ndarray, prototypes: np.ndarray, outputs: Sequence[str] = DEFAULT_OUTPUTS
    ) -> dict[str, np.ndarray]:
        ...

    def close(self) -> None:
        ...


def check_outputs(outputs: Sequence[str]) -> tuple[str, ...]:
    """Validate requested output names (clear error naming the unknown one)."""
    outs = tuple(outputs)
    if not outs:
        raise InputError("no graph outputs requested")
    for name in outs:
        if name not in ALL_OUTPUTS:
            raise InputError(f"unknown graph output {name!r} (known: {', '.join(ALL_OUTPUTS)})")
    return outs


def check_inputs(pixels: Any, prototypes: Any) -> tuple[np.ndarray, np.ndarray]:
    """Shapes/dtypes of the two graph inputs -> contiguous float32 arrays."""
    px = np.ascontiguousarray(pixels, dtype=np.float32)
    pr = np.ascontiguousarray(prototypes, dtype=np.float32)
    if px.ndim != 4 or px.shape[1] != 3 or px.shape[2] != px.shape[3] or px.shape[0] < 1:
        raise InputError(f"pixels must be [B, 3, S, S] with B >= 1, got {list(px.shape)}")
    if pr.ndim != 3 or pr.shape[1] != 2 or pr.shape[0] < 1:
        raise InputError(f"text_prototypes must be [C, 2, D] with C >= 1, got {list(pr.shape)}")
    return px, pr

class BaseBackend:
    """What every backend shares (Polygraphy's runner pattern): ``run`` checks, ``run_impl`` runs.

    ``run`` validates the requested output names against the contract and the two inputs'
    shapes and dtypes once, and refuses outputs the loaded graph does not have (``output_names``,
    when the subclass sets it); ``run_impl`` gets contiguous float32 arrays and a tuple of names.
    """

    name: str = "backend"
    output_names: Sequence[str] | None = None

    def run(self, pixels: np.ndarray, prototypes: np.ndarray, outputs: Sequence[str] = DEFAULT_OUTPUTS
            ) -> dict[str, np.ndarray]:
        outs = check_outputs(outputs)
        px, pr = check_inputs(pixels, prototypes)
        if self.output_names is not None:
            missing = [o for o in outs if o not in self.output_names]
            if missing:
                raise ArtifactError(f"backend {self.name}: the graph has no output {missing[0]!r}")
        return self.run_impl(px, pr, outs)

    def run_impl(self, pixels: np.ndarray, prototypes: np.ndarray, outputs: tuple[str, ...]
                 ) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        """Release the engine's resources (a no-op unless the backend holds any)."""



def _fits(declared: Sequence[Dim], expected: Sequence[Dim]) -> bool:
    """Same rank, and every fixed size on both sides agrees (symbolic or unknown sizes fit anything)."""
    return len(declared) == len(expected) and all(
        not (isinstance(a, int) and isinstance(b, int)) or a == b for a, b in zip(declared, expected, strict=True))


def _show(dims: Sequence[Dim]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def check_graph(model_path: str | os.PathLike, artifact_dir: str | os.PathLike, manifest: Mapping[str, Any]) -> None:
    """Refuse, before an engine parses it, a graph that is not ONNX, keeps external data outside
    the artifact folder, or declares inputs other than ``pixels [B, 3, S, S]`` and
    ``text_prototypes [C, 2, D]`` with the manifest's ``image_size`` S and ``embed_dim`` D."""
    path = Path(model_path)
    info = read_graph_info(path)
    root = os.path.realpath(artifact_dir)
    for loc in info.external_locations:
        target = os.path.realpath(os.path.join(os.path.dirname(os.path.realpath(path)), loc))
        if os.path.isabs(loc) or os.path.commonpath([root, target]) != root:
            raise ArtifactError(f"{path.name}: external data {loc!r} lies outside the artifact folder {artifact_dir}")
    s, d = int(manifest["image_size"]), int(manifest["embed_dim"])
    expected: dict[str, list[Dim]] = {INPUT_NAMES[0]: ["B", 3, s, s], INPUT_NAMES[1]: ["C", 2, d]}
    if sorted(info.inputs) != sorted(expected):
        raise ArtifactError(f"{path.name} has inputs {sorted(info.inputs)}, expected {list(INPUT_NAMES)}")
    for name, want in expected.items():
        if not _fits(info.inputs[name], want):
            raise ArtifactError(f"{path.name} declares {name} {_show(info.inputs[name])} but the manifest "
                                f"(image_size {s}, embed_dim {d}) needs {_show(want)}")


@dataclass
class OutputDiff:
    shape: list[int]
    max_abs: float
    mean_abs: float
    tolerance: float
    passed: bool
    pearson: float | None = None  # of the two outputs, flattened (None on a shape mismatch)


@dataclass
class ParityReport:
    """Per-output differences between two backends on the same inputs."""

    a: str
    b: str
    batch: int
    outputs: dict[str, OutputDiff] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(d.passed for d in self.outputs.values())

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "batch": self.batch, "passed": self.passed,
                "outputs": {k: asdict(v) for k, v in self.outputs.items()}}

    def __str__(self) -> str:
        lines = [f"parity {self.a} vs {self.b} (batch {self.batch}): {'PASSED' if self.passed else 'FAILED'}"]
        for k, d in self.outputs.items():
            corr = "" if d.pearson is None else f" pearson={d.pearson:.6f}"
            lines.append(f"  {k:17s} max_abs={d.max_abs:.3g} mean_abs={d.mean_abs:.3g}{corr} tol={d.tolerance:g} "
                         f"{'ok' if d.passed else 'FAIL'}")
        return "\n".join(lines)


DEFAULT_TOLERANCE = {"patch_probs": 1e-4, "image_scores": 1e-5, "global_embedding": 1e-4,
                     "local_embeddings": 1e-4, "local_tokens": 1e-3}


def parity_check(
    a: Backend,
    b: Backend,
    pixels: np.ndarray,
    prototypes: np.ndarray,
    outputs: Sequence[str] = ALL_OUTPUTS,
    tolerance: float | Mapping[str, float] | None = None,
) -> ParityReport:
    """Run both backends on the same inputs; compare every requested output.

    ``tolerance``: one max-abs bound for all outputs, or per output name (defaults in
    ``DEFAULT_TOLERANCE``). A shape mismatch or a non-finite value fails that output.
    """
    outs = check_outputs(outputs)
    px, pr = check_inputs(pixels, prototypes)
    ra = a.run(px, pr, outs)
    rb = b.run(px, pr, outs)
    report = ParityReport(getattr(a, "name", type(a).__name__), getattr(b, "name", type(b).__name__), px.shape[0])
    for name in outs:
        if isinstance(tolerance, Mapping):
            tol = float(tolerance.get(name, DEFAULT_TOLERANCE[name]))
        elif tolerance is not None:
            tol = float(tolerance)
        else:
            tol = DEFAULT_TOLERANCE[name]
        d = diff(ra[name], rb[name])
        corr = pearson(ra[name], rb[name]) if d.finite else None
        report.outputs[name] = OutputDiff(
            list(d.shape), d.max_abs, d.mean_abs, tol, d.finite and d.max_abs <= tol, corr
        )
    return report
