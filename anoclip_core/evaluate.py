"""Zero-shot (and few-shot) evaluation on MVTec AD, VisA or a folder dataset (ALGORITHM.md §4 and §6).

``evaluate(EvalConfig(...))`` predicts every test image of the chosen classes, computes the §6
metrics per class and their mean, and (with ``out``) writes ``results.json``, ``results.md`` and a
few overlay PNGs per class. MVTec and folder datasets use one S x S input per image (image scores
averaged over the 22 reference views on MVTec by default); VisA uses the two-crop protocol of §4.

With ``shots=K`` the run adds WinCLIP's few-shot protocol: for each seed, K good TRAINING images
per class are drawn, encoded into a reference bank (:mod:`anoclip_core.refbank`), and the test set
is predicted again with it; metrics are reported per seed and as mean and spread over the seeds,
beside the zero-shot numbers (which stay as they are).
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from . import transform
from .datasets import DATASETS, Sample, load_mask, load_samples
from .errors import AnoCLIPError, BackendUnavailable
from .metrics import METRIC_KEYS, image_metrics, pixel_metrics
from .model import RANDOM_WEIGHTS_WARNING, AnoCLIP, register_model_configs
from .refbank import DEFAULT_VISUAL_WEIGHT, ReferenceBank, check_weight
from .scores import anomaly_map, state_probs, two_crop_boxes
from .tta import ClassAdaptation, TTAConfig, TTASource, two_crop_loss
from .visualize import heatmap_overlay, save_png

REFERENCE_KEYS = ("aupro_reference", "image_ap_reference")
METRIC_TITLES = {
    "pixel_auroc": "pixel AUROC",
    "pixel_ap": "pixel AP",
    "pixel_f1_max": "pixel F1-max",
    "aupro_reference": "AUPRO",
    "aupro": "AUPRO (exact)",
    "image_auroc": "image AUROC",
    "image_ap_reference": "image AP",
    "image_ap": "image AP (step-sum)",
    "image_f1_max": "image F1-max",
}
TABLE_KEYS = tuple(METRIC_TITLES)
METRIC_DEFINITIONS = {
    "aupro_reference": "AUPRO, FPR <= 0.3, 200 thresholds as the official cal_pro_score (paper-comparable)",
    "aupro": "AUPRO, FPR <= 0.3, exact (every threshold)",
    "image_ap_reference": "image AP as the official code: trapezoidal auc(recall, precision) (paper-comparable)",
    "image_ap": "image AP, step-sum average precision (sklearn average_precision_score)",
}
TTA_MODES = ("reference", "per-image")


@dataclass
class EvalConfig:
    """Everything one evaluation run needs; the CLI fills it from its options.

    ``views=None`` means the reference default: 22-view image scores on MVTec, none elsewhere.
    ``text_cache`` is the prompt-embedding cache ("default", a folder, or None to disable).
    ``tta_mode``: "reference" (as the official code: one AdamW per class, its state carried over
    the class's images in dataset order) or "per-image" (a fresh AdamW per image, as the runtime).
    ``shots`` (None: zero-shot only) adds the few-shot runs with seeds ``0 .. seeds - 1``, the
    visual part weighted ``visual_weight``, banks reduced to ``coreset`` patches when set.
    """

    dataset: str
    root: str
    backbone: str = "ViT-B-16-plus-240"
    pretrained: str | None = "laion400m_e32"
    image_size: int | None = None
    tta: bool = False
    tta_mode: str = "reference"
    views: bool | None = None
    classes: tuple[str, ...] | None = None
    batch_size: int = 8
    out: str | None = None
    overlays: int = 3
    device: str = "cpu"
    model_config: str | None = None
    text_cache: str | None = "default"
    progress: bool = True
    shots: int | None = None
    seeds: int = 3
    visual_weight: float = DEFAULT_VISUAL_WEIGHT
    coreset: int | None = None

    def __post_init__(self) -> None:
        self.dataset = self.dataset.lower()
        if self.dataset not in DATASETS:
            raise AnoCLIPError(f"unknown dataset {self.dataset!r} (expected one of {', '.join(DATASETS)})")
        if self.tta_mode not in TTA_MODES:
            raise AnoCLIPError(f"unknown TTA mode {self.tta_mode!r} (expected one of {', '.join(TTA_MODES)})")
        if self.batch_size < 1:
            raise AnoCLIPError(f"batch size must be >= 1, got {self.batch_size}")
        if self.overlays < 0:
            raise AnoCLIPError(f"overlays must be >= 0, got {self.overlays}")
        if self.image_size is not None and self.image_size < 1:
            raise AnoCLIPError(f"image size must be positive, got {self.image_size}")
        if self.dataset == "visa" and self.views:
            raise AnoCLIPError("--views does not apply to VisA: its two-crop protocol scores each crop once")
        if self.classes is not None:
            self.classes = tuple(self.classes)
        self._check_shots()

    def _check_shots(self) -> None:
        if self.shots is None:
            return
        if self.shots < 1:
            raise AnoCLIPError(f"--shots must be >= 1, got {self.shots}")
        if self.seeds < 1:
            raise AnoCLIPError(f"--seeds must be >= 1, got {self.seeds}")
        if self.coreset is not None and self.coreset < 1:
            raise AnoCLIPError(f"--coreset must be >= 1, got {self.coreset}")
        if self.tta:
            raise AnoCLIPError("--shots and --tta cannot be combined (the few-shot mode uses the zero-shot text map)")
        check_weight(self.visual_weight)

    @property
    def use_views(self) -> bool:
        """Whether image scores average the 22 reference views."""
        return self.dataset == "mvtec" if self.views is None else bool(self.views)

    def tta_config(self, temperature: float) -> TTAConfig | bool:
        """False, or the AnoCLIP+ adapter of the dataset (VisA: linear, otherwise text)."""
        if not self.tta:
            return False
        return TTAConfig(variant="linear" if self.dataset == "visa" else "text", temperature=temperature)


@dataclass
class ClassOutputs:
    """Predictions of one class: maps and masks (None = pixel truth unknown), scores, labels."""

    samples: list[Sample] = field(default_factory=list)
    maps: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray | None] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)


def _check_device(device: str) -> None:
    """Refuse devices this machine does not have, with a one-line message."""
    if device == "cpu":
        return
    if device != "cuda" and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise AnoCLIPError(f"unknown device {device!r} (expected cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise BackendUnavailable(f"device {device!r} requested but CUDA is not available on this machine")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise BackendUnavailable(f"device {device!r} requested but only {torch.cuda.device_count()} GPU(s) exist")


def short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) after resizing the short side to ``size`` (torchvision ``Resize(int)`` rounding)."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


Box = tuple[int, int, int, int]


def two_crop_inputs(rgb: np.ndarray, cfg: transform.PreprocessConfig) -> tuple[np.ndarray, list[Box], tuple[int, int]]:
    """VisA: RGB float image -> two normalised crops [2, 3, S, S], their boxes, and the resized (h, w)."""
    s = cfg.image_size
    h, w = short_side_size(rgb.shape[0], rgb.shape[1], s)
    resized = transform.resize_bilinear_antialias(rgb, h, w)
    boxes = two_crop_boxes(h, w)
    crops = [transform.normalize_rgb(resized[t : t + bh, left : left + bw], cfg) for t, left, bh, bw in boxes]
    return np.stack(crops), boxes, (h, w)


def merge_crops(maps: np.ndarray, boxes: Sequence[Box], size: tuple[int, int]) -> np.ndarray:
    """Crop maps [K, S, S] -> one map of ``size``, averaged where crops overlap."""
    total = np.zeros(size, np.float64)
    count = np.zeros(size, np.float64)
    for m, (t, left, bh, bw) in zip(maps, boxes, strict=True):
        total[t : t + bh, left : left + bw] += m
        count[t : t + bh, left : left + bw] += 1.0
    return (total / np.maximum(count, 1.0)).astype(np.float32)


def predict_two_crop(
    model: AnoCLIP, images: Sequence[transform.ImageLike], class_name: str,
    adaptation: ClassAdaptation | None = None, start_index: int = 0,
    references: ReferenceBank | None = None, visual_weight: float = DEFAULT_VISUAL_WEIGHT,
) -> tuple[list[np.ndarray], np.ndarray]:
    """VisA protocol (§4): short side -> S, two overlapping square crops, maps averaged in the
    overlap (map size = the resized image), image score = mean of the two crops' scores; no views.
    With ``adaptation`` (AnoCLIP+, §5 VisA variant) image ``j`` adapts both crops with one adapter
    on the merged-logit loss, with the seed/noise stream ``start_index + j``. ``references``: the
    few-shot mode, fused per crop (a crop's image score is fused before the two are averaged)."""
    pixels, layouts = two_crop_pixels(model, images)
    if adaptation is None:
        maps, scores = model.predict(pixels, class_name, views=False, references=references,
                                     visual_weight=visual_weight)
    else:
        maps, scores = _adapt_two_crop(model, pixels, class_name, layouts, adaptation, start_index)
    maps_np, scores_np = maps.cpu().numpy(), scores.cpu().numpy()
    out_maps, out_scores, k = [], [], 0
    for boxes, size in layouts:
        n = len(boxes)
        out_maps.append(merge_crops(maps_np[k : k + n], boxes, size))
        out_scores.append(float(scores_np[k : k + n].mean()))
        k += n
    return out_maps, np.asarray(out_scores)


def two_crop_pixels(
    model: AnoCLIP, images: Sequence[transform.ImageLike]
) -> tuple[torch.Tensor, list[tuple[list[Box], tuple[int, int]]]]:
    """VisA: both crops of every image as one normalised batch [2 * B, 3, S, S], and their layouts."""
    inputs, layouts = [], []
    for image in images:
        crops, boxes, size = two_crop_inputs(transform.load_rgb(image), model.preprocess_config)
        inputs.append(crops)
        layouts.append((boxes, size))
    return torch.from_numpy(np.concatenate(inputs)).to(model.device), layouts


def _maps_and_scores(
    model: AnoCLIP, glob: torch.Tensor, local: torch.Tensor, prototypes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """§4 maps [B, S, S] from (adapted) local tokens and single-view scores [B] from global tokens."""
    size = (model.image_size, model.image_size)
    protos = prototypes.float()
    maps = anomaly_map(F.normalize(local.float(), dim=-1), protos, size, model.temperature)
    return maps, state_probs(F.normalize(glob.float(), dim=-1), protos, model.temperature)


def _adapt_two_crop(
    model: AnoCLIP, pixels: torch.Tensor, class_name: str, layouts: list[tuple[list[Box], tuple[int, int]]],
    adaptation: ClassAdaptation, start_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop maps and scores with AnoCLIP+: image j's crops are adapted together, one image at a time."""
    protos = model.state_embeddings(class_name).prototypes
    glob, local = model.encode_tokens(pixels)
    adapted, k = [], 0
    for j, (boxes, size) in enumerate(layouts):
        n = len(boxes)
        loss = two_crop_loss(model.grid_size, boxes, size, protos.float(), model.temperature)
        adapted.append(adaptation.adapt(local[k : k + n], start_index + j, loss))
        k += n
    with torch.no_grad():
        return _maps_and_scores(model, glob, torch.cat(adapted), protos)


def _adapt_single(
    model: AnoCLIP, pixels: torch.Tensor, class_name: str, adaptation: ClassAdaptation, start_index: int,
    views: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps and scores of S x S inputs with AnoCLIP+, one image at a time (stream ``start_index + j``)."""
    protos = model.state_embeddings(class_name).prototypes
    glob, local = model.encode_tokens(pixels)
    adapted = torch.cat([adaptation.adapt(local[j : j + 1], start_index + j) for j in range(local.shape[0])])
    with torch.no_grad():
        maps, scores = _maps_and_scores(model, glob, adapted, protos)
    if views:
        scores = model.view_scores(pixels, protos)
    return maps, scores


def class_adaptation(
    model: AnoCLIP, class_name: str, cfg: EvalConfig, source: TTASource | None = None
) -> ClassAdaptation | None:
    """The class's AnoCLIP+ state (None without TTA): reference mode carries AdamW over the class.
    ``source`` overrides the initial adapter weights and the noise (default: seeded per image index)."""
    tta = cfg.tta_config(model.temperature)
    if not isinstance(tta, TTAConfig):
        return None
    states = model.state_embeddings(class_name)
    return ClassAdaptation(states.sentences, states.prototypes, tta, carry=cfg.tta_mode == "reference", source=source)


def _predict_batch(
    model: AnoCLIP, batch: list[Sample], cfg: EvalConfig, start_index: int = 0,
    adaptation: ClassAdaptation | None = None, references: ReferenceBank | None = None,
) -> tuple[list[np.ndarray], np.ndarray]:
    """One batch; ``start_index`` (the batch's offset in the class) keeps TTA independent of batch
    size (images are adapted one at a time, in dataset order, whatever the batch size)."""
    class_name = batch[0].class_name
    if cfg.dataset == "visa":
        return predict_two_crop(model, [s.path for s in batch], class_name, adaptation, start_index,
                                references, cfg.visual_weight)
    pixels = model.load_images([s.path for s in batch])
    if adaptation is None:
        maps, scores = model.predict(pixels, class_name, views=cfg.use_views, references=references,
                                     visual_weight=cfg.visual_weight)
    else:
        maps, scores = _adapt_single(model, pixels, class_name, adaptation, start_index, cfg.use_views)
    return list(maps.cpu().numpy().astype(np.float32)), scores.cpu().numpy()


def predict_class(
    model: AnoCLIP, samples: list[Sample], cfg: EvalConfig, bar: Any = None, source: TTASource | None = None,
    references: ReferenceBank | None = None,
) -> ClassOutputs:
    """Maps, masks (resized to each map) and scores of one class's samples, in batches. With TTA the
    images are adapted in the given (dataset) order; ``source`` as in :func:`class_adaptation`;
    ``references`` turns on the few-shot mode."""
    out = ClassOutputs(samples=list(samples))
    adaptation = class_adaptation(model, samples[0].class_name, cfg, source) if samples else None
    for i in range(0, len(samples), cfg.batch_size):
        batch = samples[i : i + cfg.batch_size]
        maps, scores = _predict_batch(model, batch, cfg, start_index=i, adaptation=adaptation, references=references)
        for s, m, sc in zip(batch, maps, scores, strict=True):
            out.maps.append(m)
            out.masks.append(load_mask(s, m.shape[0], m.shape[1]))
            out.scores.append(float(sc))
        if bar is not None:
            bar.update(len(batch))
    return out


def class_metrics(outputs: ClassOutputs) -> dict[str, Any]:
    """§6 metrics of one class, plus the official definitions (:data:`REFERENCE_KEYS`: the
    200-threshold AUPRO and the trapezoidal image AP); pixel metrics use only images whose pixel
    truth is known."""
    known = [i for i, m in enumerate(outputs.masks) if m is not None]
    labels = [s.label for s in outputs.samples]
    pixel, pixel_why = pixel_metrics(
        [outputs.maps[i] for i in known], [outputs.masks[i] for i in known], reference=True
    )
    image, image_why = image_metrics(outputs.scores, labels, reference=True)
    result: dict[str, Any] = {key: float({**pixel, **image}[key]) for key in METRIC_KEYS + REFERENCE_KEYS}
    result["reason"] = {k: v for k, v in {**pixel_why, **image_why}.items() if k not in REFERENCE_KEYS}
    unknown = len(outputs.samples) - len(known)
    if unknown:
        result["reason"]["pixel_truth"] = f"{unknown} anomalous image(s) without a mask left out of pixel metrics"
    result["n_images"] = len(outputs.samples)
    result["n_anomalous"] = int(sum(labels))
    result["n_pixel_truth"] = len(known)
    return result


def mean_metrics(per_class: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean of each metric over the classes where it is defined (and how many those were)."""
    mean: dict[str, Any] = {}
    counted: dict[str, int] = {}
    for key in METRIC_KEYS + REFERENCE_KEYS:
        values = [r[key] for r in per_class.values() if not math.isnan(r.get(key, math.nan))]
        mean[key] = float(np.mean(values)) if values else math.nan
        counted[key] = len(values)
    mean["classes_counted"] = counted
    mean["n_images"] = sum(r["n_images"] for r in per_class.values())
    return mean


def _overlay_choice(outputs: ClassOutputs, count: int) -> list[int]:
    anomalous = [i for i, s in enumerate(outputs.samples) if s.label == 1]
    normal = [i for i, s in enumerate(outputs.samples) if s.label == 0]
    return (anomalous + normal)[:count]


def write_overlays(outputs: ClassOutputs, folder: Path, count: int) -> list[str]:
    """Overlay PNGs for a few samples (defective first); colours span the class's map range."""
    chosen = _overlay_choice(outputs, count)
    if not chosen:
        return []
    lo = float(min(m.min() for m in outputs.maps))
    hi = float(max(m.max() for m in outputs.maps))
    if hi <= lo:
        lo, hi = 0.0, 1.0
    written = []
    for i in chosen:
        s, amap, mask = outputs.samples[i], outputs.maps[i], outputs.masks[i]
        rgb = transform.resize_bilinear_antialias(transform.load_rgb(s.path), *amap.shape)
        img = heatmap_overlay(np.clip(rgb, 0.0, 1.0), amap, alpha=0.5, vmin=lo, vmax=hi)
        if mask is not None and mask.any():
            contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            img = np.ascontiguousarray(img)
            cv2.drawContours(img, contours, -1, (255, 255, 255), 1)
        name = f"{s.defect_type}_{Path(s.path).stem}.png"
        written.append(str(save_png(folder / s.class_name / name, img)))
    return written


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100.0 * value:.1f}"


def markdown_table(results: dict[str, Any]) -> str:
    """Per-class and mean table (percent, one decimal); n/a where a metric is undefined. The
    headline AUPRO and image AP are the official definitions, the exact / step-sum ones beside."""
    lines = []
    mode = f" | TTA mode {results['tta_mode']}" if results["tta"] and results.get("tta_mode") else ""
    if results["random_weights"]:
        lines += [f"> **{RANDOM_WEIGHTS_WARNING}**", ""]
    lines += [
        f"{results['dataset']} | {results['backbone']} ({results['pretrained']}) | {results['image_size']} px | "
        f"TTA {'on' if results['tta'] else 'off'} | views {'on' if results['views'] else 'off'} | "
        f"protocol {results['protocol']}{mode}",
        "",
        "| class | images | " + " | ".join(METRIC_TITLES[k] for k in TABLE_KEYS) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in TABLE_KEYS) + " |",
    ]
    rows = list(results["classes"].items()) + [("**mean**", results["mean"])]
    for name, r in rows:
        lines.append(f"| {name} | {r['n_images']} | " + " | ".join(_fmt(r.get(k, math.nan)) for k in TABLE_KEYS) + " |")
    lines += ["", "AUPRO and image AP are the paper-comparable definitions of the official code "
              "(200-threshold AUPRO, trapezoidal AP); AUPRO (exact) and image AP (step-sum) are given beside them."]
    if results.get("few_shot"):
        from .fewshot_eval import markdown_section

        lines += markdown_section(results)
    notes = [f"- {c}: {m}: {why}" for c, r in results["classes"].items() for m, why in r["reason"].items()]
    if notes:
        lines += ["", "Undefined or partial metrics:", *notes]
    return "\n".join(lines) + "\n"


def random_weights_banner() -> str:
    """A loud multi-line warning for runs with random weights."""
    bar = "!" * (len(RANDOM_WEIGHTS_WARNING) + 8)
    return f"{bar}\n!!! {RANDOM_WEIGHTS_WARNING} !!!\n{bar}"


def load_model(cfg: EvalConfig) -> AnoCLIP:
    """The model a config asks for (registers ``model_config`` first)."""
    _check_device(cfg.device)
    if cfg.model_config:
        register_model_configs(cfg.model_config)
    return AnoCLIP.create(
        cfg.backbone, pretrained=cfg.pretrained, image_size=cfg.image_size, device=cfg.device,
        cache_dir=cfg.text_cache,
    )


def evaluate(cfg: EvalConfig, model: AnoCLIP | None = None) -> dict[str, Any]:
    """Run the evaluation; returns the results dict (also written to ``cfg.out`` when set).

    ``model`` overrides building one from ``cfg`` (backbone, pretrained, image size, device).
    """
    from .progress import progress

    started = time.perf_counter()
    samples = load_samples(cfg.dataset, cfg.root, cfg.classes)
    model = model if model is not None else load_model(cfg)
    if model.random_weights:
        print(random_weights_banner(), file=sys.stderr)
    by_class: dict[str, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.class_name, []).append(s)
    out_dir = Path(cfg.out) if cfg.out else None
    per_class: dict[str, dict[str, Any]] = {}
    overlays: dict[str, list[str]] = {}
    runs = 1 + (cfg.seeds if cfg.shots else 0)
    few_shot = None
    with progress(total=runs * len(samples), unit="img", desc="anoclip-eval", enabled=cfg.progress) as bar:
        for name, items in by_class.items():
            bar.set_postfix_str(name)
            outputs = predict_class(model, items, cfg, bar)
            per_class[name] = class_metrics(outputs)
            if out_dir is not None and cfg.overlays:
                overlays[name] = write_overlays(outputs, out_dir / "overlays", cfg.overlays)
        if cfg.shots:
            from .fewshot_eval import run_few_shot

            few_shot = run_few_shot(model, cfg, by_class, bar)
    results: dict[str, Any] = {
        "dataset": cfg.dataset,
        "root": str(Path(cfg.root).resolve()),
        "backbone": model.backbone,
        "pretrained": model.weights.source,
        "random_weights": bool(model.random_weights),
        "image_size": model.image_size,
        "patch_grid": list(model.grid_size),
        "tta": bool(cfg.tta),
        "tta_mode": cfg.tta_mode if cfg.tta else None,
        "views": cfg.use_views,
        "protocol": "two-crop" if cfg.dataset == "visa" else "single",
        "classes": per_class,
        "mean": mean_metrics(per_class),
        "metric_definitions": METRIC_DEFINITIONS,
        "overlays": overlays,
        "few_shot": few_shot,
        "seconds": round(time.perf_counter() - started, 3),
        "config": asdict(cfg),
    }
    if out_dir is not None:
        _write_text(out_dir / "results.json", json.dumps(_json_safe(results), indent=2) + "\n")
        _write_text(out_dir / "results.md", markdown_table(results))
    return results
