"""``Detector``: load an artifact once, turn images into anomaly maps, scores and defect regions.

Torch-free (numpy, OpenCV, ONNX Runtime / OpenVINO / TensorRT). Every image takes the same four
named steps, whether it comes alone (``predict``), in a list (``predict_batch`` / ``iter_predict``,
``batch`` images per backend call) or tiled:

    read -> pre_process -> forward -> post_process

``read`` decodes a file (or checks an array), ``pre_process`` is the core's own
``anoclip_core.transform`` (resize + normalise: the runtime sees exactly the tensor the PyTorch
core sees), ``forward`` is one backend call on a batch of pixels, ``post_process`` is
``runtime.postprocess`` (map at the ORIGINAL image size, label, regions). This class defines the
steps; ``runtime.pipeline.Pipeline`` runs them, one path for everything: ``predict(image)`` IS the
batch path with one item, tiled images (``tile=True``) are batches of one whose tiles the tiler
pre-processes and forwards, and the next batch is read and pre-processed on a worker thread while
``forward`` runs the current one (``runtime.prefetch``; ``InferConfig.prefetch = 0`` turns it off).
Artifact reading lives in ``runtime.artifact``, threshold and calibration rules in
``runtime.calibration`` / ``runtime.contract``.

Thread model: one loaded ``Detector`` may serve ``predict`` / ``predict_batch`` from several
threads at once. Everything it holds is read-only after ``load`` (manifest, prototypes,
calibration, pre-processing config); the only lazily filled cache (per-sentence text
embeddings for AnoCLIP+) is guarded by a lock. ONNX Runtime sessions are thread-safe for
``run``; the native TensorRT backend serialises its single execution context with its own lock
(see ``runtime.backends.trt``). No per-call state is kept, so a long run does not grow memory.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from anoclip_core.errors import ArtifactError, BankError, InferenceError, InputError
from anoclip_core.refbank import ReferenceBank
from anoclip_core.transform import (
    ImageLike,
    PreprocessConfig,
    check_image_array,
    normalize_rgb,
    preprocess_windows,
    read_image,
    to_rgb_float,
)

from . import contract as mf
from .artifact import check_prototypes, read_artifact, read_prototypes, read_sentences  # noqa: F401 (re-exported)
from .backends import DEFAULT_OUTPUTS, BackendChoice, check_backend_graph, check_precision, create_backend
from .calibration import (  # noqa: F401 (defaults re-exported)
    DEFAULT_IMAGE_THRESHOLD,
    DEFAULT_PIXEL_THRESHOLD,
    bind_calibration,
    calibration_binding,
    resolve_thresholds,
    weight_mismatch,
)
from .config import InferConfig
from .pipeline import Item, Pipeline, elapsed_ms
from .postprocess import find_regions
from .refs import FewShot
from .refsearch import make_search
from .result import RANDOM_WEIGHTS_WARNING, Result
from .tiler import StripOutput, StripStream, TileBatch

__all__ = ["RANDOM_WEIGHTS_WARNING", "Detector", "InferConfig", "Result", "read_artifact"]

log = logging.getLogger("anoclip.runtime")


class Detector(Pipeline):
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
        self.references: dict[str, ReferenceBank] = dict(references or {})
        self.calibration = bind_calibration(calibration or {}, self.calibration_binding)
        self._sentences: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()
        self.broken_references: dict[str, str] = {}  # class -> why its stored bank cannot be used
        self._warned: set[tuple[str, float | None]] = set()  # (class, weight) calibration mismatches said
        self.search_opts: dict[str, Any] = {}  # for runtime.refsearch.make_search (device_id, ...)
        self._searches: dict[str, tuple[ReferenceBank, Any]] = {}
        if self.random_weights:
            log.warning("!!! %s !!!", RANDOM_WEIGHTS_WARNING)

    # construction ----------------------------------------------------------------------------
    @classmethod
    def load(cls, artifact: str | os.PathLike, backend: str = "auto", precision: str | None = None,
             verify: bool = True, calibration: bool = True, **backend_opts: Any) -> Detector:
        """Validate the artifact (manifest, sha256 of every file) and start a backend.

        ``backend``: auto | ort-cpu | openvino | ort-cuda | ort-trt | trt (auto picks the fastest available
        and ``detector.backend_note`` says which and why). ``backend_opts`` go to the backend
        (``threads``, ``cache_dir``, ``device_id``, ...). ``calibration=False`` skips the artifact's
        calibration file (default thresholds), so ``anoclip calibrate`` can replace a broken one.
        """
        root = Path(artifact)
        manifest, protos, cal, banks = read_artifact(root, verify, calibration)
        for message in banks.broken.values():
            log.warning("%s", message)
        check_precision(backend, manifest, precision)
        check_backend_graph(backend, root, manifest, precision)
        choice: BackendChoice = create_backend(backend, root, manifest, precision, **backend_opts)
        det = cls(choice.backend, manifest, protos, root, cal, choice.describe(), precision, banks.usable)
        det.broken_references = dict(banks.broken)
        det.backend_name = choice.name
        det.running_precision = choice.precision
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

    # artifact: classes, prototypes, calibration ------------------------------------------------
    @property
    def classes(self) -> list[str]:
        return sorted(self.manifest["text"]["classes"])

    @property
    def image_size(self) -> int:
        return self.preprocess_config.image_size

    def prototypes(self, class_name: str) -> np.ndarray:
        """[1, 2, D] prototypes of a class; ``ArtifactError`` for a class the artifact lacks."""
        mf.require_class(self.manifest, class_name, self.artifact_dir)
        if class_name not in self._prototypes:
            raise ArtifactError(f"class {class_name!r} is listed in the manifest but has no prototypes in "
                                f"{self.manifest['text']['file']}")
        return self._prototypes[class_name]

    def sentences(self, class_name: str) -> np.ndarray:
        """[924, D] per-sentence text embeddings (for AnoCLIP+), read on first use."""
        with self._lock:
            if class_name not in self._sentences:
                self._sentences[class_name] = read_sentences(self.artifact_dir, self.manifest, class_name)
            return self._sentences[class_name]

    def calibration_binding(self, class_name: str, cfg: InferConfig | None = None) -> dict[str, Any]:
        """What a class's calibration depends on (``runtime.calibration.calibration_binding``), with
        the visual weight ``cfg`` fuses with (default settings when None)."""
        return calibration_binding(self.manifest, self.precision, self._prototypes.get(class_name), class_name,
                                   self.visual_weight(class_name, cfg))

    def visual_weight(self, class_name: str, cfg: InferConfig | None = None) -> float | None:
        """The few-shot weight a run with ``cfg`` fuses with for the class, None when it is zero-shot."""
        cfg = cfg or InferConfig(class_name)
        return float(cfg.visual_weight) if cfg.use_refs and class_name in self.references else None

    def calibration_warning(self, class_name: str, cfg: InferConfig | None = None) -> str | None:
        """Why the class's calibration does not apply to a run with ``cfg`` (another visual weight, or
        few-shot vs zero-shot), the first time it is asked for that class and weight; else None."""
        weight = self.visual_weight(class_name, cfg)
        why = weight_mismatch(self.calibration, class_name, weight)
        with self._lock:
            if why is None or (class_name, weight) in self._warned:
                return None
            self._warned.add((class_name, weight))
        return why

    def thresholds(self, class_name: str, threshold: float | None = None,
                   pixel_threshold: float | None = None, cfg: InferConfig | None = None) -> tuple[float, float, str]:
        """(image threshold, pixel threshold, source): explicit > calibration > default 0.5; the
        calibration only when made with the run's visual weight (a warning, once, otherwise)."""
        weight = self.visual_weight(class_name, cfg)
        if threshold is None or pixel_threshold is None:
            why = self.calibration_warning(class_name, cfg)
            if why is not None:
                log.warning("%s", why)
        return resolve_thresholds(self.calibration, class_name, threshold, pixel_threshold, weight)

    # the four steps ----------------------------------------------------------------------------
    def read(self, image: ImageLike, cfg: InferConfig) -> Item:
        """Decode a file or check an array: float RGB (untiled), or the array as stored (tiled:
        crops are converted tile by tile; a decoded file's dtype/shape is checked without reading pixels)."""
        if isinstance(image, (str, os.PathLike)):
            path: str | None = os.fspath(image)
            raw, order = read_image(image), "RGB"
        elif isinstance(image, np.ndarray):
            path, raw, order = None, image, cfg.channel_order
        else:
            raise InputError(f"expected an image path or a numpy array, got {type(image).__name__}")
        if cfg.tile:
            if path is not None:
                check_image_array(raw, order, name=path)
            return Item(image, path, raw=raw, channel_order=order)
        rgb = to_rgb_float(raw, order, name=path) if path is not None else to_rgb_float(raw, order)
        return Item(image, path, rgb=rgb, size=(int(rgb.shape[0]), int(rgb.shape[1])), channel_order=order)

    def pre_process(self, rgb: np.ndarray) -> np.ndarray:
        """H x W x 3 float RGB -> normalised pixels [3, S, S] (the core's exact transform)."""
        return normalize_rgb(rgb, self.preprocess_config)

    def pre_process_windows(self, tiles: Sequence[np.ndarray], channel_order: str) -> np.ndarray:
        """Crops -> [N, 3, S, S]: ``pre_process`` of each, bit for bit; a ``TileBatch``'s tiles on the
        same rows share the rows pass (``anoclip_core.transform.preprocess_windows``)."""
        if not isinstance(tiles, TileBatch):
            return super().pre_process_windows(tiles, channel_order)
        return preprocess_windows(tiles.raw, tiles.boxes, tiles.side, self.preprocess_config, channel_order)

    def fewshot(self, class_name: str, cfg: InferConfig) -> FewShot | None:
        """The class's reference bank with its weight and search, or None (zero-shot: no bank, or ``use_refs``
        off). A class whose stored bank is damaged raises ``BankError`` naming the file and the repair."""
        if cfg.use_refs and class_name in self.broken_references:
            raise BankError(self.broken_references[class_name])
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

    def forward(self, pixels: np.ndarray, class_name: str, tta: bool = False, fewshot: FewShot | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
        """Normalised pixels [B, 3, S, S] -> patch probabilities [B, h, w] and image scores [B]
        (fused with the visual anomaly of ``fewshot``'s bank when given, on the patch grid)."""
        extra = ("local_embeddings",) if fewshot is not None else ()
        if not tta:
            out = self.run_graph(pixels, class_name, ("patch_probs", "image_scores", *extra))
            probs = out["patch_probs"][:, 0]
        else:
            from .tta import adapted_patch_probs  # the only path that imports torch

            out = self.run_graph(pixels, class_name, ("local_tokens", "image_scores", *extra))
            probs = adapted_patch_probs(out["local_tokens"], self.sentences(class_name),
                                        self.prototypes(class_name)[0], self.temperature)
        if fewshot is None:
            return probs, out["image_scores"][:, 0]
        return fewshot.apply(probs, out["image_scores"][:, 0], out["local_embeddings"])

    infer_pixels = forward  # the name benchmarks and callers know

    def post_process(self, item: Item, amap: np.ndarray, score: float, cfg: InferConfig, tiles: int = 1) -> Result:
        """Map at the original size + image score -> label (image threshold) and regions (pixel
        threshold); a non-finite map or score is an ``InferenceError`` (no label given)."""
        if not np.isfinite(score) or not np.isfinite(amap).all():
            what = "score" if not np.isfinite(score) else "anomaly map"
            raise InferenceError(f"the {what} is NaN or infinite (the graph's output; check the artifact's "
                                 "prototypes and the image); no label given")
        t0 = time.perf_counter()
        img_thr, px_thr, src = self.thresholds(cfg.class_name, cfg.threshold, cfg.pixel_threshold, cfg)
        regions = find_regions(amap, px_thr, cfg.min_area, cfg.max_regions)
        item.timing["regions_ms"] = elapsed_ms(t0)
        bank = self.references.get(cfg.class_name) if cfg.use_refs else None  # what forward fused, if anything
        return Result(item.path, cfg.class_name, float(score), "anomaly" if score > img_thr else "normal", amap,
                      regions, img_thr, px_thr, src, (int(amap.shape[0]), int(amap.shape[1])), tiles, item.timing,
                      self.backend_name, self.random_weights, shots=bank.shots if bank else 0,
                      precision=self.running_precision,
                      visual_weight=float(cfg.visual_weight) if bank else None)

    def run_graph(self, pixels: np.ndarray, class_name: str, outputs: Sequence[str] = DEFAULT_OUTPUTS
                  ) -> dict[str, np.ndarray]:
        """Raw graph outputs for normalised pixels [B, 3, S, S] and one class."""
        return self.backend.run(pixels, self.prototypes(class_name), outputs)

    # public API ------------------------------------------------------------------------------
    def predict(self, image: ImageLike, class_name: str, config: InferConfig | None = None, **options: Any) -> Result:
        """One image (path or array) -> ``Result`` with the map at the image's ORIGINAL size.

        The batch path with one item. ``options`` override ``config`` fields (``tile=True``,
        ``threshold=0.7``, ``tta=True``, ``channel_order="BGR"``, ...). Raises ``AnoCLIPError``
        on bad input.
        """
        cfg = InferConfig.merged(class_name, config, options)
        self.prototypes(class_name)
        (item,) = self._items([image], cfg)
        if item.error is not None:
            raise item.error
        assert item.result is not None
        return item.result

    def predict_batch(self, images: Iterable[ImageLike], class_name: str, config: InferConfig | None = None,
                      **options: Any) -> list[Result]:
        """Several images, ``batch`` at a time through the backend. A bad image yields a ``Result``
        with ``error`` set; the others still get results. (A class the artifact lacks raises.) Arrays
        from an iterator (not a list) are copied as they are taken (see ``iter_predict``)."""
        return list(self.iter_predict(images, class_name, config, **options))

    def iter_predict(self, images: Iterable[ImageLike], class_name: str, config: InferConfig | None = None,
                     **options: Any) -> Iterator[Result]:
        """Generator form of ``predict_batch`` (bounded memory for long lists). Arrays from an
        iterator are copied as they are taken, so a camera loop may yield one reused frame buffer."""
        cfg = InferConfig.merged(class_name, config, options)
        self.prototypes(class_name)
        for item in self._items(images, cfg):
            yield self._result(item, cfg)

    def stream(self, class_name: str, config: InferConfig | None = None, stitch: bool = True,
               **options: Any) -> StripStream:
        """A ``StripStream`` for line-scan strips of one class (see ``runtime.tiler``); the rows a
        push carries over are copied, so every strip may come in the same reused buffer."""
        cfg = InferConfig.merged(class_name, config, options)
        self.prototypes(class_name)

        def finish(s: StripOutput) -> Result:
            item = Item(None)
            self._post(item, s.anomaly_map, s.score, cfg)
            res = self._result(item, cfg)
            res.index, res.y0 = s.index, s.y0
            return res

        infer = self.tile_infer(class_name, cfg.channel_order, cfg.tta, cfg.prefetch, self.fewshot(class_name, cfg))
        return StripStream(infer, cfg.tile_size, cfg.overlap, cfg.batch, stitch, finish)
