"""The sync and sender threads run ahead of the rest (engine/server/threads.py)."""
import logging
import os
import threading

from engine.server import threads
from engine.server.threads import raise_thread_priority


def in_thread(fn):
    out = {}

    def run():
        out["id"] = threading.get_native_id()
        out["result"] = fn()
        out["nice"] = os.getpriority(os.PRIO_PROCESS, out["id"])
    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out


def test_only_the_calling_thread_moves_and_relative_to_the_process(monkeypatch):
    base = os.getpriority(os.PRIO_PROCESS, os.getpid())
    calls = []
    real = os.setpriority
    monkeypatch.setattr(os, "setpriority", lambda *a: calls.append(a) or real(*a))
    out = in_thread(lambda: raise_thread_priority(0, "sync"))
    assert out == {"id": out["id"], "result": True, "nice": base} and calls == []
    # Raising priority needs CAP_SYS_NICE; lowering it (a positive nice) does
    # not, so the relative arithmetic is checked on a thread of its own too.
    out = in_thread(lambda: raise_thread_priority(-3, "sync"))
    assert calls[0] == (os.PRIO_PROCESS, out["id"], max(-20, base - 3))
    if out["result"]:
        assert out["nice"] == max(-20, base - 3)
    else:
        assert out["nice"] == base
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base  # untouched


def test_not_permitted_warns_once_and_goes_on(monkeypatch, caplog):
    def refuse(*_args):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(os, "setpriority", refuse)
    monkeypatch.setattr(threads, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="scanpay.threads"):
        assert in_thread(lambda: raise_thread_priority(-10, "sync"))["result"] is False
        assert in_thread(lambda: raise_thread_priority(-10, "sender"))["result"] is False
    warnings = [r for r in caplog.records if "io_threads_nice -10 is not permitted" in r.message]
    assert len(warnings) == 1 and "LimitNICE" in warnings[0].message
