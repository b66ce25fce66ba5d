"""Growth under test (issue 16): tiny growth thresholds, so that a ledger
grows its tables, moves them into row spaces and resizes its indexes at
nearly every step, and `Twin`, an engine that grows that way checked call by
call against one sized up front."""
from __future__ import annotations

import contextlib

import numpy as np
from hypothesis import strategies as st

from engine import Engine
from engine._kernel import tune_growth
from engine.core import canonical
from engine.core.engine import CAPACITY_TABLES, random_payment_code
from engine.protocol.errors import EngineError
from engine.protocol.records import CAPTURE_RECORD, ISSUE_RECORD, PAY_RECORD, REFUND_RECORD
from engine.protocol.status import Status
from support.clock import Clock
from support.differential_pair import HOLD_MS

TINY_GROWTH = {
    "initial_rows_max": 1,              # every table starts with one row
    "space_from_bytes": 256,            # then moves into a row space early
    "space_bytes_max": 64 << 10,        # whose reservation it soon outgrows (a move)
    "move_rows_min": 1,                 # index resizes move a row or two per reserve
    "move_per_row": 1,
    "mapped_entries_from_bytes": 0,     # every index table is mapped zero pages
}
SIZED_ROWS = 1 << 16                    # a capacity hint for every table: no growth
T0 = 1_700_000_000_000 + 2 * 86_400_000 + 13 * 3_600_000     # a weekday afternoon
DAY = 86_400_000
STEPS_MAX = 24
BATCH_MAX = 400


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
    """An engine (on disk at `path`, if given) and a sized twin in memory
    (`sized_engine`) fed the same calls: every result must be identical
    (record results byte for byte, map replies entirely, the same errors),
    and the first engine's is returned. Under `tiny_growth` the first grows
    at nearly every step while the twin never does. Payment codes: the twin
    gets the ones the first engine drew."""

    def __init__(self, path=None, *, code_source=None, **kwargs):
        self._drawn: list[int] = []
        self._source = code_source or random_payment_code
        self._kwargs = kwargs
        self.grown = Engine(path, code_source=self._first_source, **kwargs)
        self.sized = sized_engine(code_source=lambda: self._drawn.pop(0), **kwargs)

    def _first_source(self) -> int:
        code = self._source()
        self._drawn.append(code)
        return code

    def reopen(self, path) -> None:
        """Restart the first engine from its data directory."""
        self.grown.close()
        self.grown = Engine(path, code_source=self._first_source, **self._kwargs)

    def __getattr__(self, name):
        if name.startswith("_") or name in ("grown", "sized"):
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
        assert not self._drawn, f"{name}: the engines drew different payment codes"
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


def row_space(array: np.ndarray):
    """The RowSpace a table array views (ext/kernel/rowspace.pxi), or None."""
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return base if type(base).__name__ == "RowSpace" else None


def mid_resize(engine: Engine) -> bool:
    """Some index of `engine` is between two tables."""
    ledger = engine.state.ledger
    return any(getattr(ledger, name + "_ix").resizing for name in ledger.INDEXES)


PROGRAMS = [{"id": 1, "kind": "points", "rate": 5, "offers": [{"stock": 3, "price": 300}]},
            {"id": 2, "kind": "stamps", "threshold": 1000, "stamps": 2, "reward_stock": 4}]
STOCKS = [{"id": s, "funder": "platform", "kind": kind, "value": value, "valid_from": 0,
           "valid_until": T0 + 365 * DAY, "stacking": "stackable"}
          for s, kind, value in ((1, "fixed", 100), (2, "percent", 1000), (3, "fixed", 500),
                                 (4, "fixed", 200))]


class World:
    """A Twin (on disk at `path`, if given) and random steps of payments,
    coupons, wallets, captures, refunds and reversals in batches of up to
    BATCH_MAX, drawn by hypothesis: enough rows for many growth steps."""

    def __init__(self, data, path=None):
        self.clock = Clock(T0)
        self.eng = Twin(path, clock=self.clock, hold_ms=HOLD_MS)
        self.users, self.merchants = 0, data.draw(st.integers(1, 30))
        self.next_payment, self.next_coupon, self.next_refund = 1, 1, 1
        self.authorized: list[int] = []
        self.paid: list[int] = []
        self.eng.call("MERCHANTS", {"merchants": [{"id": m, "fee_bps": 60}
                                                  for m in range(1, self.merchants + 1)]})
        self.eng.call("STOCKS", {"stocks": STOCKS})
        if data.draw(st.booleans()):
            self.eng.call("PROGRAMS", {"programs": PROGRAMS})
        self.add_users(data)

    def add_users(self, data):
        n = data.draw(st.integers(1, 200))
        users = list(range(self.users + 1, self.users + n + 1))
        self.users += n
        self.eng.call("WALLETS", {"users": users})
        self.eng.call("TOPUP", {"topups": [{"id": u, "user": u, "amount": 10**7} for u in users]})

    def pay(self, data):
        n = data.draw(st.integers(1, BATCH_MAX))
        rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
        records = np.zeros(n, PAY_RECORD)
        fresh = np.arange(self.next_payment, self.next_payment + n, dtype=np.uint64)
        again = rng.integers(1, self.next_payment + 1, n).astype(np.uint64)
        records["id"] = np.where(rng.random(n) < 0.1, again, fresh)     # some re-sent
        self.next_payment += n
        records["payer"] = rng.integers(1, self.users + 2, n)            # some unknown
        records["merchant"] = rng.integers(1, self.merchants + 1, n)
        records["amount"] = rng.integers(1, 5000, n)
        records["flags"] = rng.choice([0, 0, 1, 4], n)
        results = self.eng.pay(records)
        ok = (results["status"] == Status.ok) & ((results["flags"] & 1) == 0)
        self.authorized += [int(i) for i in records["id"][ok & (records["flags"] == 4)]]
        self.paid += [int(i) for i in records["id"][ok & (records["flags"] != 4)]]

    def issue(self, data):
        n = data.draw(st.integers(1, BATCH_MAX))
        rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
        records = np.zeros(n, ISSUE_RECORD)
        records["coupon"] = np.arange(self.next_coupon, self.next_coupon + n)
        self.next_coupon += n
        records["stock"] = rng.integers(1, 5, n)
        records["user"] = rng.integers(1, self.users + 1, n)
        self.eng.issue(records)

    def capture(self, data):
        chosen = self.authorized[:data.draw(st.integers(0, BATCH_MAX))]
        del self.authorized[:len(chosen)]
        records = np.zeros(len(chosen), CAPTURE_RECORD)
        records["payment"] = chosen
        records["amount"] = 1                       # partial: the rest is released
        if len(records):
            self.eng.capture(records)
            self.paid += chosen

    def refund(self, data):
        chosen = self.paid[:data.draw(st.integers(0, BATCH_MAX))]
        del self.paid[:len(chosen)]
        records = np.zeros(len(chosen), REFUND_RECORD)
        records["id"] = np.arange(self.next_refund, self.next_refund + len(chosen))
        self.next_refund += len(chosen)
        records["payment"] = chosen
        records["amount"] = 1
        if len(records):
            self.eng.refund(records)

    def reverse(self, data):
        # Unknown ids leave tombstones: a later PAY with the id is refused.
        first = self.next_payment + data.draw(st.integers(0, 50))
        self.eng.call("REVERSE", {"payments": list(range(first, first + data.draw(
            st.integers(1, 40))))})

    def tick(self, data):
        self.clock.now_ms += data.draw(st.sampled_from([1, HOLD_MS, DAY]))


    def step(self, data):
        getattr(self, data.draw(st.sampled_from(STEP_NAMES)))(data)


STEP_NAMES = ("pay", "pay", "pay", "issue", "add_users", "capture", "refund", "reverse", "tick")
