"""Clients of the Scanpay wire protocol (docs/reference/protocol.md).

Two flavours with the same calls:

- `AsyncClient` (asyncio): pipelines any number of requests on one connection,
  matched by request id, and coalesces concurrent `pay_one` / `issue_one`
  calls of one event-loop tick into a single PAY / ISSUE frame.
- `Client` (blocking, plain `socket`): one request at a time; works under
  gevent monkey-patching, which is what the locust load test uses.
- `create_pool` / `Pool`: up to max_size AsyncClient connections, lent out
  with `async with pool.acquire()`, lost ones replaced.

The per-request work (packing records, cutting replies, building results)
runs in the compiled `engine._client` (ext/client.pyx) when it is built and
in its plain-Python twin engine/_client_py.py otherwise. The API reference
is docs/client.md.

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
import collections
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

from engine import _client_py           # absolute: the twin stays engine/_client_py.py
from engine._client_py import (I64_MAX, I64_MIN, REPLY_BYTES_MAX, U32_MAX,  # noqa: F401 (names
                         U64_MAX)                                     # of this module before)
from engine._version import __version__
from engine.protocol.auth import hello_mac
from engine.protocol.errors import (BadBody, BadFrame, Busy, EngineError, Forbidden, FrameTooLarge, NotLeader,
                     NotAuthenticated, Unavailable, UnknownOp, UnsupportedProtocol)
from engine.protocol.frame import FLAG_ERROR, FRAME_BYTES_MAX_DEFAULT, HEADER, HEADER_BYTES
from engine.protocol.frame import encode as encode_frame
from engine.protocol.records import (ISSUE_RECORD, ISSUE_RESULT, PAY_RECORD, PAY_RESULT,
                                     RESULT_AUTHORIZED, RESULT_DUPLICATE)
from engine.protocol.limits import BATCH_RECORDS_MAX, COUPONS_PER_PAYMENT_MAX
from engine.protocol.ops import OP_CODES, OP_HELLO, OP_ISSUE, OP_NAMES, OP_PAY, OP_PING
from engine.protocol.status import STATUS_NAMES, STATUS_OK, ErrorCode

try:                                   # the compiled hot path (ext/client.pyx)
    from engine import _client as _client_c
except ImportError:                    # not built: the plain-Python twin does the same
    _client_c = None

__all__ = [
    "AsyncClient", "Client", "Pool", "PoolClosed", "create_pool", "HelloInfo", "PayResult", "IssueResult",
    "ConnectionLost", "OutcomeUnknown", "RetryDeadlineExceeded", "ProtocolError", "ServerError", "OPS", "hello_request", "hello_mac",
    "parse_address", "error_from_frame",
    "NotAuthenticated", "Forbidden", "FrameTooLarge", "BadFrame", "UnsupportedProtocol", "NotLeader",
]

PROTOCOL_VERSION = 1
CLIENT_NAME = f"scanpay-python/{__version__}"
PORT_DEFAULT = 7411
TIMEOUT_MS_DEFAULT = 10_000
BATCH_RECORDS_MAX_DEFAULT = BATCH_RECORDS_MAX   # until HELLO says otherwise
IN_FLIGHT_MAX_DEFAULT = 4096           # requests awaiting a reply, per connection
# Failover (several addresses; docs/client.md "Several addresses"): the bounds
# are checked by engine/client/failover.py's RetryPolicy.
RETRY_DEADLINE_MS_DEFAULT = 30_000     # with several addresses; one address: no retries
BACKOFF_INITIAL_MS_DEFAULT = 50
BACKOFF_MAX_MS_DEFAULT = 2_000
RECV_BYTES = 1 << 18
ACQUIRE_ROUNDS_MAX = 1 << 20           # pool: wake-ups one acquire may go through
ROOM_WAITS_MAX = 1 << 20               # wake-ups one request may wait for a free slot

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
        Forbidden, Busy, Unavailable, UnsupportedProtocol, NotLeader)
}
# After these the server closes the connection (docs/reference/protocol.md).
CLOSING_CODES = frozenset({ErrorCode.bad_frame, ErrorCode.frame_too_large,
                           ErrorCode.unsupported_protocol})


class ConnectionLost(ConnectionError):
    """The connection closed (or was closed) before the reply arrived.

    `sent` is False when the request never left this client (its frame was
    still queued, or the connection was already closed): nothing can have
    been applied, so even an op that is not idempotent may be sent again.
    """
    sent = True


def not_sent(message: str) -> ConnectionLost:
    """The ConnectionLost of a request that never left this client."""
    error = ConnectionLost(message)
    error.sent = False
    return error


class OutcomeUnknown(ConnectionLost):
    """A request that is not idempotent may have been applied: the connection
    was lost (or no reply came in time) after it was sent, so the failover
    client did not send it again (docs/client.md, "Several addresses")."""

    def __init__(self, op: int, cause: BaseException):
        name = OP_NAMES.get(op, str(op))
        super().__init__(
            f"{name} may or may not have been applied: {type(cause).__name__}: {cause} after "
            f"it was sent; {name} is not idempotent, so it was not sent again. Read the state "
            f"(e.g. BALANCES, STATEMENT) before repeating it")
        self.op = op
        self.cause = cause


class RetryDeadlineExceeded(TimeoutError):
    """The failover client gave up: `retry_deadline_ms` passed since the
    call's first failure. `last_error` is the last failure (or why no server
    could be used); an idempotent request may be sent again later with the
    same ids."""

    def __init__(self, op: int, attempts: int, deadline_ms: int, last_error: object):
        name = OP_NAMES.get(op, str(op))
        why = (f"{type(last_error).__name__}: {last_error}" if isinstance(last_error, BaseException)
               else str(last_error or "no leader reachable"))
        super().__init__(f"{name} not done within retry_deadline_ms={deadline_ms} "
                         f"({attempts} attempts sent); last error: {why}")
        self.op = op
        self.attempts = attempts
        self.last_error = last_error


class ProtocolError(Exception):
    """The server sent something docs/reference/protocol.md does not allow."""


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
    role: str = ""                 # "leader", "follower" or "single" (replication); "" if not sent
    leader: str = ""               # a follower's leader, HOST:PORT ("" if none known or not sent)


class _Outcome:
    """What every result record tells: its status and the duplicate flag."""
    __slots__ = ()

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

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



# -- the hot path: compiled, or its plain-Python twin ----------------------------

assert HEADER.format == "<IHHQ" and COUPONS_PER_PAYMENT_MAX == _client_py.COUPONS_MAX
assert PAY_RECORD.itemsize == _client_py._PAY.size
assert PAY_RESULT.itemsize == _client_py._PAY_RESULT.size
IMPLEMENTATIONS = {"python": _client_py}
if _client_c is not None:
    IMPLEMENTATIONS["cython"] = _client_c
IMPLEMENTATION = "cython" if _client_c is not None else "python"
_impl = IMPLEMENTATIONS[IMPLEMENTATION]


def use_implementation(name: str) -> str:
    """Make clients created from now on use the "cython" or "python" hot path
    (tests run both); returns the name in use before."""
    global IMPLEMENTATION, _impl
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"implementation {name!r} is not available; "
                         f"have: {', '.join(IMPLEMENTATIONS)}")
    before, IMPLEMENTATION, _impl = IMPLEMENTATION, name, IMPLEMENTATIONS[name]
    return before


def _result_bytes(results: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if not isinstance(results, np.ndarray) or results.dtype != dtype:
        raise TypeError(f"results must be a numpy array of dtype {dtype}")
    return np.ascontiguousarray(results).reshape(-1).view(np.uint8)


def pay_results(results: np.ndarray) -> list[PayResult]:
    """PAY_RESULT rows as PayResult structs of plain ints."""
    return _impl.pay_results(_result_bytes(results, PAY_RESULT))


def issue_results(results: np.ndarray) -> list[IssueResult]:
    """ISSUE_RESULT rows as IssueResult structs of plain ints."""
    return _impl.issue_results(_result_bytes(results, ISSUE_RESULT))


# -- encoding ---------------------------------------------------------------

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


def _op_code(op: str | int) -> int:
    if isinstance(op, int):
        return op
    code = OPS.get(op.upper())
    if code is None:
        raise ValueError(f"unknown op {op!r}; known: {', '.join(OPS)}")
    return code


def pay_record(id: int, payer: int, merchant: int, amount: int, flags: int = 0,
               goods_tag: int = 0, coupons: Sequence[int] = (),
               user_data: int = 0) -> tuple[Any, ...]:
    """One PayRecord as a tuple for np.array(..., PAY_RECORD), range-checked."""
    return _client_py.pay_fields(id, payer, merchant, amount, flags, goods_tag, coupons,
                                 user_data)


def issue_record(coupon: int, stock: int, user: int) -> tuple[int, int, int, int]:
    return _client_py.issue_fields(coupon, stock, user)


# -- HELLO ------------------------------------------------------------------

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
        self.cutter = client._impl.FrameCutter()

    def connection_made(self, transport):
        self.client._transport = transport

    def data_received(self, data):
        client = self.client
        # Plain replies resolve their caller's Future in the hot path; the rest
        # (errors, coalesced frames, own timers, waiters for room) go to _deliver.
        error = self.cutter.deliver(data, client._state.pending, client._room_waiters,
                                    client._deliver)
        if error is not None:
            client._fail(error)

    def connection_lost(self, exc):
        self.client._fail(ConnectionLost(f"connection closed: {exc}" if exc else "connection closed"))
        if not self.client._lost.done():
            self.client._lost.set_result(None)

    def pause_writing(self):
        self.client._state.paused = True
        self.client._writable.clear()

    def resume_writing(self):
        self.client._state.paused = False
        self.client._writable.set()


class _Batch:
    """The callers of one coalesced PAY / ISSUE frame, in record order."""
    __slots__ = ("futures", "to_structs")

    def __init__(self, futures: list, to_structs):
        self.futures = futures
        self.to_structs = to_structs

    def settle(self, client: "AsyncClient", op: int, sent_op: int, flags: int,
               request_id: int, body: bytes) -> None:
        futures = self.futures
        try:
            if flags & FLAG_ERROR:
                raise error_from_frame(op, request_id, body)
            if op != sent_op:
                raise ProtocolError(f"reply to request {request_id} has op {op}, "
                                    f"the request had {sent_op}")
            client._impl.resolve(futures, self.to_structs(body))
        except Exception as e:     # noqa: BLE001 - every caller of the frame gets the error
            self.fail(e)

    def fail(self, error: BaseException) -> None:
        for future in self.futures:
            if not future.done():
                future.set_exception(error)


for _module in IMPLEMENTATIONS.values():
    _module.configure(PayResult, IssueResult, ProtocolError, _Batch)


class _Coalescer:
    """Gathers the single-record calls of one loop tick into one batch frame:
    each record is checked and packed straight into the frame's body, and the
    reply resolves the callers' futures in one pass (no task per frame)."""

    def __init__(self, client: "AsyncClient", op: int, to_structs):
        self.client = client
        self.op = op
        self.to_structs = to_structs
        self.body = bytearray()
        self.futures: list[asyncio.Future] = []

    def add(self) -> asyncio.Future:
        """The future of the record just packed into `body` (the caller
        packs it first, so that a bad record raises alone)."""
        client = self.client
        future = client._loop.create_future()
        futures = self.futures
        if not futures:
            state = client._state
            state.open_frames += 1         # it takes an in-flight slot from now on
            # Only the first record checks: _end_of_tick empties every open
            # frame, so one with records always has its tick due.
            if not state.tick_scheduled:
                state.schedule_tick()
        futures.append(future)
        if len(futures) >= client._max_batch:
            self.flush()
        return future

    def flush(self):
        if not self.futures:
            return
        batch = _Batch(self.futures, self.to_structs)
        body, self.body, self.futures = self.body, bytearray(), []
        self.client._state.open_frames -= 1
        if self.client._closed is not None:
            batch.fail(not_sent(f"the connection is closed ({self.client._closed})"))
            return
        self.client.batches_sent += 1
        self.client._state.send(self.op, body, batch, None)


class AsyncClient:
    """One connection, any number of requests in flight.

    Use `await AsyncClient.connect(...)`; `async with` closes it.
    """

    # The connection's request state (set by __init__; the failover client,
    # which does not run it, has none and sends every call through _request).
    _state: Any = None

    def __init__(self, *, timeout_ms: int = TIMEOUT_MS_DEFAULT,
                 in_flight_max: int = IN_FLIGHT_MAX_DEFAULT):
        if timeout_ms <= 0:
            raise ValueError("timeout_ms must be > 0")
        if in_flight_max <= 0:
            raise ValueError("in_flight_max must be > 0")
        self._timeout_ms = timeout_ms
        self.server_info: HelloInfo | None = None
        self.batches_sent = 0          # coalesced PAY/ISSUE frames (observability, tests)
        self._impl = _impl             # the hot path in use when the client was made
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        # The requests in flight (pending: request id -> (Future or _Batch, op,
        # TimerHandle or None, deadline), in request id order, which
        # _sweep_expired relies on), this tick's frames, the in-flight count
        # and the paused flag: read on every request, so kept in the hot
        # path's class (C fields in the compiled one).
        self._state = self._impl.Requests(self._loop, timeout_ms, in_flight_max,
                                          self._end_of_tick, self._sweep_expired, self._expire)
        self._has_room = self._state.has_room      # no Python frame in between
        self._room_waiters: collections.deque[asyncio.Future] = collections.deque()
        self._writable = asyncio.Event()   # set while the transport takes writes
        self._writable.set()
        self._closed: BaseException | None = None
        self._lost = self._loop.create_future()   # done when the transport is gone
        self._max_batch = BATCH_RECORDS_MAX_DEFAULT    # until HELLO says otherwise
        self._pack_pay, self._pack_issue = self._impl.pack_pay, self._impl.pack_issue
        self._pay = _Coalescer(self, OP_PAY, self._impl.pay_results)
        self._issue = _Coalescer(self, OP_ISSUE, self._impl.issue_results)

    @classmethod
    async def connect(cls, host: str | Sequence[str] = "127.0.0.1", port: int = PORT_DEFAULT, *,
                      unix: str | None = None, ssl: ssl_module.SSLContext | None = None,
                      key_id: str | None = None,
                      secret: str | None = None, timeout_ms: int = TIMEOUT_MS_DEFAULT,
                      in_flight_max: int = IN_FLIGHT_MAX_DEFAULT,
                      client_name: str = CLIENT_NAME, retry_deadline_ms: int | None = None,
                      backoff_initial_ms: int = BACKOFF_INITIAL_MS_DEFAULT,
                      backoff_max_ms: int = BACKOFF_MAX_MS_DEFAULT) -> "AsyncClient":
        """Connect (TCP, or the Unix socket `unix`) and say HELLO.

        `host` may name several servers (a list of "HOST:PORT", or one string
        of them separated by commas): the client then follows the leader and
        retries (engine/client/failover.py); so it does with one address when
        `retry_deadline_ms` is given."""
        if retry_deadline_ms or not isinstance(host, str) or "," in host:
            from engine.client import failover
            return await failover.connect_async(
                host, port, retry_deadline_ms=retry_deadline_ms,
                backoff_initial_ms=backoff_initial_ms, backoff_max_ms=backoff_max_ms,
                unix=unix, ssl=ssl, key_id=key_id, secret=secret, timeout_ms=timeout_ms,
                in_flight_max=in_flight_max, client_name=client_name)
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
        self._max_batch = self.server_info.max_batch
        return self.server_info

    async def ping(self, *, timeout_ms: int | None = None) -> None:
        await self._request(OP_PING, b"", timeout_ms)

    async def pay(self, records: np.ndarray, *, timeout_ms: int | None = None) -> np.ndarray:
        """One PAY frame: PAY_RECORD array in, PAY_RESULT array (read-only) out."""
        impl, state = self._impl, self._state
        body = impl.batch_body(records, PAY_RECORD, self.max_batch)
        # _request's work inlined (a coroutine less a call: a gateway sends
        # one record a call); _request when there is no room or the client is
        # closed (it waits or raises), and for the failover client (no _state)
        # whose _request picks the connection.
        future = None if state is None else state.request(OP_PAY, body, timeout_ms)
        if future is None:
            reply = await self._request(OP_PAY, body, timeout_ms)
        else:
            request_id = state.last_id
            try:
                reply = await future
            finally:
                if state.forget(request_id):       # cancelled or failed before its reply
                    self._wake_room_waiter()
        return impl.batch_reply(reply, PAY_RESULT, len(body))

    async def issue(self, records: np.ndarray, *, timeout_ms: int | None = None) -> np.ndarray:
        impl = self._impl
        body = impl.batch_body(records, ISSUE_RECORD, self.max_batch)
        reply = await self._request(OP_ISSUE, body, timeout_ms)
        return impl.batch_reply(reply, ISSUE_RESULT, len(body))

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
        pay = self._pay
        if self._closed is not None or (not pay.futures and not self._has_room()):
            await self._wait_for_room(pay)     # joining an open frame needs no slot
        self._pack_pay(pay.body, id, payer, merchant, amount, flags, goods_tag, coupons,
                       user_data)
        return await pay.add()

    async def issue_one(self, *, coupon: int, stock: int, user: int) -> IssueResult:
        issue = self._issue
        if self._closed is not None or (not issue.futures and not self._has_room()):
            await self._wait_for_room(issue)
        self._pack_issue(issue.body, coupon, stock, user)
        return await issue.add()

    @property
    def max_batch(self) -> int:
        return self._max_batch

    @property
    def timeout_ms(self) -> int:
        """The default timeout of a request; setting it applies to later ones."""
        return self._timeout_ms

    @timeout_ms.setter
    def timeout_ms(self, timeout_ms: int) -> None:
        self._timeout_ms = timeout_ms
        if self._state is not None:           # the failover client has none
            self._state.timeout_ms = timeout_ms

    @property
    def in_flight(self) -> int:
        return len(self._state.pending)

    @property
    def _pending(self) -> dict[int, tuple[Any, int, Any, float]]:
        return self._state.pending                # type: ignore[no-any-return]

    @property
    def _open_frames(self) -> int:
        return self._state.open_frames            # type: ignore[no-any-return]

    @property
    def _sweep(self) -> asyncio.TimerHandle | None:
        return self._state.sweep                  # type: ignore[no-any-return]

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
            raise not_sent(f"the connection is closed ({self._closed})")

    async def _wait_for_room(self, coalescer: "_Coalescer | None" = None) -> None:
        """Wait until fewer than in_flight_max requests await a reply and the
        transport takes writes; raises once the connection is closed. Each
        freed slot wakes the longest waiter (a caller arriving at that moment
        may take the slot first; the waiter then waits for the next one)."""
        self._check_open()
        for _ in range(ROOM_WAITS_MAX):
            if self._has_room() or (coalescer is not None and coalescer.futures):
                return
            if self._state.paused:
                await self._writable.wait()    # set again by resume_writing or _fail
            else:
                waiter = self._loop.create_future()
                self._room_waiters.append(waiter)
                try:
                    await waiter
                except BaseException:
                    if waiter.done() and not waiter.cancelled():
                        self._wake_room_waiter()   # pass on a wake-up this caller drops
                    raise
            self._check_open()
        raise RuntimeError(f"no room for a request after {ROOM_WAITS_MAX} wake-ups")

    def _wake_room_waiter(self) -> None:
        waiters, state = self._room_waiters, self._state
        while waiters and state.has_slot():
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _request(self, op: int, body, timeout_ms: int | None = None) -> bytes:
        state = self._state
        # One call checks for room, makes the Future, frames the request and
        # registers it (the frames of one loop tick leave in one write).
        future = state.request(op, body, timeout_ms)
        if future is None:
            await self._wait_for_room()            # raises once the connection is closed
            future = self._loop.create_future()
            state.send(op, body, future, timeout_ms)
        request_id = state.last_id
        try:
            return await future                    # type: ignore[no-any-return]
        finally:
            if state.forget(request_id):           # cancelled or failed before its reply
                self._wake_room_waiter()

    def _end_of_tick(self) -> None:
        """Send the coalesced frames, then every frame of this tick in one write."""
        state = self._state
        state.tick_scheduled = False
        self._pay.flush()
        self._issue.flush()
        out, state.out = state.out, bytearray()
        if out and self._closed is None:
            self._transport.write(out)

    def _sweep_expired(self) -> None:
        """Expire the default-timeout requests whose deadline has passed, then
        sleep until the earliest deadline left."""
        self._state.sweep = None
        now, expired, next_deadline = self._loop.time(), [], None
        for request_id, (_, _, timer, deadline) in self._state.pending.items():
            if timer is not None:
                continue                   # its own timer expires it
            if deadline > now:
                next_deadline = deadline
                break
            expired.append(request_id)
        for request_id in expired:
            self._expire(request_id)
        if next_deadline is not None and self._closed is None:
            self._state.sweep = self._loop.call_at(next_deadline, self._sweep_expired)

    def _expire(self, request_id: int):
        entry = self._state.pending.pop(request_id, None)
        if entry is None:
            return
        error = TimeoutError(f"no reply to {OP_NAMES.get(entry[1], entry[1])} in the timeout")
        waiter = entry[0]
        if type(waiter) is _Batch:
            waiter.fail(error)
        elif not waiter.done():
            waiter.set_exception(error)
        self._wake_room_waiter()

    def _deliver(self, op: int, flags: int, request_id: int, body: bytes):
        entry = self._state.pending.pop(request_id, None)
        if entry is None:
            # A late reply to a request that timed out or was cancelled; or an
            # error about the connection itself (request id 0, e.g. busy: too
            # many connections), which ends it.
            if flags & FLAG_ERROR:
                error = error_from_frame(op, request_id, body)
                if request_id == 0 or getattr(error, "code", None) in CLOSING_CODES:
                    self._fail(error)
            return
        waiter, sent_op, timer, _ = entry
        if timer is not None:
            timer.cancel()
        if self._room_waiters:
            self._wake_room_waiter()
        if type(waiter) is _Batch:
            waiter.settle(self, op, sent_op, flags, request_id, body)
        elif waiter.done():
            return
        elif flags & FLAG_ERROR:
            waiter.set_exception(error_from_frame(op, request_id, body))
        elif op != sent_op:
            waiter.set_exception(ProtocolError(
                f"reply to request {request_id} has op {op}, the request had {sent_op}"))
        else:
            waiter.set_result(body)

    def _fail(self, error: BaseException):
        """Every request in flight fails with `error`; the client is closed."""
        state = self._state
        if self._closed is None:
            self._closed = error
            state.closed = True
        pending, state.pending = state.pending, {}
        if state.sweep is not None:
            state.sweep.cancel()
            state.sweep = None
        unsent_from = _first_request_id(state.out) if isinstance(error, ConnectionLost) else None
        for request_id, (waiter, _, timer, _) in pending.items():
            if timer is not None:
                timer.cancel()
            failure = error
            if unsent_from is not None and request_id >= unsent_from:
                # still in this tick's buffer: it never left, nothing was applied
                failure = not_sent(f"{error} (before the request was sent)")
            if type(waiter) is _Batch:
                waiter.fail(failure)
            elif not waiter.done():
                waiter.set_exception(failure)
        for coalescer in (self._pay, self._issue):
            coalescer.flush()              # its callers fail: the connection is closed
        waiters, self._room_waiters = self._room_waiters, collections.deque()
        for waiter in waiters:             # they see the closed state and raise
            if not waiter.done():
                waiter.set_result(None)
        self._writable.set()   # wake writers so that they see the closed state
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()


def _first_request_id(out: bytearray) -> int | None:
    """The request id of the first frame in a tick's unsent buffer: frames
    are appended in request id order, so it and every later id never left."""
    if len(out) < HEADER_BYTES:
        return None
    return HEADER.unpack_from(out, 0)[3]


# -- connection pool ----------------------------------------------------------

class PoolClosed(ConnectionLost):
    """The pool is closed: no connection can be acquired from it."""


class Pool:
    """Up to `max_size` AsyncClient connections to one server, lent out one
    holder at a time (in the style of asyncpg's pool):

        pool = await create_pool("127.0.0.1", 7411, min_size=2, max_size=16)
        async with pool.acquire() as conn:
            result = await conn.pay_one(id=1, payer=42, merchant=7, amount=30_00)
        await pool.close()

    A connection that was lost (the server closed it, a closing error, a
    broken stream) is dropped when it comes back or is found idle, and a new
    one is opened in its place on the next acquire. Acquirers beyond
    `max_size` wait, first come first served, up to `timeout_ms`.
    """

    def __init__(self, host: str, port: int, *, min_size: int, max_size: int,
                 timeout_ms: int, connect_kwargs: dict):
        if not isinstance(max_size, int) or max_size < 1:
            raise ValueError(f"max_size must be an int >= 1, got {max_size!r}")
        if not isinstance(min_size, int) or not 0 <= min_size <= max_size:
            raise ValueError(f"min_size must be an int in 0..max_size ({max_size}), "
                             f"got {min_size!r}")
        if timeout_ms <= 0:
            raise ValueError("timeout_ms must be > 0")
        self.host, self.port = host, port
        self.min_size, self.max_size = min_size, max_size
        self.timeout_ms = timeout_ms
        self.replaced = 0                     # lost connections dropped (observability, tests)
        self._connect_kwargs = dict(connect_kwargs, timeout_ms=timeout_ms)
        self._idle: collections.deque[AsyncClient] = collections.deque()
        self._all: set[AsyncClient] = set()   # idle and lent out
        self._lent: set[AsyncClient] = set()
        self._opening = 0                     # connects under way (count toward max_size)
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._closed = False

    @property
    def size(self) -> int:
        """Connections open or being opened (never above max_size)."""
        return len(self._all) + self._opening

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def _fill(self) -> None:
        """Open connections up to min_size (at start, in parallel)."""
        need = self.min_size - self.size
        self._opening += need
        opened = await asyncio.gather(*(self._connect() for _ in range(need)),
                                      return_exceptions=True)
        self._opening -= need
        errors = [c for c in opened if isinstance(c, BaseException)]
        for conn in opened:
            if isinstance(conn, AsyncClient):
                self._all.add(conn)
                self._idle.append(conn)
        if errors:
            raise errors[0]

    async def _connect(self) -> AsyncClient:
        return await AsyncClient.connect(self.host, self.port, **self._connect_kwargs)

    def acquire(self, *, timeout_ms: int | None = None) -> "_PoolAcquire":
        """`async with pool.acquire() as conn:` (or `conn = await
        pool.acquire()` and later `pool.release(conn)`)."""
        return _PoolAcquire(self, timeout_ms or self.timeout_ms)

    async def _acquire(self, timeout_ms: int) -> AsyncClient:
        deadline = time.monotonic() + timeout_ms / 1000
        for _ in range(ACQUIRE_ROUNDS_MAX):     # each round: woken by a release or a drop
            if self._closed:
                raise PoolClosed("the pool is closed")
            while self._idle:
                conn = self._idle.popleft()
                if conn._closed is None:
                    self._lent.add(conn)
                    return conn
                self._drop(conn)
            if self.size < self.max_size:
                self._opening += 1
                try:
                    conn = await self._connect()
                finally:
                    self._opening -= 1
                    self._wake_one()            # the slot is taken or free again
                if self._closed:
                    conn.close()
                    raise PoolClosed("the pool is closed")
                self._all.add(conn)
                self._lent.add(conn)
                return conn
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                break
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, remaining_s)
            except asyncio.TimeoutError:
                break
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()        # pass on a wake-up this caller drops
                raise
        raise TimeoutError(f"no pool connection free in {timeout_ms} ms "
                           f"(max_size {self.max_size}, all in use)")

    def release(self, conn: AsyncClient) -> None:
        """Give a connection back: idle again, or dropped if it was lost."""
        if self._closed:                      # close() already closed it
            conn.close()
            return
        if conn not in self._lent:
            raise ValueError("this connection does not belong to the pool (or was released)")
        self._lent.discard(conn)
        if self._closed or conn._closed is not None:
            self._drop(conn)
        else:
            self._idle.append(conn)
        self._wake_one()

    def _drop(self, conn: AsyncClient) -> None:
        self._all.discard(conn)
        if not self._closed:
            self.replaced += 1
        conn.close()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        """Close every connection (those lent out too: their calls fail with
        ConnectionLost) and refuse further acquires."""
        self._closed = True
        conns = list(self._all)
        self._all.clear()
        self._lent.clear()
        self._idle.clear()
        for conn in conns:
            conn.close()
        for conn in conns:
            await conn.wait_closed()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)      # they see the closed pool and raise

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


class _PoolAcquire:
    __slots__ = ("pool", "timeout_ms", "conn")

    def __init__(self, pool: Pool, timeout_ms: int):
        self.pool, self.timeout_ms, self.conn = pool, timeout_ms, None

    def __await__(self):
        return self.pool._acquire(self.timeout_ms).__await__()

    async def __aenter__(self) -> AsyncClient:
        self.conn = await self.pool._acquire(self.timeout_ms)
        return self.conn

    async def __aexit__(self, *exc):
        conn, self.conn = self.conn, None
        self.pool.release(conn)


async def create_pool(host: str = "127.0.0.1", port: int = PORT_DEFAULT, *,
                      min_size: int = 1, max_size: int = 16,
                      timeout_ms: int = TIMEOUT_MS_DEFAULT, **connect_kwargs) -> Pool:
    """A Pool with `min_size` connections open; `connect_kwargs` are those of
    AsyncClient.connect (unix, ssl, key_id, secret, in_flight_max, client_name)."""
    pool = Pool(host, port, min_size=min_size, max_size=max_size, timeout_ms=timeout_ms,
                connect_kwargs=connect_kwargs)
    try:
        await pool._fill()
    except BaseException:
        await pool.close()
        raise
    return pool


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
    def connect(cls, host: str | Sequence[str] = "127.0.0.1", port: int = PORT_DEFAULT, *,
                unix: str | None = None, ssl: ssl_module.SSLContext | None = None,
                key_id: str | None = None,
                secret: str | None = None, timeout_ms: int = TIMEOUT_MS_DEFAULT,
                client_name: str = CLIENT_NAME, retry_deadline_ms: int | None = None,
                backoff_initial_ms: int = BACKOFF_INITIAL_MS_DEFAULT,
                backoff_max_ms: int = BACKOFF_MAX_MS_DEFAULT) -> "Client":
        """Connect and say HELLO; several addresses (or `retry_deadline_ms`):
        follow the leader and retry, as AsyncClient.connect."""
        if retry_deadline_ms or not isinstance(host, str) or "," in host:
            from engine.client import failover
            return failover.connect_blocking(
                host, port, retry_deadline_ms=retry_deadline_ms,
                backoff_initial_ms=backoff_initial_ms, backoff_max_ms=backoff_max_ms,
                unix=unix, ssl=ssl, key_id=key_id, secret=secret, timeout_ms=timeout_ms,
                client_name=client_name)
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
        body = _impl.batch_body(records, PAY_RECORD, self.max_batch)
        return _impl.batch_reply(self._request(OP_PAY, body, timeout_ms), PAY_RESULT, len(body))

    def issue(self, records: np.ndarray, *, timeout_ms: int | None = None) -> np.ndarray:
        body = _impl.batch_body(records, ISSUE_RECORD, self.max_batch)
        return _impl.batch_reply(self._request(OP_ISSUE, body, timeout_ms), ISSUE_RESULT,
                                 len(body))

    def call(self, op: str | int, request: dict[str, Any] | None = None, *,
             timeout_ms: int | None = None) -> dict[str, Any]:
        reply = self._request(_op_code(op), _encoder.encode(
            {} if request is None else request), timeout_ms)
        return decode_reply(reply)

    def pay_one(self, *, id: int, payer: int, merchant: int, amount: int, flags: int = 0,
                goods_tag: int = 0, coupons: Sequence[int] = (),
                user_data: int = 0) -> PayResult:
        body = bytearray()
        _impl.pack_pay(body, id, payer, merchant, amount, flags, goods_tag, coupons, user_data)
        return self._one(OP_PAY, body, _impl.pay_results, timeout_ms=None)

    def issue_one(self, *, coupon: int, stock: int, user: int) -> IssueResult:
        body = bytearray()
        _impl.pack_issue(body, coupon, stock, user)
        return self._one(OP_ISSUE, body, _impl.issue_results, timeout_ms=None)

    def _one(self, op: int, body: bytearray, to_structs, timeout_ms: int | None):
        results = to_structs(self._request(op, body, timeout_ms))
        if len(results) != 1:
            raise ProtocolError(f"expected 1 result, got {len(results)}")
        return results[0]

    @property
    def max_batch(self) -> int:
        return self.server_info.max_batch if self.server_info else BATCH_RECORDS_MAX_DEFAULT

    def close(self) -> None:
        self._drop()

    def _drop(self) -> None:
        """Close the socket (the stream is broken, or the caller closes)."""
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
            raise not_sent("the connection is closed")
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
                        self._drop()
                        raise error
        except (socket.timeout, TimeoutError):
            raise TimeoutError(f"no reply to {OP_NAMES.get(op, op)} in "
                               f"{timeout_ms or self.timeout_ms} ms") from None
        except ConnectionLost:
            raise
        except OSError as e:
            self._drop()
            raise ConnectionLost(f"connection failed: {e}") from e
        if flags & FLAG_ERROR:
            error = error_from_frame(reply_op, reply_id, reply)
            if getattr(error, "code", None) in CLOSING_CODES:
                self._drop()
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
                    self._drop()
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
                self._drop()
                raise ConnectionLost("the server closed the connection")
            buffer += chunk
