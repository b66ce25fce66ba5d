"""Growth without stalls (issue 16): the same payments through an engine
sized up front and through one that was not, batch by batch, side by side.

    .venv/bin/python -m pytest bench/bench_growth.py --benchmark-only -p no:cacheprovider
    .venv/bin/python bench/bench_growth.py [--users N] [--payments N]   # the same, as a script

Two engines get the same world (`World.standard()`: 1M users, 3M coupons):
one with capacity hints for the world and the payments (`capacity_for`), one
as a new user writes it, `Engine()`. Then the same batches of 8,190
payments go through `Engine.pay` on both, alternating which engine goes
first, so that the machine's noise falls on both alike. Every batch's
results must be identical on both; so must the digests at the end.

Targets: without hints, at least 90 % of the hinted rate; no batch over 10x
the median batch.

`--memory warm` touches and frees about as much memory as the unhinted
engine will grow by, right before the timed batches, so that its fresh pages
cost what a machine charges to zero them, not what this VM's host charges to
back guest pages it took back (virtio-balloon free page reporting returns
freed guest memory within seconds; backing it again costs 1.0-2.1 CPU-s per
840 MiB here, 0.09-0.16 right after a free). Both engines run the same batches
either way; the warm-up only changes what the unhinted engine's growth costs.
Every run prints what fresh memory cost (the warm-up's first touch, or the
populate thread's CPU).
"""
from __future__ import annotations

import argparse
import gc
import mmap
import os
import statistics
import sys
import time

import numpy as np
import pytest

try:
    from engine._kernel import populate_stats, tune_growth
except ImportError:     # a kernel from before issue 16, measured for comparison
    def populate_stats() -> dict:
        return {}

    def tune_growth(**settings) -> dict:
        raise SystemExit("SCANPAY_GROWTH: this kernel has no growth settings")
from engine.demo.world import (BATCH_RECORDS_MAX, World, build, capacity_for, make_engine,
                               pay_batches)

from _common import SUMMARY, load, machine

PAYMENTS = 2_000_000
RATE_SHARE_MIN = 0.90           # unhinted rate / hinted rate
BATCH_OVER_MEDIAN_MAX = 10      # the slowest batch / the median batch
# Batch ranges the unhinted engine's extra writer CPU is reported by: its
# first batches (tables copied while small), the coupon index's resize left
# over from the world, and the payment index's resizes at 183 k and 734 k
# payments (batches 22 and 89) with the stretches between.
RANGE_EDGES = (0, 5, 22, 30, 60, 89, 100, 150, 245)
# Fresh memory the unhinted engine takes per payment (rows of payment, result,
# lifecycle, authorization and visit, and the index tables: 842-886 MiB for
# 2 M), with room to spare: what `--memory warm` touches and frees.
WARM_BYTES_PER_PAYMENT = 512
PAGE_BYTES = 4096


def _engines(spec: World, payments: int) -> tuple[dict, dict, object]:
    """(engines by name, build seconds by name, the world info): the world in an engine with
    hints and in one without."""
    clock_ms = spec.now_ms
    engines, build_s = {}, {}
    for name, capacity in (("hinted", capacity_for(spec, payments)), ("unhinted", None)):  # noqa: E501
        started = time.perf_counter()
        eng = make_engine(lambda: clock_ms, capacity)
        info = build(eng, spec)
        build_s[name] = time.perf_counter() - started
        engines[name] = eng
    return engines, build_s, info


def warm_memory(nbytes: int) -> dict:
    """Touch `nbytes` of fresh anonymous memory (huge pages advised, as the
    kernel's row space does) and free it: the guest's free pages are backed
    by the host for a few seconds after. Returns what the touch cost."""
    started, cpu_started = time.perf_counter(), time.thread_time()
    area = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        area.madvise(mmap.MADV_HUGEPAGE)        # advice: failure is harmless
    except (AttributeError, OSError):
        pass
    pages = np.frombuffer(area, np.uint8)
    pages[::PAGE_BYTES] = 1                     # one write per 4 KiB page
    del pages
    area.close()
    cpu_s = time.thread_time() - cpu_started
    return {"mib": nbytes >> 20, "cpu_s": round(cpu_s, 2),
            "wall_s": round(time.perf_counter() - started, 2),
            "gb_per_cpu_s": round(nbytes / 1e9 / max(cpu_s, 1e-6), 2)}


def run(users: int = 1_000_000, payments: int = PAYMENTS, memory: str = "cold") -> dict:
    """Both engines, the same batches; batch times by engine and the verdicts.
    memory="warm": fresh memory touched and freed right before the batches
    (module docstring). SCANPAY_GROWTH="name=value,..." sets growth
    thresholds (tune_growth) for comparing designs."""
    assert memory in ("cold", "warm"), memory
    tuning = os.environ.get("SCANPAY_GROWTH")
    if tuning:
        tune_growth(**{k: int(v) for k, v in (kv.split("=") for kv in tuning.split(","))})
    spec = World.standard()
    if users != spec.users:
        spec = spec.replace(users=users, preset="custom")
    n_batches = -(-payments // BATCH_RECORDS_MAX)
    engines, build_s, info = _engines(spec, n_batches * BATCH_RECORDS_MAX)
    batches = list(pay_batches(info, n_batches, seed=16))
    # The worlds' Python objects out of the collector, as the server does
    # after loading: a full collection over them is a pause of its own.
    gc.collect()
    gc.freeze()
    warmed = (warm_memory(n_batches * BATCH_RECORDS_MAX * WARM_BYTES_PER_PAYMENT)
              if memory == "warm" else None)
    populated = populate_stats()
    times, cpu, resizing = _timed(engines, batches)
    populated = {k: round(v - populated[k], 2) if k.endswith("_s") else (v - populated[k]) >> 20
                 for k, v in populate_stats().items()}
    digests = {name: eng.digest() for name, eng in engines.items()}
    assert digests["hinted"] == digests["unhinted"], "the engines' states differ"
    figures = _figures(times, cpu, n_batches * BATCH_RECORDS_MAX, build_s)
    figures.update(populated_mib=populated, tuning=tuning or "defaults", memory=memory,
                   warmed=warmed,
                   extra_cpu_by_range=_by_range(cpu, resizing))
    return figures


def _timed(engines: dict, batches: list) -> tuple[dict, dict, list]:
    """(wall seconds, writer CPU seconds) of each batch on each engine,
    alternating which goes first, and the unhinted engine's indexes mid-resize
    before each batch; the results must be identical."""
    times: dict[str, list[float]] = {name: [] for name in engines}
    cpu: dict[str, list[float]] = {name: [] for name in engines}
    resizing: list[set] = []
    order = list(engines)
    for i, batch in enumerate(batches):
        resizing.append(_resizing(engines["unhinted"]))
        results = []
        for name in (order if i % 2 == 0 else order[::-1]):
            started, cpu_started = time.perf_counter(), time.thread_time()
            out = engines[name].pay(batch)
            times[name].append(time.perf_counter() - started)
            cpu[name].append(time.thread_time() - cpu_started)
            results.append(out)
        assert np.array_equal(results[0], results[1]), f"batch {i}: results differ"
    return times, cpu, resizing


def _resizing(engine) -> set:
    """Names of the engine's indexes with a resize under way (none known
    for a kernel from before issue 16)."""
    ledger = engine.state.ledger
    return {name for name in ledger.INDEXES
            if getattr(getattr(ledger, name + "_ix"), "resizing", 0)}


def _by_range(cpu: dict[str, list[float]], resizing: list[set]) -> dict:
    """Per RANGE_EDGES range of batches: the unhinted engine's writer CPU
    over the hinted one's (ms), and its indexes mid-resize at some batch."""
    out = {}
    for lo, hi in zip(RANGE_EDGES, RANGE_EDGES[1:]):
        hi = min(hi, len(resizing))
        if lo >= hi:
            break
        extra_s = sum(cpu["unhinted"][lo:hi]) - sum(cpu["hinted"][lo:hi])
        out[f"{lo}-{hi}"] = (round(extra_s * 1e3, 1),
                             ",".join(sorted(set().union(*resizing[lo:hi]))) or "-")
    return out


def _figures(times: dict[str, list[float]], cpu: dict[str, list[float]], records: int,
             build_s: dict) -> dict:
    """Per engine: the wall-clock rate and batch times, and the rate per
    CPU-second of the writer thread (on a shared machine the wall clock also
    counts the time other tenants held the core)."""
    figures: dict = {"records": records, "batches": len(times["hinted"]), "load": load(),
                     "machine": machine()}
    for name, batch_s in times.items():
        median_s = statistics.median(batch_s)
        figures[name] = {
            "payments_per_second": records / sum(batch_s), "total_s": sum(batch_s),
            "payments_per_cpu_second": records / sum(cpu[name]),
            "median_batch_ms": median_s * 1e3, "max_batch_ms": max(batch_s) * 1e3,
            "max_over_median": max(batch_s) / median_s,
            "batches_over_10x_median": sum(s > 10 * median_s for s in batch_s),
            "slowest_batches_ms": {i: round(batch_s[i] * 1e3, 2) for i in sorted(
                range(len(batch_s)), key=batch_s.__getitem__)[-5:]},
            "build_s": build_s[name]}
    figures["rate_share"] = (figures["unhinted"]["payments_per_second"]
                             / figures["hinted"]["payments_per_second"])
    figures["cpu_rate_share"] = (figures["unhinted"]["payments_per_cpu_second"]
                                 / figures["hinted"]["payments_per_cpu_second"])
    figures["met"] = (figures["rate_share"] >= RATE_SHARE_MIN
                      and figures["unhinted"]["max_over_median"] <= BATCH_OVER_MEDIAN_MAX)
    return figures


def describe(figures: dict) -> list[str]:
    lines = []
    for name in ("hinted", "unhinted"):
        f = figures[name]
        lines.append(f"{name}: {f['payments_per_second']:,.0f} payments/s ({f['total_s']:.2f} s; "
                     f"{f['payments_per_cpu_second']:,.0f} per writer CPU-second), "
                     f"median batch {f['median_batch_ms']:.2f} ms, slowest {f['max_batch_ms']:.2f} ms "
                     f"(x{f['max_over_median']:.1f}), {f['batches_over_10x_median']} over 10x; "
                     f"world built in {f['build_s']:.1f} s; slowest (batch: ms) {f['slowest_batches_ms']}")
    lines.append("unhinted writer CPU over hinted by batches (ms, indexes mid-resize): "
                 + "; ".join(f"{k}: {ms:+.1f} {names}"
                             for k, (ms, names) in figures["extra_cpu_by_range"].items()))
    warmed = figures["warmed"]
    lines.append(f"memory {figures['memory']}"
                 + (f" (touched and freed {warmed['mib']:,} MiB first: {warmed['cpu_s']} CPU-s, "
                    f"{warmed['gb_per_cpu_s']} GB per CPU-s)" if warmed else "")
                 + f"; pages faulted in during the run (MiB; the thread's CPU s): "
                 f"{figures['populated_mib']}; growth settings: {figures['tuning']}")
    lines.append(f"unhinted / hinted rate {figures['rate_share']:.1%} (per CPU-second "
                 f"{figures['cpu_rate_share']:.1%}; target >= "
                 f"{RATE_SHARE_MIN:.0%}); targets met: {figures['met']}; {figures['load']}")
    return lines


@pytest.mark.parametrize("memory", ["cold", "warm"])
def test_growth_no_stall(benchmark, memory):
    """2 M payments over 1 M users, with and without capacity hints; fresh
    memory as the machine gives it, and touched just before."""
    figures = benchmark.pedantic(run, kwargs={"memory": memory}, rounds=1, iterations=1)
    benchmark.extra_info.update(figures)
    for i, line in enumerate(describe(figures)):
        SUMMARY[f"growth {memory} {i + 1}"] = line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--payments", type=int, default=PAYMENTS)
    parser.add_argument("--memory", choices=("cold", "warm"), default="cold",
                        help="warm: touch and free the memory the growth will take right "
                             "before the batches (see the docstring)")
    args = parser.parse_args(argv)
    for line in describe(run(args.users, args.payments, args.memory)):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
