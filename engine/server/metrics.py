"""Prometheus metrics of the server (prometheus-client)."""
import bisect

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

from engine.protocol.limits import BATCH_RECORDS_MAX
from engine.protocol.status import STATUS_NAMES

STATUS_SLOTS = 64                   # status codes are small; larger ones count as the last
STAGE_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.004,
                   0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.5)
REQUEST_BUCKETS_S = STAGE_BUCKETS_S + (1.0, 5.0)   # a map op (AUDIT) can take seconds
# scanpay_stage_seconds{stage}: each is observed once per kernel batch, except
# `send`, once per fsync whose PAY replies the sender thread sent.
STAGES = (
    "queue",        # its first request read (or submitted) -> the writer takes the batch
    "apply",        # taken -> journaled, applied by the kernel, replies built and queued
    "commit",       # applied -> the fsync that covers it returned (commit window included)
    "send",         # that fsync returned -> the sender thread has sent its PAY replies
    "release",      # that fsync returned -> the event loop released the batch's replies
)


class RecordCounts:
    """Records by op and status: one bincount per kernel batch, turned into
    a labelled counter only when Prometheus scrapes. (A labelled counter's
    inc() per status per batch cost more than the kernel spends on a small
    batch.)"""

    def __init__(self, op_names: dict[int, str]):
        self.op_names = op_names
        self.row_of = {op: row for row, op in enumerate(op_names)}
        self.counts = np.zeros((len(op_names), STATUS_SLOTS), np.int64)

    def add(self, op: int, statuses: np.ndarray) -> None:
        self.counts[self.row_of[op]] += np.bincount(
            np.minimum(statuses, STATUS_SLOTS - 1), minlength=STATUS_SLOTS)

    def collect(self):
        family = CounterMetricFamily("scanpay_records", "Records by op and status",
                                     labels=["op", "status"])
        counts = self.counts.copy()         # the writer keeps adding meanwhile
        for row, name in enumerate(self.op_names.values()):
            for status in np.nonzero(counts[row])[0].tolist():
                family.add_metric([name, STATUS_NAMES.get(status, str(status))],
                                  int(counts[row, status]))
        yield family


class FastHistogram:
    """One histogram series kept as plain bucket counts, folded into a
    Prometheus family only when scraped: observe() costs a bisect and two
    additions (a prometheus-client Histogram.observe measured 2.1 us here,
    and the writer makes five per batch). Observed from the event loop only."""
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)   # the last one: over every bound
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def observe_n(self, seconds: float, n: int) -> None:
        """`n` observations of the same duration (a batch's frames)."""
        self.counts[bisect.bisect_left(self.bounds, seconds)] += n
        self.sum += seconds * n

    def buckets(self) -> list:
        """Cumulative (le, count) pairs, as Prometheus wants them."""
        out, total = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts):
            total += count
            out.append((bound, total))
        return out


class StageSeconds:
    """scanpay_stage_seconds{stage} and scanpay_fsync_seconds (see STAGES)."""

    def __init__(self):
        self.stage = {name: FastHistogram(STAGE_BUCKETS_S) for name in STAGES}
        self.fsync = FastHistogram(STAGE_BUCKETS_S)

    def collect(self):
        fsync = HistogramMetricFamily("scanpay_fsync_seconds",
                                      "Journal write + fdatasync, per group-commit fsync")
        fsync.add_metric([], self.fsync.buckets(), self.fsync.sum)
        yield fsync
        stages = HistogramMetricFamily("scanpay_stage_seconds",
                                       "Time per stage of a batch's way through the writer",
                                       labels=["stage"])
        for name, histogram in self.stage.items():
            stages.add_metric([name], histogram.buckets(), histogram.sum)
        yield stages


class Requests:
    """scanpay_requests_total{op,outcome} (every request frame: `ok` or its
    error code's name) and scanpay_request_seconds{op} (from the frame's
    read to its reply handed over), kept as plain counts and FastHistograms
    and folded into families at scrape: a prometheus-client labels().inc()
    per frame would cost more than a small request's whole handling. PAY
    frames of the fast path are observed once per batch, each frame with the
    batch's time (from its first frame's read). Observed from the event loop
    only; a scrape copies (dict and list copies hold the GIL)."""

    def __init__(self):
        self.counts = {}                    # (op, outcome) -> frames
        self.seconds = {}                   # op -> FastHistogram

    def count(self, op: str, outcome: str, frames: int = 1) -> None:
        """Frames answered with no read time to report (a stream error)."""
        key = (op, outcome)
        self.counts[key] = self.counts.get(key, 0) + frames

    def observe(self, op: str, outcome: str, seconds: float, frames: int = 1) -> None:
        key = (op, outcome)
        self.counts[key] = self.counts.get(key, 0) + frames
        histogram = self.seconds.get(op)
        if histogram is None:
            histogram = self.seconds[op] = FastHistogram(REQUEST_BUCKETS_S)
        histogram.observe_n(seconds, frames)

    def collect(self):
        family = CounterMetricFamily("scanpay_requests", "Request frames by op and outcome",
                                     labels=["op", "outcome"])
        for (op, outcome), frames in sorted(dict(self.counts).items()):
            family.add_metric([op, outcome], frames)
        yield family
        seconds = HistogramMetricFamily(
            "scanpay_request_seconds", "From a request frame's read to its reply handed over",
            labels=["op"])
        for op, histogram in sorted(dict(self.seconds).items()):
            seconds.add_metric([op], histogram.buckets(), histogram.sum)
        yield seconds


class Metrics:
    def __init__(self, record_ops: dict[int, str]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Requests()
        r.register(self.requests)
        self.records = RecordCounts(record_ops)
        r.register(self.records)
        self.batch_records = Histogram(
            "scanpay_batch_records", "Records per kernel batch", registry=r,
            buckets=(1, 4, 16, 64, 256, 1024, 4096, BATCH_RECORDS_MAX))
        self.queue_records = Gauge("scanpay_queue_records", "Records waiting for the writer",
                                   registry=r)
        # Where a request's time goes in the server, stage by stage, per
        # kernel batch (engine/server/writer.py): its latency budget, to set beside
        # what clients measure end to end; and each fsync's own duration.
        stage_seconds = StageSeconds()
        r.register(stage_seconds)
        self.stage = stage_seconds.stage
        self.fsync_seconds = stage_seconds.fsync
        self.connections = Gauge("scanpay_connections", "Open connections", registry=r)
        # One write of a connection's share of a PAY batch: by the sender thread
        # right after the fsync, or by the event loop (TLS, replies queued
        # behind others, a full socket buffer). See ext/outlet.pyx.
        self.pay_reply_writes = Counter(
            "scanpay_pay_reply_writes", "Writes of PAY replies by sender", ["sender"], registry=r)
        self.pay_reply_writes_sender = self.pay_reply_writes.labels("sender_thread")
        self.pay_reply_writes_loop = self.pay_reply_writes.labels("event_loop")
        self.pay_reply_writes_sync = self.pay_reply_writes.labels("sync_thread")
        self.commit_waits = Counter(
            "scanpay_commit_waits", "Fsyncs that waited for the group-commit window "
            "(commit_interval_us, commit_siblings)", registry=r)
        self.lone_syncs = Counter(
            "scanpay_lone_syncs", "Fsyncs of a lone request on an idle journal, made by "
            "the lone-sync thread (lone_sync)", registry=r)

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)
