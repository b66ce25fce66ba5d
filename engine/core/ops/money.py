"""Map operations of the money lifecycle: CAPTURE, VOID, REFUND, REVERSE,
GET_PAYMENTS, SETTLE, STATEMENT (docs/reference/rules.md; shapes in
docs/reference/protocol.md). Items are parsed into arrays and applied by the
kernel in one call; only malformed items take the slow path."""
import numpy as np

from engine._kernel import REFUND
from engine.core.canonical import FUNDER_NAMES, PAYMENT_STATE_NAMES
from engine.core.ops.query import not_found, require_map
from engine.protocol.limits import LOOKUP_IDS_MAX
from engine.core.scope import parse_scope, payments_outside, reverse_unknown, scoped_items
from engine.protocol.records import PAY_RESULT, RESULT_DUPLICATE
from engine.core.state import State
from engine.protocol.status import STATUS_OK, Status
from engine.core.validate import I63_MAX, U64_MAX, Invalid, failure, integer, only_keys, u64

FORBIDDEN_RESULT = {"status": int(Status.forbidden), "error": Status.forbidden.name,
                    "cash": 0, "discount": 0, "fee": 0}
CAPTURE_KEYS = frozenset({"payment", "amount"})
REFUND_KEYS = frozenset({"id", "payment", "amount"})


def is_u64(value) -> bool:
    return type(value) is int and 0 <= value <= U64_MAX


def is_i64(value) -> bool:
    return type(value) is int and -(2**63) <= value <= I63_MAX


def parse(items: list, parse_one) -> tuple[list, list]:
    """(parsed tuples or None, failure results or None) per item."""
    parsed, failures = [], []
    for item in items:
        try:
            parsed.append(parse_one(item))
            failures.append(None)
        except Invalid as e:
            parsed.append(None)
            failures.append(failure(e.status, str(e)))
    return parsed, failures


def merge(failures: list, results: list) -> dict:
    """Results of the well-formed items, in order, around the failures."""
    out = iter(results)
    return {"results": [f if f is not None else next(out) for f in failures]}


def forbid_outside(state: State, parsed: list, failures: list, scope, payment_of,
                   id_of=None) -> None:
    """Items on payments outside a gateway key's scope: `forbidden`, not
    applied (engine/core/scope.py). Unknown payments keep the op's own answer."""
    if scope is None:
        return
    at = [i for i, p in enumerate(parsed) if p is not None]
    outside = payments_outside(state.ledger, [payment_of(parsed[i]) for i in at], scope)
    for i in np.flatnonzero(outside).tolist():
        item = parsed[at[i]]
        parsed[at[i]] = None
        failures[at[i]] = {"id": (id_of or payment_of)(item), **FORBIDDEN_RESULT}


def pay_result_maps(results: np.ndarray) -> list:
    """PayResult records as the maps CAPTURE, VOID and REVERSE reply."""
    out = []
    for rid, status, flags, cash, discount, fee, ts, coupons in results.tolist():
        reply = {"id": rid, "status": status, "flags": flags, "cash": cash,
                 "discount": discount, "fee": fee, "timestamp": ts,
                 "coupons": [int(c) for c in coupons if c]}
        if status:
            reply["error"] = Status(status).name
        elif flags & RESULT_DUPLICATE:
            reply["duplicate"] = True
        out.append(reply)
    return out


# -- CAPTURE ----------------------------------------------------------------

def parse_capture(item) -> tuple[int, int]:
    if not isinstance(item, dict):
        raise Invalid("a capture is a map {payment, amount}")
    only_keys(item, CAPTURE_KEYS)
    return u64(item, "payment"), integer(item, "amount", -(2**63), I63_MAX)


def capture(state: State, request, now: int, draws) -> dict:
    items, scope = scoped_items(request, "captures")
    parsed, failures = parse(items, parse_capture)
    forbid_outside(state, parsed, failures, scope, lambda p: p[0])
    ok = [p for p in parsed if p is not None]
    results = np.zeros(len(ok), PAY_RESULT)
    if ok:
        payments = np.array([p[0] for p in ok], np.uint64)
        amounts = np.array([p[1] for p in ok], np.int64)
        state.ledger.capture(payments, amounts, now, results.view(np.uint8))
    return merge(failures, pay_result_maps(results))


# -- VOID and REVERSE -------------------------------------------------------

def parse_payment_id(item) -> int:
    if not is_u64(item):
        raise Invalid(f"a payment id is a u64, got {item!r}")
    return item


def by_payment_ids(state: State, request, now: int, apply, scoped_unknown=None) -> dict:
    items, scope = scoped_items(request, "payments")
    parsed, failures = parse(items, parse_payment_id)
    forbid_outside(state, parsed, failures, scope, lambda p: p)
    if scope is not None and scoped_unknown is not None:
        scoped_unknown(state, parsed, failures, scope, now)
    ok = np.array([p for p in parsed if p is not None], np.uint64)
    results = np.zeros(len(ok), PAY_RESULT)
    if len(ok):
        apply(ok, now, results.view(np.uint8))
    return merge(failures, pay_result_maps(results))


def void(state: State, request, now: int, draws) -> dict:
    return by_payment_ids(state, request, now, state.ledger.void)


def reverse(state: State, request, now: int, draws) -> dict:
    reply = by_payment_ids(state, request, now, state.ledger.reverse, scoped_reversal)
    if state.scoped_tombstones:
        # An unscoped reversal's kernel tombstone blocks every PAY: it
        # supersedes a scoped one of the same id.
        for result in reply["results"]:
            if not result["status"] and state.ledger.find("tombstones", result["id"]) >= 0:
                state.scoped_tombstones.drop(result["id"])
    return reply


def scoped_reversal(state: State, parsed: list, failures: list, scope, now: int) -> None:
    """A scoped REVERSE of ids that no payment (and no kernel tombstone)
    has: tombstones that block PAYs at the scope's merchants only
    (engine/core/scope.py), in place of the kernel's, which would block all. The
    reply is the kernel's for an unknown id: ok, nothing moved."""
    unknown = set(reverse_unknown(state, [p for p in parsed if p is not None], scope))
    for i, p in enumerate(parsed):
        if p in unknown:
            result = np.zeros(1, PAY_RESULT)
            result["id"], result["timestamp"] = p, now
            parsed[i] = None
            failures[i] = pay_result_maps(result)[0]


# -- REFUND -----------------------------------------------------------------

def parse_refund(item) -> tuple[int, int, int]:
    if not isinstance(item, dict):
        raise Invalid("a refund is a map {id, payment, amount}")
    only_keys(item, REFUND_KEYS)
    return (u64(item, "id"), u64(item, "payment"),
            integer(item, "amount", -(2**63), I63_MAX))


def refund(state: State, request, now: int, draws) -> dict:
    items, scope = scoped_items(request, "refunds")
    parsed, failures = parse(items, parse_refund)
    forbid_outside(state, parsed, failures, scope, lambda p: p[1], lambda p: p[0])
    ok = [p for p in parsed if p is not None]
    rows = np.zeros(len(ok), REFUND)
    status = np.zeros(len(ok), np.int32)
    if ok:
        columns = list(zip(*ok))
        state.ledger.refund(np.array(columns[0], np.uint64), np.array(columns[1], np.uint64),
                            np.array(columns[2], np.int64), now, rows.view(np.uint8), status)
    replies = []
    for (rid, _payment, _amount, cash, discount, fee), st in zip(rows.tolist(), status.tolist()):
        if st > 0:
            replies.append({"id": rid, "status": st, "error": Status(st).name,
                            "cash": 0, "discount": 0, "fee": 0})
            continue
        reply = {"id": rid, "status": STATUS_OK, "cash": cash, "discount": discount, "fee": fee}
        if st < 0:
            reply["duplicate"] = True
        replies.append(reply)
    return merge(failures, replies)


# -- GET_PAYMENTS -----------------------------------------------------------

def get_payments(state: State, request, now: int, draws) -> dict:
    request = require_map(request, "{ids: [...]}")
    try:
        only_keys(request, frozenset({"ids", "scope"}))
        ids = request.get("ids")
        if not isinstance(ids, list) or len(ids) > LOOKUP_IDS_MAX or not all(map(is_u64, ids)):
            raise Invalid(f"`ids` must be a list of at most {LOOKUP_IDS_MAX} u64 payment ids")
    except Invalid as e:
        return {**failure(e.status, str(e)), "results": []}
    scope = parse_scope(request)
    outside = payments_outside(state.ledger, ids, scope).tolist()
    gathered = gather_payments(state.ledger, ids)

    def build() -> dict:
        views = build_payment_views(ids, gathered)
        return {"status": STATUS_OK, "results": [
            {"id": i, "status": int(Status.forbidden), "error": Status.forbidden.name} if out
            else view for i, out, view in zip(ids, outside, views)]}
    return BuiltLater(build)


class BuiltLater:
    """A read reply whose rows are already copied out of the ledger, and
    whose Python objects are built by `build()`, wherever the caller likes:
    the server builds them in its reply thread, off the writer's path
    (engine/server/writer.py), the embedded Engine at once."""
    __slots__ = ("build",)

    def __init__(self, build):
        self.build = build


def gather_payments(ledger, ids: list) -> dict:
    """The ledger's rows for `ids`, copied (numpy fancy indexing copies):
    all a GET_PAYMENTS reply needs, so it can be built after the writer has
    moved on. One numpy copy per column: field by field access to numpy
    records cost about 50 us a payment."""
    slots = np.array([ledger.find("payments", i) if i else -1 for i in ids], np.int64)
    pm = ledger.pay_meta[slots[slots >= 0]]
    used = np.arange(pm["coupon"].shape[1]) < pm["coupon_count"].astype(np.int64)[:, None]
    coupon_slots = pm["coupon"][used].astype(np.int64)     # the applied ones, row by row
    stocks = ledger.coupons["stock"][coupon_slots]
    return {"slots": slots, "pm": pm, "req": ledger.pay_req[slots[slots >= 0]],
            "payer": ledger.users["id"][pm["user"]],
            "coupon_id": ledger.coupons["id"][coupon_slots],
            "stock_id": ledger.stocks["id"][stocks], "funder": ledger.stocks["funder"][stocks]}


def build_payment_views(ids: list, gathered: dict) -> list:
    """GET_PAYMENTS results for `ids`, in order, from gather_payments' copy."""
    pm, req = gathered["pm"], gathered["req"]
    column = {name: pm[name].tolist() for name in (
        "amount", "authorized_amount", "cash", "discount", "fee", "refunded_amount",
        "refunded_cash", "refunded_fee", "state", "created_at", "completed_at",
        "hold_expires_at", "released", "coupon_count")}
    column["payer"] = gathered["payer"].tolist()
    column["refunded_discount"] = pm["refunded_part"].sum(axis=1).tolist()
    for name in ("merchant", "user_data", "goods_tag"):
        column[name] = req[name].tolist()
    coupons = coupon_parts(gathered)
    results = []
    found = 0
    for payment_id, slot in zip(ids, gathered["slots"].tolist()):
        if slot < 0:
            results.append(not_found(payment_id, Status.payment_not_found))
            continue
        results.append(payment_result(payment_id, {k: v[found] for k, v in column.items()},
                                      coupons[found]))
        found += 1
    return results


def payment_view(ledger, payment_id: int) -> dict:
    """One GET_PAYMENTS result (payment_views for many)."""
    return build_payment_views([payment_id], gather_payments(ledger, [payment_id]))[0]


def coupon_parts(gathered: dict) -> list:
    """Per payment row, its applied coupons (GET_PAYMENTS `coupons`)."""
    pm = gathered["pm"]
    count = pm["coupon_count"].astype(np.int64)
    used = np.arange(pm["coupon"].shape[1]) < count[:, None]
    flat = zip(gathered["coupon_id"].tolist(), gathered["stock_id"].tolist(),
               gathered["funder"].tolist(), pm["applied"][used].tolist(),
               pm["refunded_part"][used].tolist())
    released = pm["released"].tolist()
    parts = []
    for n, bits in zip(count.tolist(), released):
        parts.append([{"coupon": c, "stock": s, "funder": FUNDER_NAMES[f], "discount": d,
                       "refunded": r, "released": bool((bits >> i) & 1)}
                      for i, (c, s, f, d, r) in zip(range(n), flat)])
    return parts


def payment_result(payment_id: int, row: dict, coupons: list) -> dict:
    return {
        "status": STATUS_OK, "id": payment_id, "payer": row["payer"], "merchant": row["merchant"],
        "amount": row["amount"], "authorized_amount": row["authorized_amount"],
        "cash": row["cash"], "discount": row["discount"], "fee": row["fee"],
        "coupons": coupons,
        "refunded": {"amount": row["refunded_amount"], "cash": row["refunded_cash"],
                     "discount": row["refunded_discount"], "fee": row["refunded_fee"]},
        "state": PAYMENT_STATE_NAMES[row["state"]],
        "user_data": row["user_data"], "goods_tag": row["goods_tag"],
        "created_at": row["created_at"], "completed_at": row["completed_at"],
        "hold_expires_at": row["hold_expires_at"],
    }


# -- SETTLE and STATEMENT ---------------------------------------------------

def settle(state: State, request, now: int, draws) -> dict:
    if request:
        return failure(Status.invalid_argument, "SETTLE takes an empty map")
    rows = state.ledger.settle()
    reply = {"status": STATUS_OK, "settlement": len(state.settlements) + 1, "at": now, "rows": rows}
    state.settlements.append(reply)
    return reply


def statement(state: State, request, now: int, draws) -> dict:
    request = require_map(request, "{settlement}")
    try:
        only_keys(request, frozenset({"settlement"}))
        number = integer(request, "settlement", 1, max(1, len(state.settlements)))
        if not state.settlements:
            raise Invalid("there is no settlement yet")
    except Invalid as e:
        return failure(e.status, str(e))
    return state.settlements[number - 1]
