"""docs/reference/rules.md's money-lifecycle examples, worked on MoneyReference alone
(tests/support/reference_money.py): readable checks that the reference says what the
rules say, independent of the engine."""
import numpy as np
import pytest

from engine.core import audit
from engine.client import issue_record, pay_record
from engine.protocol.records import CAPTURE_RECORD, ISSUE_RECORD, PAY_RECORD, REFUND_RECORD
from engine.protocol.status import Status

from support.reference_money import MoneyReference
from support.clock import Clock

T0 = 1_700_000_000_000
HOLD_MS = 10_000


@pytest.fixture
def ref():
    r = MoneyReference(clock=Clock(), hold_ms=HOLD_MS)
    r.call("MERCHANTS", {"merchants": [{"id": 1, "fee_bps": 60}, {"id": 2, "fee_bps": 100}]})
    r.call("WALLETS", {"users": [1, 2]})
    r.call("TOPUP", {"topups": [{"id": 1, "user": 1, "amount": 10**7},
                                {"id": 2, "user": 2, "amount": 1000}]})
    yield r
    report = audit.audit(r.canonical())
    assert report["ok"], {k: v for k, v in report["checks"].items() if not v["ok"]}


def stock(sid, **fields):
    return {"id": sid, "funder": "platform", "kind": "fixed", "value": 100,
            "valid_from": 0, "valid_until": 2**62, "stacking": "stackable", **fields}


def issue(ref, *triples):
    records = np.array([issue_record(*triple) for triple in triples], ISSUE_RECORD)
    assert (ref.issue(records)["status"] == 0).all()


def pay(ref, pid, amount, merchant=1, payer=1, flags=0, coupons=()):
    record = pay_record(pid, payer, merchant, amount, flags, coupons=coupons)
    return ref.pay(np.array([record], PAY_RECORD))[0]


def one(reply):
    (result,) = reply["results"]
    return result


def balances(ref, **ask):
    return ref.call("BALANCES", ask)


def test_percent_coupon_with_a_cap(ref):
    ref.call("STOCKS", {"stocks": [stock(1, kind="percent", value=1000, cap=2000)]})
    issue(ref, (100, 1, 1))
    result = pay(ref, 1, 50_000)                 # 10 % of 500.00 = 50.00, capped at 20.00
    assert (result["status"], result["discount"], result["cash"]) == (0, 2000, 48_000)
    assert result["fee"] == (50_000 * 60 + 5000) // 10000      # platform coupon: whole base
    assert balances(ref, stocks=[1])["stocks"][0]["campaign"] == -2000


def test_platform_and_merchant_coupons_stacked(ref):
    ref.call("STOCKS", {"stocks": [stock(1, value=500),
                                   stock(2, funder="merchant", merchant=1, value=300)]})
    issue(ref, (100, 1, 1), (200, 2, 1))
    result = pay(ref, 1, 10_000)
    assert list(result["coupons"][:2]) == [100, 200]
    assert (result["discount"], result["cash"]) == (800, 9200)
    fee = ((10_000 - 300) * 60 + 5000) // 10000                 # merchant part not in base
    assert result["fee"] == fee
    # merchant(1) gets cash + the platform part, less the fee: amount - 300 - fee.
    assert balances(ref, merchants=[1])["merchants"][0]["balance"] == 10_000 - 300 - fee


def test_three_partial_refunds_sum_to_the_full_refund(ref):
    ref.call("STOCKS", {"stocks": [stock(1, value=333),
                                   stock(2, funder="merchant", merchant=1, value=101)]})
    issue(ref, (100, 1, 1), (200, 2, 1))
    paid = pay(ref, 1, 10_007)
    parts = [one(ref.call("REFUND", {"refunds": [{"id": i, "payment": 1, "amount": a}]}))
             for i, a in ((1, 3001), (2, 3003), (3, 4003))]
    assert [p["status"] for p in parts] == [0, 0, 0]
    # cumulative floors: after R, cash floor(R * cash / T); the last part takes the rest
    cash, T = int(paid["cash"]), 10_007
    assert parts[0]["cash"] == 3001 * cash // T
    assert parts[1]["cash"] == 6004 * cash // T - 3001 * cash // T
    assert sum(p["cash"] for p in parts) == paid["cash"]
    assert sum(p["discount"] for p in parts) == paid["discount"]
    assert sum(p["fee"] for p in parts) == paid["fee"]
    view = one(ref.call("GET_PAYMENTS", {"ids": [1]}))
    assert view["state"] == "refunded"
    assert view["refunded"] == {"amount": T, "cash": cash, "discount": int(paid["discount"]),
                                "fee": int(paid["fee"])}
    coupons = ref.call("COUPONS", {"ids": [100, 200]})["results"]
    assert [(c["state"], c["payment"]) for c in coupons] == [("available", 0)] * 2
    assert [s["spent"] for s in balances(ref, stocks=[1, 2])["stocks"]] == [0, 0]
    assert balances(ref, users=[1])["users"][0]["balance"] == 10**7
    assert balances(ref, merchants=[1])["merchants"][0]["balance"] == 0
    assert balances(ref)["fees"] == 0


def test_hotel_preauthorization_captured_lower_drops_a_coupon(ref):
    ref.call("STOCKS", {"stocks": [stock(1, value=20_000, min_spend=100_000),  # 200 off 1000
                                   stock(2, kind="percent", value=500)]})      # 5 % off
    issue(ref, (100, 1, 1), (200, 2, 1))
    auth = pay(ref, 1, 120_000, flags=4)
    assert auth["flags"] == 2 and list(auth["coupons"][:2]) == [100, 200]
    assert (auth["discount"], auth["cash"]) == (26_000, 94_000)
    b = balances(ref, users=[1], stocks=[1, 2])
    assert (b["users"][0]["balance"], b["users"][0]["held"]) == (10**7, 94_000)
    assert [s["reserved"] for s in b["stocks"]] == [20_000, 6_000]
    assert [c["state"] for c in ref.call("COUPONS", {"user": 1})["results"]] == ["locked"] * 2
    capture = one(ref.call("CAPTURE", {"captures": [{"payment": 1, "amount": 80_000}]}))
    # 800.00 is below the 1000.00 minimum: coupon 100 drops out; 5 % is recomputed.
    assert (capture["status"], capture["coupons"]) == (0, [200])
    assert (capture["discount"], capture["cash"]) == (4_000, 76_000)
    assert capture["fee"] == (80_000 * 60 + 5000) // 10000
    coupons = ref.call("COUPONS", {"ids": [100, 200]})["results"]
    assert [(c["state"], c["payment"]) for c in coupons] == [("available", 0), ("used", 1)]
    b = balances(ref, users=[1], stocks=[1, 2])
    assert (b["users"][0]["balance"], b["users"][0]["held"]) == (10**7 - 76_000, 0)
    assert [(s["reserved"], s["spent"]) for s in b["stocks"]] == [(0, 0), (0, 4_000)]
    view = one(ref.call("GET_PAYMENTS", {"ids": [1]}))
    assert (view["amount"], view["authorized_amount"], view["state"]) == (80_000, 120_000,
                                                                          "completed")
    assert [c["released"] for c in view["coupons"]] == [True, False]
    # Capture retries: the same amount replays; another amount is refused.
    again = one(ref.call("CAPTURE", {"captures": [{"payment": 1, "amount": 80_000}]}))
    assert again == {**capture, "flags": 1, "duplicate": True}
    other = one(ref.call("CAPTURE", {"captures": [{"payment": 1, "amount": 70_000}]}))
    assert other["status"] == Status.payment_not_authorized


def test_capture_records_and_refund_records(ref):
    pay(ref, 1, 1000, flags=4)
    records = np.zeros(2, CAPTURE_RECORD)
    records[0], records[1] = (1, 600), (1, 600)
    out = ref.capture(records)
    assert list(out["status"]) == [0, 0] and list(out["flags"]) == [0, 1]
    assert out[0]["cash"] == 600
    refunds = np.zeros(3, REFUND_RECORD)
    refunds[0], refunds[1], refunds[2] = (7, 1, 100, 0), (7, 1, 100, 0), (8, 1, 100, 5)
    out = ref.refund(refunds)
    assert list(out["status"]) == [0, 0, Status.invalid_flags]
    assert list(out["flags"]) == [0, 1, 0] and list(out["cash"]) == [100, 100, 0]


def test_reversal_that_arrives_before_its_payment(ref):
    reply = one(ref.call("REVERSE", {"payments": [55]}))
    assert (reply["status"], reply["cash"], reply["flags"]) == (0, 0, 0)
    before = ref.digest()
    assert one(ref.call("REVERSE", {"payments": [55]}))["status"] == 0      # idempotent
    late = pay(ref, 55, 1000)
    assert late["status"] == Status.reversed
    assert one(ref.call("GET_PAYMENTS", {"ids": [55]}))["status"] == Status.payment_not_found
    assert one(ref.call("CAPTURE", {"captures": [{"payment": 55, "amount": 1}]}))["status"] \
        == Status.payment_not_found
    assert ref.canonical()["payments"].size == 0
    assert list(ref.canonical()["tombstones"]["id"]) == [55]
    assert ref.digest() == before     # the repeat and the refused PAY changed nothing


def test_reverse_refunds_the_rest_and_voids_an_authorization(ref):
    pay(ref, 1, 1000)
    ref.call("REFUND", {"refunds": [{"id": 1, "payment": 1, "amount": 400}]})
    rest = one(ref.call("REVERSE", {"payments": [1]}))
    assert (rest["cash"], rest["fee"]) == (600, 6 - 2)          # fee 6: 400 took floor 2
    assert one(ref.call("REVERSE", {"payments": [1]}))["cash"] == 0
    assert ref.canonical()["refunds"].size == 1                  # a reversal is no REFUND row
    pay(ref, 2, 500, flags=4)
    voided = one(ref.call("REVERSE", {"payments": [2]}))
    assert (voided["cash"], voided["fee"]) == (500, 0)
    assert one(ref.call("GET_PAYMENTS", {"ids": [2]}))["state"] == "voided"
    assert one(ref.call("VOID", {"payments": [2]}))["duplicate"] is True
    assert balances(ref, users=[1])["users"][0]["held"] == 0


def test_void_retries(ref):
    auth = pay(ref, 1, 700, flags=4)
    first = one(ref.call("VOID", {"payments": [1]}))
    assert (first["status"], first["cash"], first["fee"]) == (0, int(auth["cash"]), 0)
    ref._clock.now_ms += 5
    again = one(ref.call("VOID", {"payments": [1]}))
    assert again == {**first, "flags": 1, "duplicate": True}    # the original time
    assert one(ref.call("CAPTURE", {"captures": [{"payment": 1, "amount": 700}]}))["status"] \
        == Status.payment_not_authorized
    assert pay(ref, 1, 700, flags=4)["flags"] == 2 | 1          # PAY replays the original


def test_expiry_at_exactly_hold_expires_at(ref):
    ref.call("STOCKS", {"stocks": [stock(1, value=50)]})
    issue(ref, (100, 1, 1))
    auth = pay(ref, 1, 500, flags=4)
    ref._clock.now_ms += HOLD_MS - 1              # one ms before: still held
    assert balances(ref, users=[1])["users"][0]["held"] == int(auth["cash"])
    assert ref.canonical()["meta"]["now"][0] == T0         # a plain read keeps no stamp
    ref._clock.now_ms += 1                        # exactly at hold_expires_at: expired
    assert balances(ref, users=[1])["users"][0]["held"] == 0
    assert ref.canonical()["meta"]["now"][0] == T0 + HOLD_MS   # the read ran an EXPIRE
    view = one(ref.call("GET_PAYMENTS", {"ids": [1]}))
    assert (view["state"], view["hold_expires_at"]) == ("expired", T0 + HOLD_MS)
    assert ref.canonical()["payments"]["ended_at"][0] == T0 + HOLD_MS
    assert ref.call("COUPONS", {"ids": [100]})["results"][0]["state"] == "available"
    assert balances(ref, stocks=[1])["stocks"][0]["reserved"] == 0
    assert one(ref.call("CAPTURE", {"captures": [{"payment": 1, "amount": 500}]}))["status"] \
        == Status.authorization_expired
    assert one(ref.call("VOID", {"payments": [1]}))["status"] == Status.authorization_expired
    assert one(ref.call("REVERSE", {"payments": [1]}))["cash"] == 0


def test_capture_beyond_the_hold_needs_available_funds(ref):
    ref.call("STOCKS", {"stocks": [stock(1, value=900, min_spend=950)]})
    issue(ref, (100, 1, 2))
    assert pay(ref, 1, 1000, payer=2, flags=4)["cash"] == 100   # holds 100 of 1000
    assert pay(ref, 2, 800, payer=2)["status"] == 0             # available now 100
    before = ref.digest()
    capture = one(ref.call("CAPTURE", {"captures": [{"payment": 1, "amount": 940}]}))
    assert capture["status"] == Status.insufficient_funds      # 940 > 100 + 100
    assert ref.digest() == before


def test_settlement_and_statement(ref):
    ref.call("STOCKS", {"stocks": [stock(1, value=500),
                                   stock(2, funder="merchant", merchant=1, value=200)]})
    issue(ref, (100, 1, 1), (200, 2, 1))
    pay(ref, 1, 10_000)
    pay(ref, 2, 3_000, merchant=2)
    ref.call("REFUND", {"refunds": [{"id": 1, "payment": 1, "amount": 2_500}]})
    before = balances(ref, merchants=[1, 2])["merchants"]
    settlement = ref.call("SETTLE", {})
    assert (settlement["settlement"], settlement["at"]) == (1, T0)
    rows = {r["merchant"]: r for r in settlement["rows"]}
    for merchant in before:
        row = rows[merchant["id"]]
        assert row["net"] == merchant["balance"] == row["payout"]
        assert row["refunds"] == (row["refund_cash"] + row["refund_platform_discount"]
                                  - row["refund_fee"])
    assert [m["balance"] for m in balances(ref, merchants=[1, 2])["merchants"]] == [0, 0]
    assert ref.call("SETTLE", {})["rows"] == []                 # no activity: no rows
    assert ref.call("STATEMENT", {"settlement": 1}) == settlement
    assert ref.call("STATEMENT", {"settlement": 3})["status"] == Status.invalid_argument
    # A refund after the payout takes the merchant below zero: no payout.
    ref.call("REFUND", {"refunds": [{"id": 2, "payment": 1, "amount": 1000}]})
    third = ref.call("SETTLE", {})
    (row,) = third["rows"]
    assert row["net"] < 0 and row["payout"] == 0
    assert ref.canonical()["meta"]["settlements"][0] == 3


@pytest.mark.parametrize("op,request_map,status", [
    ("REFUND", {"refunds": [{"id": 9, "payment": 1, "amount": 1001}]},
     Status.refund_exceeds_payment),
    ("REFUND", {"refunds": [{"id": 9, "payment": 2, "amount": 10}]},
     Status.payment_not_refundable),
    ("REFUND", {"refunds": [{"id": 9, "payment": 404, "amount": 10}]}, Status.payment_not_found),
    ("REFUND", {"refunds": [{"id": 0, "payment": 1, "amount": 10}]}, Status.invalid_id),
    ("REFUND", {"refunds": [{"id": 9, "payment": 1, "amount": 0}]}, Status.invalid_amount),
    ("REFUND", {"refunds": [{"id": 9, "payment": 1}]}, Status.invalid_argument),
    ("CAPTURE", {"captures": [{"payment": 2, "amount": 501}]}, Status.invalid_amount),
    ("CAPTURE", {"captures": [{"payment": 2, "amount": 0}]}, Status.invalid_amount),
    ("CAPTURE", {"captures": [{"payment": 1, "amount": 10}]}, Status.payment_not_authorized),
    ("CAPTURE", {"captures": [{"payment": 0, "amount": 10}]}, Status.payment_not_found),
    ("CAPTURE", {"captures": [{"payment": 2, "amount": "5"}]}, Status.invalid_argument),
    ("VOID", {"payments": [1]}, Status.payment_not_authorized),
    ("VOID", {"payments": [404]}, Status.payment_not_found),
    ("VOID", {"payments": ["2"]}, Status.invalid_argument),
    ("REVERSE", {"payments": [0]}, Status.invalid_id),
    ("REVERSE", {"payments": [-1]}, Status.invalid_argument),
])
def test_bad_lifecycle_requests_change_nothing(ref, op, request_map, status):
    pay(ref, 1, 1000)
    pay(ref, 2, 500, flags=4)
    before = ref.canonical()
    assert one(ref.call(op, request_map))["status"] == status
    after = ref.canonical()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_refund_retries_replay_and_different_fields_conflict(ref):
    pay(ref, 1, 1000)
    first = one(ref.call("REFUND", {"refunds": [{"id": 5, "payment": 1, "amount": 100}]}))
    again = one(ref.call("REFUND", {"refunds": [{"id": 5, "payment": 1, "amount": 100}]}))
    assert again == {**first, "duplicate": True}
    other = one(ref.call("REFUND", {"refunds": [{"id": 5, "payment": 1, "amount": 101}]}))
    assert other["status"] == Status.exists_with_different_fields
