"""Scan-to-pay demo: a weekend at Riverside Mall, and two targeted campaigns.

Builds the demo world (engine/demo/world.py) in a durable engine on a temporary
data directory eight weeks before the weekend, and pays the shoppers' mall
visits of those eight weeks in process (engine/demo/shoppers.py: the history
segments are drawn from). On Saturday 09:00 it issues the weekend's coupons and
sends two targeted campaigns with a holdout, the same coupon to lapsed
regulars and to shoppers new to the mall (engine/demo/story.py). Then it
starts the socket server and streams the weekend's payments from 16
concurrent gateway connections while the engine clock walks to Sunday 21:00;
the shoppers decide to go to the mall by their own propensity and by whether
they hold a coupon. It prints the throughput, the latency percentiles of the
PAY frames, the coupon campaigns and the AUDIT, writes the campaign report
(read from the running server), and ends with each targeted campaign's extra
payers, their cost, and which campaign paid off (measured by LIFT).
`--embedded` runs the same traffic through `Engine.pay` in process instead.
The exit code is 0 only when AUDIT is ok.

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
from engine.demo import shoppers as behaviour, story
from engine.demo.stop import STOP
from engine.demo.world import (CATEGORIES, DEMO_START_MS, World, WorldBuildError, build,
                               capacity_for, issue_coupons, make_engine)

PAYMENTS_DEFAULT = 1_000_000      # the main job: about a minute on 2 shared cores
WEEKEND_MS = 36 * 3_600_000               # Saturday 09:00 to Sunday 21:00
HISTORY_STEPS_PER_DAY = 2                 # instants a day of the eight weeks before
WEEKEND_STEPS_MIN = 36                    # at least an instant an hour of the weekend
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

    payments: int = 0
    pay_seconds: float = 0.0
    gmv: int = 0
    cash: int = 0
    discount: int = 0
    fees: int = 0
    auto_topups: int = 0
    audit_seconds: float = 0.0
    latency: object = None                          # HdrHistogram of PAY frames (server mode)
    history: int = 0                                # payments of the eight weeks before
    path: str = ""                                  # how it paid, when not the two defaults
    statuses: np.ndarray = field(default=None)
    gmv_by_category: np.ndarray = field(default=None)

    def __post_init__(self):
        self.statuses = np.zeros(STATUS_COUNT, np.int64)
        self.gmv_by_category = np.zeros(len(CATEGORIES), np.int64)


def add_options(p: argparse.ArgumentParser) -> None:
    """The demo's options: on `python -m engine.demo` and on `scanpay demo`."""
    p.add_argument("--payments", type=int, default=PAYMENTS_DEFAULT,
                   help=f"payments in all (default {PAYMENTS_DEFAULT:,}): the eight weeks' "
                        f"mall visits first, the weekend's stream the rest")
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
    """The demo. Ctrl-C (or SIGTERM) stops it at any moment: its server is
    stopped, its engine closed and its data directory removed, and one line
    says so (engine/demo/stop.py, docs/operations.md)."""
    STOP.install()
    try:
        if getattr(args, "cluster", False):
            from engine.demo.cluster import run_cluster
            return run_cluster(args, make_console())
        return _run_here(args)
    finally:
        STOP.uninstall()


def _run_here(args: argparse.Namespace) -> int:
    """The demo in this process (the embedded engine, or its own server)."""
    data_dir = None
    eng = None
    code = 1

    def clean_up() -> None:
        if eng is not None:
            eng.close()
        if data_dir:
            shutil.rmtree(data_dir, ignore_errors=True)

    with STOP.stopping(clean_up):
        console = make_console()
        with STOP.deferred():           # made and named at once, so that it is removed
            data_dir = None if args.embedded else tempfile.mkdtemp(prefix="scanpay-demo-")
        STOP.check()
        spec = World.demo(seed=args.seed, users=args.users)
        clock = SimClock(behaviour.history_start(DEMO_START_MS))
        eng = _make_engine(args, spec, clock, data_dir)
        code = _run(console, args, eng, spec, clock, data_dir)
    return STOP.outcome(code, f"; removed its data directory {data_dir}" if data_dir else "")


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
        shop = behaviour.shoppers(info, clock.now_ms, DEMO_START_MS)
        history, topup_id = _history(console, eng, info, shop, clock)
        launched = _launch(console, eng, info, shop, clock)
    except WorldBuildError as e:
        console.print(f"[red]world build failed:[/] {e}")
        return 2
    weekend = Weekend(info, shop, [r for r, _ in launched], max(args.payments - history, 0),
                      history + 1, topup_id)
    if args.embedded:
        from engine.cli.report import Source
        tally = _stream(console, eng, weekend, clock)
        figures = _figures(Source.of_engine(eng), info)
    else:
        tally, figures = _stream_over_the_wire(console, eng, weekend, clock, data_dir)
    tally.history = history
    t0 = time.perf_counter()
    audit = eng.call("AUDIT", {})
    tally.audit_seconds = time.perf_counter() - t0
    STOP.check()
    _report(console, eng, tally, audit, figures)
    if args.report:
        _write_report(console, figures, args.report)
    _story(console, figures)
    return 0 if audit.get("ok") is True else 1


@dataclass
class Weekend:
    """What the weekend's stream needs: the shoppers, the campaigns' coupon
    ranges, how many payments (beyond the mall visits) and the first id."""
    info: object
    shop: behaviour.Shoppers
    coupon_ranges: list
    payments: int
    first_id: int
    topup_id: int                   # the next auto top-up's id
    start_ms: int = DEMO_START_MS   # Saturday 09:00 (a cluster's demo: a later one)

    def batches(self, clock: SimClock):
        """The weekend's PAY batches, the engine clock set for each."""
        for now, batch in behaviour.stream(self.info, self.shop, 2, self.payments, self.start_ms,
                                           self.start_ms + WEEKEND_MS, self.first_id,
                                           WEEKEND_STEPS_MIN):
            STOP.check()                # (over the wire: the stream's task is cancelled)
            clock.now_ms = now
            yield batch

    def paid(self, batch: np.ndarray, results: np.ndarray) -> None:
        """The shoppers whose payment used a campaign coupon hold it no more."""
        self.shop.redeemed(self.info, batch, results, self.coupon_ranges)


def _write_report(console, figures, out_dir: str) -> None:
    from engine.cli import report
    paths = report.write(figures, out_dir)
    console.print("campaign report: " + ", ".join(paths))
    if report.missing_png_note(paths):
        console.print(report.missing_png_note(paths), markup=False, highlight=False)


def _build(console, eng, spec: World):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    columns = (TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        tasks: dict = {}

        def note(stage: str, done: int, total: int) -> None:
            STOP.check()
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done)

        t0 = time.perf_counter()
        info = build(eng, spec, progress=note, issue=False)
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in info.seconds.items())
    console.print(f"world built in {time.perf_counter() - t0:.1f} s ({stages}): "
                  f"{spec.merchants} merchants, {spec.users:,} wallets, "
                  f"{len(info.stock_ids)} coupon campaigns")
    return info


def _history(console, eng, info, shop: behaviour.Shoppers, clock: SimClock) -> tuple[int, int]:
    """The eight weeks before the weekend: the shoppers' mall visits, paid in
    process (the history the segments are drawn from). Returns the payments
    and the next auto top-up id."""
    t0 = time.perf_counter()
    start = clock.now_ms
    steps = behaviour.HISTORY_DAYS * HISTORY_STEPS_PER_DAY
    tally = Tally()
    topup_id = info.spec.users + 1        # build() used top-up ids 1..users
    with console.status("paying the eight weeks before the weekend (in process)"):
        for now, batch in behaviour.stream(info, shop, 1, 0, start, DEMO_START_MS, 1, steps):
            STOP.check()
            clock.now_ms = now
            res = eng.pay(batch)
            _count(tally, info, batch, res)
            topup_id = _auto_topup(eng, tally, batch, res, topup_id)
    info.seconds["history"] = time.perf_counter() - t0
    console.print(f"eight weeks before the weekend: {tally.payments:,} payments at the mall "
                  f"(in process, {info.seconds['history']:.1f} s)")
    return tally.payments, topup_id


def _launch(console, eng, info, shop: behaviour.Shoppers, clock: SimClock,
            start_ms: int = DEMO_START_MS) -> list:
    """Saturday 09:00 (`start_ms`): the weekend's coupons, and the two
    targeted campaigns (`eng`: an Engine, or a client of a server whose
    clock is there)."""
    clock.now_ms = start_ms
    issue_coupons(eng, info)
    launched = story.launch(eng, info, shop, start_ms)
    console.print(f"Saturday 09:00: {len(info.coupon_ids):,} coupons of "
                  f"{len(info.stock_ids)} campaigns issued; targeted campaigns sent:")
    for t, (_, r) in zip(story.TARGETED, launched):
        console.print(f"  {t.name}: {r['size']:,} shoppers in the segment, {r['issued']:,} "
                      f"coupons issued, {r['holdout']:,} held out ({t.holdout_bps / 100:g} %)")
    return launched


def _figures(source, info, targeted: bool = True):
    """The report's figures (engine/cli/report.py) from a report.Source;
    without the two targeted campaigns when not `targeted` (the cluster
    demo's weekend has none)."""
    from engine.cli import report
    stocks = info.stock_ids.tolist()
    if targeted:
        stocks += [story.STOCK_ID_BASE + i for i in range(len(story.TARGETED))]
    return report.gather(source, stocks, [t.campaign for t in story.TARGETED] if targeted else [],
                         info.merchant_ids.tolist(),
                         merchant_names=dict(zip(info.merchant_ids.tolist(), info.merchant_names)),
                         payer_value=story.PAYER_VALUE)


def _stream(console, eng, weekend: Weekend, clock: SimClock) -> Tally:
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)

    info = weekend.info
    tally = Tally()
    topup_id = weekend.topup_id
    columns = (TextColumn("paying"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[rate]}"), TextColumn("[dim]{task.fields[clock]}"))
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("pay", total=weekend.payments, rate="", clock="")
        for batch in weekend.batches(clock):
            t0 = time.perf_counter()
            res = eng.pay(batch)
            tally.pay_seconds += time.perf_counter() - t0
            _count(tally, info, batch, res)
            weekend.paid(batch, res)
            topup_id = _auto_topup(eng, tally, batch, res, topup_id)
            rate = tally.payments / max(tally.pay_seconds, 1e-9)
            progress.update(task, completed=tally.payments,
                            total=max(weekend.payments, tally.payments),
                            rate=f"{rate / 1e6:.2f} M payments/s",
                            clock=_local_time(clock.now_ms))
    return tally


def _stream_over_the_wire(console, eng, weekend: Weekend, clock: SimClock, data_dir: str):
    """(tally, report figures): the weekend over the wire, then the report's
    figures read from the running server through a client."""
    from engine.cli.report import Source
    from engine.client import Client
    from engine.demo.wire import BackgroundServer

    with STOP.deferred():               # started whole, so that it is stopped whole
        server = BackgroundServer(eng, data_dir)
    try:
        STOP.check()
        console.print(f"server: durable, {data_dir}, listening on {server.host}:{server.port}")
        tally = Tally()
        stream_payments(console, weekend.info, weekend.batches(clock), clock, weekend.payments,
                        tally, weekend.topup_id, server.host, server.port,
                        on_answer=weekend.paid)
        t0 = time.perf_counter()
        with console.status("reading the report from the server (STATS, BALANCES, LIFT)"):
            with Client.connect(server.host, server.port, client_name="scanpay-demo") as client:
                figures = _figures(Source.of_client(client), weekend.info)
        lifts = sum(1 + len(windows) for windows in figures.series.values())
        console.print(f"report read from the running server in {time.perf_counter() - t0:.1f} s "
                      f"(STATS, BALANCES and {lifts} LIFT requests)")
    finally:
        with STOP.deferred():           # it drains and fsyncs before the engine closes
            server.stop()
    STOP.check()
    return tally, figures


def stream_payments(console, info, batches, clock: SimClock, payments: int, tally: Tally,
                    topup_id: int, host, port: int, on_answer=None,
                    server_of: bool = False) -> None:
    """The PAY frames of `batches` (each sets `clock` as it is drawn) to
    `host` (several addresses: a cluster), counted into `tally` with a
    progress bar out of `payments`; dry wallets topped up from id
    `topup_id`. A `("CLOCK", now_ms)` item among the batches goes to the
    server as is (engine/demo/wire.py). `on_answer(batch, results)` after
    each reply, with the answering server's address as a third argument
    when `server_of` (`scanpay demo --cluster`)."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)

    from engine.demo.wire import FRAME_RECORDS, stream

    topup = {"id": topup_id}
    columns = (TextColumn("paying"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[rate]}"), TextColumn("[dim]{task.fields[clock]}"))

    def frames():
        for batch in batches:
            if isinstance(batch, tuple):
                yield batch
                continue
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

        def on_reply(batch, results, *server):
            _count(tally, info, batch, results)
            if on_answer is not None:
                on_answer(batch, results, *server)
            rate = tally.payments / max(time.perf_counter() - started, 1e-9)
            progress.update(task, completed=tally.payments,
                            total=max(payments, tally.payments),
                            rate=f"{rate / 1e3:,.0f} k payments/s", clock=_local_time(clock.now_ms))

        try:
            tally.latency = stream(frames(), host, port, on_reply, dry, server_of=server_of)
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


def _report(console, eng, tally: Tally, audit: dict, figures) -> None:
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

    console.print(_campaign_table(figures))

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
    if tally.history or not tally.path:     # (the cluster demo's plain weekend has none)
        where = "over the wire" if tally.path else "in process"
        head.add_row(f"payments in the eight weeks before ({where})", f"{tally.history:,}")
    head.add_row("payments over the weekend", f"{tally.payments:,}")
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


def _campaign_table(figures):
    """The coupon campaigns, as the report's figures (STATS, BALANCES) have them."""
    from rich.table import Table

    from engine.cli.report import UNLIMITED

    camp = Table(title="Coupon campaigns")
    camp.add_column("campaign", no_wrap=True)
    for col in ("issued", "redeemed", "spent (CNY)", "budget (CNY)", "used"):
        camp.add_column(col, justify="right", no_wrap=True)
    for s in figures.stocks:
        spent, budget = s["discount_spent"], s["budget"]
        used = f"{100 * spent / budget:.1f} %" if budget else "-"
        camp.add_row(s["label"], f"{s['issued']:,}", f"{s['redeemed']:,}", _cny(spent),
                     _cny(budget) if budget else UNLIMITED, used)
    return camp


def _story(console, figures) -> None:
    """The end of the story: each targeted campaign's extra payers with their
    interval, what each cost, and which campaign paid off (LIFT's figures)."""
    from engine.cli.report import verdict_lines

    console.rule("[bold]Targeted campaigns: which one paid off?[/]")
    console.print(f"(an extra payer is worth {_cny(story.PAYER_VALUE)} CNY to the mall; "
                  f"each campaign against its own holdout)", highlight=False)
    for line in verdict_lines(figures):
        console.print(line, markup=False, highlight=False)


if __name__ == "__main__":
    sys.exit(main())
