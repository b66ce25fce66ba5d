"""Read-only map operations: QUOTE, BALANCES, COUPONS, AUDIT. They never
change state (docs/protocol-extensions.md)."""
import numpy as np

from . import audit as audit_checks
from . import export
from ._kernel import REASON_APPLIED, REASON_NOT_CHOSEN
from .canonical import COUPON_AVAILABLE, COUPON_STATE_NAMES
from .errors import BadBody
from .records import PAY_RECORD
from .state import State
from .status import Status
from .validate import I63_MAX, U32_MAX, Invalid, failure, integer, only_keys, u64, u64_list

QUOTE_KEYS = frozenset({"payer", "merchant", "amount", "flags", "coupons", "goods_tag"})
LOOKUP_IDS_MAX = 100_000


def require_map(request, shape: str) -> dict:
    if not isinstance(request, dict):
        raise BadBody(f"the body must be a map {shape}")
    return request


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
    coupons = u64_list(request, "coupons", 4, nonzero=True)
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
    if status:
        reply["error"] = Status(status).name
    return reply


# -- BALANCES ---------------------------------------------------------------

def balances(state: State, request, now: int, draws) -> dict:
    from .ops_membership import membership_balances
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
        "status": 0,
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
    return {"id": user_id, "status": 0, "balance": balance, "held": held,
            "available": balance - held}


def merchant_balance(ledger, merchant_id: int) -> dict:
    slot = ledger.find("merchants", merchant_id) if merchant_id else -1
    if slot < 0:
        return not_found(merchant_id, Status.merchant_not_found)
    return {"id": merchant_id, "status": 0, "balance": int(ledger.merchants["balance"][slot])}


def stock_balance(ledger, stock_id: int) -> dict:
    slot = ledger.find("stocks", stock_id) if stock_id else -1
    if slot < 0:
        return not_found(stock_id, Status.stock_not_found)
    row = ledger.stocks[slot]
    return {"id": stock_id, "status": 0,
            **{k: int(row[k]) for k in ("spent", "reserved", "issued", "budget", "campaign")}}


# -- COUPONS ----------------------------------------------------------------

def coupons(state: State, request, now: int, draws) -> dict:
    request = require_map(request, "{ids} or {user}")
    try:
        only_keys(request, frozenset({"ids", "user"}))
        if len(request) != 1:
            raise Invalid("give exactly one of `ids` and `user`")
        if "ids" in request:
            ids = u64_list(request, "ids", LOOKUP_IDS_MAX)
        else:
            user_id = u64(request, "user")
    except Invalid as e:
        return {**failure(e.status, str(e)), "results": []}
    ledger = state.ledger
    if "ids" in request:
        return {"status": 0, "results": [coupon_view(ledger, i, now) for i in ids]}
    user = ledger.find("users", user_id) if user_id else -1
    if user < 0:
        return {**failure(Status.user_not_found), "results": []}
    slots = sorted(ledger.user_coupon_slots(user), key=lambda c: int(ledger.coupons["id"][c]))
    return {"status": 0, "results": [coupon_row(ledger, c, now) for c in slots]}


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
    return {"id": int(row["id"]), "status": 0,
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
