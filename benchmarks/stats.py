"""Latency statistics: summaries, throughput, ratios, and a wall-clock timer with a budget.

Percentiles are ``anoclip_core.timing.percentile`` (linear interpolation between closest ranks,
numpy's default "type 7"), the project's one implementation, tested on known samples.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from anoclip_core.timing import percentile

__all__ = ["LatencyStats", "paired_ratio", "percentile", "plan_repeats", "ratio", "summarize", "throughput",
           "time_calls", "time_interleaved"]


@dataclass(frozen=True)
class LatencyStats:
    """Summary of repeated timings, in milliseconds (per call)."""

    n: int
    mean_ms: float
    std_ms: float
    min_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(seconds: Sequence[float]) -> LatencyStats:
    """Summarise per-call wall times given in seconds (sample std, 0 for a single sample)."""
    xs = [float(s) * 1000.0 for s in seconds]
    if not xs:
        raise ValueError("no timings to summarise")
    n = len(xs)
    mean = sum(xs) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in xs) / (n - 1)) if n > 1 else 0.0
    return LatencyStats(
        n=n,
        mean_ms=mean,
        std_ms=std,
        min_ms=min(xs),
        p50_ms=percentile(xs, 50),
        p90_ms=percentile(xs, 90),
        p99_ms=percentile(xs, 99),
        max_ms=max(xs),
    )


def throughput(batch_size: int, seconds_per_call: Sequence[float]) -> float:
    """Images per second from the median call time of a batch (robust to one slow outlier)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    med = percentile(seconds_per_call, 50)
    if med <= 0:
        raise ValueError("non-positive call time")
    return batch_size / med


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference`` or None when either is missing or the reference is 0."""
    if value is None or reference is None or reference == 0:
        return None
    return float(value) / float(reference)


def time_calls(
    fn: Callable[[], object],
    repeats: int,
    warmup: int = 1,
    budget_s: float | None = None,
    min_repeats: int = 1,
    sync: Callable[[], None] | None = None,
    on_call: Callable[[], None] | None = None,
) -> list[float]:
    """Run ``fn`` ``warmup`` times untimed, then up to ``repeats`` timed calls (seconds each).

    With ``budget_s`` the timed loop stops early once the budget is spent, but never before
    ``min_repeats`` calls. ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each clock read.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(max(0, warmup)):
        fn()
        if sync is not None:
            sync()
    out: list[float] = []
    start = time.perf_counter()
    for i in range(repeats):
        if sync is not None:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        out.append(time.perf_counter() - t0)
        if on_call is not None:
            on_call()
        if budget_s is not None and i + 1 >= min_repeats and time.perf_counter() - start >= budget_s:
            break
    return out


def plan_repeats(estimate_s: float, repeats: int, budget_s: float | None, min_repeats: int) -> int:
    """How many timed calls fit a budget given one call's estimated time (at least ``min_repeats``)."""
    if budget_s is None or estimate_s <= 0:
        return repeats
    fit = int(budget_s // estimate_s)
    return max(min_repeats, min(repeats, fit))


def time_interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int, gap_s: float = 0.0,
                     on_call: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Per-call seconds, the contenders interleaved in a rotating order (a busy machine hits all alike).

    ``gap_s``: idle time before each timed call (engine threads spin for a while after a run and
    would tax whichever call comes next); ``on_call`` runs after each timed call (a progress bar).
    """
    for fn in fns.values():
        if warmup:
            time_calls(fn, repeats=warmup, warmup=0)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(reps):
        names = list(fns)
        names = names[rep % len(names):] + names[: rep % len(names)]
        for name in names:
            if gap_s:
                time.sleep(gap_s)
            times[name] += time_calls(fns[name], repeats=1, warmup=0, on_call=on_call)
    return times


def paired_ratio(a: list[float], b: list[float]) -> float | None:
    """Median over rounds of ``a[k] / b[k]``: calls of the same interleaved round saw the same load.

    Sample k of every contender comes from round k (``time_interleaved``, the runner's rounds), so
    pairing by index compares calls made seconds apart; a burst of load that hits one round cancels out.
    """
    n = min(len(a), len(b))
    if n == 0:
        return None
    return percentile([a[k] / b[k] for k in range(n) if b[k] > 0], 50)

