"""`scanpay demo --cluster`: the demo's story through a replicated cluster.

Brings up a local cluster (engine/replication/cluster.py: 3 NATS servers and
3 scanpay nodes with a test clock, in a temporary directory removed at the
end), or uses the nodes `--connect` names. Everything goes through failover
clients given every node's address (engine/client/failover.py), to the
leader: the same story as `scanpay demo` (engine/demo/__init__.py), on a
demo weekend far enough ahead that the cluster's clock can walk to it (the
engine's time never goes back). The world is built eight weeks before; the
shoppers' mall visits of those weeks are paid (engine/demo/shoppers.py);
on Saturday 09:00 the coupons are issued and the two targeted campaigns sent
(engine/demo/story.py); the weekend's payments follow, the shoppers going to
the mall by their propensity and their coupons. The report (STATS, BALANCES,
LIFT: reads) is read from a follower once it has applied the leader's last
write, and the story ends with which campaign paid off. A cluster without a
test clock (`--connect` to `scanpay cluster up` without `--test-clock`)
cannot walk the eight weeks: it gets the world's plain weekend traffic,
stamped with today's time, and no campaign story.

At KILL_AT_SHARE of the weekend's payments the leader of a local cluster is
killed (SIGKILL); a follower takes the lease over, the gateways follow it,
and the killed node is started again and rejoins as a follower. At the end
the demo shows that no acknowledged payment was lost:

- every merchant's payment count and GMV on the leader (STATS) equal those
  of the payments the gateways saw answered `ok`;
- the payments answered in the FRAMES_CHECKED frames either side of the
  kill are on the leader with the figures they were answered with;
- AUDIT holds on every node (a follower audits at its own stream seq);
- every node's state digest is the same at a checkpoint after the last
  payment (the last checkpoint, with --connect).

The exit code is 0 only when all of that holds.
"""
from __future__ import annotations

import collections
import dataclasses
import shutil
import tempfile
import threading
import time

import numpy as np

from engine.demo import shoppers as behaviour, world as world_module
from engine.demo.stop import STOP
from engine.demo.world import DAY_MS, DEMO_START_MS, World, WorldBuildError, capacity_for
from engine.protocol.limits import BATCH_RECORDS_MAX, WIRE_LOOKUP_ITEMS_MAX
from engine.protocol.status import Status

NODES = 3
LEASE_MS = 2000                     # the local cluster's lease: failover takes about this
KILL_AT_SHARE = 0.4                 # the leader dies after this share of the payments
FRAMES_CHECKED = 32                 # answered frames looked up either side of the kill
CHECKPOINTS_IN_RUN = 8              # state digests compared during the payments, about
CHECKPOINT_EVERY_MIN = 8            # commands
SETTLE_TIMEOUT_S = 60.0             # nodes reach the same checkpoint after the run
NUDGE_BURST = 8                     # no-op writes between two looks at the checkpoints
NUDGE_TAIL_MAX = 100                # then one per look, at most this many
NUDGE_PAUSE_S = 0.1
NUDGES_REMOTE_MAX = 500             # --connect: its checkpoint interval is not known here
AUDIT_TIMEOUT_MS = 600_000
FOLLOWER_WAIT_S = 30.0              # a follower reaches the leader's last write, for the report
CLIENT_TIMEOUT_MS = 120_000
WEEK_MS = 7 * DAY_MS
MAP_ITEMS_OVER_WIRE = 10_000        # items per world-building call (bench/bench_server.py's figure)


@dataclasses.dataclass
class Failover:
    """What happened when the leader was killed (times from the kill, s)."""
    killed: str = ""
    killed_address: str = ""
    at_payments: int = 0
    killed_at: float = 0.0          # time.perf_counter()
    new_leader: str = ""
    new_leader_s: float | None = None       # until a node said leader
    first_write_s: float | None = None      # until the new leader answered a PAY frame
    rejoined: bool = False
    error: str = ""


class Watch:
    """The answers the gateways saw, for the checks after the run."""

    def __init__(self, merchants: int):
        self.payments = np.zeros(merchants, np.int64)   # ok payments, by merchant index
        self.gmv = np.zeros(merchants, np.int64)
        self.before = collections.deque(maxlen=FRAMES_CHECKED)  # (ids, figures) before the kill
        self.after = []                                          # ... after it
        self.failover = Failover()

    def answered(self, batch: np.ndarray, results: np.ndarray, server: str) -> None:
        ok = results["status"] == Status.ok
        at = (batch["merchant"][ok] - 1).astype(np.int64)      # demo merchant ids are 1..n
        self.payments += np.bincount(at, minlength=len(self.payments))
        np.add.at(self.gmv, at, batch["amount"][ok].astype(np.int64))
        figures = (results["id"][ok], results["cash"][ok], results["discount"][ok],
                   results["fee"][ok])
        failover = self.failover
        if not failover.killed_at:
            self.before.append(figures)
            return
        if len(self.after) < FRAMES_CHECKED:
            self.after.append(figures)
        if failover.first_write_s is None and server != failover.killed_address:
            failover.first_write_s = time.perf_counter() - failover.killed_at


def demo_start_ms(now_ms: int) -> int:
    """The first demo Saturday 09:00 (UTC+8) whose eight weeks before (the
    story's history) begin after `now_ms`: the engine's time never goes
    back, so all of it must lie ahead. Whole weeks from DEMO_START_MS: the
    same weekdays, the same shoppers' behaviour."""
    earliest = now_ms + behaviour.HISTORY_DAYS * DAY_MS
    weeks = max(0, (earliest - DEMO_START_MS) // WEEK_MS + 1)
    return DEMO_START_MS + weeks * WEEK_MS


def checkpoint_every(payments: int) -> int:
    from engine.demo.wire import FRAME_RECORDS
    return max(CHECKPOINT_EVERY_MIN, payments // FRAME_RECORDS // CHECKPOINTS_IN_RUN)


def run_cluster(args, console) -> int:
    """The demo through a cluster (the module's docstring); Ctrl-C (or
    SIGTERM) stops a local cluster and removes its directory."""
    from engine.protocol.errors import EngineError
    from engine.replication.cluster import ClusterError
    spec = World.demo(seed=args.seed, users=args.users)
    directory, cluster, code = None, None, 1

    def clean_up() -> None:
        if cluster is not None:
            cluster.stop_all()
        if directory:
            shutil.rmtree(directory, ignore_errors=True)

    with STOP.stopping(clean_up):
        try:
            if args.connect:
                addresses = connect_addresses(args.connect)
            else:
                with STOP.deferred():   # made and named at once, so that it is removed
                    directory = tempfile.mkdtemp(prefix="scanpay-demo-cluster-")
                cluster = start_cluster(console, directory, spec, args.payments)
                addresses = cluster.addresses
            code = run_on(console, args, spec, cluster, addresses)
        except (ClusterError, WorldBuildError, EngineError, OSError, TimeoutError) as error:
            console.print(f"[red]scanpay demo --cluster:[/] {error}", highlight=False)
            code = 2
    return STOP.outcome(code, f"; stopped its cluster and removed {directory}" if directory else "")


def connect_addresses(text: str) -> list[str]:
    from engine.client.failover import parse_addresses
    from engine.replication.cluster import ClusterError
    try:
        return [a.label for a in parse_addresses(text)]
    except ValueError as error:
        raise ClusterError(f"--connect {text!r}: {error}") from None


def start_cluster(console, directory: str, spec: World, payments: int):
    from engine.replication.cluster import LocalCluster, Settings
    settings = Settings(lease_ms=LEASE_MS, checkpoint_every_entries=checkpoint_every(payments),
                        test_clock=True, capacity=capacity_for(spec, payments))
    cluster = LocalCluster.plan(directory, NODES, base_port=0, settings=settings)
    with console.status(f"starting {NODES} NATS servers and {NODES} scanpay nodes ..."):
        cluster.up()
    nodes = ", ".join(f"{m.name} {m.address}" for m in cluster.nodes)
    console.print(f"cluster: {NODES} NATS servers (JetStream, {cluster.replicas} replicas, "
                  f"sync always) and {NODES} nodes ({nodes}); {cluster.nodes[0].name} leads, "
                  f"lease {LEASE_MS} ms", highlight=False)
    return cluster


def set_clock(client, console) -> int | None:
    """The story's weekend start, the cluster's clock set to the eight
    weeks before it (CLOCK: a test clock); None without a test clock."""
    from engine.protocol.errors import EngineError
    weekend_ms = demo_start_ms(time.time_ns() // 1_000_000)
    try:
        client.call("CLOCK", {"now": behaviour.history_start(weekend_ms)})
        return weekend_ms
    except EngineError:                 # unknown_op: no test clock there
        console.print("the cluster has no test clock (`scanpay cluster up --test-clock`): the "
                      "payments are stamped with today's time, not the demo's weekend; no "
                      "campaign story (it needs the eight weeks before)")
        return None


@dataclasses.dataclass
class Run:
    """What one demo run through a cluster shares."""
    console: object
    args: object
    cluster: object                 # a LocalCluster, or None (--connect)
    addresses: list
    client: object                  # a failover Client: it talks to whoever leads
    watch: Watch


def run_on(console, args, spec: World, cluster, addresses: list[str]) -> int:
    from engine import demo
    from engine.client import Client
    with Client.connect(addresses, timeout_ms=CLIENT_TIMEOUT_MS,
                        client_name="scanpay-demo") as client:
        # The world's map calls go over the wire here: small enough for the
        # server's max_frame (1 MiB by default; 50,000 top-ups are 1.3 MB).
        world_module.MAP_ITEMS_PER_CALL = MAP_ITEMS_OVER_WIRE
        run = Run(console, args, cluster, addresses, client, Watch(spec.merchants))
        weekend_ms = set_clock(client, console)
        told = weekend_ms is not None
        info, tally, killer = (tell_story(run, spec, weekend_ms) if told
                               else plain_weekend(run, spec))
        started = time.perf_counter()
        audit = client.call("AUDIT", {}, timeout_ms=AUDIT_TIMEOUT_MS)
        audited = client.address                # the leader that answered it
        tally.audit_seconds = time.perf_counter() - started
        figures = report_figures(run, info, told)
        demo._report(console, client, tally, audit, figures)
        if args.report:
            demo._write_report(console, figures, args.report)
        if told:
            demo._story(console, figures)
        if killer is not None:
            killer.join(ROLE_WAIT_S)
        every = checkpoint_every(args.payments) if cluster is not None else None
        checks = verify(client, run.watch, addresses, int(info.user_ids[0]), (audited, audit),
                        every)
    print_replication(console, cluster, addresses, run.watch.failover, checks)
    return 0 if audit.get("ok") is True and all(ok for _, ok, _ in checks) else 1


ROLE_WAIT_S = 120.0                 # the killed node rejoins (catching up) after the payments


def title(run: Run, spec: World) -> None:
    run.console.rule(f"[bold]Scanpay demo: a weekend at Riverside Mall[/] ({spec.users:,} "
                     f"shoppers), through a cluster of {len(run.addresses)}")


def tally_of(run: Run):
    from engine import demo
    return demo.Tally(path=f"over the wire, replicated on {len(run.addresses)} nodes")


def tell_story(run: Run, spec: World, weekend_ms: int):
    """The single-node demo's story on the cluster's leader (the module's
    docstring); the cluster's clock is at the eight weeks before
    `weekend_ms`. (info, the weekend's tally, the killer thread or None)."""
    from engine import demo
    console, start_ms = run.console, behaviour.history_start(weekend_ms)
    spec = spec.replace(now_ms=weekend_ms)
    title(run, spec)
    info = demo._build(console, run.client, spec)
    shop = behaviour.shoppers(info, start_ms, weekend_ms)
    clock = demo.SimClock(start_ms)
    history = tally_of(run)
    steps = behaviour.HISTORY_DAYS * demo.HISTORY_STEPS_PER_DAY
    pay(run, info, clocked(timed(behaviour.stream(info, shop, 1, 0, start_ms, weekend_ms, 1,
                                                  steps), clock), clock),
        clock, 0, history, info.spec.users + 1, kill=False)
    console.print(f"eight weeks before the weekend: {history.payments:,} payments at the mall "
                  f"(over the wire, {history.pay_seconds:.1f} s)")
    run.client.call("CLOCK", {"now": weekend_ms})
    launched = demo._launch(console, run.client, info, shop, clock, weekend_ms)
    weekend = demo.Weekend(info, shop, [r for r, _ in launched],
                           max(run.args.payments - history.payments, 0), history.payments + 1,
                           info.spec.users + 1 + history.auto_topups, start_ms=weekend_ms)
    tally = tally_of(run)
    tally.history = history.payments
    killer = pay(run, info, clocked(weekend.batches(clock), clock), clock, weekend.payments,
                 tally, weekend.topup_id, kill=True, also=weekend.paid)
    return info, tally, killer


def plain_weekend(run: Run, spec: World):
    """No test clock: the world's plain weekend traffic (world.pay_batches),
    stamped with today's time. (info, tally, the killer thread or None)."""
    from engine import demo
    spec = spec.replace(now_ms=time.time_ns() // 1_000_000)
    title(run, spec)
    info = demo._build(run.console, run.client, spec)
    with run.console.status(f"issuing {len(info.coupon_ids):,} coupons ..."):
        world_module.issue_coupons(run.client, info)
    tally = tally_of(run)
    clock = demo.SimClock(info.now_ms)
    killer = pay(run, info, weekend_batches(info, clock, run.args.payments), clock,
                 run.args.payments, tally, info.spec.users + 1, kill=True)
    return info, tally, killer


def timed(stream, clock):
    """The batches of (engine time, batch) pairs, `clock` set for each."""
    for now_ms, batch in stream:
        clock.now_ms = now_ms
        yield batch


def clocked(batches, clock):
    """`batches` with a ("CLOCK", now_ms) item before each one whose time
    moved: the cluster's test clock walks with the story."""
    sent = None
    for batch in batches:
        if clock.now_ms != sent:
            sent = clock.now_ms
            yield ("CLOCK", sent)
        yield batch


def pay(run: Run, info, batches, clock, payments: int, tally, topup_id: int, kill: bool,
        also=None):
    """Stream `batches` (out of `payments`, for the progress bar), noting
    every answer (Watch; then `also(batch, results)`); with `kill`, kill
    the leader once on the way (a local cluster). The thread that kills it
    and restarts it, or None."""
    from engine import demo
    args, cluster = run.args, run.cluster
    kill_at = None if not kill or cluster is None or args.no_kill else max(
        1, int(payments * KILL_AT_SHARE))
    killer = []

    def on_answer(batch, results, server) -> None:
        run.watch.answered(batch, results, server)
        if also is not None:
            also(batch, results)
        if kill_at is not None and not killer and tally.payments >= kill_at:
            killer.append(threading.Thread(target=kill_leader, name="scanpay-demo-kill",
                                           args=(cluster, run.watch.failover, tally.payments),
                                           daemon=True))
            killer[0].start()

    demo.stream_payments(run.console, info, batches, clock, payments, tally, topup_id,
                         run.addresses, 0, on_answer=on_answer, server_of=True)
    return killer[0] if killer else None


def weekend_batches(info, clock, payments: int):
    """The world's plain weekend traffic (world.pay_batches: no shoppers'
    story, no targeted campaigns), `clock` walking the weekend from the
    world's time (only the progress bar shows it: no test clock here)."""
    from engine.demo import WEEKEND_MS
    n_batches = -(-payments // BATCH_RECORDS_MAX)
    left = payments
    for i, batch in enumerate(world_module.pay_batches(info, n_batches, seed=1)):
        batch = batch[:left]
        left -= len(batch)
        clock.now_ms = info.now_ms + WEEKEND_MS * i // n_batches
        yield batch


def report_figures(run: Run, info, targeted: bool):
    """The report's figures (STATS, BALANCES, LIFT: reads) from a follower
    once it has applied the stream up to the leader's last write; from the
    leader if no follower gets there in FOLLOWER_WAIT_S."""
    from engine import demo
    from engine.cli.report import Source
    from engine.client import hello_request
    from engine.protocol.errors import EngineError
    end = run.client.call("HELLO", hello_request())["stream_seq"]
    for address in (a for a in run.addresses if a != run.client.address):
        try:
            with one_node(address) as node:
                deadline = time.monotonic() + FOLLOWER_WAIT_S
                hello = node.call("HELLO", hello_request())
                while hello["role"] == "follower" and hello["stream_seq"] < end:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
                    hello = node.call("HELLO", hello_request())
                if hello["role"] != "follower" or hello["stream_seq"] < end:
                    continue
                figures = demo._figures(Source.of_client(node), info, targeted)
        except (EngineError, OSError, TimeoutError):      # that follower is down: another one
            continue
        run.console.print(f"report read from follower {address} at stream seq "
                          f"{hello['stream_seq']:,} (the leader's last write: {end:,})",
                          highlight=False)
        return figures
    run.console.print("report read from the leader (no follower had applied its last write)")
    return demo._figures(Source.of_client(run.client), info, targeted)


def kill_leader(cluster, failover: Failover, payments: int) -> None:
    """SIGKILL the leader, time the takeover, start the killed node again
    (it rejoins as a follower). Runs on its own thread; errors are noted."""
    from engine.replication.cluster import FOLLOWER
    try:
        leader = cluster.leader()
        if leader is None:
            failover.error = "no single leader to kill"
            return
        failover.killed, failover.killed_address = leader.name, leader.address
        failover.at_payments = payments
        failover.killed_at = time.perf_counter()
        cluster.kill(leader)
        new = cluster.wait_leader(exclude=(leader,))
        failover.new_leader_s = time.perf_counter() - failover.killed_at
        failover.new_leader = new.name
        cluster.start_node(leader)
        cluster.wait_role(leader, FOLLOWER, ROLE_WAIT_S)
        failover.rejoined = True
    except Exception as error:      # noqa: BLE001 - shown in the demo's result
        failover.error = f"{type(error).__name__}: {error}"


# -- after the payments: nothing acknowledged was lost ---------------------------------

def verify(client, watch: Watch, addresses: list[str], user_id: int, audited: tuple,
           every: int | None) -> list[tuple[str, bool, str]]:
    """(check, ok, detail) of each check of the module's docstring.
    `audited`: (the leader's address, its AUDIT after the payments).
    `every`: a local cluster's checkpoint interval, whose digests must then
    reach the last payment's command (AUDIT's `seq`); None (--connect):
    its last checkpoint's do."""
    leader, audit = audited
    nudges_max = NUDGES_REMOTE_MAX if every is None else 2 * every
    end_seq = 0 if every is None else int(audit.get("seq", 0))
    return [check_merchants(client, watch), check_figures(client, watch),
            *check_audits(addresses, leader, audit),
            check_digests(client, addresses, user_id, nudges_max, end_seq)]


def check_merchants(client, watch: Watch) -> tuple[str, bool, str]:
    """STATS per merchant on the leader against the payments answered ok."""
    ids = list(range(1, len(watch.payments) + 1))
    wrong = []
    for at in range(0, len(ids), WIRE_LOOKUP_ITEMS_MAX):
        chunk = ids[at:at + WIRE_LOOKUP_ITEMS_MAX]
        for m in client.call("STATS", {"merchants": chunk})["merchants"]:
            i = m["id"] - 1
            if (m["payments"], m["gmv"]) != (watch.payments[i], watch.gmv[i]):
                wrong.append(f"merchant {m['id']}: {m['payments']} payments, GMV {m['gmv']} "
                             f"there; {watch.payments[i]}, {watch.gmv[i]} answered ok")
    name = "answered payments on the leader (STATS per merchant)"
    if wrong:
        return name, False, f"{len(wrong)} merchants differ, e.g. {wrong[0]}"
    return name, True, (f"{int(watch.payments.sum()):,} payments, GMV {int(watch.gmv.sum()):,} "
                        f"fen, over {len(ids)} merchants: equal")


def check_figures(client, watch: Watch) -> tuple[str, bool, str]:
    """The payments of the frames answered either side of the kill, looked up."""
    frames = list(watch.before) + watch.after
    expected = {}
    for ids, cash, discount, fee in frames:
        expected.update(zip(ids.tolist(), zip(cash.tolist(), discount.tolist(), fee.tolist())))
    ids = sorted(expected)
    wrong = 0
    for at in range(0, len(ids), WIRE_LOOKUP_ITEMS_MAX):
        reply = client.call("GET_PAYMENTS", {"ids": ids[at:at + WIRE_LOOKUP_ITEMS_MAX]})
        for r in reply["results"]:
            if r["status"] != Status.ok or (r["cash"], r["discount"], r["fee"]) != expected[r["id"]]:
                wrong += 1
    where = "around the kill" if watch.failover.killed_at else "of the last frames"
    name = f"payments answered {where}, looked up"
    return name, wrong == 0 and bool(ids), (f"{len(ids):,} payments of {len(frames)} frames: "
                                             f"{'all equal' if not wrong else f'{wrong} differ'}")


def one_node(address: str):
    from engine.client import Client
    from engine.client.failover import Address
    a = Address.parse(address)
    return Client.connect(a.host, a.port, timeout_ms=AUDIT_TIMEOUT_MS, client_name="scanpay-demo")


def audit_check(address: str, audit: dict | None = None) -> tuple[str, bool, str]:
    """AUDIT on one node (`audit`: its reply already in hand)."""
    name = f"AUDIT on {address}"
    try:
        if audit is None:
            with one_node(address) as node:
                audit = node.call("AUDIT", {})
    except Exception as error:      # noqa: BLE001 - a node down is a failed check
        return name, False, f"{type(error).__name__}: {error}"
    failed = [k for k, v in audit.get("checks", {}).items() if not v.get("ok")]
    return name, audit.get("ok") is True, (f"at stream seq {audit.get('stream_seq')}" +
                                           (f"; failed: {', '.join(failed)}" if failed else ""))


def check_audits(addresses: list[str], leader: str, leader_audit: dict) -> list:
    """AUDIT on each node, at the stream seq it has applied: the leader's
    is the demo's own AUDIT; the others run at once, one thread each (an
    AUDIT of a million payments takes tens of seconds on a busy machine)."""
    from concurrent.futures import ThreadPoolExecutor
    others = [a for a in addresses if a != leader]
    with ThreadPoolExecutor(max_workers=max(1, len(others))) as pool:
        found = dict(zip(others, pool.map(audit_check, others)))
    return [audit_check(a, leader_audit) if a == leader else found[a] for a in addresses]


def node_checkpoints(addresses: list[str]) -> dict:
    from engine.client import hello_request
    found = {}
    for address in addresses:
        try:
            with one_node(address) as node:
                found[address] = node.call("HELLO", hello_request())["checkpoint"]
        except Exception:           # noqa: BLE001 - down: no checkpoint
            found[address] = None
    return found


def check_digests(client, addresses: list[str], user_id: int, writes_max: int,
                  after_seq: int) -> tuple[str, bool, str]:
    """Every node at the same checkpoint, at or after command `after_seq`
    (the last payment's), with the same digest. A node digests its state
    only where it applies a checkpoint's command live, not while it replays
    at start: so the killed node has none of its own until a checkpoint
    falls after it rejoined. Up to `writes_max` no-op writes (WALLETS for
    an open wallet: a duplicate, nothing changes) move the command count on
    to the next one; a follower still computing its digest is waited for."""
    name = "state digests at a checkpoint after the payments"
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    writes = 0
    while True:
        found = node_checkpoints(addresses)
        points = {(p["seq"], p["digest"]) for p in found.values() if p}
        if len(points) == 1 and all(found.values()) and next(iter(points))[0] >= after_seq:
            seq, digest = points.pop()
            nudged = f" ({writes} no-op writes to reach it)" if writes else ""
            return name, True, f"command {seq}: {len(found)} nodes agree, {digest[:16]}…{nudged}"
        if time.monotonic() > deadline:
            shown = ", ".join(f"{a}: {p['seq'] if p else 'none'}" for a, p in found.items())
            return name, False, (f"none at or after command {after_seq} on every node after "
                                 f"{writes} no-op writes: {shown}")
        # A burst while far from the next checkpoint, then one write a look:
        # a leader appends a checkpoint record (its digest done in a child)
        # with its next append.
        burst = NUDGE_BURST if writes < writes_max else 1
        for _ in range(burst if writes < writes_max + NUDGE_TAIL_MAX else 0):
            client.call("WALLETS", {"users": [user_id]})
            writes += 1
        time.sleep(NUDGE_PAUSE_S)


def print_replication(console, cluster, addresses: list[str], failover: Failover,
                      checks: list) -> None:
    from rich.table import Table

    from engine.replication.cluster import hello_of
    table = Table(title="Replication: no acknowledged payment lost", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    if cluster is not None:
        roles = ", ".join(f"{m.name} {m.address} {(hello_of(m) or {}).get('role', 'down')}"
                          for m in cluster.nodes)
        table.add_row("nodes now", roles)
    for name, value in failover_rows(failover, cluster is None):
        table.add_row(name, value)
    for name, ok, detail in checks:
        table.add_row(name, ("[green]ok[/] " if ok else "[red]FAILED[/] ") + detail)
    console.print(table)


def failover_rows(failover: Failover, remote: bool) -> list[tuple[str, str]]:
    if remote:
        return [("leader killed", "no (--connect: the demo does not own those processes)")]
    if not failover.killed:
        return [("leader killed", failover.error or "no (--no-kill)")]

    def after(seconds: float | None) -> str:
        return "not seen" if seconds is None else f"{seconds:.2f} s after the kill"
    rows = [("leader killed", f"{failover.killed} ({failover.killed_address}), SIGKILL, after "
                              f"{failover.at_payments:,} payments answered"),
            ("new leader", f"{failover.new_leader or '?'}, {after(failover.new_leader_s)}"),
            ("first PAY it answered", after(failover.first_write_s)),
            ("killed node", "started again; follows" if failover.rejoined
             else f"not back: {failover.error or 'still catching up'}")]
    if failover.error and failover.rejoined:
        rows.append(("error", failover.error))
    return rows
