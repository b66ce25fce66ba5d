"""The world generator (engine/demo/world.py) and the demo (engine/demo/__init__.py), on tiny sizes."""
import numpy as np
import pytest

from engine import Engine
from engine.protocol.records import PAY_RECORD, PAY_RESULT
from engine.protocol.status import Status
from engine.demo.world import (CATEGORIES, DEMO_START_MS, World, build, pay_batches, scramble_ids,
                          zipf_ranks)
from support.clock import Clock

TINY = World(users=300, merchants=40, stocks=25, coupons_per_user=3, seed=5,
             districts=4, malls=2, preset="tiny")


def _built(spec=TINY):
    eng = Engine(clock=Clock(spec.now_ms))
    return eng, build(eng, spec)


def test_build_tiny_world():
    eng, info = _built()
    assert len(info.user_ids) == TINY.users and len(np.unique(info.user_ids)) == TINY.users
    assert len(info.merchant_ids) == TINY.merchants and len(info.stock_ids) == TINY.stocks
    assert len(info.coupon_ids) == TINY.users * TINY.coupons_per_user
    assert np.all(np.diff(info.coupon_ids.astype(np.float64)) > 0)   # sorted, unique
    balances = eng.call("BALANCES", {"stocks": info.stock_ids.tolist()})
    assert sum(s["issued"] for s in balances["stocks"]) == len(info.coupon_ids)
    assert eng.call("AUDIT", {})["ok"]


def test_build_is_deterministic_for_a_seed():
    a, _ = _built()
    b, _ = _built()
    c, _ = _built(TINY.replace(seed=6))
    assert a.digest() == b.digest()
    assert a.digest() != c.digest()


def test_demo_world_builds():
    eng, info = _built(World.demo(users=200))
    assert len(info.stock_names) == len(info.stock_ids) == len(info.stock_defs)
    assert info.now_ms == DEMO_START_MS
    assert eng.call("AUDIT", {})["ok"]


def test_pay_batches_are_valid_and_unique():
    eng, info = _built()
    batches = list(pay_batches(info, 3, batch_records=500, seed=1, start_payment_id=10))
    assert all(b.dtype == PAY_RECORD and len(b) == 500 for b in batches)
    all_ = np.concatenate(batches)
    assert np.array_equal(all_["id"], np.arange(10, 1510, dtype=np.uint64))
    assert np.isin(all_["payer"], info.user_ids).all()
    assert np.isin(all_["merchant"], info.merchant_ids).all()
    lo = min(c[2][0] for c in CATEGORIES)
    hi = max(c[2][1] for c in CATEGORIES)
    assert (all_["amount"] >= lo).all() and (all_["amount"] <= hi).all()
    assert set(np.unique(all_["flags"]).tolist()) <= {0, 1}
    assert (all_["coupons"] == 0).all()
    again = np.concatenate(list(pay_batches(info, 3, batch_records=500, seed=1, start_payment_id=10)))
    assert np.array_equal(all_, again)
    res = eng.pay(batches[0])
    assert res.dtype == PAY_RESULT
    assert (res["status"] == Status.ok).mean() > 0.9
    assert (res["discount"] > 0).any()          # some coupons do apply
    assert eng.call("AUDIT", {})["ok"]


def test_scramble_ids_is_a_bijection_without_zero():
    x = np.arange(1, 100_001, dtype=np.uint64)
    y = scramble_ids(x)
    assert len(np.unique(y)) == len(x) and (y != 0).all()


def test_zipf_ranks_in_range_and_skewed():
    r = zipf_ranks(np.random.default_rng(0), 1000, 0.7, 50_000)
    assert r.min() >= 0 and r.max() <= 999
    counts = np.bincount(r, minlength=1000)
    assert counts[0] > 5 * counts[500]


def test_demo_end_to_end(tmp_path, capsys):
    from engine import demo

    with pytest.raises(SystemExit) as bad:
        demo.main(["--payments", "0"])
    assert bad.value.code != 0
    # Over the wire (the default): a durable server and 16 gateway connections.
    report = tmp_path / "report"
    assert demo.main(["--payments", "20000", "--users", "2000", "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "over the wire, durable" in out and "PAY frame latency" in out
    # It timed the stream over the wire, not Engine.pay calls.
    assert "wall time of the stream over the wire" in out and "Engine.pay" not in out
    assert (report / "report.png").exists()
    # It ends with the targeted campaigns' story, read from the running server.
    assert "Targeted campaigns: which one paid off?" in out
    assert out.rstrip().splitlines()[-1].startswith("paid off:")
    lift = (report / "lift.csv").read_text().splitlines()
    assert len(lift) == 3 and lift[1].startswith("Welcome back") and lift[2].startswith("First visit")
    # The same traffic through the embedded engine.
    assert demo.main(["--payments", "20000", "--users", "2000", "--embedded",
                      "--report", ""]) == 0
    out = capsys.readouterr().out
    assert "Engine.pay, in memory" in out and "time in Engine.pay" in out
