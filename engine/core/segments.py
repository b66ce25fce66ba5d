"""Segments (docs/reference/rules.md, "Precision marketing"; docs/reference/protocol.md,
SEGMENTS and SEGMENT): a definition's checks and its evaluation at an engine time.

A segment is evaluated over every wallet and every payment: one pass over
the payment rows in C (ext/marketing.pyx, `scan_payments`) fills per-user
counts, net GMV and the time of the last payment, and the conditions are
numpy comparisons over those per-user arrays. No Python code runs per user
or per payment.
"""
import numpy as np

from engine import _marketing
from engine.core.validate import (COUNT_MAX, I63_MAX, U32_MAX, Invalid, display_name, integer,
                                  only_keys, u64, u64_list)
from engine.protocol.limits import SEGMENT_DAYS_MAX, STOCK_LIST_LENGTH_MAX
from engine.protocol.status import Status

DAY_MS = 86_400_000
CONDITION_KEYS = frozenset({
    "name", "merchants", "tags", "from", "until", "days", "payments_min", "payments_max",
    "gmv_min", "gmv_max", "recency_days_min", "recency_days_max", "never_paid", "program",
    "points_min"})
SEGMENT_KEYS = CONDITION_KEYS | {"id"}
# (min key, its default, max key, the largest value): ranges whose max may
# not be below their min; None is "no bound".
RANGES = (("payments_min", 0, "payments_max", COUNT_MAX), ("gmv_min", 0, "gmv_max", COUNT_MAX),
          ("recency_days_min", None, "recency_days_max", SEGMENT_DAYS_MAX))


def definition(item, with_id: bool = True) -> tuple[int, dict]:
    """(id, the normalized definition) of a SEGMENTS item (or of SEGMENT's
    inline `definition`, which has no id: 0). Every key is filled in; a
    condition that is absent is None. Raises Invalid."""
    if not isinstance(item, dict):
        raise Invalid(f"a segment must be a map, got {type(item).__name__}")
    segment_id = 0
    if with_id:
        segment_id = u64(item, "id")
        if segment_id == 0:
            raise Invalid("`id` must be nonzero", Status.invalid_id)
    only_keys(item, SEGMENT_KEYS if with_id else CONDITION_KEYS)
    d = {"name": display_name(item),
         "merchants": sorted(set(u64_list(item, "merchants", STOCK_LIST_LENGTH_MAX, nonzero=True))),
         "tags": sorted(set(u64_list(item, "tags", STOCK_LIST_LENGTH_MAX, U32_MAX)))}
    d.update(window(item))
    for low, low_default, high, top in RANGES:
        d[low] = integer(item, low, 0, top) if low in item else low_default
        d[high] = integer(item, high, 0, top) if high in item else None
        if d[high] is not None and d[high] < (d[low] or 0):
            raise Invalid(f"`{high}` must not be below `{low}`")
    never_paid = item.get("never_paid", False)
    if not isinstance(never_paid, bool):
        raise Invalid("`never_paid` must be true or false")
    d["never_paid"] = never_paid
    d["program"] = u64(item, "program") if "program" in item else None
    d["points_min"] = integer(item, "points_min", 0, COUNT_MAX) if "points_min" in item else None
    if d["points_min"] is not None and d["program"] is None:
        raise Invalid("`points_min` needs a `program`")
    return segment_id, d


def window(item: dict) -> dict:
    """`from`/`until` (absolute, ms) or `days` (the last n days, relative to
    the evaluation time), never both."""
    days = integer(item, "days", 1, SEGMENT_DAYS_MAX, default=0) or None
    if days is not None and ("from" in item or "until" in item):
        raise Invalid("`days` is a window of its own: no `from` or `until` with it")
    start = integer(item, "from", 0, I63_MAX, default=0)
    until = integer(item, "until", 1, I63_MAX, default=0) or None
    if until is not None and start >= until:
        raise Invalid("`from` must be before `until`")
    return {"from": start, "until": until, "days": days}


def program_missing(ledger, d: dict) -> bool:
    """The definition names a program that does not exist (0 included)."""
    return d["program"] is not None and (d["program"] == 0 or
                                         ledger.find("programs", d["program"]) < 0)


def scope_mask(ledger, merchants: list, tags: list) -> np.ndarray:
    """One byte per merchant slot: 1 when the merchant is in the scope
    (listed, or carrying one of the tags; both lists empty: every merchant)."""
    rows = ledger.merchants[:ledger.n_merchants]
    if not merchants and not tags:
        return np.ones(len(rows), np.uint8)
    inside = np.isin(rows["id"], np.array(merchants, np.uint64))
    if tags:
        carried = np.arange(rows["tags"].shape[1])[None, :] < rows["tag_count"][:, None]
        inside |= (np.isin(rows["tags"], np.array(tags, np.uint32)) & carried).any(axis=1)
    return inside.astype(np.uint8)


def payment_rows(ledger) -> np.ndarray:
    """The payment rows in use, as the bytes ext/marketing.pyx reads."""
    rows = ledger.pay_meta[:ledger.n_payments]
    assert rows.dtype.itemsize == _marketing.PAYMENT_ROW_BYTES
    return rows.view(np.uint8).reshape(-1)


class Activity:
    """Per wallet slot, over the counted payments at merchants in a scope
    (docs/reference/rules.md: completed, refunded at most in part, by net
    amount): in the window [start, until), how many, their net GMV and the
    latest completion; whether the user paid there ever, and before `start`."""

    def __init__(self, ledger, mask: np.ndarray, start: int, until: int):
        acc = np.zeros((ledger.n_users, _marketing.ACC_FIELDS), np.int64)
        _marketing.scan_payments(payment_rows(ledger), mask, start, until, acc)
        self.count = acc[:, _marketing.ACC_COUNT]
        self.gmv = acc[:, _marketing.ACC_GMV]
        self.last = acc[:, _marketing.ACC_LAST]
        flags = acc[:, _marketing.ACC_FLAGS]
        self.ever = flags & _marketing.FLAG_EVER != 0
        self.before = flags & _marketing.FLAG_BEFORE != 0


class UserOrder:
    """Wallet slots in user id order, kept between evaluations: sorting a
    million scrambled ids costs more than a whole segment's other work, and
    wallets are only ever appended, so the order only grows. New wallets
    are sorted alone and merged in (a stable sort of two sorted runs is one
    merge). Derived state: never journaled, snapshotted or compared."""

    def __init__(self):
        self.n = 0
        self.order = np.zeros(0, np.int64)
        self.sorted_ids = np.zeros(0, np.uint64)

    def update(self, ledger) -> "UserOrder":
        n = ledger.n_users
        assert n >= self.n, "wallets are never removed"
        if n != self.n:
            ids = ledger.users["id"][:n]
            fresh = self.n + np.argsort(ids[self.n:], kind="stable")
            merged = np.concatenate([self.order, fresh])
            self.order = merged[np.argsort(ids[merged], kind="stable")]
            self.sorted_ids = ids[self.order]
            self.n = n
        return self

    def slots_of(self, user_ids: np.ndarray) -> np.ndarray:
        """The wallet slots of user ids that all have wallets."""
        at = np.searchsorted(self.sorted_ids, user_ids)
        assert (self.sorted_ids[at] == user_ids).all(), "a user id without a wallet"
        return self.order[at]


def user_order(state) -> UserOrder:
    if state.user_order is None:
        state.user_order = UserOrder()
    return state.user_order.update(state.ledger)


def bounds(d: dict, now: int) -> tuple[int, int]:
    """The window [start, until) a definition means at engine time `now`."""
    if d["days"] is not None:
        return now - d["days"] * DAY_MS, I63_MAX
    return d["from"], d["until"] if d["until"] is not None else I63_MAX


def evaluate(state, d: dict, now: int) -> np.ndarray:
    """The user ids of the segment at engine time `now`, ascending (u64)."""
    ledger = state.ledger
    start, until = bounds(d, now)
    seen = Activity(ledger, scope_mask(ledger, d["merchants"], d["tags"]), start, until)
    keep = between(seen.count, d["payments_min"], d["payments_max"])
    keep &= between(seen.gmv, d["gmv_min"], d["gmv_max"])
    if d["recency_days_min"] is not None or d["recency_days_max"] is not None:
        days = (now - seen.last) // DAY_MS
        keep &= (seen.count > 0) & between(days, d["recency_days_min"], d["recency_days_max"])
    if d["never_paid"]:
        keep &= ~seen.ever
    if d["program"] is not None:
        keep &= members_of(ledger, d["program"], d["points_min"])
    order = user_order(state)
    return order.sorted_ids[keep[order.order]]


def between(values: np.ndarray, low, high) -> np.ndarray:
    keep = np.ones(len(values), bool)
    if low is not None:
        keep &= values >= low
    if high is not None:
        keep &= values <= high
    return keep


def members_of(ledger, program_id: int, points_min) -> np.ndarray:
    """Per wallet slot: holds a membership of the program (with at least
    `points_min` points, when given)."""
    keep = np.zeros(ledger.n_users, bool)
    slot = ledger.find("programs", program_id)
    rows = ledger.memberships[:ledger.n_memberships]
    held = rows["program"] == slot
    if points_min is not None:
        held &= rows["points"] >= points_min
    keep[rows["user"][held]] = True
    return keep
