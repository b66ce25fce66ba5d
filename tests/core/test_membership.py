"""Membership and marketing as worked examples: points, stamp cards,
redemptions, clawback, and the campaign statistics.

Every test runs twice, as frozenlist's tests do: on the Engine and on the
plain-Python reference (the `ledger_impl` fixture, tests/support/ledgers.py),
with the same assertions."""
import numpy as np
import pytest

from engine.client import pay_record
from engine.protocol.records import PAY_RECORD
from engine.protocol.status import Status

REWARD_BASE = 2**63


@pytest.fixture
def eng(ledger_impl, clock):
    engine = ledger_impl(clock=clock)
    engine.call("MERCHANTS", {"merchants": [{"id": 1, "fee_bps": 0, "tags": [5]},
                                            {"id": 2, "fee_bps": 0}]})
    engine.call("WALLETS", {"users": [1, 2]})
    engine.call("TOPUP", {"topups": [{"id": 1, "user": 1, "amount": 10**7},
                                     {"id": 2, "user": 2, "amount": 10**7}]})
    engine.call("STOCKS", {"stocks": [
        {"id": 90, "funder": "merchant", "merchant": 1, "kind": "fixed", "value": 2500,
         "valid_from": 0, "valid_until": 2**62, "stacking": "exclusive"},    # a free coffee
        {"id": 91, "funder": "platform", "kind": "fixed", "value": 1000, "valid_from": 0,
         "valid_until": 2**62, "stacking": "stackable"}]})
    return engine


def pay(eng, pid, amount, user=1, merchant=1, coupons=(), flags=1):
    record = pay_record(pid, user, merchant, amount, 0 if coupons else flags, coupons=coupons)
    return eng.pay(np.array([record], PAY_RECORD))[0]


def membership(eng, user, program):
    return eng.call("BALANCES", {"memberships": [{"user": user, "program": program}]})[
        "memberships"][0]


def one(reply):
    (item,) = reply["results"]
    return item


def test_ninth_coffee_issues_the_tenth_free(eng):
    card = {"id": 7, "kind": "stamps", "merchants": [1], "threshold": 1500, "stamps": 9,
            "reward_stock": 90}
    assert one(eng.call("PROGRAMS", {"programs": [card]}))["status"] == 0
    assert one(eng.call("PROGRAMS", {"programs": [card]}))["duplicate"] is True
    pay(eng, 100, 1000)                                  # below the threshold: no stamp
    for i in range(8):
        pay(eng, i + 1, 2500)
    assert membership(eng, 1, 7)["stamps"] == 8
    assert eng.call("COUPONS", {"user": 1})["results"] == []
    pay(eng, 9, 2500)                                    # the ninth coffee
    (reward,) = eng.call("COUPONS", {"user": 1})["results"]
    assert reward["id"] == REWARD_BASE + 1 and reward["stock"] == 90
    assert membership(eng, 1, 7)["stamps"] == 0          # the card starts again
    tenth = pay(eng, 10, 2500, coupons=[REWARD_BASE + 1])
    assert (tenth["status"], tenth["cash"]) == (0, 0)    # the tenth is free


def test_points_clawed_back_by_a_partial_refund(eng):
    eng.call("PROGRAMS", {"programs": [{"id": 3, "kind": "points", "tags": [5], "rate": 10,
                                        "offers": [{"stock": 91, "price": 500}]}]})
    pay(eng, 1, 10_000)                                  # 100.00 cash: 1000 points
    pay(eng, 2, 10_000, merchant=2)                      # not covered: no points
    assert membership(eng, 1, 3)["points"] == 1000
    eng.call("REFUND", {"refunds": [{"id": 1, "payment": 1, "amount": 3333}]})
    assert membership(eng, 1, 3)["points"] == 1000 - 3333 * 1000 // 10_000
    eng.call("REFUND", {"refunds": [{"id": 2, "payment": 1, "amount": 6667}]})
    assert membership(eng, 1, 3)["points"] == 0          # the whole share, exactly
    stats = eng.call("STATS", {"merchants": [1, 2]})["merchants"]
    assert [m["points_issued"] for m in stats] == [1000, 0]


def test_redeem_points_into_a_coupon(eng):
    eng.call("PROGRAMS", {"programs": [{"id": 3, "kind": "points", "rate": 100,
                                        "offers": [{"stock": 91, "price": 500}]}]})
    redeem = {"coupon": 55, "user": 1, "program": 3, "stock": 91}
    before = eng.digest()
    assert one(eng.call("REDEEM_POINTS", {"redemptions": [redeem]}))["status"] == 31
    assert eng.digest() == before                        # insufficient points: nothing changed
    pay(eng, 1, 600)                                     # 600 points
    done = one(eng.call("REDEEM_POINTS", {"redemptions": [redeem]}))
    assert (done["status"], done["points"]) == (0, 100)
    again = one(eng.call("REDEEM_POINTS", {"redemptions": [redeem]}))
    assert again["duplicate"] is True and again["expires_at"] == done["expires_at"]
    other = one(eng.call("REDEEM_POINTS", {"redemptions": [{**redeem, "stock": 90}]}))
    assert other["status"] == Status.exists_with_different_fields
    fresh = {"coupon": 56, "user": 1, "program": 3, "stock": 90}
    assert one(eng.call("REDEEM_POINTS", {"redemptions": [fresh]}))["status"] == 32
    unknown = {"coupon": 57, "user": 1, "program": 4, "stock": 91}
    assert one(eng.call("REDEEM_POINTS", {"redemptions": [unknown]}))["status"] == 30
    assert eng.call("COUPONS", {"ids": [55]})["results"][0]["state"] == "available"


def test_full_refund_takes_the_stamp_back(eng):
    eng.call("PROGRAMS", {"programs": [{"id": 7, "kind": "stamps", "stamps": 2,
                                        "reward_stock": 90}]})
    pay(eng, 1, 100)
    pay(eng, 2, 100)                                     # reward 2**63 + 1 issued
    eng.call("REFUND", {"refunds": [{"id": 1, "payment": 2, "amount": 100}]})
    # The reward was unused: it expires, and the card goes back to one stamp.
    assert membership(eng, 1, 7)["stamps"] == 1
    assert eng.call("COUPONS", {"ids": [REWARD_BASE + 1]})["results"][0]["state"] == "expired"
    pay(eng, 3, 100)                                     # reward 2**63 + 2
    pay(eng, 4, 2500, coupons=[REWARD_BASE + 2])         # used at once (and stamped: 1)
    eng.call("REFUND", {"refunds": [{"id": 2, "payment": 3, "amount": 100}]})
    assert membership(eng, 1, 7)["stamps"] == 0          # took the stamp of payment 4
    eng.call("REFUND", {"refunds": [{"id": 3, "payment": 1, "amount": 100}]})
    assert membership(eng, 1, 7)["stamps"] == -1         # the used reward's stamp: a debt
    eng.call("REFUND", {"refunds": [{"id": 4, "payment": 1, "amount": 1}]})  # nothing left


def test_stats_new_and_returning_payers_and_repeat_share(eng):
    pay(eng, 1, 1000, user=1)
    pay(eng, 2, 1000, user=1)
    pay(eng, 3, 1000, user=2)
    eng.call("STOCKS", {"stocks": [{"id": 92, "funder": "platform", "kind": "fixed",
                                    "value": 100, "valid_from": 0, "valid_until": 2**62,
                                    "stacking": "stackable"}]})
    records = np.zeros(2, [("coupon", "<u8"), ("stock", "<u8"), ("user", "<u8"),
                           ("reserved", "<u8")])
    records[0], records[1] = (500, 92, 1, 0), (501, 92, 2, 0)
    eng.issue(records.view(np.uint8).tobytes())
    pay(eng, 4, 1000, user=1, coupons=[500])             # returning payer
    pay(eng, 5, 1000, user=2, merchant=2, coupons=[501])  # new to merchant 2
    (merchant,) = eng.call("STATS", {"merchants": [1]})["merchants"]
    assert merchant["payments"] == 4 and merchant["gmv"] == 4000
    assert (merchant["unique_payers"], merchant["repeat_payers"]) == (2, 1)
    assert merchant["repeat_payer_share_bps"] == 5000
    assert merchant["coupon_payment_share_bps"] == 2500
    (stock,) = eng.call("STATS", {"stocks": [92]})["stocks"]
    assert (stock["issued"], stock["redeemed"], stock["redemption_rate_bps"]) == (2, 2, 10000)
    assert (stock["payers_new"], stock["payers_returning"]) == (1, 1)
    assert stock["gmv"] == 2000 and stock["budget_left"] == -1


def test_malformed_programs_are_refused(eng):
    bad = [{"id": 1, "kind": "points"},                              # no rate
           {"id": 2, "kind": "points", "rate": 5, "stamps": 3},      # a stamps field
           {"id": 3, "kind": "stamps", "stamps": 2, "reward_stock": 404},
           {"id": 0, "kind": "points", "rate": 1},
           {"id": 4, "kind": "cashback", "rate": 1}]
    results = eng.call("PROGRAMS", {"programs": bad})["results"]
    assert [r["status"] for r in results] == [29, 29, 18, 1, 29]
    assert eng.call("STATS", {"stocks": [404]})["stocks"][0]["status"] == Status.stock_not_found
