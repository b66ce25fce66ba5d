"""Scan-to-pay demo: a weekend at Riverside Mall.

Builds the demo world (engine/demo/world.py) in a durable engine on a temporary
data directory, starts the socket server on it, and streams a few million
scan-to-pay payments from 16 concurrent gateway connections while the
engine clock walks from Saturday 09:00 to Sunday 21:00; then prints the
throughput, the latency percentiles of the PAY frames, coupons redeemed by
campaign and the AUDIT, and writes the campaign report. `--embedded` runs the
same traffic through `Engine.pay` in process instead. The exit code is 0 only
when AUDIT is ok.

    scanpay demo [--payments N] [--users N] [--seed N] [--embedded]
    scanpay demo --cluster [--connect HOST:PORT,..] [--no-kill]   (engine/demo/cluster.py)
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from engine.protocol.records import PAY_RESULT
from engine.protocol.status import STATUS_NAMES, Status
from engine.demo.world import (BATCH_RECORDS_MAX, CATEGORIES, DEMO_START_MS, World, WorldBuildError,
                    build, capacity_for, make_engine, pay_batches)

PAYMENTS_DEFAULT = 1_000_000      # the main job: about a minute on 2 shared cores
WEEKEND_MS = 36 * 3_600_000               # Saturday 09:00 to Sunday 21:00
AUTO_TOPUP_AMOUNT = 500_000               # 5,000 CNY, when a wallet runs dry
STATUS_COUNT = max(STATUS_NAMES) + 1
DESCRIPTION = __doc__.split("\n\n")[0]


class SimClock:
    """The engine's clock: set by the demo, batch by batch."""

    def __init__(self, now_ms: int):
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


@dataclass
class Tally:
    """Running totals over the stream, all integers (fen)."""

    stocks: int
    payments: int = 0
    pay_seconds: float = 0.0
    gmv: int = 0
    cash: int = 0
    discount: int = 0
    fees: int = 0
    auto_topups: int = 0
    audit_seconds: float = 0.0
    latency: object = None                          # HdrHistogram of PAY frames (server mode)
    path: str = ""                                  # how it paid, when not the two defaults
    statuses: np.ndarray = field(default=None)
    redeemed: np.ndarray = field(default=None)      # coupons applied, by stock index
    gmv_by_category: np.ndarray = field(default=None)

    def __post_init__(self):
        self.statuses = np.zeros(STATUS_COUNT, np.int64)
        self.redeemed = np.zeros(self.stocks, np.int64)
        self.gmv_by_category = np.zeros(len(CATEGORIES), np.int64)


def add_options(p: argparse.ArgumentParser) -> None:
    """The demo's options: on `python -m engine.demo` and on `scanpay demo`."""
    p.add_argument("--payments", type=int, default=PAYMENTS_DEFAULT,
                   help=f"payments to stream (default {PAYMENTS_DEFAULT:,})")
    p.add_argument("--users", type=int, default=100_000, help="shoppers in the mall")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--embedded", action="store_true",
                   help="pay through the embedded engine instead of the socket server")
    p.add_argument("--report", default="scanpay-report", metavar="DIR",
                   help="where to write the campaign report (CSV + PNG); '' for none")
    p.add_argument("--cluster", action="store_true",
                   help="through a replicated cluster: a local one (3 NATS servers, 3 nodes) "
                        "whose leader is killed mid-run, or --connect's (engine/demo/cluster.py)")
    p.add_argument("--connect", metavar="HOST:PORT,..",
                   help="with --cluster: the nodes of a running cluster (scanpay cluster up)")
    p.add_argument("--no-kill", dest="no_kill", action="store_true",
                   help="with --cluster: do not kill the leader mid-run")


def check_options(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.payments < 1 or args.users < 10:
        p.error("--payments must be >= 1 and --users >= 10")
    if (args.connect or args.no_kill) and not args.cluster:
        p.error("--connect and --no-kill go with --cluster")
    if args.cluster and args.embedded:
        p.error("--cluster runs over the wire: leave --embedded out")


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engine.demo", description=DESCRIPTION)
    add_options(p)
    args = p.parse_args(argv)
    check_options(p, args)
    return args


def main(argv=None) -> int:
    return run(parse(argv))


def run(args: argparse.Namespace) -> int:
    """The demo; Ctrl-C stops it and still removes its data directory."""
    if getattr(args, "cluster", False):
        from engine.demo.cluster import run_cluster
        return run_cluster(args, make_console())
    console = make_console()
    data_dir = None if args.embedded else tempfile.mkdtemp(prefix="scanpay-demo-")
    eng = None
    interrupted = False
    try:
        spec = World.demo(seed=args.seed, users=args.users)
        clock = SimClock(DEMO_START_MS)
        eng = _make_engine(args, spec, clock, data_dir)
        return _run(console, args, eng, spec, clock, data_dir)
    except KeyboardInterrupt:
        interrupted = True
        return 130                          # the shell's code for "stopped by SIGINT"
    finally:
        if eng is not None:
            eng.close()
        if data_dir:
            shutil.rmtree(data_dir, ignore_errors=True)
        if interrupted:
            where = f"; removed its data directory {data_dir}" if data_dir else ""
            print(f"scanpay demo: interrupted{where}", file=sys.stderr, flush=True)


def make_console():
    from rich.console import Console
    # Piped output gets 80 columns from rich; the campaign table needs more.
    return Console() if sys.stdout.isatty() else Console(width=120)


def _make_engine(args, spec: World, clock: SimClock, data_dir: str | None):
    if data_dir is None:
        return make_engine(clock, capacity_for(spec, args.payments))
    from engine import Engine
    from engine.server.config import Config
    defaults = Config()                     # durable as `scanpay serve` is by default
    return Engine(data_dir, clock=clock, capacity=capacity_for(spec, args.payments),
                  commit_interval_us=defaults.commit_interval_us,
                  commit_siblings=defaults.commit_siblings,
                  journal_prealloc=defaults.journal_prealloc,
                  io_threads_nice=defaults.io_threads_nice)


def _run(console, args, eng, spec: World, clock: SimClock, data_dir: str | None) -> int:
    console.rule(f"[bold]Scanpay demo: a weekend at Riverside Mall[/] ({spec.users:,} shoppers)")
    try:
        info = _build(console, eng, spec)
    except WorldBuildError as e:
        console.print(f"[red]world build failed:[/] {e}")
        return 2
    if args.embedded:
        tally = _stream(console, eng, info, clock, args.payments)
    else:
        tally = _stream_over_the_wire(console, eng, info, clock, args.payments, data_dir)
    t0 = time.perf_counter()
    audit = eng.call("AUDIT", {})
    tally.audit_seconds = time.perf_counter() - t0
    _report(console, eng, info, tally, audit)
    if args.report:
        from engine.cli import report
        paths = report.write(
            eng, args.report,
            stock_names=dict(zip(info.stock_ids.tolist(), info.stock_names)),
            merchant_names=dict(zip(info.merchant_ids.tolist(), info.merchant_names)))
        console.print("campaign report: " + ", ".join(paths))
        if report.missing_png_note(paths):
            console.print(report.missing_png_note(paths), markup=False, highlight=False)
    return 0 if audit.get("ok") is True else 1


def _build(console, eng, spec: World):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    columns = (TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        tasks: dict = {}

        def note(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done)

        t0 = time.perf_counter()
        info = build(eng, spec, progress=note)
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in info.seconds.items())
    console.print(f"world built in {time.perf_counter() - t0:.1f} s ({stages}): "
                  f"{spec.merchants} merchants, {len(info.stock_ids)} campaigns, "
                  f"{len(info.coupon_ids):,} coupons issued")
    return info


def _stream(console, eng, info, clock: SimClock, payments: int) -> Tally:
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)

    tally = Tally(stocks=len(info.stock_ids))
    n_batches = -(-payments // BATCH_RECORDS_MAX)
    topup_id = info.spec.users + 1        # build() used top-up ids 1..users
    columns = (TextColumn("paying"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[rate]}"), TextColumn("[dim]{task.fields[clock]}"))
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("pay", total=payments, rate="", clock="")
        left = payments
        for i, batch in enumerate(pay_batches(info, n_batches, seed=1)):
            batch = batch[:left]
            left -= len(batch)
            clock.now_ms = DEMO_START_MS + WEEKEND_MS * i // n_batches
            t0 = time.perf_counter()
            res = eng.pay(batch)
            tally.pay_seconds += time.perf_counter() - t0
            _count(tally, info, batch, res)
            topup_id = _auto_topup(eng, tally, batch, res, topup_id)
            rate = tally.payments / max(tally.pay_seconds, 1e-9)
            progress.update(task, completed=tally.payments,
                            rate=f"{rate / 1e6:.2f} M payments/s",
                            clock=_local_time(clock.now_ms))
    return tally


def _stream_over_the_wire(console, eng, info, clock: SimClock, payments: int,
                          data_dir: str) -> Tally:
    from engine.demo.wire import BackgroundServer

    tally = Tally(stocks=len(info.stock_ids))
    server = BackgroundServer(eng, data_dir)
    console.print(f"server: durable, {data_dir}, listening on {server.host}:{server.port}")
    try:
        stream_payments(console, info, clock, payments, tally, server.host, server.port)
    finally:
        server.stop()
    return tally


def stream_payments(console, info, clock: SimClock, payments: int, tally: Tally, host, port: int,
                    on_answer=None, send_clock: bool = False) -> None:
    """The weekend's PAY frames to `host` (several addresses: a cluster),
    counted into `tally` with a progress bar; dry wallets topped up.
    `on_answer(batch, results, server)` after each reply; `send_clock`: a
    CLOCK before each batch (a server with a test clock walks the weekend)."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)

    from engine.demo.wire import FRAME_RECORDS, stream

    n_batches = -(-payments // BATCH_RECORDS_MAX)
    topup = {"id": info.spec.users + 1}
    columns = (TextColumn("paying"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[rate]}"), TextColumn("[dim]{task.fields[clock]}"))

    def frames():
        left = payments
        for i, batch in enumerate(pay_batches(info, n_batches, seed=1)):
            batch = batch[:left]
            left -= len(batch)
            clock.now_ms = info.now_ms + WEEKEND_MS * i // n_batches
            if send_clock:
                yield ("CLOCK", clock.now_ms)
            for at in range(0, len(batch), FRAME_RECORDS):
                yield batch[at:at + FRAME_RECORDS]

    def dry(users: np.ndarray) -> list:
        items = [{"id": topup["id"] + k, "user": int(u), "amount": AUTO_TOPUP_AMOUNT}
                 for k, u in enumerate(users.tolist())]
        topup["id"] += len(items)
        tally.auto_topups += len(items)
        return items

    started = time.perf_counter()
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("pay", total=payments, rate="", clock="")

        def on_reply(batch, results, server=None):
            _count(tally, info, batch, results)
            if on_answer is not None:
                on_answer(batch, results, server)
            rate = tally.payments / max(time.perf_counter() - started, 1e-9)
            progress.update(task, completed=tally.payments, rate=f"{rate / 1e3:,.0f} k payments/s",
                            clock=_local_time(clock.now_ms))

        try:
            tally.latency = stream(frames(), host, port, on_reply, dry,
                                   server_of=on_answer is not None)
        finally:
            tally.pay_seconds = time.perf_counter() - started


def _local_time(now_ms: int) -> str:
    return time.strftime("%a %H:%M", time.gmtime((now_ms + 8 * 3_600_000) / 1000))


def _count(tally: Tally, info, batch: np.ndarray, res: np.ndarray) -> None:
    assert res.dtype == PAY_RESULT and len(res) == len(batch)
    tally.payments += len(batch)
    tally.statuses += np.bincount(res["status"], minlength=STATUS_COUNT)[:STATUS_COUNT]
    ok = res["status"] == Status.ok
    amounts = batch["amount"][ok]
    tally.gmv += int(amounts.sum())
    tally.cash += int(res["cash"][ok].sum())
    tally.discount += int(res["discount"][ok].sum())
    tally.fees += int(res["fee"][ok].sum())
    # Demo merchant ids are 1..n, so id - 1 is the merchant's index.
    cats = info.merchant_category[(batch["merchant"][ok] - 1).astype(np.int64)]
    for c in range(len(CATEGORIES)):   # integer sums: money never goes through floats
        tally.gmv_by_category[c] += int(amounts[cats == c].sum())
    applied = res["coupons"][ok].reshape(-1)
    applied = applied[applied != 0]
    if len(applied):
        stocks = info.stock_of_coupons(applied)
        at = np.searchsorted(info.stock_ids, stocks)
        tally.redeemed += np.bincount(at, minlength=len(info.stock_ids))[:len(info.stock_ids)]


def _auto_topup(eng, tally: Tally, batch, res, topup_id: int) -> int:
    """Shoppers whose wallet ran dry top up 5,000 CNY (their failed payment stays failed)."""
    dry = np.unique(batch["payer"][res["status"] == Status.insufficient_funds])
    if len(dry) == 0:
        return topup_id
    items = [{"id": topup_id + k, "user": u, "amount": AUTO_TOPUP_AMOUNT}
             for k, u in enumerate(dry.tolist())]
    results = eng.call("TOPUP", {"topups": items})["results"]
    tally.auto_topups += sum(1 for r in results if r["status"] == Status.ok)
    return topup_id + len(items)


def _cny(fen: int) -> str:
    return f"{fen / 100:,.2f}" if abs(fen) < 10**15 else f"{fen // 100:,}"


def _report(console, eng, info, tally: Tally, audit: dict) -> None:
    from rich.table import Table

    console.print(_summary_table(eng, tally))

    st = Table(title="Payments by status")
    st.add_column("status")
    st.add_column("code", justify="right")
    st.add_column("payments", justify="right")
    for code in np.nonzero(tally.statuses)[0]:
        st.add_row(STATUS_NAMES[int(code)], str(int(code)), f"{int(tally.statuses[code]):,}")
    console.print(st)

    cat = Table(title="GMV by category")
    cat.add_column("category")
    cat.add_column("GMV (CNY)", justify="right")
    for c, row in enumerate(CATEGORIES):
        cat.add_row(row[0], _cny(int(tally.gmv_by_category[c])))
    console.print(cat)

    console.print(_campaign_table(eng, info, tally))

    au = Table(title=f"AUDIT: {'[green]ok' if audit.get('ok') else '[red]FAILED'}")
    au.add_column("check")
    au.add_column("ok")
    au.add_column("detail")
    for name, check in audit.get("checks", {}).items():
        au.add_row(name, "[green]ok" if check.get("ok") else "[red]FAIL", str(check.get("detail", "")))
    console.print(au)


def _summary_table(eng, tally: Tally):
    from rich.table import Table

    rate = tally.payments / max(tally.pay_seconds, 1e-9)
    ok = int(tally.statuses[Status.ok])
    head = Table(title="Weekend summary", show_header=False)
    head.add_column(style="bold")
    head.add_column(justify="right")
    head.add_row("payments", f"{tally.payments:,}")
    over_the_wire = tally.latency is not None
    # What pay_seconds measured: the wall time of the whole stream over the
    # wire (16 connections, fsyncs, auto top-ups), or the time spent inside
    # Engine.pay calls in process.
    head.add_row("wall time of the stream over the wire" if over_the_wire
                 else "time in Engine.pay", f"{tally.pay_seconds:.2f} s")
    path = "over the wire, durable" if over_the_wire else "Engine.pay, in memory"
    path = tally.path or path
    head.add_row(f"payments/second ({path})", f"{rate:,.0f}")
    head.add_row("payments ok", f"{ok:,}")
    head.add_row("payments failed", f"{tally.payments - ok:,}")
    head.add_row("GMV (CNY)", _cny(tally.gmv))
    head.add_row("paid from wallets (CNY)", _cny(tally.cash))
    head.add_row("coupon discounts (CNY)", _cny(tally.discount))
    head.add_row("platform fees (CNY)", _cny(tally.fees))
    head.add_row("auto top-ups (wallets ran dry)", f"{tally.auto_topups:,}")
    if hasattr(eng, "memory_bytes"):        # an engine here, not a client of a cluster
        mem = eng.memory_bytes()
        head.add_row("engine tables (MiB)", ", ".join(f"{k} {v / 2**20:,.0f}"
                                                      for k, v in mem.items() if v))
    head.add_row("AUDIT time", f"{tally.audit_seconds:.1f} s")
    if tally.latency is not None:
        p = {q: tally.latency.get_value_at_percentile(q) / 1000 for q in (50, 99, 99.9)}
        head.add_row("PAY frame latency (ms, 512 records)",
                     f"p50 {p[50]:,.1f}, p99 {p[99]:,.1f}, p99.9 {p[99.9]:,.1f}")
    return head


def _campaign_table(eng, info, tally: Tally):
    from rich.table import Table

    balances = eng.call("BALANCES", {"stocks": info.stock_ids.tolist()})
    by_id = {s["id"]: s for s in balances.get("stocks", [])}
    camp = Table(title="Coupons redeemed by campaign")
    camp.add_column("campaign", no_wrap=True)
    camp.add_column("funder")
    for col in ("issued", "redeemed", "spent (CNY)", "budget (CNY)", "used"):
        camp.add_column(col, justify="right", no_wrap=True)
    for i, name in enumerate(info.stock_names):
        sid = int(info.stock_ids[i])
        s = by_id.get(sid, {})
        spent, budget = int(s.get("spent", 0)), int(s.get("budget", info.stock_defs[i].get("budget", 0)))
        used = f"{100 * spent / budget:.1f} %" if budget else "no limit"
        camp.add_row(name, info.stock_defs[i]["funder"], f"{int(s.get('issued', 0)):,}",
                     f"{int(tally.redeemed[i]):,}", _cny(spent), _cny(budget) if budget else "-", used)
    return camp


if __name__ == "__main__":
    sys.exit(main())
