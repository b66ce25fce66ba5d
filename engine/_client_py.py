"""The client's hot path in plain Python: the twin of ext/client.pyx.

engine/client.py uses the compiled `engine._client` when it imports and this
module otherwise; both export the same functions with the same results and
the same errors (tests/client/test_client.py feeds both random records, bodies and
byte streams and compares). This module owns the value ranges and the error
text of a record field; the Cython twin repeats them word for word.

- `pack_pay(out, id, payer, merchant, amount, flags, goods_tag, coupons,
  user_data)` / `pack_issue(out, coupon, stock, user)`: append one record
  to the bytearray `out`, range-checked (ValueError), so that one bad call
  cannot spoil a coalesced batch; nothing is appended on error.
- `pay_results(body)` / `issue_results(body)`: the result records of a
  reply body as PayResult / IssueResult structs of plain ints.
- `append_frame(out, op, request_id, body)`: append a request frame (header
  and body: bytes, or any C-contiguous buffer such as a record array).
- `batch_body(records, dtype, batch_max)`: a record array as a frame body:
  checked (TypeError, ValueError) and C-contiguous.
- `batch_reply(body, dtype, n)`: a reply body as a read-only array of n
  results, no copy (ProtocolError if the size differs).
- `resolve(futures, results)`: each caller of a coalesced frame gets its
  result (callers that gave up are skipped); ProtocolError when the counts
  differ, before any future is touched.
- `FrameCutter().feed(data)`: the complete reply frames of the stream so
  far, as (frames, error): a list of (op, flags, request_id, body) and None,
  or the frames before a broken header and the ProtocolError that ends it.
  `FrameCutter().deliver(data, pending, room_waiters, slow)` feeds the same
  way and hands each frame over as it is cut: a plain reply (no flags, the
  op sent) to a Future that waits under its request id in `pending` (the
  client's request id -> (waiter, op, timer, deadline)) with no timer of its
  own, while `room_waiters` is empty, resolves that Future and leaves
  `pending`; every other frame goes to `slow(op, flags, request_id, body)`.
  It returns the error that broke the stream, or None. (A 1-record `pay()`
  is a frame a call, so a frame's delivery is on every call's path; see
  docs/performance.md.)
- `Requests(loop, timeout_ms, in_flight_max, on_tick, on_sweep, on_expire)`:
  one connection's requests in flight (`pending`: request id -> (waiter,
  op, timer, deadline), in request id order) and the frames of this loop
  tick (`out`), with `timeout_ms` (the default timeout, settable),
  `open_frames` (coalesced frames being filled, each holds a slot),
  `paused`, `closed` and `tick_scheduled`. `has_room()`:
  fewer than `in_flight_max` in flight, not paused. `send(op, body,
  waiter, timeout_ms)` frames the request under the next id (`last_id`
  then), registers `waiter` with the deadline `loop.time() + timeout_ms`
  for the default timeout (and starts the sweep, `loop.call_at(deadline,
  on_sweep)`, if none is due) or an own timer (`loop.call_later(...,
  on_expire, request_id)`), and schedules `on_tick` once per tick; a body
  append_frame refuses changes nothing; `schedule_tick()` does the latter
  alone (a coalesced frame's first record). `request(op, body, timeout_ms)`:
  None when closed or without room, else a new Future sent as above.
  `forget(request_id)`: drop the entry (cancelling its timer), True if
  there was one. (AsyncClient's request path: one call instead of a dozen
  attribute reads and three method calls; docs/performance.md.)
"""
from __future__ import annotations

import struct

import numpy as np

U64_MAX = 2**64 - 1
U32_MAX = 2**32 - 1
I64_MIN, I64_MAX = -2**63, 2**63 - 1
COUPONS_MAX = 4                       # records.COUPONS_PER_PAYMENT_MAX (asserted by client.py)
REPLY_BYTES_MAX = 64 << 20            # a bigger size means a broken stream

_HEADER = struct.Struct("<IHHQ")      # frame.HEADER (asserted by client.py)
_PAY = struct.Struct("<QQQqII4QQ")    # records.PAY_RECORD
_ISSUE = struct.Struct("<QQQQ")       # records.ISSUE_RECORD
_PAY_RESULT = struct.Struct("<QIIqqqQ4Q")
_ISSUE_RESULT = struct.Struct("<QIIQ")

_types: dict = {}                     # PayResult, IssueResult, ProtocolError: configure()


def configure(pay_result, issue_result, protocol_error, batch_waiter) -> None:
    """engine/client.py hands over its result, error and batch classes (it owns them)."""
    _types.update(pay_result=pay_result, issue_result=issue_result,
                  protocol_error=protocol_error, batch_waiter=batch_waiter)


def check_range(name: str, value, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in {low}..{high}, got {value!r}")
    return value


def pay_fields(id, payer, merchant, amount, flags, goods_tag, coupons, user_data) -> tuple:
    """The checked fields of one PayRecord, coupons padded with zeros."""
    coupons = tuple(coupons)
    if len(coupons) > COUPONS_MAX:
        raise ValueError(f"at most {COUPONS_MAX} coupons, got {len(coupons)}")
    for c in coupons:
        check_range("coupon id", c, 0, U64_MAX)
    return (check_range("id", id, 0, U64_MAX), check_range("payer", payer, 0, U64_MAX),
            check_range("merchant", merchant, 0, U64_MAX),
            check_range("amount", amount, I64_MIN, I64_MAX),
            check_range("flags", flags, 0, U32_MAX),
            check_range("goods_tag", goods_tag, 0, U32_MAX),
            coupons + (0,) * (COUPONS_MAX - len(coupons)),
            check_range("user_data", user_data, 0, U64_MAX))


def issue_fields(coupon, stock, user) -> tuple:
    return (check_range("coupon", coupon, 0, U64_MAX), check_range("stock", stock, 0, U64_MAX),
            check_range("user", user, 0, U64_MAX), 0)


def pack_pay(out: bytearray, id, payer, merchant, amount, flags, goods_tag, coupons,
             user_data) -> None:
    i, p, m, a, f, g, cs, u = pay_fields(id, payer, merchant, amount, flags, goods_tag,
                                         coupons, user_data)
    out += _PAY.pack(i, p, m, a, f, g, *cs, u)


def pack_issue(out: bytearray, coupon, stock, user) -> None:
    out += _ISSUE.pack(*issue_fields(coupon, stock, user))


def _whole(body, size: int, what: str) -> memoryview:
    view = memoryview(body).cast("B")
    if len(view) % size:
        raise _types["protocol_error"](
            f"a {what} body of {len(view)} bytes is not a whole number of {size}-byte results")
    return view


def pay_results(body) -> list:
    make = _types["pay_result"]
    return [make(i, s, f, c, d, fee, t, tuple(x for x in (c0, c1, c2, c3) if x))
            for i, s, f, c, d, fee, t, c0, c1, c2, c3
            in _PAY_RESULT.iter_unpack(_whole(body, _PAY_RESULT.size, "PAY"))]


def issue_results(body) -> list:
    make = _types["issue_result"]
    return [make(*row) for row in _ISSUE_RESULT.iter_unpack(
        _whole(body, _ISSUE_RESULT.size, "ISSUE"))]


def append_frame(out: bytearray, op: int, request_id: int, body) -> None:
    view = memoryview(body).cast("B")
    if len(view) > U32_MAX:
        raise ValueError(f"a frame body of {len(view)} bytes does not fit the u32 size")
    out += _HEADER.pack(len(view), op, 0, request_id)
    out += view


def batch_body(records, dtype: np.dtype, batch_max: int) -> np.ndarray:
    if not isinstance(records, np.ndarray) or records.dtype != dtype:
        raise TypeError(f"records must be a numpy array of dtype {dtype}, "
                        f"got {getattr(records, 'dtype', type(records).__name__)}")
    if records.ndim != 1 or not 1 <= len(records) <= batch_max:
        raise ValueError(f"a batch holds 1..{batch_max} records, got "
                         f"{len(records) if records.ndim == 1 else records.shape}; "
                         "split it into several calls")
    return records if records.flags.c_contiguous else np.ascontiguousarray(records)


def batch_reply(body: bytes, dtype: np.dtype, n: int) -> np.ndarray:
    if len(body) != n * dtype.itemsize:
        raise _types["protocol_error"](f"expected {n} results of {dtype.itemsize} bytes, "
                                       f"got a body of {len(body)} bytes")
    return np.frombuffer(body, dtype)   # read-only view of the reply, no copy


def resolve(futures: list, results: list) -> None:
    if len(results) != len(futures):
        raise _types["protocol_error"](f"expected {len(futures)} results, got {len(results)}")
    for future, result in zip(futures, results):
        if not future.done():
            future.set_result(result)


class FrameCutter:
    """Cuts the reply stream into frames; keeps a partial frame for the next feed."""

    def __init__(self):
        self.buffer = bytearray()
        self.error = None

    def feed(self, data) -> tuple[list, Exception | None]:
        if self.error is not None:
            return [], self.error
        buffer = self.buffer
        buffer += data
        frames, at, end_of_data = [], 0, len(buffer)
        while end_of_data - at >= _HEADER.size:
            size, op, flags, request_id = _HEADER.unpack_from(buffer, at)
            if size > REPLY_BYTES_MAX:
                self.error = _types["protocol_error"](
                    f"reply of {size} bytes: the stream is broken")
                break
            end = at + _HEADER.size + size
            if end > end_of_data:
                break
            frames.append((op, flags, request_id, bytes(buffer[at + _HEADER.size:end])))
            at = end
        if at:
            del buffer[:at]
        return frames, self.error

    def deliver(self, data, pending: dict, room_waiters, slow) -> Exception | None:
        frames, error = self.feed(data)
        batch_waiter = _types["batch_waiter"]
        for op, flags, request_id, body in frames:
            entry = pending.get(request_id)
            if (entry is not None and flags == 0 and entry[2] is None
                    and type(entry[0]) is not batch_waiter and entry[1] == op
                    and not room_waiters):
                del pending[request_id]
                if not entry[0].done():
                    entry[0].set_result(body)
            else:
                slow(op, flags, request_id, body)
        return error

    @property
    def buffered_bytes(self) -> int:
        return len(self.buffer)


class Requests:
    """One connection's requests in flight and the frames of this loop tick."""
    __slots__ = ("out", "pending", "sweep", "open_frames", "paused", "tick_scheduled",
                 "closed", "next_id", "last_id", "in_flight_max", "_timeout_ms", "_timeout_s",
                 "_loop", "_on_tick", "_on_sweep", "_on_expire")

    def __init__(self, loop, timeout_ms, in_flight_max: int, on_tick, on_sweep, on_expire):
        self.out, self.pending, self.sweep = bytearray(), {}, None
        self.open_frames, self.paused, self.tick_scheduled, self.closed = 0, False, False, False
        self.next_id, self.last_id = 1, 0
        self.in_flight_max, self.timeout_ms = in_flight_max, timeout_ms
        self._loop = loop
        self._on_tick, self._on_sweep, self._on_expire = on_tick, on_sweep, on_expire

    @property
    def timeout_ms(self):
        return self._timeout_ms

    @timeout_ms.setter
    def timeout_ms(self, timeout_ms) -> None:
        # AsyncClient.timeout_ms sets it: the default timeout of later requests
        self._timeout_ms, self._timeout_s = timeout_ms, timeout_ms / 1000

    def has_slot(self) -> bool:
        return len(self.pending) + self.open_frames < self.in_flight_max

    def has_room(self) -> bool:
        return self.has_slot() and not self.paused

    def request(self, op: int, body, timeout_ms):
        if self.closed or self.paused or not self.has_slot():
            return None
        future = self._loop.create_future()
        self.send(op, body, future, timeout_ms)
        return future

    def send(self, op: int, body, waiter, timeout_ms) -> int:
        request_id = self.next_id
        append_frame(self.out, op, request_id, body)      # may refuse the body
        self.next_id += 1
        self.last_id = request_id
        if not timeout_ms or timeout_ms == self._timeout_ms:
            # The default timeout: no timer of its own (a timer and its cancel
            # cost more than the rest of a request); deadlines grow with the
            # request id, so one sweep timer finds the expired ones in order.
            timer, deadline = None, self._loop.time() + self._timeout_s
            if self.sweep is None:
                self.sweep = self._loop.call_at(deadline, self._on_sweep)
        else:
            timer, deadline = self._loop.call_later(timeout_ms / 1000, self._on_expire,
                                                    request_id), 0.0
        self.pending[request_id] = (waiter, op, timer, deadline)
        if not self.tick_scheduled:
            self.schedule_tick()
        return request_id

    def schedule_tick(self) -> None:
        # on_tick runs after every callback already ready in this loop
        # iteration, so all calls made in this tick are in its one write.
        self.tick_scheduled = True
        self._loop.call_soon(self._on_tick)

    def forget(self, request_id: int) -> bool:
        entry = self.pending.pop(request_id, None)
        if entry is None:
            return False
        if entry[2] is not None:
            entry[2].cancel()
        return True
