"""AUDIT: every invariant of the ledger, checked from the canonical tables
(engine/canonical.py), so it judges any implementation the same way.

Each check re-derives a quantity from history (top-ups, payments) and
compares it with the balance the engine keeps, or checks a limit."""
import numpy as np

from . import canonical as cn


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


def audit(t: dict) -> dict:
    checks = {
        "sum_zero": sum_zero(t),
        "wallets_nonnegative": wallets_nonnegative(t),
        "wallets_match_history": wallets_match_history(t),
        "merchants_match_payments": merchants_match_payments(t),
        "fees_match_payments": fees_match_payments(t),
        "campaign_matches_spent": campaign_matches_spent(t),
        "stock_budget": stock_budget(t),
        "stock_issued": stock_issued(t),
        "per_user_limit": per_user_limit(t),
        "coupons_used_once": coupons_used_once(t),
        "payments_balanced": payments_balanced(t),
        "holds_match_authorizations": holds_match_authorizations(t),
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


def completed(t) -> np.ndarray:
    p = t["payments"]
    return p[p["state"] == cn.PAYMENT_COMPLETED]


def wallets_match_history(t) -> dict:
    users, topups, paid = t["users"], t["topups"], completed(t)
    expected = (by_key(topups["user"], topups["amount"], users["id"])
                - by_key(paid["user"], paid["result"]["cash"], users["id"]))
    return first_bad(users["id"], users["balance"] != expected,
                     "wallets (balance = top-ups - cash paid)")


def merchant_discounts(t, paid) -> np.ndarray:
    """Merchant-funded applied discount of each payment."""
    coupons, stocks = t["coupons"], t["stocks"]
    ids = paid["result"]["coupons"]
    out = np.zeros(len(paid), np.int64)
    for i in range(4):
        used = ids[:, i] != 0
        if not used.any():
            continue
        stock = coupons["stock"][np.searchsorted(coupons["id"], ids[used, i])]
        funder = stocks["funder"][np.searchsorted(stocks["id"], stock)]
        out[used] += np.where(funder == cn.FUNDER_MERCHANT, paid["applied"][used, i], 0)
    return out


def merchants_match_payments(t) -> dict:
    merchants, paid = t["merchants"], completed(t)
    net = (paid["request"]["amount"] - merchant_discounts(t, paid) - paid["result"]["fee"])
    expected = by_key(paid["request"]["merchant"], net, merchants["id"])
    return first_bad(merchants["id"], merchants["balance"] != expected,
                     "merchants (balance = amount - merchant discount - fee)")


def fees_match_payments(t) -> dict:
    fees = int(t["meta"][0]["fees"])
    expected = total(completed(t)["result"]["fee"])
    return check(fees == expected, f"fees {fees}, payments' fees {expected}")


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


def coupons_used_once(t) -> dict:
    coupons, payments = t["coupons"], t["payments"]
    held = coupons["state"] != cn.COUPON_AVAILABLE
    ids = payments["result"]["coupons"].ravel()
    ids = ids[ids != 0]
    uses = np.unique(ids, return_counts=True)
    if len(uses[1]) and uses[1].max() > 1:
        return check(False, f"coupon {int(uses[0][uses[1] > 1][0])} is in several payments")
    listed = np.isin(coupons["id"], ids)
    # A used or locked coupon is in exactly the payment it names; no other is in any.
    bad = (held != listed) | (held & (coupons["payment"] == 0)) | (~held & (coupons["payment"] != 0))
    if held.any():
        pay = payments[np.searchsorted(payments["request"]["id"], coupons["payment"][held])]
        bad[held] |= ~(pay["result"]["coupons"] == coupons["id"][held][:, None]).any(1)
    return first_bad(coupons["id"], bad, "coupons (used once, by the payment they name)")


def payments_balanced(t) -> dict:
    p = t["payments"]
    amount, r = p["request"]["amount"], p["result"]
    bad = ((r["cash"] + r["discount"] != amount) | (r["cash"] < 0)
           | (p["applied"].sum(1) != r["discount"]) | (p["applied"] < 0).any(1)
           | (r["fee"] < 0) | (r["fee"] > amount) | ((r["coupons"] == 0) & (p["applied"] != 0)).any(1))
    return first_bad(p["request"]["id"], bad, "payments (cash + discount = amount)")


def holds_match_authorizations(t) -> dict:
    users, p = t["users"], t["payments"]
    auth = p[p["state"] == cn.PAYMENT_AUTHORIZED]
    expected = by_key(auth["user"], auth["result"]["cash"], users["id"])
    return first_bad(users["id"], users["held"] != expected,
                     "wallets (held = open authorizations)")
