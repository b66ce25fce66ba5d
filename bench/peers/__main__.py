"""Run the peers benchmark: python -m bench.peers [options] (README.md).

Every peer's final state must equal Scanpay's (the oracle: the embedded
engine on the same workload) before any figure is printed; a mismatch stops
the run with a diff and exit code 1.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time

from bench._common import load, machine

from . import ledger, postgres_peer, redis_peer, scanpay_peer, sqlite_peer
from .common import Run
from .report import chart, table
from .workload import FinalState, Workload, diff, generate

PEERS = ("scanpay", "ledger", "postgres", "redis", "sqlite")
CLOCK = time.perf_counter
CHECKED: list[str] = []         # every run whose state was checked, kept or not


class Mismatch(Exception):
    pass


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n\n")[0])
    p.add_argument("--payments", type=int, default=100_000,
                   help="payments of the many-callers (and batched) runs (default 100,000)")
    p.add_argument("--one-caller-payments", type=int, default=5_000,
                   help="the first N payments, for peers that wait for a disk flush per "
                        "payment in the one-caller column (default 5,000)")
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--merchants", type=int, default=200)
    p.add_argument("--callers", type=int, default=16,
                   help="connections/threads of the many-callers runs, = shards (default 16)")
    p.add_argument("--in-flight", type=int, default=64,
                   help="1-record frames in flight per connection, Scanpay over TCP (default 64)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--repeat", type=int, default=3,
                   help="runs (median kept) of the sub-second ones: Scanpay batched "
                        "(embedded, durable, TCP frames) and the Python ledger (default 3)")
    p.add_argument("--peers", default=",".join(PEERS),
                   help=f"comma-separated subset of {','.join(PEERS)} (Scanpay always runs)")
    p.add_argument("--chart", default="peers.png", help="where to write the PNG chart")
    p.add_argument("--json", help="also write every figure and digest to this file")
    p.add_argument("--tmp", help="parent of the temp dir for data (default: the system's)")
    args = p.parse_args(argv)
    args.peers = {x.strip() for x in args.peers.split(",") if x.strip()} | {"scanpay"}
    if not args.peers <= set(PEERS):
        p.error(f"unknown peers: {sorted(args.peers - set(PEERS))}")
    if not 1 <= args.one_caller_payments <= args.payments:
        p.error("--one-caller-payments must be 1..--payments")
    if not 1 <= args.repeat <= 99:
        p.error("--repeat must be 1..99")
    if not 2 <= args.callers <= 64 or not 1 <= args.in_flight <= 4096:
        p.error("--callers must be 2..64 and --in-flight 1..4096")
    return args


def check(run: Run, expected: FinalState, out: list[Run]) -> None:
    """A figure counts only if the peer ended exactly where Scanpay did."""
    got = run.state.digest()
    if got != expected.digest():
        lines = "\n".join(diff(expected, run.state))
        raise Mismatch(f"{run.peer} ({run.how}) ended in another state than Scanpay "
                       f"after {run.payments:,} payments:\n  state hash {got}\n  "
                       f"Scanpay's   {expected.digest()}\n"
                       f"first differences (- Scanpay, + {run.peer}):\n{lines}")
    print(f"  {run.peer:<28} {run.column:<4} {run.rate:>12,.0f} payments/s  "
          f"state {got[:16]} = Scanpay's", flush=True)
    CHECKED.append(run.peer)
    out.append(run)


def median_run(make, times: int, expected: FinalState, out: list[Run]) -> None:
    """Runs whose timed part is well under a second are at the mercy of one
    preemption on a shared machine: make them `times` times, each from a
    fresh state and each checked, and keep the one with the median rate."""
    tries: list[Run] = []
    for _ in range(times):
        check(make(), expected, tries)
    tries.sort(key=lambda r: r.rate)
    kept = tries[len(tries) // 2]
    if times > 1:
        kept.how += f", median of {times} runs ({tries[0].rate:,.0f}-{tries[-1].rate:,.0f}/s)"
        print(f"  {kept.peer:<28} {kept.column:<4} {kept.rate:>12,.0f} payments/s  "
              f"kept (median of {times})", flush=True)
    out.append(kept)


def scanpay_runs(wl: Workload, full, one, args, tmp: str, runs: list[Run]) -> dict:
    """Scanpay first: its embedded batched runs are the oracle (untimed; they
    also warm the process up), then Scanpay's measured runs."""
    expected = {len(p): scanpay_peer.embedded(wl, p, batched=True, path=None,
                                              clock=CLOCK).state for p in (one, full)}
    median_run(lambda: scanpay_peer.embedded(wl, full, batched=True, path=None, clock=CLOCK),
               args.repeat, expected[len(full)], runs)
    check(scanpay_peer.embedded(wl, full, batched=False, path=None, clock=CLOCK),
          expected[len(full)], runs)
    median_run(lambda: scanpay_peer.embedded(wl, full, batched=True, clock=CLOCK,
                                             path=tempfile.mkdtemp(dir=tmp)),
               args.repeat, expected[len(full)], runs)
    check(scanpay_peer.embedded(wl, one, batched=False, path=tempfile.mkdtemp(dir=tmp),
                                clock=CLOCK), expected[len(one)], runs)
    wire = dict(callers=args.callers, in_flight=args.in_flight, tmp=tmp, clock=CLOCK)
    median_run(lambda: scanpay_peer.over_the_wire(wl, full, mode="batched", **wire),
               args.repeat, expected[len(full)], runs)
    for mode, payments in (("single", full), ("one", one)):
        check(scanpay_peer.over_the_wire(wl, payments, mode=mode, **wire),
              expected[len(payments)], runs)
    return expected


def peer_runs(wl, full, one, args, tmp, expected, runs: list[Run]) -> None:
    if "ledger" in args.peers:
        median_run(lambda: ledger.run(wl, full, CLOCK), args.repeat, expected[len(full)], runs)
    if "postgres" in args.peers:
        pg = postgres_peer.Postgres(tmp)
        try:
            for callers, payments in ((args.callers, full), (1, one)):
                check(postgres_peer.run(pg, wl, payments, callers=callers, clock=CLOCK),
                      expected[len(payments)], runs)
        finally:
            pg.stop()
    if "redis" in args.peers:
        server = redis_peer.Redis(tmp)
        try:
            for callers, payments in ((args.callers, full), (1, one)):
                check(redis_peer.run(server, wl, payments, callers=callers, clock=CLOCK),
                      expected[len(payments)], runs)
        finally:
            server.stop()
    if "sqlite" in args.peers:
        for callers, payments in ((args.callers, full), (1, one)):
            check(sqlite_peer.run(tmp, wl, payments, callers=callers, clock=CLOCK),
                  expected[len(payments)], runs)


def main(argv=None) -> int:
    args = parse(argv)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    wl = generate(args.seed, users=args.users, merchants=args.merchants,
                  payments=args.payments, shards=args.callers)
    full, one = wl.payments, wl.payments[:args.one_caller_payments]
    load_start = load()
    print(f"peers benchmark, {started}: {machine()}, {load_start}")
    print(f"workload seed {args.seed}: {len(wl.users):,} users, {len(wl.merchants):,} merchants, "
          f"{len(wl.stocks)} stocks, {len(wl.coupons):,} coupons, {len(full):,} payments "
          f"({len(one):,} for the one-caller runs of durable peers), {args.callers} shards",
          flush=True)
    tmp = tempfile.mkdtemp(prefix="scanpay-peers-", dir=args.tmp)
    runs: list[Run] = []
    try:
        expected = scanpay_runs(wl, full, one, args, tmp, runs)
        peer_runs(wl, full, one, args, tmp, expected, runs)
    except Mismatch as e:
        print(f"\nMISMATCH, no figure counts:\n{e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: the servers it started are stopped, its temp dir removed",
              file=sys.stderr)
        return 130
    except ImportError as e:
        print(f"peers benchmark: {e}; install the drivers: pip install -e '.[peers]'",
              file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as e:     # a server that is missing or did not start
        print(f"peers benchmark: {e}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    final = expected[len(full)]
    exhausted = sum(1 for s in wl.stocks.values() if s.budget - final.spent[s.id] < 2_000)
    print(f"\nall {len(CHECKED)} runs ({len(runs)} figures) ended in Scanpay's state "
          f"(hash {final.digest()}); "
          f"outcomes of the {len(full):,} payments: {final.outcomes}; "
          f"{exhausted} of {len(wl.stocks)} stocks have under 20.00 of budget left\n")
    print(table(runs, started, f"at the start {load_start}, at the end {load()}"))
    chart(runs, args.chart, f"{started}, {machine()}")
    print(f"\nchart: {args.chart}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"started": started, "machine": machine(), "args": vars(args) | {
                "peers": sorted(args.peers)}, "state_hash": final.digest(),
                "outcomes": final.outcomes,
                "runs": [r.summary() for r in runs]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
