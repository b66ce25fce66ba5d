"""Prometheus metrics of the server (prometheus-client)."""
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily

from .status import STATUS_NAMES

STATUS_SLOTS = 64                   # status codes are small; larger ones count as the last


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


class Metrics:
    def __init__(self, record_ops: dict[int, str]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("scanpay_requests", "Requests by op and outcome",
                                ["op", "outcome"], registry=r)
        self.records = RecordCounts(record_ops)
        r.register(self.records)
        self.batch_records = Histogram(
            "scanpay_batch_records", "Records per kernel batch", registry=r,
            buckets=(1, 4, 16, 64, 256, 1024, 4096, 8190))
        self.queue_records = Gauge("scanpay_queue_records", "Records waiting for the writer",
                                   registry=r)
        self.fsync_seconds = Histogram(
            "scanpay_fsync_seconds", "Journal sync latency", registry=r,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5))
        self.connections = Gauge("scanpay_connections", "Open connections", registry=r)
        # One write of a connection's share of a PAY batch: by the sender thread
        # right after the fsync, or by the event loop (TLS, replies queued
        # behind others, a full socket buffer). See ext/outlet.pyx.
        self.pay_reply_writes = Counter(
            "scanpay_pay_reply_writes", "Writes of PAY replies by sender", ["sender"], registry=r)
        self.pay_reply_writes_sender = self.pay_reply_writes.labels("sender_thread")
        self.pay_reply_writes_loop = self.pay_reply_writes.labels("event_loop")

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)
