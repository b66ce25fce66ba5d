"""The server's read path per connection: `Connection.data_received` for a
read holding one PAY frame, the usual read of a gateway under load.

Under open-loop load every connection gets a read per 1 ms tick whatever the
rate (docs/performance-server.md: 64,000 reads a second from 64
connections), so this path's cost is paid per read, not per payment. Runs
in process on a real `Server` (in-memory engine, not listening) with a
transport that drops the bytes; each round is one tick: a one-frame read on
each of 64 connections; between rounds (untimed) the writer's queue is
emptied as if the writer had taken the batch.

    .venv/bin/python -m pytest bench/bench_connection.py -p no:cacheprovider

(Naming the file is enough; with SCANPAY_BENCH=1 or --benchmark-only too,
bench/conftest.py collects it a second time.)
"""
from __future__ import annotations

import asyncio

import numpy as np

from engine import Engine

from engine.protocol import frame
from engine.server.config import Config
from engine.server.connection import Connection
from engine.protocol.ops import OP_PAY
from engine.protocol.records import PAY_RECORD
from engine.server.server import Server

from _common import SUMMARY, machine

CONNECTIONS = 64


class DroppingTransport:
    def write(self, _data) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, _name):
        return None


def test_pay_read_fast_path(benchmark):
    loop = asyncio.new_event_loop()
    try:
        server = Server(Config(data="", listen="127.0.0.1:0"), engine=Engine())
        server.writer.loop = loop
        conns = []
        for _ in range(CONNECTIONS):
            conn = Connection(server)
            conn.transport, conn.loop = DroppingTransport(), loop
            conns.append(conn)
        record = np.zeros(1, PAY_RECORD)
        record["amount"] = 100
        data = frame.encode(OP_PAY, 1, record.tobytes())

        def tick():
            for conn in conns:
                conn.data_received(data)

        def taken():                        # untimed: as if the writer took the batch
            writer = server.writer
            assert writer.queued_records in (0, CONNECTIONS)     # every read took the fast path
            writer.queue.clear()
            writer.queued_records, writer.pay_batch = 0, None
            for conn in conns:
                conn.slots.clear()
                conn.inflight_frames = conn.inflight_bytes = 0
                conn.pay_batch = None

        benchmark.pedantic(tick, setup=taken, rounds=2000, warmup_rounds=100)
        per_read_us = benchmark.stats.stats.min / CONNECTIONS * 1e6
        median_us = benchmark.stats.stats.median / CONNECTIONS * 1e6
        benchmark.extra_info.update(per_read_us_min=round(per_read_us, 3),
                                    per_read_us_median=round(median_us, 3), machine=machine())
        SUMMARY["server read path"] = (f"{median_us:.2f} us per one-frame PAY read "
                                       f"(median; min {per_read_us:.2f} us)")
    finally:
        loop.close()
