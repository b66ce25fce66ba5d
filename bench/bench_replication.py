"""Replication benchmarks (issue 17): replicated against local-journal
durable PAY, and failover times. Not part of CI; needs the release kernel.

    .venv/bin/python -m pytest bench/bench_replication.py -p no:cacheprovider -s

(as bench/bench_server.py: name the file, no --benchmark-only; it does not
need pytest-benchmark.) Targets on the 2-core test machine: replicated
batched PAY >= TARGET_REPLICATED_BIG payments/s; failover under
TARGET_ENGINE_FAILOVER_S after an engine kill, TARGET_NATS_FAILOVER_S after
the stream leader's loss. docs/replication.md has the figures.

Throughput, each scenario on a fresh server, run one after the other in one
session so that the figures compare side by side (the machine is shared):

- PAY frames of 8,190 records (4 connections, 2 frames in flight each) and
  1-record frames (64 connections, 32 in flight each), closed loop, from
  bench/loadgen.py in its own process;
- against `scanpay serve` with its local journal (fdatasync group commit),
  then against the leader of a local cluster (engine/replication/cluster.py:
  3 NATS servers with `sync_interval: always`, the leader and 2 followers,
  every process on this machine); for batched frames also with the two
  followers stopped after that run (the leader and NATS alone: what the
  followers' share of the two cores costs);
- payments/s, frame latency p50/p99, and CPU per payment (µs) of the engine
  (the leader), of the followers and of the NATS servers, from each
  process's /proc/<pid>/stat utime + stime before and after the run.

Failover, on one cluster (lease SCANPAY_BENCH_LEASE_MS), CYCLES times each:

- SIGKILL of the leader engine, NATS intact;
- SIGKILL of the NATS server that leads the stream (JetStream's stream info);

from the kill to the first write accepted: a probe sends one-record PAY
frames (fresh ids) to every surviving node in turn, 5 ms apart, and the
time is that of the first `ok` reply to a frame sent after the kill. The
killed process is started again and the cluster is healthy again before
the next cycle.

Knobs: SCANPAY_BENCH_SECONDS (6), SCANPAY_BENCH_CAPACITY (6000000 payments
allocated up front on each node), SCANPAY_BENCH_USERS (100000),
SCANPAY_BENCH_LEASE_MS (3000), SCANPAY_BENCH_CYCLES (5),
SCANPAY_BENCH_NODE_SETTINGS (JSON of more [server] settings for the nodes),
SCANPAY_BENCH_OUT (all figures as JSON to this path).
"""
from __future__ import annotations

import json
import os
import signal
import statistics
import sys
import tempfile
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_server import (BATCH, MAP_ITEMS_OVER_SOCKET, ServerProcess,  # noqa: E402
                          SocketEngine, run_loadgen, world_spec)
from _common import load, machine  # noqa: E402

from engine.demo import world as world_module  # noqa: E402
from engine.demo.world import build, pay_batches  # noqa: E402
from engine.replication import cluster as cluster_module  # noqa: E402

LEASE_MS = int(os.environ.get("SCANPAY_BENCH_LEASE_MS", "3000"))
CYCLES = int(os.environ.get("SCANPAY_BENCH_CYCLES", "5"))
# More [server] settings of the replicated nodes, as JSON: the levers tried,
# e.g. {"commit_interval_us": 20000} (a longer group-commit window: bigger messages).
NODE_SETTINGS = json.loads(os.environ.get("SCANPAY_BENCH_NODE_SETTINGS", "{}"))
# Tables allocated up front (growing one mid-run stalls every reply), for
# about SECONDS + warmup at the rates seen here. A payment holds ~420 bytes
# of tables on every node: three nodes of 16M payments (bench_server's
# figure) would take 20 GB of this shared machine, so the runs are shorter.
SECONDS = float(os.environ.get("SCANPAY_BENCH_SECONDS", "6"))
CAPACITY_PAYMENTS = int(os.environ.get("SCANPAY_BENCH_CAPACITY", "6000000"))
TARGET_REPLICATED_BIG = 500_000          # payments/s, batched frames
TARGET_ENGINE_FAILOVER_S = 5.0
TARGET_NATS_FAILOVER_S = 10.0
PROBE_PAUSE_S = 0.005
PROBE_TIMEOUT_MS = 30_000                # a probe frame waits out a stream election
FAILOVER_WAIT_S = 60.0                   # a cycle that takes longer fails the benchmark
HEAL_TIMEOUT_S = 120.0                   # the killed process back, caught up
PAUSE_BETWEEN_S = 5.0                    # the machine settles between scenarios
SCENARIOS = {
    # SCANPAY_BENCH_BIG_WINDOW: frames in flight per connection (the
    # lever on message size: a replicated append takes what is pending).
    "big": dict(records=BATCH, connections=4,
                window=int(os.environ.get("SCANPAY_BENCH_BIG_WINDOW", "2"))),
    "small": dict(records=1, connections=64, window=32),
}
RESULTS: dict = {}
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def build_world(port: int, tmp: str) -> str:
    """The benchmark world, built over the socket; the traffic pool's path."""
    world_module.MAP_ITEMS_PER_CALL = MAP_ITEMS_OVER_SOCKET
    remote = SocketEngine(port)
    try:
        info = build(remote, world_spec())
    finally:
        remote.close()
    path = os.path.join(tmp, f"pool-{port}.npy")
    np.save(path, np.concatenate(list(pay_batches(info, 32, seed=99, start_payment_id=1))))
    return path


def measure(port: int, pool: str, groups: dict, kind: str, id_base: int,
            seconds: float = SECONDS) -> dict:
    """One loadgen run at `port`; CPU per payment of each group of pids."""
    before = {name: sum(cpu_seconds(p) for p in pids) for name, pids in groups.items()}
    load_before = load()
    out = run_loadgen(port, pool, id_base, seconds=seconds, **SCENARIOS[kind])
    after = {name: sum(cpu_seconds(p) for p in pids) for name, pids in groups.items()}
    payments = out["rate"] * (out["duration_s"] + out["warmup_s"])     # CPU counts the warmup too
    out["cpu_us_per_payment"] = {name: round(1e6 * (after[name] - before[name]) / payments, 3)
                                 for name in groups}
    out["load_before"], out["load_after"] = load_before, load()
    return out


def local_scenario(tmp: str, kind: str) -> dict:
    root = tempfile.mkdtemp(prefix=f"local-{kind}-", dir=tmp)
    server = ServerProcess(os.path.join(root, "data"), capacity_payments=CAPACITY_PAYMENTS)
    try:
        pool = build_world(server.port, root)
        return measure(server.port, pool, {"engine": [server.proc.pid]}, kind, 1 << 40)
    finally:
        server.stop()


def replicated_cluster(root: str, lease_ms: int = LEASE_MS, capacity_payments: int = 0):
    settings = cluster_module.Settings(
        lease_ms=lease_ms, capacity={"payments": capacity_payments} if capacity_payments else {},
        server=NODE_SETTINGS)
    return cluster_module.LocalCluster.plan(root, 3, base_port=0, settings=settings).up()


def replicated_scenario(tmp: str, kind: str) -> dict:
    root = tempfile.mkdtemp(prefix=f"replicated-{kind}-", dir=tmp)
    cluster = replicated_cluster(root, capacity_payments=CAPACITY_PAYMENTS)
    try:
        leader = cluster.wait_leader()
        pool = build_world(leader.port, root)
        groups = {"engine": [leader.pid],
                  "followers": [m.pid for m in cluster.nodes if m is not leader],
                  "nats": [m.pid for m in cluster.nats]}
        out = measure(leader.port, pool, groups, kind, 1 << 41)
        out["stream"] = cluster_module.status(cluster)["stream"]
        if kind == "big":       # the followers' share of the cores, seen by removing it
            for member in cluster.nodes:
                if member is not leader:
                    cluster.stop_member(member)
            time.sleep(PAUSE_BETWEEN_S)
            RESULTS["replicated, big frames, followers stopped"] = measure(   # half as long:
                leader.port, pool, {"engine": [leader.pid], "nats": groups["nats"]}, kind,
                1 << 42, SECONDS / 2)           # the tables hold the first run's payments
        return out
    finally:
        cluster.stop_all()


# ---------------------------------------------------------------- failover

class Probe:
    """One-record PAY frames (fresh ids) to whichever node accepts them."""

    def __init__(self, pool_path: str):
        self.rows = np.load(pool_path)[:1024].copy()
        self.next_id = 1 << 45
        self.clients = {}

    def frame(self) -> np.ndarray:
        record = self.rows[self.next_id % len(self.rows):][:1].copy()
        record["id"] = self.next_id
        self.next_id += 1
        return record

    def try_node(self, member) -> bool:
        """One frame to `member`: True when it was answered ok."""
        from engine.client import Client
        from engine.protocol.errors import EngineError
        from engine.protocol.status import Status
        try:
            client = self.clients.get(member.name)
            if client is None:
                client = Client.connect(cluster_module.HOST, member.port,
                                        timeout_ms=PROBE_TIMEOUT_MS)
                self.clients[member.name] = client
            return int(client.pay(self.frame())["status"][0]) == Status.ok
        except EngineError:                 # not_leader, unavailable: nothing applied
            return False
        except (OSError, ConnectionError, TimeoutError, Exception):   # noqa: BLE001 - gone
            dropped = self.clients.pop(member.name, None)
            if dropped is not None:
                dropped.close()
            return False

    def first_write(self, nodes: list, since: float) -> float:
        """Seconds from `since` to the first frame answered ok."""
        deadline = since + FAILOVER_WAIT_S
        while time.monotonic() < deadline:
            for member in nodes:
                if member.alive() and self.try_node(member):
                    return time.monotonic() - since
            time.sleep(PROBE_PAUSE_S)
        raise AssertionError(f"no write accepted within {FAILOVER_WAIT_S} s of the kill")


def heal(cluster) -> dict:
    """Until every process runs, one node leads, none lags and every stream
    replica is current: that status."""
    deadline = time.monotonic() + HEAL_TIMEOUT_S
    while True:
        view = cluster_module.status(cluster)
        peers = (view["stream"] or {}).get("peers") or []
        if (view["healthy"] and all(n["lag"] == 0 for n in view["nodes"])
                and len(peers) == len(cluster.nats) - 1 and all(p["current"] for p in peers)):
            return view
        assert time.monotonic() < deadline, f"the cluster did not heal: {view['problems']}"
        time.sleep(0.2)


def engine_failovers(cluster, probe: Probe) -> list[float]:
    times = []
    for _ in range(CYCLES):
        heal(cluster)
        leader = cluster.wait_leader()
        killed_at = time.monotonic()
        cluster.kill(leader)
        times.append(probe.first_write([m for m in cluster.nodes if m is not leader], killed_at))
        cluster.start_node(leader)
        cluster.wait_role(leader, cluster_module.FOLLOWER)
    return times


def nats_failovers(cluster, probe: Probe) -> tuple[list[float], list[str]]:
    """(times, what happened to the engine's leader in each cycle)."""
    times, leaders = [], []
    for _ in range(CYCLES):
        heal(cluster)
        victim = cluster.stream_leader()
        engine_leader = cluster.wait_leader()
        killed_at = time.monotonic()
        cluster.kill(victim, signal.SIGKILL)
        times.append(probe.first_write(cluster.nodes, killed_at))
        after = cluster.wait_leader()
        leaders.append("same leader" if after is engine_leader else "leader changed")
        cluster.start_nats_member(victim)
    return times, leaders


def failover_scenario(tmp: str, lease_ms: int) -> dict:
    root = tempfile.mkdtemp(prefix=f"failover-{lease_ms}-", dir=tmp)
    cluster = replicated_cluster(root, lease_ms)
    try:
        leader = cluster.wait_leader()
        world_module.MAP_ITEMS_PER_CALL = MAP_ITEMS_OVER_SOCKET
        remote = SocketEngine(leader.port)
        try:
            info = build(remote, world_spec().replace(users=2000, merchants=20, stocks=5))
        finally:
            remote.close()
        pool = os.path.join(root, "pool.npy")
        np.save(pool, np.concatenate(list(pay_batches(info, 1, seed=5))))
        probe = Probe(pool)
        load_before = load()
        engine_s = engine_failovers(cluster, probe)
        nats_s, nats_leaders = nats_failovers(cluster, probe)
        return {"lease_ms": lease_ms, "engine_kill_s": engine_s, "nats_leader_kill_s": nats_s,
                "nats_engine_leader": nats_leaders, "load_before": load_before,
                "load_after": load()}
    finally:
        cluster.stop_all()


# ---------------------------------------------------------------- the benchmarks

@pytest.fixture(scope="module")
def tmp():
    with tempfile.TemporaryDirectory(prefix="scanpay-bench-replication-") as directory:
        try:
            yield directory
        finally:
            print_table()


def side_by_side(tmp: str, kind: str) -> tuple[dict, dict]:
    local = RESULTS[f"local journal, {kind} frames"] = local_scenario(tmp, kind)
    time.sleep(PAUSE_BETWEEN_S)
    replicated = RESULTS[f"replicated, {kind} frames"] = replicated_scenario(tmp, kind)
    time.sleep(PAUSE_BETWEEN_S)
    return local, replicated


# Plain tests, not pytest-benchmark's fixture: each scenario runs once and
# its figures go to the table printed at the end (and SCANPAY_BENCH_OUT).

def test_replicated_against_local_pay_batched_frames(tmp):
    local, replicated = side_by_side(tmp, "big")
    assert local["error_count"] == 0 and replicated["error_count"] == 0


def test_replicated_against_local_pay_one_record_frames(tmp):
    local, replicated = side_by_side(tmp, "small")
    assert local["error_count"] == 0 and replicated["error_count"] == 0


def test_failover_times(tmp):
    out = RESULTS[f"failover, lease {LEASE_MS} ms"] = failover_scenario(tmp, LEASE_MS)
    assert len(out["engine_kill_s"]) == CYCLES and len(out["nats_leader_kill_s"]) == CYCLES


# ---------------------------------------------------------------- reporting

def _ms(us) -> str:
    return "-" if us is None else f"{us / 1000:.2f}"


def _cpu(r: dict, group: str) -> str:
    value = r["cpu_us_per_payment"].get(group)
    return "-" if value is None else f"{value:.2f}"


def print_table() -> None:
    print(f"\nscanpay replication benchmark, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; "
          f"{machine()}; world {world_spec().users:,} users; every process on this machine")
    head = (f"{'scenario':<42} {'rate/s':>10} {'p50ms':>7} {'p99ms':>8} {'errs':>5} "
            f"{'CPU µs/payment: engine':>23} {'followers':>9} {'NATS':>7}  load before/after")
    print(head)
    print("-" * len(head))
    print(f"(8,190-record frames: {SCENARIOS['big']['connections']} connections x "
          f"{SCENARIOS['big']['window']} in flight; 1-record frames: 64 x 32)")
    for name, r in RESULTS.items():
        if "rate" not in r:
            continue
        lat = r["latency_us"]
        print(f"{name:<42} {r['rate']:>10,.0f} {_ms(lat['p50']):>7} {_ms(lat['p99']):>8} "
              f"{r['error_count']:>5} {_cpu(r, 'engine'):>23} {_cpu(r, 'followers'):>9} "
              f"{_cpu(r, 'nats'):>7}  {r['load_before']} / {r['load_after']}")
    for kind in SCENARIOS:
        local, rep = RESULTS.get(f"local journal, {kind} frames"), RESULTS.get(f"replicated, {kind} frames")
        if local and rep:
            print(f"replicated / local, {kind} frames: {rep['rate'] / local['rate']:.2f} of the rate")
    for name, r in RESULTS.items():
        if "engine_kill_s" in r:
            for what, times in (("engine SIGKILL", r["engine_kill_s"]),
                                ("stream leader's NATS SIGKILL", r["nats_leader_kill_s"])):
                print(f"{name}, {what}: p50 {statistics.median(times):.2f} s, max "
                      f"{max(times):.2f} s over {len(times)} ({', '.join(f'{t:.2f}' for t in times)})")
            print(f"  engine leader after the NATS kills: {', '.join(r['nats_engine_leader'])}; "
                  f"{r['load_before']} / {r['load_after']}")
    path = os.environ.get("SCANPAY_BENCH_OUT")
    if path:
        with open(path, "w") as f:
            json.dump({"machine": machine(), "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       "results": RESULTS}, f, indent=1, default=str)
