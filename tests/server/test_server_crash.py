"""SIGKILL a durable `scanpay serve` while gateways pipeline payments.

Every payment a gateway saw answered `ok` must be in the state the journal
replays to, whichever thread sent its reply (the sender thread right after
the fsync, or the event loop): no reply may leave before the fsync that
covers it. And AUDIT holds on the replayed state (tests/conftest.py audits
every Engine a test made). tests/storage/test_durability.py kills an embedded Engine
the same way; this kills the server, replies and all.

A killed process leaves what it wrote in the page cache, so this catches a
reply that leaves before its journal write (a mutation that hands replies
over before the sync fails it), not one that leaves before the fdatasync:
that order is the sync thread's (engine/core/engine.py `_sync_worker`), and
storage failures are tested with the fault-injecting file system.
"""
import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from engine import Engine

from engine.protocol import frame
from engine.client import Client
from engine.protocol.ops import OP_PAY
from engine.ports import free_port
from engine.protocol.records import PAY_RESULT
from engine.protocol.status import Status

from support import ROOT  # noqa: E402
from support.servers import pay_frame
GATEWAYS = 8
WINDOW_FRAMES = 16                  # PAY frames each gateway keeps in flight
USERS = 8
START_TIMEOUT_S = 15



def serve(data: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--data", data,
                             "--listen", f"127.0.0.1:{port}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            assert proc.poll() is None, "scanpay serve exited"
            assert time.monotonic() < deadline, "scanpay serve did not start"
            time.sleep(0.05)


def build_world(port: int) -> None:
    with Client.connect("127.0.0.1", port, timeout_ms=5000) as c:
        assert c.server_info.durability not in (None, "none")
        c.call("MERCHANTS", {"merchants": [{"id": 1, "fee_bps": 60}]})
        c.call("WALLETS", {"users": list(range(1, USERS + 1))})
        c.call("TOPUP", {"topups": [{"id": u, "user": u, "amount": 10**12}
                                    for u in range(1, USERS + 1)]})


async def gateway(port: int, index: int, acked: list) -> None:
    """Pipeline PAY frames until the server goes away; note every `ok` id."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sent = 0
        for _ in range(WINDOW_FRAMES):
            writer.write(pay_frame(index, sent))
            sent += 1
        while True:
            header = await reader.readexactly(frame.HEADER.size)
            size, op, flags, _rid = frame.HEADER.unpack(header)
            body = await reader.readexactly(size)
            assert op == OP_PAY and not flags & frame.FLAG_ERROR
            results = np.frombuffer(body, PAY_RESULT)
            acked.extend(results["id"][results["status"] == Status.ok].tolist())
            writer.write(pay_frame(index, sent))
            sent += 1
    except (asyncio.IncompleteReadError, ConnectionError):
        return                              # killed


async def load_then_kill(port: int, proc: subprocess.Popen, kill_after_s: float) -> list:
    acked: list = []
    tasks = [asyncio.create_task(gateway(port, g + 1, acked)) for g in range(GATEWAYS)]
    await asyncio.sleep(kill_after_s)
    os.kill(proc.pid, signal.SIGKILL)
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    return acked


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_under_pipelined_load_loses_no_answered_payment(tmp_path, seed):
    data = str(tmp_path / "data")
    port = free_port()
    proc = serve(data, port)
    try:
        build_world(port)
        kill_after_s = random.Random(seed).uniform(0.3, 1.2)
        acked = asyncio.run(load_then_kill(port, proc, kill_after_s))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    assert len(acked) > 100, "the load never got going"
    replayed = Engine(data)
    missing = []
    for at in range(0, len(acked), 1000):
        ids = acked[at:at + 1000]
        results = replayed.call("GET_PAYMENTS", {"ids": ids})["results"]
        missing += [r["id"] for r in results if r["status"] != Status.ok]
    assert not missing, f"{len(missing)} answered payments were lost: {missing[:5]}"
    assert replayed.counts()["payments"] >= len(acked)
