"""Tile blending against the formula written out by hand (runtime/tiler.py docstring).

Between two regular neighbours (next start = start + t - o) the blended map is
``(1 - r(i)) * m_prev + r(i) * m_next`` with ``r(i) = 1/2 - 1/2 cos(pi (i + 1/2) / o)``, computed
here from the formula, not from the module's ``ramp``/``axis_weight``. The expectation never looks
at the blended output, so a reversed or missing ramp fails whatever the map looks like.
"""
from __future__ import annotations

import numpy as np
from rt_fakes import PatchMeanBackend, fake_detector

from anoclip.runtime.postprocess import anomaly_map
from anoclip.runtime.tiler import predict_tiled


def _strip(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = 0.5 + 0.3 * np.sin(xx / 23.0) * np.cos(yy / 17.0) + 0.15 * np.sign(np.sin(xx / 41.0))
    return (np.clip(img, 0, 1)[..., None].repeat(3, 2) * 255).astype(np.uint8)


def test_overlaps_are_the_raised_cosine_blend_of_the_two_tiles():
    h, w, t, o = 64, 64 * 5 - 16 * 4, 64, 16  # 5 regular tiles exactly: no end-aligned extra tile
    strip = _strip(h, w)
    infer = fake_detector(PatchMeanBackend()).tile_infer("bottle")
    out = predict_tiled(strip, infer, t, o, batch=2)
    starts = list(range(0, w - t + 1, t - o))
    assert starts[-1] + t == w and len(starts) == 5
    maps = []
    for s in starts:
        probs, _ = infer([strip[:, s:s + t]])
        maps.append(anomaly_map(probs, (t, t))[0])
    i = np.arange(o)
    r = 0.5 - 0.5 * np.cos(np.pi * (i + 0.5) / o)
    expected = np.zeros((h, w))
    for k, (s, m) in enumerate(zip(starts, maps, strict=True)):
        wx = np.ones(t)
        if k > 0:
            wx[:o] = r
        if k < len(starts) - 1:
            wx[t - o:] = 1 - r
        expected[:, s:s + t] += m * wx
    assert not np.allclose(maps[0][:, t - o:], maps[1][:, :o], atol=1e-3)  # the tiles really disagree there
    np.testing.assert_allclose(out.anomaly_map, expected, atol=2e-6, rtol=0)


def test_tiled_score_is_the_max_over_tiles():
    strip = _strip(64, 304)
    infer = fake_detector(PatchMeanBackend()).tile_infer("bottle")
    out = predict_tiled(strip, infer, 64, 16)
    singles = [float(infer([strip[:, s:s + 64]])[1].reshape(-1)[0]) for s in (0, 48, 96, 144, 192, 240)]
    assert out.score == max(singles) and max(singles) > min(singles) + 1e-4
