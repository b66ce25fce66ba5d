"""AUDIT: every invariant of the ledger, checked from the canonical tables
(engine/core/canonical.py), so it judges any implementation the same way.

Each check re-derives a quantity from history (top-ups, payments) and
compares it with the balance the engine keeps, or checks a limit."""
import numpy as np

from engine.protocol.limits import COUPONS_PER_PAYMENT_MAX
from engine.core import canonical as cn


def total(values) -> int:
    """Exact sum (Python ints: a sum of i64 can leave 64 bits)."""
    return int(np.asarray(values).astype(object).sum()) if len(values) else 0


def by_key(keys: np.ndarray, values: np.ndarray, universe: np.ndarray) -> np.ndarray:
    """Sum of `values` grouped by `keys`, aligned to sorted `universe` ids."""
    out = np.zeros(len(universe), np.int64)
    if len(keys):
        np.add.at(out, np.searchsorted(universe, keys), values)
    return out


def check(ok: bool, detail: str) -> dict:
    return {"ok": bool(ok), "detail": detail}


def first_bad(ids: np.ndarray, bad: np.ndarray, what: str) -> dict:
    count = int(bad.sum())
    if count == 0:
        return check(True, f"all {len(ids)} {what} ok")
    return check(False, f"{count} {what} fail, first id {int(ids[bad][0])}")


ROWS_CACHE = "_rows"        # per audit: payments by state, each column copied once


def audit(t: dict) -> dict:
    t = {**t, ROWS_CACHE: {}}
    checks = {
        "sum_zero": sum_zero(t),
        "wallets_nonnegative": wallets_nonnegative(t),
        "wallets_match_history": wallets_match_history(t),
        "holds_match_authorizations": holds_match_authorizations(t),
        "merchants_match_history": merchants_match_history(t),
        "net_matches_balance_change": net_matches_balance_change(t),
        "fees_match_payments": fees_match_payments(t),
        "campaign_matches_spent": campaign_matches_spent(t),
        "stock_spent_and_reserved": stock_spent_and_reserved(t),
        "stock_budget": stock_budget(t),
        "stock_daily_budget": stock_daily_budget(t),
        "stock_issued": stock_issued(t),
        "per_user_limit": per_user_limit(t),
        "coupons_match_payments": coupons_match_payments(t),
        "payments_balanced": payments_balanced(t),
        "refunds_within_paid": refunds_within_paid(t),
        "points_match_history": points_match_history(t),
        "stats_match_payments": stats_match_payments(t),
    }
    return {"ok": all(c["ok"] for c in checks.values()), "checks": checks}


def sum_zero(t) -> dict:
    meta = t["meta"][0]
    parts = {
        "wallets": total(t["users"]["balance"]),
        "merchants": total(t["merchants"]["balance"]),
        "campaigns": total(t["stocks"]["campaign"]),
        "fees": int(meta["fees"]),
        "bank": int(meta["bank"]),
    }
    s = sum(parts.values())
    return check(s == 0, f"sum {s}: " + ", ".join(f"{k} {v}" for k, v in parts.items()))


def wallets_nonnegative(t) -> dict:
    users = t["users"]
    bad = (users["held"] < 0) | (users["balance"] - users["held"] < 0)
    return first_bad(users["id"], bad, "wallets (held >= 0, available >= 0)")


PAID_STATES = (cn.PAYMENT_COMPLETED, cn.PAYMENT_PARTIALLY_REFUNDED, cn.PAYMENT_REFUNDED)


class Rows:
    """Fields of the payments selected by a mask, copied field by field on
    first use: never whole rows of the wide payments table."""

    def __init__(self, payments: np.ndarray, mask: np.ndarray):
        self.payments, self.mask, self.cache = payments, mask, {}

    def __getitem__(self, path: str) -> np.ndarray:
        if path not in self.cache:
            column = self.payments
            for part in path.split("."):
                column = column[part]
            self.cache[path] = column[self.mask]
        return self.cache[path]

    def __len__(self) -> int:
        return int(self.mask.sum())


def payments_in(t, states: tuple) -> Rows:
    """The payments in `states`; within one audit() the same Rows (and its
    copied columns) serve every check that asks."""
    cache = t.get(ROWS_CACHE)
    if cache is None or states not in cache:
        p = t["payments"]
        rows = Rows(p, np.isin(p["state"], states))
        if cache is None:
            return rows
        cache[states] = rows
    return cache[states]


def paid(t) -> Rows:
    """Payments whose money moved: completed, then perhaps refunded."""
    return payments_in(t, PAID_STATES)


def authorized(t) -> Rows:
    return payments_in(t, (cn.PAYMENT_AUTHORIZED,))


def wallets_match_history(t) -> dict:
    users, topups, done = t["users"], t["topups"], paid(t)
    expected = (by_key(topups["user"], topups["amount"], users["id"])
                - by_key(done["user"], done["cash"] - done["refunded_cash"], users["id"]))
    return first_bad(users["id"], users["balance"] != expected,
                     "wallets (balance = top-ups - cash paid + cash refunded)")


def holds_match_authorizations(t) -> dict:
    users, auth = t["users"], authorized(t)
    expected = by_key(auth["user"], auth["cash"], users["id"])
    return first_bad(users["id"], users["held"] != expected,
                     "wallets (held = open authorizations)")


def funders(t, payments) -> np.ndarray:
    """The funder of each coupon slot of `payments` (platform where none)."""
    coupons, stocks = t["coupons"], t["stocks"]
    ids = payments["result.coupons"]
    out = np.full(ids.shape, cn.FUNDER_PLATFORM, np.uint8)
    used = ids != 0
    if used.any():
        stock = coupons["stock"][np.searchsorted(coupons["id"], ids[used])]
        out[used] = stocks["funder"][np.searchsorted(stocks["id"], stock)]
    return out


def merchants_match_history(t) -> dict:
    merchants, done = t["merchants"], paid(t)
    merchant_funded = funders(t, done) == cn.FUNDER_MERCHANT
    merchant_discount = np.where(merchant_funded, done["applied"], 0).sum(1)
    refunded_platform = np.where(merchant_funded, 0, done["refunded_part"]).sum(1)
    net = (done["amount"] - merchant_discount - done["fee"]
           - (done["refunded_cash"] + refunded_platform - done["refunded_fee"]))
    s = t["settlements"]
    expected = (by_key(done["request.merchant"], net, merchants["id"])
                - by_key(s["merchant"], s["payout"], merchants["id"]))
    return first_bad(merchants["id"], merchants["balance"] != expected,
                     "merchants (balance = payments - refunds - payouts)")


def net_matches_balance_change(t) -> dict:
    m = t["merchants"]
    refunds = m["refund_cash"] + m["refund_platform_discount"] - m["refund_fee"]
    net = m["gross"] - m["merchant_discount"] - m["fees"] - refunds
    return first_bad(m["id"], net != m["balance"] - m["settled_balance"],
                     "merchants (period net = balance change since the last settlement)")


def fees_match_payments(t) -> dict:
    fees = int(t["meta"][0]["fees"])
    done = paid(t)
    expected = total(done["fee"]) - total(done["refunded_fee"])
    return check(fees == expected, f"fees {fees}, payments' fees less refunded {expected}")


def stock_spent_and_reserved(t) -> dict:
    s, coupons = t["stocks"], t["coupons"]
    spent = np.zeros(len(s), np.int64)
    reserved = np.zeros(len(s), np.int64)
    done, auth = paid(t), authorized(t)
    for rows, target, amounts in ((done, spent, done["applied"] - done["refunded_part"]),
                                  (auth, reserved, auth["applied"])):
        ids = rows["result.coupons"]
        used = ids != 0
        if used.any():
            stock = coupons["stock"][np.searchsorted(coupons["id"], ids[used])]
            np.add.at(target, np.searchsorted(s["id"], stock), amounts[used])
    bad = (s["spent"] != spent) | (s["reserved"] != reserved)
    return first_bad(s["id"], bad, "stocks (spent and reserved = their payments' coupons)")


def campaign_matches_spent(t) -> dict:
    s = t["stocks"]
    expected = np.where(s["funder"] == cn.FUNDER_PLATFORM, -s["spent"], 0)
    return first_bad(s["id"], s["campaign"] != expected,
                     "stocks (campaign = -spent for platform, 0 for merchant)")


def stock_budget(t) -> dict:
    s = t["stocks"]
    over = (s["budget"] > 0) & (s["spent"] + s["reserved"] > s["budget"])
    bad = over | (s["spent"] < 0) | (s["reserved"] < 0)
    return first_bad(s["id"], bad, "stocks (0 <= spent + reserved <= budget)")


def stock_daily_budget(t) -> dict:
    """day_spent is the net discount of the payments of its day, within the
    daily budget."""
    s, coupons = t["stocks"], t["coupons"]
    rows = payments_in(t, PAID_STATES + (cn.PAYMENT_AUTHORIZED,))
    amounts = rows["applied"] - rows["refunded_part"]
    ids = rows["result.coupons"]
    expected = np.zeros(len(s), np.int64)
    used = ids != 0
    if used.any():
        stock_at = np.searchsorted(s["id"], coupons["stock"][np.searchsorted(coupons["id"], ids[used])])
        days = np.repeat(rows["day"], COUPONS_PER_PAYMENT_MAX).reshape(ids.shape)
        same_day = days[used] == s["day"][stock_at]
        np.add.at(expected, stock_at[same_day], amounts[used][same_day])
    bad = (s["day_spent"] != expected) | ((s["daily_budget"] > 0) & (s["day_spent"] > s["daily_budget"]))
    return first_bad(s["id"], bad, "stocks (day_spent = that day's payments <= daily_budget)")


def stock_issued(t) -> dict:
    s, coupons = t["stocks"], t["coupons"]
    counts = np.bincount(np.searchsorted(s["id"], coupons["stock"]), minlength=len(s))
    bad = (s["issued"] != counts) | ((s["max_issued"] > 0) & (s["issued"] > s["max_issued"]))
    return first_bad(s["id"], bad, "stocks (issued = coupons <= max_issued)")


def per_user_limit(t) -> dict:
    s, users, coupons = t["stocks"], t["users"], t["coupons"]
    if len(coupons) == 0:
        return check(True, "no coupons")
    stock_at = np.searchsorted(s["id"], coupons["stock"]).astype(np.int64)
    pair = stock_at * len(users) + np.searchsorted(users["id"], coupons["user"])
    pairs, counts = np.unique(pair, return_counts=True)
    limit = s["per_user_limit"][pairs // len(users)]
    bad = (limit > 0) & (counts > limit)
    return first_bad(s["id"][pairs // len(users)], bad,
                     "(stock, user) pairs within per_user_limit")


def coupons_match_payments(t) -> dict:
    """A used coupon is applied in a paid payment, a locked one in an open
    authorization, and no coupon is in two payments at once."""
    coupons, payments = t["coupons"], t["payments"]
    holding = payments_in(t, (cn.PAYMENT_AUTHORIZED, cn.PAYMENT_COMPLETED,
                              cn.PAYMENT_PARTIALLY_REFUNDED))
    ids = holding["result.coupons"].copy()
    released = (holding["released"][:, None] >> np.arange(COUPONS_PER_PAYMENT_MAX)) & 1
    ids[released == 1] = 0
    listed_ids = ids[ids != 0]
    uses = np.unique(listed_ids, return_counts=True)
    if len(uses[1]) and uses[1].max() > 1:
        return check(False, f"coupon {int(uses[0][uses[1] > 1][0])} is in several payments")
    held = coupons["state"] != cn.COUPON_AVAILABLE
    listed = np.isin(coupons["id"], listed_ids, assume_unique=True)
    bad = (held != listed) | (held & (coupons["payment"] == 0)) | (~held & (coupons["payment"] != 0))
    if held.any():
        payment_ids = payments["request"]["id"]
        at = np.minimum(np.searchsorted(payment_ids, coupons["payment"][held]),
                        len(payments) - 1)
        named = payment_ids[at] == coupons["payment"][held]
        contains = (payments["result"]["coupons"][at] == coupons["id"][held][:, None]).any(1)
        state = payments["state"][at]
        locked_ok = np.where(coupons["state"][held] == cn.COUPON_LOCKED,
                             state == cn.PAYMENT_AUTHORIZED, state != cn.PAYMENT_AUTHORIZED)
        bad[held] |= ~(named & contains & locked_ok)
    return first_bad(coupons["id"], bad, "coupons (held by exactly the payment they name)")


def payments_balanced(t) -> dict:
    p = t["payments"]
    r = p["result"]
    bad = ((p["cash"] + p["discount"] != p["amount"]) | (p["cash"] < 0)
           | (p["applied"].sum(1) != p["discount"]) | (p["applied"] < 0).any(1)
           | (p["fee"] < 0) | (p["fee"] > p["amount"])
           | ((r["coupons"] == 0) & (p["applied"] != 0)).any(1)
           | ((p["authorized_amount"] > 0) & (p["amount"] > p["authorized_amount"])))
    return first_bad(p["request"]["id"], bad, "payments (cash + discount = amount)")


def refunds_within_paid(t) -> dict:
    """Refunded parts are exactly the cumulative floor shares, never more
    than was paid; refunds by id add up to what each payment shows."""
    p = t["payments"]
    some = p[p["refunded_amount"] > 0]      # few rows: copying them is fine
    bad = np.zeros(len(some), bool)
    for i in range(len(some)):
        row = some[i]
        big_r, big_t = int(row["refunded_amount"]), int(row["amount"])
        parts = [(row["refunded_cash"], row["cash"]), (row["refunded_fee"], row["fee"])]
        parts += list(zip(row["refunded_part"], row["applied"]))
        bad[i] = big_r > big_t or any(int(got) != big_r * int(of) // big_t for got, of in parts)
    refunds = t["refunds"]
    by_refund = by_key(refunds["payment"], refunds["amount"], some["request"]["id"])
    bad |= (by_refund > some["refunded_amount"]) | (
        (some["reversed"] == 0) & (by_refund != some["refunded_amount"]))
    return first_bad(some["request"]["id"], bad, "refunded payments (parts = floor shares)")


def pair_key(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One sortable key per (a, b) id pair (u64 ids: combine as structured)."""
    out = np.zeros(len(a), [("a", "<u8"), ("b", "<u8")])
    out["a"], out["b"] = a, b
    return out


def points_match_history(t) -> dict:
    """Points = earned - clawed back - spent on redemptions, per membership."""
    m, e, r = t.get("memberships"), t.get("earnings"), t.get("redemptions")
    if m is None or len(m) == 0:
        return check(True, "no memberships")
    keys = pair_key(m["user"], m["program"])
    expected = np.zeros(len(m), np.int64)
    if len(e):
        users = t["payments"]["user"][np.searchsorted(t["payments"]["request"]["id"], e["payment"])]
        pairs = pair_key(users, e["program"])
        at = np.minimum(np.searchsorted(keys, pairs), len(keys) - 1)
        member = keys[at] == pairs
        if (e["points"] - e["clawed"])[~member].any():
            return check(False, "points were earned with no membership to hold them")
        np.add.at(expected, at[member], (e["points"] - e["clawed"])[member])
    if len(r):
        np.add.at(expected, np.searchsorted(keys, pair_key(r["user"], r["program"])), -r["price"])
    return first_bad(m["user"], m["points"] != expected,
                     "memberships (points = earned - clawed - redeemed)")


def stats_match_payments(t) -> dict:
    """Merchant and stock counters equal what the paid payments show."""
    done = paid(t)
    ms, ss, visits = t.get("merchant_stats"), t.get("stock_stats"), t.get("visits")
    if ms is None:
        return check(True, "no statistics")
    merchants = np.unique(done["request.merchant"])
    counts = by_key(done["request.merchant"], np.ones(len(done), np.int64), merchants)
    gmv = by_key(done["request.merchant"], done["amount"], merchants)
    bad = (len(ms) != len(merchants)) or not (np.array_equal(ms["merchant"], merchants)
                                              and np.array_equal(ms["payments"], counts)
                                              and np.array_equal(ms["gmv"], gmv))
    if not bad and len(visits):
        unique = by_key(visits["merchant"], np.ones(len(visits), np.int64), merchants)
        repeat = by_key(visits["merchant"], (visits["payments"] >= 2).astype(np.int64), merchants)
        bad = not (np.array_equal(ms["unique_payers"], unique)
                   and np.array_equal(ms["repeat_payers"], repeat))
    if bad:
        return check(False, "merchant statistics differ from the paid payments")
    # Stock redemptions: coupons applied in paid payments that still hold them.
    holding = payments_in(t, (cn.PAYMENT_COMPLETED, cn.PAYMENT_PARTIALLY_REFUNDED))
    ids = holding["result.coupons"].copy()
    ids[((holding["released"][:, None] >> np.arange(COUPONS_PER_PAYMENT_MAX)) & 1) == 1] = 0
    ids = ids[ids != 0]
    coupons = t["coupons"]
    stocks = coupons["stock"][np.searchsorted(coupons["id"], ids)]
    universe = ss["stock"] if len(ss) else np.zeros(0, np.uint64)
    redeemed = by_key(stocks, np.ones(len(stocks), np.int64), universe) if len(universe) else []
    ok = len(universe) == 0 and len(stocks) == 0 or np.array_equal(ss["redeemed"], redeemed)
    return check(bool(ok), "merchant and stock statistics match the payments" if ok
                 else "stock redemption counts differ from the payments")
