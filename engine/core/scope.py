"""A gateway key's merchant scope (docs/reference/protocol.md, HELLO): what it may touch.

The server passes a scoped key's merchants with each request that touches
payments or stocks; the embedded Engine passes none (admin: every merchant).
The check needs the payment's (or stock's) merchant, which only the state
knows, so it runs where the state is: in the apply of the map ops (the scope
is journaled in the request as `scope`), and in the writer just before the
apply of the record ops (whose journaled body then holds only the records
applied). Either way replay sees exactly what was decided.

A scoped key's REVERSE of a payment id never seen leaves a tombstone that
blocks only PAYs at the key's merchants (ScopedTombstones): it must not let
one gateway block another's payments by guessing their ids.
"""
import numpy as np

from engine.core.canonical import FUNDER_MERCHANT
from engine.protocol.errors import BadBody
from engine.core.ops.setup import list_items
from engine.protocol.records import (
    CAPTURE_RECORD, ISSUE_RECORD, ISSUE_RESULT, PAY_FLAGS_KNOWN, PAY_NO_COUPONS, PAY_RECORD,
    PAY_RESULT, REFUND_RECORD, REFUND_RESULT)
from engine.protocol.limits import AMOUNT_MAX, AMOUNT_MIN, SCOPE_MERCHANTS_MAX
from engine.protocol.status import Status
from engine.core.validate import U64_MAX

SCOPE_KEY = "scope"


def parse_scope(request: dict) -> frozenset | None:
    """The request's `scope` (merchant ids), None when it has none (admin)."""
    if SCOPE_KEY not in request:
        return None
    scope = request[SCOPE_KEY]
    if (not isinstance(scope, list) or len(scope) > SCOPE_MERCHANTS_MAX
            or not all(type(m) is int and 0 < m <= U64_MAX for m in scope)):
        raise BadBody(f"`{SCOPE_KEY}` must be a list of at most {SCOPE_MERCHANTS_MAX} "
                      f"merchant ids")
    return frozenset(scope)


def scoped_items(request, key: str) -> tuple[list, frozenset | None]:
    """The item list of a list op that takes a `scope`, and that scope."""
    if isinstance(request, dict) and SCOPE_KEY in request:
        scope = parse_scope(request)
        rest = {k: v for k, v in request.items() if k != SCOPE_KEY}
        return list_items(rest, key), scope
    return list_items(request, key), None


def payment_merchant(ledger, payment_id: int) -> int | None:
    """The merchant of a payment, None if there is no such payment."""
    p = ledger.find("payments", payment_id) if payment_id else -1
    return int(ledger.pay_req["merchant"][p]) if p >= 0 else None


def payments_outside(ledger, payment_ids, scope) -> np.ndarray:
    """Per payment id: True where the payment exists at a merchant outside
    `scope` (unknown ids are not: they get the op's own not-found answer)."""
    out = np.zeros(len(payment_ids), bool)
    if scope is None:
        return out
    for i, pid in enumerate(payment_ids):
        merchant = payment_merchant(ledger, int(pid))
        out[i] = merchant is not None and merchant not in scope
    return out


def stocks_outside(ledger, stock_ids, scope) -> np.ndarray:
    """Per stock id: True where the stock exists and is not funded by a
    merchant in `scope` (platform stocks are outside every gateway scope)."""
    out = np.zeros(len(stock_ids), bool)
    stocks = ledger.stocks
    for i, sid in enumerate(stock_ids):
        s = ledger.find("stocks", int(sid)) if sid else -1
        if s >= 0:
            out[i] = (int(stocks["funder"][s]) != FUNDER_MERCHANT
                      or int(stocks["merchant_id"][s]) not in scope)
    return out


# -- record ops: filtered in the writer, before the journal -----------------

# op -> (record dtype, result dtype, the field the scope looks at, the
# record's id field, the result's id field)
SCOPED_RECORD_OPS = {
    "ISSUE": (ISSUE_RECORD, ISSUE_RESULT, "stock", "coupon", "coupon"),
    "CAPTURE_RECORDS": (CAPTURE_RECORD, PAY_RESULT, "payment", "payment", "id"),
    "REFUND_RECORDS": (REFUND_RECORD, REFUND_RESULT, "payment", "id", "id"),
}


def filter_records(ledger, op_name: str, body: bytes, scope: frozenset, now: int):
    """(the records the scope allows, as bytes; merge(results) -> results of
    every record, `forbidden` for the others), or (body, None) if all are."""
    record, result, field, record_id, result_id = SCOPED_RECORD_OPS[op_name]
    records = np.frombuffer(body, record)
    if field == "stock":
        outside = stocks_outside(ledger, records["stock"], scope)
    else:
        outside = payments_outside(ledger, records["payment"], scope)
    if not outside.any():
        return body, None

    def merge(results):
        out = np.zeros(len(records), result)
        out[result_id] = records[record_id]
        out["status"] = Status.forbidden
        if "timestamp" in result.names:
            out["timestamp"] = now
        if results is not None:
            out[~outside] = results
        return out
    return records[~outside].tobytes(), merge


# -- scoped tombstones (engine/core/tombstones.py) ----------------------------------

def reverse_unknown(state, payment_ids: list, scope: frozenset) -> list:
    """A scoped REVERSE's ids that name no payment and no kernel tombstone:
    tombstones that block PAYs at `scope` only. Returns those ids."""
    ledger = state.ledger
    unknown = [pid for pid in payment_ids
               if pid and ledger.find("payments", pid) < 0 and ledger.find("tombstones", pid) < 0]
    for pid in unknown:
        state.scoped_tombstones.add(pid, scope)
    return unknown


def stateless_check(record) -> Status:
    """docs/reference/rules.md PAY step 1 (the kernel's precheck), which comes before the
    tombstone check of step 2: a record it fails is the kernel's to answer.
    (The differential test against tests/support/reference_money.py holds the two
    copies of this step together.)"""
    amount, flags = int(record["amount"]), int(record["flags"])
    if not AMOUNT_MIN <= amount <= AMOUNT_MAX:
        return Status.invalid_amount
    if flags & ~PAY_FLAGS_KNOWN or (flags & PAY_NO_COUPONS and record["coupons"].any()):
        return Status.invalid_flags
    return Status.ok


def pay(state, body, now: int, out: np.ndarray) -> None:
    """The kernel's PAY, except that a record whose id has a scoped tombstone
    covering its merchant, and no payment yet, fails `reversed`. Records are
    applied in order: the kernel takes the runs between such records."""
    ledger = state.ledger
    tombstones = state.scoped_tombstones
    records = np.frombuffer(body, PAY_RECORD)
    marked = np.flatnonzero(np.isin(records["id"], tombstones.ids()))
    if not len(marked):
        return ledger.pay(body, now, out.view(np.uint8))
    start = 0
    for i in marked.tolist() + [len(records)]:
        if i > start:
            ledger.pay(records[start:i].tobytes(), now, out[start:i].view(np.uint8))
        if i == len(records):
            break
        pid, merchant = int(records["id"][i]), int(records["merchant"][i])
        if (ledger.find("payments", pid) < 0 and merchant in tombstones.scopes[pid]
                and stateless_check(records[i]) == Status.ok):
            out[i:i + 1] = np.zeros(1, PAY_RESULT)
            out["id"][i], out["status"][i], out["timestamp"][i] = pid, Status.reversed, now
        else:                               # the kernel says why, or applies it
            ledger.pay(records[i:i + 1].tobytes(), now, out[i:i + 1].view(np.uint8))
        start = i + 1
