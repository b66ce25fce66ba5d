"""Ctrl-C in the demo (engine/demo/stop.py): one press stops it wherever it
lands, even where the KeyboardInterrupt Python raises for it is swallowed.
The demo as a process, pressed at several moments: tests/cli/test_operator.py."""
import enum
import signal

import pytest

from engine.demo.stop import StopSignals


@pytest.fixture
def python_sigint():
    """SIGINT with Python's own handler, as in a terminal: pytest may run as
    a background job, which a shell starts with SIGINT ignored."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def press_in_first(name: str, monkeypatch) -> list:
    """Deliver SIGINT (call its handler, as CPython does for a signal that
    lands there) in the first `EnumType.__getattr__(cls, name)`: numpy looks
    `__array_ufunc__` up there when it compares an array with an IntEnum
    member, and clears whatever exception the lookup raises."""
    lookup = getattr(enum.EnumType, "__getattr__", None)
    pressed = []

    def getattr_with_a_press(cls, attribute):
        if attribute == name and not pressed:
            pressed.append(attribute)
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
        if lookup is None:
            raise AttributeError(attribute)
        return lookup(cls, attribute)

    monkeypatch.setattr(enum.EnumType, "__getattr__", getattr_with_a_press, raising=False)
    return pressed


def test_numpy_swallows_a_keyboard_interrupt_raised_in_the_lookup(python_sigint, monkeypatch):
    """Why the demo latches the press: with Python's handler, the press is lost."""
    import numpy as np

    from engine.protocol.status import Status

    pressed = press_in_first("__array_ufunc__", monkeypatch)
    equal = np.zeros(4, np.uint8) == Status.ok      # no KeyboardInterrupt comes out
    assert pressed and equal.all()


def test_a_press_numpy_swallows_still_stops_the_demo(python_sigint, monkeypatch, capsys):
    """Before the latch, the demo ran to its end and exited 0 (2 runs in 150
    with SIGINT at a random moment of the setup, on a loaded machine)."""
    from engine import demo

    pressed = press_in_first("__array_ufunc__", monkeypatch)
    code = demo.main(["--payments", "20000", "--users", "200", "--embedded", "--report", ""])
    out, err = capsys.readouterr()
    assert pressed
    assert code == 130, out[-800:]
    assert err.strip() == "scanpay demo: interrupted", err
    assert "Weekend summary" not in out                 # it stopped before the end
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # handed back


def test_a_deferred_press_is_acted_on_after_the_section(python_sigint):
    stop = StopSignals()
    stop.install()
    try:
        with stop.deferred():
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)     # no raise inside
            stop.check()
        with pytest.raises(KeyboardInterrupt):
            stop.check()
        assert stop.exit_code == 130 and stop.what == "interrupted"
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_press_cancels_the_stream_task_and_a_second_one_raises(python_sigint):
    import asyncio

    stop = StopSignals()
    stop.install()
    events = []

    async def stream():
        with stop.cancels(asyncio.current_task()):
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)     # cancels, no raise
            events.append("pressed")
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                events.append("cancelled")
                with pytest.raises(KeyboardInterrupt):              # pressed again
                    signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
                raise
    try:
        with pytest.raises(asyncio.CancelledError):
            asyncio.run(stream())
        assert events == ["pressed", "cancelled"]
        with pytest.raises(KeyboardInterrupt):
            stop.check()
    finally:
        stop.uninstall()


def test_an_ignored_signal_stays_ignored():
    """A background job of a shell starts with SIGINT ignored: the demo
    leaves it so (stop such a job with SIGTERM)."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    term_before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    stop = StopSignals()
    try:
        stop.install()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == stop._on_signal
        stop.uninstall()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, before)
        signal.signal(signal.SIGTERM, term_before)
