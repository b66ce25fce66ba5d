"""Throughput of the money lifecycle (CAPTURE, REFUND, SETTLE) through the
embedded, in-memory Engine, next to the kernel PAY rate of the same run.

    .venv/bin/python -m pytest bench/ --benchmark-only -p no:cacheprovider -k lifecycle

(Select with -k, not by naming the file: bench/conftest.py collects bench_*.py
itself, so a file named on the command line would be collected twice.)

- CAPTURE and REFUND run on the standard world (the session fixture of
  bench/conftest.py: 1M users, 10k merchants, 3M coupons). Each round applies
  a fresh batch of 8,190 records through `Engine.capture` / `Engine.refund`
  (CAPTURE_RECORD / REFUND_RECORD batches), and a few rounds go through the
  map ops (`call("CAPTURE", ...)`, `call("REFUND", ...)`) for comparison.
  The authorizations (PAY flag 4) and the completed payments they act on are
  made first, untimed, with `Engine.pay`.
- SETTLE runs on an engine of its own: 10k merchants, the standard world's
  wallets and coupons, and SCANPAY_SETTLE_PAYMENTS (default 10,000,000)
  completed payments made with `Engine.pay` in batches of 8,190; then one
  `call("SETTLE", {})` is timed.
- Every rate is also given per CPU-second of the applying thread: the machine
  is shared, and the wall clock counts the time other tenants held the core.
- Ratios are to the kernel PAY rate (`Engine.kernel_pay` on fresh standard
  batches of 8,190, automatic coupon selection) of the same run: measured
  again right after each CAPTURE/REFUND benchmark (the load moves within
  minutes), and once at the start of the module (extra_info `vs_start_*`).

Knobs (environment): SCANPAY_LC_ROUNDS (records-path rounds, default 100),
SCANPAY_LC_MAP_ROUNDS (map-op rounds, default 10), SCANPAY_SETTLE_PAYMENTS,
SCANPAY_SETTLE_USERS (default 1,000,000), SCANPAY_SETTLE_BUILD_BUDGET_S (stop
making payments after this many seconds and settle what was made; default 420).
"""
from __future__ import annotations

import gc
import os
import pathlib
import statistics
import subprocess
import time

import numpy as np
import pytest

from engine.protocol.records import (CAPTURE_RECORD, PAY_AUTHORIZE, PAY_RESULT, REFUND_RECORD,
                            RESULT_AUTHORIZED)
from engine.protocol.status import Status
from engine.demo.world import (BATCH_RECORDS_MAX, World, build, capacity_for, make_engine,
                          pay_batches, scramble_ids)

from _common import SUMMARY, load, machine, rss_bytes

ROUNDS = int(os.environ.get("SCANPAY_LC_ROUNDS", "100"))
MAP_ROUNDS = int(os.environ.get("SCANPAY_LC_MAP_ROUNDS", "10"))
WARMUP_ROUNDS = 2
BASELINE_BATCHES = 60            # kernel PAY batches for the reference rate
ADJACENT_BATCHES = 30            # kernel PAY batches right after each benchmark
TARGET_CAPTURES_PER_SECOND = 500_000
TARGET_REFUNDS_PER_SECOND = 500_000
TARGET_SETTLE_SECONDS = 2.0
SETTLE_PAYMENTS = int(os.environ.get("SCANPAY_SETTLE_PAYMENTS", "10000000"))
SETTLE_USERS = int(os.environ.get("SCANPAY_SETTLE_USERS", "1000000"))
SETTLE_BUILD_BUDGET_S = float(os.environ.get("SCANPAY_SETTLE_BUILD_BUDGET_S", "420"))
PARTIAL_CAPTURE_SHARE = 0.25     # captures of less than the authorized amount
REFUND_NAMESPACE = 5             # refund ids: scrambled, never colliding with other ids

N = BATCH_RECORDS_MAX
_next_refund = [1]
_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _kernel_mtime() -> float:
    import engine._kernel as kernel
    return os.path.getmtime(kernel.__file__)


_KERNEL_LOADED_MTIME = _kernel_mtime()     # the build this process loaded (about)


def _tree() -> dict:
    """Which engine was measured: HEAD, whether the tree was dirty, and when
    the loaded kernel extension was built. Other work may commit and rebuild
    while a run goes on; the run keeps the kernel it loaded."""
    info = {}
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_ROOT,
                                        capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=_ROOT, capture_output=True, text=True, timeout=10).stdout
        info["dirty"] = bool(dirty.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    stamp = lambda t: time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))  # noqa: E731
    info["kernel_built"] = stamp(_KERNEL_LOADED_MTIME)
    if _kernel_mtime() != _KERNEL_LOADED_MTIME:
        info["kernel_rebuilt_on_disk_during_run"] = stamp(_kernel_mtime())
    return info


# ---------------------------------------------------------------- helpers

def _fresh_batches(standard, seed: int):
    """Endless standard PAY batches with new payment ids (as bench_engine)."""
    while True:
        start = standard.next_payment_id
        standard.next_payment_id += N * 64
        yield from pay_batches(standard.info, 64, seed=seed + start, start_payment_id=start,
                               no_coupon_share=0.0)


def _refund_ids(n: int) -> np.ndarray:
    lo = _next_refund[0]
    _next_refund[0] += n
    seq = np.arange(lo, lo + n, dtype=np.uint64)
    return scramble_ids(seq + (np.uint64(REFUND_NAMESPACE) << np.uint64(56)))


def _statuses(results) -> dict:
    st = np.concatenate([np.asarray(r) for r in results]) if results else np.zeros(0, np.uint32)
    return {Status(int(s)).name: int(c) for s, c in zip(*np.unique(st, return_counts=True))}


def _ok_payments(eng, stream, count: int, authorize: bool) -> tuple[np.ndarray, np.ndarray]:
    """(ids, amounts) of `count` payments made ok through Engine.pay: open
    authorizations (PAY flag 4) or completed payments. Untimed preparation."""
    ids, amounts, have = [], [], 0
    while have < count:
        batch = next(stream)
        if authorize:
            batch["flags"] |= PAY_AUTHORIZE
        res = eng.pay(batch)
        ok = res["status"] == Status.ok
        if authorize:
            ok &= (res["flags"] & RESULT_AUTHORIZED) != 0
        ids.append(batch["id"][ok])
        amounts.append(batch["amount"][ok])
        have += int(ok.sum())
    return np.concatenate(ids)[:count], np.concatenate(amounts)[:count]


class _CpuClock:
    """Adds up the thread CPU time of the timed calls (the wall time is
    pytest-benchmark's)."""

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, fn):
        def timed(*args, **kwargs):
            t = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.thread_time() - t
                self.calls += 1
        return timed


def _rates(benchmark, records: int, cpu: _CpuClock) -> dict:
    s = benchmark.stats.stats
    # cpu counts the warm-up rounds too: per call, then per record
    per_cpu = records / (cpu.seconds / cpu.calls) if cpu.calls and cpu.seconds else float("nan")
    return {"median": records / s.median, "mean": records / s.mean, "best": records / s.min,
            "per_cpu_second": per_cpu}


def _ratio_text(rate: dict, base: dict) -> str:
    return (f"{rate['median'] / base['median']:.2f}x kernel PAY of {base['median']:,.0f}/s "
            f"(wall medians), {rate['per_cpu_second'] / base['per_cpu_second']:.2f}x per CPU-s")


def _ratios(rate: dict, base: dict) -> dict:
    return {"vs_kernel_pay_wall_median": rate["median"] / base["median"],
            "vs_kernel_pay_per_cpu_second": rate["per_cpu_second"] / base["per_cpu_second"],
            "kernel_pay_per_second_median": base["median"],
            "kernel_pay_per_cpu_second": base["per_cpu_second"]}


def _summarize(benchmark, label: str, unit: str, rate: dict, base: dict, target: int,
               statuses: dict, rounds: int, records: int, start: dict | None = None) -> None:
    """`base`: kernel PAY measured right after this benchmark (the ratios);
    `start`: the module's kernel PAY reference, for comparison."""
    if start is not None:
        benchmark.extra_info.update(
            vs_start_kernel_pay_wall_median=rate["median"] / start["median"],
            vs_start_kernel_pay_per_cpu_second=rate["per_cpu_second"] / start["per_cpu_second"])
    benchmark.extra_info.update(
        **{f"{unit}_per_second_median": rate["median"], f"{unit}_per_second_mean": rate["mean"],
           f"{unit}_per_second_best": rate["best"],
           f"{unit}_per_cpu_second": rate["per_cpu_second"]},
        batch_records=records, rounds=rounds, target_per_second=target,
        meets_target=rate["median"] >= target, statuses=statuses,
        machine=machine(), load=load(), tree=_tree(), **_ratios(rate, base))
    SUMMARY[label] = (f"{rate['median']:,.0f} {unit}/s median, {rate['best']:,.0f} best, "
                      f"{rate['per_cpu_second']:,.0f} per CPU-s (target {target:,}); "
                      f"{_ratio_text(rate, base)}; {statuses}; {load()}")


# ---------------------------------------------------------------- kernel PAY reference

def _measure_kernel_pay(standard, batches: int, seed: int) -> dict:
    """Kernel PAY rate now: `batches` fresh standard batches (pre-drawn,
    automatic coupon selection) applied with Engine.kernel_pay, one timed
    call each."""
    eng, now_ms = standard.engine, standard.info.now_ms
    stream = _fresh_batches(standard, seed=seed)
    drawn = [next(stream) for _ in range(batches)]
    out = np.zeros(N, PAY_RESULT)
    walls, cpus = [], []
    for batch in drawn:
        t, c = time.perf_counter(), time.thread_time()
        eng.kernel_pay(batch, now_ms, out)
        cpus.append(time.thread_time() - c)
        walls.append(time.perf_counter() - t)
    return {"median": N / statistics.median(walls), "best": N / min(walls),
            "per_cpu_second": N * len(cpus) / sum(cpus), "batches": batches}


@pytest.fixture(scope="module")
def kernel_pay_rate(standard) -> dict:
    """The kernel PAY rate at the start of this module's run."""
    base = _measure_kernel_pay(standard, BASELINE_BATCHES, seed=31)
    tree = _tree()
    SUMMARY["lifecycle: engine measured"] = (
        f"HEAD {tree.get('commit', '?')}{' + working tree' if tree.get('dirty') else ''}, "
        f"kernel built {tree['kernel_built']}")
    SUMMARY["lifecycle: kernel PAY reference"] = (
        f"{base['median']:,.0f} payments/s median, {base['best']:,.0f} best, "
        f"{base['per_cpu_second']:,.0f} per CPU-s over {BASELINE_BATCHES} batches of {N}; "
        f"{load()}")
    return base


def _adjacent(standard, seed: int) -> dict:
    """Kernel PAY measured right after a lifecycle benchmark: on this shared
    machine the load moves within minutes, so ratios use this one."""
    return _measure_kernel_pay(standard, ADJACENT_BATCHES, seed)


# ---------------------------------------------------------------- CAPTURE

def _capture_amounts(rng, authorized: np.ndarray) -> np.ndarray:
    """The authorized amount, or for a share of them a partial capture."""
    partial = rng.random(len(authorized)) < PARTIAL_CAPTURE_SHARE
    part = np.maximum(1, (authorized * rng.uniform(0.5, 1.0, len(authorized))).astype(np.int64))
    return np.where(partial, part, authorized)


def test_capture_records(benchmark, standard, kernel_pay_rate):
    """Engine.capture of 8,190 CaptureRecords per round, on fresh
    authorizations (made first, untimed, with PAY flag 4)."""
    eng = standard.engine
    rounds = ROUNDS + WARMUP_ROUNDS
    ids, authorized = _ok_payments(eng, _fresh_batches(standard, seed=41), rounds * N,
                                   authorize=True)
    amounts = _capture_amounts(np.random.default_rng(41), authorized)
    batches = []
    for r in range(rounds):
        b = np.zeros(N, CAPTURE_RECORD)
        b["payment"] = ids[r * N:(r + 1) * N]
        b["amount"] = amounts[r * N:(r + 1) * N]
        batches.append(b)
    it = iter(batches)
    outs = []
    cpu = _CpuClock()
    apply = cpu(lambda b: outs.append(eng.capture(b)["status"]))
    benchmark.pedantic(apply, setup=lambda: ((next(it),), {}), rounds=ROUNDS, iterations=1,
                       warmup_rounds=WARMUP_ROUNDS)
    rate = _rates(benchmark, N, cpu)
    _summarize(benchmark, "CAPTURE (Engine.capture, records)", "captures", rate,
               _adjacent(standard, 141), TARGET_CAPTURES_PER_SECOND, _statuses(outs), ROUNDS, N,
               start=kernel_pay_rate)
    benchmark.extra_info["partial_capture_share"] = PARTIAL_CAPTURE_SHARE


def test_capture_map(benchmark, standard, kernel_pay_rate):
    """The same through the CAPTURE map op: call("CAPTURE", {"captures": [...]})
    with 8,190 items per call (encode, journal body, decode, parse, reply maps)."""
    eng = standard.engine
    rounds = MAP_ROUNDS + 1
    ids, authorized = _ok_payments(eng, _fresh_batches(standard, seed=42), rounds * N,
                                   authorize=True)
    amounts = _capture_amounts(np.random.default_rng(42), authorized)
    ids, amounts = ids.tolist(), amounts.tolist()
    requests = [{"captures": [{"payment": ids[i], "amount": amounts[i]}
                              for i in range(r * N, (r + 1) * N)]} for r in range(rounds)]
    it = iter(requests)
    outs = []
    cpu = _CpuClock()
    apply = cpu(lambda req: outs.append([x["status"] for x in eng.call("CAPTURE", req)["results"]]))
    benchmark.pedantic(apply, setup=lambda: ((next(it),), {}), rounds=MAP_ROUNDS, iterations=1,
                       warmup_rounds=1)
    rate = _rates(benchmark, N, cpu)
    _summarize(benchmark, "CAPTURE (map op)", "captures", rate, _adjacent(standard, 142),
               TARGET_CAPTURES_PER_SECOND, _statuses(outs), MAP_ROUNDS, N, start=kernel_pay_rate)


# ---------------------------------------------------------------- REFUND

def _refund_amounts(kind: str, totals: np.ndarray) -> np.ndarray:
    if kind == "full":
        return totals
    return np.maximum(1, totals // 3)            # partial: a third


@pytest.mark.parametrize("kind", ["partial", "full"])
def test_refund_records(benchmark, standard, kernel_pay_rate, kind):
    """Engine.refund of 8,190 RefundRecords per round, each on its own
    completed payment (made first, untimed): a third of the amount
    ("partial") or all of it ("full", which also returns the coupons)."""
    eng = standard.engine
    rounds = ROUNDS + WARMUP_ROUNDS
    ids, totals = _ok_payments(eng, _fresh_batches(standard, seed=51 if kind == "full" else 52),
                               rounds * N, authorize=False)
    amounts = _refund_amounts(kind, totals)
    refund_ids = _refund_ids(rounds * N)
    batches = []
    for r in range(rounds):
        s = slice(r * N, (r + 1) * N)
        b = np.zeros(N, REFUND_RECORD)
        b["id"], b["payment"], b["amount"] = refund_ids[s], ids[s], amounts[s]
        batches.append(b)
    it = iter(batches)
    outs, discount = [], [0]

    ledger = eng.state.ledger
    growth = {"rounds": 0, "cpu_seconds": 0.0}

    def refund(b):
        # The refunds table takes no capacity hint: note the rounds in which
        # it grew (rows copied, index rehashed) and the CPU time they took.
        size, t = (len(ledger.refunds), ledger.refunds_ix.nbytes), time.thread_time()
        res = eng.refund(b)
        if (len(ledger.refunds), ledger.refunds_ix.nbytes) != size:
            growth["rounds"] += 1
            growth["cpu_seconds"] += time.thread_time() - t
        outs.append(res["status"])
        discount[0] += int((res["discount"] != 0).sum())

    cpu = _CpuClock()
    benchmark.pedantic(cpu(refund), setup=lambda: ((next(it),), {}), rounds=ROUNDS,
                       iterations=1, warmup_rounds=WARMUP_ROUNDS)
    rate = _rates(benchmark, N, cpu)
    _summarize(benchmark, f"REFUND {kind} (Engine.refund, records)", "refunds", rate,
               _adjacent(standard, 151 if kind == "full" else 152), TARGET_REFUNDS_PER_SECOND,
               _statuses(outs), ROUNDS, N, start=kernel_pay_rate)
    growth_share = growth["cpu_seconds"] / cpu.seconds if cpu.seconds else 0.0
    benchmark.extra_info.update(kind=kind,
                                with_discount_share=discount[0] / (rounds * N),
                                refunds_table_growth_rounds=growth["rounds"],
                                refunds_table_growth_cpu_share=growth_share,
                                refunds_rows_after=int(ledger.n_refunds))
    SUMMARY[f"REFUND {kind} (Engine.refund, records)"] += (
        f"; refunds table grew in {growth['rounds']} of {rounds} rounds, "
        f"{growth_share:.0%} of the CPU time")


def test_refund_map(benchmark, standard, kernel_pay_rate):
    """REFUND through the map op, 8,190 items per call, half partial and half
    full refunds."""
    eng = standard.engine
    rounds = MAP_ROUNDS + 1
    ids, totals = _ok_payments(eng, _fresh_batches(standard, seed=53), rounds * N,
                               authorize=False)
    amounts = np.where(np.arange(len(totals)) % 2 == 0, totals // 3, totals)
    amounts = np.maximum(1, amounts)
    refund_ids = _refund_ids(rounds * N).tolist()
    ids, amounts = ids.tolist(), amounts.tolist()
    requests = [{"refunds": [{"id": refund_ids[i], "payment": ids[i], "amount": amounts[i]}
                             for i in range(r * N, (r + 1) * N)]} for r in range(rounds)]
    it = iter(requests)
    outs = []
    cpu = _CpuClock()
    apply = cpu(lambda req: outs.append([x["status"] for x in eng.call("REFUND", req)["results"]]))
    benchmark.pedantic(apply, setup=lambda: ((next(it),), {}), rounds=MAP_ROUNDS, iterations=1,
                       warmup_rounds=1)
    rate = _rates(benchmark, N, cpu)
    _summarize(benchmark, "REFUND (map op, half partial)", "refunds", rate,
               _adjacent(standard, 153), TARGET_REFUNDS_PER_SECOND, _statuses(outs), MAP_ROUNDS,
               N, start=kernel_pay_rate)


# ---------------------------------------------------------------- SETTLE

@pytest.mark.timeout(1500)
def test_settle_10m(benchmark, kernel_pay_rate):
    """One SETTLE over 10k merchants after SCANPAY_SETTLE_PAYMENTS completed
    payments, on an engine of its own."""
    spec = World.standard().replace(users=SETTLE_USERS)
    eng, info, m = _settle_world(spec)
    m.update(_settle_payments(eng, info))
    m["rss_paid"], m["peak_paid"] = rss_bytes()
    m["mem"] = eng.memory_bytes()
    m["counts"] = eng.counts()
    m["active"] = int(np.count_nonzero(
        eng.state.ledger.merchants["period_active"][:m["counts"]["merchants"]])) \
        if "period_active" in (eng.state.ledger.merchants.dtype.names or ()) else None

    replies = []
    cpu = _CpuClock()
    benchmark.pedantic(cpu(lambda: replies.append(eng.call("SETTLE", {}))), rounds=1, iterations=1)
    m["settle_s"] = benchmark.stats.stats.min
    m["settle_cpu_s"] = cpu.seconds
    reply = replies[0]
    m["rows"] = len(reply["rows"])
    m["gross"] = sum(r["gross"] for r in reply["rows"])
    # What SETTLE costs without the map-op wrapper: the kernel's settle of an
    # empty period is the floor; time a second SETTLE (no activity) as well.
    t = time.perf_counter()
    empty = eng.call("SETTLE", {})
    m["empty_s"] = time.perf_counter() - t
    m["empty_rows"] = len(empty["rows"])

    benchmark.extra_info.update(_settle_figures(spec, info, m, kernel_pay_rate))
    _settle_summary(spec, m, kernel_pay_rate)
    del eng, info, replies, reply, empty
    gc.collect()
    assert not m["budget_hit"] or m["made"] > 0


def _settle_world(spec):
    """The engine of test_settle_10m (capacity hints reserved) and its world,
    and what building them took."""
    now_ms = spec.now_ms
    capacity = capacity_for(spec, SETTLE_PAYMENTS)
    capacity["merchants"] = spec.merchants
    m = {"rss0": rss_bytes()[0]}
    t0 = time.perf_counter()
    eng = make_engine(lambda: now_ms, capacity)      # reserves (zero-fills) every table
    m["reserve_s"] = time.perf_counter() - t0
    m["rss_reserved"] = rss_bytes()[0]
    t0 = time.perf_counter()
    info = build(eng, spec)
    m["world_s"] = time.perf_counter() - t0
    m["rss_world"] = rss_bytes()[0]
    return eng, info, m


def _settle_payments(eng, info) -> dict:
    """10M completed payments through Engine.pay, batches of 8,190 (fewer if
    SETTLE_BUILD_BUDGET_S runs out), and what they took."""
    gen_s = pay_s = pay_cpu = 0.0
    made = ok = 0
    started = time.perf_counter()
    stream = pay_batches(info, -(-SETTLE_PAYMENTS // N), seed=61)
    budget_hit = False
    while made < SETTLE_PAYMENTS:
        if time.perf_counter() - started > SETTLE_BUILD_BUDGET_S:
            budget_hit = True
            break
        t = time.perf_counter()
        batch = next(stream)[:SETTLE_PAYMENTS - made]
        gen_s += time.perf_counter() - t
        t, c = time.perf_counter(), time.thread_time()
        res = eng.pay(batch)
        pay_cpu += time.thread_time() - c
        pay_s += time.perf_counter() - t
        made += len(batch)
        ok += int((res["status"] == Status.ok).sum())
    return {"made": made, "ok": ok, "gen_s": gen_s, "pay_s": pay_s, "pay_cpu": pay_cpu,
            "payments_s": time.perf_counter() - started, "budget_hit": budget_hit}


def _settle_figures(spec, info, m: dict, base: dict) -> dict:
    made, pay_s, pay_cpu, settle_s = m["made"], m["pay_s"], m["pay_cpu"], m["settle_s"]
    return {
        "payments_requested": SETTLE_PAYMENTS, "payments_made": made, "payments_ok": m["ok"],
        "build_budget_hit": m["budget_hit"], "users": spec.users, "merchants": spec.merchants,
        "settle_seconds": settle_s, "settle_cpu_seconds": m["settle_cpu_s"],
        "settle_rows": m["rows"], "settle_gross": m["gross"],
        "active_merchants_before": m["active"], "empty_settle_seconds": m["empty_s"],
        "empty_settle_rows": m["empty_rows"],
        "target_settle_seconds": TARGET_SETTLE_SECONDS,
        "meets_target": settle_s < TARGET_SETTLE_SECONDS,
        "engine_reserve_seconds": m["reserve_s"], "rss_after_reserve_bytes": m["rss_reserved"],
        "world_build_seconds": m["world_s"], "world_stage_seconds": info.seconds,
        "payments_build_seconds": m["payments_s"], "payments_engine_pay_seconds": pay_s,
        "payments_engine_pay_cpu_seconds": pay_cpu, "payments_generate_seconds": m["gen_s"],
        "engine_pay_per_second": made / pay_s, "engine_pay_per_cpu_second": made / pay_cpu,
        "engine_pay_vs_kernel_pay_wall": (made / pay_s) / base["median"],
        "engine_pay_vs_kernel_pay_cpu": (made / pay_cpu) / base["per_cpu_second"],
        "settle_in_kernel_pay_payments": settle_s * base["median"],
        "kernel_pay_per_second_median": base["median"],
        "rss_before_bytes": m["rss0"], "rss_after_world_bytes": m["rss_world"],
        "rss_after_payments_bytes": m["rss_paid"], "rss_peak_bytes": rss_bytes()[1],
        "memory_bytes": m["mem"], "counts": m["counts"], "machine": machine(), "load": load(),
        "tree": _tree(),
    }


def _settle_summary(spec, m: dict, base: dict) -> None:
    made, pay_s, pay_cpu, settle_s = m["made"], m["pay_s"], m["pay_cpu"], m["settle_s"]
    size = f"{made:,} payments" + (" (build budget hit)" if m["budget_hit"] else "")
    SUMMARY["SETTLE (map op)"] = (
        f"{settle_s * 1000:,.1f} ms for {m['rows']:,} merchant rows after {size} "
        f"(target < {TARGET_SETTLE_SECONDS:g} s); empty period {m['empty_s'] * 1000:.1f} ms; "
        f"= {settle_s * base['median']:,.0f} payments at the kernel PAY rate; {load()}")
    SUMMARY["SETTLE world: building"] = (
        f"engine with capacity hints {m['reserve_s']:.1f} s; "
        f"world {m['world_s']:.1f} s ({spec.users:,} users, {spec.merchants:,} merchants); "
        f"{made:,} payments in {m['payments_s']:.1f} s (Engine.pay {pay_s:.1f} s = "
        f"{made / pay_s:,.0f}/s wall, {made / pay_cpu:,.0f}/CPU-s, "
        f"{(made / pay_s) / base['median']:.2f}x kernel PAY; "
        f"batch drawing {m['gen_s']:.1f} s); ok {m['ok'] / made:.1%}")
    SUMMARY["SETTLE world: memory"] = (
        f"RSS {m['rss0'] / 2**20:,.0f} MiB before, "
        f"{m['rss_reserved'] / 2**20:,.0f} after the reservation, "
        f"{m['rss_world'] / 2**20:,.0f} after the world, "
        f"{m['rss_paid'] / 2**20:,.0f} after the payments (peak {m['peak_paid'] / 2**20:,.0f}); "
        f"payments table {m['mem']['payments'] / 2**20:,.0f} MiB for "
        f"{m['counts']['payments']:,}")
