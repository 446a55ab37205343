"""Evaluation metrics (ALGORITHM.md §6): pixel/image AUROC, AP, F1-max and AUPRO. Torch-free.

All curve metrics share one exact threshold sweep: positive and negative scores are sorted once,
the distinct score values are visited from high to low in bounded chunks, and the counts of
scores ``>= t`` come from binary searches. Results equal scikit-learn's ``roc_auc_score``,
``average_precision_score`` (step sum) and the F1 maximum over ``precision_recall_curve``; the
same sweep gives the trapezoidal AP ``auc(recall, precision)`` that the official code reports as
image AP (the paper-comparable definition, ALGORITHM.md §6).

The exact AUPRO is a weighted ROC: a defective pixel of ground-truth region ``r`` carries the
weight ``1 / (|r| * R)`` (``R`` regions in all), so the weighted true-positive rate at a threshold
is the mean per-region overlap. The curve is integrated with the trapezoid rule up to FPR 0.3,
interpolated at the cut, and divided by 0.3. Regions are 8-connected components of each mask.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InputError

FPR_LIMIT = 0.3
REFERENCE_STEPS = 200
CHUNK = 1 << 18
METRIC_KEYS = (
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1_max",
    "aupro",
    "image_auroc",
    "image_ap",
    "image_f1_max",
)

ArrayList = np.ndarray | Sequence[np.ndarray]
MaskList = np.ndarray | Sequence[np.ndarray | None]


@dataclass
class _SortedScores:
    """Positive and negative scores, each sorted ascending; optional cumulative positive weights."""

    pos: np.ndarray
    neg: np.ndarray
    pos_cumw: np.ndarray | None = None
    total_w: float = 0.0


@dataclass
class CurveSummary:
    """The threshold-free metrics of one ranking problem (NaN where undefined)."""

    auroc: float = math.nan
    ap: float = math.nan
    ap_trapezoid: float = math.nan
    f1_max: float = math.nan
    aupro: float = math.nan


def _sorted_unique(x: np.ndarray) -> np.ndarray:
    """Distinct values of an ascending array, without sorting again."""
    if x.size == 0:
        return x
    keep = np.empty(x.size, dtype=bool)
    keep[0] = True
    np.not_equal(x[1:], x[:-1], out=keep[1:])
    return x[keep]


def _thresholds_desc(pos: np.ndarray, neg: np.ndarray, chunk: int = CHUNK) -> Iterator[np.ndarray]:
    """Every distinct value of ``pos`` and ``neg`` (both ascending), high to low, in bounded chunks."""
    samples = np.concatenate([pos[::chunk], neg[::chunk]])
    cuts = np.unique(samples)
    lows = cuts[::-1]
    hi_pos, hi_neg = pos.size, neg.size
    for lo in lows:
        lo_pos = int(np.searchsorted(pos, lo, "left"))
        lo_neg = int(np.searchsorted(neg, lo, "left"))
        block = np.union1d(_sorted_unique(pos[lo_pos:hi_pos]), _sorted_unique(neg[lo_neg:hi_neg]))
        if block.size:
            yield block[::-1]
        hi_pos, hi_neg = lo_pos, lo_neg


def _counts_at_or_above(sorted_values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Number of values ``>= t`` for each threshold ``t``."""
    return sorted_values.size - np.searchsorted(sorted_values, thresholds, "left")


def _weights_at_or_above(s: _SortedScores, thresholds: np.ndarray) -> np.ndarray:
    """Sum of positive weights with score ``>= t`` for each threshold ``t``."""
    assert s.pos_cumw is not None
    return s.total_w - s.pos_cumw[np.searchsorted(s.pos, thresholds, "left")]


def _trapezoid_to(x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray, limit: float) -> float:
    """Trapezoid area of the segments (x0, y0)-(x1, y1) (x ascending) clipped to x <= limit."""
    inside = x1 <= limit
    area = float(np.sum((x1[inside] - x0[inside]) * (y1[inside] + y0[inside]) * 0.5))
    cross = np.flatnonzero(~inside & (x0 < limit))
    if cross.size:
        i = cross[0]
        frac = (limit - x0[i]) / (x1[i] - x0[i])
        y_cut = y0[i] + frac * (y1[i] - y0[i])
        area += float((limit - x0[i]) * (y0[i] + y_cut) * 0.5)
    return area


def _sweep(s: _SortedScores, with_pro: bool) -> CurveSummary:
    """Exact AUROC, AP, F1-max (and AUPRO when weights are given) in one pass over thresholds."""
    n_pos, n_neg = s.pos.size, s.neg.size
    out = CurveSummary()
    roc_area = ap_sum = pro_area = trap_area = 0.0
    f1_best, prev_prec = 0.0, 1.0
    prev_tp, prev_fp, prev_w = 0, 0, 0.0
    pro_done = not with_pro
    for thr in _thresholds_desc(s.pos, s.neg):
        tp = _counts_at_or_above(s.pos, thr)
        fp = _counts_at_or_above(s.neg, thr)
        tp_prev = np.concatenate(([prev_tp], tp[:-1]))
        fp_prev = np.concatenate(([prev_fp], fp[:-1]))
        roc_area += float(np.sum((fp - fp_prev).astype(np.float64) * (tp + tp_prev).astype(np.float64)))
        prec = tp / (tp + fp)
        ap_sum += float(np.sum((tp - tp_prev) * prec))
        prec_prev = np.concatenate(([prev_prec], prec[:-1]))
        trap_area += float(np.sum((tp - tp_prev) * (prec + prec_prev) * 0.5))
        prev_prec = float(prec[-1])
        f1_best = max(f1_best, float(np.max(2.0 * tp / (tp + fp + n_pos))))
        if not pro_done:
            w = _weights_at_or_above(s, thr)
            w_prev = np.concatenate(([prev_w], w[:-1]))
            x1, x0 = fp / n_neg, fp_prev / n_neg
            pro_area += _trapezoid_to(x0, w_prev, x1, w, FPR_LIMIT)
            pro_done = bool(x1[-1] > FPR_LIMIT)
            prev_w = float(w[-1])
        prev_tp, prev_fp = int(tp[-1]), int(fp[-1])
    out.auroc = roc_area / (2.0 * n_pos * n_neg)
    out.ap = ap_sum / n_pos
    out.ap_trapezoid = trap_area / n_pos
    out.f1_max = f1_best
    if with_pro:
        out.aupro = pro_area / FPR_LIMIT
    return out


def _as_list(arrays: ArrayList, name: str) -> list[np.ndarray]:
    if isinstance(arrays, np.ndarray):
        if arrays.ndim == 2:
            return [arrays]
        if arrays.ndim != 3:
            raise InputError(f"{name}: expected [N, H, W] or a list of H x W arrays, got shape {arrays.shape}")
        return list(arrays)
    return [np.asarray(a) for a in arrays]


def _score_dtype(maps: Sequence[np.ndarray]) -> np.dtype:
    dt = np.result_type(*[m.dtype for m in maps])
    return dt if np.issubdtype(dt, np.floating) else np.dtype(np.float64)


def region_labels(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a binary mask -> (int32 labels, 0 = background; region count)."""
    import cv2

    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    return labels, int(n) - 1


def _binary_masks(maps: list[np.ndarray], masks: MaskList) -> list[np.ndarray | None]:
    mlist: list[np.ndarray | None] = [None if m is None else np.asarray(m) for m in masks]
    if len(mlist) != len(maps):
        raise InputError(f"got {len(maps)} anomaly maps but {len(mlist)} masks")
    out: list[np.ndarray | None] = []
    for i, (a, m) in enumerate(zip(maps, mlist, strict=True)):
        if a.ndim != 2:
            raise InputError(f"anomaly map {i}: expected H x W, got shape {a.shape}")
        if m is None:
            out.append(None)
            continue
        if m.shape != a.shape:
            raise InputError(f"mask {i}: shape {m.shape} does not match its anomaly map {a.shape}")
        out.append(m > 0.5)
    return out


def sort_pixels(maps: ArrayList, masks: MaskList, with_regions: bool = True) -> _SortedScores:
    """Split map values into sorted defective / normal pixels (``None`` masks are all normal).

    With ``with_regions`` each defective pixel is weighted by ``1 / (|region| * R)`` for AUPRO.
    Memory: one copy of the scores, plus index/weight arrays over the defective pixels only.
    """
    mlist = _as_list(maps, "maps")
    if not mlist:
        raise InputError("no anomaly maps given")
    bins = _binary_masks(mlist, masks)
    for i, a in enumerate(mlist):
        if not np.isfinite(a).all():
            raise InputError(f"anomaly map {i} contains NaN or infinite values")
    dtype = _score_dtype(mlist)
    n_pos = sum(int(b.sum()) for b in bins if b is not None)
    n_all = sum(a.size for a in mlist)
    pos = np.empty(n_pos, dtype=dtype)
    neg = np.empty(n_all - n_pos, dtype=dtype)
    weights = np.empty(n_pos, dtype=np.float64) if with_regions else None
    ip = ineg = 0
    n_regions = 0
    for a, b in zip(mlist, bins, strict=True):
        if b is None:
            neg[ineg : ineg + a.size] = a.ravel()
            ineg += a.size
            continue
        k = int(b.sum())
        pos[ip : ip + k] = a[b]
        nb = a.size - k
        neg[ineg : ineg + nb] = a[~b]
        if weights is not None and k:
            labels, n = region_labels(b)
            sizes = np.bincount(labels[b], minlength=n + 1).astype(np.float64)
            weights[ip : ip + k] = 1.0 / sizes[labels[b]]
            n_regions += n
        ip += k
        ineg += nb
    neg.sort()
    out = _SortedScores(pos=pos, neg=neg)
    if weights is None:
        pos.sort()
        return out
    order = np.argsort(pos, kind="stable")
    out.pos = pos[order]
    del pos
    w = weights[order] / max(n_regions, 1)
    del order, weights
    cumw = np.empty(w.size + 1, dtype=np.float64)
    cumw[0] = 0.0
    np.cumsum(w, out=cumw[1:])
    out.pos_cumw = cumw
    out.total_w = float(cumw[-1])
    return out


def _sorted_from_labels(scores: np.ndarray, labels: np.ndarray) -> _SortedScores:
    scores = np.asarray(scores).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise InputError(f"got {scores.size} scores but {labels.size} labels")
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if not np.isfinite(scores).all():
        raise InputError("scores contain NaN or infinite values")
    y = labels > 0.5
    return _SortedScores(pos=np.sort(scores[y]), neg=np.sort(scores[~y]))


def _undefined(s: _SortedScores, positive: str, negative: str) -> str | None:
    """Why a ranking metric is undefined (one class missing), or None."""
    if s.pos.size == 0:
        return f"no {positive} in the ground truth"
    if s.neg.size == 0:
        return f"no {negative} in the ground truth"
    return None


def _floor_to(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Largest ``dtype`` numbers <= ``values``: for x of ``dtype``, ``x > v`` iff ``x > floor``."""
    out = values.astype(dtype)
    above = out.astype(np.float64) > values
    out[above] = np.nextafter(out[above], dtype.type(-np.inf))
    return out


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of binary ``labels`` (1 = anomalous) ranked by ``scores``; NaN with one class only."""
    s = _sorted_from_labels(scores, labels)
    return math.nan if _undefined(s, "positives", "negatives") else _sweep(s, False).auroc


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision as scikit-learn defines it (step sum, no interpolation)."""
    s = _sorted_from_labels(scores, labels)
    return math.nan if s.pos.size == 0 else _sweep_or_trivial(s).ap


def average_precision_trapezoid(scores: np.ndarray, labels: np.ndarray) -> float:
    """The official image AP: trapezoidal area under the precision-recall curve, i.e.
    ``sklearn.metrics.auc(recall, precision)`` over ``precision_recall_curve`` (which starts at
    (recall 0, precision 1)); not the step-sum :func:`average_precision`."""
    s = _sorted_from_labels(scores, labels)
    return math.nan if s.pos.size == 0 else _sweep_or_trivial(s).ap_trapezoid


def f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    """Best F1 over all thresholds ``score >= t``."""
    s = _sorted_from_labels(scores, labels)
    return math.nan if s.pos.size == 0 else _sweep_or_trivial(s).f1_max


def _sweep_or_trivial(s: _SortedScores) -> CurveSummary:
    """AP and F1 are defined without negatives (both 1.0); AUROC is not."""
    if s.neg.size == 0:
        return CurveSummary(ap=1.0, ap_trapezoid=1.0, f1_max=1.0)
    return _sweep(s, False)


def aupro(maps: ArrayList, masks: MaskList) -> float:
    """Exact AUPRO: all thresholds, trapezoid up to FPR 0.3 (interpolated at the cut), / 0.3."""
    s = sort_pixels(maps, masks, with_regions=True)
    if _undefined(s, "defective pixels", "normal pixels"):
        return math.nan
    return _sweep(s, True).aupro


def aupro_reference(
    maps: ArrayList, masks: MaskList, steps: int = REFERENCE_STEPS, expect_fpr: float = FPR_LIMIT
) -> float:
    """AUPRO as the official code computes it, for comparison with the exact :func:`aupro`.

    Thresholds ``numpy.arange(min, max, (max - min) / steps)`` (``min``, ``max`` and the step in
    the maps' dtype, as the official code computes them; about ``steps`` values); a pixel is
    positive when ``score > th``; per threshold the mean per-region overlap and the FPR. Points
    with FPR < ``expect_fpr`` are kept, their FPRs rescaled to [0, 1] by min/max, and the area
    taken with the trapezoid rule in threshold order (as ``sklearn.metrics.auc`` does).
    Evaluated exactly from the sorted scores, without per-threshold masks.
    """
    s = sort_pixels(maps, masks, with_regions=True)
    if _undefined(s, "defective pixels", "normal pixels"):
        return math.nan
    return _reference_from_sorted(s, steps, expect_fpr)


def _reference_from_sorted(s: _SortedScores, steps: int = REFERENCE_STEPS, expect_fpr: float = FPR_LIMIT) -> float:
    """:func:`aupro_reference` on already sorted, region-weighted pixels."""
    lo, hi = min(s.pos[0], s.neg[0]), max(s.pos[-1], s.neg[-1])
    if hi <= lo:
        return math.nan
    ths = _floor_to(np.arange(lo, hi, (hi - lo) / steps, dtype=np.float64), s.pos.dtype)
    assert s.pos_cumw is not None
    pros = s.total_w - s.pos_cumw[np.searchsorted(s.pos, ths, "right")]
    fprs = (s.neg.size - np.searchsorted(s.neg, ths, "right")) / s.neg.size
    keep = fprs < expect_fpr
    if keep.sum() < 2:
        return math.nan
    f, p = fprs[keep], pros[keep]
    span = f.max() - f.min()
    if span <= 0:
        return math.nan
    f = (f - f.min()) / span
    return float(np.sum((f[:-1] - f[1:]) * (p[1:] + p[:-1]) * 0.5))


PIXEL_KEYS = METRIC_KEYS[:4]
IMAGE_KEYS = METRIC_KEYS[4:]


def pixel_metrics(
    maps: ArrayList, masks: MaskList, reference: bool = False
) -> tuple[dict[str, float], dict[str, str]]:
    """Pixel AUROC, AP, F1-max and exact AUPRO; NaN (with a reason) where undefined.

    With ``reference`` also ``aupro_reference`` (the official 200-threshold AUPRO) from the same sort.
    """
    keys = PIXEL_KEYS + (("aupro_reference",) if reference else ())
    mlist = _as_list(maps, "maps")
    why: str | None = "no anomaly maps given"
    if mlist:
        px = sort_pixels(mlist, masks, with_regions=True)
        why = _undefined(px, "defective pixels", "normal pixels")
        if why is None:
            r = _sweep(px, True)
            out = {"pixel_auroc": r.auroc, "pixel_ap": r.ap, "pixel_f1_max": r.f1_max, "aupro": r.aupro}
            if reference:
                out["aupro_reference"] = _reference_from_sorted(px)
            return out, {}
    return {k: math.nan for k in keys}, {k: str(why) for k in keys}


def image_metrics(
    scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray, reference: bool = False
) -> tuple[dict[str, float], dict[str, str]]:
    """Image AUROC, AP (step sum), F1-max; NaN (with a reason) where undefined.

    With ``reference`` also ``image_ap_reference``: the official trapezoidal AP from the same sweep.
    """
    keys = IMAGE_KEYS + (("image_ap_reference",) if reference else ())
    im = _sorted_from_labels(np.asarray(scores), np.asarray(labels))
    why = _undefined(im, "anomalous images", "normal images") if im.pos.size + im.neg.size else "no images"
    if why is None:
        r = _sweep(im, False)
        out = {"image_auroc": r.auroc, "image_ap": r.ap, "image_f1_max": r.f1_max}
        if reference:
            out["image_ap_reference"] = r.ap_trapezoid
        return out, {}
    return {k: math.nan for k in keys}, {k: why for k in keys}


def compute_metrics(
    maps: ArrayList,
    masks: MaskList,
    scores: Sequence[float] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
) -> dict:
    """All §6 metrics of one class. ``maps`` [N, H, W] (or a list), ``masks`` the same shapes
    (binarised at 0.5; ``None`` = no defect), ``scores`` / ``labels`` [N] image scores and labels.

    Returns the keys of :data:`METRIC_KEYS` as floats (NaN where undefined) and ``reason``: a dict
    from each undefined metric to why it is undefined (empty when all are defined).
    """
    n_maps = len(_as_list(maps, "maps"))
    if n_maps != len(scores) or len(scores) != len(labels):
        raise InputError(f"got {n_maps} maps, {len(scores)} image scores and {len(labels)} labels")
    pixel, pixel_why = pixel_metrics(maps, masks)
    image, image_why = image_metrics(scores, labels)
    out: dict = {key: float({**pixel, **image}[key]) for key in METRIC_KEYS}
    out["reason"] = {**pixel_why, **image_why}
    return out
