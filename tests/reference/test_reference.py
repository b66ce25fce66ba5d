"""Worked examples of docs/reference/rules.md on the plain-Python reference alone.

Each test is a small story with numbers worked out by hand, so that a failure
says which rule the reference (and, through the differential tests, the
engine) gets wrong.
"""
import numpy as np
import pytest

from engine.protocol.errors import BadBody, UnknownOp
from engine.client import pay_record
from engine.protocol.records import ISSUE_RECORD, PAY_RECORD
from engine.protocol.status import Status

from support.reference import Reference
from support.clock import Clock

T0 = 1_700_000_000_000          # Tue 2023-11-14 22:13:20 UTC = Wed 06:13 at UTC+8
DAY = 86_400_000
FAR = T0 + 365 * DAY


def codes(*values):
    it = iter(values)
    return lambda: next(it)


def make(**kw):
    clock = Clock()
    ref = Reference(clock=clock, code_source=kw.pop("code_source", codes(*range(
        10**17, 10**17 + 100))))
    ref.clock = clock
    return ref


def world(fee_bps=0, balance=100_000, users=(1, 2)):
    """Merchant 1 (tag 7), merchant 2; wallets for `users` topped up."""
    ref = make()
    ok(ref.call("MERCHANTS", {"merchants": [{"id": 1, "fee_bps": fee_bps, "tags": [7]},
                                            {"id": 2}]}))
    ok(ref.call("WALLETS", {"users": list(users)}))
    if balance:
        ok(ref.call("TOPUP", {"topups": [{"id": u, "user": u, "amount": balance}
                                         for u in users]}))
    return ref


def ok(reply):
    assert all(r["status"] == 0 for r in reply["results"]), reply
    return reply


def stock(sid, **fields):
    item = {"id": sid, "funder": "platform", "kind": "fixed", "value": 100,
            "valid_from": T0 - DAY, "valid_until": FAR, "stacking": "stackable"}
    item.update(fields)
    return item


def add_stocks(ref, *items):
    return ok(ref.call("STOCKS", {"stocks": list(items)}))


def issue(ref, *triples, reserved=0):
    recs = np.zeros(len(triples), ISSUE_RECORD)
    for i, (c, s, u) in enumerate(triples):
        recs[i] = (c, s, u, reserved)
    return ref.issue(recs)


def pay(ref, pid=1, payer=1, merchant=1, amount=1000, flags=0, goods_tag=0, coupons=(),
        user_data=0):
    record = pay_record(pid, payer, merchant, amount, flags, goods_tag, coupons, user_data)
    return ref.pay(np.array([record], PAY_RECORD))[0]


def coupons_of(result):
    return [int(c) for c in result["coupons"] if c]


# ---------------------------------------------------------------------------
# Discounts and selection (Paying steps 4-5)
# ---------------------------------------------------------------------------

def test_percent_coupon_with_cap():
    ref = world()
    add_stocks(ref, stock(1, kind="percent", value=1000, cap=300),    # 10 % up to 3.00
               stock(2, kind="percent", value=1000))                  # 10 %, no cap
    issue(ref, (1, 1, 1), (2, 2, 2))
    r = pay(ref, pid=1, payer=1, amount=5000)
    assert (r["status"], r["discount"], r["cash"]) == (0, 300, 4700)
    r = pay(ref, pid=2, payer=2, amount=5005)                          # 500.5 -> 500
    assert (r["status"], r["discount"], r["cash"]) == (0, 500, 4505)


def test_stackables_beat_an_exclusive_only_with_a_larger_total():
    ref = world()
    add_stocks(ref, stock(1, value=500, stacking="exclusive"),
               stock(2, value=300), stock(3, value=300))
    issue(ref, (1, 1, 1), (2, 2, 1), (3, 3, 1))
    r = pay(ref, amount=5000)
    assert coupons_of(r) == [2, 3] and r["discount"] == 600           # 600 > 500


def test_exclusive_wins_a_tie_by_using_fewer_coupons():
    ref = world()
    add_stocks(ref, stock(1, value=500, stacking="exclusive"),
               stock(2, value=300), stock(3, value=200))
    issue(ref, (1, 1, 1), (2, 2, 1), (3, 3, 1))
    r = pay(ref, amount=5000)
    assert coupons_of(r) == [1] and r["discount"] == 500               # 500 = 300 + 200


def test_stackables_stop_at_the_smallest_count_reaching_the_amount():
    ref = world()
    add_stocks(ref, stock(1, value=400), stock(2, value=300), stock(3, value=200))
    issue(ref, (1, 1, 1), (2, 2, 1), (3, 3, 1))
    r = pay(ref, amount=500)
    # 400 + 300 >= 500: k = 2; applied 400 then min(300, 100) = 100; cash 0.
    assert coupons_of(r) == [1, 2] and r["discount"] == 500 and r["cash"] == 0
    assert ref.payments[1].applied == [400, 100]


def test_one_coupon_per_stock_and_rank_tie_breaks():
    ref = world()
    add_stocks(ref, stock(1, value=300, validity_ms=DAY),              # shorter life
               stock(2, value=300, stacking="exclusive"))
    issue(ref, (5, 1, 1), (4, 1, 1))                                   # same stock, same d
    ref.clock.now_ms += 1
    issue(ref, (3, 2, 1))
    r = pay(ref, amount=300)
    # Stock 1's best is coupon 4 (same expires_at as 5, lower id). Exclusive 3 and
    # stackable 4 both give 300 with one coupon: the first ranks first. Coupon 4
    # expires first (T0 + DAY < FAR), so it ranks first.
    assert coupons_of(r) == [4]


def test_equal_d_ranks_by_expiry_then_id():
    ref = world()
    add_stocks(ref, stock(1, value=300, stacking="exclusive", valid_until=FAR),
               stock(2, value=300, stacking="exclusive", valid_until=FAR - 1))
    issue(ref, (1, 1, 1), (2, 2, 1))
    assert coupons_of(pay(ref, amount=1000)) == [2]                    # expires earlier


# ---------------------------------------------------------------------------
# Explicit coupons (Paying step 5)
# ---------------------------------------------------------------------------

def explicit_world():
    ref = world()
    add_stocks(ref,
               stock(1, value=100),
               stock(2, value=100, min_spend=5000),
               stock(3, value=100, validity_ms=1000),
               stock(4, value=100, budget=150),
               stock(5, value=100, stacking="exclusive"),
               stock(6, value=100))
    issue(ref, (1, 1, 1), (2, 2, 1), (3, 3, 1), (4, 4, 1), (5, 5, 1), (6, 6, 2),
          (7, 1, 1), (8, 4, 2), (9, 6, 1))
    ref.clock.now_ms += 1000                                                 # coupon 3 expires
    # Use coupon 8 (stock 4, 100 of its budget 150 spent: 50 left).
    assert pay(ref, pid=90, payer=2, coupons=[8])["status"] == 0
    assert pay(ref, pid=91, payer=1, coupons=[9])["status"] == 0       # 9 is used now
    return ref


@pytest.mark.parametrize("named,status", [
    ([77], Status.coupon_not_found),
    ([6], Status.coupon_not_owned),
    ([9], Status.coupon_not_available),
    ([3], Status.coupon_expired),
    ([2], Status.coupon_not_applicable),                  # min spend 5000 > 1000
    ([4], Status.coupon_budget_exhausted),                # 50 left < d 100
    ([1, 7], Status.coupons_not_stackable),               # same stock twice
    ([1, 1], Status.coupons_not_stackable),               # the same coupon twice
    ([1, 5], Status.coupons_not_stackable),               # exclusive with another
    ([5, 1], Status.coupons_not_stackable),
    ([1, 77], Status.coupon_not_found),                   # first failing coupon decides
    ([6, 3], Status.coupon_not_owned),
])
def test_explicit_coupon_errors(named, status):
    ref = explicit_world()
    before = ref.digest()
    r = pay(ref, pid=5, amount=1000, coupons=named)
    assert r["status"] == status
    assert r["cash"] == r["discount"] == r["fee"] == 0 and coupons_of(r) == []
    assert ref.digest() == before                                       # nothing changed


def test_explicit_coupons_apply_in_the_order_given_even_at_zero():
    ref = world()
    add_stocks(ref, stock(1, value=300), stock(2, value=500), stock(3, kind="percent", value=1))
    issue(ref, (1, 1, 1), (2, 2, 1), (3, 3, 1))
    r = pay(ref, amount=600, coupons=[1, 2, 3])
    # 300, then min(500, 300) = 300, then percent 1 bp of 600 = 0 -> applies 0, used.
    assert r["status"] == 0 and coupons_of(r) == [1, 2, 3] and r["cash"] == 0
    assert ref.payments[1].applied == [300, 300, 0]
    assert ref.call("COUPONS", {"ids": [3]})["results"][0]["state"] == "used"


def test_gap_in_coupon_slots_is_explicit_mode():
    ref = world()
    add_stocks(ref, stock(1, value=300), stock(2, value=500))
    issue(ref, (1, 1, 1), (2, 2, 1))
    rec = np.zeros(1, PAY_RECORD)
    rec[0] = (1, 1, 1, 1000, 0, 0, [0, 0, 1, 0], 0)
    r = ref.pay(rec)[0]
    assert coupons_of(r) == [1] and r["discount"] == 300                 # not auto (500)


def test_no_coupon_flag():
    ref = world()
    add_stocks(ref, stock(1, value=300))
    issue(ref, (1, 1, 1))
    assert pay(ref, pid=1, flags=1)["discount"] == 0
    assert pay(ref, pid=2, flags=1, coupons=[1])["status"] == Status.invalid_flags


# ---------------------------------------------------------------------------
# Idempotency and failures (Paying steps 1-2, 6)
# ---------------------------------------------------------------------------

def test_replay_is_byte_for_byte_with_the_duplicate_flag():
    ref = world(fee_bps=60)
    add_stocks(ref, stock(1, value=300))
    issue(ref, (1, 1, 1))
    first = pay(ref, pid=1, amount=1000, user_data=42)
    ref.clock.now_ms += DAY                                                  # whatever the state
    ok(ref.call("MERCHANTS", {"merchants": [{"id": 1, "active": False}]}))
    again = pay(ref, pid=1, amount=1000, user_data=42)
    assert again["flags"] == 1 and first["flags"] == 0
    expected = first.copy()
    expected["flags"] = 1
    assert again.tobytes() == expected.tobytes()                        # original timestamp too
    assert again["timestamp"] == T0
    assert len(ref.payments) == 1 and ref.wallets[1].balance == 100_000 - 700


def test_same_id_with_other_fields_is_refused():
    ref = world()
    assert pay(ref, pid=1, amount=1000)["status"] == 0
    for kw in ({"amount": 999}, {"user_data": 1}, {"goods_tag": 3}, {"merchant": 2},
               {"flags": 1}, {"payer": 2}):
        r = pay(ref, pid=1, **{"amount": 1000, **kw})
        assert r["status"] == Status.exists_with_different_fields, kw
    assert ref.wallets[1].balance == 99_000


def test_step_1_checks_come_before_idempotency():
    ref = world()
    assert pay(ref, pid=1)["status"] == 0
    assert pay(ref, pid=1, amount=0)["status"] == Status.invalid_amount
    assert pay(ref, pid=0)["status"] == Status.invalid_id
    assert pay(ref, pid=2, amount=10**14 + 1)["status"] == Status.invalid_amount
    assert pay(ref, pid=2, flags=8)["status"] == Status.invalid_flags
    # Flag 4 (authorize) is refused for now (AUTHORIZE is later work).
    assert pay(ref, pid=2, flags=4)["status"] == Status.invalid_flags


def test_insufficient_funds_changes_nothing_and_is_not_remembered():
    ref = world(balance=500)
    add_stocks(ref, stock(1, value=300))
    issue(ref, (1, 1, 1))
    before = ref.canonical()
    r = pay(ref, pid=1, amount=1000)                                    # cash 700 > 500
    assert r["status"] == Status.insufficient_funds
    assert r["cash"] == r["discount"] == 0 and r["timestamp"] == T0
    after = ref.canonical()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    ok(ref.call("TOPUP", {"topups": [{"id": 9, "user": 1, "amount": 200}]}))
    assert pay(ref, pid=1, amount=1000)["status"] == 0                  # the same id again


def test_merchant_and_payer_checks():
    ref = world()
    assert pay(ref, merchant=9)["status"] == Status.merchant_not_found
    assert pay(ref, merchant=0)["status"] == Status.merchant_not_found
    assert pay(ref, payer=9)["status"] == Status.payer_not_found
    ok(ref.call("MERCHANTS", {"merchants": [{"id": 1, "active": False}]}))
    assert pay(ref, payer=9)["status"] == Status.merchant_inactive      # merchant first


# ---------------------------------------------------------------------------
# Payment codes
# ---------------------------------------------------------------------------

def test_payment_code_single_use_and_dead_at_exactly_60_s():
    ref = world()
    reply = ref.call("PAYMENT_CODE", {"user": 1})
    assert reply == {"status": 0, "code": 10**17, "expires_at": T0 + 60_000}
    code = reply["code"]
    assert pay(ref, pid=1, payer=code, flags=2, amount=10**6)["status"] == \
        Status.insufficient_funds                                        # not consumed
    ref.clock.now_ms = T0 + 59_999
    r = pay(ref, pid=2, payer=code, flags=2)
    assert r["status"] == 0 and ref.payments[2].user == 1
    assert pay(ref, pid=3, payer=code, flags=2)["status"] == Status.payment_code_invalid
    assert pay(ref, pid=2, payer=code, flags=2)["flags"] == 1           # replay still works
    code2 = ref.call("PAYMENT_CODE", {"user": 2})["code"]
    ref.clock.now_ms = T0 + 59_999 + 60_000
    assert pay(ref, pid=4, payer=code2, flags=2)["status"] == Status.payment_code_invalid
    assert pay(ref, pid=5, payer=12345, flags=2)["status"] == Status.payment_code_invalid


def test_payment_code_is_drawn_again_when_it_repeats():
    ref = Reference(clock=Clock(), code_source=codes(10**17 + 5, 10**17 + 5, 10**17 + 6))
    ref.call("WALLETS", {"users": [1]})
    assert ref.call("PAYMENT_CODE", {"user": 1})["code"] == 10**17 + 5
    assert ref.call("PAYMENT_CODE", {"user": 1})["code"] == 10**17 + 6


def test_payment_code_errors():
    ref = world()
    assert ref.call("PAYMENT_CODE", {"user": 9})["status"] == Status.user_not_found
    assert ref.call("PAYMENT_CODE", {"user": 0})["status"] == Status.user_not_found
    reply = ref.call("PAYMENT_CODE", {"user": "1"})
    assert reply["status"] == Status.invalid_argument and reply["message"]
    with pytest.raises(BadBody):
        ref.call("PAYMENT_CODE", [1])


# ---------------------------------------------------------------------------
# Fees (Paying step 7)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("amount,fee", [(1000, 6), (1083, 6), (1084, 7), (83, 0), (84, 1)])
def test_fee_rounds_half_up(amount, fee):
    ref = world(fee_bps=60)
    r = pay(ref, amount=amount)
    assert r["fee"] == fee                                  # (amount*60 + 5000) // 10000
    assert ref.merchants[1].balance == amount - fee and ref.fees == fee


def test_merchant_funded_discount_is_not_in_the_fee_base():
    ref = world(fee_bps=60)
    add_stocks(ref, stock(1, funder="merchant", merchant=1, value=500),
               stock(2, value=500))
    issue(ref, (1, 1, 1), (2, 2, 2))
    r = pay(ref, pid=1, payer=1, amount=10_000)
    # base 9500: (9500*60 + 5000) // 10000 = 57; merchant gets cash 9500 - 57.
    assert (r["discount"], r["cash"], r["fee"]) == (500, 9500, 57)
    assert ref.merchants[1].balance == 9443
    r = pay(ref, pid=2, payer=2, amount=10_000)
    # platform-funded: base 10000, fee 60; merchant gets 9500 + 500 - 60.
    assert (r["discount"], r["cash"], r["fee"]) == (500, 9500, 60)
    assert ref.merchants[1].balance == 9443 + 9940
    assert ref.stocks[2].campaign == -500 and ref.stocks[1].campaign == 0
    assert ref.stocks[1].spent == ref.stocks[2].spent == 500


def test_merchant_stock_applies_only_at_its_merchant():
    ref = world()
    add_stocks(ref, stock(1, funder="merchant", merchant=1, value=500))
    issue(ref, (1, 1, 1))
    assert pay(ref, pid=1, merchant=2, coupons=[1])["status"] == Status.coupon_not_applicable
    assert pay(ref, pid=2, merchant=2)["discount"] == 0


# ---------------------------------------------------------------------------
# ISSUE
# ---------------------------------------------------------------------------

def test_issue_limits_and_idempotency():
    ref = world(users=(1, 2))
    add_stocks(ref, stock(1, max_issued=2, per_user_limit=1, validity_ms=DAY),
               stock(2, valid_until=T0 + 10))
    r = issue(ref, (1, 1, 1), (2, 1, 1), (3, 1, 2), (4, 1, 2), (1, 1, 1), (1, 1, 2),
              (5, 9, 1), (6, 2, 7), (0, 1, 1))
    assert list(r["status"]) == [0, Status.per_user_limit, 0, Status.stock_exhausted, 0,
                                 Status.exists_with_different_fields,
                                 Status.stock_not_found, Status.user_not_found,
                                 Status.invalid_id]
    assert r[0]["expires_at"] == T0 + DAY and list(r["flags"]) == [0, 0, 0, 0, 1, 0, 0, 0, 0]
    assert r[4]["expires_at"] == T0 + DAY                              # the original
    assert r[1]["expires_at"] == 0
    assert issue(ref, (8, 1, 1), reserved=1)[0]["status"] == Status.invalid_flags
    ref.clock.now_ms = T0 + 10
    assert issue(ref, (9, 2, 1))[0]["status"] == Status.stock_ended     # now >= valid_until
    assert ref.stocks[1].issued == 2 and len(ref.coupons) == 2


def test_issue_before_valid_from_is_allowed_but_not_redeemable_yet():
    ref = world()
    add_stocks(ref, stock(1, valid_from=T0 + 1000, valid_until=T0 + 5000, value=300))
    assert issue(ref, (1, 1, 1))[0]["expires_at"] == T0 + 5000
    assert pay(ref, pid=1, coupons=[1])["status"] == Status.coupon_not_applicable
    assert pay(ref, pid=2)["discount"] == 0
    ref.clock.now_ms = T0 + 1000
    assert pay(ref, pid=3)["discount"] == 300


# ---------------------------------------------------------------------------
# QUOTE
# ---------------------------------------------------------------------------

def test_quote_explains_every_coupon_and_changes_nothing():
    ref = world()
    add_stocks(ref,
               stock(1, value=300),                        # applied
               stock(2, value=200),                        # best of stock 2: not chosen
               stock(3, value=100, min_spend=99_999),      # not applicable
               stock(4, value=100, validity_ms=10),        # expired
               stock(5, value=500, budget=250),            # budget exhausted (d 300)
               stock(6, value=100),                        # used below
               stock(7, kind="percent", value=1))          # d = 0: not applicable
    issue(ref, (1, 1, 1), (2, 2, 1), (3, 3, 1), (4, 4, 1), (5, 5, 1), (6, 6, 1), (7, 7, 1))
    assert pay(ref, pid=1, amount=1000, coupons=[6])["status"] == 0
    ref.clock.now_ms += 10
    before = ref.digest()
    q = ref.call("QUOTE", {"payer": 1, "merchant": 1, "amount": 300})
    assert ref.digest() == before
    assert q["status"] == 0 and q["coupons"] == [1] and q["discount"] == 300 and q["cash"] == 0
    reasons = {e["coupon"]: (e["reason"], e["discount"]) for e in q["explain"]}
    assert reasons == {1: ("applied", 300), 2: ("not_chosen", 200),
                       3: ("coupon_not_applicable", 100), 4: ("coupon_expired", 100),
                       5: ("coupon_budget_exhausted", 300),
                       6: ("coupon_not_available", 100), 7: ("coupon_not_applicable", 0)}
    assert [e["coupon"] for e in q["explain"]] == [1, 2, 3, 4, 5, 6, 7]


def test_quote_explicit_and_no_coupon_modes():
    ref = world(balance=0)
    add_stocks(ref, stock(1, value=300), stock(2, value=200, stacking="exclusive"))
    issue(ref, (1, 1, 1), (2, 2, 1))
    q = ref.call("QUOTE", {"payer": 1, "merchant": 1, "amount": 1000, "coupons": [1]})
    # insufficient funds still says what the payment would cost
    assert (q["status"], q["error"], q["cash"], q["discount"], q["coupons"]) == (
        Status.insufficient_funds, "insufficient_funds", 700, 300, [1])
    assert [e["reason"] for e in q["explain"]] == ["applied", "not_chosen"]
    q = ref.call("QUOTE", {"payer": 1, "merchant": 1, "amount": 1000, "coupons": [1, 2]})
    assert q["status"] == Status.coupons_not_stackable and q["coupons"] == [] and q["cash"] == 0
    assert [e["reason"] for e in q["explain"]] == ["not_chosen", "coupons_not_stackable"]
    q = ref.call("QUOTE", {"payer": 1, "merchant": 1, "amount": 1000, "flags": 1})
    assert [e["reason"] for e in q["explain"]] == ["not_chosen", "not_chosen"]
    assert q["discount"] == 0 and q["cash"] == 1000


def test_quote_failing_before_selection_has_empty_explain():
    ref = world()
    add_stocks(ref, stock(1))
    issue(ref, (1, 1, 1))
    q = ref.call("QUOTE", {"payer": 1, "merchant": 9, "amount": 1000})
    assert q == {"status": 4, "error": "merchant_not_found", "cash": 0, "discount": 0,
                 "fee": 0, "coupons": [], "explain": []}
    assert ref.call("QUOTE", {"payer": 1, "merchant": 1, "amount": 0})["status"] == \
        Status.invalid_amount
    q = ref.call("QUOTE", {"payer": 1, "merchant": 1, "amount": 5, "coupon": [1]})
    assert q["status"] == Status.invalid_argument and "coupon" in q["message"]


# ---------------------------------------------------------------------------
# Slots and goods tags
# ---------------------------------------------------------------------------

def test_slots_use_the_engine_time_zone():
    # T0 is Wednesday (weekday 2) 06:13 at UTC+8: minute 373.
    ref = world()
    add_stocks(ref, stock(1, value=300, slots=[[2, 373, 374]]),
               stock(2, value=200, slots=[[1, 0, 1440], [3, 0, 1440]]))
    issue(ref, (1, 1, 1), (2, 2, 1))
    q = ref.call("QUOTE", {"payer": 1, "merchant": 1, "amount": 1000})
    assert q["coupons"] == [1]
    assert [e["reason"] for e in q["explain"]] == ["applied", "coupon_not_applicable"]
    ref.clock.now_ms = T0 + 40_000                                          # 06:14: minute 374, out
    assert pay(ref, pid=1, coupons=[1])["status"] == Status.coupon_not_applicable
    ref.clock.now_ms = T0 + DAY                                             # Thursday
    assert coupons_of(pay(ref, pid=2)) == [2]


def test_goods_tags_and_merchant_scope():
    ref = world()
    add_stocks(ref, stock(1, value=300, goods_tags=[5]),
               stock(2, value=200, tags=[7]),                         # merchant 1 has tag 7
               stock(3, value=100, merchants=[2]))
    issue(ref, (1, 1, 1), (2, 2, 1), (3, 3, 1))
    q = ref.call("QUOTE", {"payer": 1, "merchant": 1, "amount": 1000, "goods_tag": 5})
    assert q["coupons"] == [1, 2]
    q = ref.call("QUOTE", {"payer": 1, "merchant": 1, "amount": 1000})
    assert q["coupons"] == [2]                                          # goods_tag 0 unlisted
    q = ref.call("QUOTE", {"payer": 1, "merchant": 2, "amount": 1000})
    assert q["coupons"] == [3]


# ---------------------------------------------------------------------------
# BALANCES and COUPONS
# ---------------------------------------------------------------------------

def test_balances_shape():
    ref = world(fee_bps=100, users=(1,))
    add_stocks(ref, stock(1, value=300, budget=1000))
    issue(ref, (1, 1, 1))
    pay(ref, amount=1000)
    b = ref.call("BALANCES", {"users": [1, 5], "merchants": [1, 0], "stocks": [1, 2]})
    assert b == {
        "status": 0,
        "users": [{"id": 1, "status": 0, "balance": 99_300, "held": 0, "available": 99_300},
                  {"id": 5, "status": 22, "error": "user_not_found"}],
        "merchants": [{"id": 1, "status": 0, "balance": 990},
                      {"id": 0, "status": 4, "error": "merchant_not_found"}],
        "stocks": [{"id": 1, "status": 0, "spent": 300, "reserved": 0, "issued": 1,
                    "budget": 1000, "campaign": -300},
                   {"id": 2, "status": 18, "error": "stock_not_found"}],
        "fees": 10, "bank": -100_000}
    assert ref.call("BALANCES", {})["users"] == []
    assert ref.call("BALANCES", {"user": [1]})["status"] == Status.invalid_argument


def test_coupons_shape():
    ref = world()
    add_stocks(ref, stock(1, validity_ms=1000))
    issue(ref, (2, 1, 1), (1, 1, 1), (3, 1, 2))
    pay(ref, pid=7, coupons=[2])
    ref.clock.now_ms += 1000
    by_user = ref.call("COUPONS", {"user": 1})
    assert by_user == {"status": 0, "results": [
        {"id": 1, "status": 0, "stock": 1, "user": 1, "state": "expired",
         "expires_at": T0 + 1000, "payment": 0},
        {"id": 2, "status": 0, "stock": 1, "user": 1, "state": "used",
         "expires_at": T0 + 1000, "payment": 7}]}
    by_id = ref.call("COUPONS", {"ids": [3, 9]})
    assert by_id["results"][1] == {"id": 9, "status": 11, "error": "coupon_not_found"}
    assert by_id["results"][0]["user"] == 2
    assert ref.call("COUPONS", {"user": 9}) == {"status": 22, "error": "user_not_found",
                                                "results": []}
    both = ref.call("COUPONS", {"ids": [1], "user": 1})
    assert both["status"] == 29 and both["results"] == [] and both["message"]


# ---------------------------------------------------------------------------
# Map validation, stamps, batches
# ---------------------------------------------------------------------------

def test_merchant_item_validation():
    ref = make()
    r = ref.call("MERCHANTS", {"merchants": [
        {"id": 1, "fee": 60}, {"id": 0}, {"id": 2, "fee_bps": 10001}, {"id": True},
        {"id": 3, "tags": list(range(17))}, {"id": 4, "tags": [1] * 17, "active": False},
        "x", {"id": 5, "active": 1}]})["results"]
    assert [x["status"] for x in r] == [29, 1, 29, 29, 29, 0, 29, 29]
    assert all("message" in x for x in r if x["status"] == 29)
    assert "message" not in r[1]
    assert set(ref.merchants) == {4} and ref.merchants[4].tags == {1}


def test_topup_checks_in_order():
    ref = make()
    ref.call("WALLETS", {"users": [1]})
    r = ref.call("TOPUP", {"topups": [
        {"id": 1, "user": 1, "amount": 500}, {"id": 1, "user": 1, "amount": 500},
        {"id": 1, "user": 1, "amount": 501}, {"id": 2, "user": 9, "amount": 5},
        {"id": 0, "user": 9, "amount": 0}, {"id": 3, "user": 1, "amount": 0},
        {"id": 3, "user": 1}, {"id": 4, "user": 1, "amount": 10**14},
        {"id": 5, "user": 1, "amount": 10**14}]})["results"]
    assert [x["status"] for x in r] == [0, 0, 9, 22, 1, 2, 29, 0, 0]
    assert r[1].get("duplicate") is True
    big = [{"id": 10 + i, "user": 1, "amount": 10**14} for i in range(9)]
    r = ref.call("TOPUP", {"topups": big})["results"]
    # the wallet may hold at most 10**15: 500 + 2*10**14 + 7*10**14 fits, the 9th not
    assert [x["status"] for x in r] == [0] * 7 + [2, 2]
    assert ref.bank == -ref.wallets[1].balance


def test_stock_validation_and_duplicates():
    ref = world()
    base = stock(1, kind="percent", value=1000, tags=[7, 7], slots=[[0, 0, 60]])
    assert ref.call("STOCKS", {"stocks": [base]})["results"] == [{"status": 0}]
    same = dict(base, tags=[7], slots=[[0, 0, 60], [0, 0, 60]], cap=0, budget=0)
    assert ref.call("STOCKS", {"stocks": [same]})["results"] == [{"status": 0,
                                                                 "duplicate": True}]
    r = ref.call("STOCKS", {"stocks": [
        dict(base, value=999), dict(base, id=0), dict(base, id=2, value=10001),
        dict(base, id=3, funder="bank"), dict(base, id=4, valid_until=base["valid_from"]),
        dict(base, id=5, daily_budget=-1), dict(base, id=6, slots=[[7, 0, 1]]),
        stock(7, funder="merchant", merchant=9), stock(8, funder="merchant", merchant=1,
                                                       tags=[1]),
        stock(9, merchant=1), dict(base, id=10, colour=1), stock(11, funder="merchant")]})
    assert [x["status"] for x in r["results"]] == [9, 1, 29, 29, 29, 29, 29, 4, 29, 29, 29,
                                                   29]
    assert set(ref.stocks) == {1}


def test_fixed_stock_cap_is_taken_as_zero():
    ref = world()
    add_stocks(ref, stock(1, cap=50))
    assert ref.stocks[1].cap == 0
    assert ref.call("STOCKS", {"stocks": [stock(1)]})["results"][0]["duplicate"] is True


def test_wallets_and_stamps():
    ref = make()
    r = ref.call("WALLETS", {"users": [1, 1, 0, -1]})["results"]
    assert r == [{"status": 0}, {"status": 0, "duplicate": True},
                 {"status": 1, "error": "invalid_id"},
                 {"status": 29, "error": "invalid_argument", "message": r[3]["message"]}]
    assert ref.stamp == T0
    ref.clock.now_ms = T0 - 5000                                             # clock goes back
    ref.call("WALLETS", {"users": [2]})
    assert ref.stamp == T0                                              # stamps never do
    ref.clock.now_ms = T0 + 5000
    ref.call("BALANCES", {})                                            # reads keep nothing
    assert ref.stamp == T0 and ref.canonical()["meta"]["now"][0] == T0


def test_bad_bodies_and_unknown_ops():
    ref = world()
    with pytest.raises(BadBody):
        ref.pay(np.zeros(0, PAY_RECORD))
    with pytest.raises(BadBody):
        ref.pay(np.zeros(8191, PAY_RECORD))
    with pytest.raises(BadBody):
        ref.issue(np.zeros(1, PAY_RECORD))
    with pytest.raises(BadBody):
        ref.call("WALLETS", {"user": [1]})
    with pytest.raises(BadBody):
        ref.call("TOPUP", [])
    for op in ("CAPTURE", "REFUND", "SETTLE", "NOPE"):
        with pytest.raises(UnknownOp):
            ref.call(op, {})
    assert ref.stamp == T0


def test_quote_explain_stacking_counts_only_the_payers_earlier_coupons():
    ref = world()
    add_stocks(ref, stock(1, value=100), stock(2, value=100, min_spend=10**6))
    issue(ref, (1, 1, 2), (2, 1, 1), (3, 2, 1), (4, 1, 1))
    # Coupon 1 (stock 1) is user 2's: it blocks nothing for payer 1's coupon 2.
    q = ref.call("QUOTE", {"payer": 1, "merchant": 1, "amount": 1000, "coupons": [1, 2]})
    assert q["status"] == Status.coupon_not_owned
    assert [(e["coupon"], e["reason"]) for e in q["explain"]] == [
        (2, "not_chosen"), (3, "not_chosen"), (4, "not_chosen")]
    # Coupon 3 is the payer's but not applicable: coupon 4 of the same stock as
    # coupon 2 is still not stackable with 2, and 3 keeps its own reason.
    q = ref.call("QUOTE", {"payer": 1, "merchant": 1, "amount": 1000,
                           "coupons": [3, 2, 4]})
    assert q["status"] == Status.coupon_not_applicable
    assert [(e["coupon"], e["reason"]) for e in q["explain"]] == [
        (2, "not_chosen"), (3, "coupon_not_applicable"), (4, "coupons_not_stackable")]
