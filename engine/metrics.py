"""Prometheus metrics of the server (prometheus-client)."""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("scanpay_requests", "Requests by op and outcome",
                                ["op", "outcome"], registry=r)
        self.records = Counter("scanpay_records", "Records by op and status",
                               ["op", "status"], registry=r)
        self.batch_records = Histogram(
            "scanpay_batch_records", "Records per kernel batch", registry=r,
            buckets=(1, 4, 16, 64, 256, 1024, 4096, 8190))
        self.queue_records = Gauge("scanpay_queue_records", "Records waiting for the writer",
                                   registry=r)
        self.fsync_seconds = Histogram(
            "scanpay_fsync_seconds", "Journal sync latency", registry=r,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5))
        self.connections = Gauge("scanpay_connections", "Open connections", registry=r)

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)
