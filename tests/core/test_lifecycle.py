"""The money lifecycle as docs/reference/rules.md's worked examples, and its bad input.

Every test runs twice, as frozenlist's tests do: on the Engine and on the
plain-Python reference (the `ledger_impl` fixture, tests/support/ledgers.py),
with the same assertions."""
import numpy as np
import pytest

from engine.client import issue_record, pay_record
from engine.protocol.records import ISSUE_RECORD, PAY_RECORD
from engine.protocol.status import Status

T0 = 1_700_000_000_000
DAY_MS = 86_400_000


@pytest.fixture
def eng(ledger_impl, clock):
    engine = ledger_impl(clock=clock)
    engine.call("MERCHANTS", {"merchants": [{"id": 1, "fee_bps": 60, "tags": [7]},
                                            {"id": 2, "fee_bps": 100}]})
    engine.call("WALLETS", {"users": [1, 2]})
    engine.call("TOPUP", {"topups": [{"id": 1, "user": 1, "amount": 10**7},
                                     {"id": 2, "user": 2, "amount": 1000}]})
    return engine


def stock(sid, **fields):
    base = {"id": sid, "funder": "platform", "kind": "fixed", "value": 100,
            "valid_from": 0, "valid_until": 2**62, "stacking": "stackable"}
    base.update(fields)
    return base


def issue(eng, *triples):
    records = np.array([issue_record(*triple) for triple in triples], ISSUE_RECORD)
    assert (eng.issue(records)["status"] == 0).all()


def pay(eng, pid, amount, merchant=1, payer=1, flags=0, coupons=()):
    record = pay_record(pid, payer, merchant, amount, flags, coupons=coupons)
    return eng.pay(np.array([record], PAY_RECORD))[0]


def one(reply):
    (result,) = reply["results"]
    return result


def test_percent_coupon_with_cap(eng):
    eng.call("STOCKS", {"stocks": [stock(1, kind="percent", value=1000, cap=2000)]})
    issue(eng, (100, 1, 1))
    result = pay(eng, 1, 50_000)                # 10 % of 500.00 is 50.00, capped at 20.00
    assert (result["status"], result["discount"], result["cash"]) == (0, 2000, 48_000)
    assert result["fee"] == (50_000 * 60 + 5000) // 10000   # platform coupon: fee on the whole


def test_platform_and_merchant_coupons_stacked(eng):
    eng.call("STOCKS", {"stocks": [stock(1, value=500),
                                   stock(2, funder="merchant", merchant=1, value=300)]})
    issue(eng, (100, 1, 1), (200, 2, 1))
    result = pay(eng, 1, 10_000)
    assert list(result["coupons"][:2]) == [100, 200]
    assert (result["discount"], result["cash"]) == (800, 9200)
    assert result["fee"] == ((10_000 - 300) * 60 + 5000) // 10000  # merchant part not in base
    merchant = eng.call("BALANCES", {"merchants": [1]})["merchants"][0]["balance"]
    assert merchant == 10_000 - 300 - int(result["fee"])


def test_three_partial_refunds_sum_to_the_full_refund(eng):
    eng.call("STOCKS", {"stocks": [stock(1, value=333),
                                   stock(2, funder="merchant", merchant=1, value=101)]})
    issue(eng, (100, 1, 1), (200, 2, 1))
    paid = pay(eng, 1, 10_007)
    parts = [one(eng.call("REFUND", {"refunds": [{"id": i, "payment": 1, "amount": a}]}))
             for i, a in ((1, 3001), (2, 3003), (3, 4003))]
    assert all(p["status"] == 0 for p in parts)
    assert sum(p["cash"] for p in parts) == paid["cash"]
    assert sum(p["discount"] for p in parts) == paid["discount"]
    assert sum(p["fee"] for p in parts) == paid["fee"]
    view = eng.call("GET_PAYMENTS", {"ids": [1]})["results"][0]
    assert view["state"] == "refunded"
    coupons = eng.call("COUPONS", {"ids": [100, 200]})["results"]
    assert [c["state"] for c in coupons] == ["available", "available"]   # returned
    stocks = eng.call("BALANCES", {"stocks": [1, 2]})["stocks"]
    assert [s["spent"] for s in stocks] == [0, 0]
    assert eng.call("BALANCES", {"users": [1]})["users"][0]["balance"] == 10**7


def test_hotel_preauthorization_captured_lower_drops_a_coupon(eng):
    eng.call("STOCKS", {"stocks": [stock(1, value=20_000, min_spend=100_000),   # 200 off 1000
                                   stock(2, kind="percent", value=500)]})       # 5 % off
    issue(eng, (100, 1, 1), (200, 2, 1))
    auth = pay(eng, 1, 120_000, flags=4)
    assert auth["flags"] == 2 and list(auth["coupons"][:2]) == [100, 200]
    assert auth["cash"] == 120_000 - 20_000 - 6_000
    balances = eng.call("BALANCES", {"users": [1], "stocks": [1, 2]})
    assert balances["users"][0]["held"] == auth["cash"]
    assert [s["reserved"] for s in balances["stocks"]] == [20_000, 6_000]
    capture = one(eng.call("CAPTURE", {"captures": [{"payment": 1, "amount": 80_000}]}))
    # 800.00 < the 1000.00 minimum: the 200 coupon drops out; 5 % is recomputed.
    assert capture["status"] == 0 and capture["coupons"] == [200]
    assert (capture["discount"], capture["cash"]) == (4_000, 76_000)
    assert eng.call("COUPONS", {"ids": [100]})["results"][0]["state"] == "available"
    balances = eng.call("BALANCES", {"users": [1], "stocks": [1, 2]})
    assert balances["users"][0]["held"] == 0
    assert [(s["reserved"], s["spent"]) for s in balances["stocks"]] == [(0, 0), (0, 4_000)]
    again = one(eng.call("CAPTURE", {"captures": [{"payment": 1, "amount": 80_000}]}))
    assert again["duplicate"] is True and again["cash"] == 76_000
    other = one(eng.call("CAPTURE", {"captures": [{"payment": 1, "amount": 70_000}]}))
    assert other["status"] == Status.payment_not_authorized


def test_reversal_that_arrives_before_its_payment(eng):
    assert one(eng.call("REVERSE", {"payments": [55]}))["status"] == 0
    late = pay(eng, 55, 1000)
    assert late["status"] == Status.reversed
    assert eng.call("GET_PAYMENTS", {"ids": [55]})["results"][0]["status"] == Status.payment_not_found
    assert eng.counts()["payments"] == 0


def test_reverse_refunds_the_rest_and_voids_authorizations(eng):
    pay(eng, 1, 1000)
    eng.call("REFUND", {"refunds": [{"id": 1, "payment": 1, "amount": 400}]})
    rest = one(eng.call("REVERSE", {"payments": [1]}))
    assert rest["cash"] == 600
    assert one(eng.call("REVERSE", {"payments": [1]}))["cash"] == 0    # nothing left
    pay(eng, 2, 500, flags=4)
    voided = one(eng.call("REVERSE", {"payments": [2]}))
    assert voided["cash"] == 500
    assert eng.call("GET_PAYMENTS", {"ids": [2]})["results"][0]["state"] == "voided"


def test_hold_expiry_voids_and_capture_after_gets_authorization_expired(eng):
    clock = eng.clock
    pay(eng, 1, 500, flags=4)
    clock.now_ms += 7 * DAY_MS                  # exactly at the expiry: expired (half-open)
    assert eng.call("BALANCES", {"users": [1]})["users"][0]["held"] == 0
    assert eng.call("GET_PAYMENTS", {"ids": [1]})["results"][0]["state"] == "expired"
    capture = one(eng.call("CAPTURE", {"captures": [{"payment": 1, "amount": 500}]}))
    assert capture["status"] == Status.authorization_expired
    assert one(eng.call("VOID", {"payments": [1]}))["status"] == Status.authorization_expired
    assert one(eng.call("REVERSE", {"payments": [1]}))["status"] == 0


@pytest.mark.parametrize("op,request_map,status", [
    ("REFUND", {"refunds": [{"id": 9, "payment": 1, "amount": 1001}]}, Status.refund_exceeds_payment),
    ("REFUND", {"refunds": [{"id": 9, "payment": 2, "amount": 10}]}, Status.payment_not_refundable),
    ("REFUND", {"refunds": [{"id": 9, "payment": 404, "amount": 10}]}, Status.payment_not_found),
    ("REFUND", {"refunds": [{"id": 0, "payment": 1, "amount": 10}]}, Status.invalid_id),
    ("REFUND", {"refunds": [{"id": 9, "payment": 1, "amount": 0}]}, Status.invalid_amount),
    ("REFUND", {"refunds": [{"id": 9, "payment": 1}]}, Status.invalid_argument),
    ("CAPTURE", {"captures": [{"payment": 2, "amount": 501}]}, Status.invalid_amount),
    ("CAPTURE", {"captures": [{"payment": 2, "amount": 0}]}, Status.invalid_amount),
    ("CAPTURE", {"captures": [{"payment": 1, "amount": 10}]}, Status.payment_not_authorized),
    ("CAPTURE", {"captures": [{"payment": 0, "amount": 10}]}, Status.payment_not_found),
    ("VOID", {"payments": [1]}, Status.payment_not_authorized),
    ("VOID", {"payments": [404]}, Status.payment_not_found),
    ("VOID", {"payments": ["2"]}, Status.invalid_argument),
])
def test_bad_lifecycle_requests_change_nothing(eng, op, request_map, status):
    pay(eng, 1, 1000)
    pay(eng, 2, 500, flags=4)
    before = eng.digest()
    assert one(eng.call(op, request_map))["status"] == status
    assert eng.digest() == before


def test_capture_beyond_the_hold_needs_available_funds(eng):
    eng.call("STOCKS", {"stocks": [stock(1, value=900, min_spend=950)]})
    issue(eng, (100, 1, 2))
    auth = pay(eng, 1, 1000, payer=2, flags=4)           # holds 100 of user 2's 1000
    assert auth["cash"] == 100
    assert pay(eng, 2, 800, payer=2)["status"] == 0      # available: 1000 - 100 - 800
    before = eng.digest()
    capture = one(eng.call("CAPTURE", {"captures": [{"payment": 1, "amount": 940}]}))
    # Below min spend the coupon drops: cash 940 > hold 100 + available 100.
    assert capture["status"] == Status.insufficient_funds
    assert eng.digest() == before
    assert eng.call("GET_PAYMENTS", {"ids": [1]})["results"][0]["state"] == "authorized"


def test_refund_retries_replay_and_different_fields_conflict(eng):
    pay(eng, 1, 1000)
    first = one(eng.call("REFUND", {"refunds": [{"id": 5, "payment": 1, "amount": 100}]}))
    again = one(eng.call("REFUND", {"refunds": [{"id": 5, "payment": 1, "amount": 100}]}))
    assert again == {**first, "duplicate": True}
    other = one(eng.call("REFUND", {"refunds": [{"id": 5, "payment": 1, "amount": 101}]}))
    assert other["status"] == Status.exists_with_different_fields


def test_settlement_reconciles_with_the_ledger(eng):
    eng.call("STOCKS", {"stocks": [stock(1, value=500),
                                   stock(2, funder="merchant", merchant=1, value=200)]})
    issue(eng, (100, 1, 1), (200, 2, 1))
    pay(eng, 1, 10_000)
    pay(eng, 2, 3_000, merchant=2)
    eng.call("REFUND", {"refunds": [{"id": 1, "payment": 1, "amount": 2_500}]})
    before = eng.call("BALANCES", {"merchants": [1, 2]})["merchants"]
    settlement = eng.call("SETTLE", {})
    assert settlement["settlement"] == 1
    rows = {r["merchant"]: r for r in settlement["rows"]}
    for merchant in before:
        row = rows[merchant["id"]]
        assert row["net"] == merchant["balance"]          # first period: from zero
        assert row["payout"] == max(0, merchant["balance"])
        assert row["net"] == (row["gross"] - row["merchant_discount"] - row["fees"]
                              - row["refunds"])
    after = eng.call("BALANCES", {"merchants": [1, 2]})
    assert [m["balance"] for m in after["merchants"]] == [0, 0]
    assert eng.call("SETTLE", {})["rows"] == []           # nothing happened since
    assert eng.call("STATEMENT", {"settlement": 1}) == settlement


def test_capture_never_spends_more_than_the_authorization_reserved(eng):
    """A fixed coupon cut by the amount left at authorization reserved less
    than its d; at capture it must not grow past that reservation and take
    its stock over budget (docs/reference/rules.md, Two-phase payments)."""
    eng.call("STOCKS", {"stocks": [stock(1, value=100, min_spend=140),
                                   stock(2, value=100, budget=100)]})
    issue(eng, (1, 1, 1), (2, 2, 1), (3, 2, 1))
    auth = pay(eng, 1, 150, flags=4, coupons=(1, 2))
    assert auth["discount"] == 150                      # coupon 2 reserved only 50
    assert pay(eng, 2, 50, coupons=(3,))["discount"] == 50
    capture = one(eng.call("CAPTURE", {"captures": [{"payment": 1, "amount": 120}]}))
    assert capture["coupons"] == [2] and capture["discount"] == 50
    (s2,) = eng.call("BALANCES", {"stocks": [2]})["stocks"]
    assert (s2["spent"], s2["reserved"]) == (100, 0)
