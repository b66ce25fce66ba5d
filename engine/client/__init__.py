"""Clients of the Scanpay wire protocol (PROTOCOL.md).

Two flavours with the same calls:

- `AsyncClient` (asyncio): pipelines any number of requests on one connection,
  matched by request id, and coalesces concurrent `pay_one` / `issue_one`
  calls of one event-loop tick into a single PAY / ISSUE frame.
- `Client` (blocking, plain `socket`): one request at a time; works under
  gevent monkey-patching, which is what the locust load test uses.

    client = await AsyncClient.connect("127.0.0.1", 7411)
    result = await client.pay_one(id=1, payer=42, merchant=7, amount=30_00)
    balances = await client.call("BALANCES", {"users": [42]})

Record batches go in and come back as numpy arrays of the dtypes of
engine/protocol/records.py. A refused request (an error frame) raises the
`EngineError` subclass of its code; a per-record outcome is a status, never an
exception.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import re
import secrets
import socket
import time
import ssl as ssl_module
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np

from engine._version import __version__
from engine.protocol.errors import (BadBody, BadFrame, Busy, EngineError, Forbidden, FrameTooLarge,
                     NotAuthenticated, Unavailable, UnknownOp, UnsupportedProtocol)
from engine.protocol.frame import FLAG_ERROR, FRAME_BYTES_MAX_DEFAULT, HEADER, HEADER_BYTES
from engine.protocol.records import (ISSUE_RECORD, ISSUE_RESULT, PAY_RECORD, PAY_RESULT,
                                     RESULT_AUTHORIZED, RESULT_DUPLICATE)
from engine.protocol.limits import BATCH_RECORDS_MAX, COUPONS_PER_PAYMENT_MAX
from engine.protocol.ops import OP_CODES, OP_HELLO, OP_ISSUE, OP_NAMES, OP_PAY, OP_PING
from engine.protocol.status import STATUS_NAMES, ErrorCode

__all__ = [
    "AsyncClient", "Client", "HelloInfo", "PayResult", "IssueResult",
    "ConnectionLost", "ProtocolError", "ServerError", "OPS", "hello_request", "hello_mac",
    "parse_address", "error_from_frame",
    "NotAuthenticated", "Forbidden", "FrameTooLarge", "BadFrame", "UnsupportedProtocol",
]

PROTOCOL_VERSION = 1
CLIENT_NAME = f"scanpay-python/{__version__}"
PORT_DEFAULT = 7411
TIMEOUT_MS_DEFAULT = 10_000
BATCH_RECORDS_MAX_DEFAULT = BATCH_RECORDS_MAX   # until HELLO says otherwise
IN_FLIGHT_MAX_DEFAULT = 4096           # requests awaiting a reply, per connection
REPLY_BYTES_MAX = 64 << 20             # sanity bound: a bigger size means a broken stream
RECV_BYTES = 1 << 18
U64_MAX = 2**64 - 1
U32_MAX = 2**32 - 1
I64_MIN, I64_MAX = -2**63, 2**63 - 1

OPS = OP_CODES                         # every op by name (engine/protocol/ops.py)


# -- errors ---------------------------------------------------------------

class ServerError(EngineError):
    """An error code this client does not know (a newer server)."""

    def __init__(self, code: int, name: str, message: str, retryable: bool):
        super().__init__(message)
        self.code = code
        self._name = name
        self.retryable = retryable

    @property
    def name(self) -> str:
        return self._name


ERRORS_BY_CODE: dict[int, type[EngineError]] = {
    cls.code.value: cls for cls in (
        BadFrame, FrameTooLarge, UnknownOp, BadBody, NotAuthenticated,
        Forbidden, Busy, Unavailable, UnsupportedProtocol)
}
# After these the server closes the connection (PROTOCOL.md).
CLOSING_CODES = frozenset({ErrorCode.bad_frame, ErrorCode.frame_too_large,
                           ErrorCode.unsupported_protocol})


class ConnectionLost(ConnectionError):
    """The connection closed (or was closed) before the reply arrived."""


class ProtocolError(Exception):
    """The server sent something PROTOCOL.md does not allow."""


def decode_reply(body: bytes) -> Any:
    """A map reply's body. A reply msgspec cannot decode (or nested so deep
    that it runs out of stack) is the server's fault: ProtocolError, not a
    RecursionError traceback in the caller."""
    try:
        return _decoder.decode(body)
    except (msgspec.DecodeError, RecursionError) as e:
        raise ProtocolError(f"undecodable reply: {type(e).__name__}: {str(e)[:200]}") from None


def error_from_frame(op: int, request_id: int, body: bytes) -> EngineError:
    """The exception of an error frame's `{code, name, message, retryable}`."""
    try:
        fields = msgspec.msgpack.decode(body)
        code = int(fields["code"])
        message = str(fields.get("message", ""))
    except Exception as e:   # noqa: BLE001 - any malformed body is the server's bug
        return ProtocolError(f"undecodable error frame for op {op}: {e}")  # type: ignore[return-value]
    cls = ERRORS_BY_CODE.get(code)
    if cls is None:
        error = ServerError(code, str(fields.get("name", f"error_{code}")), message,
                            bool(fields.get("retryable", False)))
    else:
        error = cls(message)
    error.op = op
    error.request_id = request_id
    return error


# -- typed results ----------------------------------------------------------

class HelloInfo(msgspec.Struct, frozen=True):
    """The HELLO reply: what the server is and the limits it enforces."""
    protocol: int
    server: str = ""
    max_frame: int = FRAME_BYTES_MAX_DEFAULT
    max_batch: int = BATCH_RECORDS_MAX_DEFAULT
    durability: Any = None
    currency: str = ""
    tz_offset_ms: int = 0
    hold_ms: int = 0


class _Outcome:
    """What every result record tells: its status and the duplicate flag."""
    __slots__ = ()

    @property
    def ok(self) -> bool:
        return self.status == 0

    @property
    def status_name(self) -> str:
        return STATUS_NAMES.get(self.status, f"status_{self.status}")

    @property
    def duplicate(self) -> bool:
        return bool(self.flags & RESULT_DUPLICATE)


class PayResult(_Outcome, msgspec.Struct, frozen=True):
    """One PayResult. `coupons` holds only the coupons applied, no zero slots."""
    id: int
    status: int
    flags: int
    cash: int
    discount: int
    fee: int
    timestamp: int
    coupons: tuple[int, ...]


    @property
    def authorized(self) -> bool:
        return bool(self.flags & RESULT_AUTHORIZED)


class IssueResult(_Outcome, msgspec.Struct, frozen=True):
    coupon: int
    status: int
    flags: int
    expires_at: int



def pay_results(results: np.ndarray) -> list[PayResult]:
    """PAY_RESULT rows as structs (tolist() once: no per-field numpy access)."""
    return [PayResult(i, s, f, c, d, fee, t, tuple(x for x in cs if x))
            for i, s, f, c, d, fee, t, cs in results.tolist()]


def issue_results(results: np.ndarray) -> list[IssueResult]:
    return [IssueResult(*row) for row in results.tolist()]


# -- encoding ---------------------------------------------------------------

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


def encode_frame(op: int, request_id: int, body=b"", flags: int = 0) -> bytearray:
    """Header and body in one buffer: one copy of the body, one write."""
    view = memoryview(body).cast("B") if not isinstance(body, (bytes, bytearray)) else body
    frame = bytearray(HEADER_BYTES + len(view))
    HEADER.pack_into(frame, 0, len(view), op, flags, request_id)
    frame[HEADER_BYTES:] = view
    return frame


def _batch_body(records: np.ndarray, dtype: np.dtype, batch_max: int) -> memoryview:
    if not isinstance(records, np.ndarray) or records.dtype != dtype:
        raise TypeError(f"records must be a numpy array of dtype {dtype}, "
                        f"got {getattr(records, 'dtype', type(records).__name__)}")
    if not 1 <= len(records) <= batch_max:
        raise ValueError(f"a batch holds 1..{batch_max} records, got {len(records)}; "
                         "split it into several calls")
    return memoryview(np.ascontiguousarray(records).view(np.uint8))


def _batch_reply(body: bytes, dtype: np.dtype, n: int) -> np.ndarray:
    if len(body) != n * dtype.itemsize:
        raise ProtocolError(f"expected {n} results of {dtype.itemsize} bytes, "
                            f"got a body of {len(body)} bytes")
    return np.frombuffer(body, dtype)   # read-only view of the reply, no copy


def _op_code(op: str | int) -> int:
    if isinstance(op, int):
        return op
    code = OPS.get(op.upper())
    if code is None:
        raise ValueError(f"unknown op {op!r}; known: {', '.join(OPS)}")
    return code


def _check_range(name: str, value: int, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in {low}..{high}, got {value!r}")
    return value


def pay_record(id: int, payer: int, merchant: int, amount: int, flags: int = 0,
               goods_tag: int = 0, coupons: Sequence[int] = (),
               user_data: int = 0) -> tuple[Any, ...]:
    """One PayRecord as a tuple for np.array(..., PAY_RECORD), range-checked so
    that one bad call cannot spoil a coalesced batch."""
    coupons = tuple(coupons)
    if len(coupons) > COUPONS_PER_PAYMENT_MAX:
        raise ValueError(f"at most {COUPONS_PER_PAYMENT_MAX} coupons, got {len(coupons)}")
    for c in coupons:
        _check_range("coupon id", c, 0, U64_MAX)
    return (_check_range("id", id, 0, U64_MAX), _check_range("payer", payer, 0, U64_MAX),
            _check_range("merchant", merchant, 0, U64_MAX),
            _check_range("amount", amount, I64_MIN, I64_MAX),
            _check_range("flags", flags, 0, U32_MAX),
            _check_range("goods_tag", goods_tag, 0, U32_MAX),
            coupons + (0,) * (COUPONS_PER_PAYMENT_MAX - len(coupons)),
            _check_range("user_data", user_data, 0, U64_MAX))


def issue_record(coupon: int, stock: int, user: int) -> tuple[int, int, int, int]:
    return (_check_range("coupon", coupon, 0, U64_MAX), _check_range("stock", stock, 0, U64_MAX),
            _check_range("user", user, 0, U64_MAX), 0)


# -- HELLO ------------------------------------------------------------------

def hello_mac(secret: str, key_id: str, ts_ms: int, nonce: str) -> bytes:
    """HMAC-SHA256 over "ts.nonce.key_id", keyed with the secret (PROTOCOL.md)."""
    message = f"{ts_ms}.{nonce}.{key_id}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).digest()


def hello_request(key_id: str | None = None, secret: str | None = None, *,
                  client_name: str = CLIENT_NAME, ts_ms: int | None = None,
                  nonce: str | None = None) -> dict[str, Any]:
    """The HELLO map; authenticated when key_id and secret are given."""
    request: dict = {"protocol": PROTOCOL_VERSION, "client": client_name}
    if (key_id is None) != (secret is None):
        raise ValueError("give both key_id and secret, or neither")
    if key_id is not None:
        ts_ms = time.time_ns() // 1_000_000 if ts_ms is None else ts_ms
        nonce = secrets.token_hex(16) if nonce is None else nonce
        request.update(key_id=key_id, ts=ts_ms, nonce=nonce,
                       mac=hello_mac(secret, key_id, ts_ms, nonce))
    return request


def parse_address(address: str, port_default: int = PORT_DEFAULT) -> tuple[str, int]:
    """"HOST:PORT", "HOST", "[::1]:PORT", "tcp://HOST:PORT", or a bare "PORT"
    (which means 127.0.0.1:PORT) -> (host, port); anything else: ValueError.
    (A bare port used to be taken for a host name and resolved as an IPv4
    number: "7411" became 0.0.28.243.)"""
    text = address.strip()
    address = text.removeprefix("tcp://").rstrip("/")
    if address.isdigit():
        host, port = "127.0.0.1", address
    elif address.startswith("["):
        host, _, rest = address[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(f"bad address {text!r}: expected [IPv6]:PORT")
        port = rest.removeprefix(":") or str(port_default)
    elif address.count(":") == 1:
        host, port = address.split(":")
    else:
        host, port = address, str(port_default)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port in {text!r}: expected HOST:PORT with a port in 1..65535")
    host = host or "127.0.0.1"
    if not _valid_host(host):
        raise ValueError(f"bad host in {text!r}: expected HOST:PORT, [IPv6]:PORT, PORT "
                         f"or a Unix socket path")
    return host, int(port)


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _valid_host(host: str) -> bool:
    """An IP address or a DNS name (never a bare number a resolver would
    take for an IPv4 address)."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    return (len(host) <= 253 and not labels[-1].isdigit()
            and all(_HOST_LABEL.fullmatch(label) for label in labels))


def is_unix_path(address: str) -> bool:
    """`--connect` takes a Unix socket path too: one with a slash in it."""
    return "/" in address.removeprefix("tcp://").rstrip("/")


# -- asyncio client -----------------------------------------------------------

class _Protocol(asyncio.Protocol):
    """Cuts the byte stream into frames and hands them to the client."""

    def __init__(self, client: "AsyncClient"):
        self.client = client
        self.buffer = bytearray()

    def connection_made(self, transport):
        self.client._transport = transport

    def data_received(self, data):
        buffer = self.buffer
        buffer += data
        at, end_of_data = 0, len(buffer)
        deliver = self.client._deliver
        while end_of_data - at >= HEADER_BYTES:
            size, op, flags, request_id = HEADER.unpack_from(buffer, at)
            if size > REPLY_BYTES_MAX:
                self.client._fail(ProtocolError(f"reply of {size} bytes: the stream is broken"))
                return
            end = at + HEADER_BYTES + size
            if end > end_of_data:
                break
            deliver(op, flags, request_id, bytes(buffer[at + HEADER_BYTES:end]))
            at = end
        if at:
            del buffer[:at]

    def connection_lost(self, exc):
        self.client._fail(ConnectionLost(f"connection closed: {exc}" if exc else "connection closed"))
        if not self.client._lost.done():
            self.client._lost.set_result(None)

    def pause_writing(self):
        self.client._writable.clear()

    def resume_writing(self):
        self.client._writable.set()


class _Coalescer:
    """Gathers the single-record calls of one loop tick into one batch frame."""

    def __init__(self, client: "AsyncClient", op: int, dtype: np.dtype,
                 result_dtype: np.dtype, to_structs):
        self.client = client
        self.op = op
        self.dtype = dtype
        self.result_dtype = result_dtype
        self.to_structs = to_structs
        self.pending: list[tuple[tuple, asyncio.Future]] = []
        self.tasks: set[asyncio.Task] = set()   # strong refs until each batch is done

    def submit(self, record: tuple) -> asyncio.Future:
        loop = self.client._loop
        future = loop.create_future()
        if not self.pending:
            # Runs after every callback already ready in this iteration, so all
            # calls made in this tick are in the batch.
            loop.call_soon(self.flush)
        self.pending.append((record, future))
        return future

    def flush(self):
        pending, self.pending = self.pending, []
        batch_max = self.client.max_batch
        for start in range(0, len(pending), batch_max):
            chunk = pending[start:start + batch_max]
            task = self.client._loop.create_task(self.send(chunk))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def send(self, chunk):
        futures = [future for _, future in chunk]
        try:
            records = np.array([record for record, _ in chunk], self.dtype)
            self.client.batches_sent += 1
            results = await self.client._batch(self.op, records, self.dtype, self.result_dtype)
        except asyncio.CancelledError:
            for future in futures:
                if not future.done():
                    future.set_exception(ConnectionLost("client closed"))
            raise
        except Exception as e:  # noqa: BLE001 - every caller gets the error
            for future in futures:
                if not future.done():
                    future.set_exception(e)
            return
        for future, result in zip(futures, self.to_structs(results)):
            if not future.done():
                future.set_result(result)


class AsyncClient:
    """One connection, any number of requests in flight.

    Use `await AsyncClient.connect(...)`; `async with` closes it.
    """

    def __init__(self, *, timeout_ms: int = TIMEOUT_MS_DEFAULT,
                 in_flight_max: int = IN_FLIGHT_MAX_DEFAULT):
        if timeout_ms <= 0:
            raise ValueError("timeout_ms must be > 0")
        self.timeout_ms = timeout_ms
        self.server_info: HelloInfo | None = None
        self.batches_sent = 0          # coalesced PAY/ISSUE frames (observability, tests)
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._pending: dict[int, tuple[asyncio.Future, int, asyncio.TimerHandle]] = {}
        self._next_id = 1
        self._in_flight = asyncio.Semaphore(in_flight_max)
        self._writable = asyncio.Event()
        self._writable.set()
        self._closed: BaseException | None = None
        self._lost = self._loop.create_future()   # done when the transport is gone
        self._pay = _Coalescer(self, OP_PAY, PAY_RECORD, PAY_RESULT, pay_results)
        self._issue = _Coalescer(self, OP_ISSUE, ISSUE_RECORD, ISSUE_RESULT, issue_results)

    @classmethod
    async def connect(cls, host: str = "127.0.0.1", port: int = PORT_DEFAULT, *,
                      unix: str | None = None, ssl: ssl_module.SSLContext | None = None,
                      key_id: str | None = None,
                      secret: str | None = None, timeout_ms: int = TIMEOUT_MS_DEFAULT,
                      in_flight_max: int = IN_FLIGHT_MAX_DEFAULT,
                      client_name: str = CLIENT_NAME) -> "AsyncClient":
        """Connect (TCP, or the Unix socket `unix`) and say HELLO."""
        client = cls(timeout_ms=timeout_ms, in_flight_max=in_flight_max)
        loop = client._loop
        timeout_s = timeout_ms / 1000
        if unix is not None:
            opening = loop.create_unix_connection(lambda: _Protocol(client), unix, ssl=ssl,
                                                  server_hostname=host if ssl else None)
        else:
            opening = loop.create_connection(lambda: _Protocol(client), host, port, ssl=ssl)
        await asyncio.wait_for(opening, timeout_s)
        sock = client._transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await client.hello(key_id, secret, client_name=client_name)
        except BaseException:
            client.close()
            raise
        return client

    # -- calls ------------------------------------------------------------

    async def hello(self, key_id: str | None = None, secret: str | None = None, *,
                    client_name: str = CLIENT_NAME) -> HelloInfo:
        reply = await self._request(OP_HELLO, _encoder.encode(
            hello_request(key_id, secret, client_name=client_name)))
        self.server_info = msgspec.convert(decode_reply(reply), HelloInfo)
        return self.server_info

    async def ping(self, *, timeout_ms: int | None = None) -> None:
        await self._request(OP_PING, b"", timeout_ms)

    async def pay(self, records: np.ndarray, *, timeout_ms: int | None = None) -> np.ndarray:
        """One PAY frame: PAY_RECORD array in, PAY_RESULT array (read-only) out."""
        return await self._batch(OP_PAY, records, PAY_RECORD, PAY_RESULT, timeout_ms)

    async def issue(self, records: np.ndarray, *, timeout_ms: int | None = None) -> np.ndarray:
        return await self._batch(OP_ISSUE, records, ISSUE_RECORD, ISSUE_RESULT, timeout_ms)

    async def call(self, op: str | int, request: dict[str, Any] | None = None, *,
                   timeout_ms: int | None = None) -> dict[str, Any]:
        """A map operation by name ("QUOTE") or number: map in, map out."""
        reply = await self._request(_op_code(op), _encoder.encode(
            {} if request is None else request), timeout_ms)
        return decode_reply(reply)

    async def pay_one(self, *, id: int, payer: int, merchant: int, amount: int,
                      flags: int = 0, goods_tag: int = 0, coupons: Sequence[int] = (),
                      user_data: int = 0) -> PayResult:
        """One payment; concurrent calls of one loop tick share a PAY frame."""
        self._check_open()
        return await self._pay.submit(pay_record(id, payer, merchant, amount, flags,
                                                 goods_tag, coupons, user_data))

    async def issue_one(self, *, coupon: int, stock: int, user: int) -> IssueResult:
        self._check_open()
        return await self._issue.submit(issue_record(coupon, stock, user))

    @property
    def max_batch(self) -> int:
        return self.server_info.max_batch if self.server_info else BATCH_RECORDS_MAX_DEFAULT

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    # -- lifecycle ----------------------------------------------------------

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._fail(ConnectionLost("client closed"))

    async def wait_closed(self) -> None:
        if self._transport is not None:
            await self._lost

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()

    # -- internals ----------------------------------------------------------

    def _check_open(self):
        if self._closed is not None:
            raise ConnectionLost(f"the connection is closed ({self._closed})")

    async def _batch(self, op, records, dtype, result_dtype, timeout_ms=None) -> np.ndarray:
        body = _batch_body(records, dtype, self.max_batch)
        reply = await self._request(op, body, timeout_ms)
        return _batch_reply(reply, result_dtype, len(records))

    async def _request(self, op: int, body, timeout_ms: int | None = None) -> bytes:
        self._check_open()
        async with self._in_flight:
            if not self._writable.is_set():
                await self._writable.wait()
            self._check_open()
            request_id = self._next_id
            self._next_id += 1
            future = self._loop.create_future()
            timer = self._loop.call_later((timeout_ms or self.timeout_ms) / 1000,
                                          self._expire, request_id)
            self._pending[request_id] = (future, op, timer)
            try:
                self._transport.write(encode_frame(op, request_id, body))
                return await future
            finally:
                timer.cancel()
                self._pending.pop(request_id, None)

    def _expire(self, request_id: int):
        entry = self._pending.pop(request_id, None)
        if entry is not None and not entry[0].done():
            entry[0].set_exception(TimeoutError(
                f"no reply to {OP_NAMES.get(entry[1], entry[1])} in the timeout"))

    def _deliver(self, op: int, flags: int, request_id: int, body: bytes):
        entry = self._pending.pop(request_id, None)
        if entry is None:
            # A late reply to a request that timed out or was cancelled; or an
            # error about the connection itself (request id 0, e.g. busy: too
            # many connections), which ends it.
            if flags & FLAG_ERROR:
                error = error_from_frame(op, request_id, body)
                if request_id == 0 or getattr(error, "code", None) in CLOSING_CODES:
                    self._fail(error)
            return
        future, sent_op, timer = entry
        timer.cancel()
        if future.done():
            return
        if flags & FLAG_ERROR:
            future.set_exception(error_from_frame(op, request_id, body))
        elif op != sent_op:
            future.set_exception(ProtocolError(
                f"reply to request {request_id} has op {op}, the request had {sent_op}"))
        else:
            future.set_result(body)

    def _fail(self, error: BaseException):
        """Every request in flight fails with `error`; the client is closed."""
        if self._closed is None:
            self._closed = error
        pending, self._pending = self._pending, {}
        for future, _, timer in pending.values():
            timer.cancel()
            if not future.done():
                future.set_exception(error)
        self._writable.set()   # wake writers so that they see the closed state
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()


# -- blocking client ---------------------------------------------------------

class Client:
    """Blocking client on a plain socket: one request at a time.

    Uses only the `socket` module at call time, so gevent's monkey-patching
    makes it cooperative (locust). No reconnects: after `ConnectionLost`,
    make a new one.
    """

    def __init__(self, sock: socket.socket, *, timeout_ms: int = TIMEOUT_MS_DEFAULT):
        if timeout_ms <= 0:
            raise ValueError("timeout_ms must be > 0")
        self.timeout_ms = timeout_ms
        self.server_info: HelloInfo | None = None
        self._sock: socket.socket | None = sock
        self._buffer = bytearray()
        self._next_id = 1
        self.last_reply_bytes = 0      # frame bytes of the last reply (load-test stats)

    @classmethod
    def connect(cls, host: str = "127.0.0.1", port: int = PORT_DEFAULT, *,
                unix: str | None = None, ssl: ssl_module.SSLContext | None = None,
                key_id: str | None = None,
                secret: str | None = None, timeout_ms: int = TIMEOUT_MS_DEFAULT,
                client_name: str = CLIENT_NAME) -> "Client":
        timeout_s = timeout_ms / 1000
        if unix is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout_s)
            try:
                sock.connect(unix)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection((host, port), timeout=timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ssl is not None:
            sock = ssl.wrap_socket(sock, server_hostname=host)
        client = cls(sock, timeout_ms=timeout_ms)
        try:
            client.hello(key_id, secret, client_name=client_name)
        except BaseException:
            client.close()
            raise
        return client

    def hello(self, key_id: str | None = None, secret: str | None = None, *,
              client_name: str = CLIENT_NAME) -> HelloInfo:
        reply = self._request(OP_HELLO, _encoder.encode(
            hello_request(key_id, secret, client_name=client_name)))
        self.server_info = msgspec.convert(decode_reply(reply), HelloInfo)
        return self.server_info

    def ping(self, *, timeout_ms: int | None = None) -> None:
        self._request(OP_PING, b"", timeout_ms)

    def pay(self, records: np.ndarray, *, timeout_ms: int | None = None) -> np.ndarray:
        body = _batch_body(records, PAY_RECORD, self.max_batch)
        return _batch_reply(self._request(OP_PAY, body, timeout_ms), PAY_RESULT, len(records))

    def issue(self, records: np.ndarray, *, timeout_ms: int | None = None) -> np.ndarray:
        body = _batch_body(records, ISSUE_RECORD, self.max_batch)
        return _batch_reply(self._request(OP_ISSUE, body, timeout_ms), ISSUE_RESULT, len(records))

    def call(self, op: str | int, request: dict[str, Any] | None = None, *,
             timeout_ms: int | None = None) -> dict[str, Any]:
        reply = self._request(_op_code(op), _encoder.encode(
            {} if request is None else request), timeout_ms)
        return decode_reply(reply)

    def pay_one(self, *, id: int, payer: int, merchant: int, amount: int, flags: int = 0,
                goods_tag: int = 0, coupons: Sequence[int] = (),
                user_data: int = 0) -> PayResult:
        records = np.array([pay_record(id, payer, merchant, amount, flags, goods_tag,
                                       coupons, user_data)], PAY_RECORD)
        return pay_results(self.pay(records))[0]

    def issue_one(self, *, coupon: int, stock: int, user: int) -> IssueResult:
        records = np.array([issue_record(coupon, stock, user)], ISSUE_RECORD)
        return issue_results(self.issue(records))[0]

    @property
    def max_batch(self) -> int:
        return self.server_info.max_batch if self.server_info else BATCH_RECORDS_MAX_DEFAULT

    def close(self) -> None:
        if self._sock is not None:
            sock, self._sock = self._sock, None
            sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------

    def _request(self, op: int, body, timeout_ms: int | None = None) -> bytes:
        if self._sock is None:
            raise ConnectionLost("the connection is closed")
        request_id = self._next_id
        self._next_id += 1
        deadline = time.monotonic() + (timeout_ms or self.timeout_ms) / 1000
        try:
            self._sock.settimeout(max(deadline - time.monotonic(), 0.001))
            self._sock.sendall(encode_frame(op, request_id, body))
            while True:
                reply_op, flags, reply_id, reply = self._read_frame(deadline)
                if reply_id == request_id:
                    break
                # else: the late reply of a request that timed out; skip it,
                # unless it is an error about the stream itself.
                if flags & FLAG_ERROR:
                    error = error_from_frame(reply_op, reply_id, reply)
                    if reply_id == 0 or getattr(error, "code", None) in CLOSING_CODES:
                        self.close()
                        raise error
        except (socket.timeout, TimeoutError):
            raise TimeoutError(f"no reply to {OP_NAMES.get(op, op)} in "
                               f"{timeout_ms or self.timeout_ms} ms") from None
        except ConnectionLost:
            raise
        except OSError as e:
            self.close()
            raise ConnectionLost(f"connection failed: {e}") from e
        if flags & FLAG_ERROR:
            error = error_from_frame(reply_op, reply_id, reply)
            if getattr(error, "code", None) in CLOSING_CODES:
                self.close()
            raise error
        if reply_op != op:
            raise ProtocolError(f"reply to request {request_id} has op {reply_op}, "
                                f"the request had {op}")
        self.last_reply_bytes = HEADER_BYTES + len(reply)
        return reply

    def _read_frame(self, deadline: float) -> tuple[int, int, int, bytes]:
        # Partial frames stay in the buffer across a timeout, so the stream
        # stays in step for the next call.
        buffer = self._buffer
        while True:
            if len(buffer) >= HEADER_BYTES:
                size, op, flags, request_id = HEADER.unpack_from(buffer, 0)
                if size > REPLY_BYTES_MAX:
                    self.close()
                    raise ProtocolError(f"reply of {size} bytes: the stream is broken")
                end = HEADER_BYTES + size
                if len(buffer) >= end:
                    body = bytes(buffer[HEADER_BYTES:end])
                    del buffer[:end]
                    return op, flags, request_id, body
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise TimeoutError
            self._sock.settimeout(remaining_s)
            chunk = self._sock.recv(RECV_BYTES)
            if not chunk:
                self.close()
                raise ConnectionLost("the server closed the connection")
            buffer += chunk
