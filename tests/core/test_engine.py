"""The embedded Engine's own surface: batch and body errors, growth of every
table past its first allocation, determinism of the digest, time stamping."""
import numpy as np
import pytest

from engine import BadBody, Engine, UnknownOp
from engine.protocol.records import ISSUE_RECORD, PAY_RECORD, RESULT_DUPLICATE
from engine.protocol.status import Status
from support.clock import Clock
from support.ledgers import world

T0 = 1_700_000_000_000


def pays(ids, payer=1, merchant=1, amount=1000):
    records = np.zeros(len(ids), PAY_RECORD)
    records["id"] = ids
    records["payer"] = payer
    records["merchant"] = merchant
    records["amount"] = amount
    return records


@pytest.mark.parametrize("batch", [
    np.zeros(0, PAY_RECORD),
    np.zeros(8191, PAY_RECORD),
    np.zeros(3, ISSUE_RECORD),
    np.zeros((2, 2), PAY_RECORD),
    b"\x00" * 81,
    [1, 2, 3],
])
def test_bad_pay_batch_is_refused_whole(batch):
    eng = Engine(clock=Clock())
    world(eng)
    before = eng.digest()
    with pytest.raises(BadBody):
        eng.pay(batch)
    assert eng.digest() == before


def test_pay_accepts_the_bytes_of_a_frame_body():
    eng = Engine(clock=Clock())
    world(eng)
    results = eng.pay(pays([1, 2]).tobytes())
    assert list(results["status"]) == [0, 0]
    assert eng.call("BALANCES", {"users": [1]})["users"][0]["balance"] == 10**6 - 2000


def test_unknown_and_planned_ops_raise_unknown_op():
    eng = Engine(clock=Clock())
    with pytest.raises(UnknownOp):
        eng.call("NOPE", {})
    assert UnknownOp("x").to_map()["code"] == 3


@pytest.mark.parametrize("op,body", [
    ("MERCHANTS", {"merchant": []}),
    ("MERCHANTS", [1]),
    ("WALLETS", {"users": 5}),
    ("TOPUP", {"topups": [], "extra": 1}),
    ("QUOTE", "payer=1"),
    ("COUPONS", None),
])
def test_malformed_body_is_bad_body(op, body):
    eng = Engine(clock=Clock())
    with pytest.raises(BadBody):
        eng.call(op, body)


def test_every_table_grows_past_its_first_allocation():
    """More rows than the initial capacity of every table and index."""
    eng = Engine(clock=Clock())
    users, merchants, stocks = 3000, 150, 120
    world(eng, users=users, merchants=merchants)
    eng.call("STOCKS", {"stocks": [
        {"id": s, "funder": "platform", "kind": "fixed", "value": 1,
         "valid_from": 0, "valid_until": 2**62, "stacking": "stackable",
         "merchants": list(range(1, merchants + 1, 2))} for s in range(1, stocks + 1)]})
    issue = np.zeros(6000, ISSUE_RECORD)
    issue["coupon"] = np.arange(1, 6001)
    issue["stock"] = np.arange(6000) % stocks + 1
    issue["user"] = np.arange(6000) % users + 1
    for part in np.array_split(issue, 2):
        assert (eng.issue(part)["status"] == 0).all()
    for start in (1, 4001):
        batch = pays(np.arange(start, start + 4000), amount=10)
        batch["payer"] = np.arange(4000) % users + 1
        batch["merchant"] = np.arange(4000) % merchants + 1
        assert (eng.pay(batch)["status"] == 0).all()
    counts = eng.counts()
    assert counts == {"users": users, "merchants": merchants, "stocks": stocks,
                      "coupons": 6000, "payments": 8000, "codes": 0}
    # Every id is still found after the rehashes: replay all payments.
    replay = pays(np.arange(1, 4001), amount=10)
    replay["payer"] = np.arange(4000) % users + 1
    replay["merchant"] = np.arange(4000) % merchants + 1
    assert (eng.pay(replay)["flags"] & RESULT_DUPLICATE).all()
    used = eng.call("COUPONS", {"ids": [int(i) for i in issue["coupon"]]})["results"]
    assert sum(r["state"] == "used" for r in used) > 0


def test_same_input_same_digest_and_different_input_different_digest():
    def run(amount):
        eng = Engine(clock=Clock(), code_source=iter(range(10**17, 10**18)).__next__)
        world(eng)
        eng.call("PAYMENT_CODE", {"user": 2})
        eng.pay(pays([1, 2, 3], amount=amount))
        return eng.digest()

    assert run(700) == run(700)
    assert run(700) != run(701)


def test_read_only_calls_do_not_move_the_engine_clock():
    clock = Clock()
    eng = Engine(clock=clock)
    world(eng)
    clock.now_ms = T0 + 50_000
    eng.call("BALANCES", {"users": [1]})
    eng.call("QUOTE", {"payer": 1, "merchant": 1, "amount": 10})
    assert eng.canonical()["meta"]["now"][0] == T0
    clock.now_ms = T0 - 5                         # a clock going back never moves time back
    result = eng.pay(pays([9]))
    assert result["timestamp"][0] == T0


def test_capacity_hints_preallocate_and_unknown_tables_are_refused():
    eng = Engine(capacity={"users": 10_000, "coupons": 30_000})
    sizes = eng.memory_bytes()
    assert sizes["users"] >= 10_000 * 32 and sizes["coupons"] >= 30_000 * 40
    with pytest.raises(ValueError, match="unknown table"):
        Engine(capacity={"wallets": 5})
    # A payments hint sizes the visits too (a payment adds at most one),
    # unless they have a hint of their own.
    ledger = Engine(capacity={"payments": 5_000}).state.ledger
    assert len(ledger.pay_meta) >= 5_000 and len(ledger.visits) >= 5_000
    ledger = Engine(capacity={"payments": 5_000, "visits": 2_000}).state.ledger
    assert 2_000 <= len(ledger.visits) < 5_000


def test_insufficient_funds_changes_nothing():
    eng = Engine(clock=Clock())
    world(eng)
    before = eng.digest()
    result = eng.pay(pays([1], amount=10**6 + 1))
    assert result["status"][0] == Status.insufficient_funds
    assert result["cash"][0] == 0 and result["fee"][0] == 0
    assert eng.digest() == before
