"""A small fake Scanpay server for the client tests (tests/client/), written
from docs/reference/protocol.md.

It parses frames with its own struct code (not engine/protocol/frame.py) and
checks HELLO MACs with its own hmac call, so the client is held to the spec,
not to shared helpers.
"""
import asyncio
import collections
import hashlib
import hmac
import struct
import threading
import time

import msgspec
import numpy as np

from engine import client as client_module
from engine.protocol.limits import BATCH_RECORDS_MAX
from engine.protocol.errors import EngineError
from engine.protocol.records import ISSUE_RECORD, ISSUE_RESULT, PAY_RECORD, PAY_RESULT
from engine.protocol.status import ErrorCode

HDR = struct.Struct("<IHHQ")      # size, op, flags, request_id: docs/reference/protocol.md, written out again
KEY_ID, SECRET = "gw-1", "a-secret-of-sixteen+"
CLOSING = {ErrorCode.bad_frame, ErrorCode.frame_too_large, ErrorCode.unsupported_protocol}
STATS = 46      # the fake's test hook: STATS {error_code} answers that error frame


class FakeServer:
    """docs/reference/protocol.md in miniature, on its own thread and event loop.

    HELLO, PING; PAY/ISSUE echo ok results built from the records (or go to
    `engine` when given); map ops echo {"echo": request} after an optional
    `delay_ms` (so replies come back out of order), or go to `engine`; STATS
    {error_code} answers that error frame; other ops: unknown_op.

    For failover tests (set before the client connects): `role` goes into
    HELLO; `not_leader` = "HOST:PORT" answers every request but HELLO and
    PING with not_leader naming that leader; `unavailable` = n answers the
    next n requests unavailable; `swallow` = n applies the next n requests
    without answering and then closes the connection (a crash after the
    apply); `remember` makes PAY/ISSUE idempotent by id (a known id replays
    its first result, flagged duplicate). `received` logs (connection
    number, op, body) of every request but HELLO and PING.
    """

    def __init__(self, *, keys=None, max_batch=BATCH_RECORDS_MAX, max_frame=1 << 20, engine=None,
                 role=None):
        self.role = role
        self.not_leader = None
        self.unavailable = 0
        self.swallow = 0
        self.remember = False
        self.results = {}                        # (op, id) -> the first result row
        self.received = []
        self.connections = 0
        self.keys = keys or {}
        self.max_batch = max_batch
        self.max_frame = max_frame
        self.engine = engine
        self.frames = collections.Counter()       # op -> frames received
        self.batch_sizes = collections.defaultdict(list)
        self.in_flight = 0
        self.in_flight_peak = 0
        self.nonces = set()
        self.started = threading.Event()
        self.loop = None

    def __enter__(self):
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.started.wait(5)
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(5)

    def _run(self):
        asyncio.run(self._main())

    async def _main(self):
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self.started.set()
        await self._stop.wait()
        server.close()

    async def _serve(self, reader, writer):
        connection = self.connections
        self.connections += 1
        authed = not self.keys
        lock = asyncio.Lock()
        tasks = set()

        async def send(op, rid, body=b"", flags=0):
            async with lock:
                writer.write(HDR.pack(len(body), op, flags, rid) + body)
                await writer.drain()

        async def error(op, rid, code, close=False, message=None):
            await send(op, rid, msgspec.msgpack.encode(
                {"code": int(code), "name": code.name, "message": message or f"fake {code.name}",
                 "retryable": code in (ErrorCode.busy, ErrorCode.unavailable,
                                       ErrorCode.not_leader)}), 1)

        try:
            while True:
                header = await reader.readexactly(16)
                size, op, flags, rid = HDR.unpack(header)
                self.frames[op] += 1
                if size > self.max_frame:
                    await error(op, rid, ErrorCode.frame_too_large)
                    break
                body = await reader.readexactly(size)
                if op == 1:
                    hello = msgspec.msgpack.decode(body)
                    if self.keys:
                        if not self._check_mac(hello):
                            await error(op, rid, ErrorCode.not_authenticated)
                            continue
                        authed = True
                    hello = {"protocol": 1, "server": "fake/1", "max_frame": self.max_frame,
                             "max_batch": self.max_batch, "durability": "none",
                             "currency": "CNY", "tz_offset_ms": 8 * 3600_000,
                             "hold_ms": 7 * 86_400_000, "extra_key_from_the_future": [1]}
                    if self.role is not None:
                        hello["role"] = self.role
                    await send(op, rid, msgspec.msgpack.encode(hello))
                    continue
                if not authed:
                    await error(op, rid, ErrorCode.not_authenticated)
                    continue
                if op != 2:
                    self.received.append((connection, op, body))
                    fault = await self._fault(op, rid, body, error)
                    if fault == "close":
                        break
                    if fault == "handled":
                        continue
                if op == STATS:
                    code = ErrorCode(msgspec.msgpack.decode(body)["error_code"])
                    await error(op, rid, code)
                    if code in CLOSING:
                        break
                    continue
                task = asyncio.ensure_future(self._answer(op, rid, body, send, error))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            for task in tasks:
                task.cancel()
            writer.close()

    async def _answer(self, op, rid, body, send, error):
        self.in_flight += 1
        self.in_flight_peak = max(self.in_flight_peak, self.in_flight)
        try:
            if op == 2:
                await send(op, rid)
            elif op in (16, 17):
                dtype, result = (PAY_RECORD, PAY_RESULT) if op == 16 else (ISSUE_RECORD, ISSUE_RESULT)
                if len(body) % dtype.itemsize or not 0 < len(body) // dtype.itemsize <= self.max_batch:
                    await error(op, rid, ErrorCode.bad_body)
                    return
                records = np.frombuffer(body, dtype)
                self.batch_sizes[op].append(len(records))
                if self.engine is not None:
                    out = self.engine.pay(records) if op == 16 else self.engine.issue(records)
                else:
                    out = self._record_results(op, body)
                await send(op, rid, out.tobytes())
            elif 32 <= op <= 50:
                request = msgspec.msgpack.decode(body)
                if self.engine is not None:
                    name = client_module.OP_NAMES[op]
                    try:
                        reply = self.engine.call(name, request)
                    except EngineError as e:
                        await error(op, rid, e.code)
                        return
                else:
                    await asyncio.sleep(request.get("delay_ms", 0) / 1000)
                    reply = {"echo": request}
                await send(op, rid, msgspec.msgpack.encode(reply))
            else:
                await error(op, rid, ErrorCode.unknown_op)
        finally:
            self.in_flight -= 1

    async def _fault(self, op, rid, body, error):
        """The failover faults (see the class docstring): "handled" when one
        answered or swallowed the request, "close" to close the connection,
        None when the request is to be served."""
        if self.not_leader is not None:
            await error(op, rid, ErrorCode.not_leader,
                        message=f"not leader; leader is {self.not_leader}")
            return "handled"
        if self.unavailable > 0:
            self.unavailable -= 1
            await error(op, rid, ErrorCode.unavailable)
            return "handled"
        if self.swallow > 0:
            self.swallow -= 1
            if op in (16, 17):
                self._record_results(op, body)     # applied, never answered
            return "close" if self.swallow == 0 else "handled"
        return None

    def _record_results(self, op, body):
        """PAY / ISSUE results of a body: ok, the amount as cash; with
        `remember`, a known id replays its first result, flagged duplicate."""
        dtype, result = (PAY_RECORD, PAY_RESULT) if op == 16 else (ISSUE_RECORD, ISSUE_RESULT)
        records = np.frombuffer(body, dtype)
        out = np.zeros(len(records), result)
        if op == 16:
            out["id"], out["cash"] = records["id"], records["amount"]
            out["timestamp"] = 1234
        else:
            out["coupon"], out["expires_at"] = records["coupon"], 99
        if self.remember:
            key = "id" if op == 16 else "coupon"
            for i in range(len(out)):
                ident = (op, int(out[key][i]))
                first = self.results.get(ident)
                if first is None:
                    self.results[ident] = out[i].copy()
                else:
                    out[i] = first
                    out["flags"][i] |= 1          # duplicate
        return out

    def _check_mac(self, hello) -> bool:
        secret = self.keys.get(hello.get("key_id"))
        nonce, ts, mac = hello.get("nonce"), hello.get("ts"), hello.get("mac")
        if secret is None or not isinstance(mac, bytes) or not isinstance(ts, int):
            return False
        if len(nonce) != 32 or int(nonce, 16) < 0 or nonce in self.nonces:
            return False
        if abs(time.time() * 1000 - ts) > 5 * 60_000:
            return False
        expected = hmac.new(SECRET.encode("utf-8"),
                            (str(ts) + "." + nonce + "." + hello["key_id"]).encode("utf-8"),
                            hashlib.sha256).digest()
        self.nonces.add(nonce)
        return hmac.compare_digest(mac, expected)
