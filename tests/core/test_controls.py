"""Campaign controls as docs/reference/rules.md's worked examples: slots, daily budgets,
per-user daily limits, goods tags, in the engine's time zone (UTC+8).

Every test runs twice, as frozenlist's tests do: on the Engine and on the
plain-Python reference (the `ledger_impl` fixture, tests/support/ledgers.py),
with the same assertions."""
import datetime as dt

import numpy as np
import pytest

from engine.client import issue_record, pay_record
from engine.protocol.records import ISSUE_RECORD, PAY_RECORD
from engine.protocol.status import Status

CST = dt.timezone(dt.timedelta(hours=8))


def at(text: str) -> int:
    """Engine ms of a local (UTC+8) time like '2026-11-23 12:30' (a Monday)."""
    return int(dt.datetime.fromisoformat(text).replace(tzinfo=CST).timestamp() * 1000)


@pytest.fixture
def eng(ledger_impl, clock):
    clock.now_ms = at("2026-11-23 09:00")
    engine = ledger_impl(clock=clock)
    engine.call("MERCHANTS", {"merchants": [{"id": 1, "fee_bps": 0}]})
    engine.call("WALLETS", {"users": [1, 2, 3]})
    engine.call("TOPUP", {"topups": [{"id": u, "user": u, "amount": 10**7} for u in (1, 2, 3)]})
    return engine


def stock(sid, **fields):
    base = {"id": sid, "funder": "platform", "kind": "fixed", "value": 500,
            "valid_from": 0, "valid_until": 2**62, "stacking": "stackable"}
    return {**base, **fields}


def issue(eng, coupons):
    records = np.array([issue_record(*triple) for triple in coupons], ISSUE_RECORD)
    assert (eng.issue(records)["status"] == 0).all()


def pay(eng, pid, user=1, amount=3000, coupons=(), goods_tag=0):
    record = pay_record(pid, user, 1, amount, goods_tag=goods_tag, coupons=coupons)
    return eng.pay(np.array([record], PAY_RECORD))[0]


def test_lunch_slot_coupon_is_refused_at_15_00(eng):
    # Weekdays 11:00-14:00 (Monday = 0).
    eng.call("STOCKS", {"stocks": [stock(1, slots=[[d, 660, 840] for d in range(5)])]})
    issue(eng, [(10, 1, 1), (11, 1, 1), (12, 1, 1)])
    eng.clock.now_ms = at("2026-11-23 12:30")
    assert pay(eng, 1)["discount"] == 500
    eng.clock.now_ms = at("2026-11-23 15:00")           # engine time only moves forward
    assert pay(eng, 2, coupons=[11])["status"] == Status.coupon_not_applicable
    assert pay(eng, 3)["discount"] == 0                 # auto mode passes it over
    quote = eng.call("QUOTE", {"payer": 1, "merchant": 1, "amount": 3000})
    reasons = {e["coupon"]: e["reason"] for e in quote["explain"]}
    assert reasons == {10: "coupon_not_available", 11: "coupon_not_applicable",
                       12: "coupon_not_applicable"}
    eng.clock.now_ms = at("2026-11-29 12:30")           # Sunday: no slot
    assert pay(eng, 4, coupons=[11])["status"] == Status.coupon_not_applicable
    eng.clock.now_ms = at("2026-11-30 13:59")           # Monday again, inside the slot
    assert pay(eng, 5, coupons=[11])["discount"] == 500


def test_daily_budget_runs_out_and_comes_back_the_next_day(eng):
    eng.call("STOCKS", {"stocks": [stock(1, daily_budget=1000)]})
    issue(eng, [(10, 1, 1), (11, 1, 2), (12, 1, 3), (13, 1, 3)])
    assert pay(eng, 1, user=1)["discount"] == 500
    assert pay(eng, 2, user=2)["discount"] == 500       # 1000 of 1000 spent today
    assert pay(eng, 3, user=3, coupons=[12])["status"] == Status.coupon_budget_exhausted
    assert pay(eng, 4, user=3)["discount"] == 0
    # A refund of today's payment gives today's budget back.
    eng.call("REFUND", {"refunds": [{"id": 1, "payment": 2, "amount": 3000}]})
    assert pay(eng, 5, user=3, coupons=[12])["discount"] == 500
    assert pay(eng, 6, user=3, coupons=[13])["status"] == Status.coupon_budget_exhausted
    eng.clock.now_ms = at("2026-11-24 00:00")           # midnight in UTC+8: a new day
    assert pay(eng, 7, user=3, coupons=[13])["discount"] == 500


def test_per_user_daily_limit_counts_redemptions_of_the_day(eng):
    eng.call("STOCKS", {"stocks": [stock(1, per_user_daily_limit=1)]})
    issue(eng, [(10, 1, 1), (11, 1, 1), (12, 1, 1)])
    assert pay(eng, 1)["discount"] == 500
    assert pay(eng, 2, coupons=[11])["status"] == Status.coupon_not_applicable
    eng.call("REFUND", {"refunds": [{"id": 1, "payment": 1, "amount": 3000}]})
    assert pay(eng, 3, coupons=[11])["discount"] == 500  # the refunded one no longer counts
    eng.clock.now_ms = at("2026-11-24 09:00")
    assert pay(eng, 4, coupons=[12])["discount"] == 500


def test_goods_tags_scope_what_is_bought(eng):
    eng.call("STOCKS", {"stocks": [stock(1, goods_tags=[7, 8])]})
    issue(eng, [(10, 1, 1)])
    assert pay(eng, 1, goods_tag=9)["discount"] == 0
    assert pay(eng, 2, goods_tag=9, coupons=[10])["status"] == Status.coupon_not_applicable
    assert pay(eng, 3, goods_tag=8)["discount"] == 500


def test_authorizations_count_until_released(eng):
    eng.call("STOCKS", {"stocks": [stock(1, daily_budget=500)]})
    issue(eng, [(10, 1, 1), (11, 1, 2)])
    record = np.zeros(1, PAY_RECORD)
    record[0] = (1, 1, 1, 3000, 4, 0, (0, 0, 0, 0), 0)
    assert eng.pay(record)[0]["discount"] == 500         # reserved against today
    assert pay(eng, 2, user=2, coupons=[11])["status"] == Status.coupon_budget_exhausted
    eng.call("VOID", {"payments": [1]})
    assert pay(eng, 3, user=2, coupons=[11])["discount"] == 500


def test_many_stocks_with_slots_keep_the_state_readable(eng):
    """The slot pool grows past its first allocation (and not by multiples of 3)."""
    eng.call("STOCKS", {"stocks": [stock(100 + i, slots=[[d, 0, 1440] for d in range(7)])
                                   for i in range(40)]})
    tables = eng.canonical()
    assert len(tables["stock_slots"]) == 40 * 7
    assert eng.audit()["ok"]
