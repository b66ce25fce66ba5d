"""Differential test of membership and marketing: `engine.Engine` against
`tests/reference_membership.MembershipReference`.

Hypothesis builds a small world (merchants with tags, wallets, coupon stocks
including reward and offer stocks, coupons, points programs and stamp cards)
and a random sequence mixing PROGRAMS (new, duplicate, conflicting,
malformed), REDEEM_POINTS, STATS, BALANCES with memberships, PAY (direct and
authorize; auto, explicit (also naming reward coupons) and no-coupon),
CAPTURE, VOID, REFUND (map and records), REVERSE, ISSUE (also of the ids
2**63 + k that rewards use), MERCHANTS tag changes (which move program
coverage), COUPONS, and time moving across hold expiry and a reward stock's
end. After every step the results must be identical (record results byte for
byte; map replies equal once the free-text `message` keys are removed); at the
end the canonical tables and digests must be equal and AUDIT must pass, on
the reference's tables and through the engine's AUDIT op.

Run: .venv/bin/python -m pytest tests/core/test_differential_membership.py
"""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from engine.protocol.records import CAPTURE_RECORD, ISSUE_RECORD, PAY_RECORD, REFUND_RECORD

from support import differential_pair
from support.differential_pair import HOLD_MS
from support.reference_membership import REWARD_BASE, MembershipReference

T0 = 1_700_000_000_000 + 2 * 86_400_000 + 13 * 3_600_000     # a weekday afternoon
DAY = 86_400_000


class Pair(differential_pair.Pair):
    def __init__(self):
        super().__init__(MembershipReference, T0)

    def finish(self):
        self.assert_same_tables()
        reply = self.call("AUDIT", {})
        assert reply["ok"], reply


# ---------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------

def stock(sid, **fields):
    base = {"id": sid, "funder": "platform", "kind": "fixed", "value": 100,
            "valid_from": 0, "valid_until": T0 + 365 * DAY, "stacking": "stackable"}
    return {**base, **fields}


STOCKS = [
    stock(1, value=300, min_spend=1000),                              # fixed, min spend
    stock(2, kind="percent", value=1000, cap=250),                    # 10 % capped
    stock(3, funder="merchant", merchant=1, value=150),               # merchant-funded
    stock(4, kind="percent", value=2000, stacking="exclusive"),       # exclusive 20 %
    stock(5, value=400, budget=700),                                  # small budget
    stock(7, funder="merchant", merchant=1, value=2000, stacking="exclusive",
          max_issued=4),                                              # reward: free coffee
    stock(8, value=500, per_user_limit=2, valid_until=T0 + DAY),      # reward, ends soon
    stock(9, value=500),                                              # points offer
    stock(10, kind="percent", value=3000, max_issued=2, validity_ms=60_000),  # offer
]
STOCK_IDS = [s["id"] for s in STOCKS]
USERS = (1, 2, 3)
COUPON_IDS = tuple(range(1, 13))
REWARD_IDS = tuple(REWARD_BASE + k for k in (1, 2, 3, 4))

PROGRAMS = [
    {"id": 1, "kind": "points", "rate": 5, "offers": [{"stock": 9, "price": 300},
                                                       {"stock": 10, "price": 1000}]},
    {"id": 2, "kind": "points", "rate": 150, "merchants": [2], "tags": [7],
     "offers": [{"stock": 9, "price": 50}, {"stock": 8, "price": 20}]},
    {"id": 3, "kind": "stamps", "merchants": [1], "threshold": 1000, "stamps": 2,
     "reward_stock": 7},
    {"id": 4, "kind": "stamps", "tags": [8], "threshold": 0, "stamps": 1, "reward_stock": 8},
    {"id": 5, "kind": "stamps", "threshold": 5000, "stamps": 3, "reward_stock": 7},
]
LATE_PROGRAMS = [   # sent during the sequence: new, duplicate, conflicting, malformed
    {"id": 6, "kind": "points", "rate": 10000, "merchants": [3, 1]},
    {"id": 6, "kind": "points", "rate": 10000, "merchants": [1, 3, 3]},
    {"id": 7, "kind": "stamps", "tags": [7, 8], "threshold": 1, "stamps": 2,
     "reward_stock": 8},
    {"id": 1, "kind": "points", "rate": 5, "offers": [{"stock": 10, "price": 1000},
                                                       {"stock": 9, "price": 300}]},
    {"id": 1, "kind": "points", "rate": 6},
    {"id": 8, "kind": "stamps", "stamps": 2, "reward_stock": 99},
    {"id": 8, "kind": "points", "rate": 5, "offers": [{"stock": 0, "price": 5}]},
    {"id": 8, "kind": "points", "rate": 0},
    {"id": 8, "kind": "points", "rate": 5, "threshold": 4},
    {"id": 8, "kind": "stamps", "stamps": 0, "reward_stock": 7},
    {"id": 8, "kind": "raffle"},
    {"id": 0, "kind": "points", "rate": 5},
    {"id": 8, "kind": "points", "rate": 5, "offers": [{"stock": 9, "price": 0}]},
    {"id": 8, "kind": "points", "rate": 5, "extra": 1},
    {"id": 8, "kind": "points", "rate": 5, "merchants": [0]},
    {"id": 8, "kind": "points", "rate": 5, "offers": [{"stock": 9, "price": 5},
                                                       {"stock": 9, "price": 6}]},
    {"id": 8, "kind": "points", "rate": 5, "offers": {"stock": 9, "price": 5}},
    {"id": 8, "kind": "points", "rate": 5, "offers": [{"stock": 9, "price": 5},
                                                       {"stock": 9, "price": 5}]},
    {"id": 9, "kind": "stamps", "stamps": 2, "reward_stock": 7},     # threshold 0
    {"id": 9, "kind": "stamps", "stamps": 2, "reward_stock": 7, "threshold": 0},
    {"id": 9, "kind": "stamps", "stamps": 2, "reward_stock": 7, "threshold": 1},
    {"id": 9, "kind": "points", "rate": True},
]
PROGRAM_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9)


def setup_world(pair: Pair, data) -> None:
    pair.call("MERCHANTS", {"merchants": [{"id": 1, "fee_bps": 60, "tags": [7]},
                                          {"id": 2, "fee_bps": 1000, "tags": [8]},
                                          {"id": 3, "fee_bps": 0}]})
    pair.call("WALLETS", {"users": list(USERS)})
    pair.call("TOPUP", {"topups": [
        {"id": u, "user": u, "amount": data.draw(st.sampled_from([2_000, 50_000, 500_000]))}
        for u in USERS]})
    pair.call("STOCKS", {"stocks": STOCKS})
    chosen = data.draw(st.lists(st.sampled_from(PROGRAMS), min_size=1, max_size=5,
                                unique_by=lambda p: p["id"]))
    pair.call("PROGRAMS", {"programs": chosen})
    issue = np.zeros(8, ISSUE_RECORD)
    for i in range(8):
        issue[i] = (i + 1, data.draw(st.sampled_from([1, 2, 3, 4, 5])),
                    data.draw(st.sampled_from(USERS)), 0)
    pair.batch("issue", issue)


# ---------------------------------------------------------------------------
# Request builders
# ---------------------------------------------------------------------------

payment_ids = st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 1, 2, 3])
refund_ids = st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8])
pay_amounts = st.sampled_from([1, 99, 500, 999, 1000, 1500, 2000, 3000, 5000, 7777, 20_000])
time_steps = st.sampled_from([1, 5_000, HOLD_MS, 30_000, 60_000, DAY])


def draw_pay(data, pair: Pair, history: list) -> np.ndarray:
    rec = np.zeros(1, PAY_RECORD)
    if history and data.draw(st.integers(0, 4)) == 0:
        rec[0] = history[data.draw(st.integers(0, len(history) - 1))]   # a retry
        return rec
    r = rec[0]
    r["id"] = data.draw(payment_ids)
    r["merchant"] = data.draw(st.sampled_from([1, 1, 2, 2, 3]))
    r["amount"] = data.draw(pay_amounts)
    flags = data.draw(st.sampled_from([0, 0, 0, 4, 4, 1]))
    r["payer"] = data.draw(st.sampled_from(USERS))
    r["flags"] = flags
    if not flags & 1 and data.draw(st.integers(0, 3)) == 3:
        owned = sorted(c.id for c in pair.ref.coupons.values() if c.user == int(r["payer"]))
        pool = owned if owned and data.draw(st.integers(0, 3)) < 3 else list(REWARD_IDS)
        named = data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=2))
        r["coupons"][:len(named)] = named
    history.append(rec[0].copy())
    return rec


def known_or_any(data, known: dict):
    if known and data.draw(st.integers(0, 5)) < 5:
        return data.draw(st.sampled_from(sorted(known)))
    return data.draw(payment_ids)


def amount_near(data, known: dict, pid: int):
    base = known.get(pid, 1000)
    return data.draw(st.sampled_from([base, base, base // 2, base // 3 + 1, 1, base + 1]))


# ---------------------------------------------------------------------------
# The scenario
# ---------------------------------------------------------------------------

def run_scenario(pair: Pair, data) -> None:
    setup_world(pair, data)
    history, known = [], {}     # known: payment id -> amount
    steps = data.draw(st.integers(5, 40))
    for _ in range(steps):
        op = data.draw(st.sampled_from(OPS))
        STEPS[op](pair, data, known, history)
    pair.call("STATS", {"stocks": STOCK_IDS, "merchants": [1, 2, 3]})
    pair.call("BALANCES", {"memberships": [{"user": u, "program": g}
                                           for u in USERS for g in PROGRAM_IDS]})
    pair.finish()


OPS = (["pay"] * 8 + ["pay_batch", "capture", "capture", "capture_records"]
       + ["refund"] * 3
       + ["refund_records", "reverse", "reverse", "void", "redeem", "redeem", "redeem",
          "stats", "stats", "balances", "balances", "programs", "issue", "tags",
          "coupons", "tick", "tick", "malformed"])


def step_pay(pair: Pair, data, known: dict, history: list) -> None:
    rec = draw_pay(data, pair, history)
    result = pair.batch("pay", rec)
    if result[0]["status"] == 0:
        known[int(result[0]["id"])] = int(rec[0]["amount"])


def step_pay_batch(pair: Pair, data, known: dict, history: list) -> None:
    recs = np.concatenate([draw_pay(data, pair, history)
                           for _ in range(data.draw(st.integers(2, 4)))])
    results = pair.batch("pay", recs)
    for rec, result in zip(recs, results):
        if result["status"] == 0:
            known[int(result["id"])] = int(rec["amount"])


def step_capture_records(pair: Pair, data, known: dict, history: list) -> None:
    records = np.zeros(data.draw(st.integers(1, 2)), CAPTURE_RECORD)
    for i in range(len(records)):
        pid = known_or_any(data, known)
        records[i] = (pid, amount_near(data, known, pid))
    results = pair.batch("capture", records)
    for rec, result in zip(records, results):
        if result["status"] == 0:
            known[int(rec["payment"])] = int(rec["amount"])


def step_malformed(pair: Pair, data, known: dict, history: list) -> None:
    op, request = data.draw(st.sampled_from([
        ("STATS", {"stocks": [-1]}), ("STATS", {"x": []}), ("STATS", {"stocks": 1}),
        ("BALANCES", {"memberships": [{"user": 1}]}),
        ("BALANCES", {"memberships": 5}),
        ("BALANCES", {"memberships": [{"user": 1, "program": -1}]}),
        ("BALANCES", {"users": [1], "memberships": []}),
        ("REDEEM_POINTS", {"redemptions": [{"coupon": 30, "user": 1, "program": 1,
                                            "stock": 9, "x": 0}]}),
        ("PROGRAMS", {"programs": ["x", {"kind": "points", "rate": 1}]}),
    ]))
    pair.call(op, request)


def step_capture(pair: Pair, data, known: dict, history: list) -> None:
    pid = known_or_any(data, known)
    reply = pair.call("CAPTURE", {"captures": [
        {"payment": pid, "amount": amount_near(data, known, pid)}]})
    if reply["results"][0]["status"] == 0:
        known[pid] = reply["results"][0]["cash"] + reply["results"][0]["discount"]


def step_refund(pair: Pair, data, known: dict, history: list) -> None:
    items = []
    for _ in range(data.draw(st.integers(1, 2))):
        pid = known_or_any(data, known)
        items.append({"id": data.draw(refund_ids), "payment": pid,
                      "amount": amount_near(data, known, pid)})
    pair.call("REFUND", {"refunds": items})


def step_refund_records(pair: Pair, data, known: dict, history: list) -> None:
    pid = known_or_any(data, known)
    records = np.zeros(1, REFUND_RECORD)
    records[0] = (data.draw(refund_ids), pid, amount_near(data, known, pid), 0)
    pair.batch("refund", records)


def step_redeem(pair: Pair, data, known: dict, history: list) -> None:
    items = [{"coupon": data.draw(st.sampled_from([20, 21, 22, 23, 24, 1, 0,
                                                  REWARD_BASE + 5])),
              "user": data.draw(st.sampled_from(USERS + (9,))),
              "program": data.draw(st.sampled_from([1, 1, 2, 2, 3, 6, 9, 0])),
              "stock": data.draw(st.sampled_from([9, 9, 10, 8, 1]))}
             for _ in range(data.draw(st.integers(1, 2)))]
    if data.draw(st.integers(0, 9)) == 0:
        items.append(data.draw(st.sampled_from([{"coupon": 20}, 5,
                                                {"coupon": 20, "user": 1,
                                                 "program": 1, "stock": -1}])))
    pair.call("REDEEM_POINTS", {"redemptions": items})


def step_stats(pair: Pair, data, known: dict, history: list) -> None:
    request = {}
    if data.draw(st.booleans()):
        request["stocks"] = data.draw(st.lists(st.sampled_from(STOCK_IDS + [99]),
                                               max_size=4))
    if data.draw(st.booleans()):
        request["merchants"] = data.draw(st.lists(st.sampled_from([1, 2, 3, 99]),
                                                  max_size=3))
    pair.call("STATS", request)


def step_balances(pair: Pair, data, known: dict, history: list) -> None:
    pair.call("BALANCES", {"users": list(USERS), "memberships": [
        {"user": u, "program": g} for u in USERS + (9,) for g in PROGRAM_IDS
        if data.draw(st.integers(0, 3)) == 0]})


def step_issue(pair: Pair, data, known: dict, history: list) -> None:
    issue = np.zeros(1, ISSUE_RECORD)
    issue[0] = (data.draw(st.sampled_from(COUPON_IDS + REWARD_IDS)),
                data.draw(st.sampled_from([1, 2, 3, 4, 5, 7, 8])),
                data.draw(st.sampled_from(USERS)), 0)
    pair.batch("issue", issue)


def step_tags(pair: Pair, data, known: dict, history: list) -> None:
    pair.call("MERCHANTS", {"merchants": [
        {"id": data.draw(st.sampled_from([1, 2, 3])),
         "tags": data.draw(st.sampled_from([[], [7], [8], [7, 8]]))}]})


# One random step of run_scenario, by name: (pair, data, known, history).
STEPS = {
    "pay": step_pay,
    "pay_batch": step_pay_batch,
    "capture_records": step_capture_records,
    "malformed": step_malformed,
    "capture": step_capture,
    "refund": step_refund,
    "refund_records": step_refund_records,
    "reverse": lambda pair, data, known, history: pair.call(
        "REVERSE", {"payments": [known_or_any(data, known)]}),
    "void": lambda pair, data, known, history: pair.call(
        "VOID", {"payments": [known_or_any(data, known)]}),
    "redeem": step_redeem,
    "stats": step_stats,
    "balances": step_balances,
    "programs": lambda pair, data, known, history: pair.call("PROGRAMS", {
        "programs": data.draw(st.lists(st.sampled_from(PROGRAMS + LATE_PROGRAMS),
                                       min_size=1, max_size=3))}),
    "issue": step_issue,
    "tags": step_tags,
    "coupons": lambda pair, data, known, history: pair.call(
        "COUPONS", {"user": data.draw(st.sampled_from(USERS))}),
    "tick": lambda pair, data, known, history: pair.tick(data.draw(time_steps)),
}
assert set(STEPS) == set(OPS)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_engine_matches_membership_reference(data):
    run_scenario(Pair(), data)
