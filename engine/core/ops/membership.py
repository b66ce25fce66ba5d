"""Map operations of membership and marketing: PROGRAMS, REDEEM_POINTS,
STATS, and the `memberships` part of BALANCES (docs/reference/protocol.md;
docs/reference/rules.md, "Membership and marketing"). Earning, stamps and stats happen in the kernel
as payments complete; these ops define programs and read counters."""
import numpy as np

from engine._kernel import LIMITS
from engine.core.canonical import PROGRAM_KIND_NAMES, PROGRAM_POINTS, PROGRAM_STAMPS
from engine.core.ops.query import not_found, require_map
from engine.core.ops.setup import each_item, list_items
from engine.protocol.limits import LOOKUP_IDS_MAX, OFFERS_MAX, STOCK_LIST_LENGTH_MAX
from engine.core.state import State
from engine.protocol.status import STATUS_OK, Status
from engine.core.validate import (COUNT_MAX, U32_MAX, Invalid, choice, failure, integer, item_id,
                       only_keys, result, u64, u64_list)

PROGRAM_KEYS = frozenset({"id", "kind", "merchants", "tags", "rate", "offers",
                          "threshold", "stamps", "reward_stock"})
REDEEM_KEYS = frozenset({"coupon", "user", "program", "stock"})

def failed(status: int, message: str | None = None) -> dict:
    return failure(Status(status), message)


# -- PROGRAMS ---------------------------------------------------------------

def program_definition(item) -> tuple[int, dict]:
    program_id = item_id(item, PROGRAM_KEYS)
    kind = choice(item, "kind", PROGRAM_KIND_NAMES)
    own = {"rate", "offers"} if kind == PROGRAM_POINTS else {"threshold", "stamps", "reward_stock"}
    other = ({"rate", "offers", "threshold", "stamps", "reward_stock"} - own) & set(item)
    if other:
        raise Invalid(f"`{sorted(other)[0]}` is not a field of a {PROGRAM_KIND_NAMES[kind]} program")
    d = {"kind": kind,
         "merchants": sorted(set(u64_list(item, "merchants", STOCK_LIST_LENGTH_MAX, nonzero=True))),
         "tags": sorted(set(u64_list(item, "tags", STOCK_LIST_LENGTH_MAX, U32_MAX))),
         "rate": 0, "threshold": 0, "stamps": 0, "reward_stock": 0, "offers": []}
    if kind == PROGRAM_POINTS:
        d["rate"] = integer(item, "rate", 1, 10000)
        d["offers"] = parse_offers(item.get("offers", []))
    else:
        d["threshold"] = integer(item, "threshold", 0, 10**14, default=0)
        d["stamps"] = integer(item, "stamps", 1, 1000)
        d["reward_stock"] = u64(item, "reward_stock")
    return program_id, d


def parse_offers(offers) -> list:
    if not isinstance(offers, list) or len(offers) > OFFERS_MAX:
        raise Invalid(f"`offers` must be a list of at most {OFFERS_MAX} {{stock, price}}")
    out = {}
    for offer in offers:
        if not isinstance(offer, dict):
            raise Invalid("an offer is a map {stock, price}")
        only_keys(offer, frozenset({"stock", "price"}))
        stock = u64(offer, "stock")
        price = integer(offer, "price", 1, COUNT_MAX)
        if out.get(stock, price) != price:      # a list is a set: only a conflict is wrong
            raise Invalid(f"stock {stock} is offered at two prices")
        out[stock] = price
    return sorted([s, p] for s, p in out.items())


def programs(state: State, request, now: int, draws) -> dict:
    return each_item(list_items(request, "programs"), lambda i: create_program(state, i))


def create_program(state: State, item) -> dict:
    program_id, d = program_definition(item)
    if program_id in state.programs:
        same = state.programs[program_id] == d
        return result(duplicate=True) if same else failed(Status.exists_with_different_fields)
    ledger = state.ledger
    stocks = [s for s, _p in d["offers"]] + ([d["reward_stock"]] if d["reward_stock"] or
                                              d["kind"] == PROGRAM_STAMPS else [])
    if any(ledger.find("stocks", s) < 0 if s else True for s in stocks):
        return failed(Status.stock_not_found)
    if ledger.n_programs >= LIMITS["programs"]:
        raise Invalid(f"at most {LIMITS['programs']} programs")
    list_at = ledger.append_list(np.array(d["merchants"] + d["tags"], np.uint64))
    slot = ledger.append("programs", program_id)
    reward_slot = ledger.find("stocks", d["reward_stock"]) if d["reward_stock"] else -1
    ledger.configure("programs", slot, {
        "kind": d["kind"], "rate": d["rate"], "threshold": d["threshold"],
        "stamps": d["stamps"], "reward_stock_id": d["reward_stock"],
        "reward_stock": reward_slot, "list_at": list_at,
        "merchants_count": len(d["merchants"]), "tags_count": len(d["tags"])})
    state.programs[program_id] = d
    return result()


# -- REDEEM_POINTS ----------------------------------------------------------

def redeem_points(state: State, request, now: int, draws) -> dict:
    return each_item(list_items(request, "redemptions"), lambda i: redeem(state, i, now))


def redeem(state: State, item, now: int) -> dict:
    try:
        coupon = item_id(item, REDEEM_KEYS, key="coupon")
    except Invalid as e:
        if e.status != Status.invalid_id:
            raise
        return {**failed(e.status), "coupon": 0, "points": 0, "expires_at": 0}
    user, program, stock = (u64(item, k) for k in ("user", "program", "stock"))
    definition = state.programs.get(program)
    offers = dict(map(tuple, definition["offers"])) if definition else {}
    status, duplicate, expires_at, points = state.ledger.redeem(
        coupon, user, program, stock, offers.get(stock, -1), now)
    if status:
        return {**failed(status), "coupon": coupon, "points": 0, "expires_at": 0}
    reply = {"status": STATUS_OK, "coupon": coupon, "points": points, "expires_at": expires_at}
    if duplicate:
        reply["duplicate"] = True
    return reply


# -- BALANCES memberships ---------------------------------------------------

def membership_balances(state: State, asked) -> list:
    if not isinstance(asked, list) or len(asked) > LOOKUP_IDS_MAX:
        raise Invalid(f"`memberships` must be a list of at most {LOOKUP_IDS_MAX} {{user, program}}")
    return [membership_view(state, pair) for pair in asked]


def membership_view(state: State, pair) -> dict:
    if not isinstance(pair, dict):
        raise Invalid("a membership is a map {user, program}")
    only_keys(pair, frozenset({"user", "program"}))
    user_id, program_id = u64(pair, "user"), u64(pair, "program")
    ledger = state.ledger
    user = ledger.find("users", user_id) if user_id else -1
    program = ledger.find("programs", program_id) if program_id else -1
    base = {"user": user_id, "program": program_id}
    if user < 0:
        return {**base, **failed(Status.user_not_found)}
    if program < 0:
        return {**base, **failed(Status.program_not_found)}
    row = membership_row(ledger, user, program)
    points = int(ledger.memberships["points"][row]) if row >= 0 else 0
    stamps = int(ledger.memberships["stamps"][row]) if row >= 0 else 0
    return {**base, "status": STATUS_OK, "points": points, "stamps": stamps}


def membership_row(ledger, user: int, program: int) -> int:
    """The (user slot, program slot) row, or -1."""
    return ledger.find_membership(user, program)


# -- STATS ------------------------------------------------------------------

def stats(state: State, request, now: int, draws) -> dict:
    request = require_map(request, "{stocks?, merchants?}")
    try:
        only_keys(request, frozenset({"stocks", "merchants"}))
        asked = {k: u64_list(request, k, LOOKUP_IDS_MAX) for k in ("stocks", "merchants")}
    except Invalid as e:
        return failure(e.status, str(e))
    ledger = state.ledger
    return {"status": STATUS_OK,
            "stocks": [stock_stats(ledger, i, state.stock_names) for i in asked["stocks"]],
            "merchants": [merchant_stats(ledger, i) for i in asked["merchants"]]}


def share_bps(part: int, whole: int) -> int:
    return part * 10000 // whole if whole else 0


def stock_stats(ledger, stock_id: int, names: dict | None = None) -> dict:
    slot = ledger.find("stocks", stock_id) if stock_id else -1
    if slot < 0:
        return not_found(stock_id, Status.stock_not_found)
    row = {k: int(v) for k, v in zip(ledger.stocks.dtype.names, ledger.stocks[slot].tolist())
           if not isinstance(v, (tuple, list))}
    budget_left = row["budget"] - row["spent"] - row["reserved"] if row["budget"] else -1
    return {"id": stock_id, "status": STATUS_OK, "name": (names or {}).get(stock_id, ""), "issued": row["issued"],
            "redeemed": row["stat_redeemed"],
            "redemption_rate_bps": share_bps(row["stat_redeemed"], row["issued"]),
            "discount_spent": row["spent"], "budget_left": budget_left,
            "gmv": row["stat_gmv"], "payers_new": row["stat_payers_new"],
            "payers_returning": row["stat_payers_returning"]}


def merchant_stats(ledger, merchant_id: int) -> dict:
    slot = ledger.find("merchants", merchant_id) if merchant_id else -1
    if slot < 0:
        return not_found(merchant_id, Status.merchant_not_found)
    m = ledger.merchants[slot]
    payments, unique, repeat = (int(m[k]) for k in ("stat_payments", "stat_unique_payers",
                                                    "stat_repeat_payers"))
    coupon_payments = int(m["stat_coupon_payments"])
    return {"id": merchant_id, "status": STATUS_OK, "payments": payments, "gmv": int(m["stat_gmv"]),
            "unique_payers": unique, "repeat_payers": repeat,
            "repeat_payer_share_bps": share_bps(repeat, unique),
            "coupon_payments": coupon_payments,
            "coupon_payment_share_bps": share_bps(coupon_payments, payments),
            "points_issued": int(m["stat_points_issued"])}
