"""A bad strip fails alone: the stream goes on, flush() works and held memory stays bounded."""
from __future__ import annotations

import numpy as np
import pytest
from rt_fakes import PatchMeanBackend, fake_detector

from anoclip.runtime.tiler import StripStream
from anoclip_core.errors import InputError


def infer_fn():
    return fake_detector(PatchMeanBackend()).tile_infer("bottle")


def strip(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random((h, w, 3)).astype(np.float32)


def test_nan_strip_fails_alone_and_later_results_match_a_clean_stream():
    h, w = 32, 128
    good = [strip(h, w, i) for i in range(6)]
    bad = good[2].copy()
    bad[5, 7, 1] = np.nan
    clean = list(StripStream(infer_fn(), overlap=8).run(good))
    stream = StripStream(infer_fn(), overlap=8)
    out = []
    for i, s in enumerate(good):
        if i == 3:
            with pytest.raises(InputError, match="strip 3: contains NaN"):
                stream.push(bad)
            with pytest.raises(InputError, match="does not continue"):
                stream.push(strip(h, w + 1, 99))
            with pytest.raises(InputError, match="does not continue"):
                stream.push(good[0].astype(np.float64))
        out.extend(stream.push(s))
    out.extend(stream.flush())
    assert [r.index for r in out] == list(range(6))
    for a, b in zip(out, clean, strict=True):
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
        assert a.score == b.score


def test_failure_inside_inference_resets_the_stream_and_flush_works():
    calls = {"n": 0}
    real = infer_fn()

    def flaky(crops):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("backend hiccup")
        return real(crops)

    stream = StripStream(flaky, overlap=8, batch=64)
    stream.push(strip(32, 128, 0))
    stream.push(strip(32, 128, 1))
    with pytest.raises(RuntimeError, match="hiccup"):
        stream.push(strip(32, 128, 2))
    assert stream.carried_rows == 0 and stream.width is None
    assert stream.flush() == []
    out = stream.push(strip(32, 128, 3)) + stream.push(strip(32, 128, 4)) + stream.flush()
    assert [r.index for r in out] == [0, 1]  # a new scan after the reset
    assert all(np.isfinite(r.anomaly_map).all() for r in out)


def test_held_rows_stay_bounded_with_bad_strips_mixed_in():
    h, w = 32, 128
    stream = StripStream(infer_fn(), overlap=8)
    held = []
    for i in range(60):
        s = strip(h, w, i)
        if i % 3 == 1:
            s[0, 0, 0] = np.inf
            with pytest.raises(InputError):
                stream.push(s)
        else:
            stream.push(s)
        held.append(stream.carried_rows)
    assert max(held) <= 3 * h  # about one tile of raw rows plus one strip: not growing with the scan
    assert len(stream.flush()) > 0
