"""Triton Inference Server model repository (``--triton DIR``).

Layout::

    DIR/<name>/config.pbtxt
    DIR/<name>/classes.txt          class order of the C axis (label file of image_scores)
    DIR/<name>/1/model.onnx         (+ model.onnx.data)   platform onnxruntime_onnx
    DIR/<name>/1/model.plan         with --trt             platform tensorrt_plan

Triton's dynamic batcher concatenates requests along dim 0 of EVERY input, so the artifact
graph's ``text_prototypes [C, 2, D]`` (not batched) cannot be a Triton input. The Triton model
is therefore the same graph with the artifact's prototypes (all classes, sorted, as in
``classes.txt``) folded in as a constant: one input ``pixels [-1, 3, S, S]``, the five outputs
with ``C`` fixed. Re-run the export (or ``write_repository``) after ``add-class``.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from anoclip.runtime.contract import INPUT_NAMES, OUTPUT_NAMES
from anoclip_core.errors import AnoCLIPError
from anoclip_core.fileio import swap_dir

from .onnx_export import TWO_GB, save_onnx

DEFAULT_MODEL_NAME = "anoclip"
DEFAULT_MAX_BATCH = 32


def max_batch_size(trt_profile: Sequence[int] | None, requested: int | None = None) -> int:
    """Triton ``max_batch_size``: with a TensorRT plan, the engine profile's max, because Triton's
    tensorrt backend refuses a config whose max batch exceeds the engine's (tensorrt_backend
    src/model_state.cc: "configuration specified max-batch N but TensorRT engine only supports
    max-batch M"); the dynamic batcher forms batches from 1 up, which an engine whose profile min
    is above 1 rejects, so the min must be 1. Without a plan, ``requested`` or 32."""
    if trt_profile is None:
        size = DEFAULT_MAX_BATCH if requested is None else int(requested)
        if size < 1:
            raise AnoCLIPError(f"Triton max_batch_size must be >= 1, got {size}")
        return size
    bmin, _, bmax = (int(v) for v in trt_profile)
    if bmin != 1:
        raise AnoCLIPError(
            f"--triton with --trt needs --trt-profile min = 1 (Triton sends batches of 1 and up), got {bmin}"
        )
    if requested is not None and not 1 <= int(requested) <= bmax:
        raise AnoCLIPError(f"Triton max_batch_size {requested} must be in [1, {bmax}] (the TensorRT profile max)")
    return bmax if requested is None else int(requested)


def fold_prototypes(src: str | os.PathLike, dst: str | os.PathLike, prototypes: np.ndarray,
                    external_data_threshold: int = TWO_GB) -> list[str]:
    """Copy of graph ``src`` with input ``text_prototypes`` replaced by a constant [C, 2, D]."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src), load_external_data=True)
    name = INPUT_NAMES[1]
    keep = [i for i in model.graph.input if i.name != name]
    if len(keep) == len(model.graph.input):
        raise AnoCLIPError(f"{src} has no input {name!r} to fold")
    del model.graph.input[:]
    model.graph.input.extend(keep)
    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(prototypes, dtype=np.float32), name))
    c = int(prototypes.shape[0])
    for out in model.graph.output:  # C is now static
        if out.name in ("patch_probs", "image_scores"):
            out.type.tensor_type.shape.dim[1].ClearField("dim_param")
            out.type.tensor_type.shape.dim[1].dim_value = c
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    return save_onnx(model, dst, external=size > external_data_threshold)


def output_dims(grid: Sequence[int], embed_dim: int, num_classes: int) -> dict[str, list[int]]:
    h, w = int(grid[0]), int(grid[1])
    d, c = int(embed_dim), int(num_classes)
    return {
        "global_embedding": [d],
        "local_embeddings": [h, w, d],
        "local_tokens": [h, w, d],
        "patch_probs": [c, h, w],
        "image_scores": [c],
    }


def config_pbtxt(name: str, platform: str, image_size: int, grid: Sequence[int], embed_dim: int,
                 classes: Sequence[str], max_batch_size: int = 32, preferred: Sequence[int] = (4, 8, 16),
                 queue_delay_us: int = 2000, kind: str = "KIND_GPU") -> str:
    """Triton ``config.pbtxt`` text (dims exclude the batch dim, as Triton expects)."""
    s = int(image_size)
    dims = output_dims(grid, embed_dim, len(classes))
    pref = [p for p in preferred if p <= max_batch_size] or [max_batch_size]

    def fmt(v: Sequence[int]) -> str:
        return "[ " + ", ".join(str(int(x)) for x in v) + " ]"

    lines = [
        f'name: "{name}"',
        f'platform: "{platform}"',
        f"max_batch_size: {int(max_batch_size)}",
        "input [",
        "  {",
        f'    name: "{INPUT_NAMES[0]}"',
        "    data_type: TYPE_FP32",
        f"    dims: {fmt([3, s, s])}",
        "  }",
        "]",
        "output [",
    ]
    outs = []
    for out in OUTPUT_NAMES:
        block = ["  {", f'    name: "{out}"', "    data_type: TYPE_FP32", f"    dims: {fmt(dims[out])}"]
        if out == "image_scores":
            block.append('    label_filename: "classes.txt"')
        block.append("  }")
        outs.append("\n".join(block))
    lines.append(",\n".join(outs))
    lines += [
        "]",
        "dynamic_batching {",
        f"  preferred_batch_size: {fmt(pref)}",
        f"  max_queue_delay_microseconds: {int(queue_delay_us)}",
        "}",
        "instance_group [",
        "  {",
        "    count: 1",
        f"    kind: {kind}",
        "  }",
        "]",
        "parameters {",
        '  key: "anoclip_classes"',
        f'  value: {{ string_value: "{",".join(classes)}" }}',
        "}",
    ]
    return "\n".join(lines) + "\n"


def write_repository(
    repo_dir: str | os.PathLike,
    name: str,
    source: str | os.PathLike,
    prototypes: np.ndarray,
    classes: Sequence[str],
    image_size: int,
    grid: Sequence[int],
    embed_dim: int,
    max_batch_size: int = 32,
    build_plan=None,
    force: bool = False,
) -> dict[str, Any]:
    """Write ``repo_dir/name`` atomically (``prepare_repository`` + ``commit_repository``)."""
    staged, entry = prepare_repository(repo_dir, name, source, prototypes, classes, image_size, grid, embed_dim,
                                       max_batch_size, build_plan, force)
    commit_repository(staged, Path(repo_dir) / name, force)
    return entry


def prepare_repository(
    repo_dir: str | os.PathLike,
    name: str,
    source: str | os.PathLike,
    prototypes: np.ndarray,
    classes: Sequence[str],
    image_size: int,
    grid: Sequence[int],
    embed_dim: int,
    max_batch_size: int = 32,
    build_plan=None,
    force: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """Build the model folder in a hidden temp folder inside ``repo_dir``; returns (staged folder,
    manifest entry). ``build_plan(onnx, plan)``, when given, turns the folded ONNX into
    ``model.plan`` (TensorRT) instead of shipping ``model.onnx``. Nothing visible changes until
    ``commit_repository``; on error the temp folder is removed."""
    repo = Path(repo_dir)
    repo.mkdir(parents=True, exist_ok=True)
    final = repo / name
    if final.exists() and not force:
        raise AnoCLIPError(f"Triton model {final} already exists; pass --force to replace it")
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=repo))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)
    try:
        version = tmp / "1"
        version.mkdir()
        onnx_files = fold_prototypes(source, version / "model.onnx", prototypes)
        if build_plan is not None:
            build_plan(version / "model.onnx", version / "model.plan")
            for f in onnx_files:
                (version / f).unlink()
            platform, files, kind = "tensorrt_plan", ["model.plan"], "KIND_GPU"
        else:
            platform, files, kind = "onnxruntime_onnx", onnx_files, "KIND_AUTO"
        (tmp / "classes.txt").write_text("".join(f"{c}\n" for c in classes), encoding="utf-8")
        (tmp / "config.pbtxt").write_text(
            config_pbtxt(name, platform, image_size, grid, embed_dim, classes, max_batch_size, kind=kind),
            encoding="utf-8",
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    entry = {"repository": str(repo.resolve()), "model": name, "platform": platform,
             "files": [f"1/{f}" for f in files], "classes": list(classes), "max_batch_size": int(max_batch_size)}
    return tmp, entry


def commit_repository(staged: Path, final: Path, force: bool = False) -> None:
    """Rename the staged folder into place (an existing model, with ``force``, is swapped out)."""
    if final.exists() and not force:
        shutil.rmtree(staged, ignore_errors=True)
        raise AnoCLIPError(f"Triton model {final} already exists; pass --force to replace it")
    swap_dir(staged, final)
