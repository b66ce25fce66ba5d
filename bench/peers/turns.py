"""One caller, Scanpay and PostgreSQL in turns: python -m bench.peers.turns [options]

The one-caller column of `python -m bench.peers` gives each peer its own
few seconds, so on a shared machine a burst of other work can land in one
peer's seconds and not in the other's (docs/performance.md, "One caller:
where the tail comes from"). Here one client pays the same payments, one at
a time, into a Scanpay server and into PostgreSQL in turns: blocks of
`--block` payments each, the two in an order drawn afresh for every block,
so that both meet the same moments of the machine. Each peer's final state
must equal the embedded engine's before any figure is printed.
"""
from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time

from bench._common import load, machine

from .common import Run
from .workload import diff, generate, outcome_name, tally

CLOCK = time.perf_counter
ORDER_SEED = 11                 # the order of the peers within each block


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.peers.turns",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--payments", type=int, default=3_000)
    p.add_argument("--block", type=int, default=500,
                   help="payments each peer takes in a row before the other's turn")
    p.add_argument("--users", type=int, default=3_000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--tmp", help="parent of the temp dir for data (default: the system's)")
    args = p.parse_args(argv)
    if not 1 <= args.payments <= 1_000_000 or not 1 <= args.block <= args.payments:
        p.error("--payments must be 1..1,000,000 and --block 1..--payments")
    return args


async def in_turns(payers: dict, count: int, block: int, clock=CLOCK) -> dict:
    """Payment k = 0..count-1 through each of `payers` (name -> async
    pay(k) -> outcome name), blocks of `block` payments per peer in turn,
    the peers' order shuffled for every block. Returns name -> (outcome
    names in payment order, latencies in seconds)."""
    out = {name: ([], []) for name in payers}
    order = random.Random(ORDER_SEED)
    names = list(payers)
    for lo in range(0, count, block):           # bounded by count
        order.shuffle(names)
        for name in names:
            outcomes, latencies = out[name]
            for k in range(lo, min(lo + block, count)):
                started = clock()
                outcomes.append(await payers[name](k))
                latencies.append(clock() - started)
    return out


def scanpay_payer(client, payments):
    """An async pay(k) through `client` (AsyncClient), one 1-record frame."""
    from engine.protocol.records import RESULT_DUPLICATE
    from .scanpay_peer import records
    recs = records(payments)

    async def pay(k: int) -> str:
        r = (await client.pay(recs[k:k + 1]))[0]
        return outcome_name(int(r["status"]), bool(r["flags"] & RESULT_DUPLICATE))
    return pay


def blocking_payer(pay_one, payments):
    """An async pay(k) around a blocking pay_one(payment) (psycopg's)."""
    async def pay(k: int) -> str:
        return pay_one(payments[k])
    return pay


async def _run(port: int, pg_conn, payments, block: int) -> dict:
    from engine.client import AsyncClient
    from . import postgres_peer
    async with await AsyncClient.connect("127.0.0.1", port, timeout_ms=120_000) as client:
        return await in_turns({"Scanpay over TCP": scanpay_payer(client, payments),
                               "PostgreSQL": blocking_payer(postgres_peer.payer(pg_conn),
                                                            payments)},
                              len(payments), block)


def measure(wl, payments, block: int, tmp: str) -> list[Run]:
    """Both servers started and set up, the turns run, both final states read."""
    import uvloop
    from engine.client import Client
    from . import postgres_peer, scanpay_peer
    server = scanpay_peer.Server(tmp, wl, "turns")
    pg = None
    try:
        pg = postgres_peer.Postgres(tmp)
        with Client.connect("127.0.0.1", server.port, timeout_ms=120_000) as admin, \
                pg.connect() as pg_conn:
            scanpay_peer.setup(admin, wl)
            postgres_peer.setup(pg_conn, wl)
            scanpay_peer.wait_spare_filled(server.data, "Scanpay over TCP, in turns")
            out = uvloop.run(_run(server.port, pg_conn, payments, block))
            states = {"Scanpay over TCP": scanpay_peer.final_state(
                          admin, wl, tally(out["Scanpay over TCP"][0])),
                      "PostgreSQL": postgres_peer.final_state(pg_conn, tally(out["PostgreSQL"][0]))}
    finally:
        server.stop()
        if pg is not None:
            pg.stop()
    how = f"1 connection, 1 in flight, in turns of {block} payments"
    return [Run(name, "one", how, len(payments), sum(lat), lat, "payment", states[name])
            for name, (_, lat) in out.items()]


def report(runs: list[Run], started: str, loads: str) -> str:
    lines = [f"One caller in turns, {started} ({loads}):", "",
             "| peer | payments/s | p50 / p99 / p99.9 ms | measured |", "|---|--:|--:|---|"]
    for r in runs:
        lines.append(f"| {r.peer} | {r.rate:,.0f} | {r.percentile_ms(50):.3g} / "
                     f"{r.percentile_ms(99):.3g} / {r.percentile_ms(99.9):.3g} | "
                     f"{r.payments:,} payments, {r.how} |")
    lines.append(f"\nScanpay / PostgreSQL: {runs[0].rate / runs[1].rate:.2f}x "
                 "(rates from the sum of each peer's own latencies)")
    return "\n".join(lines)


def main(argv=None) -> int:
    from .scanpay_peer import embedded
    args = parse(argv)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    wl = generate(args.seed, users=args.users, merchants=200, payments=args.payments, shards=16)
    expected = embedded(wl, wl.payments, batched=True, path=None, clock=CLOCK).state
    load_start = load()
    print(f"one caller in turns, {started}: {machine()}, {load_start}", flush=True)
    tmp = tempfile.mkdtemp(prefix="scanpay-turns-", dir=args.tmp)
    try:
        runs = measure(wl, wl.payments, args.block, tmp)
    except (RuntimeError, OSError, ImportError) as e:    # a server missing or not started
        print(f"turns: {e}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for r in runs:
        if r.state.digest() != expected.digest():
            print(f"MISMATCH: {r.peer} ended in another state than Scanpay embedded:\n"
                  + "\n".join(diff(expected, r.state)), file=sys.stderr)
            return 1
    print(report(runs, started, f"at the start {load_start}, at the end {load()}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
