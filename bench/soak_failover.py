"""The failover soak (issue 17): CI runs 5 bounded failover cycles
(tests/replication/test_failover.py); this script runs as many as fit in a
given time, on a local cluster (3 NATS servers, 3 replicated nodes), and
checks after every cycle that no answered payment was lost.

    PYTHONPATH=. .venv/bin/python bench/soak_failover.py --minutes 10 \\
        --pause-every 4 --nats-every 5

Each cycle: gateways pipeline PAY frames to the leader (tests/support/
failover.py's Load: 4 gateways, 8 frames of 4 payments in flight each) for a
random 1-4 s, then a fault, then 1 s more of load on whoever leads:

- `kill` (the default): SIGKILL of the leader engine; it is started again
  (it rejoins as a follower, from its snapshot, or the store's, and the stream);
- `pause` (every --pause-every'th cycle): SIGSTOP of the leader past its
  lease, until a follower leads; then SIGCONT, and it must rejoin as a follower;
- `nats` (every --nats-every'th cycle): SIGKILL of the NATS server that
  leads the stream; it is started again and caught up before the next cycle.

Then the load stops and the cycle is checked (the support module's checks):
every payment answered `ok` in the cycle, and a sample of older ones, is on
the leader with the figures it was answered with (GET_PAYMENTS); a checkpoint
is passed and the digests of all nodes agree at it; the nodes hold the same
balances; AUDIT holds on every node. At the end every payment answered `ok`
in the whole run is looked up on the leader.

Prints a line per cycle and a summary (cycles, payments answered ok, losses,
failover p50/max per fault: to a node saying `leader`, and to the first `ok`
after the fault; the payment rate; the load average). Exit code 0 when every
check held, 1 on any loss or failed check (the directory is kept then and the
nodes' log tails printed), 2 on bad arguments. Runs with whatever kernel the
tree holds (this is not a throughput benchmark); docs/replication.md has the
figures of a run.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from support import failover  # noqa: E402
from support.failover import (Load, build_world, check_acked_on,  # noqa: E402
                              check_converged, pass_a_checkpoint)
from support.nats import start_cluster, stream_leader_name, wait_replicas_current  # noqa: E402
from support.replicas import Node, wait_for_leader  # noqa: E402

KILL, PAUSE, NATS = "kill", "pause", "nats"
STREAMS = ("scanpay_0", "KV_scanpay_lease_0")   # the log and the lease, replicated
LOAD_BEFORE_S = (1.0, 4.0)          # load before the fault, uniform in this range
LOAD_AFTER_S = 1.0                  # load on the new leader before the cycle is checked
FAULT_BOUND_S = 60.0                # no first `ok` this long after a fault: a failure
REJOIN_BOUND_S = 60.0               # a paused leader follows again / NATS caught up
OLDER_SAMPLE = 2000                 # older answered payments looked up per cycle
CYCLES_MAX = 10_000                 # gateway numbers stay below 2**16 (ids: gateway << 40)
CHECK_IDS = 1 << 56                 # the ids of pass_a_checkpoint's payments
POLL_S = 0.02
LEADER_LOOK_S = 0.5                 # while waiting for a first ok, look for a new leader


class SoakFailure(Exception):
    """A check failed: the message says which and in which cycle."""


class Answered:
    """Every payment answered ok, compactly (id, cash, discount, fee, timestamp)."""

    def __init__(self):
        self.parts = []             # int64 arrays of shape (n, 5), one per cycle

    def add(self, acked: dict) -> None:
        if acked:
            self.parts.append(np.array([(k, *v) for k, v in acked.items()], np.int64))

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def sample(self, count: int, rng: random.Random) -> dict:
        sizes = np.cumsum([len(p) for p in self.parts])
        if not len(sizes):
            return {}
        picked = {}
        for at in (rng.randrange(int(sizes[-1])) for _ in range(count)):
            part = int(np.searchsorted(sizes, at, side="right"))
            row = self.parts[part][at - (int(sizes[part - 1]) if part else 0)]
            picked[int(row[0])] = tuple(int(x) for x in row[1:])
        return picked

    def chunks(self, rows: int = 100_000):
        for part in self.parts:
            for at in range(0, len(part), rows):
                yield {int(r[0]): tuple(int(x) for x in r[1:]) for r in part[at:at + rows]}


def current_leader(nodes: list) -> Node | None:
    """The running node whose HELLO says leader now, or None (no waiting)."""
    for node in nodes:
        if node.running():
            try:
                if node.hello()["role"] == "leader":
                    return node
            except Exception:       # noqa: BLE001 - killed, paused or starting
                continue
    return None


class Soak:
    def __init__(self, args, directory: str):
        self.args = args
        self.rng = random.Random(args.seed)
        self.cluster = start_cluster(os.path.join(directory, "nats"), nodes=3)
        self.group = [Node(directory, self.cluster.servers, args.lease_ms, f"s{i}",
                           checkpoint_every_entries=failover.CHECKPOINT_EVERY,
                           snapshot_every_entries=args.snapshot_every, store_snapshots=2)
                      for i in range(3)]
        self.answered = Answered()
        self.failovers = {KILL: [], PAUSE: [], NATS: []}     # (to leader s, to first ok s)
        self.load_s = 0.0
        self.cycle = 0

    def start(self) -> None:
        for node in self.group:
            node.start()
        build_world(wait_for_leader(self.group))

    def stop(self) -> None:
        for node in self.group:
            node.stop()
        self.cluster.stop()

    def kind(self) -> str:
        if self.args.nats_every and self.cycle % self.args.nats_every == 0:
            return NATS
        if self.args.pause_every and self.cycle % self.args.pause_every == 0:
            return PAUSE
        return KILL

    def first_ok(self, load: Load, since: float) -> float:
        """Seconds from `since` to the first payment answered ok after now
        (the load is pointed at whichever node leads meanwhile)."""
        before, looked = len(load.acked), time.monotonic()
        while len(load.acked) <= before:
            now = time.monotonic()
            if now - since > FAULT_BOUND_S:
                raise SoakFailure(f"no payment answered ok {FAULT_BOUND_S:g} s after the fault")
            if now - looked > LEADER_LOOK_S:
                load.leader = current_leader(self.group) or load.leader
                looked = now
            time.sleep(POLL_S)
        return time.monotonic() - since

    def others(self, node: Node) -> list:
        return [n for n in self.group if n is not node]

    def signal_leader(self, load: Load, sig: int) -> tuple:
        """`sig` to the leader, until another node leads and answers a
        payment ok: (that node, seconds to its leading, to the first ok)."""
        old = load.leader
        since = time.monotonic()
        old.signal(sig)
        load.leader = wait_for_leader(self.others(old))
        to_leader_s = time.monotonic() - since
        return old, to_leader_s, self.first_ok(load, since)

    def kill_leader(self, load: Load) -> tuple:
        killed, to_leader_s, to_ok_s = self.signal_leader(load, signal.SIGKILL)
        killed.start()                      # a follower again
        return to_leader_s, to_ok_s

    def pause_leader(self, load: Load) -> tuple:
        paused, to_leader_s, to_ok_s = self.signal_leader(load, signal.SIGSTOP)
        paused.signal(signal.SIGCONT)
        deadline = time.monotonic() + REJOIN_BOUND_S
        while paused.hello()["role"] != "follower":
            if time.monotonic() > deadline or not paused.running():
                raise SoakFailure(f"the paused leader {paused.name} did not rejoin as a "
                                  f"follower: {paused.log_tail(5)}")
            time.sleep(POLL_S)
        return to_leader_s, to_ok_s

    def kill_nats(self, load: Load) -> tuple:
        name = stream_leader_name(self.cluster.urls)
        victim = next(n for n in self.cluster.nodes if n.name == name)
        since = time.monotonic()
        self.cluster.kill(victim)
        to_ok_s = self.first_ok(load, since)
        self.cluster.start_node(victim)
        wait_replicas_current(self.cluster.urls, STREAMS, REJOIN_BOUND_S)
        return None, to_ok_s

    def run_cycle(self) -> str:
        self.cycle += 1
        kind = self.kind()
        fault = {KILL: self.kill_leader, PAUSE: self.pause_leader, NATS: self.kill_nats}[kind]
        load = Load(wait_for_leader(self.group),
                    first_gateway=1 + self.cycle * failover.GATEWAYS)
        started = time.monotonic()
        try:
            time.sleep(self.rng.uniform(*LOAD_BEFORE_S))
            times = fault(load)
            time.sleep(LOAD_AFTER_S)
        finally:
            load.stop()
        self.load_s += time.monotonic() - started
        self.failovers[kind].append(times)
        acked = dict(load.acked)
        return self.line(kind, times, acked, self.check(acked))

    def check(self, acked: dict) -> dict:
        """The cycle's checks (support/failover.py); then its payments count."""
        leader = wait_for_leader(self.group)
        older = self.answered.sample(OLDER_SAMPLE, self.rng)
        for what, payments in (("answered this cycle", acked), ("answered before", older)):
            try:
                check_acked_on(leader, payments)
            except AssertionError as error:
                raise SoakFailure(f"LOSS: payments {what}: {error}") from None
        try:
            pass_a_checkpoint(leader, CHECK_IDS + self.cycle * 3 * failover.CHECKPOINT_EVERY)
            check_converged(leader, self.group)
        except AssertionError as error:
            raise SoakFailure(f"the nodes do not agree: {error}") from None
        self.answered.add(acked)
        return leader.hello()["checkpoint"]

    def line(self, kind: str, times: tuple, acked: dict, checkpoint: dict) -> str:
        to_leader_s, to_ok_s = times
        leader = "" if to_leader_s is None else f"leader in {to_leader_s:.2f} s, "
        return (f"cycle {self.cycle:3d} {kind:5s}: {leader}first ok in {to_ok_s:.2f} s; "
                f"{len(acked):,} answered ok, all there ({len(self.answered):,} in all); "
                f"digests agree at command {checkpoint['seq']:,}; AUDIT ok on 3 nodes; "
                f"{load_average()}")


def load_average() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.1f}/{five:.1f}"


def figures(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"p50 {statistics.median(values):.2f} s, max {max(values):.2f} s"


def summary(soak: Soak, elapsed_s: float) -> list:
    lines = [f"{soak.cycle} cycles in {elapsed_s / 60:.1f} min: "
             + ", ".join(f"{len(v)} {k}" for k, v in soak.failovers.items() if v),
             f"payments answered ok: {len(soak.answered):,} "
             f"({len(soak.answered) / max(soak.load_s, 1e-9):,.0f}/s while the load ran, "
             f"{soak.load_s:.0f} s); lost: 0 (every one looked up on the leader at the end)"]
    for kind, times in soak.failovers.items():
        if times:
            lines.append(f"{kind:5s}: to a leader {figures([t[0] for t in times])}; "
                         f"to the first ok {figures([t[1] for t in times])}")
    return lines


def soak_until(soak: Soak, args) -> float:
    started = time.monotonic()
    soak.start()
    print(f"soak: 3 NATS servers, 3 nodes, lease {args.lease_ms} ms, {args.minutes:g} min; "
          f"{load_average()}", flush=True)
    end = started + args.minutes * 60
    while time.monotonic() < end and soak.cycle < min(args.cycles or CYCLES_MAX, CYCLES_MAX):
        print(soak.run_cycle(), flush=True)
    leader = wait_for_leader(soak.group)
    for chunk in soak.answered.chunks():
        try:
            check_acked_on(leader, chunk)
        except AssertionError as error:
            raise SoakFailure(f"LOSS at the end: {error}") from None
    return time.monotonic() - started


def parse(argv: list) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="run cycles this long")
    parser.add_argument("--cycles", type=int, default=0, help="at most this many (0: the time)")
    parser.add_argument("--pause-every", type=int, default=0,
                        help="every Nth cycle pauses the leader instead (0: never)")
    parser.add_argument("--nats-every", type=int, default=0,
                        help="every Nth cycle kills the stream's NATS leader instead (0: never)")
    parser.add_argument("--lease-ms", type=int, default=2000)
    parser.add_argument("--snapshot-every", type=int, default=5000,
                        help="commands between snapshots (published to the store, then trimmed)")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--dir", help="work here and keep it (default: a temp dir, removed "
                                      "unless a check fails)")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.cycles < 0 or args.pause_every < 0 or args.nats_every < 0:
        parser.error("--minutes must be positive; --cycles, --pause-every, --nats-every >= 0")
    return args


def main(argv: list | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    directory = args.dir or tempfile.mkdtemp(prefix="scanpay-soak-")
    os.makedirs(directory, exist_ok=True)
    soak = Soak(args, directory)
    failed = True
    try:
        elapsed_s = soak_until(soak, args)
        print("\n".join(summary(soak, elapsed_s)), flush=True)
        failed = False
    except (SoakFailure, AssertionError) as error:
        print(f"FAILED in cycle {soak.cycle}: {error}", flush=True)
        for node in soak.group:
            print(f"--- {node.name} ({node.log_path}):\n{node.log_tail(10)}", flush=True)
    finally:
        soak.stop()
        if failed or args.dir:
            print(f"kept {directory}", flush=True)
        else:
            shutil.rmtree(directory, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
