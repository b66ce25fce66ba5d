"""Hostile clients (issue 14): bounded memory and fair service. Each test
replays one attack at a small scale (a few MB, tens of connections, small
configured limits) and checks that the server refuses it, stays bounded and
keeps serving everyone else."""
import asyncio
import json
import logging
import socket
import threading

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from engine import Engine

from engine.protocol import frame

from engine.server import msgpack_guard
from engine.server.config import Config, ConfigError, check
from engine.protocol.errors import BadBody
from engine.protocol.limits import BATCH_RECORDS_MAX
from engine.protocol.ops import OP_BALANCES, OP_GET_PAYMENTS, OP_HELLO, OP_PAY, OP_PING, OP_TOPUP
from engine.protocol.records import PAY_RESULT
from engine.protocol.status import Status
from support.clock import Clock
from support.ledgers import world
from support.servers import RealServer
from support.wire import (SECRET_ADMIN, SECRET_GW, Raw, dec, enc, error_of, gateway_config, hello,
                          pay_body, run, started, started_with_world)


def nested(depth: int) -> bytes:
    """A map holding a map holding ... `depth` levels down, then 1."""
    return b"\x81\xa1a" * depth + b"\x01"


# -- nesting depth -------------------------------------------------------------

def test_deeply_nested_bodies_are_bad_body_even_before_hello(caplog):
    async def main():
        server = await started(keys=gateway_config())
        c = await Raw.open(server)
        reply = error_of(await c.call(OP_HELLO, nested(1000), 5))
        assert reply["name"] == "bad_body"
        assert error_of(await c.call(OP_PING, b"", 6))["name"] == "not_authenticated"  # open
        assert (await c.map(OP_HELLO, hello("ops", SECRET_ADMIN)))[0] == 0
        await server.stop()
    with caplog.at_level(logging.INFO):
        run(main())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "RecursionError" not in caplog.text


def test_a_pay_pipelined_before_a_deep_body_is_answered_and_the_deep_one_changes_nothing():
    async def main():
        server, c = await started_with_world()
        before = server.engine.digest()
        c.send(OP_PAY, 7, pay_body([501]))
        c.send(OP_TOPUP, 8, b"\x81\xa6topups\x91" + nested(1000))
        c.send(OP_PING, 9)
        op, flags, rid, body = await c.recv()
        assert (op, flags, rid) == (OP_PAY, 0, 7)
        assert np.frombuffer(body, PAY_RESULT)["status"][0] == Status.ok
        assert error_of(await c.recv())["name"] == "bad_body"
        assert await c.recv() == (OP_PING, 0, 9, b"")
        assert server.engine.counts()["payments"] == 1 and server.engine.digest() != before
        await server.stop()
    run(main())


def test_nesting_up_to_the_limit_decodes_and_one_more_level_is_refused():
    assert msgpack_guard.decode_map(nested(msgpack_guard.DEPTH_MAX)) is not None
    with pytest.raises(msgpack_guard.BodyRefused, match="deeper"):
        msgpack_guard.decode_map(nested(msgpack_guard.DEPTH_MAX + 1))
    with pytest.raises(msgpack_guard.BodyRefused, match="deeper"):
        msgpack_guard.decode_map(b"\x81\xa1a" + b"\x91" * 100_000 + b"\x01")


def test_the_embedded_engine_refuses_a_request_too_deep_to_encode():
    item = inner = {}
    for _ in range(5000):
        inner["x"] = {}
        inner = inner["x"]
    with Engine() as engine:
        with pytest.raises(BadBody, match="deep"):
            engine.call("TOPUP", {"topups": [item]})


# -- duplicate keys ------------------------------------------------------------

def topup_with_repeated_amount() -> bytes:
    """TOPUP {topups: [{id: 2, user: 1, amount: 5, amount: 10**9}]}, the second
    `amount` spelled as str8 so that a comparison of raw bytes would miss it."""
    item = (b"\x84\xa2id\x02\xa4user\x01\xa6amount\x05"
            + b"\xd9\x06amount\xce" + (10**9).to_bytes(4, "big"))
    return b"\x81\xa6topups\x91" + item


def test_a_money_map_with_a_repeated_key_is_bad_body_and_credits_nothing():
    async def main():
        server, c = await started_with_world()
        before = server.engine.digest()
        reply = error_of(await c.call(OP_TOPUP, topup_with_repeated_amount(), 3))
        assert reply["name"] == "bad_body" and "amount" in reply["message"]
        assert server.engine.digest() == before
        _flags, balances = await c.map(OP_BALANCES, {"users": [1]})
        assert balances["users"][0]["balance"] == 10**6          # the world's top-up only
        assert await c.call(OP_PING, b"", 4) == (OP_PING, 0, 4, b"")
        await server.stop()
    run(main())


@pytest.mark.parametrize("body", [
    b"\x82\xa1a\x01\xa1a\x02",                  # the same fixstr twice
    b"\x82\x05\x01\xcc\x05\x02",                # 5 as fixint and as uint8
    b"\x81\xa1a\x82\xa1b\x01\xd9\x01b\x02",     # deeper down
])
def test_repeated_keys_are_refused_however_they_are_spelled(body):
    with pytest.raises(msgpack_guard.BodyRefused, match="repeats"):
        msgpack_guard.decode_map(body)


@pytest.mark.parametrize("value", [
    {}, {"a": [1, {"b": "x" * 300}], "c": {1: 2, -5: b"z" * 70_000}, "d": 1.5, "e": None},
    {"f": True, "g": 2**64 - 1, "h": -2**63, "i": [[], {}], "j": "\u00e9" * 40},
])
def test_the_guard_passes_what_msgspec_would_decode(value):
    assert msgpack_guard.decode_map(enc(value)) == value


scalars = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False)
           | st.text(max_size=40) | st.binary(max_size=300))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(
    st.text(max_size=8) | st.integers(-2**63, 2**64 - 1), inner, max_size=5), max_leaves=40)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=8), values, max_size=6))
def test_the_guard_passes_every_map_msgspec_encodes(value):
    assert msgpack_guard.decode_map(enc(value)) == value


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | values.map(enc).flatmap(
    lambda body: st.integers(0, len(body)).map(lambda cut: body[:cut] + body[cut:][::-1])))
def test_the_guard_refuses_garbage_with_bad_body_only(body):
    try:
        value = msgpack_guard.decode_map(body)
    except msgpack_guard.BodyRefused:
        return
    assert isinstance(value, dict)

# -- slowloris -----------------------------------------------------------------

async def trickle(client, stop: asyncio.Event) -> None:
    """Send a HELLO header and then its body a byte at a time, slowly (the
    slowloris client: always active, never done)."""
    client.writer.write(frame.HEADER.pack(1000, OP_HELLO, 0, 1))
    while not stop.is_set():
        try:
            client.writer.write(b"\x00")
            await client.writer.drain()
        except ConnectionError:
            return
        await asyncio.sleep(0.05)


def test_slow_unauthenticated_connections_are_closed_and_make_room_for_newcomers():
    async def main():
        server = await started(keys=gateway_config(), unauthenticated_max=4,
                               hello_timeout_ms=400, idle_timeout_ms=60_000)
        stop = asyncio.Event()
        slow = [await Raw.open(server) for _ in range(4)]
        tasks = [asyncio.create_task(trickle(c, stop)) for c in slow]
        await asyncio.sleep(0.1)
        # Every unauthenticated slot is taken: a newcomer closes the oldest.
        gateway = await Raw.open(server)
        assert (await gateway.map(OP_HELLO, hello("gw", SECRET_GW)))[0] == 0
        evicted = error_of(await slow[0].recv())
        assert evicted["name"] == "not_authenticated" and "newer" in evicted["message"]
        assert await slow[0].closed()
        # The rest are closed at their HELLO deadline, though they never stop sending.
        for c in slow[1:]:
            reply = error_of(await c.recv(timeout=5))
            assert reply["name"] == "not_authenticated" and "within 400 ms" in reply["message"]
            assert await c.closed()
        stop.set()
        await asyncio.gather(*tasks)
        assert await gateway.call(OP_PING, b"", 2) == (OP_PING, 0, 2, b"")
        assert len(server.unauthenticated) == 0
        await server.stop()
    run(main())


async def gone(server, attribute: str) -> None:
    """Wait (bounded) until the server's set or map `attribute` is empty."""
    for _ in range(200):
        if not getattr(server, attribute):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"server.{attribute} still holds {getattr(server, attribute)}")


def test_a_client_still_sending_when_closed_reads_its_error_and_then_eof():
    """A bad frame header followed by megabytes more: the server closes the
    connection while unread input waits in the kernel. Closing then would
    reset the connection and discard the error reply; the server half-closes
    and drains first, so the client reads the error, then a clean EOF."""
    async def main():
        server = await started()
        for _round in range(5):
            c = await Raw.open(server)
            c.writer.write(frame.HEADER.pack(0xFFFF_FFFF, OP_PING, 0, 9) + b"\x00" * (8 << 20))
            code = error_of(await c.recv())
            assert code["name"] == "frame_too_large", code
            assert await c.reader.read(1) == b""     # EOF, not ConnectionResetError
            c.writer.close()
        await server.stop()
    run(main())


def test_admins_keep_a_reserved_slot_when_every_connection_is_taken():
    async def main():
        server = await started(keys=gateway_config(), connections_max=3, admin_reserve=1,
                               hello_timeout_ms=60_000, idle_timeout_ms=60_000)
        stop = asyncio.Event()
        slow = [await Raw.open(server) for _ in range(2)]
        tasks = [asyncio.create_task(trickle(c, stop)) for c in slow]
        gateways = []
        for k in range(3):                      # every slot taken: the slow ones make room
            gateways.append(await Raw.open(server))
            assert (await gateways[-1].map(OP_HELLO, hello("gw", SECRET_GW)))[0] == 0
        for c in slow:
            assert error_of(await c.recv())["name"] == "not_authenticated"
            assert await c.closed()
        late = await Raw.open(server)           # authenticated ones fill every slot
        assert error_of(await late.call(OP_HELLO, enc(hello("gw", SECRET_GW))))["name"] == "busy"
        assert await late.closed()
        await gone(server, "reserved")
        admin = await Raw.open(server)          # the reserve is for admins
        assert (await admin.map(OP_HELLO, hello("ops", SECRET_ADMIN)))[0] == 0
        assert await admin.call(OP_PING, b"", 2) == (OP_PING, 0, 2, b"")
        extra = await Raw.open(server)          # and it is full now
        assert error_of(await extra.recv())["name"] == "busy"
        assert await extra.closed()
        assert len(server.connections) == 4
        stop.set()
        await asyncio.gather(*tasks)
        await server.stop()
    run(main())


def test_hostile_limits_are_checked_in_the_config():
    for bad in ({"hello_timeout_ms": 0}, {"unauthenticated_max": 0}, {"admin_reserve": -1},
                {"reply_buffer_bytes_max": 0}):
        with pytest.raises(ConfigError):
            check(Config(**bad))


# -- replies that are never read -------------------------------------------------

SMALL_SOCKET_BUFFER_BYTES = 4096


async def open_slow_reader(server):
    """A client that reads nothing until told to, with small socket buffers on
    both ends, so that unread replies pile up in the server, not the kernel."""
    host, port = server.config.host_port
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_SOCKET_BUFFER_BYTES)
    sock.setblocking(False)
    before = set(server.connections)
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    client = Raw()
    client.reader, client.writer = await asyncio.open_connection(sock=sock)
    for _ in range(100):
        new = set(server.connections) - before
        if new:
            break
        await asyncio.sleep(0.01)
    (conn,) = new
    conn.transport.get_extra_info("socket").setsockopt(
        socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_SOCKET_BUFFER_BYTES)
    return client, conn


def held_bytes(conn) -> int:
    """Reply bytes the server holds for a connection: its transport's buffer
    and replies waiting in their slots."""
    waiting = sum(len(s.reply) for s in conn.slots if s.reply is not None)
    return conn.transport.get_write_buffer_size() + waiting


async def settled(conn, quiet_s=0.3, limit_s=5.0) -> int:
    """held_bytes once it has stopped changing for quiet_s."""
    last, still_s = -1, 0.0
    for _ in range(int(limit_s / 0.05)):
        held = held_bytes(conn)
        still_s = still_s + 0.05 if held == last else 0.0
        if still_s >= quiet_s:
            break
        last = held
        await asyncio.sleep(0.05)
    return held_bytes(conn)


def test_unread_replies_to_unauthenticated_pings_stop_the_reading():
    frames = 20_000                      # 320 KB of PINGs: about 2 MB of error replies

    async def main():
        server = await started(keys=gateway_config(), reply_buffer_bytes_max=64 << 10,
                               hello_timeout_ms=60_000)
        client, conn = await open_slow_reader(server)
        client.writer.write(b"".join(frame.HEADER.pack(0, OP_PING, 0, k + 1)
                                     for k in range(frames)))
        held = await settled(conn)
        assert held < 256 << 10, f"the server holds {held} bytes of unread replies"
        assert conn.paused                                  # and reads no more meanwhile
        for k in range(frames):                             # once read, all are answered
            _op, _flags, request_id, body = await client.recv()
            assert request_id == k + 1 and dec(body)["name"] == "not_authenticated"
        assert not conn.paused and held_bytes(conn) == 0
        await server.stop()
    run(main())


def test_unread_read_replies_are_bounded_and_other_clients_are_served():
    ids = list(range(1, 1025))

    async def main():
        server, c = await started_with_world(inflight_bytes_max=256 << 10,
                                             reply_buffer_bytes_max=64 << 10)
        for start in range(0, len(ids), 256):
            await c.call(OP_PAY, pay_body(ids[start:start + 256], amount=10))
        hog, conn = await open_slow_reader(server)
        for k in range(20):                                 # about 7 MB of replies
            hog.send(OP_GET_PAYMENTS, k + 1, enc({"ids": ids}))
        held = await settled(conn)
        assert held < 1 << 20, f"the server holds {held} bytes of unread replies"
        _op, flags, _rid, body = await c.call(OP_PAY, pay_body([5000], amount=10), 99)
        assert flags == 0 and np.frombuffer(body, PAY_RESULT)["status"][0] == Status.ok
        for k in range(20):                                 # the hog reads: all answered
            _op, flags, request_id, body = await hog.recv()
            reply = dec(body)
            assert (flags, request_id, reply["status"]) == (0, k + 1, 0)
            assert [r["id"] for r in reply["results"]] == ids
        assert conn.inflight_bytes == 0 and conn.inflight_frames == 0
        await server.stop()
    run(main())


@pytest.mark.parametrize("op, key", [(OP_GET_PAYMENTS, "ids"), (49, "ids"), (OP_BALANCES, "users"),
                                     (46, "merchants")])
def test_read_lists_over_the_wire_limit_are_bad_body(op, key):
    async def main():
        server, c = await started_with_world()
        _op, flags, _rid, body = await c.call(op, enc({key: list(range(1, 1025))}))
        assert flags == 0 and dec(body)["status"] == 0
        reply = error_of(await c.call(op, enc({key: list(range(1, 1026))})))
        assert reply["name"] == "bad_body" and "1024" in reply["message"]
        (conn,) = server.connections                # what was held for the replies is released
        assert (conn.inflight_bytes, conn.inflight_frames) == (0, 0)
        await server.stop()
    run(main())


# -- paging of open-ended listings -------------------------------------------------

def engine_with_a_user_holding(coupon_ids) -> Engine:
    """An Engine whose user 1 holds `coupon_ids` of one stackable stock."""
    from engine.protocol.records import ISSUE_RECORD
    eng = Engine(clock=Clock())
    world(eng, users=2)
    eng.call("STOCKS", {"stocks": [{"id": 1, "funder": "platform", "kind": "fixed", "value": 1,
                                    "valid_from": 0, "valid_until": 2**62,
                                    "stacking": "stackable", "merchants": [1]}]})
    issue = np.zeros(len(coupon_ids), ISSUE_RECORD)
    issue["coupon"], issue["stock"], issue["user"] = coupon_ids, 1, 1
    assert (eng.issue(issue)["status"] == 0).all()
    return eng


def test_a_users_coupons_come_in_pages_of_at_most_1024():
    eng = engine_with_a_user_holding(np.random.default_rng(5).permutation(np.arange(1, 1101)) * 7)
    first = eng.call("COUPONS", {"user": 1})
    assert len(first["results"]) == 1024 and first["next"] == 1024 * 7
    rest = eng.call("COUPONS", {"user": 1, "after": first["next"]})
    assert "next" not in rest
    listed = [r["id"] for r in first["results"] + rest["results"]]
    assert listed == [7 * k for k in range(1, 1101)]
    small = eng.call("COUPONS", {"user": 1, "after": 70, "limit": 3})
    assert [r["id"] for r in small["results"]] == [77, 84, 91] and small["next"] == 91
    for bad in ({"user": 1, "limit": 0}, {"user": 1, "limit": 1025}, {"ids": [7], "after": 1}):
        assert eng.call("COUPONS", bad)["status"] == Status.invalid_argument


def test_a_quote_explains_at_most_1024_coupons_and_every_applied_one():
    ids = np.arange(1, 1101)
    eng = engine_with_a_user_holding(ids[::-1].copy())
    quote = eng.call("QUOTE", {"payer": 1, "merchant": 1, "amount": 1000})
    assert quote["status"] == 0 and len(quote["coupons"]) >= 1
    explained = [e["coupon"] for e in quote["explain"]]
    assert len(explained) == 1024 and quote["explain_omitted"] == 1100 - 1024
    assert explained == sorted(explained) and set(quote["coupons"]) <= set(explained)
    named = eng.call("QUOTE", {"payer": 1, "merchant": 1, "amount": 1000, "coupons": [1100]})
    assert named["coupons"] == [1100]                   # applied: kept, though past 1,024 by id
    explained = [e["coupon"] for e in named["explain"]]
    assert len(explained) == 1024 and explained[-1] == 1100 and explained[-2] == 1023
    small = engine_with_a_user_holding(ids[:10].copy())
    assert "explain_omitted" not in small.call("QUOTE", {"payer": 1, "merchant": 1, "amount": 1000})

# -- the client, facing a hostile server ---------------------------------------------

def test_a_reply_nested_too_deep_is_a_protocol_error_in_the_client():
    from engine.client import AsyncClient, ProtocolError

    async def main():
        async def serve(reader, writer):
            while True:
                try:
                    header = await reader.readexactly(16)
                except asyncio.IncompleteReadError:
                    return
                size, op, _flags, request_id = frame.HEADER.unpack(header)
                await reader.readexactly(size)
                body = (enc({"protocol": 1, "server": "x", "max_frame": 1 << 20,
                             "max_batch": BATCH_RECORDS_MAX}) if op == OP_HELLO
                        else b"\x81\xa1a" + b"\x91" * 100_000 + b"\x01")
                writer.write(frame.encode(op, request_id, body))

        fake = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = fake.sockets[0].getsockname()[1]
        client = await AsyncClient.connect("127.0.0.1", port)
        with pytest.raises(ProtocolError, match="undecodable"):
            await client.call("BALANCES", {})
        client.close()
        fake.close()
    run(main())


# -- the admin commands follow the pages -------------------------------------------

def test_admin_commands_page_and_split_what_the_wire_bounds():
    from support.servers import admin_main
    eng = engine_with_a_user_holding(np.arange(1, 1101))
    with RealServer(engine=eng) as running:
        where = ["--connect", f"127.0.0.1:{running.server.config.host_port[1]}"]
        code, out, err = admin_main(["coupons", *where, "--user", "1"])
        assert code == 0 and [r["id"] for r in json.loads(out)["results"]] == list(range(1, 1101))
        users = ",".join(str(u) for u in range(1, 1501))
        code, out, err = admin_main(["balances", *where, "--users", users, "--format", "csv"])
        assert code == 1 and "1498 not found" in err
        assert len(out.splitlines()) == 1 + 1500


def test_the_bounded_listings_match_the_reference():
    """COUPONS pages and the bounded QUOTE explain, engine against tests/support/reference.py."""
    from support.lockstep import Pair
    from support.reference import Reference
    from engine.protocol.records import ISSUE_RECORD
    pair = Pair(Engine, Reference, 1_700_000_000_000)
    pair.call("MERCHANTS", {"merchants": [{"id": 1, "fee_bps": 0}]})
    pair.call("WALLETS", {"users": [1]})
    pair.call("TOPUP", {"topups": [{"id": 1, "user": 1, "amount": 10**6}]})
    pair.call("STOCKS", {"stocks": [{"id": 1, "funder": "platform", "kind": "fixed", "value": 1,
                                     "valid_from": 0, "valid_until": 2**62,
                                     "stacking": "stackable", "merchants": [1]}]})
    issue = np.zeros(1030, ISSUE_RECORD)
    issue["coupon"], issue["stock"], issue["user"] = np.arange(1030, 0, -1) * 3, 1, 1
    pair.issue(issue)
    first = pair.call("COUPONS", {"user": 1})
    assert first["next"] == 1024 * 3
    pair.call("COUPONS", {"user": 1, "after": first["next"]})
    pair.call("COUPONS", {"user": 1, "after": 5, "limit": 2})
    pair.call("COUPONS", {"user": 1, "limit": 0})
    quote = pair.call("QUOTE", {"payer": 1, "merchant": 1, "amount": 1000, "coupons": [3090]})
    assert quote["explain_omitted"] == 6


def test_get_payments_replies_are_built_off_the_writers_thread(monkeypatch):
    """The writer only copies the rows a GET_PAYMENTS reply needs; the
    reply's Python objects are made in the reply thread while the writer
    goes on (engine/server/writer.py built_off_writer). The reply is the
    same as the embedded Engine's, which builds it at once."""
    import engine.core.ops.money as money
    built_in = []
    original = money.payment_result

    def recording(*args):
        built_in.append(threading.current_thread().name)
        return original(*args)
    monkeypatch.setattr(money, "payment_result", recording)

    async def main():
        server, c = await started_with_world()
        _op, flags, _rid, _body = await c.call(16, pay_body([1, 2, 3]), 5)
        assert not flags
        flags, reply = await c.map(42, {"ids": [1, 2, 3, 99]}, 6)
        assert not flags and [r["status"] for r in reply["results"]] == [
            0, 0, 0, Status.payment_not_found]
        assert reply == server.engine.call("GET_PAYMENTS", {"ids": [1, 2, 3, 99]})
        await server.stop()
    run(main())
    over_the_wire = built_in[:3]
    assert len(over_the_wire) == 3 and all(
        name.startswith("scanpay-replies") for name in over_the_wire), built_in
    assert built_in[3:] == [threading.main_thread().name] * 3     # the embedded call
