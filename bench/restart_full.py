"""Restart time at the full standard size: 1M users, 3M coupons, 10M payments
journaled, a snapshot, a 20-batch tail; then Engine(path) reopens it.

    .venv/bin/python bench/restart_full.py      # ~2 minutes, ~10 GB of RAM, ~6 GB of disk in /tmp
"""
import time, shutil, numpy as np, tempfile
from engine import Engine
from engine.protocol.records import PAY_RESULT
from engine.demo.world import World, build, pay_batches, BATCH_RECORDS_MAX
d = tempfile.mkdtemp(prefix="scanpay-restart-", dir="/tmp")
spec = World.standard()
cap = {"users": 1_000_000, "coupons": 3_000_000, "payments": 10_100_000}
t = time.time()
eng = Engine(d, clock=lambda: 1_700_000_000_000, capacity=cap, snapshot_every_entries=10**9)
info = build(eng, spec)
print("build", round(time.time() - t, 1), flush=True)
t = time.time(); n = 0
for b in pay_batches(info, 1222, seed=5):
    eng.pay(b); n += len(b)
print("paid", n, "in", round(time.time() - t, 1), "s", flush=True)
t = time.time(); info_s = eng.snapshot(wait=False); print("snapshot pause_ms", round(info_s["pause_ms"], 1), flush=True)
for b in pay_batches(info, 20, seed=6, start_payment_id=2_000_000_000):
    eng.pay(b)
digest = eng.digest()
eng.close()
print("snapshot+close", round(time.time() - t, 1), flush=True)
t = time.time()
again = Engine(d, clock=lambda: 1_700_000_000_000, capacity=cap)
print("restart (snapshot + 20-batch tail)", round(time.time() - t, 2), "s", flush=True)
assert again.digest() == digest
print("digest equal")
again.close(); shutil.rmtree(d)
