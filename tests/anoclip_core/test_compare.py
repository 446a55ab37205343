"""Fidelity metrics on synthetic maps with known answers."""
from __future__ import annotations

import numpy as np
import pytest

from anoclip_core.compare import compare, pearson, top_fraction_iou, top_fraction_mask


def test_pearson_known_values():
    a = np.array([1.0, 2.0, 3.0])
    assert pearson(a, np.array([1.0, 3.0, 2.0])) == pytest.approx(0.5)
    assert pearson(a, a) == pytest.approx(1.0)
    assert pearson(a, -a) == pytest.approx(-1.0)
    assert pearson(a, 3 * a + 7) == pytest.approx(1.0)  # invariant to affine changes
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(2, 32, 32))
    assert pearson(x, y) == pytest.approx(np.corrcoef(x.ravel(), y.ravel())[0, 1], abs=1e-12)


def test_pearson_constant_maps():
    c = np.full((4, 4), 0.3)
    assert pearson(c, c) == 1.0
    assert np.isnan(pearson(c, np.arange(16.0).reshape(4, 4)))
    with pytest.raises(ValueError):
        pearson(np.zeros(3), np.zeros(4))


def test_top_fraction_mask_picks_the_largest():
    m = np.arange(100.0).reshape(10, 10)
    assert np.flatnonzero(top_fraction_mask(m, 0.01)).tolist() == [99]
    assert sorted(np.flatnonzero(top_fraction_mask(m, 0.05)).tolist()) == [95, 96, 97, 98, 99]
    assert top_fraction_mask(m, 0.011).sum() == 2  # ceil(1.1)
    with pytest.raises(ValueError):
        top_fraction_mask(m, 0.0)


def test_top_one_percent_iou_by_hand():
    a = np.arange(10000.0).reshape(100, 100)  # top 1%: the last row (indices 9900..9999)
    assert top_fraction_iou(a, a) == 1.0
    b = a.copy()
    b[99, :50] = -1.0  # half of a's top set drops out ...
    b[0, :50] = 1e6  # ... and 50 other pixels become the largest
    # b's top 100: row 0 cols 0..49 and row 99 cols 50..99 -> intersection 50, union 150
    assert top_fraction_iou(a, b) == pytest.approx(50 / 150)
    assert top_fraction_iou(a, -a) == 0.0


def test_compare_reports_errors_and_agreement():
    rng = np.random.default_rng(1)
    ref = rng.random((3, 40, 40)).astype(np.float32)
    ref_scores = np.array([0.2, 0.5, 0.9], dtype=np.float32)
    maps = ref.copy()
    maps[1, 5, 5] += 0.25
    scores = ref_scores + np.array([0.0, 0.01, -0.03], dtype=np.float32)
    out = compare(maps, scores, ref, ref_scores)
    assert out["images"] == 3
    assert out["map_max_abs"] == pytest.approx(0.25, abs=1e-6)
    assert out["map_mean_abs"] == pytest.approx(0.25 / ref.size, rel=1e-4)
    assert out["score_max_abs"] == pytest.approx(0.03, abs=1e-6)
    assert out["pearson"]["mean"] < 1.0 and out["pearson"]["worst"] < out["pearson"]["mean"]
    assert out["top_iou"]["worst"] <= out["top_iou"]["mean"] <= 1.0
    same = compare(ref, ref_scores, ref, ref_scores)
    assert same["map_max_abs"] == 0.0 and same["pearson"]["worst"] == pytest.approx(1.0)
    assert same["top_iou"]["worst"] == 1.0


def test_compare_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        compare(np.zeros((2, 8, 8)), np.zeros(2), np.zeros((2, 8, 9)), np.zeros(2))
    with pytest.raises(ValueError):
        compare(np.zeros((2, 8, 8)), np.zeros(3), np.zeros((2, 8, 8)), np.zeros(2))


def test_diff_hand_computed_and_refusals():
    from anoclip_core.compare import diff

    d = diff(np.array([1.0, 2.0, 4.0]), np.array([1.5, 2.0, 1.0]))
    assert d.shape == (3,) and d.max_abs == 3.0 and abs(d.mean_abs - 3.5 / 3) < 1e-12 and d.finite
    assert diff(np.zeros(3), np.zeros(4)).max_abs == float("inf")  # shape mismatch
    assert not diff(np.array([np.nan]), np.array([0.0])).finite
    assert diff(np.zeros((0, 2)), np.zeros((0, 2))).max_abs == 0.0


def test_one_routine_serves_verification_parity_and_fidelity():
    """Export verification and the runtime parity check measure with anoclip_core.compare."""
    import anoclip.export.verify as verify
    import anoclip.runtime.backends.base as base
    from anoclip_core import compare as cmp

    assert verify.diff is cmp.diff and base.diff is cmp.diff and base.pearson is cmp.pearson
    rng = np.random.default_rng(0)
    ref = {k: rng.random((2, 4, 4)).astype(np.float32) for k in ("maps", "local_tokens", "global_embedding",
                                                                  "local_embeddings")}
    ref["image_scores"] = rng.random(2)
    got = {k: v.copy() for k, v in ref.items()}
    got["maps"][1, 0, 0] += 0.25
    row = verify.compare(got, ref)
    assert abs(row["map_max_abs"] - 0.25) < 1e-6 and row["score_max_abs"] == 0.0
    assert row["map_pearson_min"] == pytest.approx(pearson(got["maps"][1], ref["maps"][1]))
    assert row["map_pearson_min"] < 0.999 and row["map_top_iou_min"] <= 1.0
