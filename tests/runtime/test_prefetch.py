"""anoclip.runtime.prefetch.Prefetch: order, values, overlap, bounded look-ahead, failures in place, no thread left.

Overlap is shown with events, never with timings: the caller blocks while holding one batch until
the worker has prepared a later one (with prefetch off that can never happen: a short wait fails).
"""
from __future__ import annotations

import threading

import pytest

from anoclip.runtime.prefetch import MAX_DEPTH, Prefetch

WAIT_S = 30.0  # only reached when the behaviour under test is broken


@pytest.mark.parametrize("depth", [0, 1, 2, MAX_DEPTH])
def test_same_pairs_in_the_same_order(depth):
    with Prefetch(range(11), lambda b: b * b + 1, depth) as run:
        assert list(run) == [(b, b * b + 1) for b in range(11)]


@pytest.mark.parametrize("depth", [-1, MAX_DEPTH + 1])
def test_depth_out_of_range_is_refused(depth):
    with pytest.raises(ValueError, match="prefetch depth"):
        Prefetch([1], str, depth)


@pytest.mark.parametrize("depth,overlaps", [(1, True), (0, False)])
def test_next_batch_is_prepared_while_the_caller_holds_this_one(depth, overlaps):
    holding_0, prepared_1 = threading.Event(), threading.Event()
    wait_s = WAIT_S if overlaps else 0.2
    threads: dict[int, str] = {}

    def prepare(b: int) -> int:
        threads[b] = threading.current_thread().name
        if b == 1 and holding_0.wait(wait_s):  # counts only while the caller holds batch 0
            prepared_1.set()
        return b

    seen = []
    with Prefetch(range(3), prepare, depth) as run:
        for b, _ in run:
            if b == 0:  # the "backend" runs batch 0 until batch 1 is ready (or gives up)
                holding_0.set()
                seen.append(prepared_1.wait(wait_s))
    assert seen == [overlaps]
    assert threads[0] == threading.current_thread().name  # the first batch: nothing to overlap with
    assert (threads[1] != threading.current_thread().name) is overlaps


@pytest.mark.parametrize("depth", [1, 2])
def test_look_ahead_is_bounded_by_depth(depth):
    prepared, consumed, most = [0], [0], [0]
    lock = threading.Lock()

    def prepare(b: int) -> int:
        with lock:
            prepared[0] += 1
            most[0] = max(most[0], prepared[0] - consumed[0])
        return b

    with Prefetch(range(20), prepare, depth) as run:
        for _ in run:
            threading.Event().wait(0.002)  # give the worker every chance to run ahead
            with lock:
                consumed[0] += 1
    # the batch the caller holds + ``depth`` in preparation
    assert most[0] <= depth + 1


def test_a_single_batch_starts_no_thread():
    before = threading.active_count()
    during = []
    with Prefetch([7], lambda b: during.append(threading.active_count()) or b, 2) as run:
        assert list(run) == [(7, 7)]
    assert during == [before]


def test_closing_early_leaves_no_thread():
    before = threading.active_count()

    def batches():
        with Prefetch(range(100), lambda b: b, 2) as run:
            yield from run

    gen = batches()
    assert next(gen) == (0, 0) and next(gen) == (1, 1)
    assert threading.active_count() > before  # the worker is running
    gen.close()
    assert threading.active_count() == before


def test_an_exception_in_the_caller_leaves_no_thread():
    before = threading.active_count()
    with pytest.raises(KeyError):
        with Prefetch(range(100), lambda b: b, 1) as run:
            for b, _ in run:
                if b == 3:
                    raise KeyError("caller failed")
    assert threading.active_count() == before


def test_a_failing_prepare_surfaces_at_its_batch():
    before = threading.active_count()

    def prepare(b: int) -> int:
        if b == 4:
            raise RuntimeError("prepare 4 failed")
        return b

    got = []
    with pytest.raises(RuntimeError, match="prepare 4 failed"):
        with Prefetch(range(10), prepare, 2) as run:
            for b, _ in run:
                got.append(b)
    assert got == [0, 1, 2, 3]
    assert threading.active_count() == before


def test_a_failing_source_surfaces_after_every_earlier_batch():
    before = threading.active_count()

    def source():
        yield from range(3)
        raise OSError("camera gone")

    got = []
    with pytest.raises(OSError, match="camera gone"):
        with Prefetch(source(), lambda b: b, 1) as run:
            for b, _ in run:
                got.append(b)
    assert got == [0, 1, 2]
    assert threading.active_count() == before
