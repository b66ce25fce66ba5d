"""Kernel PAY of two source trees side by side: a before/after comparison.

    .venv/bin/python bench/ab_kernel.py BEFORE_TREE AFTER_TREE [--slices N] [--batches K]

Each tree is a checkout with its own release kernel built in place
(`python setup.py build_ext --inplace -q`, SCANPAY_KERNEL_DEBUG unset). One
worker process per tree builds the standard world (engine/demo/world.py, or
engine/world.py in trees before the package split) and
draws the same fresh automatic-selection batches of 8,190 records, as
bench_engine.py's kernel PAY does. The coordinator then has the workers take
turns, a slice of K batches each (the first of each pair alternating), so
both see the same load from the machine's other tenants, and prints the
median rates (wall and per CPU-second) and the median of the per-slice
ratios. The worker built second tends to run faster; run it twice, the
second time with --after-first, and take both.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

WARMUP_BATCHES = 2
BATCHES_MAX = 600           # drawn up front: 600 x 655 KB per worker, 4.9M payments
WORKER_TIMEOUT_S = 600


def worker(slices: int, batches: int) -> None:
    import numpy as np

    import engine._kernel
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from count_kernel import pay_result_dtype_and_ok, world_module   # either package layout
    world = world_module()
    BATCH_RECORDS_MAX, World, build = world.BATCH_RECORDS_MAX, world.World, world.build  # noqa: N806
    capacity_for, make_engine, pay_batches = world.capacity_for, world.make_engine, world.pay_batches
    PAY_RESULT, status_ok = pay_result_dtype_and_ok()                                    # noqa: N806
    if getattr(engine._kernel, "DEBUG", False):   # trees before the debug build had none
        raise SystemExit(f"{engine._kernel.__file__} is the debug kernel: build the release one")
    spec = World.standard()
    now_ms = spec.now_ms
    # Room for exactly the payments drawn: two workers of bench_engine's
    # 10M-payment hint would not fit the machine's memory beside its tenants.
    payments = (WARMUP_BATCHES + slices * batches) * BATCH_RECORDS_MAX
    eng = make_engine(lambda: now_ms, capacity_for(spec, payments))
    info = build(eng, spec)
    drawn = list(pay_batches(info, WARMUP_BATCHES + slices * batches, seed=11,
                             start_payment_id=1, no_coupon_share=0.0))
    out = np.zeros(BATCH_RECORDS_MAX, PAY_RESULT)
    for batch in drawn[:WARMUP_BATCHES]:
        eng.kernel_pay(batch, now_ms, out)
    at = WARMUP_BATCHES
    print(json.dumps({"kernel": engine._kernel.__file__}), flush=True)
    for _line in sys.stdin:                     # one slice per line, at most `slices`
        t0, c0 = time.perf_counter(), time.thread_time()
        for batch in drawn[at:at + batches]:
            eng.kernel_pay(batch, now_ms, out)
        wall_s, cpu_s = time.perf_counter() - t0, time.thread_time() - c0
        at += batches
        print(json.dumps({"wall_s": wall_s, "cpu_s": cpu_s, "records": batches * len(out),
                          "ok": bool((out["status"] == status_ok).all())}), flush=True)


def start(tree: str, args) -> subprocess.Popen:
    root = os.path.abspath(tree)
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--worker", "--slices", str(args.slices),
         "--batches", str(args.batches)], cwd=root, text=True,
        env=dict(os.environ, PYTHONPATH=root), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    print(f"{tree}: {proc.stdout.readline().strip()}", flush=True)
    return proc


def coordinate(args) -> None:
    names = ("before", "after")
    trees = dict(zip(names, (args.before, args.after)))
    order = names[::-1] if args.after_first else names
    procs = {name: start(trees[name], args) for name in order}   # one build at a time
    rates: dict = {name: {"wall": [], "cpu": []} for name in names}
    print(f"load at start: {os.getloadavg()}", flush=True)
    for i in range(args.slices):
        for name in (names if i % 2 == 0 else names[::-1]):
            procs[name].stdin.write("slice\n")
            procs[name].stdin.flush()
            r = json.loads(procs[name].stdout.readline())
            assert r["ok"], f"{name}: a batch did not pay in full"
            rates[name]["wall"].append(r["records"] / r["wall_s"])
            rates[name]["cpu"].append(r["records"] / r["cpu_s"])
    print(f"load at end: {os.getloadavg()}", flush=True)
    for proc in procs.values():
        proc.stdin.close()
        proc.wait(timeout=WORKER_TIMEOUT_S)
    for kind in ("wall", "cpu"):
        before, after = (statistics.median(rates[n][kind]) for n in names)
        print(f"{kind}: median before {before:,.0f}/s, after {after:,.0f}/s, "
              f"after/before {after / before:.3f}")
    pairs = [a / b for a, b in zip(rates["after"]["cpu"], rates["before"]["cpu"])]
    print(f"per-slice after/before per CPU-second: median {statistics.median(pairs):.3f}, "
          f"quartiles {', '.join(f'{q:.3f}' for q in statistics.quantiles(pairs, n=4))}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before", nargs="?", help="source tree with its release kernel built in place")
    p.add_argument("after", nargs="?", help="the other tree")
    p.add_argument("--slices", type=int, default=24, help="slices per tree (default 24)")
    p.add_argument("--batches", type=int, default=10, help="batches of 8,190 per slice")
    p.add_argument("--after-first", action="store_true", help="build the after tree's world first")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if not (1 <= args.slices and 1 <= args.batches and args.slices * args.batches <= BATCHES_MAX):
        p.error(f"slices x batches must be 1..{BATCHES_MAX} (the drawn batches are held in memory)")
    if args.worker:
        worker(args.slices, args.batches)
    elif args.before and args.after:
        coordinate(args)
    else:
        p.error("give the two trees")


if __name__ == "__main__":
    main()
