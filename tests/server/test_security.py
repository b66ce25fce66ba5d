"""What each key may do, over real sockets: one test per cell of the table of
ops against roles and scopes in docs/reference/protocol.md ("Keys, roles and
merchant scope"), plus the scoped reversal tombstone, HELLO replay across a
restart, malformed HELLOs, and the warnings at start.

The world: merchants 1, 2 and 3; the scoped gateway key holds merchants 1
and 2. Every op that names something of merchant 1 and something of merchant
3 in one request: the scoped key gets `ok` for the first and `forbidden` for
the second, and nothing of merchant 3 changes."""
import asyncio
import logging
import time

import msgspec
import numpy as np
import pytest

from engine import Engine
from engine.protocol.auth import Key
from engine.server.config import Config
from engine.core.dispatch import MAP_OPS
from engine.protocol.ops import OP_NAMES
from engine.protocol.records import (CAPTURE_RECORD, ISSUE_RECORD, ISSUE_RESULT, PAY_AUTHORIZE,
                            PAY_RECORD, PAY_RESULT, REFUND_RECORD, REFUND_RESULT)
from engine.server.server import Server
from engine.protocol.status import Status
from support.wire import Raw, dec, enc, hello

SECRET = {"ops": "admin-secret-0123456789ab", "gw": "gateway-all-secret-01234",
          "gw12": "gateway-12-secret-012345"}
KEYS = [Key("ops", SECRET["ops"], "admin"),
        Key("gw", SECRET["gw"], "gateway", None),            # every merchant (API only)
        Key("gw12", SECRET["gw12"], "gateway", frozenset({1, 2}))]
COLUMNS = ("none", "ops", "gw", "gw12")   # no HELLO, admin, gateway, gateway of 1 and 2
OK, FORBIDDEN = int(Status.ok), int(Status.forbidden)
OPS = {name: code for code, name in OP_NAMES.items()}
FOREVER = 2**62


def stock(stock_id, funder, merchant=None, merchants=None):
    item = {"id": stock_id, "funder": funder, "kind": "fixed", "value": 5, "valid_from": 0,
            "valid_until": FOREVER, "stacking": "stackable", "budget": 10**6}
    if merchant is not None:
        item["merchant"] = merchant
    if merchants is not None:
        item["merchants"] = merchants
    return item


def pays(ids, merchants, flags=0, amount=100):
    records = np.zeros(len(ids), PAY_RECORD)
    records["id"], records["merchant"] = ids, merchants
    records["payer"], records["amount"], records["flags"] = 1, amount, flags
    return records


def make_world(engine) -> None:
    """Payments 11/13 completed, 21/23 authorized, 31/33 completed, at
    merchants 1/3; stocks 101 (merchant 1's), 103 (merchant 3's) and 200
    (the platform's, at merchants 1 and 2)."""
    engine.call("MERCHANTS", {"merchants": [{"id": m, "fee_bps": 0} for m in (1, 2, 3)]})
    engine.call("WALLETS", {"users": [1, 2]})
    engine.call("TOPUP", {"topups": [{"id": 1, "user": 1, "amount": 10**6}]})
    engine.call("STOCKS", {"stocks": [stock(101, "merchant", merchant=1),
                                      stock(103, "merchant", merchant=3),
                                      stock(200, "platform", merchants=[1, 2])]})
    assert (engine.pay(pays([11, 13, 31, 33], [1, 3, 1, 3]))["status"] == 0).all()
    assert (engine.pay(pays([21, 23], [1, 3], PAY_AUTHORIZE))["status"] == 0).all()


def merchant3(engine) -> dict:
    """Everything of merchant 3 an op could touch."""
    return {"payments": engine.call("GET_PAYMENTS", {"ids": [13, 23, 33, 43]}),
            "coupons": engine.call("COUPONS", {"ids": [503, 504]}),
            "balances": engine.call("BALANCES", {"merchants": [3], "stocks": [103, 200]})}


def records(dtype, **columns):
    out = np.zeros(len(next(iter(columns.values()))), dtype)
    for name, values in columns.items():
        out[name] = values
    return out.tobytes()


async def record_statuses(conn, op, body, result):
    reply_op, flags, _rid, data = await conn.call(OPS[op], body)
    if flags:
        return dec(data)["name"]
    return [int(s) for s in np.frombuffer(data, result)["status"]]


async def map_statuses(conn, op, request):
    flags, reply = await conn.map(OPS[op], request)
    if flags:
        return reply["name"]
    if "results" in reply:
        return [r["status"] for r in reply["results"]]
    return [reply.get("status", 0)]


# Each op: a request naming merchant 1's thing first, then merchant 3's.
GATEWAY_OP_REQUESTS = {
    "PAY": lambda c: record_statuses(c, "PAY", pays([41, 43], [1, 3]).tobytes(), PAY_RESULT),
    "ISSUE": lambda c: record_statuses(
        c, "ISSUE", records(ISSUE_RECORD, coupon=[501, 503, 504], stock=[101, 103, 200],
                            user=[1, 1, 1]), ISSUE_RESULT),
    "CAPTURE": lambda c: map_statuses(c, "CAPTURE", {"captures": [
        {"payment": 21, "amount": 100}, {"payment": 23, "amount": 100}]}),
    "VOID": lambda c: map_statuses(c, "VOID", {"payments": [21, 23]}),
    "REFUND": lambda c: map_statuses(c, "REFUND", {"refunds": [
        {"id": 601, "payment": 11, "amount": 100}, {"id": 603, "payment": 13, "amount": 100}]}),
    "REVERSE": lambda c: map_statuses(c, "REVERSE", {"payments": [31, 33]}),
    "GET_PAYMENTS": lambda c: map_statuses(c, "GET_PAYMENTS", {"ids": [11, 13]}),
    "CAPTURE_RECORDS": lambda c: record_statuses(
        c, "CAPTURE_RECORDS", records(CAPTURE_RECORD, payment=[21, 23], amount=[100, 100]),
        PAY_RESULT),
    "REFUND_RECORDS": lambda c: record_statuses(
        c, "REFUND_RECORDS", records(REFUND_RECORD, id=[601, 603], payment=[11, 13],
                                     amount=[100, 100]), REFUND_RESULT),
    "QUOTE": lambda c: quote_statuses(c),
}
UNSCOPED_OPS = {                    # gateway ops with nothing of a merchant in them
    "PING": lambda c: ping(c),
    "PAYMENT_CODE": lambda c: map_statuses(c, "PAYMENT_CODE", {"user": 1}),
    "COUPONS": lambda c: top_status(c, "COUPONS", {"user": 1}),
}
ADMIN_OP_REQUESTS = {
    "MERCHANTS": {"merchants": [{"id": 9}]},
    "WALLETS": {"users": [9]},
    "TOPUP": {"topups": [{"id": 9, "user": 2, "amount": 5}]},
    "STOCKS": {"stocks": [stock(109, "platform")]},
    "SETTLE": {},
    "STATEMENT": {"settlement": 1},
    "STATS": {},
    "PROGRAMS": {"programs": []},
    "REDEEM_POINTS": {"redemptions": []},
    "BALANCES": {"merchants": [3]},
    "AUDIT": {},
    "CLOCK": {"now": FOREVER // 2},
    "SEGMENTS": {"segments": [{"id": 1, "merchants": [3]}]},
    "SEGMENT": {"definition": {"merchants": [3]}, "limit": 10},
    "CAMPAIGNS": {"campaigns": [{"id": 1, "segment": 1, "stock": 103, "holdout_bps": 0,
                                 "coupon_base": 900}]},
    "LIFT": {"campaign": 1},
}


async def quote_statuses(conn):
    statuses = []
    for merchant in (1, 3):
        flags, reply = await conn.map(OPS["QUOTE"], {"payer": 1, "merchant": merchant,
                                                     "amount": 50})
        if flags:
            return reply["name"]
        statuses.append(reply["status"])
    return statuses


async def top_status(conn, op, request):
    flags, reply = await conn.map(OPS[op], request)
    return reply["name"] if flags else [reply["status"]]


async def ping(conn):
    _op, flags, _rid, body = await conn.call(OPS["PING"])
    return dec(body)["name"] if flags else [OK]


def expected(op: str, column: str):
    """The table of docs/reference/protocol.md, cell by cell."""
    if column == "none":
        return "not_authenticated"
    if op in ADMIN_OP_REQUESTS:
        return "forbidden" if column.startswith("gw") else "served"
    if op in UNSCOPED_OPS:
        return [OK]
    items = 3 if op == "ISSUE" else 2
    if column == "gw12":                    # the platform stock 200 too: not funded by 1 or 2
        return [OK] + [FORBIDDEN] * (items - 1)
    return [OK] * items


WRITES_MERCHANT3 = {"PAY", "ISSUE", "CAPTURE", "VOID", "REFUND", "REVERSE",
                    "CAPTURE_RECORDS", "REFUND_RECORDS"}
CELLS = [(op, column) for op in [*GATEWAY_OP_REQUESTS, *UNSCOPED_OPS, *ADMIN_OP_REQUESTS]
         for column in COLUMNS]


def test_the_table_covers_every_op_a_client_may_send():
    served = {name for name in OP_NAMES.values() if name not in ("HELLO", "EXPIRE")}
    assert {op for op, _ in CELLS} == served
    assert set(MAP_OPS) <= served


async def started_server(**settings) -> Server:
    engine = Engine()
    make_world(engine)
    config = Config(listen="127.0.0.1:0", keys=KEYS, test_clock=True, **settings)
    server = Server(config, engine=engine)
    await server.start()
    return server


async def connected(server, column: str) -> Raw:
    conn = await Raw.open(server)
    if column != "none":
        flags, reply = await conn.map(OPS["HELLO"], hello(column, SECRET[column]))
        assert flags == 0, reply
    return conn


@pytest.mark.parametrize("op,column", CELLS)
def test_each_op_against_each_role_and_scope(op, column):
    async def main():
        server = await started_server()
        engine = server.engine
        conn = await connected(server, column)
        before, digest = merchant3(engine), engine.digest()
        if op in ADMIN_OP_REQUESTS:
            flags, reply = await conn.map(OPS[op], ADMIN_OP_REQUESTS[op])
            got = reply["name"] if flags else "served"
        else:
            got = await {**GATEWAY_OP_REQUESTS, **UNSCOPED_OPS}[op](conn)
        want = expected(op, column)
        assert got == want
        if want in ("not_authenticated", "forbidden"):
            assert engine.digest() == digest            # refused whole: nothing changed
        elif op in ADMIN_OP_REQUESTS:
            pass                                        # an admin may change anything
        elif column == "gw12" or op not in WRITES_MERCHANT3:
            assert merchant3(engine) == before          # nothing of merchant 3 changed
        else:
            assert merchant3(engine) != before          # the same request did change it
        await server.stop()
    asyncio.run(main())


def test_get_payments_out_of_scope_says_nothing_of_the_payment():
    async def main():
        server = await started_server()
        conn = await connected(server, "gw12")
        _flags, reply = await conn.map(OPS["GET_PAYMENTS"], {"ids": [13, 11, 99],
                                                             "scope": [3]})
        mine, theirs, unknown = reply["results"][1], reply["results"][0], reply["results"][2]
        assert theirs == {"id": 13, "status": FORBIDDEN, "error": "forbidden"}
        assert mine["status"] == OK and mine["merchant"] == 1   # (its own `scope` is ignored)
        assert unknown["error"] == "payment_not_found"
        await server.stop()
    asyncio.run(main())


# -- the reversal tombstone of a scoped key ---------------------------------

def test_a_scoped_reversal_of_an_unknown_id_blocks_only_payments_at_its_merchants(tmp_path):
    async def main():
        engine = Engine(str(tmp_path / "data"))
        make_world(engine)
        server = Server(Config(listen="127.0.0.1:0", keys=KEYS), engine=engine)
        await server.start()
        gw12, other = await connected(server, "gw12"), await connected(server, "ops")
        _f, reply = await gw12.map(OPS["REVERSE"], {"payments": [77, 78]})
        assert [r["status"] for r in reply["results"]] == [OK, OK]
        # Another gateway's payment 77 at merchant 3 goes through; 78 at merchant 1 does not.
        assert await record_statuses(other, "PAY", pays([77], [3]).tobytes(),
                                     PAY_RESULT) == [OK]
        assert await record_statuses(other, "PAY", pays([78], [1]).tobytes(),
                                     PAY_RESULT) == [int(Status.reversed)]
        await server.stop()
        return engine

    engine = asyncio.run(main())
    served = engine.digest()
    engine.close()
    replayed = Engine(str(tmp_path / "data"))       # from the journal
    assert replayed.digest() == served
    assert replayed.state.scoped_tombstones.scopes == {77: frozenset({1, 2}),
                                                       78: frozenset({1, 2})}
    replayed.snapshot()
    replayed.close()
    reopened = Engine(str(tmp_path / "data"))       # from that snapshot
    assert reopened.storage.snapshot_seq > 0 and reopened.digest() == served
    assert reopened.pay(pays([78], [2]))["status"][0] == Status.reversed
    assert reopened.pay(pays([79], [3]))["status"][0] == Status.ok
    assert reopened.call("GET_PAYMENTS", {"ids": [77]})["results"][0]["merchant"] == 3
    reopened.close()


def test_scoped_tombstones_merge_and_yield_to_an_unscoped_one():
    engine = Engine()
    make_world(engine)
    engine.call("REVERSE", {"payments": [81, 82], "scope": [1]})
    engine.call("REVERSE", {"payments": [81], "scope": [3]})     # now merchants 1 and 3
    engine.call("REVERSE", {"payments": [82]})                   # an admin's: blocks all
    assert engine.state.scoped_tombstones.scopes == {81: frozenset({1, 3})}
    # In one batch: 81 at merchant 2 is not blocked and makes a payment, so
    # the next 81 is that payment's id with other fields, not a reversal.
    batch = pays([81, 81, 82, 83], [2, 3, 2, 1])
    assert engine.pay(batch)["status"].tolist() == [
        Status.ok, Status.exists_with_different_fields, Status.reversed, Status.ok]
    assert engine.pay(pays([84], [3]))["status"][0] == Status.ok
    engine.call("REVERSE", {"payments": [85], "scope": [3]})
    # docs/reference/rules.md step 1 (fields) comes before the tombstone, as for the kernel's.
    assert engine.pay(pays([85], [3], amount=0))["status"][0] == Status.invalid_amount
    assert engine.pay(pays([85, 85], [1, 3]))["status"].tolist() == [
        Status.ok, Status.exists_with_different_fields]


# -- HELLO ----------------------------------------------------------------------

def test_a_hello_from_before_the_server_started_is_refused():
    async def main():
        captured = hello("gw12", SECRET["gw12"], ts=time.time_ns() // 1_000_000 - 2000)
        server = await started_server()          # a restart: seen nonces are gone
        conn = await Raw.open(server)
        flags, reply = await conn.map(OPS["HELLO"], captured)
        assert flags and reply["name"] == "not_authenticated"
        flags, reply = await conn.map(OPS["HELLO"], hello("gw12", SECRET["gw12"]))
        assert flags == 0 and reply["protocol"] == 1
        await server.stop()
    asyncio.run(main())


def malformed(**changes):
    request = hello("gw12", SECRET["gw12"])
    request.update(changes)
    return {k: v for k, v in request.items() if v is not None}


@pytest.mark.parametrize("request_,name", [
    (malformed(protocol=True), "bad_body"),
    (malformed(protocol=1.0), "bad_body"),
    (malformed(protocol="1"), "bad_body"),
    (malformed(protocol=None), "bad_body"),
    (malformed(protocol=2), "unsupported_protocol"),
    (malformed(key_id=["gw12"]), "bad_body"),
    (malformed(key_id={"a": 1}), "bad_body"),
    (malformed(ts=True), "bad_body"),
    (malformed(ts=1.5), "bad_body"),
    (malformed(nonce=12), "bad_body"),
    (malformed(mac="not bytes"), "bad_body"),
    (malformed(client=7), "bad_body"),
    (malformed(key_id="nobody"), "not_authenticated"),
    (malformed(mac=b"\0" * 32), "not_authenticated"),
])
def test_a_malformed_hello_is_refused_and_the_server_serves_on(request_, name):
    async def main():
        server = await started_server()
        conn = await Raw.open(server)
        _op, flags, _rid, body = await conn.call(OPS["HELLO"], msgspec.msgpack.encode(request_))
        assert flags and dec(body)["name"] == name
        witness = await connected(server, "gw12")
        assert await ping(witness) == [OK]
        await server.stop()
    asyncio.run(main())


# -- warnings at start ------------------------------------------------------------

def start_and_stop(caplog, **settings) -> list[str]:
    async def main():
        engine = Engine()
        server = Server(Config(**settings), engine=engine)
        await server.start()
        await server.stop()
    with caplog.at_level(logging.WARNING, logger="scanpay.server"):
        asyncio.run(main())
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_public_listener_without_tls_is_warned_about(caplog):
    warnings = start_and_stop(caplog, listen="0.0.0.0:0", keys=KEYS)
    assert any("without TLS" in w for w in warnings)
    caplog.clear()
    assert not start_and_stop(caplog, listen="127.0.0.1:0", keys=KEYS)


def test_public_metrics_without_keys_are_warned_about(caplog):
    warnings = start_and_stop(caplog, listen="127.0.0.1:0", metrics="0.0.0.0:0")
    assert any("metrics" in w for w in warnings)
    caplog.clear()
    assert not start_and_stop(caplog, listen="127.0.0.1:0", metrics="127.0.0.1:0")


def test_a_gateway_key_with_no_merchants_acts_for_none():
    """A config key without `merchants` has an empty scope, not every merchant."""
    async def main():
        engine = Engine()
        make_world(engine)
        keys = [Key("none", SECRET["gw12"], "gateway")]     # merchants left out
        server = Server(Config(listen="127.0.0.1:0", keys=keys), engine=engine)
        await server.start()
        conn = await Raw.open(server)
        assert (await conn.map(OPS["HELLO"], hello("none", SECRET["gw12"])))[0] == 0
        before = engine.canonical()
        assert await record_statuses(conn, "PAY", pays([41], [1]).tobytes(),
                                     PAY_RESULT) == [FORBIDDEN]
        assert await map_statuses(conn, "VOID", {"payments": [21]}) == [FORBIDDEN]
        assert await map_statuses(conn, "REVERSE", {"payments": [88]}) == [OK]
        after = engine.canonical()                          # (REVERSE keeps its stamp)
        assert all(np.array_equal(after[t], before[t]) for t in after if t != "meta")
        assert not len(after["tombstones"]) and not len(after["scoped_tombstones"])
        assert engine.pay(pays([88], [1]))["status"][0] == Status.ok
        await server.stop()
    asyncio.run(main())
