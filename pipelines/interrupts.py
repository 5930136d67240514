"""Ctrl-C that no library can swallow.

Python turns SIGINT into KeyboardInterrupt at the next bytecode, and a bare `except:` anywhere in
the libraries a job runs through can catch and drop it; the job would then finish and publish
its folder after the user asked it to stop. The handler also records the interrupt, and the
pipeline checks the record between stages and before publishing.
"""

from __future__ import annotations

import signal
import threading

INTERRUPTED = threading.Event()


def install() -> None:
    """Record every SIGINT, then raise KeyboardInterrupt as Python's default handler does."""

    def handler(signum, frame):
        INTERRUPTED.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)


def check() -> None:
    """Raise KeyboardInterrupt if a SIGINT arrived, even one that was caught and dropped since."""
    if INTERRUPTED.is_set():
        raise KeyboardInterrupt
