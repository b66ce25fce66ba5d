"""Clients (engine/client/__init__.py), admin commands (engine/cli/admin.py) and the
locust file, against a small fake server written from docs/reference/protocol.md
(tests/support/fake_server.py, which holds the client to the spec, not to shared
helpers), and against the real server when it can be started.
"""
import asyncio
import hashlib
import hmac
import json
import os
import shutil
import socket
import subprocess
import threading
import time

import msgspec
import numpy as np
import pytest

from engine import client as client_module

from engine.client import (AsyncClient, BadFrame, Client, ConnectionLost, Forbidden,
                           FrameTooLarge, HelloInfo, NotAuthenticated, PayResult,
                           UnsupportedProtocol, encode_frame, error_from_frame)
from engine.protocol.limits import BATCH_RECORDS_MAX
from engine.protocol.errors import BadBody, Busy, EngineError, NotLeader, Unavailable, UnknownOp
from engine.protocol.records import ISSUE_RECORD, ISSUE_RESULT, PAY_RECORD, PAY_RESULT
from engine.ports import free_port
from engine.protocol.status import ErrorCode

from support import ROOT  # noqa: E402
from support.fake_server import CLOSING, HDR, KEY_ID, SECRET, FakeServer  # noqa: E402
from support.servers import RealServer, admin_main, pay_batch, setup_world  # noqa: E402
ERROR_CLASSES = {
    ErrorCode.bad_frame: BadFrame, ErrorCode.frame_too_large: FrameTooLarge,
    ErrorCode.unknown_op: UnknownOp, ErrorCode.bad_body: BadBody,
    ErrorCode.not_authenticated: NotAuthenticated, ErrorCode.forbidden: Forbidden,
    ErrorCode.busy: Busy, ErrorCode.unavailable: Unavailable,
    ErrorCode.unsupported_protocol: UnsupportedProtocol, ErrorCode.not_leader: NotLeader,
}


@pytest.fixture
def real(impl):
    """The shared real server (tests/conftest.py), once per client implementation."""
    with RealServer() as server:
        yield server


@pytest.fixture
def fake(impl):
    with FakeServer() as server:
        yield server


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


# -- frames ----------------------------------------------------------------------------

def test_frame_round_trip_matches_the_spec_layout():
    records = pay_batch(3)
    frame = encode_frame(16, 2**64 - 1, memoryview(records.view(np.uint8)))
    size, op, flags, rid = HDR.unpack_from(frame)
    assert (size, op, flags, rid) == (240, 16, 0, 2**64 - 1)
    assert bytes(frame[16:]) == records.tobytes()
    assert np.array_equal(np.frombuffer(bytes(frame[16:]), PAY_RECORD), records)
    from engine.protocol import frame as lead_frame     # the server's encoder agrees byte for byte
    assert bytes(encode_frame(37, 9, b"\x80")) == lead_frame.encode(37, 9, b"\x80")


def test_op_table_matches_the_spec_and_dispatch():
    from engine.core import dispatch
    from engine.protocol import ops
    assert client_module.OPS is ops.OP_CODES        # one table: no copy in the client
    for name, spec_op in dispatch.MAP_OPS.items():
        assert client_module.OPS[name] == spec_op.code
    for name, code in ops.PLANNED_OPS.items():
        assert client_module.OPS[name] == code
    spec = {"HELLO": 1, "PING": 2, "PAY": 16, "ISSUE": 17, "MERCHANTS": 32, "QUOTE": 37,
            "BALANCES": 43, "AUDIT": 45, "COUPONS": 49, "CLOCK": 50}
    assert all(client_module.OPS[name] == code for name, code in spec.items())
    assert len(set(client_module.OPS.values())) == len(client_module.OPS)


@pytest.mark.parametrize("code", list(ErrorCode))
def test_error_body_maps_to_its_exception(code):
    body = msgspec.msgpack.encode({"code": int(code), "name": code.name,
                                   "message": "why", "retryable": False})
    error = error_from_frame(45, 3, body)
    assert type(error) is ERROR_CLASSES[code]
    assert isinstance(error, EngineError)
    assert (error.code, error.message, error.op, error.request_id) == (code, "why", 45, 3)
    assert error.retryable == (code in (ErrorCode.busy, ErrorCode.unavailable, ErrorCode.not_leader))


def test_unknown_error_code_from_a_newer_server():
    body = msgspec.msgpack.encode({"code": 42, "name": "slow_down", "message": "m",
                                   "retryable": True})
    error = error_from_frame(16, 1, body)
    assert isinstance(error, client_module.ServerError) and isinstance(error, EngineError)
    assert (error.code, error.name, error.retryable) == (42, "slow_down", True)


def test_hello_mac_is_the_spec_hmac():
    request = client_module.hello_request(KEY_ID, SECRET, ts_ms=1_700_000_000_123,
                                          nonce="0123456789abcdef0123456789abcdef")
    expected = hmac.new(SECRET.encode(), b"1700000000123.0123456789abcdef0123456789abcdef.gw-1",
                        hashlib.sha256).digest()
    assert request["mac"] == expected and len(request["mac"]) == 32
    assert request["protocol"] == 1 and request["key_id"] == KEY_ID
    fresh = client_module.hello_request(KEY_ID, SECRET)
    assert len(fresh["nonce"]) == 32 and int(fresh["nonce"], 16) >= 0
    assert abs(fresh["ts"] - time.time() * 1000) < 60_000
    # MessagePack bin, not str: a decoder sees bytes.
    assert isinstance(msgspec.msgpack.decode(msgspec.msgpack.encode(fresh))["mac"], bytes)


def test_one_hello_mac_signs_and_checks():
    """The client signs and the server checks with the same helper
    (engine/protocol/auth.py), so the two cannot disagree on its arguments."""
    from engine.protocol import auth
    assert client_module.hello_mac is auth.hello_mac
    now_ms = time.time_ns() // 1_000_000
    authenticator = auth.Authenticator([auth.Key(KEY_ID, SECRET, auth.ROLE_GATEWAY)],
                                       started_ms=now_ms - 1000)
    identity = authenticator.check(client_module.hello_request(KEY_ID, SECRET), now_ms)
    assert (identity.role, identity.key_id) == (auth.ROLE_GATEWAY, KEY_ID)
    forged = client_module.hello_request(KEY_ID, SECRET + "x")
    with pytest.raises(ValueError, match="mac does not match"):
        authenticator.check(forged, now_ms)


def test_parse_address():
    parse = client_module.parse_address
    assert parse("tcp://127.0.0.1:7411") == ("127.0.0.1", 7411)
    assert parse("[::1]:9000") == ("::1", 9000)
    assert parse("localhost") == ("localhost", 7411)
    with pytest.raises(ValueError):
        parse("host:http")


# -- AsyncClient ---------------------------------------------------------------------

def test_async_hello_ping_pay_issue_call(fake, impl):
    async def main():
        async with await AsyncClient.connect("127.0.0.1", fake.port) as c:
            assert c._impl is client_module.IMPLEMENTATIONS[impl]
            assert isinstance(c.server_info, HelloInfo)
            assert (c.server_info.protocol, c.server_info.max_batch, c.server_info.currency) == (1, BATCH_RECORDS_MAX, "CNY")
            await c.ping()
            out = await c.pay(pay_batch(5))
            assert out.dtype == PAY_RESULT and list(out["id"]) == [1, 2, 3, 4, 5]
            issued = np.zeros(2, ISSUE_RECORD)
            issued["coupon"] = [10, 11]
            out = await c.issue(issued)
            assert out.dtype == ISSUE_RESULT and list(out["coupon"]) == [10, 11]
            assert await c.call("quote", {"payer": 1}) == {"echo": {"payer": 1}}
    run(main())


def test_pipelining_matches_every_reply_to_its_request(fake):
    async def main():
        async with await AsyncClient.connect("127.0.0.1", fake.port) as c:
            rng = np.random.default_rng(1)
            delays = rng.integers(0, 30, 400).tolist()
            replies = await asyncio.gather(*(
                c.call("QUOTE", {"n": i, "delay_ms": d}) for i, d in enumerate(delays)))
            assert [r["echo"]["n"] for r in replies] == list(range(400))
            assert c.in_flight == 0
    run(main())
    assert fake.in_flight_peak > 50     # they really were in flight together
    assert fake.frames[37] == 400


def test_concurrent_pay_one_calls_share_frames(fake):
    async def main():
        async with await AsyncClient.connect("127.0.0.1", fake.port) as c:
            results = await asyncio.gather(*(
                c.pay_one(id=i, payer=42, merchant=7, amount=100 + i, coupons=(i,) if i % 2 else ())
                for i in range(1, 1001)))
            assert all(isinstance(r, PayResult) and r.ok for r in results)
            assert [r.id for r in results] == list(range(1, 1001))
            assert [r.cash for r in results] == [100 + i for i in range(1, 1001)]
            assert c.batches_sent == 1
            single = await c.pay_one(id=5000, payer=1, merchant=1, amount=1)
            assert single.id == 5000 and single.status_name == "ok" and single.coupons == ()
    run(main())
    assert fake.frames[16] == 2 and fake.batch_sizes[16] == [1000, 1]


@pytest.mark.usefixtures("impl")
def test_coalescing_splits_at_max_batch():
    with FakeServer(max_batch=64) as server:
        async def main():
            async with await AsyncClient.connect("127.0.0.1", server.port) as c:
                paid = asyncio.gather(*(c.pay_one(id=i, payer=1, merchant=1, amount=1)
                                        for i in range(1, 201)))
                issued = asyncio.gather(*(c.issue_one(coupon=i, stock=2, user=3)
                                          for i in range(1, 71)))
                paid, issued = await paid, await issued
                assert [r.id for r in paid] == list(range(1, 201))
                assert [r.coupon for r in issued] == list(range(1, 71))
                with pytest.raises(ValueError, match="1..64"):
                    await c.pay(pay_batch(65))
        run(main())
        assert server.batch_sizes[16] == [64, 64, 64, 8]
        assert server.batch_sizes[17] == [64, 6]


def test_bad_single_call_fails_alone(fake):
    async def main():
        async with await AsyncClient.connect("127.0.0.1", fake.port) as c:
            good = asyncio.ensure_future(c.pay_one(id=1, payer=1, merchant=1, amount=5))
            with pytest.raises(ValueError, match="at most 4 coupons"):
                await c.pay_one(id=2, payer=1, merchant=1, amount=5, coupons=(1, 2, 3, 4, 5))
            with pytest.raises(ValueError, match="amount"):
                await c.pay_one(id=3, payer=1, merchant=1, amount=2**63)
            assert (await good).ok
            with pytest.raises(TypeError, match="dtype"):
                await c.pay(np.zeros(1, ISSUE_RECORD))
            with pytest.raises(ValueError):
                await c.pay(np.zeros(0, PAY_RECORD))
    run(main())


@pytest.mark.parametrize("code", list(ErrorCode))
def test_async_error_frames_raise_typed_exceptions(fake, code):
    async def main():
        async with await AsyncClient.connect("127.0.0.1", fake.port) as c:
            with pytest.raises(ERROR_CLASSES[code]) as caught:
                await c.call("STATS", {"error_code": int(code)})
            assert caught.value.message == f"fake {code.name}"
            await asyncio.sleep(0.05)
            if code in CLOSING:       # the server closed: later calls fail fast
                with pytest.raises(ConnectionLost):
                    await c.ping()
            else:
                await c.ping()
    run(main())


def test_unknown_op_and_oversized_frame(fake):
    async def main():
        async with await AsyncClient.connect("127.0.0.1", fake.port) as c:
            with pytest.raises(UnknownOp):
                await c.call(99, {})
            with pytest.raises(ValueError, match="unknown op"):
                await c.call("NOPE", {})
        fake.max_frame = 1000
        async with await AsyncClient.connect("127.0.0.1", fake.port) as c:
            with pytest.raises(FrameTooLarge):
                await c.call("QUOTE", {"blob": "x" * 2000})
    run(main())


@pytest.mark.usefixtures("impl")
def test_hmac_hello_accepted_and_refused():
    with FakeServer(keys={KEY_ID: SECRET}) as server:
        async def main():
            async with await AsyncClient.connect("127.0.0.1", server.port,
                                                 key_id=KEY_ID, secret=SECRET) as c:
                assert c.server_info.server == "fake/1"
                assert (await c.call("QUOTE", {"a": 1}))["echo"] == {"a": 1}
            with pytest.raises(NotAuthenticated):
                await AsyncClient.connect("127.0.0.1", server.port, key_id=KEY_ID,
                                          secret="not-the-secret-at-all")
        run(main())
        with socket.create_connection(("127.0.0.1", server.port), 5) as raw:
            raw.sendall(HDR.pack(0, 2, 0, 77))      # PING before HELLO
            size, op, flags, rid = HDR.unpack(raw.recv(16))
            body = msgspec.msgpack.decode(raw.recv(size))
            assert (op, flags, rid, body["name"]) == (2, 1, 77, "not_authenticated")


def test_async_timeout_then_late_reply_is_ignored(fake):
    async def main():
        async with await AsyncClient.connect("127.0.0.1", fake.port, timeout_ms=2000) as c:
            with pytest.raises(TimeoutError):
                await c.call("QUOTE", {"delay_ms": 300}, timeout_ms=50)
            await asyncio.sleep(0.4)        # the late reply arrives and is dropped
            assert (await c.call("QUOTE", {"n": 1}))["echo"] == {"n": 1}
            slow = asyncio.ensure_future(c.call("QUOTE", {"delay_ms": 1000}))
            await asyncio.sleep(0.05)
            c.close()
            with pytest.raises(ConnectionLost):
                await slow
    run(main())


class CountingTransport:
    """Counts request frames written and replies delivered: the requests on
    the wire, as the client sees them (the fake's own count lags by its
    writer.drain())."""

    def __init__(self, client):
        self.real, self.client = client._transport, client
        self.written = self.answered = self.peak = 0
        self.deliver = client._deliver
        client._deliver = self._delivered

    def write(self, data):
        at = 0
        while at < len(data):
            at += 16 + HDR.unpack_from(data, at)[0]
            self.written += 1
        self.peak = max(self.peak, self.written - self.answered)
        self.real.write(data)

    def _delivered(self, *frame):
        self.answered += 1
        self.deliver(*frame)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_in_flight_max_bounds_requests_on_the_wire(fake):
    async def main():
        async with await AsyncClient.connect("127.0.0.1", fake.port, in_flight_max=5) as c:
            wire = c._transport = CountingTransport(c)
            calls = asyncio.gather(*(c.call("QUOTE", {"n": i, "delay_ms": 20})
                                     for i in range(40)))
            pays = asyncio.gather(*(c.pay_one(id=i, payer=1, merchant=1, amount=i)
                                    for i in range(1, 30)))
            await asyncio.sleep(0)
            assert c.in_flight == 5
            waiting = asyncio.ensure_future(c.call("QUOTE", {"n": -1, "delay_ms": 20}))
            await asyncio.sleep(0)
            assert not waiting.done()
            waiting.cancel()                      # a caller that gives up while waiting
            replies, paid = await calls, await pays
            assert [r["echo"]["n"] for r in replies] == list(range(40))
            assert [p.cash for p in paid] == list(range(1, 30))
            assert c.in_flight == 0 and not [w for w in c._room_waiters if not w.done()]
            assert wire.peak == 5 and wire.written == wire.answered > 40
        # A pay_one opening a coalesced frame takes its slot at once: a call
        # made later in the same tick must not slip in ahead of it.
        async with await AsyncClient.connect("127.0.0.1", fake.port, in_flight_max=2) as c:
            wire = c._transport = CountingTransport(c)
            slow = asyncio.ensure_future(c.call("QUOTE", {"delay_ms": 50}))
            await asyncio.sleep(0)
            both = await asyncio.gather(c.pay_one(id=1, payer=1, merchant=1, amount=7),
                                        c.call("QUOTE", {"n": 2}))
            assert both[0].cash == 7 and both[1]["echo"] == {"n": 2}
            assert (await slow)["echo"]["delay_ms"] == 50
            assert wire.peak == 2
    run(main())


def test_a_woken_waiter_that_is_cancelled_passes_the_slot_on(fake):
    async def main():
        async with await AsyncClient.connect("127.0.0.1", fake.port, in_flight_max=1) as c:
            x = asyncio.ensure_future(c.call("QUOTE", {"delay_ms": 500}))
            await asyncio.sleep(0)
            a = asyncio.ensure_future(c.call("QUOTE", {"n": "a"}))
            b = asyncio.ensure_future(c.call("QUOTE", {"n": "b"}))
            await asyncio.sleep(0)
            assert len(c._room_waiters) == 2
            x.cancel()
            await asyncio.sleep(0)        # x gives its slot up and wakes a ...
            a.cancel()                    # ... which is cancelled before it runs
            assert (await asyncio.wait_for(b, 5))["echo"] == {"n": "b"}
            assert a.cancelled() and x.cancelled()
    run(main())


def test_pay_waits_for_room_and_a_cancelled_pay_passes_its_slot_on(fake):
    """pay() sends on its own (not through _request) when there is room: it
    must still keep to in_flight_max, and a caller that gives up while its
    frame is in flight must free the slot for the one waiting."""
    async def main():
        async with await AsyncClient.connect("127.0.0.1", fake.port, in_flight_max=3) as c:
            wire = c._transport = CountingTransport(c)
            outs = await asyncio.gather(*(c.pay(pay_batch(2, start_id=10 * i)) for i in range(1, 21)))
            assert [list(o["id"]) for o in outs] == [[10 * i, 10 * i + 1] for i in range(1, 21)]
            assert wire.peak == 3 and c.in_flight == 0
        async with await AsyncClient.connect("127.0.0.1", fake.port, in_flight_max=1) as c:
            first = asyncio.ensure_future(c.pay(pay_batch(1, start_id=1)))
            second = asyncio.ensure_future(c.pay(pay_batch(1, start_id=2)))
            await asyncio.sleep(0)
            assert c.in_flight == 1 and len(c._room_waiters) == 1
            first.cancel()
            out = await asyncio.wait_for(second, 5)
            assert first.cancelled() and list(out["id"]) == [2]
            assert c.in_flight == 0 and list((await c.pay(pay_batch(1, start_id=3)))["id"]) == [3]
    run(main())


def test_default_timeouts_expire_in_order_without_a_timer_each(fake):
    """Requests on the client's own timeout share one sweep timer; those on a
    timeout of their own keep a timer; both expire, answered ones do not."""
    async def main():
        async with await AsyncClient.connect("127.0.0.1", fake.port, timeout_ms=200) as c:
            calls = [c.call("QUOTE", {"n": i, "delay_ms": d}, timeout_ms=t)
                     for i, (d, t) in enumerate([(600, None), (10, None), (600, 400),
                                                 (600, None), (20, 1000), (5, None)])]
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            assert [type(o).__name__ for o in outcomes] == [
                "TimeoutError", "dict", "TimeoutError", "TimeoutError", "dict", "dict"]
            assert c.in_flight == 0 and c._sweep is None
            assert (await c.call("QUOTE", {"n": 9}))["echo"] == {"n": 9}
            c.timeout_ms = 1000               # the default of the requests sent from now on
            assert (await c.call("QUOTE", {"delay_ms": 300}))["echo"] == {"delay_ms": 300}
            assert c.timeout_ms == 1000 and c.in_flight == 0
    run(main())


def test_connect_refused():
    port = free_port()
    with pytest.raises(ConnectionRefusedError):
        run(AsyncClient.connect("127.0.0.1", port))
    with pytest.raises(ConnectionRefusedError):
        Client.connect("127.0.0.1", port)


# -- blocking Client --------------------------------------------------------------------

def test_blocking_client_calls(fake):
    with Client.connect("127.0.0.1", fake.port) as c:
        assert c.server_info.max_batch == BATCH_RECORDS_MAX and c.server_info.hold_ms == 7 * 86_400_000
        c.ping()
        out = c.pay(pay_batch(64))
        assert list(out["id"]) == list(range(1, 65))
        r = c.pay_one(id=9, payer=1, merchant=2, amount=300, coupons=(4, 5))
        assert r.ok and r.id == 9 and r.cash == 300
        i = c.issue_one(coupon=3, stock=2, user=1)
        assert i.ok and i.coupon == 3 and i.expires_at == 99
        assert c.call("BALANCES", {"users": [1]}) == {"echo": {"users": [1]}}
        with pytest.raises(UnknownOp):
            c.call(77, {})
        with pytest.raises(Busy) as caught:
            c.call("STATS", {"error_code": 7})
        assert caught.value.retryable
        c.ping()
        with pytest.raises(TimeoutError):
            c.call("QUOTE", {"delay_ms": 300}, timeout_ms=50)
        assert c.call("QUOTE", {"n": 2}) == {"echo": {"n": 2}}   # stale reply skipped
        with pytest.raises(BadFrame):
            c.call("STATS", {"error_code": 1})
        with pytest.raises(ConnectionLost):
            c.ping()


@pytest.mark.usefixtures("impl")
def test_blocking_client_hmac():
    with FakeServer(keys={KEY_ID: SECRET}) as server:
        with Client.connect("127.0.0.1", server.port, key_id=KEY_ID, secret=SECRET) as c:
            c.ping()
        with pytest.raises(NotAuthenticated):
            Client.connect("127.0.0.1", server.port, key_id="nobody", secret=SECRET)


def test_blocking_client_under_threads(fake):
    """Several blocking clients at once (as locust users are), each in step."""
    errors = []

    def worker(k):
        try:
            with Client.connect("127.0.0.1", fake.port) as c:
                for i in range(50):
                    assert c.call("QUOTE", {"k": k, "i": i}) == {"echo": {"k": k, "i": i}}
        except Exception as e:    # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors


# -- admin commands (fake server backed by an in-memory Engine) ---------------------------

@pytest.fixture
def engine_server():
    from engine import Engine
    with FakeServer(engine=Engine()) as server:
        yield server


def test_admin_writes_from_csv_and_json(engine_server, tmp_path):
    where = ["--connect", f"127.0.0.1:{engine_server.port}"]
    merchants = tmp_path / "merchants.csv"
    merchants.write_text("id,fee_bps,tags,active\n1,60,7;8,true\n2,,,\n3,20000,,\n")
    code, out, _ = admin_main(["merchants", *where, "--file", str(merchants),
                               "--out", str(tmp_path / "r.csv")])
    assert code == 1
    assert "merchants: 2 ok, 1 failed (first: item 2, id 3 invalid_argument" in out
    rows = (tmp_path / "r.csv").read_text().splitlines()
    assert rows[0].startswith("index,id,status,error") and len(rows) == 4

    wallets = tmp_path / "wallets.json"
    wallets.write_text(json.dumps([42, {"id": 43}]))
    assert admin_main(["wallets", *where, "--file", str(wallets)])[0] == 0
    code, out, _ = admin_main(["wallets", *where, "--file", str(wallets)])
    assert code == 0 and "2 ok (2 already there)" in out
    topups = tmp_path / "topups.csv"
    topups.write_text("id,user,amount\n1,42,10000\n2,43,5000\n")
    assert admin_main(["topups", *where, "--file", str(topups)])[0] == 0
    stocks = tmp_path / "stocks.csv"
    stocks.write_text("id,funder,kind,value,valid_from,valid_until,tags,stacking,slots\n"
                      "5,platform,fixed,500,0,2100-01-01T00:00+08:00,7,stackable,0:0:1440;6:0:600\n")
    code, out, _ = admin_main(["stocks", *where, "--file", str(stocks)])
    assert code == 0 and out.startswith("stocks: 1 ok"), out

    code, out, err = admin_main(["balances", *where, "--users", "42,43,99", "--format", "csv"])
    assert code == 1 and "1 not found (first: user 99)" in err
    lines = out.splitlines()
    assert lines[0].startswith("kind,id,status") and "user,42,0,10000" in lines[1]
    code, out, err = admin_main(["audit", *where])
    assert code == 0 and json.loads(out)["ok"] and "audit: ok" in err
    code, out, err = admin_main(["coupons", *where, "--user", "42"])
    assert code == 0 and json.loads(out)["results"] == []


def test_admin_errors_say_what_to_do(tmp_path):
    port = free_port()
    code, _, err = admin_main(["audit", "--connect", f"127.0.0.1:{port}"])
    assert code == 2 and "is `scanpay serve` running there?" in err
    code, _, err = admin_main(["audit", "--unix", str(tmp_path / "nope.sock")])
    assert code == 2 and "no Unix socket" in err
    bad = tmp_path / "m.csv"
    bad.write_text("id,active\n1,maybe\n")
    code, _, err = admin_main(["merchants", "--connect", f"127.0.0.1:{port}", "--file", str(bad)])
    assert code == 2 and "line 2, column active: expected true or false" in err
    with FakeServer(keys={KEY_ID: SECRET}) as server:
        code, _, err = admin_main(["audit", "--connect", f"127.0.0.1:{server.port}"])
        assert code == 2 and "requires a key" in err and "--key-id" in err


# -- locust file ------------------------------------------------------------------------

def test_locustfile_headless_smoke(engine_server, tmp_path):
    locust = os.path.join(ROOT, ".venv", "bin", "locust")
    if not os.path.exists(locust):
        locust = shutil.which("locust")
    assert locust is not None, "locust is not installed: pip install -e '.[test]'"
    env = dict(os.environ, SCANPAY_USERS="50", SCANPAY_MERCHANTS="5")
    proc = subprocess.run(
        [locust, "-f", os.path.join(ROOT, "loadtest", "locustfile.py"), "--headless",
         "-u", "4", "-r", "4", "-t", "3s", "--csv", str(tmp_path / "load"), "--only-summary",
         "--host", f"tcp://127.0.0.1:{engine_server.port}"],
        env=env, capture_output=True, text=True, timeout=25, cwd=ROOT)
    stats = (tmp_path / "load_stats.csv").read_text()
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("PAY", "ISSUE", "QUOTE"):
        assert f"\n{name}," in stats, stats
    assert "Aggregated" in stats


# -- the real server ------------------------------------------------------------------------
# In process (engine.server.Server on a thread with its own loop), so the
# blocking client, admin and locust can talk to it too; and once through the
# `scanpay serve` command.

def test_real_server_async_client(real):
    async def main():
        async with await AsyncClient.connect("127.0.0.1", real.port) as c:
            info = c.server_info
            assert info.protocol == 1 and info.max_batch == BATCH_RECORDS_MAX and info.currency == "CNY"
            assert info.server.startswith("scanpay")
            await c.ping()
            await setup_world(c)
            issued = await asyncio.gather(*(c.issue_one(coupon=100 + i, stock=5, user=1)
                                            for i in range(3)))
            assert all(r.ok and r.expires_at == 2**62 for r in issued)
            quote = await c.call("QUOTE", {"payer": 1, "merchant": 1, "amount": 30_00})
            assert (quote["status"], quote["discount"]) == (0, 5_00)
            paid = await asyncio.gather(*(
                c.pay_one(id=i, payer=1 + i % 2, merchant=1, amount=30_00) for i in range(1, 501)))
            assert [p.id for p in paid] == list(range(1, 501))
            assert all(p.ok for p in paid), {p.status_name for p in paid}
            assert sum(p.discount for p in paid) == 3 * 5_00    # user 1's three coupons
            assert c.batches_sent == 2           # 3 issues in one frame, 500 pays in another
            again = await c.pay_one(id=1, payer=2, merchant=1, amount=30_00)
            assert again.duplicate and again.cash == paid[0].cash
            batch = pay_batch(100, start_id=1000)
            batch["payer"], batch["merchant"] = 2, 2
            out = await c.pay(batch)
            assert (out["status"] == 0).all() and list(out["id"]) == list(range(1000, 1100))
            unknown = await c.pay_one(id=2000, payer=99, merchant=1, amount=1)
            assert unknown.status_name == "payer_not_found"
            with pytest.raises(BadBody):
                await c.call("MERCHANTS", {"not_merchants": []})
            with pytest.raises(UnknownOp):
                await c.call(99, {})
            await c.ping()            # request errors keep the connection
            assert (await c.call("AUDIT"))["ok"]
    run(main())


def test_real_server_pipelining(real):
    async def main():
        async with await AsyncClient.connect("127.0.0.1", real.port) as c:
            await setup_world(c)
            replies = await asyncio.gather(*(
                c.call("BALANCES", {"users": [1 + i % 2]}) for i in range(600)))
            assert [r["users"][0]["id"] for r in replies] == [1 + i % 2 for i in range(600)]
    run(main())


@pytest.mark.usefixtures("impl")
def test_real_server_hmac_and_roles():
    from engine.protocol.auth import Key
    keys = [Key("gw", "gateway-secret-0123456789", "gateway", frozenset({1})),
            Key("ops", "admin-secret-0123456789ab", "admin")]
    with RealServer(keys=keys) as server:
        async def main():
            async with await AsyncClient.connect("127.0.0.1", server.port, key_id="ops",
                                                 secret="admin-secret-0123456789ab") as admin_c:
                await setup_world(admin_c)
            async with await AsyncClient.connect("127.0.0.1", server.port, key_id="gw",
                                                 secret="gateway-secret-0123456789") as gw:
                assert (await gw.pay_one(id=7, payer=1, merchant=1, amount=100)).ok
                with pytest.raises(Forbidden):
                    await gw.call("MERCHANTS", {"merchants": [{"id": 3}]})
            with pytest.raises(NotAuthenticated):
                await AsyncClient.connect("127.0.0.1", server.port, key_id="gw",
                                          secret="wrong-secret-0123456789")
        run(main())
        with Client.connect("127.0.0.1", server.port, key_id="ops",
                            secret="admin-secret-0123456789ab") as c:
            assert c.call("AUDIT")["ok"]
        with pytest.raises(NotAuthenticated):
            Client.connect("127.0.0.1", server.port)     # HELLO without a key
        code, _, err = admin_main(["audit", "--connect", f"127.0.0.1:{server.port}",
                                   "--key-id", "gw", "--secret", "gateway-secret-0123456789"])
        assert code == 2 and "role admin" in err


def test_real_server_blocking_client_and_admin(real, tmp_path):
    with Client.connect("127.0.0.1", real.port) as c:
        assert c.server_info.durability == "none"
        merchants = tmp_path / "m.json"
        merchants.write_text(json.dumps([{"id": 1, "fee_bps": 60}, {"id": 2, "fee": 1}]))
        code, out, _ = admin_main(["merchants", "--connect", f"127.0.0.1:{real.port}",
                                   "--file", str(merchants)])
        assert code == 1 and "1 ok, 1 failed (first: item 1, id 2 invalid_argument" in out
        c.call("WALLETS", {"users": [1]})
        c.call("TOPUP", {"topups": [{"id": 1, "user": 1, "amount": 10_000}]})
        r = c.pay_one(id=1, payer=1, merchant=1, amount=2_500)
        assert r.ok and r.cash == 2_500 and r.fee == 15
        out = c.pay(pay_batch(3, start_id=10))
        assert [Status_name(s) for s in out["status"]] == ["merchant_not_found"] * 3
        code, out, _ = admin_main(["balances", "--connect", f"127.0.0.1:{real.port}",
                                   "--users", "1", "--merchants", "1"])
        balances = json.loads(out)
        assert code == 0 and balances["users"][0]["balance"] == 7_500
        assert balances["merchants"][0]["balance"] == 2_500 - 15


def Status_name(code):
    from engine.protocol.status import STATUS_NAMES
    return STATUS_NAMES[int(code)]


def test_scanpay_serve_command_with_locust(tmp_path):
    """`scanpay serve` as a process, then the documented load test against it."""
    scanpay = os.path.join(ROOT, ".venv", "bin", "scanpay")
    locust = os.path.join(ROOT, ".venv", "bin", "locust")
    assert os.path.exists(scanpay), "no scanpay script: pip install -e '.[test]'"
    port = free_port()
    server = subprocess.Popen([scanpay, "serve", "--data", str(tmp_path / "data"),
                               "--listen", f"127.0.0.1:{port}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                c = Client.connect("127.0.0.1", port, timeout_ms=1000)
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                assert time.monotonic() < deadline, "scanpay serve did not start"
                time.sleep(0.1)
        with c:
            assert c.server_info.durability not in (None, "none")
        assert os.path.exists(locust), "locust is not installed: pip install -e '.[test]'"
        proc = subprocess.run(
            [locust, "-f", os.path.join(ROOT, "loadtest", "locustfile.py"), "--headless",
             "-u", "4", "-r", "4", "-t", "3s", "--csv", str(tmp_path / "load"),
             "--only-summary", "--host", f"tcp://127.0.0.1:{port}"],
            env=dict(os.environ, SCANPAY_USERS="50"), capture_output=True, text=True,
            timeout=30, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        stats = (tmp_path / "load_stats.csv").read_text()
        aggregated = [line for line in stats.splitlines() if ",Aggregated," in line][0]
        assert aggregated.split(",")[3] == "0", stats     # no failures
        code, _, err = admin_main(["audit", "--connect", f"127.0.0.1:{port}"])
        assert code == 0, err
    finally:
        server.terminate()
        server.wait(10)


def test_real_server_unix_socket(tmp_path):
    path = str(tmp_path / "scanpay.sock")
    with RealServer(unix=path) as server:
        async def main():
            async with await AsyncClient.connect(unix=path) as c:
                await c.ping()
                assert (await c.call("AUDIT"))["ok"]
        run(main())
        with Client.connect(unix=path) as c:
            assert c.server_info.protocol == 1
        code, _, err = admin_main(["audit", "--unix", path])
        assert code == 0, err


# -- results are plain ints ---------------------------------------------------------------

def test_results_are_plain_ints_that_json_encodes(fake):
    """PayResult.coupons used to hold np.uint64, which json and msgspec.json refuse."""
    rows = np.zeros(2, PAY_RESULT)
    rows["id"], rows["coupons"][0] = [1, 2**64 - 1], [7, 0, 2**64 - 1, 0]
    rows["cash"] = [-5, 2**63 - 1]
    results = client_module.pay_results(rows)
    assert results[0].coupons == (7, 2**64 - 1) and results[1].id == 2**64 - 1
    values = [v for r in results for v in (*msgspec.structs.astuple(r)[:-1], *r.coupons)]
    assert all(type(v) is int for v in values)
    assert json.loads(msgspec.json.encode(results))[0]["coupons"] == [7, 2**64 - 1]
    json.dumps([msgspec.structs.asdict(r) for r in results])
    issued = np.zeros(1, ISSUE_RESULT)
    issued["coupon"], issued["expires_at"] = 3, 2**64 - 1
    assert msgspec.json.decode(msgspec.json.encode(client_module.issue_results(issued))) == [
        {"coupon": 3, "status": 0, "flags": 0, "expires_at": 2**64 - 1}]

    async def main():
        async with await AsyncClient.connect("127.0.0.1", fake.port) as c:
            r = await c.pay_one(id=5, payer=1, merchant=2, amount=300)
            assert json.loads(msgspec.json.encode(r))["cash"] == 300
    run(main())


def test_a_reply_of_the_wrong_size_fails_every_caller_of_the_frame(impl):
    """A PAY reply body that is not one result per coalesced record is the
    server's bug: each caller gets a ProtocolError, none a wrong result."""
    async def serve(reader, writer):
        size, op, _, rid = HDR.unpack(await reader.readexactly(16))       # HELLO
        await reader.readexactly(size)
        hello = msgspec.msgpack.encode({"protocol": 1})
        writer.write(HDR.pack(len(hello), op, 0, rid) + hello)
        size, op, _, rid = HDR.unpack(await reader.readexactly(16))       # PAY of 3
        await reader.readexactly(size)
        writer.write(HDR.pack(80, op, 0, rid) + bytes(80))    # one result for three records
        await writer.drain()
        await reader.read()

    async def main():
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with await AsyncClient.connect("127.0.0.1", port, timeout_ms=5000) as c:
            calls = [c.pay_one(id=i, payer=1, merchant=1, amount=1) for i in range(3)]
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            assert all(isinstance(o, client_module.ProtocolError) for o in outcomes), outcomes
            assert "expected 3 results, got 1" in str(outcomes[0])
        server.close()
    run(main())


# -- the pool ------------------------------------------------------------------------------

def test_pool_bounds_its_connections(fake):
    async def main():
        pool = await client_module.create_pool("127.0.0.1", fake.port, min_size=1, max_size=2,
                                               timeout_ms=2000)
        assert (pool.size, pool.idle) == (1, 1)
        held = [await pool.acquire(), await pool.acquire()]
        assert pool.size == 2 and held[0] is not held[1]
        with pytest.raises(TimeoutError, match="max_size 2"):
            await pool.acquire(timeout_ms=100)
        third = asyncio.ensure_future(pool.acquire())
        await asyncio.sleep(0.05)
        assert not third.done() and pool.size == 2       # waits for a release
        pool.release(held[0])
        assert await third is held[0]                     # the same connection, reused
        peak = 0

        async def user(i):
            nonlocal peak
            async with pool.acquire() as conn:
                peak = max(peak, pool.size)
                return (await conn.pay_one(id=i, payer=1, merchant=1, amount=i)).cash
        pool.release(held[1])
        pool.release(await third)
        assert await asyncio.gather(*(user(i) for i in range(1, 41))) == list(range(1, 41))
        assert peak <= 2 and pool.size == 2 and pool.replaced == 0
        with pytest.raises(ValueError, match="does not belong"):
            pool.release(held[1])
        await pool.close()
        with pytest.raises(client_module.PoolClosed):
            await pool.acquire()
    run(main())
    with pytest.raises(ValueError, match="min_size"):
        client_module.Pool("127.0.0.1", 1, min_size=3, max_size=2, timeout_ms=1,
                           connect_kwargs={})


def test_pool_replaces_a_lost_connection(fake):
    async def main():
        async with await client_module.create_pool("127.0.0.1", fake.port, min_size=2,
                                                   max_size=2) as pool:
            async with pool.acquire() as first:
                await first.ping()
            first._transport.close()                      # lost while idle
            await asyncio.sleep(0.05)
            async with pool.acquire() as conn:
                # the server closes the stream after a bad_frame error: lost while held
                with pytest.raises(BadFrame):
                    await conn.call("STATS", {"error_code": int(ErrorCode.bad_frame)})
            await asyncio.sleep(0.05)
            assert pool.size <= 2
            conns = [await pool.acquire(), await pool.acquire()]
            for conn in conns:
                assert conn._closed is None and conn is not first
                assert (await conn.pay_one(id=9, payer=1, merchant=1, amount=3)).cash == 3
                pool.release(conn)
            assert pool.replaced == 2 and pool.size == 2
        assert pool.size == 0
    run(main())


def test_pool_survives_a_server_restart(impl):
    async def main(port):
        pool = await client_module.create_pool("127.0.0.1", port, min_size=2, max_size=2,
                                               timeout_ms=2000)
        return pool
    with FakeServer() as server:
        port = server.port
        loop = asyncio.new_event_loop()
        pool = loop.run_until_complete(main(port))
        async def use():
            async with pool.acquire() as conn:
                return (await conn.pay_one(id=1, payer=1, merchant=1, amount=4)).cash
        assert loop.run_until_complete(use()) == 4
    with FakeServer() as again:                           # a new server (new port)
        pool.port = again.port                            # same address in real life
        loop.run_until_complete(asyncio.sleep(0.1))
        assert loop.run_until_complete(use()) == 4
        assert pool.replaced >= 1 and pool.size <= 2
        loop.run_until_complete(pool.close())
        loop.close()
