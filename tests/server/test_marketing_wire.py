"""Precision marketing over the socket (docs/reference/protocol.md, ops
51-54): the maps go out and come back as the embedded engine answers them
(nulls and nested maps included), request-level refusals are error frames
that change nothing, and a restarted server (journal replay) gives the same
groups and figures."""
import numpy as np

from engine.protocol.ops import OP_CAMPAIGNS, OP_LIFT, OP_PAY, OP_SEGMENT, OP_SEGMENTS, OP_STOCKS
from engine.protocol.records import PAY_RECORD, PAY_RESULT
from support.wire import Raw, enc, error_of, run, started, world

USERS = list(range(1, 41))
STOCK = {"id": 5, "funder": "platform", "kind": "fixed", "value": 50, "valid_from": 0,
         "valid_until": 2**62, "stacking": "stackable", "name": "Welcome back"}


async def marketed_world(c) -> None:
    await world(c)                                          # merchants 1, 2; wallets 1, 2
    await c.map(33, {"users": USERS})
    await c.map(34, {"topups": [{"id": 100 + u, "user": u, "amount": 10**6} for u in USERS]})
    flags, reply = await c.map(OP_STOCKS, {"stocks": [STOCK]})
    assert flags == 0 and reply["results"][0]["status"] == 0
    flags, reply = await c.map(OP_SEGMENTS, {"segments": [{"id": 1, "name": "everyone"}]})
    assert flags == 0 and reply == {"results": [{"status": 0}]}
    flags, reply = await c.map(OP_CAMPAIGNS, {"campaigns": [
        {"id": 7, "segment": 1, "stock": 5, "holdout_bps": 5000, "coupon_base": 900,
         "name": "win back"}]})
    assert flags == 0 and reply["results"][0]["size"] == len(USERS), reply
    records = np.zeros(len(USERS), PAY_RECORD)
    records["id"], records["payer"] = np.arange(1, len(USERS) + 1), USERS
    records["merchant"], records["amount"] = 1, 1000
    _op, flags, _rid, body = await c.call(OP_PAY, records.tobytes())
    assert flags == 0 and (np.frombuffer(body, PAY_RESULT)["status"] == 0).all()


def test_marketing_maps_over_the_wire_and_after_a_restart(tmp_path):
    async def main():
        server = await started(tmp_path)
        c = await Raw.open(server)
        await marketed_world(c)
        flags, lift = await c.map(OP_LIFT, {"campaign": 7, "from": 0})
        embedded = server.engine.call("LIFT", {"campaign": 7, "from": 0})
        assert flags == 0 and {**lift, "now": embedded["now"]} == embedded   # (the clock runs)
        assert lift["redeemed"] == lift["issued"] > 0                 # every treated user paid
        assert lift["discount"] == 50 * lift["issued"] and lift["cost_per_redemption"] == 50
        assert lift["treated"]["users"] + lift["holdout"]["users"] == len(USERS)
        flags, page = await c.map(OP_SEGMENT, {"id": 1, "limit": 10, "after": 35})
        assert flags == 0 and page["users"] == [36, 37, 38, 39, 40] and page["count"] == 40
        await server.stop()
        again = await started(tmp_path)                     # replays the journal
        c = await Raw.open(again)
        flags, replayed = await c.map(OP_LIFT, {"campaign": 7, "from": 0})
        assert flags == 0 and {**replayed, "now": lift["now"]} == lift
        await again.stop()
    run(main())


def test_request_refusals_are_error_frames_that_change_nothing():
    async def main():
        server = await started()
        c = await Raw.open(server)
        await world(c)
        before = server.engine.digest()
        too_many = {"campaigns": [{"id": i, "segment": 1, "stock": 5, "holdout_bps": 0,
                                   "coupon_base": 1} for i in range(1, 66)]}
        for op, request in ((OP_CAMPAIGNS, too_many), (OP_CAMPAIGNS, {"campaigns": 1}),
                            (OP_SEGMENTS, {"segments": [], "x": 1}), (OP_SEGMENT, [1]),
                            (OP_LIFT, "campaign 7")):
            reply = error_of(await c.call(op, enc(request)))
            assert reply["name"] == "bad_body", (op, reply)
        assert server.engine.digest() == before
        flags, reply = await c.map(OP_LIFT, {"campaign": 7})
        assert flags == 0 and reply == {"status": 34, "error": "campaign_not_found"}
        await server.stop()
    run(main())
