"""Export entry points: ``ExportConfig`` + ``export_artifact(cfg) -> Path`` and ``add_class``.

Order of work in ``export_artifact`` (cheap refusals first, nothing half-written ever):

1. validate the config; ``--precision bf16`` probes ONNX Runtime's bf16 support and ``--trt``
   probes TensorRT + CUDA: both fail at once, before any weights are loaded;
2. refuse an existing non-empty ``--out`` unless ``force``;
3. repair an interrupted ``--force`` replace and delete the hidden folders of dead exports
   (``anoclip_core.staging``), then build everything in ``<out parent>/.<out name>.tmp-<pid>-XXXX``
   (same filesystem): weights, text
   embeddings, fp32 graph, reduced-precision graphs, ORT-vs-PyTorch verification of every graph,
   TensorRT engine, Triton repository, manifest (sha256 of every file);
4. only then, under the artifact's lock, rename the temp folder to ``--out`` (with ``force``, the
   old artifact is moved aside to ``.<name>.old-<pid>`` first and deleted after the swap). Any
   failure, SIGINT or SIGTERM (the CLI turns it into an exception) deletes the temp folder.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from anoclip.runtime import contract as mf
from anoclip_core import staging
from anoclip_core.artlock import artifact_lock
from anoclip_core.choices import DEFAULT_OPSET, DOMAINS, MAX_OPSET, MIN_OPSET
from anoclip_core.errors import AnoCLIPError, ArtifactError
from anoclip_core.fileio import swap_dir
from anoclip_core.pretrained import cached_tag_file
from anoclip_core.progress import progress as progress_bar
from anoclip_core.progress import say
from anoclip_core.prompt_grammar import SENTENCES_PER_STATE

from . import quantize, refsearch, text
from . import triton as triton_mod
from . import trt as trt_mod
from .onnx_export import EXPORTERS, TWO_GB, ExportError, export_onnx, onnx_opset
from .verify import BATCH_SIZES, VERIFY_PROBE_CLASS, Verifier
from .wrapper import AnoCLIPExportWrapper

PAPER_DEFAULT_TAGS = {"ViT-B-16-plus-240": "laion400m_e32"}

RANDOM_BANNER = (
    "\n" + "!" * 78 + "\n"
    "!!  RANDOM WEIGHTS (--pretrained none): this artifact's scores and maps are NOT meaningful.\n"
    "!!  Use it for plumbing, latency and size tests only. The manifest records\n"
    "!!  pretrained.random_weights = true and every runtime will warn about it.\n"
    + "!" * 78 + "\n"
)


@dataclass
class ExportConfig:
    """Everything one export needs. ``classes`` in any order (the artifact sorts them)."""

    backbone: str
    classes: Sequence[str] = ()
    pretrained: str | os.PathLike | None = "auto"
    image_size: int | None = None
    domains: Mapping[str, str] = field(default_factory=dict)
    precisions: Sequence[str] = ("fp32",)
    out: str | os.PathLike | None = None  # None: default_out(backbone), a folder named after it
    force: bool = False
    opset: int = DEFAULT_OPSET
    exporter: str = "dynamo"
    temperature: float = 1.0
    dual_blocks: int | None = None
    model_config: str | os.PathLike | None = None
    trt: bool = False
    trt_profile: tuple[int, int, int] = trt_mod.DEFAULT_PROFILE
    trt_timing_cache: str | os.PathLike | None = None
    trt_precision: str | None = None  # engine precision; None: from ``precisions``
    triton: str | os.PathLike | None = None
    triton_model_name: str = triton_mod.DEFAULT_MODEL_NAME
    triton_max_batch: int | None = None  # None: the TensorRT profile max with --trt, else 32
    external_data_threshold: int = TWO_GB
    text_cache: str | os.PathLike | None = "default"
    weights_cache_dir: str | None = None
    verify_batch_sizes: Sequence[int] = BATCH_SIZES
    int8_mode: str = "dynamic"
    calibration_images: Sequence[str | os.PathLike] = ()
    progress: bool = True


def _say(msg: str) -> None:
    say(msg)


def _bar(total: int, desc: str, progress: bool, unit: str = "step"):
    return progress_bar(total=total, desc=desc, unit=unit, enabled=progress)


def resolve_pretrained(backbone: str, pretrained: str | os.PathLike | None) -> str | None:
    """``"auto"``: the paper's tag for its backbone, else ``openai`` when published, else the first tag."""
    if pretrained is None:
        return None
    if str(pretrained) != "auto":
        return os.fspath(pretrained)
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(backbone)
    if backbone in PAPER_DEFAULT_TAGS and PAPER_DEFAULT_TAGS[backbone] in tags:
        return PAPER_DEFAULT_TAGS[backbone]
    if "openai" in tags:
        return "openai"
    if tags:
        return tags[0]
    raise AnoCLIPError(f"{backbone} has no published pretrained weights: pass --pretrained PATH or --pretrained none")


def state_fingerprint(module) -> str:
    """sha256 over the model's parameters/buffers (names, shapes, bytes): proves add-class uses the same weights."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.numpy().reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def tool_versions(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    import onnx
    import onnxruntime
    import open_clip
    import torch

    import anoclip_core

    out = {
        "anoclip": anoclip_core.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }
    try:
        import onnxscript

        out["onnxscript"] = onnxscript.__version__
    except Exception:  # noqa: BLE001
        pass
    out.update(extra or {})
    return out


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise AnoCLIPError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise AnoCLIPError(f"--out {out} already exists and is not empty; pass --force to replace it (atomically)")


def _warn_replaced_state(out: Path, force: bool) -> None:
    """``--force`` replaces the whole folder: say so when it holds state a new export does not carry over."""
    if not (force and out.is_dir()):
        return
    lost = [name for name in (mf.CALIBRATION_NAME, mf.REFS_DIR) if (out / name).exists()]
    if lost:
        _say(f"note: --force replaces {out}; its {' and '.join(lost)} (calibration / few-shot banks) are not carried "
             "over: re-run anoclip calibrate / anoclip refs on the new artifact")


def _validate(cfg: ExportConfig) -> tuple[list[str], list[str], dict[str, str]]:
    from anoclip_core.prompts import default_domain

    classes = sorted(text.parse_classes(cfg.classes))
    if not classes and cfg.triton is not None:
        raise AnoCLIPError("--triton folds the classes' prototypes into the model: pass --classes too")
    precisions = quantize.check_precisions(cfg.precisions)
    if cfg.exporter not in EXPORTERS:
        raise AnoCLIPError(f"unknown exporter {cfg.exporter!r} (expected one of {EXPORTERS})")
    if not MIN_OPSET <= int(cfg.opset) <= MAX_OPSET:
        raise AnoCLIPError(
            f"--opset must be in [{MIN_OPSET}, {MAX_OPSET}] (LayerNormalization needs 17), got {cfg.opset}"
        )
    if cfg.exporter == "dynamo" and int(cfg.opset) < 18:
        raise AnoCLIPError(f"the dynamo exporter writes opset >= 18; for opset {cfg.opset} use --exporter legacy")
    if cfg.temperature <= 0:
        raise AnoCLIPError(f"temperature must be > 0, got {cfg.temperature}")
    if cfg.int8_mode not in quantize.INT8_MODES:
        raise AnoCLIPError(f"int8 mode must be one of {quantize.INT8_MODES}, got {cfg.int8_mode!r}")
    for path in cfg.calibration_images:
        if not os.path.isfile(path):
            raise AnoCLIPError(f"calibration image not found: {path}")
    if cfg.calibration_images and "int8" not in precisions:
        raise AnoCLIPError("--calibration-images calibrates the static int8 graph: add --precision int8 "
                           "(with --int8-mode static)")
    if cfg.calibration_images and cfg.int8_mode != "static":
        raise AnoCLIPError(f"--calibration-images calibrates the static int8 graph, --int8-mode {cfg.int8_mode} "
                           "takes none: drop one of them (with the images, static is the default)")
    unknown = sorted(set(cfg.domains) - set(classes))
    if unknown:
        raise AnoCLIPError(f"domain given for class(es) not exported: {', '.join(unknown)}")
    domains = {}
    for name in classes:
        dom = cfg.domains.get(name) or default_domain(name)
        if dom not in DOMAINS:
            raise AnoCLIPError(
                f"unknown prompt domain {dom!r} for class {name!r} (expected one of {', '.join(DOMAINS)})"
            )
        domains[name] = dom
    return classes, precisions, domains


def _open_clip_config(backbone: str) -> dict[str, Any] | None:
    """The open_clip model config, so ``add-class`` can rebuild a backbone registered from a file."""
    import open_clip

    try:
        cfg = open_clip.get_model_config(backbone)
    except Exception:  # noqa: BLE001
        return None
    return json.loads(json.dumps(cfg, default=str)) if cfg else None


def _ensure_backbone(data: Mapping[str, Any]) -> None:
    """Register the artifact's own open_clip config when this process does not know its backbone."""
    import open_clip

    backbone = data["backbone"]
    if backbone in open_clip.list_models() or not data.get("open_clip_config"):
        return
    with tempfile.TemporaryDirectory() as tmpdir:
        path = Path(tmpdir) / f"{backbone}.json"
        path.write_text(json.dumps(data["open_clip_config"]))
        open_clip.add_model_config(path)


RANDOM_CALIBRATION = {"images": 8, "seed": 1}


def _calibration_pixels(model, images: Sequence[str | os.PathLike]) -> np.ndarray:
    """Static-int8 calibration set: the given images preprocessed exactly as the runtime does
    (``anoclip_core.transform`` with the artifact's preprocess config), else 8 seeded random ones."""
    from anoclip_core.transform import preprocess

    from .verify import make_pixels

    if not images:
        _say(f"warning: static int8 calibrated on {RANDOM_CALIBRATION['images']} seeded random images (manifest "
             "calibration.source = random): it verifies, but only GOOD images of the product calibrate real "
             "activations; pass --calibration-images DIR")
        return make_pixels(model.preprocess_config.to_dict(), n=RANDOM_CALIBRATION["images"],
                           seed=RANDOM_CALIBRATION["seed"])
    pixels = []
    for path in images:
        try:
            pixels.append(preprocess(os.fspath(path), model.preprocess_config))
        except AnoCLIPError as err:
            raise AnoCLIPError(f"calibration image {path}: {err}") from None
    return np.stack(pixels).astype(np.float32)


def calibration_record(images: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """Where the static-int8 calibration came from, for the manifest: the image count, the folder
    holding them (name only) and the sha256 of their sorted paths relative to that folder."""
    if not images:
        return {"source": "random", **RANDOM_CALIBRATION}
    paths = [os.path.abspath(os.fspath(p)) for p in images]
    folder = os.path.commonpath([os.path.dirname(p) for p in paths])
    listing = "\n".join(sorted(os.path.relpath(p, folder).replace(os.sep, "/") for p in paths))
    return {"source": "images", "images": len(paths), "folder": os.path.basename(folder) or folder,
            "files_sha256": hashlib.sha256(listing.encode("utf-8")).hexdigest()}


def _create_model(
    backbone: str, pretrained, image_size, dual_blocks, temperature, text_cache, weights_cache_dir, progress
):
    from anoclip_core import AnoCLIP

    bar = _bar(1, "weights", progress)
    bar.set_postfix_str(f"{backbone} / {pretrained if pretrained is not None else 'none'}")
    model = AnoCLIP.create(
        backbone,
        pretrained=pretrained,
        image_size=image_size,
        dual_blocks=dual_blocks,
        temperature=temperature,
        cache_dir=text_cache,
        weights_cache_dir=weights_cache_dir,
    ).eval()
    bar.update(1)
    bar.close()
    return model


def _pretrained_entry(model, backbone: str, weights_cache_dir: str | None) -> dict[str, Any]:
    w = model.weights
    sha = w.sha256
    entry: dict[str, Any] = {
        "source": w.source,
        "kind": w.kind,
        "sha256": sha,
        "random_weights": bool(w.random_weights),
    }
    if w.kind == "tag":
        path = cached_tag_file(backbone, w.source, weights_cache_dir)
        entry["sha256"] = mf.sha256_file(path) if path else None
        entry["cached_file"] = path
    if w.kind == "none":
        entry["seed"] = 0
    entry["state_sha256"] = state_fingerprint(model.clip)
    return entry


def _remove_graph(folder: Path, name: str) -> None:
    """Delete an engine-only ONNX graph (and its external data) before the manifest lists files."""
    for f in folder.glob(name + "*"):
        f.unlink()
    for f in folder.glob(name.rsplit(".onnx", 1)[0] + "*.data"):
        f.unlink()


@dataclass
class _Stage:
    """What the export steps hand each other, built in ``tmp`` until the commit."""

    cfg: ExportConfig
    out: Path
    tmp: Path
    classes: list[str]
    precisions: list[str]
    domains: dict[str, str]
    pretrained: str | None
    started: float
    model: Any = None
    pretrained_entry: dict[str, Any] = field(default_factory=dict)
    protos: np.ndarray | None = None
    graph_files: dict[str, str] = field(default_factory=dict)
    model_entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    opset: int = DEFAULT_OPSET
    trt_api: Any = None
    gpu: str | None = None
    trt_precision: str | None = None
    trt_entry: dict[str, Any] | None = None
    triton_staged: Path | None = None
    triton_entry: dict[str, Any] | None = None
    triton_batch: int | None = None
    refsearch_entry: dict[str, Any] | None = None
    extra_versions: dict[str, str] = field(default_factory=dict)


def default_out(backbone: str) -> Path:
    """The folder an export writes to when ``--out`` is not given: named after the backbone."""
    return Path(re.sub(r"[^A-Za-z0-9_.+-]+", "-", backbone).strip("-.") or "artifact")


def export_artifact(cfg: ExportConfig) -> Path:
    """Write a verified artifact folder at ``cfg.out`` (default: named after the backbone) and return its path."""
    stage = _prepare(cfg)
    try:
        _load_weights(stage)
        _write_text(stage)
        _write_graphs(stage)
        _write_engine(stage)
        _write_triton(stage)
        stage.refsearch_entry = refsearch.write(stage.tmp, stage.model.embed_dim, stage.opset)  # few-shot, GPU
        _write_manifest(stage)
        _commit(stage.tmp, stage.out, cfg.force)
    except BaseException:
        shutil.rmtree(stage.tmp, ignore_errors=True)
        if stage.triton_staged is not None:
            shutil.rmtree(stage.triton_staged, ignore_errors=True)
        raise
    if stage.triton_staged is not None:
        # after the artifact: a failed export never replaces a Triton model
        triton_mod.commit_repository(stage.triton_staged, Path(cfg.triton) / cfg.triton_model_name, cfg.force)
    return stage.out


def _prepare(cfg: ExportConfig) -> _Stage:
    """Every cheap refusal before any weights load: config, bf16/TensorRT probes, --out, backbone, tag."""
    started = time.time()
    classes, precisions, domains = _validate(cfg)
    if "bf16" in precisions:
        quantize.require_bf16()
    trt_api = gpu = trt_precision = None
    triton_batch = (triton_mod.max_batch_size(cfg.trt_profile if cfg.trt else None, cfg.triton_max_batch)
                    if cfg.triton is not None else None)
    if cfg.trt:
        trt_precision = trt_mod.choose_trt_precision(precisions, cfg.trt_precision, cfg.int8_mode)
        trt_api, gpu = trt_mod.require_tensorrt()
    out = Path(cfg.out if cfg.out is not None else default_out(cfg.backbone)).expanduser().absolute()
    _check_out(out, cfg.force)
    _warn_replaced_state(out, cfg.force)
    if cfg.triton is not None:
        tdir = Path(cfg.triton) / cfg.triton_model_name
        if tdir.exists() and not cfg.force:
            raise AnoCLIPError(f"Triton model {tdir} already exists; pass --force to replace it")
    if cfg.model_config:
        from anoclip_core.model import register_model_configs

        register_model_configs(cfg.model_config)
    from anoclip_core.model import _check_backbone

    _check_backbone(cfg.backbone)  # before 'auto' tag resolution, so a typo reads as a typo
    pretrained = resolve_pretrained(cfg.backbone, cfg.pretrained)
    out.parent.mkdir(parents=True, exist_ok=True)
    for note in mf.recover_artifact(out):
        _say(note)
    _check_out(out, cfg.force)  # again: a recovered artifact may now be there
    tmp = staging.temp_dir(out)
    stage = _Stage(cfg, out, tmp, classes, precisions, domains, pretrained, started)
    stage.trt_api, stage.gpu, stage.trt_precision = trt_api, gpu, trt_precision
    stage.triton_batch = triton_batch
    return stage


def _load_weights(stage: _Stage) -> None:
    cfg = stage.cfg
    stage.model = _create_model(cfg.backbone, stage.pretrained, cfg.image_size, cfg.dual_blocks, cfg.temperature,
                                cfg.text_cache, cfg.weights_cache_dir, cfg.progress)
    if stage.model.random_weights:
        _say(RANDOM_BANNER)
    stage.pretrained_entry = _pretrained_entry(stage.model, cfg.backbone, cfg.weights_cache_dir)


def _write_text(stage: _Stage) -> None:
    """Encode the classes' prompts into the npz; an export without classes writes an empty one."""
    encoded = text.encode_classes(stage.model, stage.domains, stage.cfg.progress)
    text.write_npz(stage.tmp / mf.TEXT_FILE, encoded)
    if stage.classes:
        stage.protos = text.prototypes_array(encoded, stage.classes)


def _verifier(stage: _Stage) -> Verifier:
    """The core's reference outputs for the export's classes, or for the probe class when it has none."""
    classes, domains, protos = stage.classes, stage.domains, stage.protos
    if not classes:
        classes, domains = [VERIFY_PROBE_CLASS], {VERIFY_PROBE_CLASS: "object"}
        protos = text.prototypes_array(text.encode_classes(stage.model, domains, False), classes)
    return Verifier(stage.model, classes, domains, protos, batch_sizes=stage.cfg.verify_batch_sizes)


def _write_graphs(stage: _Stage) -> None:
    """The fp32 graph, then each reduced precision from it; every graph verified against the core."""
    cfg, model, tmp = stage.cfg, stage.model, stage.tmp
    wrapper = AnoCLIPExportWrapper(model.encoder, model.temperature).eval()
    verifier = _verifier(stage)
    nb = len(verifier.batch_sizes)
    ebar = _bar(len(stage.precisions), "export", cfg.progress, unit="graph")
    vbar = _bar(len(stage.precisions) * nb, "verification", cfg.progress, unit="run")
    for precision in stage.precisions:
        name = quantize.graph_file(precision)
        ebar.set_postfix_str(precision)
        if precision == "fp32":
            written = export_onnx(wrapper, tmp / name, model.image_size, model.embed_dim, cfg.opset,
                                  cfg.exporter, cfg.external_data_threshold)
            stage.opset = onnx_opset(tmp / name)
            if stage.opset != int(cfg.opset):
                raise ExportError(f"asked for opset {cfg.opset}, the {cfg.exporter} exporter wrote opset {stage.opset}")
        elif precision == "int8" and cfg.int8_mode == "static":
            calib = _calibration_pixels(model, cfg.calibration_images)
            written = quantize.quantize_int8_static(tmp / stage.graph_files["fp32"], tmp / name, calib,
                                                    verifier.prototypes, cfg.external_data_threshold)
        else:
            written = quantize.CONVERTERS[precision](tmp / stage.graph_files["fp32"], tmp / name,
                                                     cfg.external_data_threshold)
        ebar.update(1)
        vbar.set_postfix_str(precision)
        result = verifier.verify(tmp / name, precision, progress=vbar)
        stage.graph_files[precision] = name
        stage.model_entries[precision] = _model_entry(cfg, name, precision, written, result)
    ebar.close()
    vbar.close()


def _model_entry(cfg: ExportConfig, name: str, precision: str, written: Sequence[str], result: dict) -> dict[str, Any]:
    """The manifest's ``models.<precision>`` entry: file, verification, external data, quantization."""
    entry: dict[str, Any] = {"file": name, "precision": precision, "verification": result}
    if len(written) > 1:
        entry["external_data"] = [f for f in written if f != name]
    if precision == "int8":
        entry["quantization"] = {"mode": cfg.int8_mode, "weights": "int8", "ops": ["MatMul (Linear layers)"]}
        if cfg.int8_mode == "static":
            entry["quantization"]["format"] = "QDQ"
            entry["quantization"]["activations"] = "int8 symmetric (zero point 0)"
            entry["quantization"]["kept_float"] = list(quantize.STATIC_KEPT_FLOAT)
            entry["quantization"]["calibration"] = calibration_record(cfg.calibration_images)
    return entry


def _build_plan(stage: _Stage, onnx_path: Path, plan_path: Path) -> dict[str, Any]:
    model = stage.model
    return trt_mod.build_engine(stage.trt_api, onnx_path, plan_path, stage.trt_precision, model.image_size,
                                model.embed_dim, len(stage.classes), stage.gpu, tuple(stage.cfg.trt_profile),
                                stage.cfg.trt_timing_cache)


def _write_engine(stage: _Stage) -> None:
    """The TensorRT engine (``--trt``), from the graph of its precision (an engine-only graph is removed)."""
    cfg, tmp = stage.cfg, stage.tmp
    if not cfg.trt:
        return
    bbar = _bar(1, "engine build", cfg.progress)
    bbar.set_postfix_str(f"TensorRT {getattr(stage.trt_api, '__version__', '?')} {stage.trt_precision}")
    src = trt_mod.engine_source(stage.trt_api, stage.trt_precision, stage.graph_files)
    engine_only = src == trt_mod.engine_only_graph(stage.trt_precision)
    if engine_only:
        quantize.CONVERTERS[stage.trt_precision](tmp / stage.graph_files["fp32"], tmp / src,
                                                 cfg.external_data_threshold)
    stage.trt_entry = _build_plan(stage, tmp / src, tmp / trt_mod.plan_file(stage.trt_precision))
    bbar.update(1)
    bbar.close()
    stage.extra_versions["tensorrt"] = str(stage.trt_api.__version__)
    if engine_only and cfg.triton is None:
        _remove_graph(tmp, src)


def _write_triton(stage: _Stage) -> None:
    """A Triton model repository (``--triton``), staged beside its target until the artifact commits."""
    cfg, model = stage.cfg, stage.model
    if cfg.triton is None:
        return
    tsrc = stage.graph_files["fp32"]
    build_plan: Callable | None = None
    if cfg.trt:
        tsrc = trt_mod.engine_source(stage.trt_api, stage.trt_precision, stage.graph_files)

        def build_plan(onnx_path: Path, plan_path: Path) -> None:
            _build_plan(stage, onnx_path, plan_path)

    stage.triton_staged, stage.triton_entry = triton_mod.prepare_repository(
        cfg.triton, cfg.triton_model_name, stage.tmp / tsrc, stage.protos, stage.classes, model.image_size,
        model.grid_size, model.embed_dim, stage.triton_batch, build_plan, force=cfg.force,
    )
    if cfg.trt and tsrc == trt_mod.engine_only_graph(stage.trt_precision):
        _remove_graph(stage.tmp, tsrc)


def _write_manifest(stage: _Stage) -> None:
    """The manifest last (sha256 of every file), then read back exactly as the runtime will."""
    cfg, model = stage.cfg, stage.model
    manifest = mf.build_manifest(
        stage.tmp, backbone=cfg.backbone, pretrained=stage.pretrained_entry,
        open_clip_config=_open_clip_config(cfg.backbone), preprocess=model.preprocess_config.to_dict(),
        patch_grid=model.grid_size, patch_size=model.encoder.patch_size, embed_dim=model.embed_dim,
        depth=model.encoder.depth, dual_blocks=model.encoder.dual_blocks, temperature=model.temperature,
        opset=stage.opset, exporter=cfg.exporter, models=stage.model_entries, classes=stage.domains,
        prompt_set=_prompt_set(), sentences_per_state=SENTENCES_PER_STATE, tensorrt=stage.trt_entry,
        triton=stage.triton_entry, refsearch=stage.refsearch_entry, versions=tool_versions(stage.extra_versions),
        created=_now(),
        export_seconds=round(time.time() - stage.started, 1),
    )
    mf.write_manifest(stage.tmp, manifest)
    mf.read_manifest(stage.tmp, check_files=True)  # what the runtime will see


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _prompt_set() -> str:
    from anoclip_core.prompts import PROMPT_SET

    return PROMPT_SET


def _commit(tmp: Path, out: Path, force: bool) -> None:
    """Atomic swap under the artifact's lock: ``tmp`` becomes ``out``; a previous ``out`` is moved
    aside to ``.<name>.old-<pid>``, then deleted (``staging.recover`` repairs a kill in between)."""
    with artifact_lock(out, what="anoclip-export export"):
        _check_out(out, force)  # again: another export may have finished there meanwhile
        swap_dir(tmp, out)


# add-class ------------------------------------------------------------------------------------
def model_from_manifest(data: Mapping[str, Any], text_cache: str | os.PathLike | None = "default",
                        weights_cache_dir: str | None = None, progress: bool = True):
    """Re-create the exact core model an artifact was exported from (refuses different weights)."""
    pre = data["pretrained"]
    kind = pre.get("kind") or ("none" if pre["random_weights"] else ("file" if os.path.isabs(pre["source"]) else "tag"))
    source = None if kind == "none" else pre["source"]
    if kind == "file" and not os.path.isfile(source):
        raise ArtifactError(f"the artifact's weights file {source} is not there any more; cannot encode new classes")
    model = _create_model(data["backbone"], source, data["image_size"], data["dual_blocks"], data["temperature"],
                          text_cache, weights_cache_dir, progress)
    if kind == "file" and pre.get("sha256") and model.weights.sha256 != pre["sha256"]:
        raise ArtifactError(
            f"weights file {source} changed since export (sha256 differs from manifest pretrained.sha256)"
        )
    expected = pre.get("state_sha256")
    if expected and state_fingerprint(model.clip) != expected:
        hint = ""
        if kind == "none":
            vers = data.get("versions", {})
            hint = (f" (random weights are seeded, but torch {vers.get('torch')} / open_clip {vers.get('open_clip')} "
                    "at export time may initialise differently from this installation)")
        raise ArtifactError(
            f"re-created {data['backbone']} weights do not match the artifact (pretrained.state_sha256){hint}; "
            "re-export the artifact with all classes instead"
        )
    return model


def add_class(artifact_dir: str | os.PathLike, class_name: str, domain: str | None = None, *,
              text_cache: str | os.PathLike | None = "default", weights_cache_dir: str | None = None,
              model_config: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Encode ``class_name`` with the artifact's own backbone/weights and add it to the npz.

    The slow part (the text encoding) runs unlocked; the read-modify-write of
    ``text_embeddings.npz`` and ``manifest.json`` runs under the artifact's exclusive lock and
    re-reads both there, so concurrent ``add-class`` / ``calibrate`` runs all land. Each file is
    written by temp file + rename, the manifest (holding the others' sha256) last; a reader that
    meets the new npz with the old manifest re-reads under the lock. Graphs are not touched.
    """
    from anoclip_core.prompts import default_domain

    root = Path(artifact_dir)
    for note in mf.recover_artifact(root):
        _say(note)
    data = mf.read_manifest(root, check_files=True)
    mf.check_bank_files(root, data)
    name = text.check_class_name(class_name)
    _refuse_known(root, data, name)
    dom = domain or default_domain(name)
    if dom not in DOMAINS:
        raise AnoCLIPError(f"unknown prompt domain {dom!r} (expected one of {', '.join(DOMAINS)})")
    if model_config:
        from anoclip_core.model import register_model_configs

        register_model_configs(model_config)
    if data["text"].get("prompt_set") != _prompt_set():
        raise ArtifactError(
            f"artifact prompt_set {data['text'].get('prompt_set')!r} differs from this anoclip's {_prompt_set()!r}"
        )
    _ensure_backbone(data)
    model = model_from_manifest(data, text_cache, weights_cache_dir, progress)
    new = text.encode_classes(model, {name: dom}, progress)[name]
    with artifact_lock(root, what="anoclip-export add-class"):
        _commit_class(root, name, new)
    return root


def _refuse_known(root: Path, data: Mapping[str, Any], name: str) -> None:
    if name in data["text"]["classes"]:
        raise AnoCLIPError(f"class {name!r} is already in {root} (domain {data['text']['classes'][name]})")
    mf.refuse_case_collision(data["text"]["classes"], name, os.fspath(root))


def _commit_class(root: Path, name: str, new: tuple) -> None:
    """Merge one encoded class into the CURRENT npz and manifest (call with the lock held)."""
    data = mf.read_manifest(root, check_files=True)
    mf.check_bank_files(root, data)
    _refuse_known(root, data, name)
    text_file = data["text"]["file"]
    existing = text.read_npz(root / text_file)
    merged = {k: (v[0], v[1], data["text"]["classes"].get(k, "object")) for k, v in existing.items()}
    merged[name] = new
    fd, tmp_npz = tempfile.mkstemp(prefix=f".{text_file}.", suffix=".tmp", dir=root)
    os.close(fd)
    os.chmod(tmp_npz, 0o666 & ~_umask())
    try:
        text.write_npz(tmp_npz, merged)
        digest = mf.sha256_file(tmp_npz)
        os.replace(tmp_npz, root / text_file)
    except BaseException:
        if os.path.exists(tmp_npz):
            os.unlink(tmp_npz)
        raise
    classes = dict(data["text"]["classes"])
    classes[name] = new[2]
    data["text"]["classes"] = {k: classes[k] for k in sorted(classes)}
    data["files"][text_file] = digest
    data["modified"] = _now()
    if data.get("triton"):
        data["triton"]["stale"] = True  # its folded prototypes predate this class
    mf.write_manifest(root, data)
