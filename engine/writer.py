"""The single writer: coalesces requests from every connection into kernel
batches, journals and applies them in order, and releases each reply once
the fsync covering it has returned (TigerBeetle-style automatic batching).

Work is applied strictly in arrival order. Consecutive PAY (or ISSUE) frames
become one kernel batch of up to `batch_records_max` records, so a busy
server turns many small frames into few large commands and few fsyncs.
"""
import asyncio
import collections
import logging
import time

import numpy as np

from .dispatch import OP_CAPTURE_RECORDS, OP_ISSUE, OP_PAY, OP_REFUND_RECORDS
from .errors import EngineError
from .records import ISSUE_RESULT, PAY_RESULT, REFUND_RESULT
from .status import STATUS_NAMES

log = logging.getLogger("scanpay.writer")

DELIVERIES_INFLIGHT_MAX = 64       # batches applied but awaiting their fsync
RESULT_DTYPES = {OP_PAY: PAY_RESULT, OP_ISSUE: ISSUE_RESULT,
                 OP_CAPTURE_RECORDS: PAY_RESULT, OP_REFUND_RECORDS: REFUND_RESULT}
OP_LABELS = {OP_PAY: "PAY", OP_ISSUE: "ISSUE", OP_CAPTURE_RECORDS: "CAPTURE_RECORDS",
             OP_REFUND_RECORDS: "REFUND_RECORDS"}


class Work:
    """One request for the writer. `deliver(result | EngineError)` runs on the
    event loop once the result may be released."""
    __slots__ = ("op", "body", "records", "spec", "request", "deliver")

    def __init__(self, op, body, deliver, records=0, spec=None, request=None):
        self.op = op
        self.body = body
        self.records = records
        self.spec = spec
        self.request = request
        self.deliver = deliver


class Writer:
    def __init__(self, engine, metrics=None, batch_records_max: int = 8190,
                 queue_records_max: int = 262_144):
        self.engine = engine
        self.metrics = metrics
        self.batch_records_max = batch_records_max
        self.queue_records_max = queue_records_max
        self.queue = collections.deque()
        self.queued_records = 0
        self.wake = asyncio.Event()
        self.deliveries = collections.deque()
        self.stopping = False
        self.task = None

    # -- intake -----------------------------------------------------------

    def submit(self, work: Work) -> bool:
        """Queue work; False when the queue is full (the caller answers busy)."""
        if self.stopping or self.queued_records + max(work.records, 1) > self.queue_records_max:
            return False
        self.queue.append(work)
        self.queued_records += max(work.records, 1)
        self.wake.set()
        return True

    def start(self):
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self):
        """Apply what is queued, release every reply, then stop."""
        self.stopping = True
        self.wake.set()
        if self.task is not None:
            await self.task

    # -- the loop ---------------------------------------------------------

    async def run(self):
        while True:
            if not self.queue:
                if self.stopping:
                    break
                self.wake.clear()
                await self.wake.wait()
                continue
            group = self.take_group()
            self.queued_records -= sum(max(w.records, 1) for w in group)
            if self.metrics:
                self.metrics.queue_records.set(self.queued_records)
            self.process(group)
            while len(self.deliveries) > DELIVERIES_INFLIGHT_MAX:
                await self.deliveries[0]
            await asyncio.sleep(0)          # let connections read, replies go out
        while self.deliveries:
            await self.deliveries.popleft()

    def take_group(self) -> list:
        first = self.queue.popleft()
        group = [first]
        if first.op in RESULT_DTYPES:
            total = first.records
            while (self.queue and self.queue[0].op == first.op
                   and total + self.queue[0].records <= self.batch_records_max):
                work = self.queue.popleft()
                total += work.records
                group.append(work)
        return group

    def process(self, group: list) -> None:
        try:
            if group[0].op in RESULT_DTYPES:
                self.process_records(group)
            elif group[0].spec.writes:
                self.process_map_write(group[0])
            else:
                reply, durable = self.engine.read_command(group[0].spec, group[0].request)
                self.schedule(durable, [(group[0].deliver, reply)])
        except EngineError as error:        # unavailable storage, a refused body
            self.schedule(None, [(w.deliver, error) for w in group])

    def process_records(self, group: list) -> None:
        op = group[0].op
        body = group[0].body if len(group) == 1 else b"".join(w.body for w in group)
        results, durable = self.engine.write_command(op, body)
        if self.metrics:
            self.count_records(op, results)
        at = 0
        parts = []
        for work in group:
            parts.append((work.deliver, results[at:at + work.records]))
            at += work.records
        self.schedule(durable, parts)

    def count_records(self, op, results) -> None:
        self.metrics.batch_records.observe(len(results))
        counts = np.bincount(results["status"])
        for status in np.nonzero(counts)[0]:
            self.metrics.records.labels(OP_LABELS[op], STATUS_NAMES.get(int(status), "?")).inc(
                int(counts[status]))

    def process_map_write(self, work: Work) -> None:
        draws = self.engine.draws_for(work.spec, work.request)
        reply, durable = self.engine.write_command(work.spec.code, work.body, draws)
        self.schedule(durable, [(work.deliver, reply)])

    # -- release ----------------------------------------------------------

    def schedule(self, durable, parts) -> None:
        """Release `parts` after `durable` and after every earlier release, so
        that no reply ever overtakes the fsync of what it depends on."""
        previous = self.deliveries[-1] if self.deliveries else None
        task = asyncio.get_running_loop().create_task(self.release(previous, durable, parts))
        self.deliveries.append(task)
        task.add_done_callback(self.forget)

    def forget(self, task) -> None:
        if self.deliveries and self.deliveries[0] is task:
            self.deliveries.popleft()
        elif task in self.deliveries:
            self.deliveries.remove(task)

    async def release(self, previous, durable, parts) -> None:
        error = None
        if durable is not None:
            started = time.perf_counter()
            try:
                await asyncio.wrap_future(durable)
            except EngineError as e:
                error = e
            if self.metrics:
                self.metrics.fsync_seconds.observe(time.perf_counter() - started)
        if previous is not None:
            await asyncio.shield(previous)
        for deliver, value in parts:
            try:
                deliver(error if error is not None else value)
            except Exception:               # a closed connection must not stop others
                log.exception("delivering a reply failed")
