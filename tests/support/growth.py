"""Growth under test (issue 16): tiny growth thresholds, so that a ledger
grows its tables, moves them into row spaces and resizes its indexes at
nearly every step, and `Twin`, an engine that grows that way checked call by
call against one sized up front."""
from __future__ import annotations

import contextlib

import numpy as np

from engine import Engine
from engine._kernel import tune_growth
from engine.core import canonical
from engine.core.engine import CAPACITY_TABLES
from engine.protocol.errors import EngineError

TINY_GROWTH = {
    "initial_rows_max": 1,              # every table starts with one row
    "space_from_bytes": 256,            # then moves into a row space early
    "space_bytes_max": 64 << 10,        # whose reservation it soon outgrows (a move)
    "move_rows_min": 1,                 # index resizes move a row or two per reserve
    "move_per_row": 1,
    "mapped_entries_from_bytes": 0,     # every index table is mapped zero pages
}
SIZED_ROWS = 1 << 16                    # a capacity hint for every table: no growth


@contextlib.contextmanager
def tiny_growth(**overrides):
    """Tiny growth thresholds (TINY_GROWTH, with `overrides`) inside the block."""
    previous = tune_growth(**{**TINY_GROWTH, **overrides})
    try:
        yield
    finally:
        tune_growth(**previous)


def sized_engine(*args, **kwargs) -> Engine:
    """An engine with a capacity hint for every table, far above what a test adds."""
    return Engine(*args, capacity={table: SIZED_ROWS for table in CAPACITY_TABLES}, **kwargs)


class Twin:
    """An engine and a sized twin (`sized_engine`) fed the same calls: every
    result must be identical (record results byte for byte, map replies
    entirely, the same errors), and the first engine's is returned. Under
    `tiny_growth` the first grows at nearly every step while the twin never
    does. Payment codes: the twin gets the ones the first engine drew."""

    def __init__(self, *, code_source=None, **kwargs):
        drawn: list[int] = []

        def first_source() -> int:
            code = code_source() if code_source is not None else _default_code()
            drawn.append(code)
            return code

        self.grown = Engine(code_source=first_source, **kwargs)
        self.sized = sized_engine(code_source=lambda: drawn.pop(0), **kwargs)
        self.drawn = drawn

    def __getattr__(self, name):
        if name in ("grown", "sized", "drawn"):
            raise AttributeError(name)
        first, twin = getattr(self.grown, name), getattr(self.sized, name)
        if not callable(first):
            return first
        return lambda *args, **kwargs: self._both(name, first, twin, args, kwargs)

    def _both(self, name, first, twin, args, kwargs):
        copies = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
        try:
            result = first(*args, **kwargs)
        except EngineError as error:
            with contextlib.suppress(EngineError):
                twin(*copies, **kwargs)
                raise AssertionError(f"{name}: only the growing engine raised {error!r}")
            raise
        other = twin(*copies, **kwargs)
        assert not self.drawn, f"{name}: the engines drew different payment codes"
        same(name, result, other)
        return result


def same(what: str, a, b) -> None:
    """`a` and `b` (results of the same call on two engines) are identical."""
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), f"{what}: {a} != {b}"
    elif what == "canonical":
        problems = canonical.diff(a, b)
        assert not problems, f"canonical tables differ:\n" + "\n".join(problems)
    else:
        assert a == b, f"{what}: {a!r} != {b!r}"


def _default_code() -> int:
    from engine.core.engine import random_payment_code
    return random_payment_code()
