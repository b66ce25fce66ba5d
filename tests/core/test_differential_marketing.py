"""Differential test of precision marketing: `engine.Engine` (with a data
directory) against `tests/support/reference_marketing.MarketingReference`,
then the engine's journal replayed and its snapshot loaded.

Hypothesis builds a small world (three merchants with tags, twelve wallets,
named stocks with issue limits, a points program) and a random history
mixing PAY (direct and authorize), CAPTURE, VOID, REFUND (partial and full),
ISSUE into the coupon ids campaigns use, MERCHANTS tag changes and time
steps with SEGMENTS (new, replaced, malformed), SEGMENT (saved and inline,
paged), CAMPAIGNS (new, replayed, conflicting, malformed, over a stock's
limits) and LIFT over random windows. After every step the replies must be
equal (free-text `message` keys aside); at the end the canonical tables and
digests must be equal, AUDIT must pass, and an engine reopened from the
journal (replay), and again from a snapshot, must have the same digest and
give the same SEGMENT and LIFT replies: the same groups and figures.
"""
from __future__ import annotations

import tempfile

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from engine import Engine
from engine.protocol.errors import BadBody
from engine.protocol.records import ISSUE_RECORD, PAY_RECORD

from support import differential_pair
from support.differential_pair import HOLD_MS, Codes, strip_messages
from support.keys import Keys
from support.reference_marketing import MarketingReference

T0 = 1_700_000_000_000 + 2 * 86_400_000 + 13 * 3_600_000
DAY = 86_400_000
USERS = tuple(range(1, 13))
SEGMENT_IDS = (1, 2, 3)
CAMPAIGN_IDS = (1, 2, 3)


def no_draws() -> int:
    raise AssertionError("replay drew a key: it must take the journaled one")


class Pair(differential_pair.Pair):
    """The durable engine and the reference on one clock."""

    def __init__(self, path: str):
        super().__init__(MarketingReference, T0)
        self.path = path
        self.eng = Engine(path, clock=self.clock, code_source=Codes(), key_source=Keys(),
                          hold_ms=HOLD_MS)
        self.ref = MarketingReference(clock=self.clock, code_source=Codes(), key_source=Keys(),
                                      hold_ms=HOLD_MS)

    def bad_body(self, op: str, request) -> None:
        """Both refuse the whole request."""
        self.log.append(f"bad_body {op}({request!r})")
        for side in (self.eng, self.ref):
            with pytest.raises(BadBody):
                side.call(op, request)

    def reopened(self) -> Engine:
        return Engine(self.path, clock=self.clock, code_source=Codes(), key_source=no_draws,
                      hold_ms=HOLD_MS)


def stock(sid: int, **fields) -> dict:
    base = {"id": sid, "funder": "platform", "kind": "fixed", "value": 200, "valid_from": 0,
            "valid_until": T0 + 365 * DAY, "stacking": "stackable", "name": f"stock {sid}"}
    return {**base, **fields}


STOCKS = [stock(1, merchants=[1, 2], name="Café 2 off"),
          stock(2, funder="merchant", merchant=3, kind="percent", value=1000, name=""),
          stock(3, max_issued=3),
          stock(4, per_user_limit=1),
          stock(5, valid_until=T0 + DAY)]


def setup_world(pair: Pair, data) -> None:
    pair.call("MERCHANTS", {"merchants": [{"id": 1, "fee_bps": 60, "tags": [7]},
                                          {"id": 2, "tags": [8]}, {"id": 3, "tags": [7, 8]}]})
    pair.call("WALLETS", {"users": list(USERS)})
    pair.call("TOPUP", {"topups": [{"id": u, "user": u, "amount": 10**7} for u in USERS]})
    pair.call("STOCKS", {"stocks": STOCKS})
    pair.call("PROGRAMS", {"programs": [{"id": 1, "kind": "points", "rate": 100, "tags": [7]}]})
    for _ in range(data.draw(st.integers(0, 12))):       # a history before any segment
        step_pay(pair, data, {})
        pair.tick(data.draw(st.sampled_from([1, 3_600_000, DAY])))
    pair.call("SEGMENTS", {"segments": [{"id": 1, "name": "everyone"},
                                        {"id": 2, "tags": [7], "payments_min": 1},
                                        {"id": 3, "merchants": [2], "never_paid": True}]})


# ---------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------

SEGMENT_FIELDS = {
    "name": st.sampled_from(["", "lapsed regulars", "新客"]),
    "merchants": st.lists(st.sampled_from([1, 2, 3, 9]), max_size=2),
    "tags": st.lists(st.sampled_from([7, 8, 9]), max_size=2),
    "from": st.sampled_from([0, T0, T0 + DAY]),
    "until": st.sampled_from([T0 + DAY, T0 + 10 * DAY, 0]),
    "days": st.sampled_from([1, 2, 7]),
    "payments_min": st.sampled_from([0, 1, 2, 3]),
    "payments_max": st.sampled_from([0, 1, 2, 5]),
    "gmv_min": st.sampled_from([0, 1000, 5000]),
    "gmv_max": st.sampled_from([999, 5000, 100_000]),
    "recency_days_min": st.sampled_from([0, 1, 2]),
    "recency_days_max": st.sampled_from([0, 1, 3]),
    "never_paid": st.sampled_from([True, False, 1]),
    "program": st.sampled_from([1, 1, 2, 0]),
    "points_min": st.sampled_from([0, 10, 1000, -1]),
}


def draw_segment(data, with_id: bool = True):
    if data.draw(st.integers(0, 12)) == 0:
        return data.draw(st.sampled_from(["x", {"id": 0}, {"id": 1, "bogus": 1}, {}]))
    item = {"id": data.draw(st.sampled_from(SEGMENT_IDS))} if with_id else {}
    for key, values in SEGMENT_FIELDS.items():
        if data.draw(st.integers(0, 4)) == 0:
            item[key] = data.draw(values)
    return item


def draw_campaign(data):
    if data.draw(st.integers(0, 15)) == 0:
        return data.draw(st.sampled_from(["x", {"id": 0, "segment": 1}, {"id": 1},
                                          {"id": 1, "segment": 9, "stock": 1, "holdout_bps": 0,
                                           "coupon_base": 1},
                                          {"id": 1, "segment": 1, "stock": 99, "holdout_bps": 0,
                                           "coupon_base": 1}]))
    item = {"id": data.draw(st.sampled_from(CAMPAIGN_IDS)),
            "segment": data.draw(st.sampled_from(SEGMENT_IDS)),
            "stock": data.draw(st.sampled_from([1, 1, 2, 3, 4, 5])),
            "holdout_bps": data.draw(st.sampled_from([0, 2500, 5000, 5000, 10_000, 10_001])),
            "coupon_base": data.draw(st.sampled_from([1000, 1000, 1005, 2000, 2**64 - 3]))}
    if data.draw(st.booleans()):
        item["name"] = data.draw(st.sampled_from(["", "win back", "win back", "x" * 129]))
    return item


def draw_pay(data) -> np.ndarray:
    rec = np.zeros(1, PAY_RECORD)
    r = rec[0]
    r["id"] = data.draw(st.integers(1, 40))
    r["payer"] = data.draw(st.sampled_from(USERS))
    r["merchant"] = data.draw(st.sampled_from([1, 1, 2, 3]))
    r["amount"] = data.draw(st.sampled_from([100, 999, 1000, 2500, 7777]))
    r["flags"] = data.draw(st.sampled_from([0, 0, 0, 4, 1]))
    return rec


# ---------------------------------------------------------------------------
# Steps: (pair, data, known payments id -> amount)
# ---------------------------------------------------------------------------

def step_pay(pair: Pair, data, known: dict) -> None:
    rec = draw_pay(data)
    if pair.batch("pay", rec)[0]["status"] == 0:
        known[int(rec[0]["id"])] = int(rec[0]["amount"])


def step_refund(pair: Pair, data, known: dict) -> None:
    if not known:
        return
    pid = data.draw(st.sampled_from(sorted(known)))
    amount = data.draw(st.sampled_from([known[pid], known[pid] // 2 or 1, 1]))
    pair.call("REFUND", {"refunds": [{"id": data.draw(st.integers(1, 30)), "payment": pid,
                                      "amount": amount}]})


def step_capture_or_void(pair: Pair, data, known: dict) -> None:
    if not known:
        return
    pid = data.draw(st.sampled_from(sorted(known)))
    if data.draw(st.booleans()):
        pair.call("CAPTURE", {"captures": [{"payment": pid, "amount": known[pid]}]})
    else:
        pair.call("VOID", {"payments": [pid]})


def step_issue(pair: Pair, data, known: dict) -> None:
    rec = np.zeros(1, ISSUE_RECORD)
    rec[0] = (data.draw(st.integers(1000, 1012)), data.draw(st.sampled_from([1, 3, 4])),
              data.draw(st.sampled_from(USERS)), 0)
    pair.batch("issue", rec)


def step_segments(pair: Pair, data, known: dict) -> None:
    items = [draw_segment(data) for _ in range(data.draw(st.integers(1, 2)))]
    pair.call("SEGMENTS", {"segments": items})


def step_segment(pair: Pair, data, known: dict) -> None:
    if data.draw(st.integers(0, 15)) == 0:
        pair.bad_body("SEGMENT", data.draw(st.sampled_from([[], 5, "x"])))
        return
    if data.draw(st.booleans()):
        request = {"id": data.draw(st.sampled_from(SEGMENT_IDS + (0, 9)))}
    else:
        request = {"definition": draw_segment(data, with_id=False)}
    if data.draw(st.booleans()):
        request["limit"] = data.draw(st.sampled_from([0, 1, 3, 1024, 1025]))
        request["after"] = data.draw(st.sampled_from([0, 2, 5]))
    if data.draw(st.integers(0, 10)) == 0:
        request["bogus"] = 1
    pair.call("SEGMENT", request)


def step_campaigns(pair: Pair, data, known: dict) -> None:
    if data.draw(st.integers(0, 15)) == 0:
        pair.bad_body("CAMPAIGNS", {"campaigns": [{"id": i} for i in range(65)]})
        return
    items = [draw_campaign(data) for _ in range(data.draw(st.integers(1, 2)))]
    pair.call("CAMPAIGNS", {"campaigns": items})


def step_lift(pair: Pair, data, known: dict) -> None:
    request = {"campaign": data.draw(st.sampled_from(CAMPAIGN_IDS * 3 + (0, 9)))}
    if data.draw(st.booleans()):
        request["from"] = data.draw(st.sampled_from([0, T0, T0 + DAY]))
    if data.draw(st.booleans()):
        request["until"] = data.draw(st.sampled_from([T0 + DAY, T0 + 30 * DAY, T0]))
    pair.call("LIFT", request)


def step_tags(pair: Pair, data, known: dict) -> None:
    pair.call("MERCHANTS", {"merchants": [{"id": data.draw(st.sampled_from([1, 2, 3])),
                                           "tags": data.draw(st.sampled_from([[], [7], [8]]))}]})


STEPS = {
    "pay": step_pay, "refund": step_refund, "capture_or_void": step_capture_or_void,
    "issue": step_issue, "segments": step_segments, "segment": step_segment,
    "campaigns": step_campaigns, "lift": step_lift, "tags": step_tags,
    "tick": lambda pair, data, known: pair.tick(data.draw(st.sampled_from(
        [1, HOLD_MS, 3_600_000, DAY, 3 * DAY]))),
}
OPS = (["pay"] * 6 + ["refund", "refund", "capture_or_void", "issue", "segments", "segment",
                      "campaigns", "campaigns", "campaigns", "lift", "lift", "tags", "tick", "tick"])
assert set(OPS) == set(STEPS)


# ---------------------------------------------------------------------------
# The test
# ---------------------------------------------------------------------------

def reads(engine_or_ref) -> list:
    """Every saved segment's users and every campaign's lift, as replies."""
    out = [engine_or_ref.call("SEGMENT", {"id": s, "limit": 1024}) for s in SEGMENT_IDS]
    out += [engine_or_ref.call("LIFT", {"campaign": c, "from": 0}) for c in CAMPAIGN_IDS]
    return [strip_messages(reply) for reply in out]


def check_replay(pair: Pair) -> None:
    """The journal replayed, then a snapshot loaded: the same state, groups
    and figures (key draws come from the journal, never the key source)."""
    digest, replies = pair.eng.digest(), reads(pair.eng)
    pair.eng.close()
    replayed = pair.reopened()
    assert replayed.digest() == digest
    assert reads(replayed) == replies
    replayed.snapshot()
    replayed.close()
    loaded = pair.reopened()
    assert loaded.storage.snapshot_seq > 0
    assert loaded.digest() == digest
    assert reads(loaded) == replies
    loaded.close()


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_engine_matches_marketing_reference_and_replays(data):
    with tempfile.TemporaryDirectory() as tmp:
        pair = Pair(tmp + "/data")
        try:
            setup_world(pair, data)
            known: dict = {}
            for _ in range(data.draw(st.integers(5, 40))):
                STEPS[data.draw(st.sampled_from(OPS))](pair, data, known)
            assert reads(pair.eng) == reads(pair.ref)
            pair.assert_same_tables()
            assert pair.call("AUDIT", {})["ok"]
            check_replay(pair)
        finally:
            pair.eng.close()
