"""Overlap pre-processing with inference: prepare the next batch on a worker while this one runs.

``Prefetch(batches, prepare, depth)`` is a context manager; inside it, iterating yields
``(batch, prepare(batch))`` in order, exactly as ``((b, prepare(b)) for b in batches)`` would,
but up to ``depth`` later batches are already being prepared on ONE worker thread while the
caller works on the current one (the backend releases the GIL while it runs, and OpenCV does
while it decodes and resizes, so the two really run at once). The first batch is prepared on
the caller's thread (nothing to overlap with yet), so a single batch never starts a thread.

Guarantees: same values (``prepare`` is the same function, only the thread differs), same
order, bounded memory (``depth`` batches in preparation + the one the caller holds), the
caller's iterable is read on the caller's thread (a failure while reading it surfaces after
every earlier batch was yielded, as without prefetch), an exception raised by ``prepare``
surfaces at its batch's position, and leaving the ``with`` block (normally, by an exception or
by closing a generator suspended inside it) cancels what was not started and joins the worker:
no thread is left behind. ``depth = 0`` prepares every batch on the caller's thread.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

T = TypeVar("T")
U = TypeVar("U")

#: Largest accepted prefetch depth (batches prepared ahead); more only holds memory.
MAX_DEPTH = 4


class Prefetch(Generic[T, U]):
    """``with Prefetch(batches, prepare, depth) as prepared: for batch, value in prepared: ...``."""

    def __init__(self, batches: Iterable[T], prepare: Callable[[T], U], depth: int = 1) -> None:
        if not 0 <= int(depth) <= MAX_DEPTH:
            raise ValueError(f"prefetch depth must be between 0 and {MAX_DEPTH}, got {depth}")
        self._batches = batches
        self._prepare = prepare
        self._depth = int(depth)
        self._pool: ThreadPoolExecutor | None = None
        self._gen: Iterator[tuple[T, U]] | None = None

    def __enter__(self) -> Iterator[tuple[T, U]]:
        self._gen = self._sequential() if self._depth == 0 else self._overlapped()
        return self._gen

    def __exit__(self, *exc: Any) -> None:
        if self._gen is not None:
            self._gen.close()  # type: ignore[attr-defined]
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _submit(self, batch: T) -> Future[U]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anoclip-prefetch")
        return self._pool.submit(self._prepare, batch)

    def _sequential(self) -> Iterator[tuple[T, U]]:
        for batch in self._batches:
            yield batch, self._prepare(batch)

    def _overlapped(self) -> Iterator[tuple[T, U]]:
        source = iter(self._batches)
        try:
            first = next(source)
        except StopIteration:
            return
        ready: tuple[T, U] | None = (first, self._prepare(first))
        ahead: deque[tuple[T, Future[U]]] = deque()
        failure: BaseException | None = None
        exhausted = False
        while ready is not None:
            while len(ahead) < self._depth and not exhausted and failure is None:
                try:
                    batch = next(source)
                except StopIteration:
                    exhausted = True
                except Exception as err:  # noqa: BLE001 - re-raised below, after the batches before it
                    failure = err
                else:
                    ahead.append((batch, self._submit(batch)))
            yield ready
            ready = None
            if ahead:
                batch, future = ahead.popleft()
                ready = (batch, future.result())
        if failure is not None:
            raise failure
