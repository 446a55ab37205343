"""``Detector``: load an artifact once, turn images into anomaly maps, scores and defect regions.

Torch-free (numpy, OpenCV, ONNX Runtime / TensorRT). Pre-processing is the core's own
``anoclip_core.transform`` (so the runtime sees exactly the tensor the PyTorch core sees);
post-processing is ``runtime.postprocess`` (maps at the ORIGINAL image size).

Thread model: one loaded ``Detector`` may serve ``predict`` / ``predict_batch`` from several
threads at once. Everything it holds is read-only after ``load`` (manifest, prototypes,
calibration, pre-processing config); the only lazily filled cache (per-sentence text
embeddings for AnoCLIP+) is guarded by a lock. ONNX Runtime sessions are thread-safe for
``run``; the native TensorRT backend serialises its single execution context with its own lock
(see ``runtime.backends.trt``). No per-call state is kept, so a long run does not grow memory.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from anoclip_core import staging
from anoclip_core.artlock import consistent_read
from anoclip_core.errors import AnoCLIPError, ArtifactError, InferenceError, InputError
from anoclip_core.refbank import DEFAULT_VISUAL_WEIGHT, ReferenceBank, check_weight
from anoclip_core.transform import ImageLike, PreprocessConfig, normalize_rgb, read_image, to_rgb_float

from . import contract as mf
from .backends import DEFAULT_OUTPUTS, BackendChoice, check_backend_graph, check_precision, create_backend
from .contract import CALIBRATION_NAME, check_threshold, load_calibration, validate_calibration
from .postprocess import Region, anomaly_map, find_regions
from .refs import FewShot, load_banks
from .refsearch import make_search
from .tiler import StripOutput, StripStream, predict_tiled

log = logging.getLogger("anoclip.runtime")

RANDOM_WEIGHTS_WARNING = (
    "RANDOM WEIGHTS: this artifact was exported without pretrained weights; scores are NOT meaningful"
)
DEFAULT_IMAGE_THRESHOLD = 0.5
DEFAULT_PIXEL_THRESHOLD = 0.5


@dataclass
class InferConfig:
    """Every inference setting, from the CLI (or a caller) down to ``Detector``; one typed object.

    Thresholds are in the scores' own units (probabilities in [0, 1]); ``None`` means: the
    artifact's calibration for the class when present, else 0.5.
    """

    class_name: str
    backend: str = "auto"
    precision: str | None = None
    batch: int = 8
    tile: bool = False
    tile_size: int | None = None
    overlap: int | None = None
    threshold: float | None = None
    pixel_threshold: float | None = None
    min_area: int = 1
    max_regions: int | None = 100
    tta: bool = False
    channel_order: str = "RGB"
    out_dir: str | None = None
    overlays: bool = True
    masks: bool = True
    alpha: float = 0.5
    threads: int | None = None
    verify: bool = True
    use_refs: bool = True
    visual_weight: float = DEFAULT_VISUAL_WEIGHT

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise InputError(f"batch must be >= 1, got {self.batch}")
        if self.tile_size is not None and self.tile_size < 2:
            raise InputError(f"tile size must be >= 2 pixels (leave it out for the default), got {self.tile_size}")
        if self.overlap is not None and self.overlap < 0:
            raise InputError(f"overlap must be >= 0 pixels, got {self.overlap}")
        if self.overlap is not None and self.tile_size is not None and self.overlap > self.tile_size // 2:
            raise InputError(f"overlap {self.overlap} is over half the tile size {self.tile_size}")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"threads must be >= 1, got {self.threads}")
        for name in ("threshold", "pixel_threshold"):
            v = getattr(self, name)
            if v is not None:
                check_threshold(v, name)
        if self.min_area < 1:
            raise InputError(f"min_area must be >= 1, got {self.min_area}")
        if self.channel_order not in ("RGB", "BGR"):
            raise InputError(f"channel_order must be RGB or BGR, got {self.channel_order!r}")
        check_weight(self.visual_weight)

    def replace(self, **changes: Any) -> InferConfig:
        return replace(self, **changes)


@dataclass
class Result:
    """One image's outcome; ``error`` is set (and score/map are None) when that image failed."""

    path: str | None
    class_name: str
    score: float | None = None
    label: str | None = None
    anomaly_map: np.ndarray | None = field(default=None, repr=False)
    regions: list[Region] = field(default_factory=list)
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    threshold_source: str | None = None
    size: tuple[int, int] | None = None
    tiles: int = 1
    timing: dict[str, float] = field(default_factory=dict)
    backend: str | None = None
    random_weights: bool = False
    error: str | None = None
    index: int | None = None
    y0: int | None = None
    shots: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def is_anomaly(self) -> bool:
        return self.label == "anomaly"

    def mask(self) -> np.ndarray:
        """Binary defect mask (uint8 0/255) of ``anomaly_map > pixel_threshold``."""
        if self.anomaly_map is None:
            raise InputError(f"no anomaly map for {self.path}: {self.error}")
        return ((self.anomaly_map > np.float32(self.pixel_threshold)) * 255).astype(np.uint8)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "class": self.class_name}
        if self.index is not None:
            d["index"] = self.index
        if self.y0 is not None:
            d["y0"] = self.y0
        if self.error is not None:
            d["error"] = self.error
        else:
            d.update({
                "score": round(float(self.score or 0.0), 6), "label": self.label,
                "image_threshold": self.image_threshold, "pixel_threshold": self.pixel_threshold,
                "threshold_source": self.threshold_source,
                "size": list(self.size) if self.size else None, "tiles": self.tiles,
                "regions": [r.to_dict() for r in self.regions],
            })
        d["timing"] = {k: round(v, 3) for k, v in self.timing.items()}
        d["backend"] = self.backend
        d["references"] = self.shots > 0
        d["shots"] = self.shots
        d["random_weights"] = self.random_weights
        if self.random_weights:
            d["warning"] = RANDOM_WEIGHTS_WARNING
        return d


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


#: Largest accepted deviation of a stored prototype's L2 norm from 1 (float32 rounding is ~1e-7).
UNIT_NORM_TOL = 1e-3


def check_prototypes(protos: Mapping[str, np.ndarray], text_file: str) -> None:
    """Every class's prototypes [2, D] finite and L2-normalised, as the exporter writes them."""
    for name, p in protos.items():
        arr = np.asarray(p, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[0] != 2:
            raise ArtifactError(f"{text_file}: prototypes of class {name!r} must be [2, D], got {list(arr.shape)}")
        if not np.isfinite(arr).all():
            raise ArtifactError(f"{text_file}: prototypes of class {name!r} contain NaN or infinite values")
        norms = np.linalg.norm(arr, axis=1)
        if np.abs(norms - 1.0).max() > UNIT_NORM_TOL:
            raise ArtifactError(f"{text_file}: prototypes of class {name!r} are not unit-norm "
                                f"(norms {norms[0]:.4g}, {norms[1]:.4g})")


def read_artifact(root: Path, verify: bool = True
                  ) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any], dict[str, ReferenceBank]]:
    """Manifest (sha256 of every file with ``verify``), prototypes, calibration and reference banks of one artifact,
    read as one consistent snapshot (re-read under the artifact's shared lock when a writer was
    half-way)."""

    def read() -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any], dict[str, ReferenceBank]]:
        manifest = mf.read_manifest(root, check_files=verify)
        protos = read_prototypes(root, manifest)
        check_prototypes(protos, manifest["text"]["file"])
        return manifest, protos, load_calibration(root, manifest if verify else None), load_banks(root, manifest)

    if staging.has_leftovers(root):
        for note in mf.recover_artifact(root):
            log.warning("%s", note)
    return consistent_read(root, read)


def read_prototypes(artifact_dir: str | os.PathLike, manifest: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Every listed class's prototypes from the text file, each checked to be [2, embed_dim]
    (the graph's declared ``text_prototypes`` width), so a mismatch fails here, not mid-batch."""
    text_path = Path(artifact_dir) / manifest["text"]["file"]
    try:
        with np.load(text_path) as npz:
            protos = {c: npz[f"{c}/prototypes"] for c in manifest["text"]["classes"] if f"{c}/prototypes" in npz}
    except Exception as err:  # noqa: BLE001 - OSError, BadZipFile, ValueError, pickle refusals
        raise ArtifactError(f"cannot read text embeddings {text_path}: {type(err).__name__}: {err}") from None
    width = int(manifest["embed_dim"])
    for name, arr in protos.items():
        if arr.shape != (2, width):
            raise ArtifactError(f"{text_path.name}: prototypes of class {name!r} have shape {list(arr.shape)}, "
                                f"the graph takes [2, {width}] (manifest embed_dim)")
    return protos


class Detector:
    """A loaded artifact + backend. ``Detector.load(ART).predict(image, "bottle")`` -> ``Result``."""

    def __init__(
        self,
        backend: Any,
        manifest: Mapping[str, Any],
        prototypes: Mapping[str, np.ndarray],
        artifact_dir: str | os.PathLike | None = None,
        calibration: Mapping[str, Any] | None = None,
        backend_note: str | None = None,
        precision: str | None = None,
        references: Mapping[str, ReferenceBank] | None = None,
    ) -> None:
        self.backend = backend
        self.backend_name = getattr(backend, "name", type(backend).__name__)
        self.backend_note = backend_note or f"backend {self.backend_name}"
        self.manifest = dict(manifest)
        self.artifact_dir = Path(artifact_dir) if artifact_dir is not None else None
        self.preprocess_config = PreprocessConfig.from_dict(self.manifest["preprocess"])
        self.temperature = float(self.manifest.get("temperature", 1.0))
        self.random_weights = bool(self.manifest.get("pretrained", {}).get("random_weights", False))
        self._prototypes = {k: np.ascontiguousarray(v, dtype=np.float32).reshape(1, 2, -1)
                            for k, v in prototypes.items()}
        self.precision = precision or self.manifest.get("default_model")
        self.calibration = self._check_calibration(calibration or {})
        self._sentences: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()
        self.references: dict[str, ReferenceBank] = dict(references or {})
        self.search_opts: dict[str, Any] = {}  # for runtime.refsearch.make_search (device_id, ...)
        self._searches: dict[str, tuple[ReferenceBank, Any]] = {}
        if self.random_weights:
            log.warning("!!! %s !!!", RANDOM_WEIGHTS_WARNING)

    # construction ----------------------------------------------------------------------------
    @classmethod
    def load(cls, artifact: str | os.PathLike, backend: str = "auto", precision: str | None = None,
             verify: bool = True, **backend_opts: Any) -> Detector:
        """Validate the artifact (manifest, sha256 of every file) and start a backend.

        ``backend``: auto | ort-cpu | openvino | ort-cuda | ort-trt | trt (auto picks the fastest available
        and ``detector.backend_note`` says which and why). ``backend_opts`` go to the backend
        (``threads``, ``cache_dir``, ``device_id``, ...).
        """
        root = Path(artifact)
        manifest, protos, calibration, banks = read_artifact(root, verify)
        check_precision(backend, manifest, precision)
        check_backend_graph(backend, root, manifest, precision)
        choice: BackendChoice = create_backend(backend, root, manifest, precision, **backend_opts)
        det = cls(choice.backend, manifest, protos, root, calibration, choice.describe(), precision, banks)
        det.backend_name = choice.name
        det.search_opts = {"device_id": backend_opts.get("device_id", 0)}
        return det

    def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if close:
            close()

    def __enter__(self) -> Detector:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # calibration -----------------------------------------------------------------------------
    def calibration_binding(self, class_name: str) -> dict[str, Any]:
        """What a class's calibration depends on: the graph file's sha256 and the class prototypes.

        (Not the manifest: ``add-class`` rewrites it without changing existing classes' scores.)
        """
        model_file = self.manifest.get("models", {}).get(self.precision, {}).get("file")
        protos = self._prototypes.get(class_name)
        return {"model": self.precision, "graph_sha256": self.manifest.get("files", {}).get(model_file),
                "prototypes_sha256": hashlib.sha256(protos.tobytes()).hexdigest() if protos is not None else None}

    def _check_calibration(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """Keep the classes whose calibration was made with this graph and these prototypes."""
        if not data:
            return {}
        validate_calibration(data, CALIBRATION_NAME)
        kept = {}
        for cls_name, entry in data.get("classes", {}).items():
            if "binding" in entry and entry["binding"] != self.calibration_binding(cls_name):
                log.warning("calibration for %r was made with another graph or other text embeddings "
                            "(re-exported artifact?); ignoring it, re-run anoclip calibrate", cls_name)
            else:
                kept[cls_name] = entry
        return {**data, "classes": kept}

    # properties ------------------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        return sorted(self.manifest["text"]["classes"])

    @property
    def image_size(self) -> int:
        return self.preprocess_config.image_size

    def prototypes(self, class_name: str) -> np.ndarray:
        """[1, 2, D] prototypes of a class; ``ArtifactError`` for a class the artifact lacks."""
        mf.require_class(self.manifest, class_name)
        if class_name not in self._prototypes:
            raise ArtifactError(f"class {class_name!r} is listed in the manifest but has no prototypes in "
                                f"{self.manifest['text']['file']}")
        return self._prototypes[class_name]

    def sentences(self, class_name: str) -> np.ndarray:
        """[924, D] per-sentence text embeddings (for AnoCLIP+), read on first use."""
        with self._lock:
            if class_name not in self._sentences:
                if self.artifact_dir is None:
                    raise ArtifactError("this detector has no artifact folder to read sentence embeddings from")
                key = f"{class_name}/sentences"
                with np.load(self.artifact_dir / self.manifest["text"]["file"]) as npz:
                    if key not in npz:
                        raise ArtifactError(f"artifact text embeddings lack {key!r} (needed by --tta)")
                    self._sentences[class_name] = np.asarray(npz[key], dtype=np.float32)
            return self._sentences[class_name]

    def thresholds(self, class_name: str, threshold: float | None = None,
                   pixel_threshold: float | None = None) -> tuple[float, float, str]:
        """(image threshold, pixel threshold, source): explicit > calibration > default 0.5."""
        cal = self.calibration.get("classes", {}).get(class_name) if self.calibration else None
        if threshold is not None:
            img, s1 = float(threshold), "given"
        elif cal:
            img, s1 = float(cal["image_threshold"]), "calibration"
        else:
            img, s1 = DEFAULT_IMAGE_THRESHOLD, "default"
        if pixel_threshold is not None:
            px, s2 = float(pixel_threshold), "given"
        elif cal:
            px, s2 = float(cal["pixel_threshold"]), "calibration"
        else:
            px, s2 = DEFAULT_PIXEL_THRESHOLD, "default"
        src = s1 if s1 == s2 else f"image:{s1},pixel:{s2}"
        return img, px, src

    # inference core --------------------------------------------------------------------------
    def run_graph(self, pixels: np.ndarray, class_name: str, outputs: Sequence[str] = DEFAULT_OUTPUTS
                  ) -> dict[str, np.ndarray]:
        """Raw graph outputs for normalised pixels [B, 3, S, S] and one class."""
        return self.backend.run(pixels, self.prototypes(class_name), outputs)

    def fewshot(self, class_name: str, cfg: InferConfig) -> FewShot | None:
        """The class's reference bank with its weight and search, or None (zero-shot: no bank, or ``use_refs`` off)."""
        bank = self.references.get(class_name) if cfg.use_refs else None
        if bank is None:
            return None
        with self._lock:  # one search per bank: a device search holds the bank on the GPU
            cached = self._searches.get(class_name)
            if cached is None or cached[0] is not bank:
                search, where = make_search(bank, self.backend_name, self.artifact_dir, self.manifest,
                                            **self.search_opts)
                log.info("reference bank for %r: %d shots, %d patches, search on %s", class_name, bank.shots,
                         bank.size, where)
                cached = self._searches[class_name] = (bank, search)
        return FewShot(bank, cfg.visual_weight, cached[1])

    def infer_pixels(self, pixels: np.ndarray, class_name: str, tta: bool = False,
                     fewshot: FewShot | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Normalised pixels [B, 3, S, S] -> patch probabilities [B, h, w] and image scores [B]
        (fused with the visual anomaly of ``fewshot``'s bank when given)."""
        extra = ("local_embeddings",) if fewshot is not None else ()
        if not tta:
            out = self.run_graph(pixels, class_name, ("patch_probs", "image_scores") + extra)
            probs = out["patch_probs"][:, 0]
        else:
            from .tta import adapted_patch_probs  # the only path that imports torch

            out = self.run_graph(pixels, class_name, ("local_tokens", "image_scores") + extra)
            probs = adapted_patch_probs(out["local_tokens"], self.sentences(class_name),
                                        self.prototypes(class_name)[0], self.temperature)
        if fewshot is None:
            return probs, out["image_scores"][:, 0]
        return fewshot.apply(probs, out["image_scores"][:, 0], out["local_embeddings"])

    def _to_rgb(self, image: ImageLike, channel_order: str) -> tuple[np.ndarray, str | None]:
        if isinstance(image, (str, os.PathLike)):
            p = os.fspath(image)
            return to_rgb_float(read_image(p), "RGB", name=p), p
        if not isinstance(image, np.ndarray):
            raise InputError(f"expected an image path or a numpy array, got {type(image).__name__}")
        return to_rgb_float(image, channel_order), None

    def _raw(self, image: ImageLike, channel_order: str) -> tuple[np.ndarray, str, str | None]:
        """As stored (for tiling: crops are converted tile by tile), with its channel order."""
        if isinstance(image, (str, os.PathLike)):
            p = os.fspath(image)
            raw = read_image(p)
            to_rgb_float(raw[:2, :2], "RGB", name=p)  # dtype/shape check up front
            return raw, "RGB", p
        if not isinstance(image, np.ndarray):
            raise InputError(f"expected an image path or a numpy array, got {type(image).__name__}")
        return image, channel_order, None

    def tile_infer(self, class_name: str, channel_order: str = "RGB", tta: bool = False,
                   fewshot: FewShot | None = None):
        """An ``InferFn`` for the tiler: raw crops -> (patch_probs [N, h, w], image_scores [N])."""
        cfg = self.preprocess_config

        def infer(crops: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
            px = np.stack([normalize_rgb(to_rgb_float(c, channel_order), cfg) for c in crops])
            return self.infer_pixels(px, class_name, tta, fewshot)

        return infer

    def _finish(self, path: str | None, class_name: str, amap: np.ndarray, score: float, cfg: InferConfig,
                timing: dict[str, float], tiles: int = 1) -> Result:
        if not np.isfinite(score) or not np.isfinite(amap).all():
            what = "score" if not np.isfinite(score) else "anomaly map"
            raise InferenceError(f"the {what} is NaN or infinite (the graph's output; check the artifact's "
                                 "prototypes and the image); no label given")
        t0 = time.perf_counter()
        img_thr, px_thr, src = self.thresholds(class_name, cfg.threshold, cfg.pixel_threshold)
        regions = find_regions(amap, px_thr, cfg.min_area, cfg.max_regions)
        timing["regions_ms"] = _ms(t0)
        few = self.fewshot(class_name, cfg)
        return Result(path, class_name, float(score), "anomaly" if score > img_thr else "normal", amap, regions,
                      img_thr, px_thr, src, (int(amap.shape[0]), int(amap.shape[1])), tiles, timing,
                      self.backend_name, self.random_weights, shots=few.shots if few else 0)

    def _config(self, class_name: str, cfg: InferConfig | None, overrides: Mapping[str, Any]) -> InferConfig:
        base = cfg or InferConfig(class_name=class_name)
        known = {f.name for f in fields(InferConfig)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise TypeError(f"unknown inference option(s): {', '.join(bad)}")
        return replace(base, class_name=class_name, **overrides)

    # public API ------------------------------------------------------------------------------
    def predict(self, image: ImageLike, class_name: str, config: InferConfig | None = None, **options: Any) -> Result:
        """One image (path or array) -> ``Result`` with the map at the image's ORIGINAL size.

        ``options`` override ``config`` fields (``tile=True``, ``threshold=0.7``, ``tta=True``,
        ``channel_order="BGR"``, ...). Raises ``AnoCLIPError`` on bad input.
        """
        cfg = self._config(class_name, config, options)
        self.prototypes(class_name)
        t_start = time.perf_counter()
        if cfg.tile:
            t0 = time.perf_counter()
            raw, order, path = self._raw(image, cfg.channel_order)
            load_ms = _ms(t0)
            t0 = time.perf_counter()
            out = predict_tiled(raw, self.tile_infer(class_name, order, cfg.tta, self.fewshot(class_name, cfg)),
                                cfg.tile_size, cfg.overlap, cfg.batch)
            timing = {"load_ms": load_ms, "tiled_ms": _ms(t0)}
            res = self._finish(path, class_name, out.anomaly_map, out.score, cfg, timing, len(out.boxes))
        else:
            t0 = time.perf_counter()
            rgb, path = self._to_rgb(image, cfg.channel_order)
            px = normalize_rgb(rgb, self.preprocess_config)[None]
            pre_ms = _ms(t0)
            t0 = time.perf_counter()
            probs, scores = self.infer_pixels(px, class_name, cfg.tta, self.fewshot(class_name, cfg))
            inf_ms = _ms(t0)
            t0 = time.perf_counter()
            amap = anomaly_map(probs[0], rgb.shape[:2])
            timing = {"preprocess_ms": pre_ms, "infer_ms": inf_ms, "map_ms": _ms(t0)}
            res = self._finish(path, class_name, amap, float(scores[0]), cfg, timing)
        res.timing["total_ms"] = _ms(t_start)
        return res

    def predict_batch(self, images: Iterable[ImageLike], class_name: str, config: InferConfig | None = None,
                      **options: Any) -> list[Result]:
        """Several images, ``batch`` at a time through the backend. A bad image yields a ``Result``
        with ``error`` set; the others still get results. (A class the artifact lacks raises.)"""
        return list(self.iter_predict(images, class_name, config, **options))

    def iter_predict(self, images: Iterable[ImageLike], class_name: str, config: InferConfig | None = None,
                     **options: Any):
        """Generator form of ``predict_batch`` (bounded memory for long lists)."""
        cfg = self._config(class_name, config, options)
        self.prototypes(class_name)
        chunk: list[ImageLike] = []
        for im in images:
            chunk.append(im)
            if len(chunk) == cfg.batch:
                yield from self._predict_chunk(chunk, cfg)
                chunk = []
        if chunk:
            yield from self._predict_chunk(chunk, cfg)

    def _error(self, image: Any, cfg: InferConfig, err: Exception, timing: dict[str, float] | None = None) -> Result:
        path = os.fspath(image) if isinstance(image, (str, os.PathLike)) else None
        return Result(path, cfg.class_name, error=f"{type(err).__name__}: {err}", timing=timing or {},
                      backend=self.backend_name, random_weights=self.random_weights)

    def _predict_chunk(self, images: Sequence[ImageLike], cfg: InferConfig) -> list[Result]:
        if cfg.tile:
            out = []
            for im in images:
                try:
                    out.append(self.predict(im, cfg.class_name, cfg))
                except AnoCLIPError as err:
                    out.append(self._error(im, cfg, err))
            return out
        slots: list[Any] = [None] * len(images)
        ok: list[tuple[int, np.ndarray, np.ndarray, str | None, float]] = []
        for i, im in enumerate(images):
            t0 = time.perf_counter()
            try:
                rgb, path = self._to_rgb(im, cfg.channel_order)
                px = normalize_rgb(rgb, self.preprocess_config)
                ok.append((i, px, np.array(rgb.shape[:2]), path, _ms(t0)))
            except AnoCLIPError as err:
                slots[i] = self._error(im, cfg, err, {"preprocess_ms": _ms(t0)})
        if ok:
            t0 = time.perf_counter()
            probs, scores = self.infer_pixels(np.stack([o[1] for o in ok]), cfg.class_name, cfg.tta,
                                              self.fewshot(cfg.class_name, cfg))
            inf_ms = _ms(t0) / len(ok)
            for (i, _, hw, path, pre_ms), p, s in zip(ok, probs, scores, strict=True):
                t1 = time.perf_counter()
                amap = anomaly_map(p, (int(hw[0]), int(hw[1])))
                timing = {"preprocess_ms": pre_ms, "infer_ms": inf_ms, "map_ms": _ms(t1)}
                try:
                    res = self._finish(path, cfg.class_name, amap, float(s), cfg, timing)
                except InferenceError as err:
                    slots[i] = self._error(images[i], cfg, err, timing)
                    continue
                res.timing["total_ms"] = pre_ms + inf_ms + res.timing["map_ms"] + res.timing["regions_ms"]
                res.timing["batch"] = float(len(ok))
                slots[i] = res
        return slots

    def stream(self, class_name: str, config: InferConfig | None = None, stitch: bool = True,
               **options: Any) -> StripStream:
        """A ``StripStream`` for line-scan strips of one class (see ``runtime.tiler``)."""
        cfg = self._config(class_name, config, options)
        self.prototypes(class_name)

        def finish(s: StripOutput) -> Result:
            try:
                res = self._finish(None, class_name, s.anomaly_map, s.score, cfg, {})
            except InferenceError as err:
                res = self._error(None, cfg, err)
            res.index, res.y0 = s.index, s.y0
            return res

        return StripStream(self.tile_infer(class_name, cfg.channel_order, cfg.tta, self.fewshot(class_name, cfg)),
                           cfg.tile_size, cfg.overlap, cfg.batch, stitch, finish)
