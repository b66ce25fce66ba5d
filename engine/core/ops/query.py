"""Read-only map operations: QUOTE, BALANCES, COUPONS, AUDIT. They never
change state (docs/reference/protocol.md)."""
import numpy as np

from engine.core import audit as audit_checks
from engine.core import export
from engine._kernel import REASON_APPLIED, REASON_NOT_CHOSEN
from engine.core.canonical import COUPON_AVAILABLE, COUPON_STATE_NAMES
from engine.protocol.errors import BadBody
from engine.protocol.limits import (COUPONS_PAGE_MAX, COUPONS_PER_PAYMENT_MAX, LOOKUP_IDS_MAX,
                                   QUOTE_EXPLAIN_MAX, WIRE_LOOKUP_ITEMS_MAX)
from engine.protocol.records import PAY_RECORD
from engine.core.state import State
from engine.protocol.status import STATUS_OK, Status
from engine.core.validate import I63_MAX, U32_MAX, Invalid, failure, integer, only_keys, u64, u64_list

QUOTE_KEYS = frozenset({"payer", "merchant", "amount", "flags", "coupons", "goods_tag"})
LOOKUP_LIST_KEYS = ("ids", "users", "merchants", "stocks", "memberships")


def require_map(request, shape: str) -> dict:
    if not isinstance(request, dict):
        raise BadBody(f"the body must be a map {shape}")
    return request


def check_lookup_lists(op_name: str, request: dict) -> None:
    """Refuse a read whose lists are longer than WIRE_LOOKUP_ITEMS_MAX (bad_body,
    before it reaches the writer): ask in several requests instead."""
    for key in LOOKUP_LIST_KEYS:
        items = request.get(key)
        if isinstance(items, list) and len(items) > WIRE_LOOKUP_ITEMS_MAX:
            raise BadBody(f"{op_name} `{key}` holds {len(items)} items; at most "
                          f"{WIRE_LOOKUP_ITEMS_MAX} per request: split it into several requests")


# -- QUOTE ------------------------------------------------------------------

def quote_record(request) -> np.ndarray:
    """The QUOTE request as a one-record PAY batch (id 0: QUOTE has none)."""
    only_keys(request, QUOTE_KEYS)
    record = np.zeros(1, PAY_RECORD)
    record["payer"] = u64(request, "payer")
    record["merchant"] = u64(request, "merchant")
    record["amount"] = integer(request, "amount", -(2**63), I63_MAX)  # then 1..10**14: kernel
    record["flags"] = integer(request, "flags", 0, U32_MAX, default=0)
    record["goods_tag"] = integer(request, "goods_tag", 0, U32_MAX, default=0)
    coupons = u64_list(request, "coupons", COUPONS_PER_PAYMENT_MAX, nonzero=True)
    record["coupons"][0, :len(coupons)] = coupons
    return record


def reason_name(reason: int) -> str:
    if reason == REASON_APPLIED:
        return "applied"
    if reason == REASON_NOT_CHOSEN:
        return "not_chosen"
    return Status(reason).name


def quote(state: State, request, now: int, draws) -> dict:
    request = require_map(request, "{payer, merchant, amount, ...}")
    try:
        record = quote_record(request)
    except Invalid as e:
        return failure(e.status, str(e))
    status, cash, discount, fee, coupons, explain = state.ledger.quote(
        record.view(np.uint8), now)
    reply = {"status": status, "cash": cash, "discount": discount, "fee": fee,
             "coupons": coupons,
             "explain": [{"coupon": c, "stock": s, "discount": d, "reason": reason_name(r)}
                         for c, s, d, r in explain]}
    if len(explain) > QUOTE_EXPLAIN_MAX:
        reply["explain"], reply["explain_omitted"] = bounded_explain(reply["explain"])
    if status:
        reply["error"] = Status(status).name
    return reply


def bounded_explain(explain: list) -> tuple[list, int]:
    """At most QUOTE_EXPLAIN_MAX explain entries: every applied coupon, then
    the others by coupon id; and how many were left out. (explain lists every
    coupon of the payer, and a gateway may issue any number to one user.)"""
    applied = [e for e in explain if e["reason"] == "applied"]
    others = [e for e in explain if e["reason"] != "applied"]
    kept = applied + others[:max(QUOTE_EXPLAIN_MAX - len(applied), 0)]
    return sorted(kept, key=lambda e: e["coupon"]), len(explain) - len(kept)


# -- BALANCES ---------------------------------------------------------------

def balances(state: State, request, now: int, draws) -> dict:
    from engine.core.ops.membership import membership_balances
    request = require_map(request, "{users?, merchants?, stocks?, memberships?}")
    try:
        only_keys(request, frozenset({"users", "merchants", "stocks", "memberships"}))
        asked = {k: u64_list(request, k, LOOKUP_IDS_MAX) for k in ("users", "merchants", "stocks")}
        memberships = (membership_balances(state, request["memberships"])
                       if "memberships" in request else None)
    except Invalid as e:
        return failure(e.status, str(e))
    ledger = state.ledger
    extra = {} if memberships is None else {"memberships": memberships}
    return {**extra, 
        "status": STATUS_OK,
        "users": [user_balance(ledger, i) for i in asked["users"]],
        "merchants": [merchant_balance(ledger, i) for i in asked["merchants"]],
        "stocks": [stock_balance(ledger, i) for i in asked["stocks"]],
        "fees": int(ledger.fees),
        "bank": int(ledger.bank),
    }


def not_found(ident: int, status: Status) -> dict:
    return {"id": ident, "status": int(status), "error": status.name}


def user_balance(ledger, user_id: int) -> dict:
    slot = ledger.find("users", user_id) if user_id else -1
    if slot < 0:
        return not_found(user_id, Status.user_not_found)
    balance = int(ledger.users["balance"][slot])
    held = int(ledger.users["held"][slot])
    return {"id": user_id, "status": STATUS_OK, "balance": balance, "held": held,
            "available": balance - held}


def merchant_balance(ledger, merchant_id: int) -> dict:
    slot = ledger.find("merchants", merchant_id) if merchant_id else -1
    if slot < 0:
        return not_found(merchant_id, Status.merchant_not_found)
    return {"id": merchant_id, "status": STATUS_OK, "balance": int(ledger.merchants["balance"][slot])}


def stock_balance(ledger, stock_id: int) -> dict:
    slot = ledger.find("stocks", stock_id) if stock_id else -1
    if slot < 0:
        return not_found(stock_id, Status.stock_not_found)
    row = ledger.stocks[slot]
    return {"id": stock_id, "status": STATUS_OK,
            **{k: int(row[k]) for k in ("spent", "reserved", "issued", "budget", "campaign")}}


# -- COUPONS ----------------------------------------------------------------

def coupons(state: State, request, now: int, draws) -> dict:
    request = require_map(request, "{ids} or {user, after?, limit?}")
    try:
        only_keys(request, frozenset({"ids", "user", "after", "limit"}))
        if ("ids" in request) == ("user" in request):
            raise Invalid("give exactly one of `ids` and `user`")
        if "ids" in request:
            if len(request) != 1:
                raise Invalid("`after` and `limit` page a `user` listing, not `ids`")
            ids = u64_list(request, "ids", LOOKUP_IDS_MAX)
        else:
            user_id = u64(request, "user")
            after = u64(request, "after", default=0)
            limit = integer(request, "limit", 1, COUPONS_PAGE_MAX, default=COUPONS_PAGE_MAX)
    except Invalid as e:
        return {**failure(e.status, str(e)), "results": []}
    ledger = state.ledger
    if "ids" in request:
        return {"status": STATUS_OK, "results": [coupon_view(ledger, i, now) for i in ids]}
    user = ledger.find("users", user_id) if user_id else -1
    if user < 0:
        return {**failure(Status.user_not_found), "results": []}
    return user_coupons_page(ledger, user, after, limit, now)


def user_coupons_page(ledger, user: int, after: int, limit: int, now: int) -> dict:
    """One page of a user's coupons by id: ids above `after`, at most `limit`,
    and `next` (the `after` of the next page) when more remain."""
    slots = np.asarray(ledger.user_coupon_slots(user), np.int64)
    ids = ledger.coupons["id"][slots]
    order = np.argsort(ids, kind="stable")
    ids, slots = ids[order], slots[order]
    start = int(np.searchsorted(ids, after, side="right"))
    page = slots[start:start + limit].tolist()
    reply = {"status": STATUS_OK, "results": [coupon_row(ledger, c, now) for c in page]}
    if start + limit < len(slots):
        reply["next"] = int(ids[start + limit - 1])
    return reply


def coupon_view(ledger, coupon_id: int, now: int) -> dict:
    slot = ledger.find("coupons", coupon_id) if coupon_id else -1
    if slot < 0:
        return not_found(coupon_id, Status.coupon_not_found)
    return coupon_row(ledger, slot, now)


def coupon_row(ledger, slot: int, now: int) -> dict:
    row = ledger.coupons[slot]
    state = int(row["state"])
    expires_at = int(row["expires_at"])
    name = COUPON_STATE_NAMES[state]
    if state == COUPON_AVAILABLE and now >= expires_at:
        name = "expired"
    payment = int(row["payment"])
    return {"id": int(row["id"]), "status": STATUS_OK,
            "stock": int(ledger.stocks["id"][row["stock"]]),
            "user": int(ledger.users["id"][row["user"]]),
            "state": name, "expires_at": expires_at,
            "payment": int(ledger.pay_req["id"][payment]) if payment >= 0 else 0}


# -- AUDIT ------------------------------------------------------------------

def audit_refusal(request) -> dict | None:
    """The reply to an AUDIT request that is not `{}`, else None. (The
    server checks this before it forks the audit: engine/audit_fork.py.)"""
    require_map(request, "{}")
    if request:
        return failure(Status.invalid_argument, "AUDIT takes an empty map")
    return None


def audit(state: State, request, now: int, draws) -> dict:
    refusal = audit_refusal(request)
    return refusal if refusal is not None else audit_checks.audit(export.canonical(state))
