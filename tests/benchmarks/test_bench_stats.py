"""Harness statistics on known samples: percentiles, summaries, throughput, call planning."""
from __future__ import annotations

import math

import numpy as np
import pytest

from anoclip.benchmarks.stats import percentile, plan_repeats, ratio, summarize, throughput, time_calls


@pytest.mark.parametrize(
    "samples, q, expected",
    [
        (list(range(1, 11)), 50, 5.5),
        (list(range(1, 11)), 90, 9.1),
        (list(range(1, 11)), 99, 9.91),
        (list(range(1, 11)), 0, 1.0),
        (list(range(1, 11)), 100, 10.0),
        ([15, 20, 35, 40, 50], 40, 29.0),  # x[1] + 0.6 (x[2] - x[1])
        ([50, 15, 40, 20, 35], 40, 29.0),  # order of the input does not matter
        ([7.0], 99, 7.0),
        ([1.0, 2.0], 50, 1.5),
    ],
)
def test_percentile_known_samples(samples, q, expected):
    assert percentile(samples, q) == pytest.approx(expected, abs=1e-12)


def test_percentile_matches_numpy_linear():
    rng = np.random.default_rng(3)
    for n in (1, 2, 5, 17, 100):
        xs = rng.lognormal(size=n)
        for q in (1, 10, 50, 90, 99):
            assert percentile(xs.tolist(), q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12)


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")]])
def test_percentile_rejects_empty_and_nan(bad):
    with pytest.raises(ValueError):
        percentile(bad, 50)


@pytest.mark.parametrize("q", [-1, 100.5])
def test_percentile_rejects_q_out_of_range(q):
    with pytest.raises(ValueError):
        percentile([1.0, 2.0], q)


def test_summarize_in_milliseconds():
    st = summarize([0.001, 0.002, 0.003, 0.010])
    assert st.n == 4
    assert st.mean_ms == pytest.approx(4.0)
    assert st.std_ms == pytest.approx(math.sqrt(((1 - 4) ** 2 + (2 - 4) ** 2 + (3 - 4) ** 2 + (10 - 4) ** 2) / 3))
    assert st.min_ms == pytest.approx(1.0) and st.max_ms == pytest.approx(10.0)
    assert st.p50_ms == pytest.approx(2.5)
    assert st.p90_ms == pytest.approx(3 + 0.7 * 7)
    assert st.p99_ms == pytest.approx(3 + 0.97 * 7)
    assert summarize([0.005]).std_ms == 0.0
    with pytest.raises(ValueError):
        summarize([])


def test_throughput_uses_the_median_call():
    # batch 4, calls of 0.1, 0.2 and one 10 s outlier: median 0.2 s -> 20 img/s
    assert throughput(4, [0.1, 10.0, 0.2]) == pytest.approx(20.0)
    with pytest.raises(ValueError):
        throughput(0, [0.1])


def test_ratio():
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None and ratio(1.0, None) is None and ratio(1.0, 0.0) is None


def test_plan_repeats():
    assert plan_repeats(2.0, 10, 9.0, 3) == 4
    assert plan_repeats(30.0, 10, 9.0, 3) == 3  # never below the minimum
    assert plan_repeats(0.001, 10, 9.0, 3) == 10  # never above the maximum
    assert plan_repeats(1.0, 10, None, 3) == 10


def test_time_calls_counts_warmup_and_repeats():
    calls, syncs, seen = [], [], []
    out = time_calls(lambda: calls.append(1), repeats=5, warmup=2, sync=lambda: syncs.append(1),
                     on_call=lambda: seen.append(1))
    assert len(out) == 5 and len(calls) == 7 and len(seen) == 5
    assert len(syncs) == 2 + 2 * 5  # after each warm-up call, before and after each timed call
    assert all(t >= 0 for t in out)


def test_time_calls_budget_stops_after_min_repeats():
    calls = []
    out = time_calls(lambda: calls.append(1), repeats=50, warmup=0, budget_s=0.0, min_repeats=3)
    assert len(out) == 3 and len(calls) == 3
    with pytest.raises(ValueError):
        time_calls(lambda: None, repeats=0)
