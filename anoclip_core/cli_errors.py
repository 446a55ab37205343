"""One error rule for every CLI: ``error: <one line>`` on stderr and exit status 2.

Click's own usage errors (unknown option, bad integer, missing argument) print a usage block
and "Error: ..." by default; ``OneLineCommand`` / ``OneLineGroup`` print one line instead, as
our own errors do. The full traceback of an unexpected error is kept for ``ANOCLIP_DEBUG=1``.

Interruptions: Ctrl-C prints ``error: aborted`` (exit 130); SIGTERM (``timeout``, service
managers, ``kill``) unwinds the same way, so ``finally`` blocks and context managers run (temp
folders deleted, worker threads joined, the lines already written stay whole), then prints
``error: terminated (SIGTERM)`` (exit 143, as a shell reports a process killed by it).

Both raise a Python exception wherever the main thread is, which native libraries do not all
survive: inside ``torch.onnx.export`` (C++ tracing calling back into Python, and the imports of
onnx / onnxscript it makes) a SIGTERM once aborted the process (SIGABRT, exit -6, temp folder
left). ``signals_held`` wraps such steps: a signal arriving inside takes effect when the step
ends, a second one of the same kind at once.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import click

from .errors import AnoCLIPError


def one_line(message: str) -> str:
    """Collapse a message to a single line (newlines and runs of spaces become one space)."""
    return " ".join(str(message).split())


def fail(message: Any) -> None:
    """Print ``error: <message>`` on stderr and exit 2."""
    click.echo(f"error: {one_line(str(message))}", err=True)
    sys.exit(2)


def run_tool(main: Callable[[], int]) -> None:
    """``sys.exit(main())`` for the argparse tools (``python -m anoclip.benchmarks.prefetch``, ...),
    with their ``AnoCLIPError`` (missing artifact, unknown precision) as one ``error:`` line, exit 2."""
    try:
        code = main()
    except AnoCLIPError as err:
        fail(err)
    sys.exit(code)


#: Exit status after SIGTERM (128 + 15).
SIGTERM_EXIT = 143


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM: not an ``Exception``, so nothing swallows it."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(SIGTERM_EXIT)


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Inside the block SIGTERM raises ``Terminated`` (main thread only: Python delivers signals there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def signals_held(step: str) -> Iterator[None]:
    """Inside the block SIGINT / SIGTERM are held: the first takes effect (its previous handler
    runs) when the block ends, a repeat of it at once. ``step`` names the step in the notice."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kinds = (signal.SIGINT, signal.SIGTERM)
    previous: dict[int, Any] = {int(s): signal.getsignal(s) for s in kinds}
    held: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        if signum in held:
            _deliver(signum, previous[signum])
            return
        held.append(signum)
        sys.stderr.write(f"anoclip: {signal.Signals(signum).name} received; stopping when {step} ends "
                         "(send it again to stop now)\n")

    for s in kinds:
        signal.signal(s, hold)
    try:
        yield
    finally:
        for s in kinds:
            signal.signal(s, previous[s])
        if held:
            _deliver(held[0], previous[held[0]])


def _deliver(signum: int, handler: Any) -> None:
    """What ``signum`` would have done under ``handler`` (a callable, SIG_DFL or SIG_IGN)."""
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)


class _OneLineMixin:
    """``main`` in non-standalone mode, with click's exceptions turned into one error line."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)  # type: ignore[misc]
        try:
            with sigterm_unwinds():
                rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)  # type: ignore[misc]
        except click.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(130)
        except Terminated:
            click.echo("error: terminated (SIGTERM)", err=True)
            sys.exit(SIGTERM_EXIT)
        except click.ClickException as err:
            fail(err.format_message())
        except AnoCLIPError as err:
            fail(err)
        sys.exit(rv if isinstance(rv, int) else 0)


class OneLineCommand(_OneLineMixin, click.Command):
    """A click command that follows the one-line error rule."""


class OneLineGroup(_OneLineMixin, click.Group):
    """A click group that follows the one-line error rule."""
