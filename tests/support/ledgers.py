"""The two ledgers the behaviour tests run against, as frozenlist runs one
test class against its C and Python versions: `Engine` (the Cython kernel)
and `ReferenceLedger` (the plain-Python reference, tests/support/reference*.py,
behind the same surface). The `ledger_impl` fixture (tests/conftest.py) is
parametrized over LEDGER_IMPLS, so a behaviour test written once runs on both.

Also the small world most Engine tests start from."""
import numpy as np

from engine import Engine
from engine.core import audit
from engine.protocol.records import ISSUE_RECORD, PAY_RECORD
from support.reference_membership import MembershipReference


class ReferenceLedger(MembershipReference):
    """The full reference (money lifecycle, controls, membership) with the
    Engine's surface the behaviour tests use: `clock`, batches as arrays or
    their bytes, `audit()` and `counts()`. Nothing here decides a rule; each
    method only reshapes what the reference already holds."""

    @property
    def clock(self):
        return self._clock

    def pay(self, records) -> np.ndarray:
        return super().pay(as_records(records, PAY_RECORD))

    def issue(self, records) -> np.ndarray:
        return super().issue(as_records(records, ISSUE_RECORD))

    def audit(self) -> dict:
        return self.call("AUDIT", {})

    def counts(self) -> dict:
        """Rows per table, as Engine.counts() names them."""
        return {"users": len(self.wallets), "merchants": len(self.merchants),
                "stocks": len(self.stocks), "coupons": len(self.coupons),
                "payments": len(self.payments), "codes": len(self.codes)}


def as_records(records, dtype) -> np.ndarray:
    """Bytes of records as their array (Engine takes both); anything else as given."""
    if isinstance(records, (bytes, bytearray, memoryview)):
        return np.frombuffer(records, dtype).copy()
    return records


LEDGER_IMPLS = {"engine": Engine, "reference": ReferenceLedger}


def audit_reference(ledger: ReferenceLedger) -> None:
    """AUDIT on the reference's canonical state (conftest audits every Engine)."""
    report = audit.audit(ledger.canonical())
    failed = {k: v["detail"] for k, v in report["checks"].items() if not v["ok"]}
    assert report["ok"], f"AUDIT failed on the reference after the test: {failed}"


def world(eng, users=3, merchants=2):
    """`merchants` merchants at 60 bps and `users` wallets with 10**6 each."""
    eng.call("MERCHANTS", {"merchants": [{"id": m, "fee_bps": 60} for m in range(1, merchants + 1)]})
    eng.call("WALLETS", {"users": list(range(1, users + 1))})
    eng.call("TOPUP", {"topups": [{"id": u, "user": u, "amount": 10**6} for u in range(1, users + 1)]})
