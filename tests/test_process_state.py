"""A job leaves the process as it found it: signal handlers, interrupt record, hub settings."""

from __future__ import annotations

import os
import signal

import pytest


def test_an_old_ctrl_c_does_not_abort_the_next_job():
    """One Ctrl-C, recorded during one job, neither leaks into the next nor keeps our handler."""
    from pipelines.jobs import interrupts

    before = signal.getsignal(signal.SIGINT)
    with interrupts.watching():
        assert signal.getsignal(signal.SIGINT) is not before
        interrupts.INTERRUPTED.set()  # what the handler records on SIGINT
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
    assert signal.getsignal(signal.SIGINT) is before
    with interrupts.watching():
        interrupts.check()  # the next job starts clean


def test_a_ctrl_c_inside_a_finalizer_is_not_printed_but_still_stops_the_job(capsys):
    """SIGINT during a weakref callback cannot propagate; Python would print "Exception ignored".
    Inside a job it is silent, recorded, and raised by the next check."""
    import gc
    import sys
    import weakref

    from pipelines.jobs import interrupts

    class Node:
        pass

    before = sys.unraisablehook
    with interrupts.watching():
        node = Node()
        weakref.finalize(node, lambda: interrupts._record_and_raise(signal.SIGINT, None))
        del node
        gc.collect()
        assert "Exception ignored" not in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
    assert sys.unraisablehook is before


def test_going_offline_for_an_unreachable_hub_is_undone_after_the_load(monkeypatch):
    import huggingface_hub.constants as hub

    from pipelines.models import registry as models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "hub_resolves", lambda timeout=3.0: False)
    flag = hub.HF_HUB_OFFLINE
    with models.offline_if_hub_unreachable() as offline:
        assert offline and os.environ["HF_HUB_OFFLINE"] == "1" and hub.HF_HUB_OFFLINE
    assert "HF_HUB_OFFLINE" not in os.environ and hub.HF_HUB_OFFLINE == flag
