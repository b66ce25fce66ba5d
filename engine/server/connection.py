"""One client connection: frames in, requests to the writer, replies out in
request order, with limits on everything a client can make the server hold."""
import asyncio
import collections
import logging
import time

import numpy as np

from engine.protocol import frame

from engine.server import msgpack_guard
from engine._framing import intake_pay
from engine._outlet import Outlet
from engine.protocol.auth import ANONYMOUS_ADMIN, ROLE_ADMIN, hello_shape_error
from engine.core.dispatch import MAP_OPS_BY_CODE
from engine.protocol.ops import OP_CLOCK, OP_HELLO, OP_NAMES, OP_PAY, OP_PING
from engine.protocol.errors import EngineError
from engine.core.scope import SCOPE_KEY
from engine.protocol.records import PAY_RECORD, PAY_RESULT, RECORD_DTYPES_BY_OP
from engine.protocol.status import ErrorCode, Status
from engine.server.writer import Work

log = logging.getLogger("scanpay.connection")

RECORD_DTYPES = RECORD_DTYPES_BY_OP
PROTOCOL_VERSION = 1
# What a read's reply may grow to, held against the connection's in-flight
# bytes from the moment it is accepted (reserve_reply): replies of reads are
# larger than their requests (a GET_PAYMENTS id of 9 bytes answers with about
# 120 to 500), and a client that never reads them must not make the server
# build more than inflight_bytes_max of them.
READ_REPLY_BYTES_PER_BODY_BYTE = 64
READ_REPLY_BYTES_MIN = 16 << 10
# How long a connection the server closes keeps reading (and discarding)
# after its last reply, half-closed: closing a socket with unread input
# makes the kernel send a reset, which discards the error reply not yet
# sent or read, so a client still sending (a slowloris, a pipelining
# gateway) would never learn why it was closed. Bounded, as nginx's
# lingering close: the peer's EOF ends it sooner.
LINGER_MS = 1_000


class Slot:
    """A request awaiting its reply; replies leave in request order. One slot
    may stand for a run of pipelined PAY frames answered together (`frames`)."""
    __slots__ = ("reply", "request_bytes", "frames", "op", "read_at", "outcome",
                 "reply_reserve")

    def __init__(self, request_bytes: int, frames: int = 1, op: int | None = None):
        self.reply = None
        # Bytes this slot holds against inflight_bytes_max: the request's,
        # plus its reply's once built (or `reply_reserve` until then).
        self.request_bytes = request_bytes
        self.frames = frames
        # For the request metrics when the reply is handed over (complete);
        # None for the PAY fast path's slots, which the writer counts per batch.
        self.op = op
        self.read_at = time.perf_counter() if op is not None else 0.0
        self.outcome = "ok"
        self.reply_reserve = 0


class Connection(asyncio.Protocol):
    def __init__(self, server):
        self.server = server
        self.config = server.config
        self.reader = frame.FrameReader(self.config.frame_bytes_max)
        # With keys configured: closed unless a HELLO authenticates in time
        # (hello_deadline); `reserved`: admitted into the admin reserve.
        self.hello_timer = None
        self.reserved = False
        self.set_identity(None if server.auth.required else ANONYMOUS_ADMIN)
        self.slots = collections.deque()
        self.inflight_bytes = 0
        self.inflight_frames = 0
        self.transport = None
        self.paused = False
        self.write_paused = False           # the transport is over its high-water mark
        # The in-flight counts at which reading pauses (update_flow).
        self.inflight_frames_max = self.config.inflight_frames_max
        self.inflight_bytes_max = self.config.inflight_bytes_max
        self.closing = False
        self.idle_timer = None
        self.active_at = 0.0                # loop time of the last read
        self.peer = None
        self.loop = None
        self.writer = server.writer
        # The PayBatch this connection's latest reply slot belongs to, if
        # any: further PAY frames join that slot (ext/framing.pyx intake_pay).
        self.pay_batch = None
        self.pay_member = 0
        self.pay_slot = None
        # The socket as the sender thread sends on it (ext/outlet.pyx); None
        # for TLS, whose bytes only the transport can write.
        self.outlet = None

    # -- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport
        self.peer = transport.get_extra_info("peername")
        if not self.server.admit(self):
            transport.write(frame.encode_error(0, 0, ErrorCode.busy,
                                               "too many connections; retry later", True))
            transport.close()
            return
        self.loop = asyncio.get_running_loop()
        self.active_at = self.loop.time()
        self.arm_idle_timer(self.config.idle_timeout_ms / 1000)
        high = self.config.reply_buffer_bytes_max
        transport.set_write_buffer_limits(high=high, low=high // 4)
        if self.identity is None:
            self.hello_timer = self.loop.call_later(self.config.hello_timeout_ms / 1000,
                                                    self.hello_deadline)
        sock = transport.get_extra_info("socket")
        if (self.writer.direct_replies and sock is not None
                and transport.get_extra_info("ssl_object") is None):
            self.outlet = Outlet(sock.fileno())

    def connection_lost(self, exc):
        self.closing = True
        if self.idle_timer:
            self.idle_timer.cancel()
        if self.hello_timer:
            self.hello_timer.cancel()
        self.stop_outlet()
        self.server.forget(self)

    def stop_outlet(self) -> None:
        """No more sends from the sender thread; the dup'ed socket is closed
        once none is queued (else by the last outlet_released)."""
        outlet = self.outlet
        if outlet is not None:
            outlet.block()
            if outlet.outstanding == 0:
                outlet.close()

    def data_received(self, data):
        if self.closing:
            return
        # A timestamp, not a new timer per read: the one timer looks at it.
        self.active_at = self.loop.time()
        reader = self.reader
        at = 0
        if not reader.buffer and self.pay_unchecked and self.server.write_refusal() is None:
            # The usual read of a gateway: nothing left over from the last
            # read and nothing but whole PAY frames in this one. (Once a
            # read per connection and tick: every call here counts.)
            at = intake_pay(self.writer, self, data, 0)
            if at == len(data):
                if (self.paused or self.inflight_frames >= self.inflight_frames_max
                        or self.inflight_bytes >= self.inflight_bytes_max):
                    self.update_flow()
                return
        buffer = reader.begin(data)
        end = len(buffer)
        try:
            while at < end and not self.closing:
                # Runs of PAY frames go straight into the writer's open batch
                # (no Python object per frame); anything else, and any frame
                # that could be refused, is parsed and handled frame by frame.
                if self.pay_fast_path():
                    at = intake_pay(self.writer, self, buffer, at)
                parsed = reader.next_frame(buffer, at)
                if parsed is None:
                    break
                (op, _flags, request_id, body), at = parsed
                self.handle(op, request_id, body)
                if self.over_limits():      # the rest waits in the reader (update_flow)
                    break
        except frame.FrameError as e:
            self.fail(e.op, e.request_id, e.code, e.message)
            return
        if not self.closing:
            reader.keep(buffer, at)
            self.update_flow()

    def set_identity(self, identity) -> None:
        self.identity = identity
        # PAY frames of this connection need no per-record check: an admin,
        # or a gateway key with no merchant scope.
        self.pay_unchecked = (identity is not None and identity.merchants is None
                              and identity.may("PAY"))
        if identity is not None and self.hello_timer is not None:
            self.hello_timer.cancel()
            self.hello_timer = None
            self.server.hello_done(self)

    def pay_fast_path(self) -> bool:
        return self.pay_unchecked and not self.closing and self.server.write_refusal() is None

    def open_slot(self) -> Slot:
        """A reply slot for frames the writer takes straight into a batch; it
        counts them (and their bytes) as they are added."""
        slot = Slot(0, 0)
        self.slots.append(slot)
        return slot

    # -- requests ---------------------------------------------------------

    def handle(self, op: int, request_id: int, body: bytes) -> None:
        slot = Slot(len(body), op=op)
        self.slots.append(slot)
        self.pay_batch = None               # later PAY frames need a slot after this one
        self.inflight_bytes += len(body)
        self.inflight_frames += 1
        name = OP_NAMES.get(op)
        if op == OP_HELLO:
            return self.hello(slot, request_id, body)
        if self.identity is None:
            return self.error(slot, op, request_id, ErrorCode.not_authenticated,
                              "send HELLO with a valid key first")
        served = (op == OP_PING or op in RECORD_DTYPES or op in MAP_OPS_BY_CODE
                  or (op == OP_CLOCK and self.config.test_clock))
        if not served:                      # internal ops (EXPIRE) are not for clients
            return self.error(slot, op, request_id, ErrorCode.unknown_op, f"unknown op {op}")
        if not self.identity.may(name):
            return self.error(slot, op, request_id, ErrorCode.forbidden,
                              f"role {self.identity.role} may not send {name}")
        if op == OP_PING:
            return self.complete(slot, frame.encode(op, request_id))
        if op == OP_CLOCK:
            return self.clock(slot, request_id, body)
        if op in RECORD_DTYPES:
            return self.records(slot, op, request_id, body)
        return self.map_request(slot, op, request_id, body)

    def hello(self, slot, request_id, body) -> None:
        request = self.decode_map(body)
        if request is None:
            return self.error(slot, OP_HELLO, request_id, ErrorCode.bad_body,
                              "HELLO takes a MessagePack map")
        malformed = hello_shape_error(request)
        if malformed is not None:
            return self.error(slot, OP_HELLO, request_id, ErrorCode.bad_body, malformed)
        if request["protocol"] != PROTOCOL_VERSION:
            self.error(slot, OP_HELLO, request_id, ErrorCode.unsupported_protocol,
                       f"this server speaks protocol {PROTOCOL_VERSION}")
            return self.close_after_flush()
        if self.server.auth.required:
            try:
                self.set_identity(self.server.auth.check(request))
            except ValueError as e:
                return self.error(slot, OP_HELLO, request_id, ErrorCode.not_authenticated,
                                  f"authentication failed: {e}")
            if self.reserved and self.identity.role != ROLE_ADMIN:
                return self.hello_reserved(slot, request_id)
        self.complete(slot, frame.encode_map(OP_HELLO, request_id, self.server.hello_reply()))

    def hello_reserved(self, slot, request_id) -> None:
        """A non-admin authenticated on a slot of the admin reserve: busy."""
        self.error(slot, OP_HELLO, request_id, ErrorCode.busy,
                   "too many connections; retry later (the remaining slots are for admins)",
                   True)
        self.close_after_flush()

    def hello_deadline(self) -> None:
        """No valid HELLO within hello_timeout_ms: close (slow or silent
        clients must not hold connection slots)."""
        self.hello_timer = None
        if self.identity is None and not self.closing:
            self.close_unauthenticated(f"no valid HELLO within {self.config.hello_timeout_ms} ms")

    def evict(self) -> None:
        """Closed to make room for a newer unauthenticated connection."""
        self.close_unauthenticated(f"no valid HELLO yet, and {self.config.unauthenticated_max} "
                                   f"newer connections are waiting for theirs")

    def close_unauthenticated(self, why: str) -> None:
        self.server.hello_done(self)        # no longer waiting: its slot is free now
        if self.closing:
            return
        log.info("closing %s: %s", self.peer, why)
        self.server.count("HELLO", ErrorCode.not_authenticated.name)
        self.transport.write(frame.encode_error(OP_HELLO, 0, ErrorCode.not_authenticated, why))
        self.close_after_flush()

    def clock(self, slot, request_id, body) -> None:
        request = self.decode_map(body)
        now = request.get("now") if request else None
        if not isinstance(now, int) or isinstance(now, bool) or now < 0:
            return self.error(slot, OP_CLOCK, request_id, ErrorCode.bad_body,
                              "CLOCK takes {now: ms since the epoch}")
        self.server.clock.set(now)
        self.complete(slot, frame.encode_map(OP_CLOCK, request_id,
                                             {"now": self.server.engine._now()}))

    def records(self, slot, op, request_id, body) -> None:
        if self.refuse_write(slot, op, request_id):
            return
        dtype = RECORD_DTYPES[op]
        count = len(body) // dtype.itemsize
        if len(body) % dtype.itemsize or not 1 <= count <= self.config.batch_records_max:
            return self.error(slot, op, request_id, ErrorCode.bad_body,
                              f"a {OP_NAMES[op]} body is 1 to {self.config.batch_records_max} "
                              f"records of {dtype.itemsize} bytes; got {len(body)} bytes")
        merge = None
        if op == OP_PAY and self.identity.merchants is not None:
            body, merge = self.scope_filter(body)
            if not body:                    # every record outside the key's merchants
                return self.complete(slot, frame.encode(op, request_id, merge(None).tobytes()))
        deliver = self.records_delivery(slot, op, request_id, merge)
        work = Work(op, body, deliver, records=len(body) // dtype.itemsize)
        if op != OP_PAY and self.identity.merchants is not None:
            work.scope = self.identity.merchants    # checked by the writer (engine/core/scope.py)
        if not self.server.writer.submit(work):
            self.error(slot, op, request_id, ErrorCode.busy,
                       "the server queue is full; retry later", True)

    def scope_filter(self, body: bytes):
        """Split off PAY records for merchants outside a gateway key's scope:
        they get `forbidden` and never reach the kernel."""
        records = np.frombuffer(body, PAY_RECORD)
        allowed = np.isin(records["merchant"], self.server.scope_array(self.identity))
        if allowed.all():
            return body, None

        def merge(results):
            out = np.zeros(len(records), PAY_RESULT)
            out["id"] = records["id"]
            out["status"] = Status.forbidden
            out["timestamp"] = self.server.engine.state.now
            if results is not None:
                out[allowed] = results
            return out
        return records[allowed].tobytes(), merge

    def records_delivery(self, slot, op, request_id, merge):
        def deliver(value):
            if isinstance(value, EngineError):
                return self.error(slot, op, request_id, value.code, value.message, value.retryable)
            results = merge(value) if merge else value
            self.complete(slot, frame.encode(op, request_id, results.tobytes()))
        return deliver

    def refuse_write(self, slot, op, request_id) -> bool:
        """A replicated node that may not write now (a follower, or a leader
        whose stream does not answer) answers a write at once, in its slot,
        instead of queueing it behind the writer (engine/replication/node.py)."""
        refusal = self.server.write_refusal()
        if refusal is None:
            return False
        self.error(slot, op, request_id, refusal.code, refusal.message, refusal.retryable)
        return True

    def map_request(self, slot, op, request_id, body) -> None:
        spec = MAP_OPS_BY_CODE[op]
        if spec.writes and self.refuse_write(slot, op, request_id):
            return
        if not spec.writes:                 # released by whatever answers it (complete)
            self.reserve_reply(slot, len(body))
        try:
            request = msgpack_guard.decode_map(body)
        except msgpack_guard.BodyRefused as e:
            return self.error(slot, op, request_id, ErrorCode.bad_body,
                              f"{spec.name} takes a MessagePack map: {e}")
        try:
            spec.check_body(request)
        except EngineError as e:
            return self.error(slot, op, request_id, e.code, e.message)
        if self.identity.merchants is not None and spec.name == "QUOTE":
            if request.get("merchant") not in self.identity.merchants:
                reply = {"status": int(Status.forbidden), "error": "forbidden", "cash": 0,
                         "discount": 0, "fee": 0, "coupons": [], "explain": []}
                return self.complete(slot, frame.encode_map(op, request_id, reply))
        if self.identity.merchants is not None and spec.scoped:
            request, body = self.scoped_request(request)

        def deliver(value):
            if isinstance(value, EngineError):
                return self.error(slot, op, request_id, value.code, value.message, value.retryable)
            self.complete(slot, frame.encode_map(op, request_id, value))

        work = Work(op, body or frame._encoder.encode({}), deliver, spec=spec, request=request)
        if not self.server.writer.submit(work):
            self.error(slot, op, request_id, ErrorCode.busy,
                       "the server queue is full; retry later", True)

    def scoped_request(self, request: dict) -> tuple[dict, bytes]:
        """The request with this gateway key's merchants as its `scope`
        (engine/core/scope.py), replacing any the client sent: the apply checks
        each payment against it, and the journal keeps it for replay."""
        request = {**request, SCOPE_KEY: sorted(self.identity.merchants)}
        return request, frame._encoder.encode(request)

    @staticmethod
    def decode_map(body: bytes):
        """The request map, or None (bad_body): msgpack_guard refuses deep
        nesting and repeated keys before msgspec sees the body."""
        try:
            return msgpack_guard.decode_map(body)
        except msgpack_guard.BodyRefused:
            return None

    # -- replies ----------------------------------------------------------

    def error(self, slot, op, request_id, code, message, retryable=False) -> None:
        slot.outcome = code.name
        self.complete(slot, frame.encode_error(op, request_id, code, message, retryable))

    def complete(self, slot, reply: bytes) -> None:
        slot.reply = reply
        if slot.op is not None:
            self.server.metrics.requests.observe(OP_NAMES.get(slot.op, str(slot.op)), slot.outcome,
                                                 time.perf_counter() - slot.read_at)
        # The reply's bytes count against the in-flight limit until written
        # (in place of what was reserved for it): replies that wait behind an
        # earlier slot are held by the server too.
        grown = len(reply) - slot.reply_reserve
        slot.reply_reserve = 0
        slot.request_bytes += grown
        self.inflight_bytes += grown
        self.flush_soon()

    def flush_soon(self) -> None:
        """Flush now, or once at the end of the writer's release round."""
        if self.closing:
            return
        writer = self.writer
        if writer.releasing:                # the writer flushes us once, after the round
            writer.to_flush[self] = None
            return
        self.flush()

    def flush(self) -> None:
        """Write every reply that is next in request order, in one write."""
        if self.closing:
            return
        out = []
        while self.slots and self.slots[0].reply is not None:
            done = self.slots.popleft()
            self.inflight_bytes -= done.request_bytes
            self.inflight_frames -= done.frames
            out.append(done.reply)
        if out:
            self.transport.write(b"".join(out))
            self.update_flow()

    def may_send_directly(self, slot) -> bool:
        """May the sender thread send `slot`'s replies? Only if every reply
        before it on this connection is itself queued there (so nothing can
        overtake it) and the transport has nothing buffered."""
        outlet = self.outlet
        if outlet is None or self.closing:
            return False
        queued = outlet.outstanding
        if queued == 0:
            if self.transport.get_write_buffer_size() or self.slots[0] is not slot:
                return False
            if outlet.blocked:
                outlet.reset()
            return True
        return not outlet.blocked and len(self.slots) > queued and self.slots[queued] is slot

    def sent_directly(self, slot) -> None:
        """The sender thread sent `slot`'s replies whole: forget it."""
        if self.closing:
            return
        done = self.slots.popleft()
        assert done is slot, "a reply sent by the sender thread was not the next one"
        self.inflight_bytes -= done.request_bytes
        self.inflight_frames -= done.frames
        if self.slots and self.slots[0].reply is not None:
            self.flush_soon()               # replies answered behind it can go now
        else:
            self.update_flow()

    def outlet_released(self) -> None:
        outlet = self.outlet
        outlet.released()
        if self.closing and outlet.outstanding == 0:
            outlet.close()

    def fail(self, op, request_id, code, message) -> None:
        """A stream error: flush what is answered, send the error, close."""
        log.info("closing %s: %s", self.peer, message)
        self.server.count(OP_NAMES.get(op, str(op)), code.name)
        self.transport.write(frame.encode_error(op, request_id, code, message))
        self.close_after_flush()

    def close_after_flush(self) -> None:
        """Close once what is written has left: half-closed first, input
        read and discarded for up to LINGER_MS (where the transport can
        half-close; TLS cannot), so that the last reply is not lost to a
        reset."""
        self.closing = True
        self.stop_outlet()
        transport = self.transport
        if not transport.can_write_eof():
            return transport.close()
        if self.paused:                     # the kernel must not hold unread input
            transport.resume_reading()
            self.paused = False
        transport.write_eof()
        self.loop.call_later(LINGER_MS / 1000, transport.close)

    # -- limits -----------------------------------------------------------

    def over_limits(self) -> bool:
        """Stop reading (and handling frames already read)? Requests and
        replies in flight, and a transport holding more than
        reply_buffer_bytes_max that the client has not read."""
        return (self.inflight_frames >= self.inflight_frames_max
                or self.inflight_bytes >= self.inflight_bytes_max or self.write_paused)

    def update_flow(self) -> None:
        over = self.over_limits()
        if over and not self.paused and not self.closing:
            self.transport.pause_reading()
            self.paused = True
        elif not over and self.paused and not self.closing:
            self.transport.resume_reading()
            self.paused = False
            if self.reader.buffer:          # frames read but held back (data_received)
                self.loop.call_soon(self.data_received, b"")

    def pause_writing(self) -> None:
        """asyncio: the transport holds more than its high-water mark; a client
        that does not read its replies gets no more requests read."""
        self.write_paused = True
        self.update_flow()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.update_flow()

    def reserve_reply(self, slot, body_bytes: int) -> None:
        """Hold what a read's reply may grow to against the in-flight bytes
        until it is built (complete puts the real size in its place)."""
        reserve = min(READ_REPLY_BYTES_MIN + body_bytes * READ_REPLY_BYTES_PER_BODY_BYTE,
                      self.inflight_bytes_max)
        slot.reply_reserve = reserve
        slot.request_bytes += reserve
        self.inflight_bytes += reserve

    def arm_idle_timer(self, delay_s: float) -> None:
        self.idle_timer = self.loop.call_later(delay_s, self.idle)

    def idle(self) -> None:
        timeout_s = self.config.idle_timeout_ms / 1000
        quiet_s = self.loop.time() - self.active_at
        if quiet_s < timeout_s:             # read since: wait out the rest
            return self.arm_idle_timer(timeout_s - quiet_s)
        if self.slots:                      # still waiting on our own replies
            return self.arm_idle_timer(timeout_s)
        log.info("closing idle connection %s", self.peer)
        self.close_after_flush()
