"""The canonical form of the whole engine state, and its digest.

Any implementation of docs/reference/rules.md (the Cython engine, the plain-Python reference
in tests/, a replica after replay) can express its state as these tables:
plain numpy arrays, one row per entity, sorted by key, with ids instead of
internal slots. Two states are equal exactly when their tables are, and the
digest is a SHA-256 over the tables in a fixed order. AUDIT reads the same
tables (engine/core/audit.py), so its checks do not depend on how state is stored.
"""
import hashlib

import numpy as np

from engine.protocol.limits import COUPONS_PER_PAYMENT_MAX, NAME_BYTES_MAX
from engine.protocol.records import PAY_RECORD, PAY_RESULT

# Coupon states.
COUPON_AVAILABLE = 0
COUPON_LOCKED = 1
COUPON_USED = 2
COUPON_STATE_NAMES = ("available", "locked", "used")

# Payment states (GET_PAYMENTS `state`).
PAYMENT_AUTHORIZED = 0
PAYMENT_COMPLETED = 1
PAYMENT_PARTIALLY_REFUNDED = 2
PAYMENT_REFUNDED = 3
PAYMENT_VOIDED = 4
PAYMENT_EXPIRED = 5
PAYMENT_STATE_NAMES = (
    "authorized", "completed", "partially_refunded", "refunded", "voided", "expired",
)

# Stock enums.
FUNDER_PLATFORM = 0
FUNDER_MERCHANT = 1
FUNDER_NAMES = ("platform", "merchant")
KIND_FIXED = 0
KIND_PERCENT = 1
KIND_NAMES = ("fixed", "percent")
STACKING_EXCLUSIVE = 0
STACKING_STACKABLE = 1
STACKING_NAMES = ("exclusive", "stackable")

# STOCK_LISTS.list
LIST_MERCHANTS = 0
LIST_TAGS = 1
LIST_GOODS_TAGS = 2

META = np.dtype([("now", "<i8"), ("fees", "<i8"), ("bank", "<i8"), ("settlements", "<i8")])
USERS = np.dtype([("id", "<u8"), ("balance", "<i8"), ("held", "<i8")])
SETTLEMENT_FIELDS = ("gross", "merchant_discount", "platform_discount", "fees",
                     "refund_cash", "refund_platform_discount",
                     "refund_merchant_discount", "refund_fee")
MERCHANTS = np.dtype([
    ("id", "<u8"), ("fee_bps", "<i4"), ("active", "u1"), ("balance", "<i8"),
    ("period_active", "u1"), ("settled_balance", "<i8"),
] + [(f, "<i8") for f in SETTLEMENT_FIELDS])  # totals since the last settlement
MERCHANT_TAGS = np.dtype([("merchant", "<u8"), ("tag", "<u4")])
STOCKS = np.dtype([
    ("id", "<u8"), ("funder", "u1"), ("merchant", "<u8"), ("kind", "u1"),
    ("stacking", "u1"), ("value", "<i8"), ("cap", "<i8"), ("min_spend", "<i8"),
    ("valid_from", "<i8"), ("valid_until", "<i8"), ("validity_ms", "<i8"),
    ("budget", "<i8"), ("max_issued", "<i8"), ("per_user_limit", "<i8"),
    ("daily_budget", "<i8"), ("per_user_daily_limit", "<i8"),
    ("spent", "<i8"), ("reserved", "<i8"), ("issued", "<i8"),
    ("campaign", "<i8"),  # balance of campaign(stock); 0 for merchant stocks
    ("day", "<i8"),       # the engine day day_spent counts (last day with a change)
    ("day_spent", "<i8"), # net discount of payments of that day (daily_budget)
])
STOCK_LISTS = np.dtype([("stock", "<u8"), ("list", "u1"), ("value", "<u8")])
STOCK_SLOTS = np.dtype([
    ("stock", "<u8"), ("weekday", "u1"), ("start", "<u2"), ("end", "<u2"),
])
COUPONS = np.dtype([
    ("id", "<u8"), ("stock", "<u8"), ("user", "<u8"), ("state", "u1"),
    ("expires_at", "<i8"), ("payment", "<u8"),
])
PAYMENT_PARTS = ("amount", "authorized_amount", "cash", "discount", "fee",
                 "refunded_amount", "refunded_cash", "refunded_fee",
                 "created_at", "completed_at", "ended_at", "hold_expires_at", "day")
PAYMENTS = np.dtype([
    ("request", PAY_RECORD),   # as sent (payer may be a payment code)
    ("result", PAY_RESULT),    # the original PAY/AUTHORIZE result, no duplicate flag
    ("user", "<u8"),           # the payer's user id after resolving a code
    ("state", "u1"),
    ("released", "u1"),        # bit i: coupon i released at capture
    ("reversed", "u1"),
    ("applied", "<i8", (COUPONS_PER_PAYMENT_MAX,)),  # applied (authorized: reserved) part of result.coupons[i]
    ("refunded_part", "<i8", (COUPONS_PER_PAYMENT_MAX,)),
] + [(f, "<i8") for f in PAYMENT_PARTS])  # amount: T, the captured amount once captured
REFUNDS = np.dtype([("id", "<u8"), ("payment", "<u8"), ("amount", "<i8"),
                    ("cash", "<i8"), ("discount", "<i8"), ("fee", "<i8")])
TOMBSTONES = np.dtype([("id", "<u8")])
# A scoped key's reversal of an unknown id: one row per merchant it blocks.
SCOPED_TOMBSTONES = np.dtype([("id", "<u8"), ("merchant", "<u8")])
SETTLEMENTS = np.dtype([("settlement", "<u8"), ("at", "<i8"), ("merchant", "<u8")]
                       + [(f, "<i8") for f in SETTLEMENT_FIELDS + ("refunds", "net", "payout")])
TOPUPS = np.dtype([("id", "<u8"), ("user", "<u8"), ("amount", "<i8")])
CODES = np.dtype([
    ("code", "<u8"), ("user", "<u8"), ("expires_at", "<i8"), ("used", "u1"),
])

# Membership and marketing (docs/reference/rules.md).
PROGRAM_POINTS = 0
PROGRAM_STAMPS = 1
PROGRAM_KIND_NAMES = ("points", "stamps")
PROGRAMS = np.dtype([("id", "<u8"), ("kind", "u1"), ("rate", "<i8"), ("threshold", "<i8"),
                     ("stamps", "<i8"), ("reward_stock", "<u8")])
PROGRAM_LISTS = np.dtype([("program", "<u8"), ("list", "u1"), ("value", "<u8")])  # 0 merchants, 1 tags
PROGRAM_OFFERS = np.dtype([("program", "<u8"), ("stock", "<u8"), ("price", "<i8")])
MEMBERSHIPS = np.dtype([("user", "<u8"), ("program", "<u8"), ("points", "<i8"),
                        ("stamps", "<i8"), ("reward", "<u8")])  # reward: this cycle's coupon
EARNINGS = np.dtype([("payment", "<u8"), ("program", "<u8"), ("points", "<i8"),
                     ("clawed", "<i8"), ("stamped", "u1")])
REDEMPTIONS = np.dtype([("coupon", "<u8"), ("user", "<u8"), ("program", "<u8"),
                        ("stock", "<u8"), ("price", "<i8")])
VISITS = np.dtype([("user", "<u8"), ("merchant", "<u8"), ("payments", "<i8")])
STOCK_STATS = np.dtype([("stock", "<u8"), ("redeemed", "<i8"), ("gmv", "<i8"),
                        ("payers_new", "<i8"), ("payers_returning", "<i8")])
MERCHANT_STATS = np.dtype([("merchant", "<u8"), ("payments", "<i8"), ("gmv", "<i8"),
                           ("unique_payers", "<i8"), ("repeat_payers", "<i8"),
                           ("coupon_payments", "<i8"), ("points_issued", "<i8")])

# Precision marketing (docs/reference/rules.md). Names are UTF-8 bytes; a
# bound that is absent is -1 (`program` 0: none).
NAME = f"S{NAME_BYTES_MAX}"
STOCK_NAMES = np.dtype([("stock", "<u8"), ("name", NAME)])     # only named stocks
SEGMENTS = np.dtype([("id", "<u8"), ("name", NAME), ("from", "<i8"), ("until", "<i8"),
                     ("days", "<i8"), ("payments_min", "<i8"), ("payments_max", "<i8"),
                     ("gmv_min", "<i8"), ("gmv_max", "<i8"), ("recency_days_min", "<i8"),
                     ("recency_days_max", "<i8"), ("never_paid", "u1"), ("program", "<u8"),
                     ("points_min", "<i8")])
SEGMENT_LISTS = np.dtype([("segment", "<u8"), ("list", "u1"), ("value", "<u8")])  # 0 merchants, 1 tags
CAMPAIGNS = np.dtype([("id", "<u8"), ("name", NAME), ("segment", "<u8"), ("stock", "<u8"),
                      ("holdout_bps", "<i8"), ("coupon_base", "<u8"), ("at", "<i8")])
CAMPAIGN_LISTS = np.dtype([("campaign", "<u8"), ("list", "u1"), ("value", "<u8")])  # its frozen scope
CAMPAIGN_MEMBERS = np.dtype([("campaign", "<u8"), ("user", "<u8"), ("holdout", "u1"),
                             ("status", "u1"), ("duplicate", "u1")])

# name -> (dtype, sort key fields). Order here is digest order.
TABLES = {
    "meta": (META, ()),
    "users": (USERS, ("id",)),
    "merchants": (MERCHANTS, ("id",)),
    "merchant_tags": (MERCHANT_TAGS, ("merchant", "tag")),
    "stocks": (STOCKS, ("id",)),
    "stock_lists": (STOCK_LISTS, ("stock", "list", "value")),
    "stock_slots": (STOCK_SLOTS, ("stock", "weekday", "start", "end")),
    "coupons": (COUPONS, ("id",)),
    "payments": (PAYMENTS, ("request.id",)),
    "topups": (TOPUPS, ("id",)),
    "codes": (CODES, ("code",)),
    "refunds": (REFUNDS, ("id",)),
    "tombstones": (TOMBSTONES, ("id",)),
    "scoped_tombstones": (SCOPED_TOMBSTONES, ("id", "merchant")),
    "settlements": (SETTLEMENTS, ("settlement", "merchant")),
    "programs": (PROGRAMS, ("id",)),
    "program_lists": (PROGRAM_LISTS, ("program", "list", "value")),
    "program_offers": (PROGRAM_OFFERS, ("program", "stock")),
    "memberships": (MEMBERSHIPS, ("user", "program")),
    "earnings": (EARNINGS, ("payment", "program")),
    "redemptions": (REDEMPTIONS, ("coupon",)),
    "visits": (VISITS, ("user", "merchant")),
    "stock_stats": (STOCK_STATS, ("stock",)),       # only stocks with a nonzero counter
    "merchant_stats": (MERCHANT_STATS, ("merchant",)),  # only merchants with payments
    "stock_names": (STOCK_NAMES, ("stock",)),
    "segments": (SEGMENTS, ("id",)),
    "segment_lists": (SEGMENT_LISTS, ("segment", "list", "value")),
    "campaigns": (CAMPAIGNS, ("id",)),
    "campaign_lists": (CAMPAIGN_LISTS, ("campaign", "list", "value")),
    "campaign_members": (CAMPAIGN_MEMBERS, ("campaign", "user")),
}


def _field(arr: np.ndarray, path: str) -> np.ndarray:
    for part in path.split("."):
        arr = arr[part]
    return arr


def _sorted_by_first_key(table: np.ndarray, key: tuple) -> bool:
    """Rows already in strictly increasing order of a unique first key (ids
    appended in order, the common case) need no sort."""
    first = _field(table, key[0])
    return bool(np.all(first[1:] > first[:-1]))


def normalize(name: str, rows) -> np.ndarray:
    """Rows (an array or a list of tuples) as the canonical table `name`:
    the table's dtype, sorted by its key."""
    dtype, key = TABLES[name]
    table = rows if isinstance(rows, np.ndarray) else np.array(list(rows), dtype=dtype)
    table = np.ascontiguousarray(table.astype(dtype, copy=False))
    if key and len(table) > 1 and not _sorted_by_first_key(table, key):
        order = np.lexsort([_field(table, k) for k in reversed(key)])
        table = table[order]
    return table


def digest(tables: dict) -> str:
    """SHA-256 (hex) of canonical tables; equal states have equal digests."""
    h = hashlib.sha256()
    for name, (dtype, _key) in TABLES.items():
        table = tables.get(name, np.zeros(0, dtype))   # an absent table is empty
        assert table.dtype == dtype, f"table {name} has dtype {table.dtype}"
        h.update(name.encode())
        h.update(len(table).to_bytes(8, "little"))
        h.update(np.ascontiguousarray(table).tobytes())
    return h.hexdigest()


def diff(a: dict, b: dict, rows_max: int = 5) -> list[str]:
    """Human-readable differences between two sets of tables (for test failures)."""
    out = []
    for name, (dtype, _key) in TABLES.items():
        ta, tb = a.get(name, np.zeros(0, dtype)), b.get(name, np.zeros(0, dtype))
        if len(ta) != len(tb):
            out.append(f"{name}: {len(ta)} rows vs {len(tb)}")
            continue
        bad = np.nonzero(ta != tb)[0]
        for i in bad[:rows_max]:
            out.append(f"{name}[{i}]: {ta[i]} != {tb[i]}")
    return out
