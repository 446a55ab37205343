"""anoclip_core.timing: statistics logic only (a fake clock; no assertions on real time)."""
from __future__ import annotations

import numpy as np
import pytest

from anoclip_core.timing import TimingStats, percentile, summarize, time_callable


class FakeClock:
    """Returns scripted times; each timed call lasts the next duration from ``durations_s``."""

    def __init__(self, durations_s):
        self.durations = list(durations_s)
        self.now = 100.0
        self.reads = 0
        self.pending = None

    def __call__(self) -> float:
        self.reads += 1
        if self.pending is None:  # start of a sample
            self.pending = self.durations.pop(0)
            return self.now
        self.now += self.pending  # end of a sample
        self.pending = None
        return self.now


@pytest.mark.parametrize("q", [0, 10, 25, 50, 90, 99, 100])
@pytest.mark.parametrize("data", [[5.0], [3.0, 1.0], [1, 2, 3, 4, 10], list(np.random.default_rng(0).random(37))])
def test_percentile_matches_numpy(data, q):
    assert percentile(data, q) == pytest.approx(float(np.percentile(data, q)), abs=1e-12)


def test_summarize_values():
    s = summarize([4.0, 1.0, 3.0, 2.0, 100.0], warmup=2)
    assert isinstance(s, TimingStats)
    assert s.repeats == 5 and s.warmup == 2
    assert s.median_ms == 3.0 and s.min_ms == 1.0 and s.max_ms == 100.0
    assert s.mean_ms == pytest.approx(22.0)
    assert s.std_ms == pytest.approx(float(np.std([4, 1, 3, 2, 100])))
    assert s.p90_ms == pytest.approx(float(np.percentile([4, 1, 3, 2, 100], 90)))
    assert s.p10_ms == pytest.approx(1.4)
    assert s.samples_ms == (4.0, 1.0, 3.0, 2.0, 100.0)  # call order kept
    d = s.to_dict()
    assert d["samples_ms"] == [4.0, 1.0, 3.0, 2.0, 100.0] and d["median_ms"] == 3.0
    assert "median 3.00 ms" in str(s)


def test_median_even_count_and_outlier_robustness():
    s = summarize([10.0, 12.0, 11.0, 1000.0])
    assert s.median_ms == pytest.approx(11.5)
    assert s.mean_ms > 200  # the mean is not robust, the median is


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [1.0, -0.5], [float("inf")]])
def test_summarize_rejects(bad):
    with pytest.raises(ValueError):
        summarize(bad)


def test_percentile_rejects():
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_time_callable_with_fake_clock():
    calls = []
    clock = FakeClock([0.010, 0.030, 0.020])  # 10, 30, 20 ms
    syncs = []
    stats = time_callable(lambda: calls.append(1), warmup=4, repeats=3, clock=clock, sync=lambda: syncs.append(1))
    assert len(calls) == 7  # 4 warm-up calls, untimed, then 3 timed
    assert clock.reads == 6  # two reads per timed call, none during warm-up
    assert len(syncs) == 6
    assert stats.samples_ms == pytest.approx((10.0, 30.0, 20.0))
    assert stats.median_ms == pytest.approx(20.0) and stats.warmup == 4 and stats.repeats == 3


def test_time_callable_real_clock_runs():
    stats = time_callable(lambda: sum(range(100)), warmup=1, repeats=5)
    assert stats.repeats == 5 and len(stats.samples_ms) == 5
    assert all(v >= 0 for v in stats.samples_ms)
    assert stats.min_ms <= stats.median_ms <= stats.p90_ms <= stats.max_ms


@pytest.mark.parametrize("warmup,repeats", [(-1, 3), (0, 0)])
def test_time_callable_rejects(warmup, repeats):
    with pytest.raises(ValueError):
        time_callable(lambda: None, warmup=warmup, repeats=repeats)
