"""The tests' one settable clock.

An Engine (and every reference) takes `clock`, a callable that returns the
time in ms; a test that needs time to stand still, jump, or step back passes
a Clock and moves it by hand. The `clock` fixture (tests/conftest.py) gives
a fresh one at T0_MS."""

T0_MS = 1_700_000_000_000      # Tue 2023-11-14 22:13:20 UTC = Wed 06:13 at UTC+8


class Clock:
    """A clock that moves only when the test moves it: set `now_ms`, or
    `advance(ms)`."""

    def __init__(self, now_ms: int = T0_MS):
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, ms: int) -> None:
        self.now_ms += ms
