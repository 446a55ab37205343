"""The one path every image takes: read -> pre_process -> forward -> post_process.

``Pipeline`` runs the four steps a subclass defines (``Detector``: the artifact's transform,
backend and post-processing) over images one batch at a time: ``read`` + ``pre_process`` of a
whole batch (``_prepare``; a bad image keeps its error and the others go on), then ONE ``forward``
for its good images (``_forward_batch``) and ``post_process`` of each (``_post_batch``). One image
is a batch of one; a tiled image is a batch of one whose ``forward`` is the tiler (``_run_tiled``, which runs
``pre_process`` + ``forward`` per batch of tiles via ``tile_infer``). The steps overlap
(``runtime.prefetch``): a later batch is prepared on one worker and the next one forwarded on
another while the caller post-processes the current one, so results and errors are the same, in
the same order, with or without ``InferConfig.prefetch``.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from anoclip_core.errors import AnoCLIPError, InferenceError
from anoclip_core.transform import ImageLike, to_rgb_float

from .config import InferConfig
from .postprocess import anomaly_map
from .prefetch import Prefetch
from .result import Result
from .tiler import StagedInfer, predict_tiled


@dataclass
class Forwarded:
    """One batch after ``forward``: its good items and their patch probabilities and scores."""

    items: list[Item]
    probs: np.ndarray
    scores: np.ndarray
    infer_ms: float


def elapsed_ms(t0: float) -> float:
    """Milliseconds since ``t0`` (a ``time.perf_counter()`` reading)."""
    return (time.perf_counter() - t0) * 1e3


@dataclass
class Item:
    """One input on its way through the steps: what ``read`` made of it (float RGB and its size,
    untiled; the array as stored, tiled), its pixels once pre-processed (the RGB copy is then
    dropped), the timings so far, and the result or the error that stopped it."""

    image: Any
    path: str | None = None
    rgb: np.ndarray | None = None
    size: tuple[int, int] = (0, 0)
    raw: np.ndarray | None = None
    channel_order: str = "RGB"
    pixels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    timing: dict[str, float] = field(default_factory=dict)
    result: Result | None = None
    error: AnoCLIPError | None = None


def _taken(images: Iterable[ImageLike]) -> Iterable[ImageLike]:
    """``images`` as the steps may hold them while later ones are taken: a sequence as it is, an
    iterator's arrays copied as they come, since a camera loop may hand every frame in one reused
    buffer (which the next frame would overwrite while this one still waits in a batch)."""
    if isinstance(images, Sequence):
        return images
    return (im.copy() if isinstance(im, np.ndarray) else im for im in images)


def _batches(images: Iterable[ImageLike], size: int) -> Iterator[list[ImageLike]]:
    """``images`` in lists of ``size`` (the last one shorter), read lazily."""
    chunk: list[ImageLike] = []
    for im in _taken(images):
        chunk.append(im)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class Pipeline:
    """The batch path over four steps; subclasses implement ``read``, ``pre_process``, ``forward``
    and ``post_process`` and set ``backend_name`` / ``random_weights`` (named in error results)."""

    backend_name: str = "backend"
    running_precision: str | None = None  # what the backend computes in (``backends.running_precision``)
    random_weights: bool = False

    def read(self, image: ImageLike, cfg: InferConfig) -> Item:
        raise NotImplementedError

    def pre_process(self, rgb: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def pre_process_windows(self, tiles: Sequence[np.ndarray], channel_order: str) -> np.ndarray:
        """Crops as stored (a ``TileBatch`` or a plain list) -> normalised pixels [N, 3, S, S]; the same
        values as ``pre_process`` of each crop (a subclass may share work between a ``TileBatch``'s tiles)."""
        return np.stack([self.pre_process(to_rgb_float(c, channel_order)) for c in tiles])

    def forward(self, pixels: np.ndarray, class_name: str, tta: bool = False, fewshot: Any = None
                ) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def fewshot(self, class_name: str, cfg: InferConfig) -> Any:
        """The class's few-shot reference bank and search for ``forward``, or None (zero-shot)."""
        return None

    def post_process(self, item: Item, amap: np.ndarray, score: float, cfg: InferConfig, tiles: int = 1) -> Result:
        raise NotImplementedError

    def _prepare(self, images: Sequence[ImageLike], cfg: InferConfig) -> list[Item]:
        """``read`` + ``pre_process`` of one batch (on the prefetch worker); a bad image keeps its error."""
        items = []
        for image in images:
            t0 = time.perf_counter()
            try:
                item = self.read(image, cfg)
                if item.rgb is not None:
                    item.pixels, item.rgb = self.pre_process(item.rgb), None
            except AnoCLIPError as err:
                item = Item(image, error=err)
            item.timing["load_ms" if cfg.tile else "preprocess_ms"] = elapsed_ms(t0)
            items.append(item)
        return items

    def _forward_batch(self, items: list[Item], cfg: InferConfig) -> Forwarded | None:
        """ONE ``forward`` for the batch's good items (None when there are none)."""
        ok = [item for item in items if item.error is None]
        if not ok:
            return None
        t0 = time.perf_counter()
        probs, scores = self.forward(np.stack([item.pixels for item in ok]), cfg.class_name, cfg.tta,
                                     self.fewshot(cfg.class_name, cfg))
        return Forwarded(ok, probs, scores, elapsed_ms(t0) / len(ok))

    def _post_batch(self, items: list[Item], out: Forwarded | None, cfg: InferConfig) -> list[Item]:
        """The map at each good item's size, then ``post_process`` of each."""
        if out is None:
            return items
        for item, p, s in zip(out.items, out.probs, out.scores, strict=True):
            item.timing["infer_ms"] = out.infer_ms
            t1 = time.perf_counter()
            amap = anomaly_map(p, item.size)
            item.timing["map_ms"] = elapsed_ms(t1)
            if not self._post(item, amap, float(s), cfg):
                continue
            item.timing["total_ms"] = sum(item.timing[k] for k in ("preprocess_ms", "infer_ms", "map_ms",
                                                                   "regions_ms"))
            item.timing["batch"] = float(len(out.items))
        return items

    def _post(self, item: Item, amap: np.ndarray, score: float, cfg: InferConfig, tiles: int = 1) -> bool:
        """``post_process`` into ``item.result``; a non-finite output becomes ``item.error``."""
        try:
            item.result = self.post_process(item, amap, score, cfg, tiles)
        except InferenceError as err:
            item.error = err
        return item.error is None

    def _run_tiled(self, item: Item, cfg: InferConfig) -> Item:
        """A tiled image: the tiler runs ``pre_process`` + ``forward`` per batch of tiles and blends."""
        if item.error is not None or item.raw is None:
            return item
        t0 = time.perf_counter()
        try:
            infer = self.tile_infer(cfg.class_name, item.channel_order, cfg.tta, cfg.prefetch,
                                    self.fewshot(cfg.class_name, cfg))
            out = predict_tiled(item.raw, infer,
                                cfg.tile_size, cfg.overlap, cfg.batch)
            item.timing["tiled_ms"] = elapsed_ms(t0)
            item.result = self.post_process(item, out.anomaly_map, out.score, cfg, len(out.boxes))
        except AnoCLIPError as err:
            item.error = err
            return item
        item.timing["total_ms"] = item.timing["load_ms"] + item.timing["tiled_ms"] + item.timing["regions_ms"]
        return item

    def _items(self, images: Iterable[ImageLike], cfg: InferConfig) -> Iterator[Item]:
        """Every image through the four steps, in order. Three stages: a later batch is read and
        pre-processed on one worker, the next batch is forwarded on another, while the caller
        post-processes this one (tiled: one image per batch, the tiler pipelines its own tiles)."""
        with Prefetch(_batches(images, 1 if cfg.tile else cfg.batch), lambda b: self._prepare(b, cfg),
                      cfg.prefetch) as prepared:
            if cfg.tile:
                for _, items in prepared:
                    yield from (self._run_tiled(item, cfg) for item in items)
                return
            with Prefetch(prepared, lambda batch: self._forward_batch(batch[1], cfg), cfg.prefetch) as forwarded:
                for (_, items), out in forwarded:
                    yield from self._post_batch(items, out, cfg)

    def tile_infer(self, class_name: str, channel_order: str = "RGB", tta: bool = False,
                   prefetch: int = 1, fewshot: Any = None) -> StagedInfer:
        """The tiler's ``InferFn``: raw crops -> (patch_probs [N, h, w], image_scores [N]), in two
        steps (``pre_process``, ``forward``) so the tiler can prepare the next crops while one runs."""

        def prepare(crops: Sequence[np.ndarray]) -> np.ndarray:
            return self.pre_process_windows(crops, channel_order)

        return StagedInfer(prepare, lambda pixels: self.forward(pixels, class_name, tta, fewshot), prefetch)

    def _result(self, item: Item, cfg: InferConfig) -> Result:
        """The item's ``Result``, or one with ``error`` set naming what stopped it."""
        if item.result is not None and item.error is None:
            return item.result
        path = os.fspath(item.image) if isinstance(item.image, (str, os.PathLike)) else None
        return Result(path, cfg.class_name, error=f"{type(item.error).__name__}: {item.error}", timing=item.timing,
                      backend=self.backend_name, random_weights=self.random_weights,
                      precision=self.running_precision)
