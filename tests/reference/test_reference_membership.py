"""Worked examples of membership and marketing on the reference alone
(tests/support/reference_membership.py; docs/reference/rules.md "Membership and marketing";
docs/reference/protocol.md, PROGRAMS, REDEEM_POINTS, STATS). Each test is a small story a merchant would recognise.

Run: .venv/bin/python -m pytest tests/reference/test_reference_membership.py
"""
from __future__ import annotations

import numpy as np
import pytest

from engine.core import audit, canonical
from engine.protocol.errors import BadBody
from engine.client import issue_record, pay_record
from engine.protocol.records import ISSUE_RECORD, PAY_RECORD

from support.reference_membership import REWARD_BASE, MembershipReference
from support.clock import Clock

T0 = 1_700_000_000_000
YEAR = 365 * 86_400_000
COFFEE_SHOP, BAKERY, MALL_SHOP = 1, 2, 3
ALICE, BOB, CAROL = 1, 2, 3


def stock(sid, **fields):
    base = {"id": sid, "funder": "platform", "kind": "fixed", "value": 100,
            "valid_from": 0, "valid_until": T0 + YEAR, "stacking": "stackable"}
    return {**base, **fields}


def world(programs=(), stocks=()):
    clock = Clock(T0)
    ref = MembershipReference(clock=clock)
    ref.clock = clock
    ref.call("MERCHANTS", {"merchants": [{"id": COFFEE_SHOP, "fee_bps": 60},
                                         {"id": BAKERY, "fee_bps": 0},
                                         {"id": MALL_SHOP, "tags": [77]}]})
    ref.call("WALLETS", {"users": [ALICE, BOB, CAROL]})
    ref.call("TOPUP", {"topups": [{"id": u, "user": u, "amount": 1_000_000}
                                  for u in (ALICE, BOB, CAROL)]})
    if stocks:
        assert all(r["status"] == 0 for r in ref.call("STOCKS", {"stocks": list(stocks)})["results"])
    if programs:
        replies = ref.call("PROGRAMS", {"programs": list(programs)})["results"]
        assert all(r["status"] == 0 for r in replies), replies
    return ref


def pay(ref, pid, payer, merchant, amount, flags=0, coupons=()):
    record = pay_record(pid, payer, merchant, amount, flags, coupons=coupons)
    return ref.pay(np.array([record], PAY_RECORD))[0]


def issue(ref, coupon, stock_id, user):
    return ref.issue(np.array([issue_record(coupon, stock_id, user)], ISSUE_RECORD))[0]


def card(ref, user, program):
    reply = ref.call("BALANCES", {"memberships": [{"user": user, "program": program}]})
    entry = reply["memberships"][0]
    assert entry["status"] == 0, entry
    return entry["points"], entry["stamps"]


def coupon(ref, cid):
    return ref.call("COUPONS", {"ids": [cid]})["results"][0]


def refund(ref, rid, pid, amount):
    return ref.call("REFUND", {"refunds": [{"id": rid, "payment": pid, "amount": amount}]})[
        "results"][0]


def stats(ref, stocks=(), merchants=()):
    return ref.call("STATS", {"stocks": list(stocks), "merchants": list(merchants)})


def audited(ref):
    report = audit.audit(ref.canonical())
    assert report["ok"], report
    assert ref.digest() == canonical.digest(ref.canonical())


FREE_COFFEE = stock(50, funder="merchant", merchant=COFFEE_SHOP, value=2500,
                    stacking="exclusive")


def coffee_card(stamps, threshold=1500):
    return {"id": 10, "kind": "stamps", "merchants": [COFFEE_SHOP], "threshold": threshold,
            "stamps": stamps, "reward_stock": 50}


# ---------------------------------------------------------------------------
# Stamp cards
# ---------------------------------------------------------------------------

def test_stamp_card_of_9_the_ninth_coffee_issues_a_coupon_for_the_tenth_free():
    """The café's "buy 9, the 10th is free" card: stamps = 9, so the 9th
    qualifying coffee issues the reward coupon in the same apply and the 10th
    coffee is paid by it."""
    ref = world([coffee_card(stamps=9)], [FREE_COFFEE])
    for n in range(1, 9):
        assert pay(ref, n, ALICE, COFFEE_SHOP, 2200)["status"] == 0
    assert card(ref, ALICE, 10) == (0, 8)
    # A payment below the threshold (a bottle of water) is no stamp.
    pay(ref, 100, ALICE, COFFEE_SHOP, 300)
    assert card(ref, ALICE, 10) == (0, 8)
    assert ref.call("COUPONS", {"user": ALICE})["results"] == []

    ninth = pay(ref, 9, ALICE, COFFEE_SHOP, 2200)
    assert ninth["status"] == 0 and ninth["discount"] == 0     # earned, not yet used
    reward = coupon(ref, REWARD_BASE + 1)
    assert reward["stock"] == 50 and reward["user"] == ALICE and reward["state"] == "available"
    assert card(ref, ALICE, 10) == (0, 0)                     # the card starts again

    tenth = pay(ref, 10, ALICE, COFFEE_SHOP, 2200)            # auto selection finds it
    assert tenth["cash"] == 0 and tenth["discount"] == 2200
    assert list(tenth["coupons"]) == [REWARD_BASE + 1, 0, 0, 0]
    assert card(ref, ALICE, 10) == (0, 1)                     # the free coffee stamps too
    assert stats(ref, stocks=[50])["stocks"][0]["redeemed"] == 1
    audited(ref)


def test_stamp_card_of_10_the_tenth_coffee_issues_a_coupon_for_the_eleventh():
    ref = world([coffee_card(stamps=10)], [FREE_COFFEE])
    for n in range(1, 10):
        pay(ref, n, ALICE, COFFEE_SHOP, 2000)
    assert ref.call("COUPONS", {"user": ALICE})["results"] == []
    pay(ref, 10, ALICE, COFFEE_SHOP, 2000)
    assert coupon(ref, REWARD_BASE + 1)["state"] == "available"
    assert card(ref, ALICE, 10) == (0, 0)
    audited(ref)


def test_only_covered_merchants_stamp_and_each_user_has_their_own_card():
    ref = world([coffee_card(stamps=2)], [FREE_COFFEE])
    pay(ref, 1, ALICE, BAKERY, 5000)                       # not covered: no stamp, no row
    pay(ref, 2, BOB, COFFEE_SHOP, 5000)
    assert card(ref, ALICE, 10) == (0, 0) and card(ref, BOB, 10) == (0, 1)
    tables = ref.canonical()
    assert tables["earnings"].tolist() == [(2, 10, 0, 0, 1)]
    assert [tuple(r)[:2] for r in tables["memberships"]] == [(BOB, 10)]


def test_reward_ids_skip_ids_already_taken():
    ref = world([coffee_card(stamps=1)], [FREE_COFFEE, stock(51)])
    assert issue(ref, REWARD_BASE + 1, 51, BOB)["status"] == 0   # someone took 2**63 + 1
    pay(ref, 1, ALICE, COFFEE_SHOP, 2000)
    assert coupon(ref, REWARD_BASE + 2)["user"] == ALICE
    pay(ref, 2, ALICE, COFFEE_SHOP, 2000, flags=1)             # no coupons: earns the next
    assert coupon(ref, REWARD_BASE + 3)["user"] == ALICE
    audited(ref)


def test_a_full_card_waits_while_the_reward_stock_cannot_issue():
    """Reward stock at max_issued: the card stays full (N) and the next
    qualifying payment tries again; no id is used up by the failures."""
    ref = world([coffee_card(stamps=2)],
                [{**FREE_COFFEE, "max_issued": 1}])
    assert issue(ref, 900, 50, BOB)["status"] == 0             # the one coupon is gone
    for n in (1, 2, 3):
        pay(ref, n, ALICE, COFFEE_SHOP, 2000)
        assert card(ref, ALICE, 10) == (0, min(n, 2))
    assert REWARD_BASE + 1 not in ref.coupons
    audited(ref)


def test_full_refund_takes_the_stamp_back_and_expires_the_unused_reward():
    ref = world([coffee_card(stamps=3)], [FREE_COFFEE])
    for n in (1, 2, 3):
        pay(ref, n, ALICE, COFFEE_SHOP, 2000)
    assert card(ref, ALICE, 10) == (0, 0) and coupon(ref, REWARD_BASE + 1)["state"] == "available"
    # Partial refunds leave stamps alone.
    ref.clock.now_ms += 1000
    assert refund(ref, 1, 2, 500)["status"] == 0
    assert card(ref, ALICE, 10) == (0, 0) and coupon(ref, REWARD_BASE + 1)["state"] == "available"
    # The rest of payment 2: now a full refund. The reward expires at once, the card is 2.
    ref.clock.now_ms += 1000
    assert refund(ref, 2, 2, 1500)["status"] == 0
    reward = coupon(ref, REWARD_BASE + 1)
    assert reward["state"] == "expired" and reward["expires_at"] == T0 + 2000
    assert card(ref, ALICE, 10) == (0, 2)
    # The expired reward does not pay; the next qualifying coffee refills the card.
    third = pay(ref, 4, ALICE, COFFEE_SHOP, 2000)
    assert third["discount"] == 0
    assert card(ref, ALICE, 10) == (0, 0)
    assert coupon(ref, REWARD_BASE + 2)["state"] == "available"
    # A full refund of a payment of an ongoing cycle: just one stamp off.
    pay(ref, 5, ALICE, COFFEE_SHOP, 2000, flags=1)
    assert card(ref, ALICE, 10) == (0, 1)
    assert ref.call("REVERSE", {"payments": [5]})["results"][0]["status"] == 0
    assert card(ref, ALICE, 10) == (0, 0)
    audited(ref)


def test_full_refund_after_the_reward_was_used_puts_the_card_at_minus_one():
    ref = world([coffee_card(stamps=2)], [FREE_COFFEE])
    pay(ref, 1, ALICE, COFFEE_SHOP, 2000)
    pay(ref, 2, ALICE, COFFEE_SHOP, 2000)                  # reward 2**63 + 1
    # Spend the reward below the threshold (no stamp), so the card stays at 0.
    used = pay(ref, 3, ALICE, COFFEE_SHOP, 1000, coupons=[REWARD_BASE + 1])
    assert used["cash"] == 0 and card(ref, ALICE, 10) == (0, 0)
    assert coupon(ref, REWARD_BASE + 1)["state"] == "used"
    # The customer returns the 2nd coffee: the stamp that earned the reward goes.
    assert refund(ref, 1, 2, 2000)["status"] == 0
    assert card(ref, ALICE, 10) == (0, -1)
    assert coupon(ref, REWARD_BASE + 1)["state"] == "used"     # a used reward stays used
    pay(ref, 4, ALICE, COFFEE_SHOP, 2000)                  # only back to 0
    assert card(ref, ALICE, 10) == (0, 0)
    pay(ref, 5, ALICE, COFFEE_SHOP, 2000)
    pay(ref, 6, ALICE, COFFEE_SHOP, 2000)
    assert card(ref, ALICE, 10) == (0, 0) and REWARD_BASE + 2 in ref.coupons
    audited(ref)


# ---------------------------------------------------------------------------
# Points
# ---------------------------------------------------------------------------

POINTS_PROGRAM = {"id": 20, "kind": "points", "tags": [77], "merchants": [COFFEE_SHOP],
                  "rate": 5, "offers": [{"stock": 60, "price": 300}]}
VOUCHER = stock(60, value=1000)


def test_points_are_earned_on_cash_and_clawed_back_by_a_partial_refund():
    ref = world([POINTS_PROGRAM], [VOUCHER, stock(61, value=1000, stacking="exclusive")])
    issue(ref, 1, 61, ALICE)
    # 10,000 paid with a 1,000 coupon: cash 9,000 earns 9000 * 5 // 100 = 450.
    assert pay(ref, 1, ALICE, MALL_SHOP, 10_000)["cash"] == 9000
    assert card(ref, ALICE, 20) == (450, 0)
    pay(ref, 2, ALICE, BAKERY, 10_000)                     # bakery: not covered
    assert card(ref, ALICE, 20) == (450, 0)
    # Refund 3,000 of 10,000: 3000 * 450 // 10000 = 135 points back.
    refund(ref, 1, 1, 3000)
    assert card(ref, ALICE, 20) == (315, 0)
    # Cumulative floors: 3,333 more (R = 6,333): 6333 * 450 // 10000 = 284 in total.
    refund(ref, 2, 1, 3333)
    assert card(ref, ALICE, 20) == (166, 0)
    assert ref.canonical()["earnings"].tolist() == [(1, 20, 450, 284, 0)]
    # The rest: every point of the payment is back.
    ref.call("REVERSE", {"payments": [1]})
    assert card(ref, ALICE, 20) == (0, 0)
    assert stats(ref, merchants=[MALL_SHOP])["merchants"][0]["points_issued"] == 450
    audited(ref)


def test_redemption_with_insufficient_points_changes_nothing():
    ref = world([POINTS_PROGRAM, coffee_card(stamps=5)], [VOUCHER, FREE_COFFEE, stock(62)])
    pay(ref, 1, ALICE, COFFEE_SHOP, 5000)                  # 250 points
    redeem = lambda c, prog=20, sid=60, user=ALICE: ref.call(  # noqa: E731
        "REDEEM_POINTS", {"redemptions": [{"coupon": c, "user": user, "program": prog,
                                           "stock": sid}]})["results"][0]
    before = ref.digest()
    assert redeem(500) == {"status": 31, "error": "insufficient_points", "coupon": 500,
                           "points": 0, "expires_at": 0}
    assert ref.digest() == before                           # nothing changed
    assert ref.canonical()["coupons"].tolist() == [] and card(ref, ALICE, 20) == (250, 0)
    assert redeem(500, sid=62)["error"] == "offer_not_found"
    assert redeem(500, prog=10)["error"] == "program_not_found"   # a stamp card
    assert redeem(500, prog=99)["error"] == "program_not_found"
    assert redeem(500, user=BOB)["error"] == "insufficient_points"  # never earned: 0
    assert redeem(0)["error"] == "invalid_id"
    pay(ref, 2, ALICE, COFFEE_SHOP, 2000, flags=1)         # +100: 350
    ok = redeem(500)
    assert ok == {"status": 0, "coupon": 500, "points": 50, "expires_at": T0 + YEAR}
    assert coupon(ref, 500)["stock"] == 60 and ref.stocks[60].issued == 1
    assert redeem(500) == {**ok, "duplicate": True}
    assert redeem(500, sid=62)["error"] == "exists_with_different_fields"
    # A refund takes back points already redeemed: the balance goes below zero
    # and a negative balance redeems nothing.
    ref.call("REVERSE", {"payments": [1]})
    assert card(ref, ALICE, 20) == (-200, 0)
    assert redeem(501)["error"] == "insufficient_points"
    assert ref.canonical()["redemptions"].tolist() == [(500, ALICE, 20, 60, 300)]
    audited(ref)


def test_capture_earns_on_the_captured_cash_and_an_authorization_earns_nothing():
    ref = world([POINTS_PROGRAM], [VOUCHER])
    pay(ref, 1, ALICE, COFFEE_SHOP, 10_000, flags=4)
    assert card(ref, ALICE, 20) == (0, 0)
    assert ref.call("CAPTURE", {"captures": [{"payment": 1, "amount": 6000}]})[
        "results"][0]["status"] == 0
    assert card(ref, ALICE, 20) == (300, 0)
    ref.call("CAPTURE", {"captures": [{"payment": 1, "amount": 6000}]})   # replay: no more
    assert card(ref, ALICE, 20) == (300, 0)
    pay(ref, 2, ALICE, COFFEE_SHOP, 10_000, flags=4)
    ref.call("VOID", {"payments": [2]})
    assert card(ref, ALICE, 20) == (300, 0)
    refund(ref, 1, 1, 3000)                                 # half of the captured 6,000
    assert card(ref, ALICE, 20) == (150, 0)
    audited(ref)


# ---------------------------------------------------------------------------
# Stats
# ---------------------------------------------------------------------------

def test_stats_repeat_payer_share():
    """Alice comes three times, Carol twice, Bob once: 3 unique payers, 2 of
    them repeat payers: 6,666 bps."""
    ref = world()
    pid = 0
    for user, times in ((ALICE, 3), (BOB, 1), (CAROL, 2)):
        for _ in range(times):
            pid += 1
            pay(ref, pid, user, BAKERY, 1000 * pid)
    m = stats(ref, merchants=[BAKERY, COFFEE_SHOP, 99])["merchants"]
    assert m[0] == {"id": BAKERY, "status": 0, "payments": 6, "gmv": 21_000,
                    "unique_payers": 3, "repeat_payers": 2, "repeat_payer_share_bps": 6666,
                    "coupon_payments": 0, "coupon_payment_share_bps": 0, "points_issued": 0}
    assert m[1]["payments"] == 0 and m[1]["repeat_payer_share_bps"] == 0
    assert m[2] == {"id": 99, "status": 4, "error": "merchant_not_found"}
    # Refunds do not uncount a payment.
    ref.call("REVERSE", {"payments": [1, 2, 3]})
    assert stats(ref, merchants=[BAKERY])["merchants"][0]["payments"] == 6
    assert ref.canonical()["visits"].tolist() == [(ALICE, BAKERY, 3), (BOB, BAKERY, 1),
                                                  (CAROL, BAKERY, 2)]
    audited(ref)


def test_stats_new_versus_returning_payers_of_a_campaign():
    """A 5-off campaign at the coffee shop: Alice had been there before (a
    returning payer), Bob comes for the first time with the coupon (new)."""
    ref = world(stocks=[stock(70, value=500, budget=10_000, merchants=[COFFEE_SHOP])])
    for cid, user in ((1, ALICE), (2, BOB), (3, CAROL), (4, CAROL)):
        issue(ref, cid, 70, user)
    pay(ref, 1, ALICE, COFFEE_SHOP, 3000, flags=1)         # first visit, no coupon
    pay(ref, 2, ALICE, COFFEE_SHOP, 3000)                  # returning, coupon 1
    pay(ref, 3, BOB, COFFEE_SHOP, 3000)                    # new, coupon 2
    s = stats(ref, stocks=[70, 71])["stocks"]
    assert s[0] == {"id": 70, "status": 0, "name": "", "issued": 4, "redeemed": 2,
                    "redemption_rate_bps": 5000, "discount_spent": 1000,
                    "budget_left": 9000, "gmv": 6000, "payers_new": 1,
                    "payers_returning": 1}
    assert s[1] == {"id": 71, "status": 18, "error": "stock_not_found"}
    m = stats(ref, merchants=[COFFEE_SHOP])["merchants"][0]
    assert (m["payments"], m["coupon_payments"], m["coupon_payment_share_bps"]) == (3, 2, 6666)
    # A full refund returns Bob's coupon: no longer redeemed; gmv and payers stay.
    ref.call("REVERSE", {"payments": [3]})
    s = stats(ref, stocks=[70])["stocks"][0]
    assert (s["redeemed"], s["redemption_rate_bps"], s["gmv"], s["payers_new"]) == (1, 2500,
                                                                                   6000, 1)
    assert s["budget_left"] == 9500
    # An open authorization reserves budget but is not a redemption until captured.
    pay(ref, 4, CAROL, COFFEE_SHOP, 3000, flags=4)
    s = stats(ref, stocks=[70])["stocks"][0]
    assert (s["redeemed"], s["budget_left"]) == (1, 9000)
    ref.call("CAPTURE", {"captures": [{"payment": 4, "amount": 3000}]})
    s = stats(ref, stocks=[70])["stocks"][0]
    assert (s["redeemed"], s["payers_new"], s["gmv"]) == (2, 2, 9000)
    assert stats(ref, stocks=[999999])["stocks"][0]["error"] == "stock_not_found"
    # Unlimited budget: -1.
    ref.call("STOCKS", {"stocks": [stock(72)]})
    assert stats(ref, stocks=[72])["stocks"][0]["budget_left"] == -1
    audited(ref)


# ---------------------------------------------------------------------------
# PROGRAMS, BALANCES and STATS requests
# ---------------------------------------------------------------------------

def test_programs_checks_and_duplicates():
    ref = world(stocks=[VOUCHER, FREE_COFFEE])
    results = ref.call("PROGRAMS", {"programs": [
        {"id": 1, "kind": "points", "rate": 5, "merchants": [1, 2, 1]},
        {"id": 1, "kind": "points", "rate": 5, "merchants": [2, 1]},        # same as a set
        {"id": 1, "kind": "points", "rate": 6},
        {"id": 0, "kind": "points", "rate": 5},
        {"id": 2, "kind": "points", "rate": 0},
        {"id": 2, "kind": "points", "rate": 5, "stamps": 3},              # other kind
        {"id": 2, "kind": "stamps", "stamps": 3},                         # no reward_stock
        {"id": 2, "kind": "stamps", "stamps": 1001, "reward_stock": 50},
        {"id": 2, "kind": "coins", "rate": 5},
        {"id": 2, "kind": "points", "rate": 5, "bonus": 1},
        {"id": 2, "kind": "stamps", "stamps": 3, "reward_stock": 404},
        {"id": 2, "kind": "points", "rate": 5, "offers": [{"stock": 0, "price": 1}]},
        {"id": 2, "kind": "points", "rate": 5, "offers": [{"stock": 60, "price": 0}]},
        {"id": 2, "kind": "stamps", "stamps": 3, "reward_stock": 50},     # threshold 0
        {"id": 2, "kind": "stamps", "stamps": 3, "reward_stock": 50, "threshold": 0},
        "x", {"kind": "points"},
    ]})["results"]
    statuses = [r.get("error", "duplicate" if r.get("duplicate") else "ok") for r in results]
    assert statuses == ["ok", "duplicate", "exists_with_different_fields", "invalid_id",
                        "invalid_argument", "invalid_argument", "invalid_argument",
                        "invalid_argument", "invalid_argument", "invalid_argument",
                        "stock_not_found", "stock_not_found", "invalid_argument", "ok",
                        "duplicate", "invalid_argument", "invalid_argument"]
    with pytest.raises(BadBody):
        ref.call("PROGRAMS", [])
    t = ref.canonical()
    assert t["programs"].tolist() == [(1, 0, 5, 0, 0, 0), (2, 1, 0, 0, 3, 50)]
    assert t["program_lists"].tolist() == [(1, 0, 1), (1, 0, 2)]


def test_balances_memberships_and_bad_requests():
    ref = world([POINTS_PROGRAM], [VOUCHER])
    reply = ref.call("BALANCES", {"users": [ALICE], "memberships": [
        {"user": ALICE, "program": 20}, {"user": 9, "program": 20}, {"user": ALICE, "program": 9}]})
    assert reply["users"][0]["balance"] == 1_000_000
    assert reply["memberships"] == [
        {"user": ALICE, "program": 20, "status": 0, "points": 0, "stamps": 0},
        {"user": 9, "program": 20, "status": 22, "error": "user_not_found"},
        {"user": ALICE, "program": 9, "status": 30, "error": "program_not_found"}]
    assert "memberships" not in ref.call("BALANCES", {})
    assert ref.call("BALANCES", {"memberships": [{"user": 1}]})["status"] == 29
    assert ref.call("STATS", {"stocks": [-1]})["status"] == 29
    assert ref.call("STATS", {"x": []})["status"] == 29
    assert ref.call("STATS", {}) == {"status": 0, "stocks": [], "merchants": []}
    assert ref.call("REDEEM_POINTS", {"redemptions": [{"coupon": 1}]})["results"][0][
        "status"] == 29
    with pytest.raises(BadBody):
        ref.call("REDEEM_POINTS", {"redemption": []})


def test_redeem_points_runs_the_checks_of_issue_before_the_balance():
    ref = world([{"id": 20, "kind": "points", "rate": 100,
                  "offers": [{"stock": 60, "price": 10}, {"stock": 63, "price": 10},
                             {"stock": 64, "price": 10}]}],
                [{**VOUCHER, "max_issued": 1}, stock(63, valid_until=T0 + 1000),
                 stock(64, per_user_limit=1)])
    pay(ref, 1, ALICE, BAKERY, 1000)                       # 1,000 points
    redeem = lambda c, sid, user=ALICE: ref.call(  # noqa: E731
        "REDEEM_POINTS", {"redemptions": [{"coupon": c, "user": user, "program": 20,
                                           "stock": sid}]})["results"][0]
    assert redeem(1, 60)["status"] == 0 and card(ref, ALICE, 20) == (990, 0)
    assert redeem(2, 60)["error"] == "stock_exhausted"
    assert redeem(2, 64, user=9)["error"] == "user_not_found"
    assert redeem(2, 64, user=BOB)["error"] == "insufficient_points"   # checks of ISSUE first
    assert redeem(2, 64)["status"] == 0
    assert redeem(3, 64)["error"] == "per_user_limit"
    ref.clock.now_ms += 1000
    assert redeem(3, 63)["error"] == "stock_ended"
    assert card(ref, ALICE, 20) == (980, 0)
    audited(ref)


def test_a_reward_locked_by_an_authorization_counts_as_used():
    """Choice: a reward held by an open authorization cannot be expired away
    (the capture would still use it), so the full refund puts the card at -1."""
    ref = world([coffee_card(stamps=1, threshold=1500)], [FREE_COFFEE])
    pay(ref, 1, ALICE, COFFEE_SHOP, 2000)                  # reward 2**63 + 1
    pay(ref, 2, ALICE, COFFEE_SHOP, 1000, flags=4)         # locks it (below the threshold)
    assert coupon(ref, REWARD_BASE + 1)["state"] == "locked"
    refund(ref, 1, 1, 2000)
    assert card(ref, ALICE, 10) == (0, -1)
    assert coupon(ref, REWARD_BASE + 1)["expires_at"] == T0 + YEAR
    audited(ref)


def test_refunding_the_payment_that_used_the_reward_counts_the_reward_as_used():
    """Choice: "already used" is judged as the refund finds the reward, before
    the refund returns the payment's own coupons."""
    ref = world([coffee_card(stamps=1, threshold=0)], [{**FREE_COFFEE, "per_user_limit": 1}])
    pay(ref, 1, ALICE, COFFEE_SHOP, 2000)                  # reward 2**63 + 1, card 0
    pay(ref, 2, ALICE, COFFEE_SHOP, 2000)                  # uses it; the card fills, but
    assert card(ref, ALICE, 10) == (0, 1)                  # per_user_limit: no new reward
    pay(ref, 3, ALICE, COFFEE_SHOP, 2000)                  # the card stays full
    ref.call("REVERSE", {"payments": [3]})                 # one stamp off: card 0 again,
    assert card(ref, ALICE, 10) == (0, 0)                  # with the reward of its cycle
    ref.call("REVERSE", {"payments": [2]})                 # the reward was used (by 2)
    assert card(ref, ALICE, 10) == (0, -1)
    reward = coupon(ref, REWARD_BASE + 1)                  # returned by the refund, usable
    assert reward["state"] == "available" and reward["expires_at"] == T0 + YEAR
    audited(ref)
