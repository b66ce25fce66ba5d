"""Map operations that set up the world: MERCHANTS, WALLETS, TOPUP, STOCKS,
PAYMENT_CODE. Checks and replies: docs/reference/protocol.md."""
import numpy as np

from engine.core.canonical import FUNDER_MERCHANT, FUNDER_NAMES, KIND_FIXED, KIND_NAMES, STACKING_NAMES
from engine.protocol.errors import BadBody
from engine.protocol.limits import (
    AMOUNT_MAX, BANK_DEBT_MAX, PAYMENT_CODE_TTL_MS, STOCK_LIST_LENGTH_MAX, STOCK_SLOTS_MAX,
    TAGS_PER_MERCHANT_MAX, WALLET_BALANCE_MAX)
from engine.core.state import State
from engine.protocol.status import STATUS_OK, Status
from engine.core.validate import (COUNT_MAX, I63_MAX, U32_MAX, Invalid, choice, display_name, failure,
                       integer, item_id, only_keys, result, u64, u64_list)

MINUTES_PER_DAY = 1440


def list_items(request, key: str) -> list:
    """The item list of a list operation; anything else refuses the request."""
    if not isinstance(request, dict) or not isinstance(request.get(key), list):
        raise BadBody(f"the body must be a map with a list under `{key}`")
    if len(request) != 1:
        extra = next(k for k in request if k != key)
        raise BadBody(f"unknown key `{extra}` (the body holds only `{key}`)")
    return request[key]


def each_item(items: list, apply_one) -> dict:
    """Apply items one by one; a malformed item fails alone."""
    results = []
    for item in items:
        try:
            results.append(apply_one(item))
        except Invalid as e:
            results.append(failure(e.status, str(e)))
    return {"results": results}


# -- MERCHANTS --------------------------------------------------------------

MERCHANT_KEYS = frozenset({"id", "fee_bps", "tags", "active"})


def merchants(state: State, request, now: int, draws) -> dict:
    return each_item(list_items(request, "merchants"),
                     lambda item: upsert_merchant(state, item))


def upsert_merchant(state: State, item) -> dict:
    merchant_id = item_id(item, MERCHANT_KEYS)
    fee_bps = integer(item, "fee_bps", 0, 10000, default=-1)
    tags = None
    if "tags" in item:
        tags = sorted(set(u64_list(item, "tags", STOCK_LIST_LENGTH_MAX, U32_MAX)))
        if len(tags) > TAGS_PER_MERCHANT_MAX:
            raise Invalid(f"a merchant has at most {TAGS_PER_MERCHANT_MAX} tags")
    active = item.get("active", None)
    if active is not None and not isinstance(active, bool):
        raise Invalid("`active` must be true or false")
    ledger = state.ledger
    slot = ledger.find("merchants", merchant_id)
    if slot < 0:
        slot = ledger.append("merchants", merchant_id)
        ledger.configure("merchants", slot, {"active": 1})
    fields = {}
    if fee_bps >= 0:
        fields["fee_bps"] = fee_bps
    if tags is not None:
        fields["tags"] = tags + [0] * (TAGS_PER_MERCHANT_MAX - len(tags))
        fields["tag_count"] = len(tags)
    if active is not None:
        fields["active"] = active
    ledger.configure("merchants", slot, fields)
    return result()


# -- WALLETS ----------------------------------------------------------------

def wallets(state: State, request, now: int, draws) -> dict:
    return each_item(list_items(request, "users"), lambda u: open_wallet(state, u))


def open_wallet(state: State, user) -> dict:
    user_id = u64({"user": user}, "user")
    if user_id == 0:
        raise Invalid("a user id must be nonzero", Status.invalid_id)
    if state.ledger.find("users", user_id) >= 0:
        return result(duplicate=True)
    state.ledger.append("users", user_id)
    return result()


# -- TOPUP ------------------------------------------------------------------

TOPUP_KEYS = frozenset({"id", "user", "amount"})


def topups(state: State, request, now: int, draws) -> dict:
    return each_item(list_items(request, "topups"), lambda t: topup(state, t))


def topup(state: State, item) -> dict:
    topup_id = item_id(item, TOPUP_KEYS)
    user_id = u64(item, "user")
    amount = integer(item, "amount", -(2**63), I63_MAX)
    if not 1 <= amount <= AMOUNT_MAX:
        return failure(Status.invalid_amount)
    if topup_id in state.topups:
        same = state.topups[topup_id] == (user_id, amount)
        return result(duplicate=True) if same else failure(
            Status.exists_with_different_fields)
    ledger = state.ledger
    slot = ledger.find("users", user_id) if user_id else -1
    if slot < 0:
        return failure(Status.user_not_found)
    balance = int(ledger.users["balance"][slot])
    if balance + amount > WALLET_BALANCE_MAX or -ledger.bank + amount > BANK_DEBT_MAX:
        return failure(Status.invalid_amount)
    ledger.topup(slot, amount)
    state.topups[topup_id] = (user_id, amount)
    return result()


# -- STOCKS -----------------------------------------------------------------

STOCK_KEYS = frozenset({
    "id", "funder", "merchant", "kind", "value", "cap", "min_spend",
    "valid_from", "valid_until", "validity_ms", "merchants", "tags",
    "goods_tags", "budget", "max_issued", "per_user_limit", "stacking",
    "daily_budget", "per_user_daily_limit", "slots", "name",
})
STOCK_SCALARS = ("funder", "merchant", "kind", "stacking", "value", "cap",
                 "min_spend", "valid_from", "valid_until", "validity_ms",
                 "budget", "max_issued", "per_user_limit", "daily_budget",
                 "per_user_daily_limit")


def stocks(state: State, request, now: int, draws) -> dict:
    return each_item(list_items(request, "stocks"), lambda s: create_stock(state, s))


def stock_definition(item) -> tuple[int, dict]:
    """The stock's id and its full definition, defaults filled in."""
    stock_id = item_id(item, STOCK_KEYS)
    d = {
        "funder": choice(item, "funder", FUNDER_NAMES),
        "kind": choice(item, "kind", KIND_NAMES),
        "stacking": choice(item, "stacking", STACKING_NAMES),
    }
    value_max = AMOUNT_MAX if d["kind"] == KIND_FIXED else 10000
    d["value"] = integer(item, "value", 1, value_max)
    d["cap"] = integer(item, "cap", 0, AMOUNT_MAX, default=0)
    if d["kind"] == KIND_FIXED:
        d["cap"] = 0                        # cap means nothing for fixed stocks
    d["min_spend"] = integer(item, "min_spend", 0, AMOUNT_MAX, default=0)
    d["valid_from"] = integer(item, "valid_from", 0, I63_MAX)
    d["valid_until"] = integer(item, "valid_until", 0, I63_MAX)
    if d["valid_from"] >= d["valid_until"]:
        raise Invalid("`valid_from` must be before `valid_until`")
    d["validity_ms"] = integer(item, "validity_ms", 0, I63_MAX, default=0)
    for key in ("budget", "max_issued", "per_user_limit", "daily_budget",
                "per_user_daily_limit"):
        d[key] = integer(item, key, 0, COUNT_MAX, default=0)
    d["merchants"] = frozenset(u64_list(item, "merchants", STOCK_LIST_LENGTH_MAX, nonzero=True))
    d["tags"] = frozenset(u64_list(item, "tags", STOCK_LIST_LENGTH_MAX, U32_MAX))
    d["goods_tags"] = frozenset(u64_list(item, "goods_tags", STOCK_LIST_LENGTH_MAX, U32_MAX))
    d["slots"] = frozenset(parse_slots(item.get("slots", [])))
    d["name"] = display_name(item)
    merchant = u64(item, "merchant", default=0)
    if d["funder"] == FUNDER_MERCHANT:
        if "merchant" not in item:
            raise Invalid("a merchant stock names its `merchant`")
        if d["merchants"] or d["tags"]:
            raise Invalid("a merchant stock applies at its merchant only: "
                          "no `merchants` or `tags` lists")
    elif merchant:
        raise Invalid("a platform stock has no `merchant` (use `merchants` for scope)")
    d["merchant"] = merchant
    return stock_id, d


def parse_slots(slots) -> list[tuple[int, int, int]]:
    if not isinstance(slots, (list, tuple)) or len(slots) > STOCK_SLOTS_MAX:
        raise Invalid(f"`slots` must be a list of at most {STOCK_SLOTS_MAX} slots")
    out = []
    for slot in slots:
        ok = (isinstance(slot, (list, tuple)) and len(slot) == 3
              and all(isinstance(v, int) and not isinstance(v, bool) for v in slot))
        if not ok or not (0 <= slot[0] <= 6 and 0 <= slot[1] < slot[2] <= MINUTES_PER_DAY):
            raise Invalid(f"a slot is [weekday 0..6, start, end] with "
                          f"0 <= start < end <= 1440, got {slot!r}")
        out.append(tuple(slot))
    return out


def stored_definition(state: State, slot: int) -> dict:
    """The definition of the stock in `slot`, as stock_definition builds it."""
    ledger = state.ledger
    row = ledger.stocks[slot]
    d = {key: int(row["merchant_id" if key == "merchant" else key]) for key in STOCK_SCALARS}
    at, nm, nt, ng = (int(row[k]) for k in ("list_at", "merchants_count",
                                            "tags_count", "goods_count"))
    pool = ledger.lists
    d["merchants"] = frozenset(int(v) for v in pool[at:at + nm])
    d["tags"] = frozenset(int(v) for v in pool[at + nm:at + nm + nt])
    d["goods_tags"] = frozenset(int(v) for v in pool[at + nm + nt:at + nm + nt + ng])
    sa, sn = int(row["slot_at"]), int(row["slots_count"])
    flat = ledger.slots[3 * sa:3 * (sa + sn)].tolist()
    d["slots"] = frozenset(tuple(flat[i:i + 3]) for i in range(0, len(flat), 3))
    d["name"] = state.stock_names.get(int(row["id"]), "")
    return d


def create_stock(state: State, item) -> dict:
    stock_id, d = stock_definition(item)
    ledger = state.ledger
    existing = ledger.find("stocks", stock_id)
    if existing >= 0:
        same = stored_definition(state, existing) == d
        return result(duplicate=True) if same else failure(
            Status.exists_with_different_fields)
    merchant_slot = -1
    if d["funder"] == FUNDER_MERCHANT:
        merchant_slot = ledger.find("merchants", d["merchant"]) if d["merchant"] else -1
        if merchant_slot < 0:
            return failure(Status.merchant_not_found)
    lists = sorted(d["merchants"]) + sorted(d["tags"]) + sorted(d["goods_tags"])
    list_at = ledger.append_list(np.array(lists, np.uint64))
    slot_at = ledger.append_slots(sorted(d["slots"]))
    slot = ledger.append("stocks", stock_id)
    fields = {"merchant_id" if key == "merchant" else key: d[key] for key in STOCK_SCALARS}
    fields.update(merchant=merchant_slot, list_at=list_at, merchants_count=len(d["merchants"]),
                  tags_count=len(d["tags"]), goods_count=len(d["goods_tags"]),
                  slot_at=slot_at, slots_count=len(d["slots"]))
    ledger.configure("stocks", slot, fields)
    if d["name"]:
        state.stock_names[stock_id] = d["name"]
    return result()


# -- PAYMENT_CODE -----------------------------------------------------------

def payment_code_user(state: State, request) -> int:
    """The wallet slot the code is for; raises Invalid (user_not_found too)."""
    if not isinstance(request, dict):
        raise BadBody("the body must be a map {user}")
    only_keys(request, frozenset({"user"}))
    user_id = u64(request, "user")
    slot = state.ledger.find("users", user_id) if user_id else -1
    if slot < 0:
        raise Invalid("no wallet for this user", Status.user_not_found)
    return slot


def draw_payment_code(state: State, request, draw) -> list[int]:
    """Outside the apply: a fresh code (none for a request that will fail)."""
    try:
        payment_code_user(state, request)
    except Invalid:
        return []
    for _ in range(64):                     # a repeat has odds ~1e-17 per draw
        code = draw()
        if state.ledger.find("codes", code) < 0:
            return [code]
    raise RuntimeError("the payment code source keeps repeating codes")


def payment_code(state: State, request, now: int, draws) -> dict:
    try:
        user_slot = payment_code_user(state, request)
    except Invalid as e:
        return failure(e.status, str(e))
    (code,) = draws
    slot = state.ledger.append("codes", code)
    expires_at = now + PAYMENT_CODE_TTL_MS
    state.ledger.configure("codes", slot, {"user": user_slot, "expires_at": expires_at})
    return {"status": STATUS_OK, "code": code, "expires_at": expires_at}
