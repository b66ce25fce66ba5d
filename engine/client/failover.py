"""Clients that follow the leader: several addresses, retries with backoff.

`AsyncClient.connect` and `Client.connect` (engine/client/__init__.py) come
here when they are given several addresses (a list, or "h1:7411,h2:7411"),
or `retry_deadline_ms` with one. They return a `FailoverAsyncClient` /
`FailoverClient`: an AsyncClient / Client with the same calls, whose
requests go to the leader and are sent again, when that is safe, after

- an error frame `not_leader` (the client goes to the leader its message
  names, adding it to the addresses when it is new), `busy` or
  `unavailable`: nothing was applied (docs/reference/protocol.md, error
  frames), so any op is sent again;
- a lost connection, or no reply within `timeout_ms` (the node is taken as
  stuck and its connection is dropped): the request may have been applied,
  so only an op of RESENDABLE (idempotent by its ids, or read-only) is sent
  again; any other raises OutcomeUnknown. A request that never left the
  client (`ConnectionLost.sent` False) is sent again whatever its op.

A call gives up `retry_deadline_ms` after it began (RetryDeadlineExceeded).
The pauses grow from `backoff_initial_ms` to `backoff_max_ms`, with jitter
(`backoff_ms`). HELLO's `role` (when the server sends it) says which node
leads; a server that does not send it is taken at its word until it answers
`not_leader`.

The failover client holds plain connections (an AsyncClient, or a Client's
socket) and routes calls to the leader's, so a plain single-address client
has nothing added to its per-request path. Calls that wait for the leader
(retries and new calls alike) are let through in the order in which they
were first made (`_Gate`): requests pipelined on a connection that breaks
are sent again in their order. docs/client.md, "Several addresses", is the
user's account of all this, with the table of which op is sent again when.
"""
from __future__ import annotations

import asyncio
import heapq
import random
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import engine.client as client_module
from engine.client import (BATCH_RECORDS_MAX_DEFAULT, CLIENT_NAME, PORT_DEFAULT,
                           RETRY_DEADLINE_MS_DEFAULT, AsyncClient, Client, ConnectionLost,
                           HelloInfo, IssueResult, OutcomeUnknown, PayResult,
                           RetryDeadlineExceeded, is_unix_path, not_sent, parse_address)
from engine.protocol.errors import EngineError
from engine.protocol.ops import (OP_AUDIT, OP_BALANCES, OP_CAPTURE, OP_CAPTURE_RECORDS, OP_CLOCK,
                                 OP_COUPONS, OP_GET_PAYMENTS, OP_HELLO, OP_ISSUE, OP_MERCHANTS,
                                 OP_PAY, OP_PING, OP_PROGRAMS, OP_QUOTE, OP_REDEEM_POINTS,
                                 OP_REFUND, OP_REFUND_RECORDS, OP_REVERSE, OP_STATEMENT, OP_STATS,
                                 OP_SEGMENTS, OP_SEGMENT, OP_CAMPAIGNS, OP_LIFT,
                                 OP_STOCKS, OP_TOPUP, OP_VOID, OP_WALLETS)
from engine.protocol.status import ErrorCode

RETRY_DEADLINE_MS_MAX = 600_000        # a call retries for at most 10 minutes
BACKOFF_MS_MAX = 60_000                # no pause longer than a minute
ADDRESSES_MAX = 64                     # given, and leaders named by not_leader
ATTEMPTS_MAX = 10_000                  # sends of one call (its deadline ends it long before)
RECOVERY_ROUNDS_MAX = 100_000          # rounds over the addresses while finding the leader
GATE_ROUNDS_MAX = 1_000                # wake-ups of one call at the gate

# The ops sent again after they may have been applied, and why that is safe
# (docs/reference/rules.md, protocol.md). Not here, so never sent again once
# they may have reached the server: PAYMENT_CODE (each call draws a fresh
# code) and SETTLE (each call closes a new settlement), and any op number
# this table does not know.
RESENDABLE: dict[int, str] = {
    OP_HELLO: "no effect on the ledger",
    OP_PING: "no effect",
    OP_PAY: "by payment id: the original result, flagged duplicate",
    OP_ISSUE: "by coupon id: the original result flagged duplicate, or "
              "exists_with_different_fields",
    OP_CAPTURE_RECORDS: "a captured payment replays its capture for the same amount",
    OP_REFUND_RECORDS: "by refund id: the original result flagged duplicate",
    OP_MERCHANTS: "an upsert: it sets the same fields again",
    OP_WALLETS: "opening an open wallet replays (duplicate)",
    OP_TOPUP: "by top-up id (duplicate)",
    OP_STOCKS: "by stock id (duplicate)",
    OP_QUOTE: "read-only",
    OP_CAPTURE: "a captured payment replays its capture for the same amount (duplicate)",
    OP_VOID: "a voided payment replays (duplicate)",
    OP_REFUND: "by refund id (duplicate)",
    OP_REVERSE: "idempotent (rules.md, Reversal); a repeat answers ok with zeros",
    OP_GET_PAYMENTS: "read-only",
    OP_BALANCES: "read-only",
    OP_AUDIT: "read-only",
    OP_STATS: "read-only",
    OP_PROGRAMS: "by program id (duplicate)",
    OP_REDEEM_POINTS: "by coupon id (duplicate)",
    OP_COUPONS: "read-only",
    OP_STATEMENT: "read-only",
    OP_CLOCK: "sets an absolute time (test servers only)",
    OP_SEGMENTS: "an upsert: it sets the same definition again",
    OP_SEGMENT: "read-only",
    OP_CAMPAIGNS: "by campaign id (duplicate)",
    OP_LIFT: "read-only",
}

# Error frames after which nothing was applied (protocol.md): any op is sent again.
NOTHING_APPLIED = frozenset({ErrorCode.not_leader, ErrorCode.busy, ErrorCode.unavailable})

# What a failure says about the request (classify).
REFUSED = "refused"        # an error frame of NOTHING_APPLIED for this request
LOST = "lost"              # sent, then no answer: it may have been applied
NOT_SENT = "not sent"      # it never left the client
FINAL = "final"            # any other error: the caller's to see

_LEADER_IS = re.compile(r"leader is\s+(?:at\s+)?(\S+:\d+)\b")    # HOST:PORT, or [IPv6]:PORT; "leader is at HOST:PORT" too


def backoff_ms(failures: int, initial_ms: int, max_ms: int, draw: float) -> float:
    """The pause after `failures` failures in a row (0: after the first):
    the step d = min(max_ms, initial_ms * 2**failures), and the pause is
    d/2 + draw * d/2 for `draw` in [0, 1) ("equal jitter": clients that
    failed together spread out, and none comes back sooner than half a
    step). Never more than max_ms."""
    if not isinstance(failures, int) or failures < 0:
        raise ValueError(f"failures must be an int >= 0, got {failures!r}")
    if not 0.0 <= draw < 1.0:
        raise ValueError(f"draw must be in [0, 1), got {draw!r}")
    step = min(max_ms, initial_ms << min(failures, 32))
    return step / 2 + draw * step / 2


def _check_ms(name: str, value: object, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in {low}..{high}, got {value!r}")
    return value


class RetryPolicy:
    """The bounds of the retries, checked: `retry_deadline_ms` (0..10 min;
    0 = no retries), `backoff_initial_ms` (1..60,000) and `backoff_max_ms`
    (backoff_initial_ms..60,000)."""

    __slots__ = ("retry_deadline_ms", "backoff_initial_ms", "backoff_max_ms", "_draw")

    def __init__(self, retry_deadline_ms: int, backoff_initial_ms: int, backoff_max_ms: int,
                 draw: Callable[[], float] | None = None):
        self.retry_deadline_ms = _check_ms("retry_deadline_ms", retry_deadline_ms, 0,
                                           RETRY_DEADLINE_MS_MAX)
        self.backoff_initial_ms = _check_ms("backoff_initial_ms", backoff_initial_ms, 1,
                                            BACKOFF_MS_MAX)
        self.backoff_max_ms = _check_ms("backoff_max_ms", backoff_max_ms, backoff_initial_ms,
                                        BACKOFF_MS_MAX)
        self._draw = draw or random.Random().random    # jitter: no need for a CSPRNG

    def pause_s(self, failures: int) -> float:
        return backoff_ms(failures, self.backoff_initial_ms, self.backoff_max_ms,
                          self._draw()) / 1000


def classify(error: BaseException) -> str:
    """REFUSED, LOST, NOT_SENT or FINAL (see their comments)."""
    if isinstance(error, EngineError):
        request_id = getattr(error, "request_id", None)
        if error.code in NOTHING_APPLIED and request_id:
            return REFUSED
        if request_id == 0:
            return LOST        # about the connection, which it ended
        return FINAL
    if isinstance(error, ConnectionLost):
        return LOST if error.sent else NOT_SENT
    if isinstance(error, (TimeoutError, OSError)):
        return LOST
    return FINAL


def leader_from_message(message: str) -> str | None:
    """The leader's "HOST:PORT" named by a not_leader message ("not leader;
    leader is 127.0.0.1:7412"), or None when it names none (such as "leader
    is unknown" during an election: the client then searches its addresses)."""
    match = _LEADER_IS.search(message or "")
    if match is None:
        return None
    text = match.group(1)
    try:
        host, port = parse_address(text)
    except ValueError:
        return None
    return _label(host, port)


def _label(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Address:
    """One server: TCP host and port, or a Unix socket path."""

    __slots__ = ("label", "host", "port", "unix")

    def __init__(self, host: str, port: int, unix: str | None = None):
        self.host, self.port, self.unix = host, port, unix
        self.label = unix if unix is not None else _label(host, port)

    @classmethod
    def parse(cls, text: str, port_default: int = PORT_DEFAULT) -> "Address":
        text = text.strip()
        if is_unix_path(text):
            return cls("127.0.0.1", 0, text)
        return cls(*parse_address(text, port_default))

    async def open_async(self, connect_kwargs: dict[str, Any]) -> AsyncClient:
        """A plain connection to this server, HELLO said."""
        if self.unix is not None:
            return await AsyncClient.connect(unix=self.unix, **connect_kwargs)
        return await AsyncClient.connect(self.host, self.port, **connect_kwargs)

    def open_blocking(self, connect_kwargs: dict[str, Any]) -> Client:
        if self.unix is not None:
            return Client.connect(unix=self.unix, **connect_kwargs)
        return Client.connect(self.host, self.port, **connect_kwargs)

    def __repr__(self) -> str:
        return f"Address({self.label!r})"


def parse_addresses(host: str | Sequence[str], port: int = PORT_DEFAULT,
                    unix: str | None = None) -> list[Address]:
    """The servers of `host`: "HOST[:PORT]" strings in a list, or separated
    by commas in one string (`port` where one has none), or the Unix socket
    `unix`; duplicates dropped. ValueError when none, or more than 64."""
    if unix is not None:
        return [Address("127.0.0.1", 0, unix)]
    texts = host.split(",") if isinstance(host, str) else list(host)
    if not all(isinstance(t, str) for t in texts):
        raise ValueError(f"addresses must be strings, got {host!r}")
    addresses: list[Address] = []
    for text in texts:
        if text.strip():
            address = Address.parse(text, port)
            if all(a.label != address.label for a in addresses):
                addresses.append(address)
    if not 1 <= len(addresses) <= ADDRESSES_MAX:
        raise ValueError(f"give 1..{ADDRESSES_MAX} server addresses, got {len(addresses)} "
                         f"in {host!r}")
    return addresses


class _Route:
    """What both failover clients keep between calls: the addresses (in the
    order to try them), the retry policy, the failures in a row (for the
    backoff) and the last error (for the message of a call that gives up)."""

    def __init__(self, addresses: list[Address], policy: RetryPolicy):
        self.addresses = addresses
        self.policy = policy
        self.start = 0                 # where the next search over the addresses begins
        self.failures = 0
        self.last_error: object = None
        self.final_error: EngineError | None = None   # e.g. NotAuthenticated at HELLO
        self.address = ""              # the label of the server in use
        self.retries = 0               # requests sent again (observability, tests)
        self.connections = 0           # connections made, the first one too

    def candidates(self, hint: str | None) -> list[Address]:
        """The addresses in the order to try: the leader named by a
        not_leader first (added to the list when new), then the others from
        the one after the server last used."""
        order = self.addresses[self.start:] + self.addresses[:self.start]
        if hint is None:
            return order
        named = Address.parse(hint)
        known = next((a for a in order if a.label == named.label), None)
        if known is None:
            known = named
            if len(self.addresses) < ADDRESSES_MAX:
                self.addresses.append(named)
        return [known] + [a for a in order if a is not known]

    def admits(self, address: Address, info: HelloInfo | None) -> bool:
        """Whether a server that connected and said HELLO is used: yes,
        unless its HELLO says it is a follower (no role: yes). The leader a
        follower names is added to the addresses (tried next round), as a
        not_leader's is: a client given followers only still finds it."""
        if info is not None and info.role == "follower":
            self.last_error = f"{address.label}: a follower (HELLO role)"
            if info.leader and len(self.addresses) < ADDRESSES_MAX:
                named = Address.parse(info.leader)
                if all(a.label != named.label for a in self.addresses):
                    self.addresses.append(named)
            return False
        self.start = (self.addresses.index(address) + 1) % len(self.addresses)
        self.address = address.label
        self.connections += 1
        return True

    def refused(self, address: Address, error: BaseException) -> None:
        """A candidate that could not be connected."""
        self.last_error = f"{address.label}: {type(error).__name__}: {error}"
        if isinstance(error, EngineError) and not error.retryable:
            self.final_error = error

    def next_pause_s(self) -> float:
        pause = self.policy.pause_s(self.failures)
        self.failures += 1
        return pause

    def pause_before_search_s(self, at_once: bool) -> float:
        """The pause before finding the leader again: none when `at_once`
        (the leader is named, or the connection was just lost) and nothing
        failed before, else the backoff. It counts the failure either way,
        so a server that keeps refusing or dropping meets growing pauses."""
        first = self.failures == 0
        pause = self.next_pause_s()
        return 0.0 if at_once and first else pause

    def leader_named(self, error: BaseException) -> str | None:
        """The leader a not_leader error names; None when it names none, or
        the server in use (a stale answer: searching is better than looping)."""
        hint = leader_from_message(getattr(error, "message", ""))
        return None if hint == self.address else hint

    def deadline_s(self) -> float:
        """time.monotonic() at which a call that fails now gives up."""
        return time.monotonic() + self.policy.retry_deadline_ms / 1000

    def resendable(self, op: int, error: BaseException, kind: str) -> None:
        """Raise what the caller must see instead of a retry: FINAL errors
        as they are, a LOST request of an op not in RESENDABLE as
        OutcomeUnknown; with retry_deadline_ms 0, every error as it is."""
        if kind == FINAL or self.policy.retry_deadline_ms == 0:
            raise error
        self.last_error = error
        if kind == LOST and op not in RESENDABLE:
            raise OutcomeUnknown(op, error) from error
        self.retries += 1

    def gave_up(self, op: int, attempts: int, error: object) -> RetryDeadlineExceeded:
        return RetryDeadlineExceeded(op, attempts, self.policy.retry_deadline_ms,
                                     error if error is not None else self.last_error)


class _Observed:
    """What a failover client tells about itself (both flavours)."""

    _route: _Route

    @property
    def address(self) -> str:
        """The server in use ("HOST:PORT" or the socket path)."""
        return self._route.address

    @property
    def addresses(self) -> list[str]:
        """The servers: those given, then the leaders not_leader named."""
        return [a.label for a in self._route.addresses]

    @property
    def retries(self) -> int:
        """Requests sent again so far."""
        return self._route.retries


# -- asyncio ---------------------------------------------------------------------

def _time_up(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(False)


class _Gate:
    """Where calls wait while the client finds the leader (or pauses after
    `busy` / `unavailable`). It lets them through in the order in which they
    were first made (their `seq`), and no newer call overtakes them until
    each of them has sent its request (the sends happen in the step that
    wakes it, before its `_passed` runs)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.closed = False
        self.clear = True                # open, nobody waiting or passing: go straight on
        self._heap: list[tuple[int, int, asyncio.Future]] = []
        self._count = 0                  # tie-break: a call waits once per wake-up
        self._passing = 0                # let through, not yet sent

    def _update(self) -> None:
        self.clear = not self.closed and not self._heap and not self._passing

    def waiting(self) -> bool:
        return any(not future.done() for _, _, future in self._heap)

    async def wait(self, seq: int, timeout_s: float) -> bool:
        """True when let through; False when timeout_s passed first."""
        future = self.loop.create_future()
        heapq.heappush(self._heap, (seq, self._count, future))
        self._count += 1
        timer = self.loop.call_later(max(timeout_s, 0.0), _time_up, future)
        if not self.closed and not self._passing:
            self._release()
        self._update()
        try:
            return bool(await future)
        finally:
            timer.cancel()
            if future.done() and not future.cancelled() and future.exception() is None \
                    and future.result():
                self.loop.call_soon(self._passed)

    def open(self) -> None:
        self.closed = False
        if not self._passing:
            self._release()
        self._update()

    def close(self) -> None:
        self.closed = True
        self.clear = False

    def fail_all(self, error: BaseException) -> None:
        self.close()
        heap, self._heap = self._heap, []
        for _, _, future in heap:
            if not future.done():
                future.set_exception(error)

    def _passed(self) -> None:
        self._passing -= 1
        if not self._passing and not self.closed:
            self._release()
        self._update()

    def _release(self) -> None:
        while self._heap:
            _, _, future = heapq.heappop(self._heap)
            if not future.done():
                future.set_result(True)
                self._passing += 1


class FailoverAsyncClient(_Observed, AsyncClient):
    """An AsyncClient over several servers: the calls of AsyncClient, each
    sent to the leader's connection and sent again as the module docstring
    says. Made by `AsyncClient.connect` (or `create_pool`) with several
    addresses or a `retry_deadline_ms`.

    It is not a connection itself (AsyncClient.__init__ is not run): it
    holds plain AsyncClient connections, the current one (`_conn`) and
    those it left that still have calls in flight (`_retired`, closed as
    soon as they have none)."""

    def __init__(self, route: _Route, connect_kwargs: dict[str, Any]):
        self._route = route
        self._connect_kwargs = connect_kwargs
        self._impl = client_module._impl   # pay()/issue() check and read records with it
        self.timeout_ms = connect_kwargs["timeout_ms"]
        self._loop = asyncio.get_running_loop()
        self._conn: AsyncClient | None = None
        self._retired: set[AsyncClient] = set()
        self._gate = _Gate(self._loop)
        self._recovery: asyncio.Task | None = None
        self._seq = 0                      # calls made: their order at the gate
        self._closed_by: BaseException | None = None
        self._closing: list[AsyncClient] = []

    # -- what AsyncClient's callers read ------------------------------------

    @property
    def server_info(self) -> HelloInfo | None:      # type: ignore[override]
        return self._conn.server_info if self._conn is not None else None

    @property
    def max_batch(self) -> int:
        return self._conn.max_batch if self._conn is not None else BATCH_RECORDS_MAX_DEFAULT

    @property
    def in_flight(self) -> int:
        return sum(c.in_flight for c in (self._conn, *self._retired) if c is not None)

    @property
    def batches_sent(self) -> int:                  # type: ignore[override]
        return self._conn.batches_sent if self._conn is not None else 0

    @property
    def _closed(self) -> BaseException | None:      # type: ignore[override]
        return self._closed_by                      # (what Pool looks at)

    # -- the calls ----------------------------------------------------------

    # Each call makes its first attempt itself when the way is clear (a
    # current connection, nobody waiting at the gate): no closure and no
    # extra coroutine on the path that meets no failure. `_again` makes the
    # others.

    async def hello(self, key_id: str | None = None, secret: str | None = None, *,
                    client_name: str = CLIENT_NAME) -> HelloInfo:
        """HELLO again on the current connection; later connections say this one."""
        self._connect_kwargs.update(key_id=key_id, secret=secret, client_name=client_name)
        return await self._again(OP_HELLO, None, lambda conn: conn.hello(  # type: ignore[no-any-return]
            key_id, secret, client_name=client_name), None, None)

    async def pay_one(self, *, id: int, payer: int, merchant: int, amount: int,
                      flags: int = 0, goods_tag: int = 0, coupons: Sequence[int] = (),
                      user_data: int = 0) -> PayResult:
        if type(coupons) is not tuple:
            coupons = tuple(coupons)       # an iterator would be spent by the first attempt
        conn, seq = self._way()
        error: Exception | None = None
        if conn is not None:
            try:
                # AsyncClient.pay_one's body, inlined: one coroutine less a call
                pay = conn._pay
                if conn._closed is not None or (not pay.futures and not conn._has_room()):
                    await conn._wait_for_room(pay)
                conn._pack_pay(pay.body, id, payer, merchant, amount, flags, goods_tag, coupons,
                               user_data)
                return self._answered(conn, await pay.add())  # type: ignore[no-any-return]
            except Exception as e:     # noqa: BLE001 - _again raises it or sends it again
                error = e
        return await self._again(OP_PAY, seq, lambda c: AsyncClient.pay_one(  # type: ignore[no-any-return]
            c, id=id, payer=payer, merchant=merchant, amount=amount, flags=flags,
            goods_tag=goods_tag, coupons=coupons, user_data=user_data), conn, error)

    async def issue_one(self, *, coupon: int, stock: int, user: int) -> IssueResult:
        return await self._again(OP_ISSUE, None, lambda c: AsyncClient.issue_one(  # type: ignore[no-any-return]
            c, coupon=coupon, stock=stock, user=user), None, None)

    async def _request(self, op: int, body: Any, timeout_ms: int | None = None) -> bytes:
        # pay, issue, call and ping of AsyncClient come here
        conn, seq = self._way()
        error: Exception | None = None
        if conn is not None:
            try:
                return self._answered(conn, await conn._request(  # type: ignore[no-any-return]
                    op, body, timeout_ms))
            except Exception as e:     # noqa: BLE001 - _again raises it or sends it again
                error = e
        return await self._again(op, seq, lambda c: c._request(  # type: ignore[no-any-return]
            op, body, timeout_ms), conn, error)

    def _way(self) -> tuple[AsyncClient | None, int]:
        """Where a new call's first attempt goes (None: the way is not clear,
        the call waits at the gate), and the call's place in line there."""
        seq = self._seq
        self._seq = seq + 1
        return (self._conn if self._gate.clear else None), seq

    def _answered(self, conn: AsyncClient, result: Any) -> Any:
        if conn is not self._conn or self._route.failures:
            self._succeeded(conn)
        return result

    # -- lifecycle ----------------------------------------------------------

    def close(self) -> None:
        if self._closed_by is None:
            self._closed_by = not_sent("client closed")
        if self._recovery is not None:
            self._recovery.cancel()
        self._gate.fail_all(not_sent("the client is closed"))
        conns = [c for c in (self._conn, *self._retired) if c is not None]
        self._conn, self._retired = None, set()
        for conn in conns:
            conn.close()
        self._closing.extend(conns)

    async def wait_closed(self) -> None:
        closing, self._closing = self._closing, []
        for conn in closing:
            await conn.wait_closed()

    # -- one call, its retries ------------------------------------------------

    async def _again(self, op: int, seq: int | None,
                     attempt: Callable[[AsyncClient], Awaitable[Any]],
                     conn: AsyncClient | None, error: Exception | None) -> Any:
        """A call after its first attempt failed (`error`, on `conn`), or
        one that found the way not clear (error None): attempts until one
        succeeds or `_failed` raises. The retry deadline counts from here:
        the first failure, or the first wait for the leader."""
        if seq is None:
            seq, self._seq = self._seq, self._seq + 1
        deadline = 0.0                 # set by the first failure or wait
        attempts = 0
        if error is not None:
            attempts, deadline = 1, self._deadline()
            self._settle(op, conn, error, deadline, attempts)
        for _ in range(ATTEMPTS_MAX):
            conn = self._conn
            if conn is None or not self._gate.clear:
                deadline = deadline or self._deadline()
                conn = await self._through_gate(op, seq, deadline, attempts, error)
            attempts += 1
            try:
                result = await attempt(conn)
            except Exception as e:     # noqa: BLE001 - _settle raises it or lets it retry
                error = e
                deadline = deadline or self._deadline()
                self._settle(op, conn, e, deadline, attempts)
                continue
            self._succeeded(conn)
            return result
        raise self._route.gave_up(op, attempts, error)

    def _deadline(self) -> float:
        """The loop time at which a call that fails now gives up."""
        return self._loop.time() + self._route.policy.retry_deadline_ms / 1000

    def _settle(self, op: int, conn: AsyncClient | None, error: Exception, deadline: float,
                attempts: int) -> None:
        """After a failed attempt: raise, or leave the call to retry."""
        try:
            self._failed(op, conn, error, deadline, attempts)
        finally:
            if conn is not None and conn is not self._conn:
                self._retire(conn)

    def _succeeded(self, conn: AsyncClient) -> None:
        if conn is self._conn:
            self._route.failures = 0       # the backoff starts again
        else:
            self._retire(conn)             # answered on a connection left behind

    async def _through_gate(self, op: int, seq: int, deadline: float, attempts: int,
                            error: BaseException | None) -> AsyncClient:
        """The leader's connection, once the gate lets this call through;
        RetryDeadlineExceeded at the call's deadline."""
        for _ in range(GATE_ROUNDS_MAX):
            if self._closed_by is not None:
                raise not_sent(f"the client is closed ({self._closed_by})")
            if self._recovery is None and (self._conn is None or self._gate.closed):
                self._recover_in_background(None, 0.0, reconnect=True)
            remaining_s = deadline - self._loop.time()
            if remaining_s <= 0 or not await self._gate.wait(seq, remaining_s):
                raise self._route.gave_up(op, attempts, error)
            if self._conn is not None:
                return self._conn
        raise self._route.gave_up(op, attempts, error)

    def _failed(self, op: int, conn: AsyncClient | None, error: BaseException, deadline: float,
                attempts: int) -> None:
        """Raise unless the call may be sent again. The first news of a
        trouble on the current connection starts its remedy: not_leader, go
        to the leader; busy or unavailable, pause; lost or stuck, reconnect."""
        kind = classify(error)
        if self._closed_by is not None:
            raise error
        if conn is not None and conn is self._conn and kind != FINAL:
            if kind != REFUSED:
                self._drop(conn, error)
            elif self._recovery is None:
                self._refused(conn, error)
        self._route.resendable(op, error, kind)
        if self._loop.time() >= deadline:
            raise self._route.gave_up(op, attempts, error) from error

    def _refused(self, conn: AsyncClient, error: BaseException) -> None:
        self._route.last_error = error
        if getattr(error, "code", None) == ErrorCode.not_leader:
            hint = self._route.leader_named(error)
            self._conn = None          # new calls wait for the leader
            self._retire(conn)         # calls in flight on it finish there
            self._recover_in_background(hint, self._route.pause_before_search_s(hint is not None),
                                        reconnect=True)
        else:
            self._recover_in_background(None, self._route.next_pause_s(), reconnect=False)

    def _drop(self, conn: AsyncClient, error: BaseException) -> None:
        """The connection is lost, or stuck (no reply in time): close it (its
        other calls fail over too) and find the leader again."""
        self._route.last_error = error
        self._conn = None
        conn.close()
        if self._recovery is None:
            self._recover_in_background(None, self._route.pause_before_search_s(True),
                                        reconnect=True)

    def _retire(self, conn: AsyncClient) -> None:
        """Close a connection left behind once no call is in flight on it."""
        if conn is self._conn:
            return
        if conn._closed is None and (conn.in_flight or conn._open_frames):
            self._retired.add(conn)
            return
        self._retired.discard(conn)
        if conn._closed is None:
            conn.close()

    # -- finding the leader ---------------------------------------------------

    def _recover_in_background(self, hint: str | None, pause_s: float, *,
                               reconnect: bool) -> None:
        self._gate.close()
        self._recovery = self._loop.create_task(self._recover(hint, pause_s, reconnect))

    async def _recover(self, hint: str | None, pause_s: float, reconnect: bool) -> None:
        """Pause, then (reconnect) find the leader, round after round with
        backoff, and open the gate; stop when no call waits any more."""
        try:
            for _ in range(RECOVERY_ROUNDS_MAX):
                if pause_s > 0:
                    await asyncio.sleep(pause_s)
                if not reconnect or self._closed_by is not None:
                    break
                conn = await self._find_leader(hint)
                if conn is not None:
                    self._adopt(conn)
                    break
                if not self._gate.waiting():
                    return             # nobody waits: the next call starts again
                hint, pause_s = None, self._route.next_pause_s()
            if self._closed_by is None:
                self._gate.open()
        finally:
            self._recovery = None

    async def _find_leader(self, hint: str | None) -> AsyncClient | None:
        """One round over the addresses: a connection to the first server
        that connects and does not say it is a follower, or None."""
        self._route.final_error = None
        for address in self._route.candidates(hint):
            try:
                conn = await address.open_async(self._connect_kwargs)
            except Exception as e:     # noqa: BLE001 - this one is out; the next is tried
                self._route.refused(address, e)
                continue
            if self._route.admits(address, conn.server_info):
                return conn
            conn.close()
        return None

    def _adopt(self, conn: AsyncClient) -> None:
        old, self._conn = self._conn, conn
        if old is not None and old is not conn:
            self._retire(old)

    async def _first_connection(self) -> None:
        """Connect at start: rounds over the addresses with backoff, until a
        leader answers or retry_deadline_ms passes (or an error that no
        retry cures, such as NotAuthenticated, is raised at once)."""
        deadline = self._loop.time() + self._route.policy.retry_deadline_ms / 1000
        for _ in range(RECOVERY_ROUNDS_MAX):
            conn = await self._find_leader(None)
            if conn is not None:
                self._adopt(conn)
                return
            if self._route.final_error is not None:
                raise self._route.final_error
            pause_s = self._route.next_pause_s()
            if self._loop.time() + pause_s >= deadline:
                break
            await asyncio.sleep(pause_s)
        raise self._route.gave_up(OP_HELLO, 0, None)


async def connect_async(host: str | Sequence[str], port: int, *, retry_deadline_ms: int | None,
                        backoff_initial_ms: int, backoff_max_ms: int, unix: str | None,
                        **connect_kwargs: Any) -> AsyncClient:
    """AsyncClient.connect with several addresses or retries (its docstring)."""
    addresses = parse_addresses(host, port, unix)
    if retry_deadline_ms is None and len(addresses) == 1:
        return await addresses[0].open_async(connect_kwargs)      # the plain client
    policy = RetryPolicy(RETRY_DEADLINE_MS_DEFAULT if retry_deadline_ms is None
                         else retry_deadline_ms, backoff_initial_ms, backoff_max_ms)
    client = FailoverAsyncClient(_Route(addresses, policy), connect_kwargs)
    await client._first_connection()
    return client


# -- blocking ---------------------------------------------------------------------

class FailoverClient(_Observed, Client):
    """A Client over several servers: the calls of Client, each sent to the
    leader and sent again as the module docstring says. One request at a
    time on one socket, replaced in place when the client moves to another
    server. Made by `Client.connect` with several addresses or a
    `retry_deadline_ms`."""

    def __init__(self, route: _Route, connect_kwargs: dict[str, Any]):
        super().__init__(None, timeout_ms=connect_kwargs["timeout_ms"])   # type: ignore[arg-type]
        self._route = route
        self._connect_kwargs = connect_kwargs
        self._impl = client_module._impl   # pay()/issue() check and read records with it
        self._closed_by: str | None = None

    def hello(self, key_id: str | None = None, secret: str | None = None, *,
              client_name: str = CLIENT_NAME) -> HelloInfo:
        self._connect_kwargs.update(key_id=key_id, secret=secret, client_name=client_name)
        return super().hello(key_id, secret, client_name=client_name)

    def close(self) -> None:
        self._closed_by = "client closed"
        self._drop()

    def _request(self, op: int, body: Any, timeout_ms: int | None = None) -> bytes:
        deadline: float | None = None  # set by the first failure (or wait for a leader)
        error: BaseException | None = None
        hint: str | None = None
        for attempts in range(ATTEMPTS_MAX):
            if self._sock is None:
                deadline = deadline or self._route.deadline_s()
                self._reconnect(op, deadline, attempts, error, hint)
            try:
                reply = Client._request(self, op, body, timeout_ms)
            except Exception as e:     # noqa: BLE001 - _failed raises it or lets it retry
                error = e
                deadline = deadline or self._route.deadline_s()
                hint = self._failed(op, e, deadline, attempts + 1)
                continue
            self._route.failures = 0
            return reply
        raise self._route.gave_up(op, ATTEMPTS_MAX, error)

    def _failed(self, op: int, error: BaseException, deadline: float, attempts: int) -> str | None:
        """Raise unless the request may be sent again; else pause as the
        failure asks and return the leader a not_leader named (or None)."""
        kind = classify(error)
        if self._closed_by is not None:
            raise error
        hint, pause_s = None, 0.0
        if kind == REFUSED and getattr(error, "code", None) == ErrorCode.not_leader:
            hint = self._route.leader_named(error)
            self._drop()               # a follower: go to the leader
            pause_s = self._route.pause_before_search_s(hint is not None)
        elif kind == REFUSED:
            pause_s = self._route.next_pause_s()       # busy, unavailable: same server, later
        elif kind != FINAL:
            self._drop()               # lost, or stuck (no reply in time)
            pause_s = self._route.pause_before_search_s(True)
        self._route.resendable(op, error, kind)
        remaining_s = deadline - time.monotonic()
        if remaining_s <= pause_s:
            raise self._route.gave_up(op, attempts, error) from error
        if pause_s > 0:
            time.sleep(pause_s)
        return hint

    def _reconnect(self, op: int, deadline: float, attempts: int, error: BaseException | None,
                   hint: str | None) -> None:
        """Find the leader, round after round with backoff, and take its
        socket; RetryDeadlineExceeded at the deadline."""
        for _ in range(RECOVERY_ROUNDS_MAX):
            if self._closed_by is not None:
                raise not_sent(f"the client is closed ({self._closed_by})")
            if self._find_leader(hint):
                return
            if attempts == 0 and self._route.final_error is not None:
                raise self._route.final_error
            pause_s = self._route.next_pause_s()
            if time.monotonic() + pause_s >= deadline:
                break
            time.sleep(pause_s)
            hint = None
        raise self._route.gave_up(op, attempts, error)

    def _find_leader(self, hint: str | None) -> bool:
        self._route.final_error = None
        for address in self._route.candidates(hint):
            try:
                found = address.open_blocking(self._connect_kwargs)
            except Exception as e:     # noqa: BLE001 - this one is out; the next is tried
                self._route.refused(address, e)
                continue
            if self._route.admits(address, found.server_info):
                self._sock, found._sock = found._sock, None     # take its socket
                self._buffer = bytearray()
                self.server_info = found.server_info
                return True
            found.close()
        return False


def connect_blocking(host: str | Sequence[str], port: int, *, retry_deadline_ms: int | None,
                     backoff_initial_ms: int, backoff_max_ms: int, unix: str | None,
                     **connect_kwargs: Any) -> Client:
    """Client.connect with several addresses or retries (its docstring)."""
    addresses = parse_addresses(host, port, unix)
    if retry_deadline_ms is None and len(addresses) == 1:
        return addresses[0].open_blocking(connect_kwargs)         # the plain client
    policy = RetryPolicy(RETRY_DEADLINE_MS_DEFAULT if retry_deadline_ms is None
                         else retry_deadline_ms, backoff_initial_ms, backoff_max_ms)
    client = FailoverClient(_Route(addresses, policy), connect_kwargs)
    client._reconnect(OP_HELLO, client._route.deadline_s(), 0, None, None)
    return client
