"""Instructions the release kernel executes for the same hinted PAY batches,
in one or more source trees: a before/after comparison that the machine's
other tenants cannot move.

    .venv/bin/python bench/count_kernel.py TREE [TREE ...] [--batches K] [--users N]

Each tree is a checkout with its own release kernel built in place
(`python setup.py build_ext --inplace -q`, SCANPAY_KERNEL_DEBUG unset). For
each tree in turn, one worker process (PYTHONPATH=tree) runs under
`valgrind --tool=callgrind`. It builds the standard world as
bench/ab_kernel.py's worker does (capacity hints for exactly the payments
drawn), draws the same batches of 8,190 (seed 11), applies the warm-up
batches, then K counted batches. Valgrind instruments nothing until the
worker asks it to, just before the counted batches (a small C helper with
callgrind.h's client requests, built here with gcc), so the world build runs
at valgrind's uninstrumented speed; and callgrind counts only inside the
kernel's PAY entry point (`--toggle-collect` on the Python wrapper of the
kernel's `pay`, found with `nm` in the tree's _kernel*.so), so neither the
world build nor the Python loop around the batches is counted.

Callgrind's instruction count (Ir) does not depend on the machine's load:
the same tree counted twice differed by at most 822 of 2.2e8 (4 ppm: the
populate thread's wake-up and Python's allocator inside the toggled call),
and wall-clock time under valgrind means nothing. The workers print digests
of the batches and of the results, so that trees are only compared on the
same work with the same outcome. About a minute a tree for the standard
world (1M users; the build runs uninstrumented). Trees before the engine/
package split (engine.world) work too. Outputs go to a temporary directory
(removed at the end unless --keep DIR, where callgrind.out.<n> files are
copied for callgrind_annotate).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

WARMUP_BATCHES = 2              # as bench/ab_kernel.py
BATCHES_MAX = 200               # drawn up front: 655 KB each
WORKER_TIMEOUT_S = 1200         # one tree: about 60 s measured for the 1M-user world and 20 batches
SEED = 11
SPACE_MIB = 1024                # a row space's address space under valgrind (tune)
PAY_SYMBOL = re.compile(r"^__pyx_pw_6engine_7_kernel_\w*_\d+pay$")
HELPER_C = r"""
#include <valgrind/callgrind.h>
void count_start(void) { CALLGRIND_START_INSTRUMENTATION; }
void count_stop(void) { CALLGRIND_STOP_INSTRUMENTATION; }
int count_on_valgrind(void) { return RUNNING_ON_VALGRIND; }
"""


def note(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def world_module():
    """engine.demo.world, or engine.world in trees before the package split."""
    try:
        from engine.demo import world
    except ImportError:
        from engine import world
    return world


def pay_result_dtype_and_ok():
    """PAY_RESULT and Status.ok, from engine.protocol or, in trees before
    the package split, from engine."""
    try:
        from engine.protocol.records import PAY_RESULT
        from engine.protocol.status import Status
    except ImportError:
        from engine.records import PAY_RESULT
        from engine.status import Status
    return PAY_RESULT, Status.ok


def tune(space_bytes_max: int, growth: str) -> None:
    """Reserve at most `space_bytes_max` of address space a row space (trees
    with row spaces; the default is the machine's memory, 32 GiB here, a
    table, more than valgrind lets a process map; the kernel's results never
    depend on it, tune_growth's docstring), and the growth settings in
    `growth` ("name=value,...", as bench_growth.py's SCANPAY_GROWTH)."""
    settings = {k: int(v) for k, v in (kv.split("=") for kv in growth.split(",") if kv)}
    try:
        from engine._kernel import tune_growth
    except ImportError:             # a kernel without row spaces
        if settings:
            raise SystemExit("--growth: this kernel has no growth settings")
        return
    tune_growth(space_bytes_max=space_bytes_max, **settings)


def build_world(users: int | None, payments: int, space_bytes_max: int, growth: str = ""):
    """The standard world (or one with `users` users) with capacity hints for
    `payments` payments, as bench/ab_kernel.py's worker builds it."""
    world = world_module()
    tune(space_bytes_max, growth)
    spec = world.World.standard()
    if users is not None:
        spec = dataclasses.replace(spec, users=users)
    now_ms = spec.now_ms
    eng = world.make_engine(lambda: now_ms, world.capacity_for(spec, payments))
    stage = [""]

    def progress(name, done, total):
        if name != stage[0]:
            stage[0] = name
            note(f"world: {name}")
    info = world.build(eng, spec, progress)
    return world, eng, info, now_ms


def worker(args) -> None:
    import ctypes

    import numpy as np

    import engine._kernel
    helper = ctypes.CDLL(args.helper)
    if not helper.count_on_valgrind():
        raise SystemExit("the worker must run under valgrind (the coordinator starts it)")
    if getattr(engine._kernel, "DEBUG", False):
        raise SystemExit(f"{engine._kernel.__file__} is the debug kernel: build the release one")
    total = WARMUP_BATCHES + args.batches
    world, eng, info, now_ms = build_world(args.users, total * world_module().BATCH_RECORDS_MAX,
                                           args.space_mib << 20, args.growth)
    drawn = list(world.pay_batches(info, total, seed=SEED, start_payment_id=1,
                                   no_coupon_share=0.0))
    pay_result, status_ok = pay_result_dtype_and_ok()
    out = np.zeros(world.BATCH_RECORDS_MAX, pay_result)
    results = hashlib.sha256()
    for batch in drawn[:WARMUP_BATCHES]:
        eng.kernel_pay(batch, now_ms, out)
        results.update(out.tobytes())
    note(f"world built, {WARMUP_BATCHES} warm-up batches applied; counting {args.batches}")
    ok = True
    helper.count_start()
    for batch in drawn[WARMUP_BATCHES:]:
        eng.kernel_pay(batch, now_ms, out)
        ok = ok and bool((out["status"] == status_ok).all())
        results.update(out.tobytes())
    helper.count_stop()
    batches = hashlib.sha256(b"".join(b.tobytes() for b in drawn)).hexdigest()
    print(json.dumps({"kernel": engine._kernel.__file__, "ok": ok, "records": len(out),
                      "batches": batches[:16],
                      "results": results.hexdigest()[:16]}), flush=True)


def build_helper(tmp: str) -> str:
    """The client-request helper the worker loads with ctypes."""
    src, lib = os.path.join(tmp, "count_helper.c"), os.path.join(tmp, "count_helper.so")
    with open(src, "w") as f:
        f.write(HELPER_C)
    subprocess.run(["gcc", "-O1", "-shared", "-fPIC", "-o", lib, src], check=True, timeout=60)
    return lib


def pay_symbol(tree: str) -> str:
    """The C function of the kernel's Python-level `pay` in the tree's release kernel."""
    root = os.path.join(os.path.abspath(tree), "engine")
    libs = [f for f in os.listdir(root) if f.startswith("_kernel") and f.endswith(".so")]
    if len(libs) != 1:
        raise SystemExit(f"{tree}: expected one engine/_kernel*.so, found {libs}")
    names = subprocess.run(["nm", os.path.join(root, libs[0])], capture_output=True,
                           text=True, check=True, timeout=60).stdout.split()
    found = sorted({n for n in names if PAY_SYMBOL.match(n)})
    if len(found) != 1:
        raise SystemExit(f"{tree}: expected one kernel pay wrapper symbol, found {found}")
    return found[0]


def callgrind_totals(path: str) -> int:
    """The Ir collected: the `totals:` line (`summary:` counts only what was
    collected at the last dump's start, 0 with --collect-atstart=no)."""
    with open(path) as f:
        for line in f:
            if line.startswith("totals:"):
                return int(line.split()[1])
    raise SystemExit(f"{path}: no totals line")


def count_tree(tree: str, n: int, args, tmp: str) -> dict:
    """Run one tree's worker under callgrind; its Ir and digests."""
    root = os.path.abspath(tree)
    symbol = pay_symbol(tree)
    out_file = os.path.join(tmp, f"callgrind.out.{n}")
    cmd = ["valgrind", "-q", "--vgdb=no", "--tool=callgrind", "--instr-atstart=no",
           "--collect-atstart=no", f"--toggle-collect={symbol}", f"--callgrind-out-file={out_file}",
           sys.executable, os.path.abspath(__file__), "--worker", "--helper", args.helper,
           "--batches", str(args.batches), "--space-mib", str(args.space_mib),
           "--growth", args.growth]
    if args.users is not None:
        cmd += ["--users", str(args.users)]
    note(f"{tree}: counting inside {symbol}")
    t0 = time.monotonic()
    env = dict(os.environ, PYTHONPATH=root, PYTHONHASHSEED="0")
    env.pop("SCANPAY_KERNEL_DEBUG", None)
    proc = subprocess.run(cmd, cwd=root, env=env, stdout=subprocess.PIPE, text=True,
                          timeout=WORKER_TIMEOUT_S)      # its progress goes to our stderr
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: worker failed (exit {proc.returncode})")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report.update(tree=tree, ir=callgrind_totals(out_file), out=out_file,
                  seconds=time.monotonic() - t0)
    note(f"{tree}: {report['ir']:,} Ir in {report['seconds']:.0f} s under valgrind")
    return report


def print_table(reports: list[dict], batches: int, records: int) -> None:
    base = reports[0]["ir"]
    print(f"{batches} counted batches of {records:,} after {WARMUP_BATCHES} warm-up; "
          f"ratios against the first tree")
    print(f"{'tree':40} {'Ir':>16} {'Ir/batch':>14} {'Ir/payment':>11} {'ratio':>7}  "
          f"batches/results digests")
    for r in reports:
        per_batch = r["ir"] / batches
        print(f"{r['tree'][-40:]:40} {r['ir']:>16,} {per_batch:>14,.0f} "
              f"{per_batch / records:>11.1f} {r['ir'] / base:>7.4f}  "
              f"{r['batches']}/{r['results']}{'' if r['ok'] else ' NOT ALL OK'}")
    if len({r["batches"] for r in reports}) != 1:
        print("the trees drew different batches: the counts are not comparable")
    elif len({r["results"] for r in reports}) != 1:
        print("the trees' results differ: the same batches had different outcomes")


def coordinate(args) -> None:
    tmp = tempfile.mkdtemp(prefix="count_kernel.")
    try:
        args.helper = build_helper(tmp)
        reports = []
        for n, tree in enumerate(args.trees):
            reports.append(count_tree(tree, n, args, tmp))
            if args.keep:
                os.makedirs(args.keep, exist_ok=True)
                shutil.copy(reports[-1]["out"], args.keep)
        note(f"load at end: {os.getloadavg()}")
        print_table(reports, args.batches, reports[0]["records"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trees", nargs="*",
                   help="source trees, each with its release kernel built in place")
    p.add_argument("--batches", type=int, default=10, help="counted batches of 8,190 (default 10)")
    p.add_argument("--users", type=int,
                   help="users in the world (default: the standard 1M); a smaller world's "
                        "counts a payment differ (10,000: 1,234 Ir against 1,359), so compare "
                        "trees only at one size")
    p.add_argument("--space-mib", type=int, default=SPACE_MIB,
                   help=f"address space a row space reserves, MiB (default {SPACE_MIB})")
    p.add_argument("--growth", default="", metavar="NAME=VALUE,...",
                   help="tune_growth settings for every tree (e.g. grow_pct=70,prepare_pct=50)")
    p.add_argument("--keep", metavar="DIR", help="copy the callgrind.out.<n> files to DIR")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--helper", help=argparse.SUPPRESS)
    args = p.parse_args()
    if not 1 <= args.batches <= BATCHES_MAX:
        p.error(f"--batches must be 1..{BATCHES_MAX}")
    if args.users is not None and args.users < 1000:
        p.error("--users must be at least 1000")
    if args.worker:
        worker(args)
    elif args.trees:
        coordinate(args)
    else:
        p.error("give one or more trees")


if __name__ == "__main__":
    main()
