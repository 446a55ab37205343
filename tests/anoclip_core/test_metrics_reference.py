"""Paper-comparable metrics (ALGORITHM.md §6): trapezoidal image AP, 200-threshold AUPRO, and
their place in results.md / results.json beside the exact AUPRO and the step-sum AP."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import auc, precision_recall_curve

from anoclip_core import metrics as M
from anoclip_core.datasets import Sample
from anoclip_core.evaluate import ClassOutputs, class_metrics, markdown_table, mean_metrics


# trapezoidal AP -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "scores, labels, trapezoid, step_sum",
    [
        # points (r, p) from (0, 1): (.5, 1), (.5, .5), (1, 2/3), (1, .5) -> .5 + 0 + .5 * (.5 + 2/3) / 2
        ([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0], 0.5 + 0.5 * (0.5 + 2 / 3) / 2, 0.5 * 1 + 0.5 * 2 / 3),
        # a tie at the top: (.5, .5) then (1, 2/3) -> .5 * (1 + .5) / 2 + .5 * (.5 + 2/3) / 2
        ([0.5, 0.5, 0.2], [1, 0, 1], 0.5 * 1.5 / 2 + 0.5 * (0.5 + 2 / 3) / 2, 0.5 * 0.5 + 0.5 * 2 / 3),
        # only positives: precision 1 everywhere
        ([0.3, 0.1], [1, 1], 1.0, 1.0),
    ],
)
def test_trapezoid_ap_hand_computed(scores, labels, trapezoid, step_sum) -> None:
    assert M.average_precision_trapezoid(np.array(scores), np.array(labels)) == pytest.approx(trapezoid, abs=1e-12)
    assert M.average_precision(np.array(scores), np.array(labels)) == pytest.approx(step_sum, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_trapezoid_ap_equals_sklearn_auc_of_pr_curve(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 40))
    scores = np.round(rng.random(n), 1)  # many ties
    labels = rng.integers(0, 2, n)
    labels[0], labels[1] = 0, 1
    precision, recall, _ = precision_recall_curve(labels, scores)
    expected = auc(recall, precision)
    got = M.average_precision_trapezoid(scores, labels)
    assert got == pytest.approx(expected, abs=1e-12)
    im, _ = M.image_metrics(scores, labels, reference=True)
    assert im["image_ap_reference"] == pytest.approx(expected, abs=1e-12)


def test_trapezoid_ap_differs_from_step_sum() -> None:
    """The two definitions are not interchangeable (why results.md labels both)."""
    scores, labels = np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])
    assert abs(M.average_precision_trapezoid(scores, labels) - M.average_precision(scores, labels)) > 0.04


# 200-threshold AUPRO --------------------------------------------------------------------------
def test_reference_aupro_hand_computed() -> None:
    """One 1 x 6 map: negatives 0.1, 0.2, 0.4, 0.9; one 2-pixel region scored 0.5, 0.95.

    Thresholds 0.1 + k * 0.00425 (k < 200), positive when score > th. Kept (FPR < 0.3): FPR 0.25
    for th in [0.4, 0.9) and 0 above; after min/max rescaling only the step FPR 1 -> 0 has width,
    between PRO 0.5 (th just below 0.9) and PRO 0.5 (just above) -> area 0.5.
    Exact AUPRO: PRO 0.5 on FPR [0, 0.25], 1.0 on [0.25, 0.3] -> (0.125 + 0.05) / 0.3.
    """
    amap = np.array([[0.1, 0.2, 0.4, 0.9, 0.5, 0.95]], np.float64)
    mask = np.array([[0, 0, 0, 0, 1, 1]], np.uint8)
    assert M.aupro_reference([amap], [mask]) == pytest.approx(0.5, abs=1e-12)
    assert M.aupro([amap], [mask]) == pytest.approx(0.175 / 0.3, abs=1e-12)


# results.md / results.json --------------------------------------------------------------------
def outputs_case() -> ClassOutputs:
    rng = np.random.default_rng(4)
    out = ClassOutputs()
    for i in range(6):
        label = int(i >= 3)
        mask = np.zeros((16, 16), bool)
        if label:
            mask[4:9, 3 + i : 8 + i] = True
        out.samples.append(Sample(f"img{i}.png", "part", label, None, "bad" if label else "good"))
        out.maps.append((rng.random((16, 16)) + 0.5 * mask).astype(np.float32))
        out.masks.append(mask)
        out.scores.append(float(np.round(rng.random(), 1) + 0.2 * label))
    return out


def test_results_keep_all_definitions_and_headline_the_official_ones() -> None:
    outputs = outputs_case()
    r = class_metrics(outputs)
    labels = [s.label for s in outputs.samples]
    assert r["aupro_reference"] == pytest.approx(M.aupro_reference(outputs.maps, outputs.masks), abs=1e-12)
    assert r["aupro"] == pytest.approx(M.aupro(outputs.maps, outputs.masks), abs=1e-12)
    assert r["image_ap_reference"] == pytest.approx(M.average_precision_trapezoid(outputs.scores, labels), abs=1e-12)
    assert r["image_ap"] == pytest.approx(M.average_precision(outputs.scores, labels), abs=1e-12)
    results = {
        "random_weights": False, "dataset": "folder", "backbone": "b", "pretrained": "p", "image_size": 16,
        "tta": False, "views": False, "protocol": "single", "classes": {"part": r}, "mean": mean_metrics({"part": r}),
    }
    table = markdown_table(results)
    header = next(line for line in table.splitlines() if line.startswith("| class"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    row = next(line for line in table.splitlines() if line.startswith("| part"))
    cells = dict(zip(cols, [c.strip() for c in row.strip("|").split("|")], strict=True))
    assert cells["AUPRO"] == f"{100 * r['aupro_reference']:.1f}"
    assert cells["AUPRO (exact)"] == f"{100 * r['aupro']:.1f}"
    assert cells["image AP"] == f"{100 * r['image_ap_reference']:.1f}"
    assert cells["image AP (step-sum)"] == f"{100 * r['image_ap']:.1f}"
    assert cols.index("AUPRO") < cols.index("AUPRO (exact)")
    assert cols.index("image AP") < cols.index("image AP (step-sum)")
    assert results["mean"]["image_ap_reference"] == r["image_ap_reference"]
    assert not math.isnan(r["aupro_reference"])
