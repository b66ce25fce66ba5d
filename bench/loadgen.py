#!/usr/bin/env python3
"""Scanpay load generator: a separate client process that drives PAY frames
at a server over N connections and records latency in an HdrHistogram.

    .venv/bin/python bench/loadgen.py --port 7411 --traffic pool.npy \\
        --connections 64 --window 16 --records 1 --duration 10 --out result.json

- `--traffic` is a .npy file of PAY_RECORD rows (valid payers, merchants,
  amounts); the generator cycles through it and rewrites every record's `id`
  with a fresh payment id from `--id-base` on, so idempotency never
  short-circuits a payment. Without it, records are synthetic (payer and
  merchant 1..).
- closed loop (default): each connection keeps `--window` frames in flight
  and sends a new one as each reply arrives.
- open loop (`--rate P`, payments per second over all connections): frames
  are due at start + i / frame_rate, sent on a 1 ms tick, regardless of
  replies (up to a backlog cap). Latency is reported both from the actual
  send and from the scheduled time (coordinated omission corrected).
- `--mode raw` (default) builds frames and parses replies with numpy, many
  at a time; `--mode client` uses engine.client.AsyncClient (pay / pay_one)
  to measure what the project's own client achieves.
- `--warmup` seconds run first and are not recorded; then `--duration`
  seconds are measured; the process exits by `--duration + --warmup + 15` s
  whatever happens (hard cap).

Output (stdout, and --out if given): JSON with rate (payments/s), count,
frames, errors (error frames by name), statuses (per-record outcomes),
latency_us {p50, p90, p99, p999, max, mean} from an HdrHistogram.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import socket
import struct
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from hdrh.histogram import HdrHistogram  # noqa: E402

from engine.records import PAY_RECORD, PAY_RESULT  # noqa: E402

HEADER = struct.Struct("<IHHQ")
HEADER_BYTES = 16
OP_HELLO, OP_PAY = 1, 16
FLAG_ERROR = 1
TICK_S = 0.001
HIST_MAX_US = 60_000_000            # 60 s


def frame_dtype(records: int) -> np.dtype:
    return np.dtype([("size", "<u4"), ("op", "<u2"), ("flags", "<u2"), ("rid", "<u8"),
                     ("body", PAY_RECORD, (records,))])


def reply_dtype(records: int) -> np.dtype:
    return np.dtype([("size", "<u4"), ("op", "<u2"), ("flags", "<u2"), ("rid", "<u8"),
                     ("body", PAY_RESULT, (records,))])


class Traffic:
    """PayRecords to send: a pool cycled through, with fresh payment ids."""

    def __init__(self, pool: np.ndarray, id_base: int):
        self.pool = pool
        self.at = 0
        self.next_id = id_base

    def take(self, n: int) -> np.ndarray:
        pool = self.pool
        if self.at + n > len(pool):
            self.at = 0
        if n > len(pool):
            out = pool[np.arange(self.at, self.at + n) % len(pool)]
        else:
            out = pool[self.at:self.at + n]
        self.at += n
        ids = np.arange(self.next_id, self.next_id + n, dtype=np.uint64)
        self.next_id += n
        return out, ids


class Stats:
    def __init__(self, records: int):
        self.records = records
        self.measuring = False
        self.done = False
        self.frames = 0                     # replies counted while measuring
        self.payments = 0
        self.sent_frames = 0
        self.errors = collections.Counter()
        self.statuses = np.zeros(64, np.int64)
        self.lat_send = []                  # ns arrays, while measuring
        self.lat_sched = []

    def record(self, send_ns, sched_ns, now_ns, statuses):
        if not self.measuring:
            return
        self.frames += len(send_ns)
        self.payments += len(send_ns) * self.records
        self.lat_send.append(now_ns - send_ns)
        if sched_ns is not None:
            self.lat_sched.append(now_ns - sched_ns)
        if statuses is not None:
            self.statuses += np.bincount(statuses.reshape(-1), minlength=64)[:64]


class RawConnection(asyncio.Protocol):
    """One connection sending pre-built PAY frames and parsing replies in bulk."""

    def __init__(self, gen: "LoadGen"):
        self.gen = gen
        self.records = gen.records
        self.fdt = gen.fdt
        self.rdt = gen.rdt
        self.reply_size = self.rdt.itemsize
        self.body_size = self.reply_size - HEADER_BYTES
        self.buffer = bytearray()
        self.transport = None
        self.next_rid = 1
        ring = 1 << max(12, (gen.args.window * 4).bit_length())
        self.mask = ring - 1
        self.sent_at = np.zeros(ring, np.int64)
        self.sched_at = np.zeros(ring, np.int64)
        self.inflight = 0
        self.backlog = collections.deque()    # open loop: scheduled times not yet sent
        self.closed = asyncio.get_event_loop().create_future()
        self.paused = False

    def connection_made(self, transport):
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc):
        if not self.closed.done():
            self.closed.set_result(exc)
        if not self.gen.stats.done:
            self.gen.stats.errors["connection_lost"] += 1

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False

    def send(self, k: int, sched_ns=None) -> None:
        """Send k frames now (sched_ns: their scheduled times, open loop)."""
        if k <= 0 or self.transport is None or self.transport.is_closing():
            return
        frames = np.empty(k, self.fdt)
        frames["size"] = self.body_size
        frames["op"] = OP_PAY
        frames["flags"] = 0
        rids = np.arange(self.next_rid, self.next_rid + k, dtype=np.uint64)
        self.next_rid += k
        frames["rid"] = rids
        recs, ids = self.gen.traffic.take(k * self.records)
        body = frames["body"].reshape(-1)
        body[:] = recs
        body["id"] = ids
        now = time.perf_counter_ns()
        slots = (rids & np.uint64(self.mask)).astype(np.int64)
        self.sent_at[slots] = now
        self.sched_at[slots] = now if sched_ns is None else sched_ns
        self.inflight += k
        self.gen.stats.sent_frames += k
        self.transport.write(frames.tobytes())

    def data_received(self, data):
        now = time.perf_counter_ns()
        buf = self.buffer
        buf += data
        done = 0
        at = 0
        stats = self.gen.stats
        view = good = None
        while len(buf) - at >= HEADER_BYTES:
            n = (len(buf) - at) // self.reply_size
            if n:
                view = np.frombuffer(buf, self.rdt, n, at)
                good = (view["size"] == self.body_size) & (view["flags"] == 0)
                if good.all():
                    self.account(view, now)
                    done += n
                    at += n * self.reply_size
                    continue
                first_bad = int(np.argmin(good))
                if first_bad:
                    self.account(view[:first_bad], now)
                    done += first_bad
                    at += first_bad * self.reply_size
                    continue
            # one frame by hand: an error frame, or an incomplete tail
            size, op, flags, rid = HEADER.unpack_from(buf, at)
            end = at + HEADER_BYTES + size
            if len(buf) < end:
                break
            if flags & FLAG_ERROR:
                name = "error"
                try:
                    import msgspec
                    name = msgspec.msgpack.decode(bytes(buf[at + HEADER_BYTES:end])).get(
                        "name", "error")
                except Exception:
                    pass
                if stats.measuring:
                    stats.errors[name] += 1
                self.inflight -= 1
                done += 1
            else:                          # a reply of another size: count it generically
                slot = rid & self.mask
                if stats.measuring:
                    stats.record(self.sent_at[slot:slot + 1], self.sched_at[slot:slot + 1],
                                 now, None)
                self.inflight -= 1
                done += 1
            at = end
        view = good = None                  # release the buffer exports before resizing
        if at:
            del buf[:at]
        if done:
            self.gen.replied(self, done)

    def account(self, view, now):
        slots = (view["rid"] & np.uint64(self.mask)).astype(np.int64)
        self.inflight -= len(view)
        stats = self.gen.stats
        if stats.measuring:
            stats.record(self.sent_at[slots], self.sched_at[slots], now,
                         view["body"]["status"])


class LoadGen:
    def __init__(self, args):
        self.args = args
        self.records = args.records
        self.fdt = frame_dtype(args.records)
        self.rdt = reply_dtype(args.records)
        self.stats = Stats(args.records)
        self.conns: list[RawConnection] = []
        self.backlog_max = args.backlog_max
        pool = load_pool(args.traffic)
        self.traffic = Traffic(pool, args.id_base)
        self.open_loop = args.rate > 0

    async def connect_raw(self):
        loop = asyncio.get_running_loop()
        for _ in range(self.args.connections):
            _, proto = await loop.create_connection(lambda: RawConnection(self),
                                                    self.args.host, self.args.port)
            self.conns.append(proto)

    def replied(self, conn: RawConnection, done: int) -> None:
        if self.stats.done:
            return
        if not self.open_loop:
            conn.send(self.args.window - conn.inflight)
        else:
            self.drain_backlog(conn)

    def drain_backlog(self, conn) -> None:
        room = self.args.window - conn.inflight
        if room <= 0 or not conn.backlog:
            return
        take = []
        while conn.backlog and len(take) < room:
            take.append(conn.backlog.popleft())
        conn.send(len(take), np.array(take, np.int64))

    async def run_raw(self) -> None:
        await self.connect_raw()
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter_ns()
        warm_ns = int(self.args.warmup * 1e9)
        dur_ns = int(self.args.duration * 1e9)
        self.t_measure = t0 + warm_ns
        self.t_end = self.t_measure + dur_ns
        if not self.open_loop:
            for c in self.conns:
                c.send(self.args.window)
        else:
            frame_rate = self.args.rate / self.records
            period_ns = 1e9 / frame_rate
            due_sent = 0
            rr = 0
        while True:
            now = time.perf_counter_ns()
            if not self.stats.measuring and now >= self.t_measure:
                self.stats.measuring = True
                self.measure_started = now
            if now >= self.t_end:
                break
            if self.open_loop:
                due = int((now - t0) / period_ns) + 1
                if due > due_sent:
                    scheds = t0 + (np.arange(due_sent, due, dtype=np.float64) * period_ns
                                   ).astype(np.int64)
                    due_sent = due
                    n = len(self.conns)
                    # round robin: frame i goes to connection (rr + i) % n
                    idx = (np.arange(len(scheds)) + rr) % n
                    rr = (rr + len(scheds)) % n
                    for ci in np.unique(idx):
                        conn = self.conns[ci]
                        mine = scheds[idx == ci]
                        room = max(self.args.window - conn.inflight, 0)
                        if conn.backlog or room < len(mine):
                            for s in mine.tolist():
                                if len(conn.backlog) < self.backlog_max:
                                    conn.backlog.append(s)
                                else:
                                    self.stats.errors["client_backlog_dropped"] += 1
                            self.drain_backlog(conn)
                        else:
                            conn.send(len(mine), mine)
                await asyncio.sleep(TICK_S)
            else:
                await asyncio.sleep(min(0.05, max((self.t_end - now) / 1e9, 0)))
        self.stats.measuring = False
        self.measure_ended = time.perf_counter_ns()
        self.stats.done = True
        # let in-flight replies land (not counted), then close
        deadline = time.monotonic() + 2.0
        while any(c.inflight > 0 for c in self.conns) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for c in self.conns:
            if c.transport is not None:
                c.transport.close()

    async def run_client(self) -> None:
        """The same load through engine.client.AsyncClient."""
        from engine.client import AsyncClient, pay_record  # noqa: F401
        clients = [await AsyncClient.connect(self.args.host, self.args.port)
                   for _ in range(self.args.connections)]
        t0 = time.perf_counter_ns()
        self.t_measure = t0 + int(self.args.warmup * 1e9)
        self.t_end = self.t_measure + int(self.args.duration * 1e9)
        stats = self.stats
        one = self.records == 1

        async def worker(client):
            while not stats.done:
                recs, ids = self.traffic.take(self.records)
                batch = recs.copy()
                batch["id"] = ids
                sent = time.perf_counter_ns()
                try:
                    if one:
                        r = batch[0]
                        res = await client.pay_one(
                            id=int(r["id"]), payer=int(r["payer"]), merchant=int(r["merchant"]),
                            amount=int(r["amount"]), flags=int(r["flags"]),
                            goods_tag=int(r["goods_tag"]), user_data=int(r["user_data"]))
                        statuses = np.array([res.status], np.uint32)
                    else:
                        statuses = (await client.pay(batch))["status"]
                except Exception as e:      # noqa: BLE001
                    if stats.measuring:
                        stats.errors[type(e).__name__] += 1
                    continue
                now = time.perf_counter_ns()
                stats.record(np.array([sent]), None, now, statuses)

        tasks = [asyncio.ensure_future(worker(c)) for c in clients
                 for _ in range(self.args.window)]
        while True:
            now = time.perf_counter_ns()
            if not stats.measuring and now >= self.t_measure:
                stats.measuring = True
                self.measure_started = now
            if now >= self.t_end:
                break
            await asyncio.sleep(0.01)
        stats.measuring = False
        self.measure_ended = time.perf_counter_ns()
        stats.done = True
        await asyncio.wait(tasks, timeout=3)
        for t in tasks:
            t.cancel()
        for c in clients:
            c.close()

    def result(self) -> dict:
        s = self.stats
        elapsed = (self.measure_ended - self.measure_started) / 1e9
        out = {
            "mode": self.args.mode, "connections": self.args.connections,
            "window": self.args.window, "records_per_frame": self.records,
            "target_rate": self.args.rate or None, "loop": "open" if self.open_loop else "closed",
            "duration_s": round(elapsed, 3), "warmup_s": self.args.warmup,
            "count": s.payments, "frames": s.frames,
            "rate": s.payments / elapsed if elapsed > 0 else 0.0,
            "frame_rate": s.frames / elapsed if elapsed > 0 else 0.0,
            "errors": dict(s.errors), "error_count": int(sum(s.errors.values())),
            "statuses": {str(i): int(c) for i, c in enumerate(s.statuses) if c},
            "latency_us": histogram_summary(s.lat_send),
        }
        if s.lat_sched:
            out["latency_from_schedule_us"] = histogram_summary(s.lat_sched)
        out["client_cpu_s"] = round(time.process_time(), 2)
        return out


def histogram_summary(chunks) -> dict:
    """Percentiles in microseconds from an HdrHistogram (3 significant digits).
    Values are recorded as (value, count) pairs of the distinct microsecond
    latencies, which is exact and avoids a Python call per request."""
    hist = HdrHistogram(1, HIST_MAX_US, 3)
    if chunks:
        us = np.concatenate(chunks) // 1000
        us = np.clip(us, 1, HIST_MAX_US)
        values, counts = np.unique(us, return_counts=True)
        for v, c in zip(values.tolist(), counts.tolist()):
            hist.record_value(v, c)
    if hist.get_total_count() == 0:
        return {"p50": None, "p90": None, "p99": None, "p999": None, "max": None, "mean": None,
                "n": 0}
    return {"p50": hist.get_value_at_percentile(50), "p90": hist.get_value_at_percentile(90),
            "p99": hist.get_value_at_percentile(99), "p999": hist.get_value_at_percentile(99.9),
            "max": hist.get_max_value(), "mean": round(hist.get_mean_value(), 1),
            "n": hist.get_total_count()}


def load_pool(path: str | None) -> np.ndarray:
    if path:
        pool = np.load(path)
        if pool.dtype != PAY_RECORD:
            pool = pool.view(PAY_RECORD) if pool.dtype.itemsize == 1 else pool.astype(PAY_RECORD)
        return np.ascontiguousarray(pool)
    pool = np.zeros(65536, PAY_RECORD)
    pool["payer"] = np.arange(65536) % 1000 + 1
    pool["merchant"] = np.arange(65536) % 100 + 1
    pool["amount"] = 100
    return pool


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--window", type=int, default=4, help="frames in flight per connection")
    p.add_argument("--records", type=int, default=8190, help="PayRecords per frame")
    p.add_argument("--rate", type=float, default=0,
                   help="open loop at this many payments/s (0 = closed loop)")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--traffic", help=".npy of PAY_RECORD rows to cycle through")
    p.add_argument("--id-base", dest="id_base", type=int, default=1 << 40)
    p.add_argument("--mode", choices=("raw", "client"), default="raw")
    p.add_argument("--backlog-max", dest="backlog_max", type=int, default=100_000)
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        p.error("loadgen only drives loopback servers")
    hard_cap = int(args.duration + args.warmup + 15)
    signal.signal(signal.SIGALRM, lambda *_: os._exit(3))
    signal.alarm(hard_cap)
    import uvloop
    gen = LoadGen(args)
    uvloop.run(gen.run_raw() if args.mode == "raw" else gen.run_client())
    out = gen.result()
    text = json.dumps(out)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
