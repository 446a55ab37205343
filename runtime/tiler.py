"""Tiling for images far larger than the model input (line-scan strips, e.g. 16384 x 1024).

Tile model
----------
Tiles are squares of side ``t`` (default: the image's short side, i.e. the strip height; never
more than either side) cut from the ORIGINAL image, each pre-processed exactly like a whole image
(resize to S x S, normalise), run through the backend in batches, and turned into a t x t map
(§4 post-processing straight to the tile's size). Along each axis tiles start at ``k * (t - o)``
(``o`` = overlap, ``0 <= o <= t // 2``); when the last regular tile does not reach the end, one
more tile is aligned to the end.

Blending: every tile has a separable weight ``wy ⊗ wx``. Along an axis the weight is 1, except a
raised-cosine ramp ``r(i) = 1/2 - 1/2 cos(pi (i + 1/2) / o)`` over the first ``o`` samples of a
tile's extent that continues a previous tile, and ``1 - r`` over its last ``o`` samples when a
next tile follows; the two ramps of neighbouring tiles cover the same samples and sum to 1. The
end-aligned extra tile has weight 0 before the point where a regular next tile would have started
(so every sample is blended from at most two tiles per axis, with complementary weights). The
result is ``sum(w * map) / sum(w)``: where only one tile covers a pixel its weight is exactly 1
and the map is an exact copy of that tile's map; in an overlap it is a smooth cross-fade.

The image score of a tiled image is the maximum of its tiles' image scores.

Streaming (``StripStream``)
---------------------------
Strips of a continuous scan (same width, dtype and channels, any height) arrive one at a time;
the scan is treated as ONE endless image, tiled along the scan direction with the same rule.
A tile row is run as soon as all its rows have arrived; rows are final once no later tile row can
touch them, and each strip's result (map of exactly its rows, score, regions) is emitted as soon
as all its rows are final, i.e. about one tile row of latency; ``flush()`` ends the scan (the last
tile row is aligned to the end) and emits the rest. Memory is bounded by about two tile rows: the
stream carries only the raw rows still needed by the next tile row (the overlap context, < t +
the newest strip; copied before ``push`` returns, so the caller may hand every strip in one
reused buffer), the un-finalised accumulator (< t rows) and the finished rows of the strips
not yet emitted. With ``stitch=False`` every strip is tiled on its own (no carry, no latency).
Regions are found per strip, in strip coordinates (``StripResult.y0`` places them in the scan);
a defect crossing a strip boundary is reported in both strips.

Overlap: given a ``StagedInfer`` (``Detector.tile_infer`` returns one), the work is a three-stage
pipeline (``runtime.prefetch``, one worker per stage): the crops of a later batch of tiles (in a
stream: possibly of the next tile row) are converted, resized and normalised on one worker, the
backend runs the next batch on another, while the caller turns the current batch into maps and
blends them. Every stage runs the same functions on the same inputs, in order, so results are the
same bit for bit. Measured on a 16384 x 1024 strip (OpenVINO int8, 2 cores): 1.09x over
overlapping the pre-processing only. A plain ``InferFn`` runs everything on the caller's thread.

A batch reaches ``prepare`` as a ``TileBatch``: the crops, plus where they lie, so the tiles on
the same rows share one rows pass of the resize (``anoclip_core.transform.preprocess_windows``,
the same values bit for bit as each tile alone).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from anoclip_core.errors import InferenceError, InputError

from .postprocess import add_weighted_map
from .prefetch import Prefetch

# infer(crops) -> (patch_probs [N, h, w] float32, image_scores [N] float32)
InferFn = Callable[[Sequence[np.ndarray]], "tuple[np.ndarray, np.ndarray]"]


@dataclass(frozen=True)
class StagedInfer:
    """An ``InferFn`` in two steps, so the tiler can prepare the next batch while this one runs.

    ``prepare(crops)`` -> whatever ``forward`` takes (normalised pixels); ``forward(prepared)`` ->
    (patch_probs [N, h, w], image_scores [N]); ``prefetch``: batches prepared ahead (0 = off).
    """

    prepare: Callable[[Sequence[np.ndarray]], Any]
    forward: Callable[[Any], tuple[np.ndarray, np.ndarray]]
    prefetch: int = 1

    def __call__(self, crops: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return self.forward(self.prepare(crops))


@dataclass(frozen=True)
class TileBatch(Sequence[np.ndarray]):
    """A batch of square crops ``raw[y:y + side, x:x + side]`` that knows where they lie, so a
    ``prepare`` can share work between crops on the same rows (``transform.preprocess_windows``);
    as a sequence it is the crops themselves (views), for any plain ``InferFn``."""

    raw: np.ndarray
    boxes: tuple[tuple[int, int], ...]  # (y, x) of each crop
    side: int

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        y, x = self.boxes[i]
        return self.raw[y:y + self.side, x:x + self.side]


def _stages(infer: InferFn) -> StagedInfer:
    """``infer`` itself when it is staged, else one step on the caller's thread."""
    if isinstance(infer, StagedInfer):
        return infer
    return StagedInfer(list, infer, 0)


@contextlib.contextmanager
def _infer_batches(infer: InferFn, batches: Iterable[Any], crops: Callable[[Any], TileBatch]
                   ) -> Iterator[Iterator[tuple[Any, tuple[np.ndarray, np.ndarray]]]]:
    """``with _infer_batches(...) as run: for batch, (probs, scores) in run: ...``, in order; when
    ``infer`` is staged, later batches' crops are prepared on one worker and the next batch is
    forwarded on another while the caller works on this one (module docstring, "Overlap")."""
    staged = _stages(infer)
    with Prefetch(batches, lambda b: staged.prepare(crops(b)), staged.prefetch) as prepared:
        with Prefetch(prepared, lambda item: staged.forward(item[1]), staged.prefetch) as inferred:
            yield ((batch, out) for (batch, _), out in inferred)


def ramp(n: int) -> np.ndarray:
    """Raised-cosine ramp up of ``n`` samples, strictly inside (0, 1)."""
    i = np.arange(n, dtype=np.float64)
    return (0.5 - 0.5 * np.cos(np.pi * (i + 0.5) / n)).astype(np.float32) if n > 0 else np.zeros(0, np.float32)


def axis_weight(t: int, overlap: int, up_at: int | None, down: bool) -> np.ndarray:
    """Weight profile of one tile along one axis (see module docstring).

    ``up_at``: offset inside the tile where the blend with the previous tile starts (None: no
    previous tile); samples before it get weight 0. ``down``: a next tile follows.
    """
    w = np.ones(t, dtype=np.float32)
    r = ramp(overlap)
    if up_at is not None:
        w[:up_at] = 0.0
        w[up_at:up_at + overlap] = r
    if down and overlap:
        w[t - overlap:] = np.minimum(w[t - overlap:], 1.0 - r)
    return w


@dataclass(frozen=True)
class AxisTile:
    start: int
    weight: np.ndarray


def axis_layout(length: int, t: int, overlap: int) -> list[AxisTile]:
    """Tiles of side ``t`` along an axis of ``length`` samples, with their blend weights."""
    if t < 1 or t > length:
        raise InputError(f"tile side {t} must be between 1 and the image side {length}")
    if overlap < 0 or overlap > t // 2:
        raise InputError(f"tile overlap must be between 0 and half the tile side ({t // 2}), got {overlap}")
    stride = t - overlap
    starts = [0]
    while starts[-1] + t < length and starts[-1] + stride + t <= length:
        starts.append(starts[-1] + stride)
    effective = list(starts)
    if starts[-1] + t < length:
        effective.append(starts[-1] + stride)
        starts.append(length - t)
    n = len(starts)
    return [AxisTile(s, axis_weight(t, overlap, (e - s) if k > 0 else None, k < n - 1))
            for k, (s, e) in enumerate(zip(starts, effective, strict=True))]


def resolve_tile(height: int, width: int, tile: int | None, overlap: int | None) -> tuple[int, int]:
    """Tile side (default: the short side, capped by both sides) and overlap (default: side // 4)."""
    if height < 2 or width < 2:
        raise InputError(f"image of size {width} x {height} is too small to tile")
    t = min(int(tile) if tile else min(height, width), height, width)
    if t < 2:
        raise InputError(f"tile side must be at least 2, got {tile}")
    o = t // 4 if overlap is None else int(overlap)
    if o < 0 or o > t // 2:
        raise InputError(f"tile overlap must be between 0 and half the tile side ({t // 2}), got {o}")
    return t, o


@dataclass
class TiledOutput:
    anomaly_map: np.ndarray
    score: float
    tile_scores: np.ndarray
    boxes: list[tuple[int, int, int]] = field(default_factory=list)  # (y, x, side)


def _batched(items: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), max(1, n)):
        yield items[i:i + max(1, n)]


def predict_tiled(raw: np.ndarray, infer: InferFn, tile: int | None = None, overlap: int | None = None,
                  batch: int = 8) -> TiledOutput:
    """Tile ``raw`` (H x W[ x C], as stored), run ``infer`` on the tiles, blend back (module docstring)."""
    if raw.ndim not in (2, 3):
        raise InputError(f"expected an H x W or H x W x C image, got shape {list(raw.shape)}")
    height, width = raw.shape[:2]
    t, o = resolve_tile(height, width, tile, overlap)
    ly, lx = axis_layout(height, t, o), axis_layout(width, t, o)
    tiles = [(ay, ax) for ay in ly for ax in lx]
    acc = np.zeros((height, width), dtype=np.float32)
    scores: list[float] = []
    with _infer_batches(infer, _batched(tiles, batch),
                        lambda chunk: TileBatch(raw, tuple((ay.start, ax.start) for ay, ax in chunk), t)) as run:
        for chunk, (probs, sc) in run:
            for (ay, ax), p in zip(chunk, _tile_probs(probs, len(chunk)), strict=True):
                add_weighted_map(acc[ay.start:ay.start + t, ax.start:ax.start + t], p, ay.weight, ax.weight)
            scores.extend(float(s) for s in np.asarray(sc).reshape(-1))
    _divide_by_weights(acc, _weight_sum(ly, height, t), _weight_sum(lx, width, t))
    ts = np.asarray(scores, dtype=np.float32)
    return TiledOutput(acc, float(ts.max()), ts, [(ay.start, ax.start, t) for ay, ax in tiles])


def _tile_probs(probs: Any, n: int) -> np.ndarray:
    """A batch's patch probabilities as [n, h, w] float32 (one grid per tile of the batch)."""
    p = np.asarray(probs, dtype=np.float32)
    if p.ndim != 3 or p.shape[0] != n:
        raise InferenceError(f"the backend returned patch probabilities of shape {list(p.shape)} for {n} tiles "
                             "(expected [tiles, h, w])")
    return p


def _weight_sum(layout: list[AxisTile], length: int, t: int) -> np.ndarray:
    """Sum of the tiles' weight profiles along one axis."""
    total = np.zeros(length, dtype=np.float32)
    for a in layout:
        total[a.start:a.start + t] += a.weight
    return total


#: Rows per block where the strip's weight sums divide it and the stream adds a weighted tile row
#: into its accumulator (no strip-sized temporary; ``postprocess.BLEND_ROWS`` for a tile's map).
BLOCK_ROWS = 64


def _divide_by_weights(acc: np.ndarray, wsum_y: np.ndarray, wsum_x: np.ndarray) -> None:
    """``acc /= wsum_y ⊗ wsum_x`` in place, over row blocks (no H x W temporary for the product)."""
    for r in range(0, acc.shape[0], BLOCK_ROWS):
        acc[r:r + BLOCK_ROWS] /= wsum_y[r:r + BLOCK_ROWS, None] * wsum_x[None, :]


def _row_maps(rows: Sequence[np.ndarray], infer: InferFn, t: int, lx: list[AxisTile], batch: int,
              sink: Callable[[int, np.ndarray, float], None]) -> None:
    """Tile rows (each t x W raw rows) -> ``sink(k, x-blended map [t, W], max tile score)`` for each
    row k in order; one row's map is held at a time, while later crops are prepared ahead."""
    width = rows[0].shape[1] if rows else 0
    batches = [(k, chunk) for k in range(len(rows)) for chunk in _batched(lx, batch)]
    acc, wsum, best = np.zeros((t, width), np.float32), np.zeros(width, np.float32), -np.inf
    with _infer_batches(infer, batches, lambda b: TileBatch(rows[b[0]], tuple((0, ax.start) for ax in b[1]), t)) as run:
        for (k, chunk), (probs, sc) in run:
            for ax, p in zip(chunk, _tile_probs(probs, len(chunk)), strict=True):
                add_weighted_map(acc[:, ax.start:ax.start + t], p, None, ax.weight)
                wsum[ax.start:ax.start + t] += ax.weight
            best = max(best, float(np.max(sc)))
            if chunk[-1] is lx[-1]:
                acc /= wsum[None, :]  # in place: the next row starts from new zeros
                sink(k, acc, best)
                acc, wsum, best = np.zeros((t, width), np.float32), np.zeros(width, np.float32), -np.inf


@dataclass
class StripOutput:
    """A finished strip: its index in the scan, first scan row, map [h, W] and score."""

    index: int
    y0: int
    anomaly_map: np.ndarray
    score: float


class StripStream:
    """Stream strips of a line-scan (see the module docstring for the model).

    ``infer`` maps raw crops to (patch_probs, image_scores); ``finish`` turns each
    ``StripOutput`` into the caller's result type (the Detector adds label and regions).
    """

    def __init__(self, infer: InferFn, tile: int | None = None, overlap: int | None = None, batch: int = 8,
                 stitch: bool = True, finish: Callable[[StripOutput], Any] | None = None) -> None:
        self._infer = infer
        self._tile_req = tile
        self._overlap_req = overlap
        self.batch = int(batch)
        self.stitch = bool(stitch)
        self._finish = finish or (lambda s: s)
        self._reset()

    # state ---------------------------------------------------------------------------------
    def _reset(self) -> None:
        self.width: int | None = None
        self._sig: tuple | None = None
        self.t = self.o = 0
        self._lx: list[AxisTile] = []
        self._count = 0            # strips pushed
        self._rows = 0             # scan rows received
        self._raw: list[np.ndarray] = []
        self._raw_y0 = 0           # scan row of the first buffered raw row
        self._next_y = 0           # start of the next regular tile row
        self._row_end = 0          # end of the last processed tile row
        self._raw_owned: list[bool] = []  # per buffered strip: a copy of ours (else the caller's array)
        self._accbuf = np.zeros((0, 0), np.float32)  # the accumulator's room; _acc is its first rows
        self._acc = self._accbuf
        self._wsum = np.zeros(0, np.float32)
        self._acc_y0 = 0           # first non-final row
        self._done: list[np.ndarray] = []
        self._done_y0 = 0          # scan row of the first finished row still held
        self._pending: list[tuple[int, int, int]] = []  # (index, y0, h)
        self._row_scores: list[tuple[int, int, float]] = []  # (from, to, score) of tile rows

    @property
    def carried_rows(self) -> int:
        """Raw + accumulator + finished rows currently held (the stream's memory, in rows; the
        accumulator's buffer keeps room for at most its longest length, about one tile row)."""
        return sum(r.shape[0] for r in self._raw) + self._acc.shape[0] + sum(d.shape[0] for d in self._done)

    def _check(self, strip: Any) -> np.ndarray:
        raw = np.asarray(strip)
        if raw.ndim not in (2, 3) or raw.shape[0] < 1 or raw.shape[1] < 2:
            raise InputError(f"strip {self._count}: expected H x W or H x W x C, got shape {list(raw.shape)}")
        sig = (raw.dtype.str, raw.shape[2:])
        if raw.dtype.kind == "f" and not np.isfinite(raw).all():
            raise InputError(f"strip {self._count}: contains NaN or infinite values (strip skipped)")
        if self.width is None:
            t = min(int(self._tile_req or raw.shape[0]), raw.shape[1])
            if t < 2:
                raise InputError(f"strip {self._count}: tile side {t} is too small (strips need 2 rows or a tile=)")
            o = t // 4 if self._overlap_req is None else int(self._overlap_req)
            if o < 0 or o > t // 2:
                raise InputError(f"tile overlap must be between 0 and half the tile side ({t // 2}), got {o}")
            self.width, self._sig, self.t, self.o = raw.shape[1], sig, t, o
            self._lx = axis_layout(self.width, self.t, self.o)
        elif raw.shape[1] != self.width or sig != self._sig:
            raise InputError(
                f"strip {self._count}: shape {list(raw.shape)} / {raw.dtype} does not continue the scan "
                f"(width {self.width}, {self._sig})"
            )
        return raw

    # processing ----------------------------------------------------------------------------
    def _raw_rows(self, y: int, n: int) -> np.ndarray:
        """Scan rows [y, y + n) of the buffered strips: a view inside one strip, else one copy of
        those rows only."""
        pieces, start = [], self._raw_y0
        for r in self._raw:
            a, b = max(y - start, 0), min(y + n - start, r.shape[0])
            if a < b:
                pieces.append(r[a:b])
            start += r.shape[0]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _run_rows(self, rows: Sequence[tuple[int, int, bool]]) -> None:
        """Run tile rows ``(y, eff, down)`` (their raw rows all received) and blend each into the
        accumulator; after a regular row (``down``) the rows above the next one become final."""
        raws = [self._raw_rows(y, self.t) for y, _, _ in rows]

        def add(k: int, rmap: np.ndarray, score: float) -> None:
            y, eff, down = rows[k]
            self._accumulate(y, eff, down, rmap, score)
            if down:
                self._finalize(y + self.t - self.o)

        _row_maps(raws, self._infer, self.t, self._lx, self.batch, add)

    def _grow_acc(self, rows: int) -> None:
        """Make the accumulator ``rows`` rows long, the new rows zero (reusing its buffer's room)."""
        held = self._acc.shape[0]
        if rows <= held:
            return
        assert self.width is not None  # set by the first push
        if rows > self._accbuf.shape[0]:
            buf = np.empty((rows, self.width), np.float32)
            if held:
                buf[:held] = self._acc
            self._accbuf = buf
        self._accbuf[held:rows] = 0.0
        self._acc = self._accbuf[:rows]
        self._wsum = np.concatenate([self._wsum, np.zeros(rows - held, np.float32)])

    def _accumulate(self, y: int, eff: int, down: bool, rmap: np.ndarray, score: float) -> None:
        t, o = self.t, self.o
        wy = axis_weight(t, o, (eff - y) if eff > 0 else None, down)
        self._grow_acc(y + t - self._acc_y0)
        lo = y - self._acc_y0
        if lo < 0:  # rows already final: they get weight 0 from this tile by construction
            wy, rmap, lo = wy[-lo:], rmap[-lo:], 0
        for r in range(0, wy.shape[0], BLOCK_ROWS):  # row blocks: no tile-row-sized temporary
            rows = slice(r, r + BLOCK_ROWS)
            self._acc[lo + r:lo + r + BLOCK_ROWS] += wy[rows, None] * rmap[rows]
        self._wsum[lo:lo + wy.shape[0]] += wy
        self._row_scores.append((eff, y + t, score))
        self._row_end = y + t

    def _finalize(self, upto: int) -> None:
        n = upto - self._acc_y0
        if n <= 0:
            return
        done = self._acc[:n] / self._wsum[:n, None]
        if not self._done:
            self._done_y0 = self._acc_y0
        self._done.append(done)
        rest = self._acc.shape[0] - n
        self._accbuf[:rest] = self._acc[n:]  # numpy copies through a buffer if the two overlap
        self._acc, self._wsum = self._accbuf[:rest], self._wsum[n:].copy()
        self._acc_y0 = upto

    def _trim_raw(self) -> None:
        """Drop the raw rows no later tile row needs; copy the rest out of the caller's arrays,
        which the caller may reuse for its next strip (a camera's frame buffer)."""
        keep_from = max(self._next_y - (self.t - self.o), 0) if self._row_end else 0
        kept, start = [], self._raw_y0
        for r, owned in zip(self._raw, self._raw_owned, strict=True):
            cut = max(keep_from - start, 0)
            start += r.shape[0]
            if cut < r.shape[0]:
                kept.append(r if owned and cut == 0 else r[cut:].copy())
        self._raw, self._raw_owned = kept, [True] * len(kept)
        self._raw_y0 = max(keep_from, self._raw_y0)

    def _emit(self) -> list[Any]:
        out = []
        while self._pending and self._pending[0][1] + self._pending[0][2] <= self._acc_y0:
            index, y0, h = self._pending.pop(0)
            amap = self._take_done(y0, h)
            score = max(s for a, b, s in self._row_scores if a < y0 + h and b > y0)
            self._row_scores = [r for r in self._row_scores if r[1] > y0 + h]
            out.append(self._finish(StripOutput(index, y0, amap, score)))
        return out

    def _take_done(self, y0: int, h: int) -> np.ndarray:
        """The finished rows [y0, y0 + h) (the oldest held) as one array (a view when they lie in one
        finished block, which the stream never writes again); the rest stay held."""
        pieces, start, rest = [], self._done_y0, []
        for d in self._done:
            a, b = max(y0 - start, 0), min(y0 + h - start, d.shape[0])
            if a < b:
                pieces.append(d[a:b])
            if b < d.shape[0]:
                rest.append(d[max(b, 0):])
            start += d.shape[0]
        self._done, self._done_y0 = rest, y0 + h
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]

    # public --------------------------------------------------------------------------------
    def push(self, strip: Any) -> list[Any]:
        """Add the next strip; returns the results of every strip finished by it (maybe none).

        A strip refused by its checks (NaN, width, dtype) raises ``InputError`` and leaves the
        stream as it was; a failure while processing resets the stream (the scan restarts).
        """
        raw = self._check(strip)
        try:
            return self._push(raw)
        except Exception:
            self._reset()
            raise

    def _push(self, raw: np.ndarray) -> list[Any]:
        index, y0 = self._count, self._rows
        self._count += 1
        self._rows += raw.shape[0]
        if not self.stitch:
            res = predict_tiled(raw, self._infer, self._tile_req, self._overlap_req, self.batch)
            return [self._finish(StripOutput(index, y0, res.anomaly_map, res.score))]
        self._raw.append(raw)
        self._raw_owned.append(False)
        self._pending.append((index, y0, raw.shape[0]))
        stride = self.t - self.o
        rows = []
        while self._next_y + self.t <= self._rows:
            rows.append((self._next_y, self._next_y, True))
            self._next_y += stride
        self._run_rows(rows)
        self._trim_raw()
        return self._emit()

    def flush(self) -> list[Any]:
        """End of scan: run the end-aligned last tile row, emit every remaining strip, reset."""
        if not self.stitch or self._rows == 0:
            self._reset()
            return []
        try:
            return self._flush()
        finally:
            self._reset()

    def _flush(self) -> list[Any]:
        if self._row_end == 0 and self._rows < self.t:
            # the whole scan is shorter than one tile: tile it as one image
            whole = self._raw_rows(0, self._rows)
            res = predict_tiled(whole, self._infer, None, self._overlap_req, self.batch)
            self._done, self._done_y0, self._acc_y0 = [res.anomaly_map], 0, self._rows
            self._row_scores.append((0, self._rows, res.score))
        else:
            if self._rows > self._row_end:
                self._run_rows([(self._rows - self.t, self._next_y, False)])
            self._finalize(self._rows)
        return self._emit()

    def run(self, strips: Iterable[Any]) -> Iterator[Any]:
        """Generator: push every strip, yield results as they finish, flush at the end."""
        for s in strips:
            yield from self.push(s)
        yield from self.flush()
