"""The ISO 8583 adapter (engine/iso8583/__init__.py) against a real `scanpay serve`.

Messages are built and read with pyiso8583 here, from its bundled spec, not
with the adapter's encoder; the payment id is recomputed from the recipe of
docs/iso8583.md with this file's own hashlib call.
"""
import asyncio
import hashlib
import itertools
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request

import iso8583
import pytest
from iso8583.specs import default_ascii as SPEC

from engine.iso8583 import mapping as iso8583_map
from engine.client import AsyncClient, Client
from engine.server.config import Config, parse_key
from engine.iso8583 import Adapter
from engine.iso8583.mapping import IsoConfigError, config_from, load_config
from engine.server.server import Server
from engine.ports import free_port

from support import ROOT  # noqa: E402
EXAMPLE_CONFIG = os.path.join(ROOT, "docs", "iso8583.example.toml")
MERCHANT_DE42, OTHER_DE42, UNKNOWN_DE42 = "MERCHANT0000001", "MERCHANT0000002", "NOSUCHMERCHANT1"
TERMINAL, ACQUIRER, CNY = "TERM0001", "12345", "156"
BALANCE = 1_000_00
STOCK = 5                       # platform coupon: 5.00 off from 20.00, merchants tagged 7
COINS = itertools.count(1)      # fresh ids for users, RRNs, STANs, coupons
TIMEOUT_S = 10


# -- the server and the world ----------------------------------------------------------------

@pytest.fixture(scope="module")
def engine_port(tmp_path_factory):
    """A real `scanpay serve` process (durable, on a temp dir) with two merchants."""
    data = tmp_path_factory.mktemp("iso") / "data"
    port = free_port()
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--data", str(data),
                             "--listen", f"127.0.0.1:{port}"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = connect_when_up(proc, port)
        with client:
            client.call("MERCHANTS", {"merchants": [{"id": 1, "fee_bps": 60, "tags": [7]},
                                                    {"id": 2, "fee_bps": 0}]})
            client.call("STOCKS", {"stocks": [{
                "id": STOCK, "funder": "platform", "kind": "fixed", "value": 5_00,
                "min_spend": 20_00, "valid_from": 0, "valid_until": 2**62, "tags": [7],
                "stacking": "stackable"}]})
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)


def connect_when_up(proc, port) -> Client:
    deadline = time.monotonic() + 20
    while True:
        try:
            return Client.connect("127.0.0.1", port, timeout_ms=5000)
        except OSError:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "scanpay serve did not start"
            time.sleep(0.1)


async def shopper(client: AsyncClient, balance=BALANCE, coupon=False) -> int:
    user = 10_000 + next(COINS)
    await client.call("WALLETS", {"users": [user]})
    await client.call("TOPUP", {"topups": [{"id": user, "user": user, "amount": balance}]})
    if coupon:
        import numpy as np
        from engine.protocol.records import ISSUE_RECORD
        records = np.zeros(1, ISSUE_RECORD)
        records[0] = (user, STOCK, user, 0)
        assert (await client.issue(records))[0]["status"] == 0
    return user


async def payment_code(client: AsyncClient, user: int) -> str:
    reply = await client.call("PAYMENT_CODE", {"user": user})
    assert reply["status"] == 0
    return str(reply["code"])


async def balance(client: AsyncClient, user: int) -> int:
    return (await client.call("BALANCES", {"users": [user]}))["users"][0]["balance"]


def expected_payment_id(acquirer, merchant, terminal, rrn) -> int:
    """docs/iso8583.md: BLAKE2b-64 of the domain and the four fields, top bit set."""
    text = b"scanpay-iso8583-v1\x00" + "\x1f".join((acquirer, merchant, terminal, rrn)).encode()
    return (1 << 63) | int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")


async def payment(client: AsyncClient, rrn: str, merchant=MERCHANT_DE42) -> dict:
    reply = await client.call("GET_PAYMENTS", {"ids": [expected_payment_id(
        ACQUIRER, merchant, TERMINAL, rrn)]})
    return reply["results"][0]


# -- messages (pyiso8583, not the adapter) -----------------------------------------------------

def new_rrn() -> str:
    return f"{next(COINS):012d}"


def new_stan() -> str:
    return f"{next(COINS) % 1_000_000:06d}"


def message(mti, *, rrn=None, code=None, amount=None, stan=None, terminal=TERMINAL,
            merchant=MERCHANT_DE42, currency=CNY, **extra) -> dict:
    doc = {"t": mti, "3": "000000", "7": "1206153000", "11": stan or new_stan(),
           "32": ACQUIRER, "41": terminal, "42": merchant}
    if rrn is not None:
        doc["37"] = rrn
    if code is not None:
        doc["2"] = code
    if amount is not None:
        doc["4"] = f"{amount:012d}"
    if currency:
        doc["49"] = currency
    doc.update(extra)
    return doc


def echo() -> dict:
    return {"t": "0800", "7": "1206153000", "11": new_stan(), "70": "301"}


def framed(raw: bytes, framing="binary2") -> bytes:
    prefix = struct.pack(">H", len(raw)) if framing == "binary2" else b"%04d" % len(raw)
    return prefix + raw


def encoded(doc: dict, spec=SPEC) -> bytes:
    raw, _ = iso8583.encode(dict(doc), spec)
    return bytes(raw)


class Terminal:
    """An acquirer's link: pyiso8583 messages, length-prefixed."""

    def __init__(self, reader, writer, framing, spec=SPEC):
        self.reader, self.writer, self.framing, self.spec = reader, writer, framing, spec

    @classmethod
    async def open(cls, adapter: Adapter, framing="binary2", spec=SPEC) -> "Terminal":
        reader, writer = await asyncio.open_connection(*adapter.address)
        return cls(reader, writer, framing, spec)

    def send(self, *docs) -> None:
        self.writer.write(b"".join(framed(encoded(d, self.spec), self.framing) for d in docs))

    def send_raw(self, raw: bytes) -> None:
        self.writer.write(framed(raw, self.framing))

    async def recv(self) -> dict:
        header = await asyncio.wait_for(
            self.reader.readexactly(2 if self.framing == "binary2" else 4), TIMEOUT_S)
        size = struct.unpack(">H", header)[0] if self.framing == "binary2" else int(header)
        raw = await asyncio.wait_for(self.reader.readexactly(size), TIMEOUT_S)
        doc, _ = iso8583.decode(raw, self.spec)
        return doc

    async def call(self, doc: dict) -> dict:
        self.send(doc)
        reply = await self.recv()
        assert (reply["11"], reply["41"] if "41" in reply else None) == (
            doc["11"], doc.get("41")), "a reply to another message"
        return reply

    async def closed(self) -> bool:
        try:
            return await asyncio.wait_for(self.reader.read(1), TIMEOUT_S) == b""
        except ConnectionResetError:
            return True

    def close(self):
        self.writer.close()


def adapter_config(engine_port, **settings):
    section = {"listen": "127.0.0.1:0", "engine": f"127.0.0.1:{engine_port}",
               "merchants": {MERCHANT_DE42: 1, OTHER_DE42: 2}, **settings}
    return config_from(section, {})


def run(engine_port, scenario, **settings):
    """Start an adapter on this loop, run `scenario(adapter, engine_client)`, stop."""
    async def main():
        adapter = Adapter(adapter_config(engine_port, **settings))
        await adapter.start()
        client = await AsyncClient.connect("127.0.0.1", engine_port)
        try:
            return await asyncio.wait_for(scenario(adapter, client), 60)
        finally:
            client.close()
            await adapter.stop()
    return asyncio.run(main())


# -- 0200 / 0210 ------------------------------------------------------------------------------

def test_0200_pays_with_the_payment_code_and_the_coupon_shows_in_de54(engine_port):
    async def scenario(adapter, client):
        user = await shopper(client, coupon=True)
        code, rrn = await payment_code(client, user), new_rrn()
        term = await Terminal.open(adapter)
        request = message("0200", rrn=rrn, code=code, amount=30_00)
        reply = await term.call(request)
        assert reply["t"] == "0210" and reply["39"] == "00"
        assert reply["37"] == rrn and reply["4"] == "000000003000" and reply["49"] == CNY
        assert reply["38"].isdigit() and len(reply["38"]) == 6
        assert "2" not in reply       # the payment code is not echoed
        # DE54: discount (type 91, C) and the cash actually charged (type 92, D)
        assert reply["54"] == f"0091{CNY}C{5_00:012d}0092{CNY}D{25_00:012d}"
        assert await balance(client, user) == BALANCE - 25_00
        stored = await payment(client, rrn)
        assert stored["state"] == "completed" and stored["amount"] == 30_00
        assert stored["cash"] == 25_00 and stored["discount"] == 5_00 and stored["merchant"] == 1
        # 0201 repeat and a retransmitted 0200 (new STAN): the same payment, once
        repeat = await term.call(dict(request, t="0201"))
        again = await term.call(dict(request, **{"11": new_stan()}))
        for r in (repeat, again):
            assert r["t"] == "0210" and r["39"] == "00"
            assert (r["38"], r["54"]) == (reply["38"], reply["54"])
        assert await balance(client, user) == BALANCE - 25_00
        term.close()
    run(engine_port, scenario)


def test_0100_authorizes_and_0220_completes_with_the_final_amount(engine_port):
    async def scenario(adapter, client):
        user = await shopper(client)
        code, rrn = await payment_code(client, user), new_rrn()
        term = await Terminal.open(adapter)
        auth = await term.call(message("0100", rrn=rrn, code=code, amount=80_00))
        assert auth["t"] == "0110" and auth["39"] == "00"
        assert auth["54"].endswith(f"D{80_00:012d}")        # the hold
        stored = await payment(client, rrn)
        assert stored["state"] == "authorized" and stored["authorized_amount"] == 80_00
        assert await balance(client, user) == BALANCE       # held, not moved
        repeat = await term.call(message("0101", rrn=rrn, code=code, amount=80_00))
        assert repeat["39"] == "00" and repeat["38"] == auth["38"]
        completion = message("0220", rrn=rrn, amount=64_00)
        done = await term.call(completion)
        assert done["t"] == "0230" and done["39"] == "00"
        assert done["54"].endswith(f"D{64_00:012d}")
        assert (await payment(client, rrn))["state"] == "completed"
        assert await balance(client, user) == BALANCE - 64_00
        repeat = await term.call(dict(completion, t="0221"))
        assert repeat["t"] == "0230" and repeat["39"] == "00"
        assert await balance(client, user) == BALANCE - 64_00
        term.close()
    run(engine_port, scenario)


# -- reversals ----------------------------------------------------------------------------------

def test_0400_and_0420_reverse_and_repeats_are_idempotent(engine_port):
    async def scenario(adapter, client):
        user = await shopper(client)
        term = await Terminal.open(adapter)
        rrn = new_rrn()
        paid = await term.call(message("0200", rrn=rrn, code=await payment_code(client, user),
                                       amount=12_00))
        assert paid["39"] == "00"
        for mti, response in (("0400", "0410"), ("0401", "0410"), ("0420", "0430"),
                              ("0421", "0430")):
            reply = await term.call(message(mti, rrn=rrn, amount=12_00))
            assert (reply["t"], reply["39"]) == (response, "00")
            assert await balance(client, user) == BALANCE
        assert (await payment(client, rrn))["state"] == "refunded"
        # an authorization reversed is voided
        rrn = new_rrn()
        auth = await term.call(message("0100", rrn=rrn, code=await payment_code(client, user),
                                       amount=7_00))
        assert auth["39"] == "00"
        assert (await term.call(message("0420", rrn=rrn)))["39"] == "00"
        assert (await payment(client, rrn))["state"] == "voided"
        term.close()
    run(engine_port, scenario)


def test_a_reversal_before_its_original_leaves_a_tombstone(engine_port):
    async def scenario(adapter, client):
        user = await shopper(client)
        code, rrn = await payment_code(client, user), new_rrn()
        term = await Terminal.open(adapter)
        reversal = await term.call(message("0420", rrn=rrn, amount=9_00))
        assert (reversal["t"], reversal["39"]) == ("0430", "00")
        late = await term.call(message("0200", rrn=rrn, code=code, amount=9_00))
        assert late["39"] == "12" and "38" not in late
        assert await balance(client, user) == BALANCE
        assert (await payment(client, rrn))["status"] != 0       # payment_not_found
        # the code was not consumed: a new transaction with it is approved
        fresh = await term.call(message("0200", rrn=new_rrn(), code=code, amount=9_00))
        assert fresh["39"] == "00"
        term.close()
    run(engine_port, scenario)


# -- response codes ------------------------------------------------------------------------------

def test_response_codes_of_the_mapping(engine_port):
    async def scenario(adapter, client):
        user = await shopper(client, balance=10_00)
        term = await Terminal.open(adapter)

        async def rc(doc):
            return (await term.call(doc))["39"]

        code = await payment_code(client, user)
        assert await rc(message("0200", rrn=new_rrn(), code=code, amount=50_00)) == "51"
        assert await rc(message("0200", rrn=new_rrn(), code="123456789012345678",
                                amount=1_00)) == "14"
        assert await rc(message("0200", rrn=new_rrn(), code=code, amount=0)) == "13"
        assert await rc(message("0200", rrn=new_rrn(), code=code, amount=1_00,
                                currency="840")) == "13"
        assert await rc(message("0200", rrn=new_rrn(), code=code, amount=1_00,
                                merchant=UNKNOWN_DE42)) == "03"
        assert await rc(message("0220", rrn=new_rrn(), amount=1_00)) == "25"
        rrn = new_rrn()
        assert await rc(message("0200", rrn=rrn, code=code, amount=2_00)) == "00"
        assert await rc(message("0200", rrn=rrn, code=code, amount=3_00)) == "94"
        assert await rc(message("0220", rrn=rrn, amount=2_00)) == "12"   # not an authorization
        assert await rc(message("0300", rrn=new_rrn())) == "40"
        assert await rc({**echo(), "70": "999"}) == "40"
        assert await balance(client, user) == 10_00 - 2_00
        counted = adapter.metrics.messages
        assert counted["0200", "51"] == counted["0200", "14"] == counted["0200", "03"] == 1
        assert counted["0200", "13"] == 2 and counted["0220", "25"] == 1
        term.close()
    run(engine_port, scenario)


def test_engine_unavailable_is_91(engine_port):
    dead = free_port()      # nothing listens here once closed

    async def main():
        adapter = Adapter(adapter_config(dead, engine_timeout_ms=2000))
        await adapter.start()
        try:
            term = await Terminal.open(adapter)
            reply = await term.call(message("0200", rrn=new_rrn(), code="123456789012345678",
                                            amount=1_00))
            assert (reply["t"], reply["39"]) == ("0210", "91")
            assert (await term.call(echo()))["39"] == "00"     # the link itself is fine
            term.close()
        finally:
            await adapter.stop()
    asyncio.run(main())


def test_the_adapter_reconnects_when_the_engine_comes_back():
    async def serve_on(port):
        from engine import Engine
        server = Server(Config(data="", listen=f"127.0.0.1:{port}"), engine=Engine())
        await server.start()
        client = await AsyncClient.connect("127.0.0.1", server.config.host_port[1])
        await client.call("MERCHANTS", {"merchants": [{"id": 1}]})
        return server, client

    async def main():
        server, client = await serve_on(0)
        port = server.config.host_port[1]
        adapter = Adapter(adapter_config(port))
        await adapter.start()
        term = await Terminal.open(adapter)
        user = await shopper(client)
        assert (await term.call(message("0200", rrn=new_rrn(), code=await payment_code(
            client, user), amount=1_00)))["39"] == "00"
        client.close()
        await server.stop()
        down = await term.call(message("0200", rrn=new_rrn(), code="123456789012345678",
                                       amount=1_00))
        assert down["39"] == "91"
        server, client = await serve_on(port)           # back, on the same port
        user = await shopper(client)
        code, rrn, answers = await payment_code(client, user), new_rrn(), []
        for _ in range(50):                             # bounded: 91 while reconnecting
            answers.append((await term.call(message("0200", rrn=rrn, code=code,
                                                    amount=2_00)))["39"])
            if answers[-1] != "91":
                break
            await asyncio.sleep(0.1)
        assert answers[-1] == "00", answers
        assert await balance(client, user) == BALANCE - 2_00
        term.close()
        await adapter.stop()
        client.close()
        await server.stop()
    asyncio.run(main())


def test_engine_refusals_58_forbidden_and_96_system_error(tmp_path):
    """A server with keys: a gateway key limited to merchant 1 (58 at merchant
    2), and a wrong secret (96: the adapter is misconfigured, not the engine down)."""
    keys = [parse_key({"id": "iso", "secret": "iso-secret-0123456789", "role": "gateway",
                       "merchants": [1]}),
            parse_key({"id": "admin", "secret": "admin-secret-0123456789", "role": "admin"})]

    async def main():
        from engine import Engine
        server = Server(Config(data="", listen="127.0.0.1:0", keys=keys), engine=Engine())
        await server.start()
        port = server.config.host_port[1]
        admin = await AsyncClient.connect("127.0.0.1", port, key_id="admin",
                                          secret="admin-secret-0123456789")
        await admin.call("MERCHANTS", {"merchants": [{"id": 1}, {"id": 2}]})
        user = await shopper(admin)
        good = Adapter(adapter_config(port, engine_key_id="iso",
                                      engine_secret="iso-secret-0123456789"))
        bad = Adapter(adapter_config(port, engine_key_id="iso",
                                     engine_secret="not-the-secret-0123"))
        await good.start()
        await bad.start()
        try:
            term = await Terminal.open(good)
            code = await payment_code(admin, user)
            reply = await term.call(message("0200", rrn=new_rrn(), code=code, amount=1_00,
                                            merchant=OTHER_DE42))
            assert reply["39"] == "58"
            assert (await term.call(message("0200", rrn=new_rrn(), code=code,
                                            amount=1_00)))["39"] == "00"
            other = await Terminal.open(bad)
            reply = await other.call(message("0200", rrn=new_rrn(),
                                             code=await payment_code(admin, user), amount=1_00))
            assert reply["39"] == "96"
            assert await balance(admin, user) == BALANCE - 1_00
            term.close()
            other.close()
        finally:
            await good.stop()
            await bad.stop()
            admin.close()
            await server.stop()
    asyncio.run(main())


# -- network management ------------------------------------------------------------------------------

def test_0800_echo_sign_on_and_sign_off(engine_port):
    async def scenario(adapter, client):
        user = await shopper(client)
        term = await Terminal.open(adapter)
        code = await payment_code(client, user)
        before = await term.call(message("0200", rrn=new_rrn(), code=code, amount=1_00))
        assert before["39"] == "91"                  # require_sign_on: not signed on yet
        for nm in ("301", "001"):
            reply = await term.call({**echo(), "70": nm})
            assert (reply["t"], reply["39"], reply["70"]) == ("0810", "00", nm)
        assert (await term.call(message("0200", rrn=new_rrn(), code=code,
                                        amount=1_00)))["39"] == "00"
        assert (await term.call({**echo(), "70": "002"}))["39"] == "00"
        assert (await term.call(message("0200", rrn=new_rrn(), code=await payment_code(
            client, user), amount=1_00)))["39"] == "91"
        assert await balance(client, user) == BALANCE - 1_00
        term.close()
    run(engine_port, scenario, require_sign_on=True)


# -- concurrency ---------------------------------------------------------------------------------------

def test_pipelined_messages_are_matched_by_stan_and_terminal_in_any_order(engine_port):
    async def scenario(adapter, client):
        user = await shopper(client)
        term = await Terminal.open(adapter)
        requests = [message("0200", rrn=new_rrn(), code=await payment_code(client, user),
                            amount=100 + i, terminal=f"TERM{i % 3:04d}") for i in range(30)]
        ping = echo()
        # One write: 30 payments, then an echo. The echo needs no engine, so
        # its reply overtakes every payment's.
        term.send(*requests, ping)
        replies = [await term.recv() for _ in range(31)]
        assert replies[0]["t"] == "0810" and replies[0]["11"] == ping["11"]
        by_key = {(r["11"], r["41"]): r for r in replies[1:]}
        assert len(by_key) == 30
        for request in requests:
            reply = by_key[request["11"], request["41"]]
            assert (reply["37"], reply["4"], reply["39"]) == (request["37"], request["4"], "00")
        assert await balance(client, user) == BALANCE - sum(100 + i for i in range(30))
        term.close()
    run(engine_port, scenario)


# -- malformed input ------------------------------------------------------------------------------

def malformed_messages(code: str) -> dict:
    good = encoded(message("0200", rrn="999999999999", code=code, amount=5_00, stan="424242"))
    bitmap_end = 4 + 16
    return {
        "truncated": good[:-3],
        "bitmap not hex": good[:4] + b"ZZ" + good[6:],
        "bitmap names a missing field": (good[:4] + b"%016X" % (int(good[4:20], 16) | 1 << 1)
                                         + good[bitmap_end:]),
        "field too long": good.replace(b"18" + code.encode(), b"25" + b"1" * 25),
        "letters in an n field": good.replace(b"000000000500", b"00000000050A"),
        "DE7 not a date and time": good.replace(b"1206153000", b"1306153000"),
        "extra bytes": good + b"XYZ",
    }


def test_malformed_messages_get_30_and_change_nothing(engine_port):
    async def scenario(adapter, client):
        user = await shopper(client)
        code = await payment_code(client, user)
        term = await Terminal.open(adapter)
        for name, raw in malformed_messages(code).items():
            term.send_raw(raw)
            reply = await term.recv()
            assert (reply["t"], reply["39"]) == ("0210", "30"), name
            assert "38" not in reply, name
            if name not in ("bitmap not hex", "field too long"):   # DE2 comes before DE11
                assert reply["11"] == "424242", name     # what decoded is echoed for matching
        assert await balance(client, user) == BALANCE
        assert (await payment(client, "999999999999"))["status"] != 0
        # the link survived, and the code is still unused
        ok = await term.call(message("0200", rrn=new_rrn(), code=code, amount=5_00))
        assert ok["39"] == "00"
        assert adapter.metrics.messages["0200", "30"] == len(malformed_messages(code))
        term.close()
    run(engine_port, scenario)


@pytest.mark.parametrize("raw", [b"02", b"AB00" + b"0" * 16, b"\xff\xfe\x00\x01"],
                         ids=["too short", "letters", "not ascii"])
def test_an_unreadable_mti_closes_the_link(engine_port, raw):
    async def scenario(adapter, client):
        term = await Terminal.open(adapter)
        term.send_raw(raw)
        assert await term.closed()
        assert adapter.metrics.closed["message unreadable"] == 1
        term2 = await Terminal.open(adapter)      # the adapter itself is fine
        assert (await term2.call(echo()))["39"] == "00"
        term2.close()
    run(engine_port, scenario)


# -- limits ----------------------------------------------------------------------------------------

def test_limits_frame_size_connections_and_idle_timeout(engine_port):
    async def scenario(adapter, client):
        big = await Terminal.open(adapter)
        big.writer.write(struct.pack(">H", 300) + b"0" * 300)
        assert await big.closed()
        for _ in range(100):                           # bounded: its slot is given back
            if not adapter.links:
                break
            await asyncio.sleep(0.01)
        first = await Terminal.open(adapter)
        assert (await first.call(echo()))["39"] == "00"
        second = await Terminal.open(adapter)          # connections_max = 1
        assert await second.closed()
        assert await first.closed()                    # idle for idle_timeout_ms
        reasons = adapter.metrics.closed
        assert reasons["connections_max"] == 1 and reasons["idle timeout"] == 1
        assert reasons["frame size 300 outside 1..256"] == 1
    run(engine_port, scenario, frame_bytes_max=256, connections_max=1, idle_timeout_ms=1500)


def test_inflight_limit_holds_back_reading_and_loses_nothing(engine_port):
    async def scenario(adapter, client):
        user = await shopper(client)
        running, peak = 0, 0
        execute = adapter.execute

        async def counting(request, link):
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            try:
                return await execute(request, link)
            finally:
                running -= 1
        adapter.execute = counting
        term = await Terminal.open(adapter)
        requests = [message("0200", rrn=new_rrn(), code=await payment_code(client, user),
                            amount=1_00) for _ in range(12)]
        term.send(*requests)
        replies = [await term.recv() for _ in requests]
        assert sorted(r["11"] for r in replies) == sorted(r["11"] for r in requests)
        assert all(r["39"] == "00" for r in replies)
        assert 1 <= peak <= 2
        term.close()
    run(engine_port, scenario, inflight_max=2)


def test_allow_from_limits_who_may_open_a_link(engine_port):
    with pytest.raises(IsoConfigError, match="allow_from"):
        config_from({"listen": "0.0.0.0:8583"}, {})
    with pytest.raises(IsoConfigError, match="allow_from"):
        config_from({"allow_from": ["10.0.0.0/33"]}, {})
    wide = config_from({"listen": "0.0.0.0:8583", "allow_from": ["10.0.0.0/8", "::1"]}, {})
    assert iso8583_map.peer_allowed(wide, "10.1.2.3") and iso8583_map.peer_allowed(wide, "::1")
    assert not iso8583_map.peer_allowed(wide, "192.168.1.1")
    assert not iso8583_map.peer_allowed(wide, "127.0.0.1")

    async def scenario(adapter, client):
        term = await Terminal.open(adapter)       # from 127.0.0.1: not listed
        assert await term.closed()
        assert adapter.metrics.closed["peer not allowed"] == 1
    run(engine_port, scenario, allow_from=["10.0.0.0/8"])


def test_a_peer_that_does_not_read_its_replies_is_not_read_either(engine_port):
    """When the link's write buffer is full (the transport calls
    pause_writing), the adapter stops reading that link; when it drains, it
    reads on and answers everything."""
    async def scenario(adapter, client):
        term = await Terminal.open(adapter)
        assert (await term.call(echo()))["39"] == "00"
        (link,) = adapter.links
        link.pause_writing()
        pings = [echo() for _ in range(3)]
        term.send(*pings)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(term.reader.readexactly(1), 0.5)
        assert link.paused
        link.resume_writing()
        replies = [await term.recv() for _ in pings]
        assert sorted(r["11"] for r in replies) == sorted(p["11"] for p in pings)
        term.close()
    run(engine_port, scenario)


def test_ascii4_framing(engine_port):
    async def scenario(adapter, client):
        user = await shopper(client)
        term = await Terminal.open(adapter, framing="ascii4")
        assert (await term.call(echo()))["39"] == "00"
        reply = await term.call(message("0200", rrn=new_rrn(),
                                        code=await payment_code(client, user), amount=3_00))
        assert reply["39"] == "00"
        term.writer.write(b"00x1")                      # not a length: the link closes
        assert await term.closed()
    run(engine_port, scenario, framing="ascii4")


def test_binary_bitmap_spec(engine_port):
    """spec = "default": pyiso8583's spec with a binary bitmap."""
    from iso8583.specs import default as binary_spec

    async def scenario(adapter, client):
        user = await shopper(client)
        term = await Terminal.open(adapter, spec=binary_spec)
        reply = await term.call(message("0200", rrn=new_rrn(),
                                        code=await payment_code(client, user), amount=3_00))
        assert reply["39"] == "00"
        assert await balance(client, user) == BALANCE - 3_00
        term.close()
    run(engine_port, scenario, spec="default")


# -- metrics and logs ---------------------------------------------------------------------------------

def test_metrics_by_mti_and_de39_and_logs_never_hold_a_full_code(engine_port, caplog):
    metrics_port = free_port()
    codes = []

    async def scenario(adapter, client):
        user = await shopper(client, balance=2_00)
        term = await Terminal.open(adapter)
        for amount in (1_00, 5_00):                     # approved, then declined (51)
            codes.append(await payment_code(client, user))
            await term.call(message("0200", rrn=new_rrn(), code=codes[-1], amount=amount))
        codes.append("123456789012345678")
        await term.call(message("0200", rrn=new_rrn(), code=codes[-1], amount=1_00))
        for raw in malformed_messages(codes[0]).values():
            term.send_raw(raw)
            await term.recv()
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        text = (await asyncio.to_thread(urllib.request.urlopen, url, timeout=5)).read().decode()
        assert 'scanpay_iso8583_messages_total{mti="0200",response_code="00"} 1.0' in text
        assert 'scanpay_iso8583_messages_total{mti="0200",response_code="51"} 1.0' in text
        malformed = len(malformed_messages(codes[0]))
        assert (f'scanpay_iso8583_messages_total{{mti="0200",response_code="30"}} '
                f'{malformed}.0') in text
        term.close()

    with caplog.at_level(logging.DEBUG, logger="scanpay.iso8583"):
        run(engine_port, scenario, metrics=f"127.0.0.1:{metrics_port}")
    logged = "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records)
    assert "declined" in logged and "format error" in logged
    assert "*" * 14 + codes[1][-4:] in logged            # masked as a PAN is
    for code in codes:
        assert code not in logged
        assert code[:10] not in logged


# -- configuration and the command --------------------------------------------------------------------

def test_config_is_checked_and_the_example_loads():
    example = load_config(EXAMPLE_CONFIG, {})
    assert example.merchants == {MERCHANT_DE42: 1, OTHER_DE42: 2}
    assert example.build_spec()["2"]["max_len"] == 19
    for bad in ({"framing": "ascii2"}, {"inflight_max": 0}, {"no_such_setting": 1},
                {"currency": "CNY"}, {"merchants": {"M": 0}}, {"spec": "mine"},
                {"fields": {"4": {"max_len": 2}}}, {"engine": "nohostport"}):
        with pytest.raises(IsoConfigError):
            config_from(dict(bad), {})


def test_payment_id_is_the_documented_derivation_and_depends_on_every_field():
    ids = {iso8583_map.payment_id(*fields) for fields in itertools.product(
        ("12345", "12346"), (MERCHANT_DE42, OTHER_DE42), ("TERM0001", "TERM0002"),
        ("000000000001", "000000000002"))}
    assert len(ids) == 16
    assert iso8583_map.payment_id(ACQUIRER, MERCHANT_DE42, TERMINAL, "000000000001") == \
        expected_payment_id(ACQUIRER, MERCHANT_DE42, TERMINAL, "000000000001")
    assert all(i >> 63 == 1 for i in ids)


def test_scanpay_iso8583_command(engine_port, tmp_path):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=ROOT)
    bad = subprocess.run([sys.executable, "-m", "engine.cli", "iso8583", "--listen", "nope"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr and "Traceback" not in bad.stderr
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "iso8583", "--listen",
                             f"127.0.0.1:{port}", "--engine", f"127.0.0.1:{engine_port}",
                             "--config", EXAMPLE_CONFIG], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    async def main():
        deadline = time.monotonic() + 20
        while True:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                break
            except OSError:
                assert proc.poll() is None
                assert time.monotonic() < deadline, "scanpay iso8583 did not start"
                await asyncio.sleep(0.1)
        term = Terminal(reader, writer, "binary2")
        client = await AsyncClient.connect("127.0.0.1", engine_port)
        user = await shopper(client)
        reply = await term.call(message("0200", rrn=new_rrn(),
                                        code=await payment_code(client, user), amount=4_00))
        assert reply["39"] == "00"
        assert await balance(client, user) == BALANCE - 4_00
        client.close()
        term.close()
    try:
        asyncio.run(main())
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, out
    assert "0200/00" in out                 # the exit summary: messages by MTI/DE39


# -- load ---------------------------------------------------------------------------------------------

LOAD_LINKS, LOAD_PER_LINK, LOAD_WINDOW = 8, 60, 16


def test_pipelined_load_every_approval_is_in_get_payments(engine_port):
    """8 links, each with up to 16 messages in flight: payments, repeats of
    some, declines (insufficient funds) in between. Afterwards every approval
    is a completed payment of its amount in GET_PAYMENTS, every decline is
    absent, and each wallet moved by exactly its approvals."""
    async def link_load(adapter, client, users, rng_seed):
        term = await Terminal.open(adapter)
        requests = []
        for i in range(LOAD_PER_LINK):
            user = users[i % len(users)]
            amount = 50_00 if i % 10 == 9 else 1_00 + (rng_seed * 7 + i) % 300
            requests.append((user, message("0200", rrn=new_rrn(), code=await payment_code(
                client, user), amount=amount, terminal=f"LOAD{rng_seed:04d}")))
        # some repeats, pipelined right behind their originals
        requests += [(u, dict(r, t="0201")) for u, r in requests[::7]]
        replies, window = {}, asyncio.Semaphore(LOAD_WINDOW)

        async def reader():
            for _ in requests:
                reply = await term.recv()
                replies.setdefault((reply["11"], reply["41"]), []).append(reply)
                window.release()
        reading = asyncio.get_running_loop().create_task(reader())
        for _, doc in requests:
            await window.acquire()
            term.send(doc)
        await asyncio.wait_for(reading, 60)
        term.close()
        return requests, replies

    async def scenario(adapter, client):
        users = [await shopper(client, balance=40_00) for _ in range(LOAD_LINKS * 2)]
        results = await asyncio.gather(*(link_load(adapter, client, users[k * 2:k * 2 + 2], k)
                                         for k in range(LOAD_LINKS)))
        approved, declined, spent = {}, [], {u: 0 for u in users}
        for requests, replies in results:
            for user, doc in requests:
                answers = replies[doc["11"], doc["41"]]
                assert {a["37"] for a in answers} == {doc["37"]}
                codes = {a["39"] for a in answers}
                assert len(codes) == 1 and codes <= {"00", "51"}, codes
                if codes == {"00"}:
                    if doc["37"] not in approved:
                        spent[user] += int(doc["4"])
                    approved[doc["37"]] = (int(doc["4"]), doc["41"])
                else:
                    declined.append(doc)
        assert len(approved) > LOAD_LINKS * LOAD_PER_LINK // 2 and declined
        ids = {rrn: expected_payment_id(ACQUIRER, MERCHANT_DE42, terminal, rrn)
               for rrn, (_, terminal) in approved.items()}
        stored = {}
        for chunk in range(0, len(ids), 200):
            part = list(ids.values())[chunk:chunk + 200]
            reply = await client.call("GET_PAYMENTS", {"ids": part})
            stored.update({r["id"]: r for r in reply["results"] if r["status"] == 0})
        for rrn, (amount, _) in approved.items():
            row = stored[ids[rrn]]
            assert (row["state"], row["amount"], row["merchant"]) == ("completed", amount, 1)
        declined_ids = [expected_payment_id(ACQUIRER, MERCHANT_DE42, d["41"], d["37"])
                        for d in declined]
        reply = await client.call("GET_PAYMENTS", {"ids": declined_ids})
        assert all(r["status"] != 0 for r in reply["results"])
        for user in users:
            assert await balance(client, user) == 40_00 - spent[user]
    run(engine_port, scenario)


# -- inside scanpay serve -------------------------------------------------------------------------------

def test_an_iso8583_section_starts_the_adapter_inside_the_server(tmp_path):
    from engine import Engine
    from engine.server.config import ConfigError, load
    path = tmp_path / "serve.toml"
    path.write_text('[server]\nlisten = "127.0.0.1:0"\n[iso8583]\nlisten = "127.0.0.1:0"\n'
                    f'[iso8583.merchants]\n"{MERCHANT_DE42}" = 1\n')
    config = load(str(path), {"data": ""})
    assert config.iso8583["merchants"] == {MERCHANT_DE42: 1}
    for bad in ({"framing": "x"}, {"engine": "127.0.0.1:1"}):
        with pytest.raises(ConfigError):
            check_with(config, bad)
    with pytest.raises(ConfigError, match="TCP listener"):
        check_with(config, {}, listen="")

    async def main():
        server = Server(config, engine=Engine())
        await server.start()
        client = await AsyncClient.connect("127.0.0.1", server.config.host_port[1])
        try:
            await client.call("MERCHANTS", {"merchants": [{"id": 1}]})
            user = await shopper(client)
            term = await Terminal.open(server.iso8583)
            reply = await term.call(message("0200", rrn=new_rrn(),
                                            code=await payment_code(client, user), amount=6_00))
            assert reply["39"] == "00"
            assert await balance(client, user) == BALANCE - 6_00
            from prometheus_client import generate_latest
            text = generate_latest(server.metrics.registry).decode()   # the server's /metrics
            assert 'scanpay_iso8583_messages_total{mti="0200",response_code="00"} 1.0' in text
            term.close()
        finally:
            client.close()
            await server.stop()
        assert server.iso8583.listener is not None and not server.iso8583.links
    asyncio.run(main())


def check_with(config, section, **settings):
    import dataclasses
    from engine.server.config import check
    check(dataclasses.replace(config, iso8583={**config.iso8583, **section}, **settings))


def test_an_engine_currency_without_an_iso_number_is_96_until_configured(caplog):
    """CNY is 156 by the built-in table; a currency it does not know must not
    pass unchecked: 96 and one error line, until `currency` says its number."""
    async def main():
        from engine import Engine
        server = Server(Config(data="", listen="127.0.0.1:0"), engine=Engine(currency="XTS"))
        await server.start()
        port = server.config.host_port[1]
        client = await AsyncClient.connect("127.0.0.1", port)
        await client.call("MERCHANTS", {"merchants": [{"id": 1}]})
        user = await shopper(client)
        replies = {}
        for currency in ("", "963"):
            adapter = Adapter(adapter_config(port, currency=currency))
            await adapter.start()
            term = await Terminal.open(adapter)
            replies[currency] = await term.call(message(
                "0200", rrn=new_rrn(), code=await payment_code(client, user), amount=2_00,
                currency="963"))
            term.close()
            await adapter.stop()
        assert replies[""]["39"] == "96" and replies["963"]["39"] == "00"
        assert replies["963"]["54"].startswith("0091963C")
        assert await balance(client, user) == BALANCE - 2_00
        client.close()
        await server.stop()
    with caplog.at_level(logging.ERROR, logger="scanpay.iso8583"):
        asyncio.run(main())
    assert "set `currency` in [iso8583]" in caplog.text


# -- fuzz -------------------------------------------------------------------------------------------------

FUZZ_MESSAGES = 400


def mutate(raw: bytes, rng) -> bytes:
    """A valid message with one random fault: a byte changed, cut, doubled or dropped."""
    data = bytearray(raw)
    i = rng.randrange(len(data))
    kind = rng.randrange(4)
    if kind == 0:
        data[i] = rng.randrange(256)
    elif kind == 1:
        del data[i:]
    elif kind == 2:
        data[i:i] = data[i:i + rng.randrange(1, 8)]
    else:
        del data[i]
    return bytes(data) or b"0"


def test_fuzzed_messages_never_apply_without_an_approval(engine_port, caplog):
    """Seeded random faults in valid 0100/0200/0400 messages, pipelined: the
    adapter survives, every reply is a decodable response, and the wallet moved
    by exactly the approved payments (by their echoed DE4, once per RRN)."""
    import random
    rng = random.Random(19)

    async def scenario(adapter, client):
        user = await shopper(client)
        codes = [await payment_code(client, user) for _ in range(8)]
        approved, reversed_, replies, reopened = {}, set(), 0, 0
        term = await Terminal.open(adapter)
        for n in range(FUZZ_MESSAGES):
            mti = rng.choice(("0100", "0200", "0200", "0400"))
            doc = message(mti, rrn=f"{rng.randrange(40):012d}", code=rng.choice(codes),
                          amount=rng.randrange(1, 500))
            raw = encoded(doc)
            term.send_raw(mutate(raw, rng) if rng.random() < 0.8 else raw)
            try:
                reply = await term.recv()
            except (asyncio.IncompleteReadError, ConnectionResetError):
                term = await Terminal.open(adapter)      # unreadable: the link was closed
                reopened += 1
                continue
            replies += 1
            assert reply["t"] in ("0110", "0210", "0230", "0410", "0430", "0810", "0310",
                                  "0510", "0610", "0710", "0910") or reply["39"] in ("30", "40")
            key = (reply.get("37"), reply.get("41"), reply.get("42"), reply.get("32"))
            if reply["39"] == "00" and reply["t"] in ("0110", "0210"):
                approved[key] = int(reply["4"])
            elif reply["39"] == "00" and reply["t"] in ("0410", "0430"):
                reversed_.add(key)     # refunded or voided; a later repeat replays, moves nothing
        assert replies > FUZZ_MESSAGES // 3 and approved
        assert (await term.call(echo()))["39"] == "00"
        # every closed link was closed on purpose, for a reason the docs give
        closed = adapter.metrics.closed
        on_purpose = closed["message unreadable"] + sum(
            n for reason, n in closed.items() if reason.startswith("frame size"))
        assert reopened == on_purpose, dict(closed)
        # an authorization holds its cash: available, not balance, is what both move
        wallet = (await client.call("BALANCES", {"users": [user]}))["users"][0]
        assert wallet["available"] == BALANCE - sum(
            amount for key, amount in approved.items() if key not in reversed_)
        term.close()
    with caplog.at_level(logging.ERROR):
        run(engine_port, scenario)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text[-2000:]
