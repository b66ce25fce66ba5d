"""The bare wire the server tests speak: a protocol client that hides
nothing (Raw), a server started in the test's own event loop, the small world
most server tests set up, HELLO maps, and the gateway/admin keys."""
import asyncio
import hashlib
import hmac
import secrets
import time

import msgspec
import numpy as np

from engine import Engine
from engine.protocol import frame
from engine.protocol.records import PAY_RECORD
from engine.server.config import Config
from engine.server.server import Server

enc = msgspec.msgpack.encode
dec = msgspec.msgpack.decode
SECRET_GW = "gateway-secret-0123456789"
SECRET_ADMIN = "admin-secret-0123456789ab"


class Raw:
    """A bare protocol client: frames in, frames out, nothing hidden."""

    @classmethod
    async def open(cls, server, ssl_context=None, unix=None):
        self = cls()
        if unix:
            self.reader, self.writer = await asyncio.open_unix_connection(unix)
        else:
            host, port = server.config.host_port
            self.reader, self.writer = await asyncio.open_connection(
                host, port, ssl=ssl_context, server_hostname="localhost" if ssl_context else None)
        return self

    def send(self, op, request_id, body=b"", flags=0):
        self.writer.write(frame.HEADER.pack(len(body), op, flags, request_id) + bytes(body))

    async def recv(self, timeout=5):
        header = await asyncio.wait_for(self.reader.readexactly(16), timeout)
        size, op, flags, request_id = frame.HEADER.unpack(header)
        body = await asyncio.wait_for(self.reader.readexactly(size), timeout)
        return op, flags, request_id, body

    async def call(self, op, body=b"", request_id=1):
        self.send(op, request_id, body)
        return await self.recv()

    async def map(self, op, request, request_id=1):
        _op, flags, _rid, body = await self.call(op, enc(request), request_id)
        return flags, dec(body)

    async def closed(self):
        try:
            return await asyncio.wait_for(self.reader.read(1), 5) == b""
        except ConnectionResetError:
            return True


def run(coro):
    return asyncio.run(coro)


async def started(tmp_path=None, engine=None, **settings):
    config = Config(data=str(tmp_path / "data") if tmp_path else "", listen="127.0.0.1:0",
                    **settings)
    server = Server(config, engine=engine or (None if tmp_path else Engine()))
    await server.start()
    return server


async def started_with_world(tmp_path=None, engine=None, **settings):
    """A started server and a connection that has set up the test world."""
    server = await started(tmp_path, engine, **settings)
    client = await Raw.open(server)
    await world(client)
    return server, client


async def world(client):
    await client.map(32, {"merchants": [{"id": 1, "fee_bps": 60}, {"id": 2, "fee_bps": 0}]})
    await client.map(33, {"users": [1, 2]})
    await client.map(34, {"topups": [{"id": 1, "user": 1, "amount": 10**6}]})


def pay_body(ids, merchant=1, amount=100, payer=1):
    records = np.zeros(len(ids), PAY_RECORD)
    records["id"], records["payer"], records["merchant"], records["amount"] = (ids, payer,
                                                                              merchant, amount)
    return records.tobytes()


def hello(key_id, secret, nonce=None, ts=None):
    ts = ts if ts is not None else time.time_ns() // 1_000_000
    nonce = nonce or secrets.token_hex(16)
    mac = hmac.new(secret.encode(), f"{ts}.{nonce}.{key_id}".encode(), hashlib.sha256).digest()
    return {"protocol": 1, "client": "test", "key_id": key_id, "ts": ts, "nonce": nonce, "mac": mac}


def error_of(reply):
    op, flags, request_id, body = reply
    assert flags & frame.FLAG_ERROR, f"expected an error frame, got op {op}"
    return dec(body)


def gateway_config():
    from engine.protocol.auth import Key
    return [Key("gw", SECRET_GW, "gateway", frozenset({1})),
            Key("ops", SECRET_ADMIN, "admin")]


async def all_released(server) -> None:
    """Wait for the writer to release everything: a reply sent by the sender
    thread can reach the client before the event loop counts it."""
    for _ in range(400):
        if not server.writer.deliveries:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the writer still holds deliveries")


async def until(condition, what: str, limit_s: float = 10.0) -> None:
    """Poll `condition` while the server runs in this event loop (bounded)."""
    for _ in range(int(limit_s / 0.002)):
        if condition():
            return
        await asyncio.sleep(0.002)
    raise AssertionError(f"timed out waiting for {what}")
