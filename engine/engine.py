"""The embeddable engine: one writer applying batches and map calls to the
in-memory state, deterministically, at stamped engine times."""
import secrets
import time

import numpy as np

from . import canonical, export
from .dispatch import MAP_OPS, PLANNED_OPS
from .errors import BadBody, UnknownOp
from .records import (ISSUE_RECORD, ISSUE_RESULT, PAY_RECORD, PAY_RESULT,
                      PAYMENT_CODE_MAX, PAYMENT_CODE_MIN)
from .state import HOLD_MS_DEFAULT, TZ_OFFSET_MS_DEFAULT, State

BATCH_RECORDS_MAX = 8190
CAPACITY_TABLES = ("users", "merchants", "stocks", "coupons", "payments", "codes")


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def random_payment_code() -> int:
    """18 decimal digits from the OS CSPRNG."""
    return PAYMENT_CODE_MIN + secrets.randbelow(PAYMENT_CODE_MAX - PAYMENT_CODE_MIN)


class Engine:
    """Scanpay in process.

    >>> eng = Engine()
    >>> eng.call("WALLETS", {"users": [1]})
    {'results': [{'status': 0}]}
    """

    def __init__(self, path=None, *, clock=None, code_source=None,
                 tz_offset_ms: int = TZ_OFFSET_MS_DEFAULT,
                 hold_ms: int = HOLD_MS_DEFAULT, currency: str = "CNY",
                 capacity: dict | None = None):
        if path is not None:
            raise NotImplementedError("durable engines (Engine(path)) arrive with the journal")
        self.clock = clock or wall_clock_ms
        self.code_source = code_source or random_payment_code
        self.currency = currency
        self.hold_ms = hold_ms
        self.state = State(tz_offset_ms=tz_offset_ms)
        for table, rows in (capacity or {}).items():
            if table not in CAPACITY_TABLES:
                raise ValueError(f"capacity: unknown table {table!r} (known: {CAPACITY_TABLES})")
            self.state.ledger.reserve(table, int(rows))

    # -- time -------------------------------------------------------------

    def _stamp(self) -> int:
        """The engine time of a state-changing call, kept: never goes back."""
        self.state.now = max(self.state.now, int(self.clock()))
        return self.state.now

    def _peek(self) -> int:
        """The engine time of a read-only call, not kept."""
        return max(self.state.now, int(self.clock()))

    # -- batches ----------------------------------------------------------

    def pay(self, records) -> np.ndarray:
        """Apply PayRecords (ndarray of PAY_RECORD, or their bytes)."""
        records = as_batch(records, PAY_RECORD)
        out = np.empty(len(records), PAY_RESULT)
        self.kernel_pay(records, self._stamp(), out)
        return out

    def issue(self, records) -> np.ndarray:
        """Apply IssueRecords (ndarray of ISSUE_RECORD, or their bytes)."""
        records = as_batch(records, ISSUE_RECORD)
        out = np.empty(len(records), ISSUE_RESULT)
        self.state.ledger.issue(records.view(np.uint8), self._stamp(), out.view(np.uint8))
        return out

    def kernel_pay(self, records: np.ndarray, now_ms: int, out: np.ndarray) -> None:
        """The raw kernel apply of one checked batch at a given engine time."""
        self.state.ledger.pay(records.view(np.uint8), now_ms, out.view(np.uint8))

    # -- map operations ---------------------------------------------------

    def call(self, op: str, request: dict) -> dict:
        """A map operation of PROTOCOL.md by name, with the same maps."""
        spec = MAP_OPS.get(op)
        if spec is None:
            planned = " (not implemented yet)" if op in PLANNED_OPS.values() else ""
            raise UnknownOp(f"unknown operation {op!r}{planned}")
        if not spec.writes:
            return spec.apply(self.state, request, self._peek(), ())
        draws = spec.draw(self.state, request, self.code_source) if spec.draw else ()
        return spec.apply(self.state, request, self._stamp(), draws)

    # -- state ------------------------------------------------------------

    def canonical(self) -> dict:
        """The whole state as canonical tables (engine/canonical.py)."""
        return export.canonical(self.state)

    def digest(self) -> str:
        """SHA-256 of the whole state: equal for engines fed the same input."""
        return canonical.digest(self.canonical())

    def audit(self) -> dict:
        return self.call("AUDIT", {})

    def counts(self) -> dict:
        ledger = self.state.ledger
        return {"users": ledger.n_users, "merchants": ledger.n_merchants,
                "stocks": ledger.n_stocks, "coupons": ledger.n_coupons,
                "payments": ledger.n_payments, "codes": ledger.n_codes}

    def memory_bytes(self) -> dict:
        """Bytes allocated per table, rows and index together."""
        ledger = self.state.ledger
        return {
            "users": ledger.users.nbytes + ledger.users_ix.nbytes,
            "merchants": ledger.merchants.nbytes + ledger.merchants_ix.nbytes,
            "stocks": (ledger.stocks.nbytes + ledger.stocks_ix.nbytes
                       + ledger.lists.nbytes + ledger.slots.nbytes),
            "coupons": ledger.coupons.nbytes + ledger.coupons_ix.nbytes,
            "payments": (ledger.pay_req.nbytes + ledger.pay_res.nbytes
                         + ledger.pay_meta.nbytes + ledger.payments_ix.nbytes),
            "codes": ledger.codes.nbytes + ledger.codes_ix.nbytes,
        }


def as_batch(records, dtype: np.dtype) -> np.ndarray:
    """A contiguous batch of 1..BATCH_RECORDS_MAX records of `dtype`."""
    if isinstance(records, (bytes, bytearray, memoryview)):
        if len(records) % dtype.itemsize:
            raise BadBody(f"body of {len(records)} bytes is not a whole number "
                          f"of {dtype.itemsize}-byte records")
        records = np.frombuffer(records, dtype)
    if not isinstance(records, np.ndarray) or records.dtype != dtype or records.ndim != 1:
        raise BadBody(f"a batch is a 1-d array of dtype {dtype}")
    if not 1 <= len(records) <= BATCH_RECORDS_MAX:
        raise BadBody(f"a batch holds 1 to {BATCH_RECORDS_MAX} records, got {len(records)}")
    return np.ascontiguousarray(records)
