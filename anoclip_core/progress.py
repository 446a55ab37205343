"""Progress for every CLI: a tqdm bar on a terminal, plain lines in a log.

tqdm redraws its bar with carriage returns; piped to a file that is hundreds of frames on one
"line". ``progress`` returns a tqdm bar only when the stream is a terminal; otherwise a
``LineProgress`` with the same small interface (``update``, ``set_description``,
``set_postfix_str``, ``reset``, ``close``, iteration, ``with``) that writes one plain line per
step, at most one per ``interval_s`` while steps come fast, and always the last one.
``TQDM_DISABLE`` (tqdm's own switch) and ``enabled=False`` silence both.

Torch-free; ``tqdm`` is imported only for a terminal.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

LINE_INTERVAL_S = 1.0


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _disabled_by_env() -> bool:
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")


class LineProgress:
    """tqdm's interface, written as one plain line per step (see module docstring)."""

    def __init__(self, iterable: Iterable[Any] | None = None, total: int | None = None, desc: str = "",
                 unit: str = "it", file: TextIO | None = None, enabled: bool = True,
                 interval_s: float = LINE_INTERVAL_S) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.unit = total, desc, unit
        self.file = file if file is not None else sys.stderr
        self.enabled = enabled
        self.interval_s = interval_s
        self.n = 0
        self.postfix = ""
        self._last_t = float("-inf")
        self._written_n: int | None = None

    def _line(self) -> str:
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        head = f"{self.desc}: " if self.desc else ""
        return f"{head}{count} {self.unit}" + (f" ({self.postfix})" if self.postfix else "")

    def _emit(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or self._written_n == self.n or (not force and now - self._last_t < self.interval_s):
            return
        print(self._line(), file=self.file, flush=True)
        self._last_t, self._written_n = now, self.n

    def update(self, n: int = 1) -> None:
        self.n += n
        self._emit(force=self.total is not None and self.n >= self.total)

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def reset(self, total: int | None = None) -> None:
        self.n, self.total, self._written_n = 0, total, None

    def write(self, message: str) -> None:
        if self.enabled:
            print(message, file=self.file, flush=True)

    def close(self) -> None:
        if self.n:
            self._emit(force=True)

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update(1)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(iterable: Iterable[Any] | None = None, total: int | None = None, desc: str = "", unit: str = "it",
             enabled: bool = True, file: TextIO | None = None, leave: bool = True) -> Any:
    """A tqdm bar on a terminal, else a ``LineProgress`` (silent when disabled)."""
    stream = file if file is not None else sys.stderr
    enabled = enabled and not _disabled_by_env()
    if enabled and _is_tty(stream):
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, leave=leave, dynamic_ncols=True)
    return LineProgress(iterable, total, desc, unit, stream, enabled)


def say(message: str, file: TextIO | None = None) -> None:
    """A message line that does not break a bar being drawn on the terminal."""
    stream = file if file is not None else sys.stderr
    if _is_tty(stream):
        from tqdm import tqdm

        tqdm.write(message, file=stream)
    else:
        print(message, file=stream, flush=True)
