"""The single writer: coalesces requests from every connection into kernel
batches, journals and applies them in order, and releases each reply once
the fsync covering it has returned (TigerBeetle-style automatic batching).

Work is applied strictly in arrival order. Consecutive PAY (or ISSUE) frames
become one kernel batch of up to `batch_records_max` records, so a busy
server turns many small frames into few large commands and few fsyncs.

PAY frames from connections with no per-record checks to make take a fast
path: `intake_pay` (ext/framing.pyx) copies them from the read buffer
straight into the open `PayBatch` at the queue's tail (`pay_batch`), with no
Python object per frame, and each connection's share of a batch is answered
in one write. Queueing anything else closes the open batch, so work is still
applied in arrival order.
"""
import asyncio
import concurrent.futures
import collections
import logging
import threading
import time

import numpy as np

from engine.protocol import frame
from engine._framing import PayBatch
from engine._outlet import Courier, Sends
from engine.protocol.limits import BATCH_RECORDS_MAX
from engine.protocol.ops import OP_CAPTURE_RECORDS, OP_ISSUE, OP_PAY, OP_REFUND_RECORDS
from engine.protocol.errors import EngineError, Unavailable
from engine.protocol.records import ISSUE_RESULT, PAY_RECORD, PAY_RESULT, REFUND_RESULT
from engine.core.scope import SCOPED_RECORD_OPS, filter_records
from engine.server.lone_sync import LoneSync
from engine.server.threads import raise_thread_priority
from engine.server.audit_fork import Audits
from engine.core.ops.money import BuiltLater

log = logging.getLogger("scanpay.writer")

DELIVERIES_INFLIGHT_MAX = 64       # batches applied but awaiting their fsync
SENDS_WAITING_MAX = 2 * DELIVERIES_INFLIGHT_MAX   # fsyncs' replies handed, not yet sent
# An fsync's replies to at most this many connections are sent by the sync
# thread itself when no other fsync waits (Writer.send_replies): a few
# sendmsgs, instead of a wake-up of the sender thread.
SENDS_HERE_MAX = 8
SLOW_MS = 100                      # a batch or a wait for its fsync longer than this is logged
# Index entries the writer moves between looks at its empty queue while an
# index resize is under way (a fraction of a millisecond in bucket order,
# ext/index.pxd), as Redis rehashes when idle: a table that stopped growing
# mid-resize (the coupons, once the world is built) is settled before the
# payments come, not by the first tens of PAY batches (issue 16).
IDLE_MOVE_ENTRIES = 32_768
RESULT_DTYPES = {OP_PAY: PAY_RESULT, OP_ISSUE: ISSUE_RESULT,
                 OP_CAPTURE_RECORDS: PAY_RESULT, OP_REFUND_RECORDS: REFUND_RESULT}
OP_LABELS = {OP_PAY: "PAY", OP_ISSUE: "ISSUE", OP_CAPTURE_RECORDS: "CAPTURE_RECORDS",
             OP_REFUND_RECORDS: "REFUND_RECORDS"}


class Work:
    """One request for the writer. `deliver(result | EngineError)` runs on the
    event loop once the result may be released."""
    __slots__ = ("op", "body", "records", "spec", "request", "deliver", "submitted_at", "scope")

    def __init__(self, op, body, deliver, records=0, spec=None, request=None):
        self.op = op
        self.body = body
        self.records = records
        self.spec = spec
        self.request = request
        self.deliver = deliver
        self.submitted_at = 0.0                 # set by Writer.submit (metrics)
        self.scope = None                       # a gateway key's merchants (record ops)


def queued_weight(item) -> int:
    """What an item counts against queue_records_max: its records, and at
    least one for a map request."""
    return item.records if isinstance(item, PayBatch) else max(item.records, 1)


def describe(group: list) -> str:
    """What a writer group is, for the logs: its records, or its map op."""
    first = group[0]
    if isinstance(first, PayBatch):
        return f"{first.records} PAY records"
    if first.op in RESULT_DTYPES:
        return f"{sum(w.records for w in group)} {OP_LABELS[first.op]} records"
    return f"one {first.spec.name} request"


def group_op(group: list) -> str:
    """The op of a writer group, by name."""
    first = group[0]
    if isinstance(first, PayBatch):
        return "PAY"
    return OP_LABELS[first.op] if first.op in RESULT_DTYPES else first.spec.name


def with_position(deliver, stream_seq: int):
    """`deliver`, adding to a read's reply map the stream seq it reflects
    (docs/replication.md); errors go through unchanged."""
    def deliver_at(value) -> None:
        if isinstance(value, dict):
            value = {**value, "stream_seq": stream_seq}
        deliver(value)
    return deliver_at


class SlowLog:
    """The writer's slow-batch and slow-fsync warnings, one line per stall.

    One disk stall delays every batch queued behind it, and each used to log
    its own identical line. The first slow event of a kind opens a window;
    events of that kind while it is open only count; once none has come for
    `quiet_s` (or the window is `window_max_s` old) it logs one line with the
    count and the worst case. (Called on the event loop only.)"""

    QUIET_S = 1.0
    WINDOW_MAX_S = 10.0

    def __init__(self, quiet_s: float = QUIET_S, window_max_s: float = WINDOW_MAX_S):
        self.quiet_s = quiet_s
        self.window_max_s = window_max_s
        self.open = {}          # kind ("fsync", "batch PAY", ...) -> [count, worst_ms,
        #                         worst_what, opened_at, last_at]
        self.timer = None
        self.loop = None

    def note(self, kind: str, ms: float, what: str = "") -> None:
        now = time.monotonic()
        entry = self.open.get(kind)
        if entry is None:
            self.open[kind] = [1, ms, what, now, now]
        else:
            entry[0] += 1
            entry[4] = now
            if ms > entry[1]:
                entry[1], entry[2] = ms, what
        if self.timer is None:
            self.loop = self.loop or asyncio.get_running_loop()
            self.timer = self.loop.call_later(self.quiet_s, self.due)

    def due(self) -> None:
        self.timer = None
        now = time.monotonic()
        for kind, (_count, _ms, _what, opened_at, last_at) in list(self.open.items()):
            if now - last_at >= self.quiet_s or now - opened_at >= self.window_max_s:
                self.emit(kind)
        if self.open:
            self.timer = self.loop.call_later(self.quiet_s, self.due)

    def flush(self) -> None:
        """Log whatever is pending now (at stop)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for kind in list(self.open):
            self.emit(kind)

    def emit(self, kind: str) -> None:
        count, ms, what, opened_at, last_at = self.open.pop(kind)
        if kind == "fsync":
            if count == 1:
                log.warning("slow fsync: a batch waited %.0f ms to be durable", ms)
            else:
                log.warning("slow fsync: %d batches waited up to %.0f ms to be durable "
                            "(within %.1f s)", count, ms, last_at - opened_at)
        elif count == 1:
            log.warning("slow batch: %.0f ms to journal and apply %s", ms, what)
        else:
            log.warning("slow batch: %d %s batches took up to %.0f ms to journal and apply "
                        "(within %.1f s; the slowest: %s)", count, kind.split()[-1], ms,
                        last_at - opened_at, what)


class Writer:
    def __init__(self, engine, metrics=None, batch_records_max: int = BATCH_RECORDS_MAX,
                 queue_records_max: int = 262_144,
                 frame_bytes_max: int = frame.FRAME_BYTES_MAX_DEFAULT,
                 direct_replies: bool = True, lone_sync: bool = True):
        self.engine = engine
        self.metrics = metrics
        self.batch_records_max = batch_records_max
        self.queue_records_max = queue_records_max
        self.frame_bytes_max = frame_bytes_max
        self.queue = collections.deque()        # Work and PayBatch, in arrival order
        self.pay_batch = None                   # the open PayBatch: the queue's tail
        self.queued_records = 0
        self.wake = asyncio.Event()
        # (durable, parts, scheduled_at, sends, engine generation), in order
        self.deliveries = collections.deque()
        # The newest engine generation (Engine.generation) in which an fsync
        # failed: replies computed in it are not released (see release_durable).
        self.failed_generation = -1
        self.watched = None                     # the last fsync future with our callback
        self.observed = None                    # the last fsync future in the metrics
        self.observed_sends = None              # and the last Sends
        self.released = asyncio.Event()
        # While a release round delivers, connections queue themselves here
        # and are flushed once at its end: a connection with frames in three
        # batches covered by one fsync gets one write, not three.
        self.releasing = False
        self.to_flush = {}                      # connection -> None, in order
        # PAY replies the sender thread sends once their fsync returns, per
        # fsync future (ext/outlet.pyx); connections without an outlet (TLS)
        # and replies that must wait for others go out from the event loop.
        self.direct_replies = direct_replies and engine.storage is not None
        self.sends = {}                         # durability future -> Sends
        # Sends whose fsync returned, in order, for the sender thread.
        self.courier = Courier(SENDS_WAITING_MAX) if self.direct_replies else None
        self.sender = None
        if self.direct_replies:
            engine.on_durable = self.send_replies
        # A lone request's fsync and reply on a thread with no GIL
        # (engine/server/lone_sync.py); it sends through the courier's order.
        self.lone = (LoneSync(self) if lone_sync and self.direct_replies
                     and LoneSync.supported(engine) else None)
        self.loop = None
        self.loop_thread = None
        self.stopping = False
        self.task = None
        self.slow_log = SlowLog()
        # AUDIT runs in a forked child, off the writer (engine/server/audit_fork.py).
        self.audits = Audits(self)
        # Big read replies (GET_PAYMENTS) are built off the writer's path: the
        # writer copies the rows they need, this thread makes the Python
        # objects (most of the cost) while the writer applies the next batches
        # (the kernel releases the GIL). One thread: replies of one connection
        # leave in request order anyway (their slots), and the connections'
        # in-flight limits bound what waits for it.
        self.reply_builder = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="scanpay-replies")
        self.replies_building = set()           # asyncio futures of builds under way
        # Replicated (engine/replication/node.py): the stream seq the state
        # reflects, which every read's reply states (None: not replicated).
        self.position = None

    # -- intake -----------------------------------------------------------

    def submit(self, work: Work) -> bool:
        """Queue work; False when the queue is full (the caller answers busy)."""
        if self.stopping or self.queued_records + max(work.records, 1) > self.queue_records_max:
            return False
        work.submitted_at = time.perf_counter()
        self.queue.append(work)
        self.pay_batch = None                   # PAY frames after it go to a new batch
        self.queued_records += max(work.records, 1)
        self.wake.set()
        return True

    def open_pay_batch(self) -> PayBatch:
        """A new PayBatch at the queue's tail, for intake_pay (ext/framing.pyx)
        to fill until it is full or something else is queued after it."""
        batch = PayBatch(self.batch_records_max, PAY_RECORD.itemsize, self.frame_bytes_max,
                         OP_PAY)
        batch.opened_at = time.perf_counter()
        self.queue.append(batch)
        self.pay_batch = batch
        return batch

    def drop_pay_batch(self, batch: PayBatch) -> None:
        """Take back a batch opened for a read that had no frame for it."""
        assert batch.records == 0 and self.queue[-1] is batch
        self.queue.pop()
        self.pay_batch = None

    def start(self):
        self.loop = asyncio.get_running_loop()
        self.task = self.loop.create_task(self.run())
        self.loop_thread = threading.get_ident()
        if self.lone is not None:
            self.lone.start(self.loop)
            self.engine.lone_sync = self.lone
        if self.direct_replies:
            self.sender = threading.Thread(target=self.send_loop, name="scanpay-send",
                                           daemon=True)
            self.sender.start()

    async def stop(self):
        """Apply what is queued, release every reply, then stop."""
        self.stopping = True
        self.audits.hurry()                 # a running audit need not leave the cores idle
        self.wake.set()
        if self.task is not None:
            await self.task
        if self.replies_building:            # released reads still being built
            await asyncio.wait(set(self.replies_building))
        self.reply_builder.shutdown(wait=True)
        if self.lone is not None and self.engine.lone_sync is self.lone:
            self.engine.lone_sync = None
            self.lone.stop(self.loop)
        if self.sender is not None:
            self.courier.close()
            self.sender.join()
            self.sender = None
        self.slow_log.flush()

    def send_loop(self) -> None:
        """The sender thread: each fsync's direct replies, in fsync order,
        then a wake-up for the event loop to release their slots. Apart from
        the fsyncs (the sync thread goes on with the next one meanwhile)."""
        raise_thread_priority(self.engine.io_threads_nice, "sender")
        while True:
            # Waits and sends without the GIL (ext/outlet.pyx); whatever it
            # could not send, the event loop writes.
            if self.courier.next_sent() is None:
                return
            try:
                self.loop.call_soon_threadsafe(self.release_ready)
            except RuntimeError:            # the loop is closed: nothing left to release
                return

    # -- the loop ---------------------------------------------------------

    async def run(self):
        while True:
            if self.audits.ready():         # between batches: fork for waiting AUDITs
                self.audits.start()
            if not self.queue:
                if self.stopping and not self.audits.active:
                    break
                if self.engine.state.ledger.step_resizes(IDLE_MOVE_ENTRIES):
                    await asyncio.sleep(0)  # the queue again before the next step
                    continue
                self.wake.clear()
                await self.wake.wait()
                continue
            group = self.take_group()
            self.queued_records -= sum(queued_weight(w) for w in group)
            if self.metrics:
                self.metrics.queue_records.set(self.queued_records)
            started = time.perf_counter()
            self.process(group)
            took_s = time.perf_counter() - started
            if self.metrics:
                first = group[0]
                queued_at = first.opened_at if isinstance(first, PayBatch) else first.submitted_at
                self.metrics.stage["queue"].observe(started - queued_at)
                self.metrics.stage["apply"].observe(took_s)
            took_ms = took_s * 1000
            if took_ms > SLOW_MS:
                self.slow_log.note(f"batch {group_op(group)}", took_ms, describe(group))
            while len(self.deliveries) > DELIVERIES_INFLIGHT_MAX:
                self.released.clear()
                await self.released.wait()
            await asyncio.sleep(0)          # let connections read, replies go out
        while self.deliveries:              # each fsync's callback releases its share
            self.released.clear()
            await self.released.wait()

    def take_group(self) -> list:
        first = self.queue.popleft()
        group = [first]
        if isinstance(first, PayBatch):
            if first is self.pay_batch:         # taken: intake opens the next one
                self.pay_batch = None
            return group
        if first.op in RESULT_DTYPES:
            total = first.records
            while (self.queue and isinstance(self.queue[0], Work)
                   and self.queue[0].op == first.op
                   and total + self.queue[0].records <= self.batch_records_max):
                work = self.queue.popleft()
                total += work.records
                group.append(work)
        return group

    def process(self, group: list) -> None:
        if isinstance(group[0], PayBatch):
            return self.process_pay_batch(group[0])
        try:
            if group[0].op in RESULT_DTYPES:
                self.process_records(group)
            elif group[0].spec.writes:
                self.process_map_write(group[0])
            elif group[0].spec.name == "AUDIT":
                self.audits.request(group[0])
            else:
                reply, durable = self.engine.read_command(group[0].spec, group[0].request)
                deliver = group[0].deliver
                if self.position is not None:       # replicated: the stream seq it reflects
                    deliver = with_position(deliver, self.position())
                self.schedule(durable, [(self.built_off_writer(deliver), reply)])
        except EngineError as error:        # unavailable storage, a refused body
            self.schedule(None, [(w.deliver, error) for w in group])

    def built_off_writer(self, deliver):
        """`deliver`, except that a BuiltLater reply (rows copied by the
        writer) is built in the reply thread first, then delivered on the
        event loop. Released replies arrive here in order; a failed storage's
        Unavailable goes straight through."""
        def deliver_built(value) -> None:
            if not isinstance(value, BuiltLater):
                return deliver(value)
            future = self.loop.run_in_executor(self.reply_builder, value.build)
            self.replies_building.add(future)
            future.add_done_callback(lambda done: self.built(done, deliver))
        return deliver_built

    def built(self, done, deliver) -> None:
        self.replies_building.discard(done)
        error = None if done.cancelled() else done.exception()
        if done.cancelled() or error is not None:
            log.error("building a read reply failed: %r", error)
            return deliver(Unavailable("building the reply failed (see the server log); "
                                       "nothing was changed; retry"))
        deliver(done.result())

    def process_records(self, group: list) -> None:
        op = group[0].op
        for work in group:
            if work.scope is not None:
                self.apply_scope(work)
        body = group[0].body if len(group) == 1 else b"".join(w.body for w in group)
        if not body:                        # every record outside the keys' scopes
            return self.schedule(None, [(w.deliver, np.zeros(0, RESULT_DTYPES[op])) for w in group])
        results, durable = self.engine.write_command(op, body, requesters=len(group))
        if self.metrics:
            self.count_records(op, results)
        at = 0
        parts = []
        for work in group:
            parts.append((work.deliver, results[at:at + work.records]))
            at += work.records
        self.schedule(durable, parts)

    def apply_scope(self, work: Work) -> None:
        """Take out the records of `work` outside its key's scope, now, on the
        writer, just before the apply: the journal holds only the records
        applied, and the others are answered `forbidden` (engine/core/scope.py)."""
        body, merge = filter_records(self.engine.state.ledger, OP_LABELS[work.op], work.body,
                                     work.scope, self.engine._now())
        if merge is None:
            return
        deliver = work.deliver
        work.body = body
        work.records = len(body) // SCOPED_RECORD_OPS[OP_LABELS[work.op]][0].itemsize

        def merged(value):
            if isinstance(value, EngineError):
                return deliver(value)
            return deliver(merge(value if len(value) else None))
        work.deliver = merged

    def process_pay_batch(self, batch: PayBatch) -> None:
        try:
            # Each member (a connection's frames) is a requester (group commit's rule).
            results, durable = self.engine.write_command(OP_PAY, batch.body(),
                                                         requesters=len(batch.parts))
        except EngineError as error:
            return self.schedule(None, [(lambda value: self.deliver_pay_batch(batch, value),
                                         error)])
        if self.metrics:
            self.count_records(OP_PAY, results)
        replies, ends = batch.replies(results.view(np.uint8))
        ends = ends.tolist()
        sends, direct = self.queue_direct(batch, replies, ends, durable)
        if sends is not None and self.lone is not None and not self.lone.attach(durable, sends):
            sends, direct = None, None

        def deliver(value):
            self.deliver_pay_batch(batch, value, replies, ends, sends, direct, durable)
        self.schedule(durable, [(deliver, results)], sends)

    def queue_direct(self, batch: PayBatch, replies: bytes, ends: list, durable):
        """Queue each member's replies for the sender thread to send right after
        `durable`'s fsync (ext/outlet.pyx), where its connection allows.
        Returns (Sends or None, entry index per member, -1 for none)."""
        if durable is None or not self.direct_replies or durable.done():
            return None, None
        sends = self.sends.get(durable)
        if sends is None:
            sends = self.sends[durable] = Sends()
        direct = []
        start = 0
        for (conn, slot), end in zip(batch.parts, ends):
            index = -1
            if conn.may_send_directly(slot):
                index = sends.add(conn.outlet, replies, start, end)
            direct.append(index)
            start = end
        return sends, direct

    def send_replies(self, durable) -> None:
        """In the sync thread, once `durable`'s fsync has returned
        (Engine.on_durable): its replies to the sender thread; or, when no
        other fsync waits for this thread and they are few (a lone caller's
        reply), sent by this thread at once, with no other thread to wake."""
        sends = self.sends.pop(durable, None)
        if sends is not None:
            sends.hand()
            if (len(sends) <= SENDS_HERE_MAX and not self.engine.fsync_waiting()
                    and self.courier.send_here(sends)):
                return
            if not self.courier.put(sends):
                sends.abandon()                 # the event loop writes them
                self.loop.call_soon_threadsafe(self.release_ready)

    def deliver_pay_batch(self, batch: PayBatch, value, replies=None, ends=None, sends=None,
                          direct=None, durable=None) -> None:
        """Each connection's share of the batch in one write, in request
        order, unless the sender thread already sent it."""
        if sends is not None:
            sends.close()                   # whatever it did not send, we write
            self.sends.pop(durable, None)    # if its fsync failed, or ran before we queued
        if self.metrics:                    # the batch's frames, in one call
            outcome = value.code.name if isinstance(value, EngineError) else "ok"
            self.metrics.requests.observe("PAY", outcome, time.perf_counter() - batch.opened_at,
                                          batch.frames)
        if isinstance(value, EngineError):
            for member, (conn, slot) in enumerate(batch.parts):
                if direct is not None and direct[member] >= 0:
                    conn.outlet_released()
                rids = batch.request_ids(member).tolist()
                conn.complete(slot, b"".join(
                    frame.encode_error(OP_PAY, rid, value.code, value.message, value.retryable)
                    for rid in rids))
            return
        replies = memoryview(replies)
        start = 0
        sent_whole = 0
        for member, ((conn, slot), end) in enumerate(zip(batch.parts, ends)):
            index = direct[member] if direct is not None else -1
            if index >= 0:
                conn.outlet_released()
                sent = sends.sent(index)
                if sent == end - start:
                    conn.sent_directly(slot)
                    sent_whole += 1
                    start = end
                    continue
                start += sent               # the rest goes through the transport
            conn.complete(slot, replies[start:end])
            start = end
        if self.metrics:
            by_sync = sends is not None and sends.sent_here
            (self.metrics.pay_reply_writes_sync if by_sync
             else self.metrics.pay_reply_writes_sender).inc(sent_whole)
            self.metrics.pay_reply_writes_loop.inc(len(ends) - sent_whole)

    def count_records(self, op, results) -> None:
        self.metrics.batch_records.observe(len(results))
        self.metrics.records.add(op, results["status"])

    def process_map_write(self, work: Work) -> None:
        draws = self.engine.draws_for(work.spec, work.request)
        reply, durable = self.engine.write_command(work.spec.code, work.body, draws)
        self.schedule(durable, [(work.deliver, reply)])

    # -- release ----------------------------------------------------------

    def schedule(self, durable, parts, sends=None) -> None:
        """Release `parts` after `durable` and after every earlier release, so
        that no reply ever overtakes the fsync of what it depends on.

        Releases wait in one queue, in order. Group commit makes many batches
        share one fsync future; each future, once done, wakes the loop once
        (not once per batch) and everything it covers goes out."""
        self.deliveries.append((durable, parts, time.perf_counter(), sends,
                                self.engine.generation))
        if durable is None:
            if len(self.deliveries) == 1:
                self.loop.call_soon(self.release_ready)
        elif durable is not self.watched:
            self.watched = durable
            durable.add_done_callback(self.durable_done)

    def durable_done(self, _future) -> None:
        """In the sync thread: hand over to the event loop (on the event
        loop itself, after a lone sync: no wake-up needed)."""
        if threading.get_ident() == self.loop_thread:
            self.loop.call_soon(self.release_ready)
        else:
            self.loop.call_soon_threadsafe(self.release_ready)

    def release_ready(self) -> None:
        """Deliver, in order, every release whose fsync has returned; then
        write each connection's replies once."""
        released = False
        self.releasing = True
        try:
            released = self.release_durable()
        finally:
            self.releasing = False
            to_flush, self.to_flush = self.to_flush, {}
            for conn in to_flush:
                conn.flush()
        if released:
            self.released.set()

    def observe_durable(self, durable, scheduled_at: float, sends, now: float) -> None:
        """The stages of a batch after it was applied (engine/server/metrics.py), and
        its fsync's own duration and sends once per fsync."""
        stage = self.metrics.stage
        # (A big batch's fsync can return before the kernel has applied it.)
        stage["commit"].observe(max(durable.synced_at - scheduled_at, 0.0))
        stage["release"].observe(now - durable.synced_at)
        if durable is not self.observed:
            self.observed = durable
            self.metrics.fsync_seconds.observe(durable.synced_at - durable.sync_started_at)
            if durable.waited:
                self.metrics.commit_waits.inc()
            if durable.lone:
                self.metrics.lone_syncs.inc()
        if sends is not None and sends is not self.observed_sends and sends.finished and len(sends):
            self.observed_sends = sends
            stage["send"].observe(sends.finished_at - durable.synced_at)

    def fail_stopped(self, durable, generation: int, error):
        """The error to deliver instead of a release's results, if any.

        A failed fsync drops every command after the durable journal entry
        (fail-stop), so a reply computed from the state after such a command,
        before the engine rebuilt it (same generation), must not go out: a
        read queued behind the failed fsync, or a refusal that saw a dropped
        change. It gets `unavailable`: nothing it saw was applied."""
        if error is not None:
            if durable is not None:
                self.failed_generation = max(self.failed_generation, generation)
            return error
        if generation > self.failed_generation:
            return None
        # Any fsync after a failed one fails until the engine has rebuilt
        # (a new generation): no durable change is ever answered unavailable.
        assert durable is None, "an fsync succeeded in a generation that had a failed one"
        return Unavailable("storage failed: this reply was computed from changes that were "
                           "then dropped; retry")

    def release_durable(self) -> bool:
        """Deliver the releases whose fsync has returned; True if any."""
        deliveries = self.deliveries
        released = False
        while deliveries:
            durable, parts, scheduled_at, sends, generation = deliveries[0]
            if durable is not None and not durable.done():
                break
            if sends is not None and sends.handed and not sends.finished:
                break                       # the sender thread wakes us when it has sent
            deliveries.popleft()
            released = True
            error = None
            if durable is not None:
                error = durable.exception()
                if error is not None and not isinstance(error, EngineError):
                    log.error("fsync failed unexpectedly", exc_info=error)
                    error = Unavailable(f"storage failed: {error}")
                now = time.perf_counter()
                if self.metrics and error is None:
                    self.observe_durable(durable, scheduled_at, sends, now)
                waited_s = now - scheduled_at
                if waited_s * 1000 > SLOW_MS:
                    self.slow_log.note("fsync", waited_s * 1000)
            error = self.fail_stopped(durable, generation, error)
            for deliver, value in parts:
                try:
                    deliver(error if error is not None else value)
                except Exception:           # a closed connection must not stop others
                    log.exception("delivering a reply failed")
        return released
