"""Ctrl-C that no library can swallow.

Python turns SIGINT into KeyboardInterrupt at the next bytecode, and a bare `except:` anywhere in
the libraries a job runs through can catch and drop it; the job would then finish and publish
its folder after the user asked it to stop. The handler also records the interrupt, and the
pipeline checks the record between stages and before publishing.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

INTERRUPTED = threading.Event()


def _record_and_raise(signum, frame):
    INTERRUPTED.set()
    raise KeyboardInterrupt


@contextlib.contextmanager
def watching() -> Iterator[None]:
    """Inside the block every SIGINT is recorded, then raised as KeyboardInterrupt as Python's
    default handler does. On leaving it, the previous handler is back and the record is cleared,
    so a later job in the same process starts without an old Ctrl-C."""
    INTERRUPTED.clear()
    previous = signal.signal(signal.SIGINT, _record_and_raise)
    previous_hook = sys.unraisablehook

    def drop_recorded_interrupt(unraisable) -> None:
        """A SIGINT that lands in a finalizer or weakref callback cannot propagate; Python would
        print it as "Exception ignored". It is recorded, and `check` raises it at the next stage."""
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            previous_hook(unraisable)

    sys.unraisablehook = drop_recorded_interrupt
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = previous_hook
        INTERRUPTED.clear()


def check() -> None:
    """Raise KeyboardInterrupt if a SIGINT arrived, even one that was caught and dropped since."""
    if INTERRUPTED.is_set():
        raise KeyboardInterrupt
