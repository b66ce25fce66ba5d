"""Benchmarks of the engine on the standard world (engine/demo/world.py).

Not part of CI. Run them with:

    .venv/bin/python -m pytest bench/ --benchmark-only -p no:cacheprovider

Files are `bench_*.py`, which pytest does not collect by default; this
conftest collects them only under --benchmark-only (or SCANPAY_BENCH=1), so a
plain `pytest` from the repository root never builds the 1M-user world.
The figures each benchmark measures go into its extra_info (see
--benchmark-json) and into a summary printed at the end of the run.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pytest

from engine.demo.world import World, WorldInfo, build, capacity_for, make_engine

from _common import SUMMARY, machine, rss_bytes

PAYMENTS_CAPACITY = 10_000_000


def _enabled(config) -> bool:
    return bool(config.getoption("benchmark_only", False)) or os.environ.get("SCANPAY_BENCH") == "1"


def pytest_sessionstart(session):
    """Benchmarks measure the release kernel: the debug build (the test
    suite's, SCANPAY_KERNEL_DEBUG=1) checks every posting and would skew them."""
    import engine._kernel
    if _enabled(session.config) and engine._kernel.DEBUG:
        pytest.exit("the kernel is the debug build (SCANPAY_KERNEL_DEBUG=1); build the release "
                    "kernel first: .venv/bin/pip install -q -e '.[bench]'", returncode=2)


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and _enabled(parent.config):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_terminal_summary(terminalreporter):
    if not SUMMARY:
        return
    tr = terminalreporter
    tr.section("scanpay benchmark figures")
    tr.write_line(f"machine: {machine()}")
    width = max(len(k) for k in SUMMARY)
    for key, text in SUMMARY.items():
        tr.write_line(f"{key:<{width}}  {text}")


@dataclass
class Standard:
    """The standard world, built once per session, and what building cost."""

    engine: object
    info: WorldInfo
    build_seconds: float
    memory_bytes: dict      # eng.memory_bytes() right after the build
    counts: dict            # eng.counts() right after the build
    rss_bytes: int          # process RSS right after the build
    next_payment_id: int = 1
    next_coupon_index: int = 0


@pytest.fixture(scope="session")
def standard() -> Standard:
    spec = World.standard()
    clock_ms = spec.now_ms
    capacity = capacity_for(spec, PAYMENTS_CAPACITY)
    # Exactly the world's size: memory_bytes() counts allocated rows, so slack
    # here would show up as bytes per user/coupon. The ISSUE benchmark grows it.
    eng = make_engine(lambda: clock_ms, capacity)
    t0 = time.perf_counter()
    info = build(eng, spec)
    seconds = time.perf_counter() - t0
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in info.seconds.items())
    SUMMARY["standard world build"] = (
        f"{seconds:.1f} s ({stages}) for {spec.users:,} users, {len(info.coupon_ids):,} coupons")
    return Standard(engine=eng, info=info, build_seconds=seconds,
                    memory_bytes=dict(eng.memory_bytes()), counts=dict(eng.counts()),
                    rss_bytes=rss_bytes()[0])
