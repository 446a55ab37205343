"""Image pre-processing as plain data plus one numpy/OpenCV implementation.

The reference pipeline (official ``vl_test.py``) is ``Resize((S, S))`` on a PIL image (bilinear
with PIL's antialiasing filter), ``CenterCrop(S)`` (a no-op after a square resize), ``ToTensor``
and ``Normalize(OPENAI mean, std)``. This module reproduces it in numpy, so that the PyTorch core
and the torch-free runtime run the *same* code and agree exactly. It imports numpy and OpenCV
only: the runtime imports it without pulling in torch.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from .errors import InputError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

RESIZE_RULES = ("stretch",)
INTERPOLATIONS = ("bilinear_antialias",)

ImageLike = str | os.PathLike | np.ndarray


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes the model's input tensor; serialised into the export manifest.

    ``resize="stretch"`` resizes both sides to ``image_size`` (aspect ratio not kept), as the
    reference does. ``interpolation="bilinear_antialias"`` is PIL's BILINEAR resampling, whose
    triangle filter widens with the downscale factor.
    """

    image_size: int
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    resize: str = "stretch"
    interpolation: str = "bilinear_antialias"
    channel_order: str = "RGB"
    value_range: tuple[float, float] = field(default=(0.0, 1.0))

    def __post_init__(self) -> None:
        if int(self.image_size) < 1:
            raise InputError(f"preprocess.image_size must be a positive integer, got {self.image_size!r}")
        if self.resize not in RESIZE_RULES:
            raise InputError(f"preprocess.resize {self.resize!r} is not supported (expected one of {RESIZE_RULES})")
        if self.interpolation not in INTERPOLATIONS:
            raise InputError(
                f"preprocess.interpolation {self.interpolation!r} is not supported (expected one of {INTERPOLATIONS})"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise InputError(f"preprocess.mean/std must be 3 values with std > 0, got {self.mean!r}, {self.std!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        d["value_range"] = list(self.value_range)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PreprocessConfig:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        if "image_size" not in known:
            raise InputError("preprocess config has no 'image_size' field")
        for key in ("mean", "std", "value_range"):
            if key in known:
                known[key] = tuple(float(v) for v in known[key])
        known["image_size"] = int(known["image_size"])
        return cls(**known)


@lru_cache(maxsize=64)
def _resample_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """PIL's antialiased bilinear (triangle) filter along one axis as (indices, weights) [out, taps].

    Output pixel ``i`` is centred at ``(i + 0.5) * scale`` in input coordinates; the triangle's
    support widens with the downscale factor, so every input pixel contributes (antialiasing).
    Unused taps point at index 0 with weight 0.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    taps = int(np.ceil(support)) * 2 + 1
    index = np.zeros((out_size, taps), dtype=np.intp)
    weight = np.zeros((out_size, taps), dtype=np.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        xs = np.arange(lo, hi)
        w = np.clip(1.0 - np.abs((xs - center + 0.5) / filterscale), 0.0, None)
        total = w.sum()
        if total > 0:
            index[i, : hi - lo] = xs
            weight[i, : hi - lo] = w / total
    weight = weight.astype(np.float32)
    index.setflags(write=False)
    weight.setflags(write=False)
    return index, weight


#: Most tap groups a pass runs as strided slices; beyond it (an in / out ratio with a large
#: denominator) gathering every tap is cheaper than one small operation per group.
MAX_TAP_GROUPS = 48


@dataclass(frozen=True)
class TapGroup:
    """Outputs ``first_out + m * out_step`` (m < count) that read inputs ``first_in + m * in_step + offset``
    with the same weights: one strided slice per tap instead of a gather."""

    first_out: int
    out_step: int
    first_in: int
    in_step: int
    count: int
    taps: tuple[tuple[int, np.float32], ...]  # (offset, weight), non-zero weights in tap order

    def outputs(self) -> slice:
        return slice(self.first_out, self.first_out + self.out_step * (self.count - 1) + 1, self.out_step)

    def inputs(self, offset: int) -> slice:
        start = self.first_in + offset
        return slice(start, start + self.in_step * (self.count - 1) + 1, self.in_step)


@lru_cache(maxsize=64)
def _tap_groups(in_size: int, out_size: int) -> tuple[TapGroup, ...] | None:
    """``_resample_taps`` as groups of outputs with one weight pattern (an in / out ratio p / q
    repeats every q outputs), each an arithmetic progression; None when there would be more than
    ``MAX_TAP_GROUPS``. Zero-weight taps are left out: for finite input ``0 * x`` is a signed zero,
    and adding it to a float32 sum that starts at +0 changes nothing, so the sums are the same bit
    for bit (a NaN or infinity under a zero-weight tap is not spread)."""
    index, weight = _resample_taps(in_size, out_size)
    patterns: dict[tuple, list[tuple[int, int]]] = {}
    for i in range(out_size):
        taps = [(int(index[i, k]), weight[i, k]) for k in range(index.shape[1]) if weight[i, k] != 0]
        base = taps[0][0] if taps else 0
        key = tuple((j - base, w) for j, w in taps)
        patterns.setdefault(key, []).append((i, base))
    groups: list[TapGroup] = []
    for key, members in patterns.items():
        run = [members[0]]
        for m in members[1:]:  # split into arithmetic progressions, rising in both output and input
            steps = (m[0] - run[-1][0], m[1] - run[-1][1])
            if steps[1] > 0 and (len(run) == 1 or steps == (run[1][0] - run[0][0], run[1][1] - run[0][1])):
                run.append(m)
            else:
                groups.append(_group(run, key))
                run = [m]
        groups.append(_group(run, key))
        if len(groups) > MAX_TAP_GROUPS:
            return None
    return tuple(groups)


def _group(run: list[tuple[int, int]], taps: tuple) -> TapGroup:
    out_step, in_step = (run[1][0] - run[0][0], run[1][1] - run[0][1]) if len(run) > 1 else (1, 1)
    return TapGroup(run[0][0], out_step, run[0][1], in_step, len(run), taps)


def _resample(src: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """One separable pass along ``axis`` (0: rows, 1: columns): ``out = sum_k w_k * src[idx_k]``,
    taps added in order into float32 zeros, the same values bit for bit as the per-pixel sum.
    Rows: one strided slice per tap group and tap (``_tap_groups``). Columns: the same on the
    transposed image (one copy; a column slice of an interleaved image is slow to read), else
    each tap gathered into one reused buffer (``np.take(..., out=, mode="clip")``)."""
    groups = _tap_groups(src.shape[axis], out_size)
    if groups is None:
        return _resample_gather(src, out_size, axis)
    if axis == 0:
        return _resample_rows(src, out_size, groups)
    return _swap_rows_cols(_resample_rows(_swap_rows_cols(src), out_size, groups))


def _resample_rows(src: np.ndarray, out_size: int, groups: tuple[TapGroup, ...]) -> np.ndarray:
    """The rows pass over tap groups: per group and tap, ``tmp = w * src[rows]; out[rows'] += tmp``."""
    out = np.zeros((out_size,) + src.shape[1:], dtype=np.float32)
    tmp = np.empty((max(g.count for g in groups),) + src.shape[1:], dtype=np.float32)
    for g in groups:
        o, t = out[g.outputs()], tmp[:g.count]
        for offset, w in g.taps:
            np.multiply(src[g.inputs(offset)], w, out=t)
            o += t
    return out


def _swap_rows_cols(a: np.ndarray) -> np.ndarray:
    """A contiguous copy of ``a`` [H, W, ...] as [W, H, ...]. ``cv2.transpose`` for a float32 image
    of 1 to 4 channels (several times numpy's strided copy for interleaved pixels), else numpy."""
    if a.dtype == np.float32 and (a.ndim == 2 or (a.ndim == 3 and 1 <= a.shape[2] <= 4)) and min(a.shape[:2]) > 0:
        import cv2

        swapped = cv2.transpose(np.ascontiguousarray(a))
        return swapped.reshape((a.shape[1], a.shape[0]) + a.shape[2:])  # cv2 drops a single channel axis
    return np.ascontiguousarray(a.transpose((1, 0) + tuple(range(2, a.ndim))))


def _normalized_planes(hwc: np.ndarray, mean: np.ndarray, std: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out`` [3, H, W] = ``((hwc - mean) / std)`` moved channels first: per channel plane, the same
    float32 subtraction and division as on the interleaved array. ``hwc`` is H x W x 3, or H x W
    for gray (the one plane stands for three equal channels)."""
    import cv2

    if hwc.ndim == 2 and out.shape[0] == len(mean):
        planes: Sequence[Any] = [hwc] * len(mean)
    elif hwc.ndim == 3 and hwc.shape[2] == len(mean) == out.shape[0]:
        planes = cv2.split(np.ascontiguousarray(hwc))
    else:
        raise InputError(f"expected an H x W x {len(mean)} or H x W image for {out.shape[0]} output planes, "
                         f"got shape {tuple(hwc.shape)}")
    for c, plane in enumerate(planes):
        np.subtract(plane, mean[c], out=out[c])
        out[c] /= std[c]
    return out


def _resample_gather(src: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """``_resample`` by gathering every tap (all taps, zero weights included)."""
    index, weight = _resample_taps(src.shape[axis], out_size)
    shape = list(src.shape)
    shape[axis] = out_size
    out = np.zeros(shape, dtype=np.float32)
    tap = np.empty(shape, dtype=np.float32)
    wshape = [1] * src.ndim
    wshape[axis] = out_size
    for k in range(index.shape[1]):
        np.take(src, index[:, k], axis=axis, out=tap, mode="clip")
        tap *= weight[:, k].reshape(wshape)
        out += tap
    return out


def resize_bilinear_antialias(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an H x W or H x W x C float array like PIL's ``Image.resize(..., BILINEAR)``.

    Separable, banded (a handful of taps per output pixel), float32, without PIL's intermediate
    8-bit rounding: results differ from PIL by at most about one grey level. The core and the
    runtime both use this function, so they agree exactly.
    """
    if image.ndim not in (2, 3):
        raise InputError(f"expected an H x W or H x W x C array, got shape {image.shape}")
    h, w = image.shape[:2]
    if h < 1 or w < 1 or height < 1 or width < 1:
        raise InputError(f"cannot resize an image of shape {image.shape} to {height} x {width}")
    src = image.astype(np.float32, copy=False)
    if (h, w) == (height, width):
        return src.copy()
    return _resample(_resample(src, height, 0), width, 1)


#: Largest image (width x height) decoded by default: 40 Mpx keeps a float32 RGB copy under 0.5 GB.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
_max_pixels = int(os.environ.get("ANOCLIP_MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS))


def set_max_image_pixels(n: int) -> None:
    """Set the decode limit (pixels) for ``read_image``, and OpenCV's own limit to match."""
    global _max_pixels
    if int(n) < 4:
        raise InputError(f"max image pixels must be >= 4, got {n}")
    _max_pixels = int(n)
    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(max(_max_pixels, 1 << 20))


def max_image_pixels() -> int:
    """The current decode limit in pixels."""
    return _max_pixels


def image_header_size(path: str) -> tuple[int, int] | None:
    """(width, height) from the file header without decoding pixels; None if unknown."""
    try:
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = None  # we apply our own limit; PIL only reads the header here
        with Image.open(path) as im:
            return int(im.size[0]), int(im.size[1])
    except Exception:  # not a format PIL knows: OpenCV's limit still applies at decode
        return None


def _check_decode_limit(p: str) -> None:
    size = image_header_size(p)
    if size and size[0] * size[1] > _max_pixels:
        raise InputError(
            f"image {p} is {size[0]} x {size[1]} ({size[0] * size[1]} pixels), over the decode limit of "
            f"{_max_pixels} pixels (raise it with --max-pixels / ANOCLIP_MAX_IMAGE_PIXELS)")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as it is stored (8/16-bit, gray/BGR/BGRA); clear error if unreadable.

    Images over the decode limit (``set_max_image_pixels``) are refused from their header,
    before any pixel is decoded, so memory stays bounded whatever the file claims.
    """
    p = os.fspath(path)
    if os.path.isdir(p):
        raise InputError(f"{p} is a directory, not an image file")
    if not os.path.isfile(p):
        raise InputError(f"image file not found: {p}")
    if os.path.getsize(p) == 0:
        raise InputError(f"image file is empty: {p}")
    _check_decode_limit(p)
    os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(max(_max_pixels, 1 << 20)))
    import cv2

    data = np.fromfile(p, dtype=np.uint8)
    try:
        img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except (cv2.error, MemoryError) as err:  # e.g. a raised --max-pixels the machine cannot hold
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise InputError(f"cannot decode image file {p}: {first[:200]}") from None
    if img is None:
        raise InputError(f"cannot decode image file (corrupt or not an image): {p}")
    if img.ndim == 3 and img.shape[2] == 3:
        img = img[:, :, ::-1]
    elif img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, [2, 1, 0, 3]]
    return np.ascontiguousarray(img)


def check_image_array(image: Any, channel_order: str = "RGB", name: str = "image") -> np.ndarray:
    """The layout checks of ``to_rgb_float`` without reading a pixel: a numpy array, H x W[ x 1, 3
    or 4], at least 2 x 2, a supported dtype, RGB or BGR. Returns it, a single channel squeezed."""
    if not isinstance(image, np.ndarray):
        raise InputError(f"{name}: expected a numpy array or a file path, got {type(image).__name__}")
    if channel_order not in ("RGB", "BGR"):
        raise InputError(f"{name}: channel_order must be 'RGB' or 'BGR', got {channel_order!r}")
    arr = image
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise InputError(f"{name}: expected H x W, H x W x 3 or H x W x 4, got shape {tuple(arr.shape)}")
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise InputError(f"{name}: image of size {arr.shape[1]} x {arr.shape[0]} is too small (need at least 2 x 2)")
    if arr.dtype not in (np.uint8, np.uint16, np.float32, np.float64, np.float16):
        raise InputError(f"{name}: unsupported dtype {arr.dtype} (expected uint8, uint16 or float in [0, 1])")
    return arr


def to_rgb_float(image: np.ndarray, channel_order: str = "RGB", name: str = "image") -> np.ndarray:
    """Any supported array (uint8/uint16/float, gray/RGB/BGR/RGBA/BGRA) -> H x W x 3 float32 in [0, 1].

    Gray is replicated to three channels and alpha dropped, as PIL's ``convert("RGB")`` does.
    Float input must already lie in [0, 1].
    """
    arr = check_image_array(image, channel_order, name)
    if arr.dtype == np.uint8:
        out = arr.astype(np.float32)
        out /= np.float32(255.0)  # in place: the same float32 division, one full-size array fewer
    elif arr.dtype == np.uint16:
        out = arr.astype(np.float32)
        out /= np.float32(65535.0)
    else:  # float16/32/64 (check_image_array refused the rest)
        out = arr.astype(np.float32)
        if not np.isfinite(out).all():
            raise InputError(f"{name}: array contains NaN or infinite values")
        if out.size and (out.min() < -1e-6 or out.max() > 1.0 + 1e-6):
            raise InputError(
                f"{name}: float images must lie in [0, 1], got range [{out.min():.4g}, {out.max():.4g}]"
            )
    if out.ndim == 2:
        out = np.repeat(out[:, :, None], 3, axis=2)
    elif out.shape[2] == 4:
        out = out[:, :, :3]
    if channel_order == "BGR":
        out = out[:, :, ::-1]
    return np.ascontiguousarray(out)


def load_rgb(image: ImageLike, channel_order: str = "RGB") -> np.ndarray:
    """A path or array -> H x W x 3 float32 RGB in [0, 1]. Files are decoded as stored (BGR->RGB)."""
    if isinstance(image, (str, os.PathLike)):
        return to_rgb_float(read_image(image), "RGB", name=os.fspath(image))
    return to_rgb_float(image, channel_order)


def normalize_rgb(rgb: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """H x W x 3 float RGB in [0, 1] -> 3 x S x S float32, resized and normalised per ``cfg``."""
    s = cfg.image_size
    resized = resize_bilinear_antialias(rgb, s, s)
    mean = np.asarray(cfg.mean, dtype=np.float32)
    std = np.asarray(cfg.std, dtype=np.float32)
    if resized.ndim != 3 or resized.shape[2] != 3:  # not RGB: the broadcasting formula (and its errors)
        return np.ascontiguousarray(((resized - mean) / std).transpose(2, 0, 1), dtype=np.float32)
    return _normalized_planes(resized, mean, std, np.empty((3, s, s), dtype=np.float32))


def preprocess_windows(raw: np.ndarray, boxes: Sequence[tuple[int, int]], side: int, cfg: PreprocessConfig,
                       channel_order: str = "RGB", name: str = "image") -> np.ndarray:
    """Square windows ``raw[y:y + side, x:x + side]`` of an array as stored -> [N, 3, S, S] float32,
    the same values bit for bit as ``normalize_rgb(to_rgb_float(window, channel_order), cfg)`` each.

    Why: tiles of a line-scan strip overlap, and the rows pass works column by column, so the
    windows on the same rows share one rows pass over the columns they span; a uint8 image is
    read through one 256-entry table of ``w * (x / 255)`` per tap (``cv2.LUT``) instead of being
    converted to float first. The columns pass then runs per window on the transposed rows.
    """
    s = cfg.image_size
    out = np.empty((len(boxes), 3, s, s), dtype=np.float32)
    groups = _tap_groups(side, s)
    mean = np.asarray(cfg.mean, dtype=np.float32)
    std = np.asarray(cfg.std, dtype=np.float32)
    i = 0
    while i < len(boxes):
        y = boxes[i][0]
        j = i
        while j < len(boxes) and boxes[j][0] == y:
            j += 1
        row = boxes[i:j]
        if groups is None or side == s:
            for k, (wy, wx) in enumerate(row):
                out[i + k] = normalize_rgb(to_rgb_float(raw[wy:wy + side, wx:wx + side], channel_order, name), cfg)
        else:
            lo = min(x for _, x in row)
            span = _rows_pass(raw[y:y + side, lo:max(x for _, x in row) + side], s, groups, channel_order, name)
            cols = _swap_rows_cols(span)  # [span width, S(, 3)]
            for k, (_, x) in enumerate(row):
                window = _resample_rows(cols[x - lo:x - lo + side], s, groups)  # [S (x), S (y)(, 3)]
                _normalized_planes(_swap_rows_cols(window), mean, std, out[i + k])
        i = j
    return out


def _rows_pass(block: np.ndarray, out_size: int, groups: tuple[TapGroup, ...], channel_order: str,
               name: str) -> np.ndarray:
    """The rows pass of ``to_rgb_float(block)`` -> [out_size, W, 3] float32 RGB, or [out_size, W]
    for a gray block (its three channels are equal: one plane is resized once); uint8 by tables."""
    src = check_image_array(block, channel_order, name)
    if src.dtype != np.uint8:
        rgb = to_rgb_float(src, channel_order, name=name)
        return _resample_rows(np.ascontiguousarray(rgb[:, :, 0]) if src.ndim == 2 else rgb, out_size, groups)
    if src.ndim == 3 and src.shape[2] == 4:
        src = np.ascontiguousarray(src[:, :, :3])  # alpha dropped, as to_rgb_float does
    import cv2

    rows = np.zeros((out_size,) + src.shape[1:], dtype=np.float32)
    for g in groups:
        o = rows[g.outputs()]
        for offset, w in g.taps:
            o += cv2.LUT(src[g.inputs(offset)], _u8_tap_table(float(w)))
    return rows[:, :, ::-1] if channel_order == "BGR" and rows.ndim == 3 else rows


@lru_cache(maxsize=512)
def _u8_tap_table(weight: float) -> np.ndarray:
    """``float32(x) / 255 * weight`` for every uint8 ``x``: what ``to_rgb_float`` then one tap compute."""
    table = (np.arange(256, dtype=np.float32) / np.float32(255.0)) * np.float32(weight)
    table.setflags(write=False)
    return table


def preprocess(image: ImageLike, cfg: PreprocessConfig, channel_order: str = "RGB") -> np.ndarray:
    """A path or array -> model input 3 x S x S float32 (the exact pipeline of the reference)."""
    return normalize_rgb(load_rgb(image, channel_order), cfg)


def preprocess_batch(images: Sequence[ImageLike], cfg: PreprocessConfig, channel_order: str = "RGB") -> np.ndarray:
    """Several images -> B x 3 x S x S float32."""
    if len(images) == 0:
        raise InputError("no images given")
    return np.stack([preprocess(im, cfg, channel_order) for im in images])


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A ground-truth mask (any non-zero = defect) -> S x S {0, 1} uint8, resized then binarised at 0.5."""
    m = (np.asarray(mask) > 0).astype(np.float32)
    if m.ndim == 3:
        m = m.max(axis=2)
    return (resize_bilinear_antialias(m, size, size) > 0.5).astype(np.uint8)
