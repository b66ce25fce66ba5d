#!/usr/bin/env python3
"""Group commit, the fixed window against the adaptive rule, side by side in
one run (engine/core/group_commit.py; issue 16).

    .venv/bin/python bench/bench_commit.py [--seconds 5] [--rounds 2] [--out r.json]
    .venv/bin/python bench/bench_commit.py --compare lone     # lone_sync off / on

`scanpay serve` on loopback with a world built over the socket and the
default `commit_interval_us` (1500), in two settings: "fixed" with
`commit_siblings = 0` (every fsync starts at least the window after the
previous one started: the rule before issue 16) and "adaptive" with the
default `commit_siblings`. Each scenario is measured in both settings in
turn, `--rounds` times, in ABBA order (fixed, adaptive, adaptive, fixed,
...): a run can meet the writeback of the one before it, so neither setting
always goes second; `--compare lone` compares `lone_sync = false` (every
fsync on the sync thread) with the default (a lone request's fsync on the
lone-sync thread, engine/server/lone_sync.py) the same way; before each run the disk is synced and the machine
rests `--pause` seconds. Every figure is printed per round.

Every run is on a fresh server (one server at a time: the payments table
is allocated up front, and the machine's memory is shared), so no run
inherits another's journal or snapshot.

Scenarios (bench/loadgen.py, a separate client process):
- one caller, one payment at a time: `AsyncClient.pay_one` on one
  connection, closed loop (`--mode client --connections 1 --window 1`), and
  the same with the raw Cython generator;
- many callers: 16 connections x 64 single-record frames in flight, closed
  loop;
- open loop at 100 k/s: 64 connections, single-record frames;
- batched: frames of 8,190 records, 4 connections x 2 in flight (at most 2 s).
Reported: payments/s, latency p50 / p99 (ms), and from the server's metrics
the fsyncs a second, how many of them waited for the window
(`scanpay_commit_waits_total`) and the mean kernel batch.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_server as bs  # noqa: E402
from engine.demo import world as world_module  # noqa: E402
from engine.demo.world import World, build, pay_batches  # noqa: E402
from engine.protocol.limits import BATCH_RECORDS_MAX  # noqa: E402

# --compare -> {setting name: its [server] lines}; the first is "before".
COMPARISONS = {
    "commit": {"fixed": "commit_siblings = 0\n", "adaptive": ""},
    "lone": {"threaded": "lone_sync = false\n", "lone": ""},
}
# name -> (loadgen arguments, payments table capacity, longest measured seconds):
# each run on a fresh server (one at a time: the machine's memory is shared).
SCENARIOS = {
    "one caller, pay_one, 1 in flight": (
        dict(records=1, connections=1, window=1, mode="client"), 200_000, 60),
    "one caller, raw, 1 in flight": (dict(records=1, connections=1, window=1), 200_000, 60),
    "16 conns x 64 in flight": (dict(records=1, connections=16, window=64), 2_500_000, 5),
    "open loop 100k/s, 64 conns": (
        dict(records=1, connections=64, window=64, rate=100_000), 1_000_000, 6),
    "batched 8190/frame, 4 conns x 2": (
        dict(records=BATCH_RECORDS_MAX, connections=4, window=2), 3_000_000, 2),
}
ROUNDS_MAX = 10
WARMUP_S = 1.0


def start(root: str, settings: str, spec: World, capacity_payments: int):
    """A server with these [server] `settings`, its world built; (server, pool path)."""
    os.makedirs(root)
    config = os.path.join(root, "scanpay.toml")
    with open(config, "w") as f:
        f.write("[server]\n" + settings)
    bs.SERVER_ARGS = ["--config", config]
    server = bs.ServerProcess(os.path.join(root, "data"), capacity_payments=capacity_payments)
    try:
        world_module.MAP_ITEMS_PER_CALL = bs.MAP_ITEMS_OVER_SOCKET
        remote = bs.SocketEngine(server.port)
        try:
            info = build(remote, spec)
        finally:
            remote.close()
        pool = np.concatenate(list(pay_batches(info, 32, seed=99, start_payment_id=1)))
        pool_path = os.path.join(root, "pool.npy")
        np.save(pool_path, pool)
    except BaseException:
        server.stop()
        raise
    return server, pool_path


def loadgen(server, pool_path: str, id_base: int, seconds: float, records: int,
            connections: int, window: int, rate: float = 0, mode: str = "raw") -> dict:
    cmd = [bs.PYTHON, bs.LOADGEN, "--port", str(server.port), "--traffic", pool_path,
           "--id-base", str(id_base), "--records", str(records), "--connections",
           str(connections), "--window", str(window), "--duration", str(seconds),
           "--warmup", str(WARMUP_S), "--mode", mode]
    if rate:
        cmd += ["--rate", str(int(rate))]
    proc = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True,
                          timeout=seconds + WARMUP_S + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(server, pool_path: str, id_base: int, seconds: float, kw: dict) -> dict:
    f_n0 = server.metric("scanpay_fsync_seconds_count")
    w_n0 = server.metric("scanpay_commit_waits_total")
    l_n0 = server.metric("scanpay_lone_syncs_total")
    b_sum0, b_n0 = (server.metric("scanpay_batch_records_sum"),
                    server.metric("scanpay_batch_records_count"))
    out = loadgen(server, pool_path, id_base, seconds, **kw)
    wall = out["duration_s"] + out["warmup_s"]
    b_n = server.metric("scanpay_batch_records_count") - b_n0
    lat = out["latency_us"]
    errors = sum(out.get("errors", {}).values()) if isinstance(out.get("errors"), dict) else 0
    return {"rate": round(out["rate"]), "p50_ms": lat["p50"] / 1000, "p99_ms": lat["p99"] / 1000,
            "fsyncs_per_s": round((server.metric("scanpay_fsync_seconds_count") - f_n0) / wall),
            "waits_per_s": round((server.metric("scanpay_commit_waits_total") - w_n0) / wall),
            "lone_per_s": round((server.metric("scanpay_lone_syncs_total") - l_n0) / wall),
            "mean_batch": round((server.metric("scanpay_batch_records_sum") - b_sum0) / b_n, 1)
            if b_n else None, "errors": errors}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run")
    p.add_argument("--rounds", type=int, default=2, help=f"alternations (<= {ROUNDS_MAX})")
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--scenarios", default="", help="comma-separated substrings; default all")
    p.add_argument("--pause", type=float, default=3.0,
                   help="seconds of rest (after a sync) before each run (default 3)")
    p.add_argument("--out", help="also write every figure as JSON here")
    p.add_argument("--compare", choices=sorted(COMPARISONS), default="commit",
                   help="commit: the fixed window vs adaptive (default); lone: lone_sync off vs on")
    args = p.parse_args(argv)
    if not 1 <= args.rounds <= ROUNDS_MAX or args.seconds <= 0 or not 0 <= args.pause <= 60:
        p.error(f"--rounds in 1..{ROUNDS_MAX}, --seconds > 0 and --pause in 0..60")
    spec = World(users=args.users, merchants=max(args.users // 100, 10),
                 stocks=max(args.users // 1000, 5), coupons_per_user=3, seed=11, districts=20,
                 malls=50, topup_per_user_min=10**11, topup_per_user_max=10**11,
                 preset="standard", now_ms=time.time_ns() // 1_000_000)
    wanted = [s for s in args.scenarios.split(",") if s]
    scenarios = {n: v for n, v in SCENARIOS.items() if not wanted or any(w in n for w in wanted)}
    print(f"machine: {bs.machine()}; load before: {bs.load()}", flush=True)
    results = {name: {policy: [] for policy in COMPARISONS[args.compare]} for name in scenarios}
    with tempfile.TemporaryDirectory(prefix="scanpay-bench-commit-") as tmp:
        for name, (kw, capacity, seconds_max) in scenarios.items():
            run_scenario(tmp, name, kw, capacity, min(args.seconds, seconds_max), args, spec,
                         results[name])
    print(f"load after: {bs.load()}")
    print_table(results, COMPARISONS[args.compare])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def run_scenario(tmp: str, name: str, kw: dict, capacity: int, seconds: float, args,
                 spec: World, results: dict) -> None:
    """`args.rounds` rounds of the scenario in each setting, ABBA, each run
    on a fresh server; the figures appended to results[policy]."""
    for rnd in range(args.rounds):
        # ABBA: the second run of a pair may meet the first's writeback,
        # so each setting goes first in every other round.
        order = list(COMPARISONS[args.compare].items())[::1 if rnd % 2 == 0 else -1]
        for policy, settings in order:
            os.sync()                       # the last run's journal written back first
            time.sleep(args.pause)
            root = tempfile.mkdtemp(prefix="run-", dir=tmp)
            os.rmdir(root)                  # start() makes it
            server, pool_path = start(root, settings, spec, capacity)
            try:
                r = measure(server, pool_path, 1 << 40, seconds, kw)
            except (RuntimeError, subprocess.TimeoutExpired) as error:
                print(f"{name:34} round {rnd + 1} {policy:8} FAILED: {error}",
                      flush=True)           # reported, not hidden: the others still run
                continue
            finally:
                server.stop()
            results[policy].append(r)
            print(f"{name:34} round {rnd + 1} {policy:8} {r['rate']:>9,}/s  "
                  f"p50 {r['p50_ms']:7.3f} ms  p99 {r['p99_ms']:7.3f} ms  "
                  f"fsyncs {r['fsyncs_per_s']:>5}/s (waited {r['waits_per_s']:>5}/s, "
                  f"lone {r['lone_per_s']:>5}/s)  "
                  f"batch {r['mean_batch']}  errors {r['errors']}  load {bs.load()}", flush=True)


def print_table(results: dict, settings: dict) -> None:
    print("\n| scenario | " + " | ".join(f"{name}: payments/s, p50 / p99 ms" for name in settings)
          + " |\n|---|---|---|")
    for name, by_policy in results.items():
        cells = []
        for policy in settings:
            runs = by_policy[policy]
            cells.append("; ".join(f"{r['rate']:,} ({r['p50_ms']:.2f} / {r['p99_ms']:.2f})"
                                   for r in runs))
        print(f"| {name} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    sys.exit(main())
