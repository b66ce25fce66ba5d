"""Scanpay: embedded in memory, embedded durable, and over the wire (a
`python -m engine.cli serve` subprocess driven by engine.client)."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from engine import Engine
from engine.client import AsyncClient, Client, issue_record
from engine.server.config import Config
from engine.protocol.limits import BATCH_RECORDS_MAX, WIRE_LOOKUP_ITEMS_MAX
from engine.protocol.records import ISSUE_RECORD, PAY_RECORD, RESULT_DUPLICATE
from engine.protocol.status import Status
from engine.storage.journal import SEGMENT_BYTES_MAX_DEFAULT, SPARE_NAME

from .common import Run, chunks, free_port, stop_process, wait_port
from .workload import (KIND_FIXED, VALID_UNTIL_MS, FinalState, Payment, Workload,
                       outcome_name, tally)

BATCH = BATCH_RECORDS_MAX       # records per PAY frame / Engine.pay call (the protocol's max)
MAP_ITEMS = 50_000              # items per setup map call
LOOKUP_ITEMS = WIRE_LOOKUP_ITEMS_MAX  # ids per BALANCES/COUPONS list: the wire's bound
FRAMES_IN_FLIGHT = 4            # batched mode over the wire: frames pipelined on one connection
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPARE_WAIT_S_MAX = 30           # for the server's first spare segment (wait_spare_filled)


def records(payments: list[Payment]) -> np.ndarray:
    out = np.zeros(len(payments), PAY_RECORD)
    out["id"] = [p.id for p in payments]
    out["payer"] = [p.payer for p in payments]
    out["merchant"] = [p.merchant for p in payments]
    out["amount"] = [p.amount for p in payments]
    return out                  # flags 0: automatic coupon selection


def outcomes_of(results: np.ndarray) -> list[str]:
    return [outcome_name(s, bool(f & RESULT_DUPLICATE))
            for s, f in zip(results["status"].tolist(), results["flags"].tolist())]


def _checked(what: str, reply: dict) -> None:
    bad = [r for r in reply["results"] if r["status"] != Status.ok]
    if bad:
        raise RuntimeError(f"scanpay setup {what}: {bad[:3]}")


def setup(target, wl: Workload) -> None:
    """Merchants, wallets, top-ups, stocks and coupons through `call` and
    `issue` (an Engine or a blocking Client)."""
    _checked("MERCHANTS", target.call("MERCHANTS", {"merchants": [
        {"id": m, "fee_bps": f} for m, f in wl.merchants.items()]}))
    users = list(wl.users)
    for part in chunks(users, MAP_ITEMS):
        _checked("WALLETS", target.call("WALLETS", {"users": part}))
        _checked("TOPUP", target.call("TOPUP", {"topups": [
            {"id": u, "user": u, "amount": wl.users[u]} for u in part]}))
    _checked("STOCKS", target.call("STOCKS", {"stocks": [
        {"id": s.id, "funder": "platform", "kind": "fixed" if s.kind == KIND_FIXED else "percent",
         "value": s.value, "cap": s.cap, "min_spend": s.min_spend, "budget": s.budget,
         "valid_from": 0, "valid_until": VALID_UNTIL_MS, "stacking": "exclusive"}
        for s in wl.stocks.values()]}))
    issued = [issue_record(c, s, u) for c, (s, u) in wl.coupons.items()]
    for part in chunks(issued, BATCH):
        results = target.issue(np.array(part, ISSUE_RECORD))
        if (results["status"] != Status.ok).any():
            raise RuntimeError("scanpay setup ISSUE failed")


def final_state(target, wl: Workload, outcomes: dict) -> FinalState:
    """Read back through BALANCES and COUPONS, as any client would."""
    users, merchants, spent, used = {}, {}, {}, {}
    fees = 0
    for part in chunks(list(wl.users), LOOKUP_ITEMS):
        reply = target.call("BALANCES", {"users": part})
        users.update((r["id"], r["balance"]) for r in reply["users"])
        fees = reply["fees"]
    for part in chunks(list(wl.merchants), LOOKUP_ITEMS):
        reply = target.call("BALANCES", {"merchants": part})
        merchants.update((r["id"], r["balance"]) for r in reply["merchants"])
    for part in chunks(list(wl.stocks), LOOKUP_ITEMS):
        spent.update((r["id"], r["spent"]) for r in target.call("BALANCES", {"stocks": part})["stocks"])
    for part in chunks(list(wl.coupons), LOOKUP_ITEMS):
        for r in target.call("COUPONS", {"ids": part})["results"]:
            if r["state"] == "used":
                used[r["id"]] = r["payment"]
    return FinalState(users, merchants, spent, used, fees, outcomes)


def capacity(wl: Workload) -> dict:
    return {"users": len(wl.users), "coupons": len(wl.coupons), "payments": len(wl.payments)}


# -- embedded -----------------------------------------------------------------

def run_engine(eng: Engine, wl: Workload, payments: list[Payment], *, batched: bool,
               clock, path: str | None = None) -> tuple[list[str], float, list[float]]:
    """Engine.pay in batches of 8,190, or one 1-record call at a time."""
    setup(eng, wl)
    if path is not None:
        wait_spare_filled(path, "Scanpay embedded, durable")
    recs = records(payments)
    size = BATCH if batched else 1
    names, latencies = [], []
    started = clock()
    for lo in range(0, len(recs), size):
        t0 = clock()
        results = eng.pay(recs[lo:lo + size])
        latencies.append(clock() - t0)
        names += outcomes_of(results)
    return names, clock() - started, latencies


def embedded(wl, payments, *, batched: bool, path: str | None, clock) -> Run:
    config = Config()
    options = {} if path is None else {"journal_prealloc": config.journal_prealloc,
                                       "io_threads_nice": config.io_threads_nice}
    eng = Engine(path, capacity=capacity(wl), **options)
    try:
        names, seconds, latencies = run_engine(eng, wl, payments, batched=batched, clock=clock,
                                               path=path)
        audit = eng.audit()
        if not audit["ok"]:
            raise RuntimeError(f"scanpay AUDIT failed: {audit}")
        state = final_state(eng, wl, tally(names))
    finally:
        eng.close()
    peer = "Scanpay embedded" + (", durable" if path else "")
    how = (f"Engine.pay, batches of {BATCH:,}" if batched else "Engine.pay, 1 record per call")
    if path and not batched:
        how += ", each waits its fdatasync"
    return Run(peer, "many" if batched else "one", how, len(payments), seconds, latencies,
               f"batch of {BATCH:,}" if batched else "payment", state)


# -- over the wire --------------------------------------------------------------

class Server:
    """`python -m engine.cli serve` on a fresh data directory and a free port."""

    def __init__(self, tmp: str, wl: Workload, name: str):
        self.port = free_port()
        base = tempfile.mkdtemp(prefix=f"scanpay-{name}-", dir=tmp)
        data = self.data = os.path.join(base, "data")
        self.log_path = os.path.join(base, "server.log")
        cmd = [sys.executable, "-m", "engine.cli", "serve", "--data", data,
               "--listen", f"127.0.0.1:{self.port}"]
        for table, rows in capacity(wl).items():
            cmd += ["--capacity", f"{table}={rows}"]
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         env=env)
        try:
            wait_port(self.port, self.proc, self.log_path)
        except BaseException:
            stop_process(self.proc)
            raise

    def stop(self) -> None:
        stop_process(self.proc)


def wait_spare_filled(data: str, what: str, timeout_s: float = SPARE_WAIT_S_MAX) -> None:
    """Until the journal in `data` has its first spare segment zero-filled
    (a fresh journal fills one in its first seconds, paced at 32 MB/s, and
    every fsync meanwhile may wait behind its writeback): the start-up's
    work, not the run's, as PostgreSQL's run starts after a CHECKPOINT and
    its WAL segments were zero-filled by initdb. Says so if it took longer."""
    spare = os.path.join(data, SPARE_NAME)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sizes = [os.path.getsize(os.path.join(data, n)) for n in os.listdir(data)
                 if n == SPARE_NAME or n.startswith("journal-") and n.endswith(".seg")]
        if max(sizes, default=0) >= SEGMENT_BYTES_MAX_DEFAULT:
            time.sleep(0.2)                 # its closing fdatasync
            return
        time.sleep(0.05)
    print(f"  ({what}: the journal's first spare segment was not filled within {timeout_s} s "
          f"of its setup; measuring anyway)", flush=True)


async def _batched(port: int, payments: list[Payment], clock):
    """Frames of 8,190 in the global order on one connection, a few in flight."""
    recs = records(payments)
    latencies: list[float] = []
    window = asyncio.Semaphore(FRAMES_IN_FLIGHT)
    async with await AsyncClient.connect("127.0.0.1", port, timeout_ms=120_000) as client:
        async def frame(lo: int):
            t0 = clock()
            try:
                return await client.pay(recs[lo:lo + BATCH])
            finally:
                latencies.append(clock() - t0)
                window.release()
        tasks = []
        started = clock()
        for lo in range(0, len(recs), BATCH):      # tasks start (and send) in this order
            await window.acquire()
            tasks.append(asyncio.create_task(frame(lo)))
        results = await asyncio.gather(*tasks)
        seconds = clock() - started
    names = [n for r in results for n in outcomes_of(r)]
    return names, seconds, latencies


def _one_record_frames(lane: int, recs: np.ndarray):
    for k in range(len(recs)):
        yield (lane, k), recs[k:k + 1]


async def _single(port: int, lanes: list[list[Payment]], in_flight: int, clock):
    """One connection per lane, `in_flight` 1-record PAY frames outstanding
    on each (client.pay of one record: no coalescing into bigger frames); a
    connection's frames are sent in the lane's order."""
    outcome: dict[tuple[int, int], str] = {}
    latencies: list[float] = []
    clients = [await AsyncClient.connect("127.0.0.1", port, timeout_ms=120_000) for _ in lanes]
    try:
        async def worker(client, feed):
            for i, rec in feed:                     # bounded by the lane
                t0 = clock()
                r = (await client.pay(rec))[0]
                latencies.append(clock() - t0)
                outcome[i] = outcome_name(int(r["status"]), bool(r["flags"] & RESULT_DUPLICATE))
        tasks = []
        started = clock()
        for n, (client, lane) in enumerate(zip(clients, lanes)):
            # Shared by the lane's workers: each takes the next; a frame is
            # written before its worker yields, so frames leave in lane order.
            feed = _one_record_frames(n, records(lane))
            tasks += [asyncio.create_task(worker(client, feed)) for _ in range(in_flight)]
        await asyncio.gather(*tasks)
        seconds = clock() - started
    finally:
        for client in clients:
            client.close()
    names = [outcome[n, k] for n, lane in enumerate(lanes) for k in range(len(lane))]
    return names, seconds, latencies


def over_the_wire(wl: Workload, payments: list[Payment], *, mode: str, callers: int,
                  in_flight: int, tmp: str, clock) -> Run:
    """mode: "batched" (frames of 8,190), "single" (pay_one from `callers`
    connections x `in_flight`), or "one" (one caller, one payment at a time)."""
    import uvloop
    server = Server(tmp, wl, mode)
    try:
        with Client.connect("127.0.0.1", server.port, timeout_ms=120_000) as admin:
            setup(admin, wl)
            wait_spare_filled(server.data, f"Scanpay over TCP, {mode}")
            if mode == "batched":
                names, seconds, lat = uvloop.run(_batched(server.port, payments, clock))
                how, lat_of, column = (f"AsyncClient.pay, frames of {BATCH:,}, "
                                       f"{FRAMES_IN_FLIGHT} in flight, 1 connection",
                                       f"frame of {BATCH:,}", "many")
            elif mode == "single":
                lanes = wl.lanes(callers, payments)
                names, seconds, lat = uvloop.run(_single(server.port, lanes, in_flight, clock))
                how, lat_of, column = (f"AsyncClient.pay, 1-record frames, "
                                       f"{callers} connections x {in_flight} in flight",
                                       "payment", "many")
            else:
                names, seconds, lat = uvloop.run(_single(server.port, [payments], 1, clock))
                how, lat_of, column = "AsyncClient.pay, 1-record frames, 1 connection, 1 in flight", "payment", "one"
            state = final_state(admin, wl, tally(names))
            audit = admin.call("AUDIT", {})
    finally:
        server.stop()
    if not audit["ok"]:
        raise RuntimeError(f"scanpay server AUDIT failed: {audit}")
    row = "Scanpay over TCP, " + ("frames of 8,190" if mode == "batched" else "1-record frames")
    return Run("Scanpay over TCP", column, how, len(payments), seconds, lat, lat_of, state, row)
