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
  are due at start + i / frame_rate and handed out round robin on a
  `--tick-us` tick (one send per connection per tick), regardless of replies;
  a connection with `--window` frames in flight keeps the rest in a bounded
  backlog. Latency is reported from the actual send and from the scheduled
  time (coordinated omission corrected; includes up to one tick of pacing).
- `--mode raw` (default) runs the connections in the Cython loop
  bench/_loadgen.pyx (built on first use by bench/build_loadgen.py): epoll,
  send and recv with the GIL released, no Python object per frame, so the generator is not the bottleneck it was in Python.
  `--mode client` drives the same load through engine.client.AsyncClient
  (pay / pay_one) to measure what the project's own client achieves.
- `--warmup` seconds run first and are not recorded; then `--duration`
  seconds are measured; the process is killed by SIGALRM at `--duration +
  --warmup + 15` s whatever happens (hard cap).

The server must not require authentication (the benchmark's loopback
server does not); raw mode sends no HELLO.

Output (stdout, and --out if given): JSON with rate (payments/s), count,
frames, errors (error frames by name), statuses (per-record outcomes),
latency_us {p50, p90, p99, p999, max, mean} from an HdrHistogram, and
client_cpu_s (this process's CPU time).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import socket
import sys
import time

import msgspec
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from hdrh.histogram import HdrHistogram  # noqa: E402

from bench.build_loadgen import import_loop  # noqa: E402
from engine.protocol.limits import BATCH_RECORDS_MAX  # noqa: E402
from engine.protocol.records import PAY_RECORD  # noqa: E402

_loop = import_loop()       # bench/_loadgen.pyx, built on first use
HISTOGRAM_US_MAX, Loop = _loop.HISTOGRAM_US_MAX, _loop.Loop

OP_PAY = 16
STATUS_SLOTS = 64


def connect(args) -> list[socket.socket]:
    socks = []
    for _ in range(args.connections):
        if args.unix:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(10)
            sock.connect(args.unix)
        else:
            sock = socket.create_connection((args.host, args.port), timeout=10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        socks.append(sock)
    return socks


def run_raw(args) -> dict:
    pool = load_pool(args.traffic)
    socks = connect(args)
    try:
        loop = Loop([s.fileno() for s in socks], pool.view(np.uint8).reshape(len(pool), -1),
                    args.id_base, args.records, args.window, args.backlog_max, OP_PAY)
        cpu0 = time.process_time()
        got = loop.run(args.rate, args.tick_us, args.warmup, args.duration)
        cpu = time.process_time() - cpu0
    finally:
        for s in socks:
            s.close()
    errors = collections.Counter(error_name(body) for body in got["error_samples"])
    unnamed = got["error_count"] - sum(errors.values())
    if unnamed:
        errors["(more error frames)"] = unnamed
    for key in ("connection_lost", "backlog_dropped", "bad_replies"):
        if got[key]:
            errors[key] = got[key]
    elapsed = got["measured_s"]
    out = {
        "mode": "raw", "transport": "unix" if args.unix else "tcp",
        "connections": args.connections, "window": args.window,
        "records_per_frame": args.records, "target_rate": args.rate or None,
        "loop": "open" if args.rate > 0 else "closed", "tick_us": args.tick_us,
        "duration_s": round(elapsed, 3), "warmup_s": args.warmup,
        "count": got["payments"], "frames": got["frames"], "sent_frames": got["sent_frames"],
        "rate": got["payments"] / elapsed if elapsed > 0 else 0.0,
        "frame_rate": got["frames"] / elapsed if elapsed > 0 else 0.0,
        "errors": dict(errors), "error_count": int(sum(errors.values())),
        "statuses": {str(i): int(c) for i, c in enumerate(got["statuses"]) if c},
        "latency_us": summary_from_counts(got["hist_send_us"], got["max_send_us"]),
        "client_cpu_s": round(cpu, 2),
    }
    if args.rate > 0:
        out["latency_from_schedule_us"] = summary_from_counts(got["hist_sched_us"],
                                                              got["max_sched_us"])
    return out


def error_name(body: bytes) -> str:
    try:
        return str(msgspec.msgpack.decode(body).get("name", "error"))
    except Exception:                       # noqa: BLE001 (a truncated sample)
        return "error"


def summary_from_counts(counts: np.ndarray, max_us: int) -> dict:
    """Percentiles in microseconds from an HdrHistogram (3 significant
    digits), fed with the exact per-microsecond counts as (value, count)
    pairs; the maximum is the true one even past the last bucket."""
    values = np.nonzero(counts)[0]
    return summarise(values, counts[values], max_us)


def summarise(values: np.ndarray, counts: np.ndarray, max_us: int | None = None) -> dict:
    hist = HdrHistogram(1, max(HISTOGRAM_US_MAX, int(max_us or 0)) + 1, 3)
    for v, c in zip(values.tolist(), counts.tolist()):
        hist.record_value(max(int(v), 1), int(c))
    if hist.get_total_count() == 0:
        return {"p50": None, "p90": None, "p99": None, "p999": None, "max": None, "mean": None,
                "n": 0}
    return {"p50": hist.get_value_at_percentile(50), "p90": hist.get_value_at_percentile(90),
            "p99": hist.get_value_at_percentile(99), "p999": hist.get_value_at_percentile(99.9),
            "max": int(max_us) if max_us else hist.get_max_value(),
            "mean": round(hist.get_mean_value(), 1), "n": hist.get_total_count()}


async def run_client(args) -> dict:
    """The same closed-loop load through engine.client.AsyncClient."""
    from engine.client import AsyncClient
    pool = load_pool(args.traffic)
    clients = [await AsyncClient.connect(args.host, args.port)
               for _ in range(args.connections)]
    latencies_us: list[int] = []
    statuses = np.zeros(STATUS_SLOTS, np.int64)
    errors = collections.Counter()
    state = {"measuring": False, "done": False, "at": 0, "next_id": args.id_base, "frames": 0}

    def take(n: int) -> np.ndarray:
        rows = np.arange(state["at"], state["at"] + n) % len(pool)
        state["at"] = (state["at"] + n) % len(pool)
        batch = pool[rows].copy()
        batch["id"] = np.arange(state["next_id"], state["next_id"] + n, dtype=np.uint64)
        state["next_id"] += n
        return batch

    async def worker(client):
        while not state["done"]:
            batch = take(args.records)
            sent = time.perf_counter_ns()
            try:
                if args.records == 1:
                    r = batch[0]
                    res = await client.pay_one(
                        id=int(r["id"]), payer=int(r["payer"]), merchant=int(r["merchant"]),
                        amount=int(r["amount"]), flags=int(r["flags"]),
                        goods_tag=int(r["goods_tag"]), user_data=int(r["user_data"]))
                    got = np.array([res.status], np.int64)
                else:
                    got = (await client.pay(batch))["status"].astype(np.int64)
            except Exception as e:          # noqa: BLE001
                if state["measuring"]:
                    errors[type(e).__name__] += 1
                continue
            if state["measuring"]:
                latencies_us.append((time.perf_counter_ns() - sent) // 1000)
                statuses[:] += np.bincount(np.minimum(got, STATUS_SLOTS - 1),
                                           minlength=STATUS_SLOTS)
                state["frames"] += 1

    cpu0 = time.process_time()
    tasks = [asyncio.ensure_future(worker(c)) for c in clients for _ in range(args.window)]
    await asyncio.sleep(args.warmup)
    state["measuring"] = True
    started = time.perf_counter()
    await asyncio.sleep(args.duration)
    state["measuring"] = False
    elapsed = time.perf_counter() - started
    state["done"] = True
    await asyncio.wait(tasks, timeout=3)
    for t in tasks:
        t.cancel()
    for c in clients:
        c.close()
    values, counts = np.unique(np.array(latencies_us, np.int64), return_counts=True)
    payments = state["frames"] * args.records
    return {
        "mode": "client", "connections": args.connections, "window": args.window,
        "records_per_frame": args.records, "target_rate": None, "loop": "closed",
        "duration_s": round(elapsed, 3), "warmup_s": args.warmup,
        "count": payments, "frames": state["frames"], "rate": payments / elapsed,
        "frame_rate": state["frames"] / elapsed,
        "errors": dict(errors), "error_count": int(sum(errors.values())),
        "statuses": {str(i): int(c) for i, c in enumerate(statuses) if c},
        "latency_us": summarise(values, counts, int(values.max()) if len(values) else None),
        "client_cpu_s": round(time.process_time() - cpu0, 2),
    }


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
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--unix", default="", help="a Unix socket path instead of TCP (raw mode)")
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--window", type=int, default=4, help="frames in flight per connection")
    p.add_argument("--records", type=int, default=BATCH_RECORDS_MAX, help="PayRecords per frame")
    p.add_argument("--rate", type=float, default=0,
                   help="open loop at this many payments/s (0 = closed loop)")
    p.add_argument("--tick-us", dest="tick_us", type=int, default=1000,
                   help="open loop: frames due are sent every this many microseconds")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--traffic", help=".npy of PAY_RECORD rows to cycle through")
    p.add_argument("--id-base", dest="id_base", type=int, default=1 << 40)
    p.add_argument("--mode", choices=("raw", "client"), default="raw")
    p.add_argument("--backlog-max", dest="backlog_max", type=int, default=100_000,
                   help="open loop: due frames a connection may hold back")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        p.error("loadgen only drives loopback servers")
    if not args.port and not args.unix:
        p.error("give --port (TCP) or --unix PATH")
    if args.unix and args.mode != "raw":
        p.error("--unix works in raw mode only")
    if args.tick_us < 1 or args.window < 1 or args.connections < 1 or args.records < 1:
        p.error("--tick-us, --window, --connections and --records must be at least 1")
    # Hard cap: SIGALRM's default action ends the process, even inside the
    # GIL-free loop where no Python handler could run.
    signal.alarm(int(args.duration + args.warmup + 15))
    if args.mode == "raw":
        out = run_raw(args)
    else:
        import uvloop
        out = uvloop.run(run_client(args))
    text = json.dumps(out)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
