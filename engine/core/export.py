"""The engine's state as the canonical tables of engine/core/canonical.py:
vectorized over the kernel's arrays, slots replaced by ids."""
import numpy as np

from engine.core import campaigns, canonical as cn
from engine.core.state import State


# The id indexes canonical() looks ids up in (the coupons of redemptions):
# the audit child (engine/server/audit_fork.py) drops its share of the others.
INDEXES_READ = frozenset({"coupons"})


def canonical(state: State) -> dict:
    ledger = state.ledger
    users = ledger.users[:ledger.n_users]
    merchants = ledger.merchants[:ledger.n_merchants]
    stocks = ledger.stocks[:ledger.n_stocks]
    coupons = ledger.coupons[:ledger.n_coupons]
    codes = ledger.codes[:ledger.n_codes]
    user_ids = users["id"]
    payment_ids = ledger.pay_req["id"][:ledger.n_payments]
    tables = {
        "meta": np.array([(state.now, ledger.fees, ledger.bank, len(state.settlements))],
                         cn.META),
        "users": copy_fields(users, cn.USERS),
        "merchants": copy_fields(merchants, cn.MERCHANTS),
        "merchant_tags": merchant_tags(merchants),
        "stocks": stocks_table(stocks),
        "stock_lists": stock_lists(ledger, stocks),
        "stock_slots": stock_slots(ledger, stocks),
        "coupons": coupons_table(coupons, stocks["id"], user_ids, payment_ids),
        "payments": payments_table(ledger, user_ids),
        "topups": copy_fields(state.topups.to_array(), cn.TOPUPS),
        "codes": codes_table(codes, user_ids),
        "refunds": copy_fields(ledger.refunds[:ledger.n_refunds], cn.REFUNDS),
        "tombstones": copy_fields(ledger.tombstones[:ledger.n_tombstones], cn.TOMBSTONES),
        "scoped_tombstones": np.array(state.scoped_tombstones.rows(), cn.SCOPED_TOMBSTONES),
        "settlements": settlements_table(state.settlements),
        **membership_tables(state, user_ids, payment_ids),
        **campaigns.canonical_tables(state),
    }
    return {name: cn.normalize(name, table) for name, table in tables.items()}


def copy_fields(rows: np.ndarray, dtype: np.dtype) -> np.ndarray:
    out = np.zeros(len(rows), dtype)
    for name in dtype.names:
        out[name] = rows[name]
    return out


def merchant_tags(merchants: np.ndarray) -> np.ndarray:
    counts = merchants["tag_count"].astype(np.int64)
    mask = np.arange(16)[None, :] < counts[:, None]
    out = np.zeros(int(counts.sum()), cn.MERCHANT_TAGS)
    out["merchant"] = np.repeat(merchants["id"], counts)
    out["tag"] = merchants["tags"][mask]
    return out


def stocks_table(stocks: np.ndarray) -> np.ndarray:
    out = np.zeros(len(stocks), cn.STOCKS)
    for name in cn.STOCKS.names:
        out[name] = stocks["merchant_id" if name == "merchant" else name]
    return out


def pool_rows(at, counts, pool):
    """For rows with (start, count) in `pool`: (row index, value) pairs."""
    counts = counts.astype(np.int64)
    owner = np.repeat(np.arange(len(counts)), counts)
    starts = np.repeat(at.astype(np.int64), counts)
    offset = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    return owner, pool[starts + offset] if len(owner) else pool[:0]


def stock_lists(ledger, stocks: np.ndarray) -> np.ndarray:
    parts = []
    at = stocks["list_at"].astype(np.int64)
    for kind, field, before in ((cn.LIST_MERCHANTS, "merchants_count", ()),
                                (cn.LIST_TAGS, "tags_count", ("merchants_count",)),
                                (cn.LIST_GOODS_TAGS, "goods_count",
                                 ("merchants_count", "tags_count"))):
        start = at + sum((stocks[b].astype(np.int64) for b in before), np.zeros(len(stocks), np.int64))
        owner, values = pool_rows(start, stocks[field], ledger.lists)
        part = np.zeros(len(owner), cn.STOCK_LISTS)
        part["stock"] = stocks["id"][owner]
        part["list"] = kind
        part["value"] = values
        parts.append(part)
    return np.concatenate(parts)


def stock_slots(ledger, stocks: np.ndarray) -> np.ndarray:
    triples = ledger.slots[:3 * ledger.n_slots].reshape(-1, 3)
    owner, rows = pool_rows(stocks["slot_at"], stocks["slots_count"], triples)
    out = np.zeros(len(owner), cn.STOCK_SLOTS)
    out["stock"] = stocks["id"][owner]
    if len(owner):
        out["weekday"], out["start"], out["end"] = rows[:, 0], rows[:, 1], rows[:, 2]
    return out


def coupons_table(coupons, stock_ids, user_ids, payment_ids) -> np.ndarray:
    out = np.zeros(len(coupons), cn.COUPONS)
    out["id"] = coupons["id"]
    out["stock"] = stock_ids[coupons["stock"]]
    out["user"] = user_ids[coupons["user"]]
    out["state"] = coupons["state"]
    out["expires_at"] = coupons["expires_at"]
    used = coupons["payment"] >= 0
    out["payment"][used] = payment_ids[coupons["payment"][used]]
    return out


def payments_table(ledger, user_ids) -> np.ndarray:
    n = ledger.n_payments
    meta = ledger.pay_meta[:n]
    out = np.zeros(n, cn.PAYMENTS)
    # The two records are copied as bytes: numpy's field-by-field copy of
    # nested structured dtypes is far slower than a strided memcpy.
    raw = out.view(np.uint8).reshape(n, cn.PAYMENTS.itemsize)
    at_request = cn.PAYMENTS.fields["request"][1]
    at_result = cn.PAYMENTS.fields["result"][1]
    raw[:, at_request:at_request + 80] = ledger.pay_req[:n].view(np.uint8).reshape(n, 80)
    raw[:, at_result:at_result + 80] = ledger.pay_res[:n].view(np.uint8).reshape(n, 80)
    out["user"] = user_ids[meta["user"]]
    for name in ("state", "released", "reversed", "applied", "refunded_part") + cn.PAYMENT_PARTS:
        out[name] = meta[name]
    return out


def settlements_table(settlements: list) -> np.ndarray:
    rows = [(s["settlement"], s["at"], r["merchant"],
             *(r[f] for f in cn.SETTLEMENT_FIELDS + ("refunds", "net", "payout")))
            for s in settlements for r in s["rows"]]
    return np.array(rows, cn.SETTLEMENTS) if rows else np.zeros(0, cn.SETTLEMENTS)


def codes_table(codes, user_ids) -> np.ndarray:
    out = np.zeros(len(codes), cn.CODES)
    out["code"] = codes["code"]
    out["user"] = user_ids[codes["user"]]
    out["expires_at"] = codes["expires_at"]
    out["used"] = codes["used"]
    return out


def membership_tables(state: State, user_ids, payment_ids) -> dict:
    ledger = state.ledger
    programs = ledger.programs[:ledger.n_programs]
    program_ids = programs["id"]
    lists = []
    for program_id, d in state.programs.items():
        lists += [(program_id, 0, m) for m in d["merchants"]] + [(program_id, 1, t) for t in d["tags"]]
    offers = [(program_id, stock, price) for program_id, d in state.programs.items()
              for stock, price in d["offers"]]
    memberships = ledger.memberships[:ledger.n_memberships]
    reward_ids = np.zeros(len(memberships), np.uint64)
    has_reward = memberships["reward"] >= 0
    reward_ids[has_reward] = ledger.coupons["id"][memberships["reward"][has_reward]]
    earnings = ledger.earnings[:ledger.n_earnings]
    redemptions = ledger.redemptions[:ledger.n_redemptions]
    visits = ledger.visits[:ledger.n_visits]
    stocks = ledger.stocks[:ledger.n_stocks]
    stock_counters = ("stat_redeemed", "stat_gmv", "stat_payers_new", "stat_payers_returning")
    active_stocks = stocks[np.any([stocks[k] != 0 for k in stock_counters], axis=0)] \
        if len(stocks) else stocks
    merchants = ledger.merchants[:ledger.n_merchants]
    paying = merchants[merchants["stat_payments"] > 0]
    return {
        "programs": columns(cn.PROGRAMS, id=program_ids, kind=programs["kind"],
                            rate=programs["rate"], threshold=programs["threshold"],
                            stamps=programs["stamps"], reward_stock=programs["reward_stock_id"]),
        "program_lists": np.array(lists, cn.PROGRAM_LISTS) if lists else np.zeros(0, cn.PROGRAM_LISTS),
        "program_offers": np.array(offers, cn.PROGRAM_OFFERS) if offers else np.zeros(0, cn.PROGRAM_OFFERS),
        "memberships": columns(cn.MEMBERSHIPS, user=user_ids[memberships["user"]],
                               program=program_ids[memberships["program"]],
                               points=memberships["points"], stamps=memberships["stamps"],
                               reward=reward_ids),
        "earnings": columns(cn.EARNINGS, payment=payment_ids[earnings["payment"]],
                            program=program_ids[earnings["program"]], points=earnings["points"],
                            clawed=earnings["clawed"], stamped=earnings["stamped"]),
        "redemptions": columns(cn.REDEMPTIONS, coupon=redemptions["coupon"],
                               user=user_ids[redemptions["user"]],
                               program=program_ids[redemptions["program"]],
                               stock=stocks["id"][ledger.coupons["stock"][
                                   [ledger.find("coupons", int(c)) for c in redemptions["coupon"]]]]
                               if len(redemptions) else np.zeros(0, np.uint64),
                               price=redemptions["price"]),
        "visits": columns(cn.VISITS, user=user_ids[visits["user"]],
                          merchant=merchants["id"][visits["merchant"]], payments=visits["payments"]),
        "stock_stats": columns(cn.STOCK_STATS, stock=active_stocks["id"],
                               redeemed=active_stocks["stat_redeemed"], gmv=active_stocks["stat_gmv"],
                               payers_new=active_stocks["stat_payers_new"],
                               payers_returning=active_stocks["stat_payers_returning"]),
        "merchant_stats": columns(cn.MERCHANT_STATS, merchant=paying["id"],
                                  payments=paying["stat_payments"], gmv=paying["stat_gmv"],
                                  unique_payers=paying["stat_unique_payers"],
                                  repeat_payers=paying["stat_repeat_payers"],
                                  coupon_payments=paying["stat_coupon_payments"],
                                  points_issued=paying["stat_points_issued"]),
    }


def columns(dtype: np.dtype, **values) -> np.ndarray:
    n = len(next(iter(values.values())))
    out = np.zeros(n, dtype)
    for name, column in values.items():
        out[name] = column
    return out
