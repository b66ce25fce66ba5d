"""Ctrl-C (SIGINT) and SIGTERM for the demo: one press always stops it.

Python's own SIGINT handler raises KeyboardInterrupt in whatever Python code
the main thread runs next. C code that calls Python code and then clears
whatever error came back swallows it. The demo meets such code on every
batch: numpy compares an array with an IntEnum member
(`results["status"] == Status.ok`) after looking `__array_ufunc__` up on the
enum's class, through the Python-level `EnumType.__getattr__` (Python 3.11),
and clears any exception raised there (numpy 2.4). A Ctrl-C whose handler
ran in that lookup was lost: the demo ran to its end and exited 0 (2 runs in
150 with SIGINT at a random moment of the setup on a loaded machine).

So the demo's handler latches the signal before it raises, and the demo
calls `check()` at its safe points (every batch, every phase), which raises
KeyboardInterrupt again if the first one was swallowed; the demo never exits
0 after a stop signal. Two more modes:
- `deferred()`: sections that must not be cut in half (starting or stopping
  the server, closing the engine, removing the data directory) only latch;
  the demo checks when they are done.
- `cancels(task)`: the stream over the wire (engine/demo/wire.py) has its
  main task cancelled instead, as asyncio.run's own SIGINT handler would
  (asyncio.run leaves SIGINT alone when a handler other than Python's is
  installed), so that the gateways close and the server drains cleanly.

A signal ignored when the demo starts stays ignored, as Python itself leaves
it: a shell without job control starts a background job (`scanpay demo &`)
with SIGINT ignored, so that a Ctrl-C meant for the foreground leaves it
running. Such a job is stopped with SIGTERM (docs/operations.md).
"""
from __future__ import annotations

import contextlib
import signal
import sys

# The exit code of a run a signal stopped: 128 + the signal's number, the
# code a shell reports for a process the signal killed.
EXIT_CODES = {signum: 128 + signum for signum in (signal.SIGINT, signal.SIGTERM)}
WHAT = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}
# Python's handler for each, when nothing else was installed: only those are replaced.
PYTHON_DEFAULTS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}


def _wake() -> None:
    """Run by the event loop after a cancel: it wakes from its select."""


class StopSignals:
    """The demo's SIGINT and SIGTERM handler (the module's docstring)."""

    def __init__(self) -> None:
        self.signum = 0                 # the first stop signal received; 0: none
        self._before: dict = {}         # signal -> the handler it had
        self._deferring = 0
        self._task = None               # cancelled by a signal, instead of raising

    def install(self) -> None:
        """Handle SIGINT and SIGTERM (in the main thread), unless another
        handler than Python's own is installed or the signal is ignored."""
        self.signum = 0
        for signum, default in PYTHON_DEFAULTS.items():
            if signal.getsignal(signum) is default:
                self._before[signum] = signal.signal(signum, self._on_signal)

    def uninstall(self) -> None:
        for signum, before in self._before.items():
            signal.signal(signum, before)
        self._before.clear()

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, EXIT_CODES[signal.SIGINT])

    @property
    def what(self) -> str:
        return WHAT.get(self.signum, WHAT[signal.SIGINT])

    def _on_signal(self, signum: int, _frame) -> None:
        pressed_before = self.signum != 0
        self.signum = self.signum or signum
        if self._deferring:
            return
        task = self._task
        if task is not None and not task.done() and not pressed_before:
            task.cancel()
            task.get_loop().call_soon_threadsafe(_wake)
            return
        raise KeyboardInterrupt         # (a second press while cancelling: at once)

    def check(self) -> None:
        """KeyboardInterrupt if a stop signal came and nothing acted on it
        yet: at a safe point, outside deferred and cancelling sections."""
        if self.signum and not self._deferring and self._task is None:
            raise KeyboardInterrupt

    def interrupted(self) -> None:
        """A KeyboardInterrupt reached the demo's top: SIGINT, if no signal
        was noted (one came before the handler was installed)."""
        self.signum = self.signum or signal.SIGINT

    def outcome(self, code: int, where: str) -> int:
        """The demo's exit code: `code`, or after a stop signal the signal's,
        with one line on stderr that says what was cleaned up (`where`)."""
        if not self.signum:
            return code
        print(f"scanpay demo: {self.what}{where}", file=sys.stderr, flush=True)
        return self.exit_code

    @contextlib.contextmanager
    def stopping(self, cleanup):
        """The demo's top level: the block ends at a stop signal's
        KeyboardInterrupt (noted here, not raised further) or at its end,
        where a press some code swallowed is acted on, so that the demo never
        exits 0 after one; `cleanup` runs after it either way, not cut in half
        by a second press. The exit code is then outcome()'s."""
        try:
            yield
            self.check()
        except KeyboardInterrupt:
            self.interrupted()
        finally:
            with self.deferred():
                cleanup()

    @contextlib.contextmanager
    def deferred(self):
        """A section a stop signal does not cut: it is latched, and check()
        after the section acts on it."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1

    @contextlib.contextmanager
    def cancels(self, task):
        """Within this, a stop signal cancels `task` (an asyncio task of the
        main thread's event loop) instead of raising KeyboardInterrupt."""
        self.check()
        self._task = task
        try:
            yield
        finally:
            self._task = None


# One per process, as signal handlers are.
STOP = StopSignals()
