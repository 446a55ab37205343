"""Latency of repeated calls: warm-up, then median / percentiles of ``time.perf_counter`` deltas.

Torch-free. ``summarize`` holds all the statistics (unit-tested with fixed samples);
``time_callable`` only measures. For GPU work pass ``sync=torch.cuda.synchronize`` so each
sample covers the device work, not just the launch.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class TimingStats:
    """Summary of ``repeats`` timed calls, in milliseconds (``samples_ms`` in call order)."""

    repeats: int
    warmup: int
    median_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    p10_ms: float
    p90_ms: float
    p99_ms: float
    samples_ms: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["samples_ms"] = list(self.samples_ms)
        return d

    def __str__(self) -> str:
        return (
            f"median {self.median_ms:.2f} ms, p90 {self.p90_ms:.2f} ms, "
            f"min {self.min_ms:.2f} ms, max {self.max_ms:.2f} ms (n={self.repeats}, warm-up {self.warmup})"
        )


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics
    (numpy's default ``method="linear"``)."""
    if not samples:
        raise ValueError("percentile of an empty sample")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    xs = sorted(float(v) for v in samples)
    if any(math.isnan(v) for v in xs):
        raise ValueError("percentile of a sample containing NaN")
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    frac = pos - lo
    return xs[lo] + (xs[hi] - xs[lo]) * frac


def summarize(samples_ms: Sequence[float], warmup: int = 0) -> TimingStats:
    """Statistics of per-call durations in milliseconds (std is the population std, ddof=0)."""
    xs = [float(v) for v in samples_ms]
    if not xs:
        raise ValueError("no timing samples")
    if any(not math.isfinite(v) or v < 0 for v in xs):
        raise ValueError("timing samples must be finite and non-negative")
    n = len(xs)
    mean = sum(xs) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in xs) / n)
    return TimingStats(
        repeats=n,
        warmup=int(warmup),
        median_ms=percentile(xs, 50),
        mean_ms=mean,
        std_ms=std,
        min_ms=min(xs),
        max_ms=max(xs),
        p10_ms=percentile(xs, 10),
        p90_ms=percentile(xs, 90),
        p99_ms=percentile(xs, 99),
        samples_ms=tuple(xs),
    )


def time_callable(
    fn: Callable[[], Any],
    warmup: int = 3,
    repeats: int = 10,
    sync: Callable[[], Any] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> TimingStats:
    """Call ``fn()`` ``warmup`` times untimed, then ``repeats`` times timed one by one.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each clock read; ``clock`` returns
    seconds (``time.perf_counter``; injectable for tests).
    """
    if int(warmup) < 0 or int(repeats) < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    for _ in range(int(warmup)):
        fn()
    samples = []
    for _ in range(int(repeats)):
        if sync is not None:
            sync()
        t0 = clock()
        fn()
        if sync is not None:
            sync()
        samples.append((clock() - t0) * 1000.0)
    return summarize(samples, warmup)
