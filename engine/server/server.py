"""The socket server: asyncio on uvloop, TCP and Unix sockets, optional TLS.

Data path: socket -> frame (engine/protocol/frame.py) -> connection (requests, limits,
ordered replies) -> writer (batching, journal, kernel) -> reply after fsync.
"""
import asyncio
import gc
import json
import logging
import signal
import ssl
import sys
import time

import numpy as np

from engine.protocol.auth import Authenticator
from engine.server.config import Config, is_loopback
from engine.server.connection import Connection
from engine.core.engine import Engine, wall_clock_ms
from engine.server.metrics import Metrics
from engine.server.writer import OP_LABELS, Writer

log = logging.getLogger("scanpay.server")
SERVER_NAME = "scanpay/0.1"
GIL_SWITCH_INTERVAL_S = 0.0002     # see serve()


class SettableClock:
    """The engine clock: the wall clock, or a test clock moved by CLOCK."""

    def __init__(self, test: bool):
        self.test = test
        self.now_ms = wall_clock_ms()

    def __call__(self) -> int:
        return self.now_ms if self.test else wall_clock_ms()

    def set(self, now_ms: int) -> None:
        assert self.test
        self.now_ms = now_ms


class Server:
    def __init__(self, config: Config, engine: Engine | None = None):
        self.config = config
        self.clock = SettableClock(config.test_clock)
        # Replicated (docs/replication.md): the journal is the NATS stream.
        self.node = None
        options = {}
        if config.replicate:
            if engine is not None:
                raise ValueError("a replicated server makes its own engine")
            from engine.replication.node import ReplicaNode
            self.node = ReplicaNode(config)
            options["journal"] = self.node.log
        try:
            self.engine = engine or self.make_engine(config, options)
        except BaseException:
            if self.node is not None:
                self.node.log.close()
                self.node.close()
            raise
        if engine is not None:
            engine.clock = self.clock if config.test_clock else engine.clock
        self.auth = Authenticator(config.keys)
        self.metrics = Metrics(OP_LABELS)
        self.writer = Writer(self.engine, self.metrics, config.batch_records_max,
                             config.queue_records_max, config.frame_bytes_max,
                             config.direct_replies, config.lone_sync)
        if self.node is not None:
            self.writer.position = self.node.position
        self.connections = set()
        self.unauthenticated = {}           # with keys, no HELLO yet: oldest first
        self.reserved = set()               # in the admin reserve (admit_unauthenticated)
        self.listeners = []
        self.scopes = {}
        self.stopped = asyncio.Event()
        self.iso8583 = None      # the [iso8583] adapter, when configured

    def make_engine(self, config: Config, options: dict) -> Engine:
        return Engine(config.data, clock=self.clock,
                      snapshot_every_entries=config.snapshot_every_entries,
                      snapshot_every_mb=config.snapshot_every_mb,
                      snapshot_mb_per_s=config.snapshot_mb_per_s or None,
                      commit_interval_us=config.commit_interval_us,
                      commit_siblings=config.commit_siblings,
                      journal_prealloc=config.journal_prealloc,
                      io_threads_nice=config.io_threads_nice,
                      capacity=config.capacity, **options)

    def hello_reply(self) -> dict:
        return {"protocol": 1, "server": SERVER_NAME, "max_frame": self.config.frame_bytes_max,
                "max_batch": self.config.batch_records_max,
                "durability": "fsync" if self.engine.storage else "none",
                "currency": self.engine.currency, "tz_offset_ms": self.engine.state.tz_offset_ms,
                "hold_ms": self.engine.hold_ms, "test_clock": self.config.test_clock,
                **(self.node.hello() if self.node is not None else {})}

    def write_refusal(self):
        """None, or the error a write gets now without being queued: a
        replicated node that does not lead, or whose stream does not answer."""
        return self.node.write_refusal() if self.node is not None else None

    def scope_array(self, identity) -> np.ndarray:
        key = identity.key_id
        if key not in self.scopes:
            self.scopes[key] = np.array(sorted(identity.merchants), np.uint64)
        return self.scopes[key]

    # -- connections ------------------------------------------------------

    def admit(self, connection) -> bool:
        if self.auth.required:
            return self.admit_unauthenticated(connection)
        if len(self.connections) >= self.config.connections_max:
            return False
        self.connections.add(connection)
        self.metrics.connections.set(len(self.connections))
        return True

    def admit_unauthenticated(self, connection) -> bool:
        """With keys, a new connection is unauthenticated until its HELLO.
        When unauthenticated_max of them wait, or every slot is taken while
        some wait, the oldest waiting one is closed to make room: a client
        that authenticates promptly gets in unless a flood opens that many
        connections during its handshake. When authenticated connections
        take every slot, a newcomer can still take one of admin_reserve
        slots, where only an admin's HELLO keeps it (Connection.hello_reserved):
        the operator is never locked out."""
        config = self.config
        if self.unauthenticated and (len(self.unauthenticated) >= config.unauthenticated_max
                                     or len(self.connections) >= config.connections_max):
            oldest = next(iter(self.unauthenticated))
            oldest.evict()
            self.connections.discard(oldest)    # its slot is the newcomer's (forget: no-op)
        if len(self.connections) >= config.connections_max:
            if len(self.reserved) >= config.admin_reserve:
                return False
            self.reserved.add(connection)
            connection.reserved = True
        else:
            self.unauthenticated[connection] = None
        self.connections.add(connection)
        self.metrics.connections.set(len(self.connections))
        return True

    def hello_done(self, connection) -> None:
        """`connection` no longer waits for its HELLO: it sent a valid one, or
        it is being closed."""
        self.unauthenticated.pop(connection, None)

    def forget(self, connection) -> None:
        self.connections.discard(connection)
        self.unauthenticated.pop(connection, None)
        self.reserved.discard(connection)
        self.metrics.connections.set(len(self.connections))

    def count(self, op_name: str, outcome: str, frames: int = 1) -> None:
        """Frames answered outside a reply slot (stream errors): counted in
        scanpay_requests_total; slots are observed by Connection.complete."""
        self.metrics.requests.count(op_name, outcome, frames)

    # -- lifecycle --------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.writer.start()
        self.writer.task.add_done_callback(self.writer_ended)
        tls = self.tls_context()
        if self.config.listen:
            host, port = self.config.host_port
            listener = await loop.create_server(lambda: Connection(self), host, port, ssl=tls,
                                                reuse_address=True)
            self.listeners.append(listener)
            self.config.listen = f"{host}:{listener.sockets[0].getsockname()[1]}"
        if self.config.unix:
            listener = await loop.create_unix_server(lambda: Connection(self), self.config.unix,
                                                     ssl=tls)
            self.listeners.append(listener)
        if self.config.iso8583:
            from engine.iso8583 import start_beside
            self.iso8583 = await start_beside(self.config.iso8583, self.config.listen,
                                              self.metrics.registry)
        if self.config.metrics:
            host, _, port = self.config.metrics.rpartition(":")
            self.metrics.serve(host, int(port))
        if self.node is not None:
            self.node.start(self.engine, self.config.listen or self.config.unix)
        log.info("serving", extra={"fields": {
            "listen": self.config.listen, "unix": self.config.unix, "tls": tls is not None,
            "data": self.config.data, "test_clock": self.config.test_clock,
            "auth": self.auth.required, "counts": self.engine.counts()}})
        self.warn_exposure(tls is not None)
        if self.config.test_clock:
            log.warning("TEST CLOCK enabled: CLOCK sets the engine time; never use in production")

    def warn_exposure(self, tls: bool) -> None:
        """One loud line for each setting that exposes the server off this
        host in a way an operator should know about (config.check refuses
        the worse ones outright)."""
        if self.config.listen and not tls:
            host, _port = self.config.host_port
            if not is_loopback(host):
                log.warning("INSECURE: listening on %s without TLS: payments and HELLO "
                            "MACs cross the network in clear; set tls_cert and tls_key",
                            self.config.listen)
        if self.config.metrics and not self.auth.required:
            host = self.config.metrics.rpartition(":")[0].strip("[]")
            if not is_loopback(host):
                log.warning("INSECURE: metrics on %s, a non-loopback address, on a server "
                            "with no keys: anyone who reaches it sees its traffic; bind "
                            "metrics to 127.0.0.1", self.config.metrics)

    def tls_context(self):
        if not self.config.tls_cert:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        return context

    def writer_ended(self, task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.critical("the writer failed; stopping", exc_info=task.exception())
            self.stopped.set()

    async def stop(self) -> None:
        """Stop accepting, apply and fsync what is in flight, reply, close."""
        for listener in self.listeners:
            listener.close()
        for listener in self.listeners:
            await listener.wait_closed()
        if self.iso8583 is not None:
            await self.iso8583.stop()
        if self.node is not None:
            # An append the stream does not answer would hold the writer's
            # stop for ever: the node stops without its replies instead.
            self.node.log.closing = True
        await self.writer.stop()
        if self.node is not None:
            await self.node.stop()          # gives the lease up: a follower takes over now
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()
        self.engine.close()
        if self.node is not None:
            self.node.close()
        log.info("stopped")

    async def run_until_signal(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopped.set)
        await self.start()
        # What exists now (modules, the recovered state) lives as long as the
        # server: keep it out of the collector's full scans, which would
        # otherwise stall every reply for tens of milliseconds now and then.
        gc.collect()
        gc.freeze()
        await self.stopped.wait()
        await self.stop()


class JsonFormatter(logging.Formatter):
    def format(self, record) -> str:
        entry = {"ts": round(time.time(), 3), "level": record.levelname.lower(),
                 "logger": record.name, "msg": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        return f"{text} {json.dumps(fields, default=str)}" if fields else text


def setup_logging(log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def serve(config: Config) -> int:
    import uvloop
    # The fsync thread needs the GIL for a few microseconds around each
    # fdatasync; a busy event loop would make it wait the default 5 ms switch
    # interval each time, and every durable reply with it.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    setup_logging(config.log_format)
    server = Server(config)
    uvloop.run(server.run_until_signal())
    return 0
