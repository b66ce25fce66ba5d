"""Python client benchmark (issue 16): payments per second that one Python
process gets through `engine.client.AsyncClient` over 16 connections, the
client as it was before this change and as it is now, side by side in one run.

    .venv/bin/python bench/bench_client.py [--seconds 4] [--connections 16] \\
        [--window 64] [--rounds 2] [--before main] [--memory]

Two processes: `scanpay serve` (durable, temp data dir, loopback; or
in-memory with `--memory`, which runs the server in a child process on an
in-memory Engine) and this one. Rounds alternate before / after, for two
workloads each:

- `pay_one`: `window` coroutines per connection, each awaiting
  `pay_one(...)` in a loop (the client coalesces the calls of one loop tick
  into a PAY frame);
- `pay1`: the same, each awaiting `pay(records)` of a 1-record array (one
  PAY frame per call).

"before" is engine/client.py at git revision `--before`, loaded as a module
of its own (`git show REV:engine/client.py`); "after" is the working tree's;
"failover" (`--clients after,failover`) is the working tree's failover
client of one address (engine/client/failover.py, issue 17) on the same
kind of connection: what routing each call to the leader costs when
nothing fails.
Reported per round: payments/s, client CPU microseconds per payment (this
process's CPU time / payments), server CPU microseconds per payment, p50 and
p99 latency of a call, and the share of the client's CPU that the garbage
collector took (`--gc-threshold N` sets its young-generation threshold).
Bounded: every round has a deadline; the server is
always stopped.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np                                  # noqa: E402

from bench._common import ServerProcess, free_port, load, machine  # noqa: E402
from engine import client as client_after           # noqa: E402
from engine.protocol.status import STATUS_OK        # noqa: E402

HEADER, PAY_RECORD = client_after.HEADER, client_after.PAY_RECORD

ONE_PAY_FRAME = np.dtype([("size", "<u4"), ("op", "<u2"), ("flags", "<u2"),
                          ("request_id", "<u8"), ("body", "u1", 80)])
HELLO_REPLY = bytes.fromhex("81a870726f746f636f6c01")   # msgpack {"protocol": 1}

USERS = 10_000
BEFORE_DEFAULT = "eddc990"       # the last commit before issue 16's client work
ROUND_DEADLINE_S = 60
MEMORY_SERVER = """
import asyncio, sys
from engine import Engine
try:                                    # the package layout of issue 15
    from engine.server.config import Config
    from engine.server.server import Server
except ImportError:
    from engine.config import Config
    from engine.server import Server
async def main():
    server = Server(Config(data="", listen=sys.argv[1]), engine=Engine())
    await server.start()
    await asyncio.Event().wait()
import uvloop
uvloop.run(main())
"""


def Server(data_dir: str, memory: bool) -> ServerProcess:    # noqa: N802 - a constructor
    """A server on a free port: in memory (MEMORY_SERVER) or `scanpay serve`."""
    port = free_port()
    listen = f"127.0.0.1:{port}"
    argv = (["-c", MEMORY_SERVER, listen] if memory else
            ["-m", "engine.cli", "serve", "--data", os.path.join(data_dir, "data"),
             "--listen", listen])
    return ServerProcess(argv, port, os.path.join(data_dir, "server.log"))


def client_before(rev: str):
    """The client at `rev` (engine/client.py, or engine/client/__init__.py
    after the package layout), as the module engine._client_before."""
    for path in ("engine/client.py", "engine/client/__init__.py"):
        shown = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=str(ROOT),
                               capture_output=True, text=True)
        if shown.returncode == 0:
            break
    else:
        raise SystemExit(f"no client at git revision {rev}: {shown.stderr.strip()}")
    source = old_imports_to_the_package_layout(shown.stdout)
    path = os.path.join(tempfile.mkdtemp(prefix="client-before-"), "client.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("engine._client_before", path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "engine"
    sys.modules[spec.name] = module          # msgspec resolves the Structs' annotations there
    spec.loader.exec_module(module)
    return module


# Where the old flat modules the old client imports live now (issue 15's layout).
OLD_MODULES = {"dispatch": "engine.protocol.ops", "errors": "engine.protocol.errors",
               "frame": "engine.protocol.frame", "records": "engine.protocol.records",
               "status": "engine.protocol.status"}


def old_imports_to_the_package_layout(source: str) -> str:
    for old, new in OLD_MODULES.items():
        source = source.replace(f"from .{old} import", f"from {new} import")
    return source


async def setup_world(port: int) -> None:
    async with await client_after.AsyncClient.connect("127.0.0.1", port) as c:
        await c.call("MERCHANTS", {"merchants": [{"id": m, "fee_bps": 60} for m in range(1, 101)]})
        for start in range(1, USERS + 1, 1000):
            users = list(range(start, min(start + 1000, USERS + 1)))
            await c.call("WALLETS", {"users": users})
            await c.call("TOPUP", {"topups": [{"id": u, "user": u, "amount": 10**12}
                                              for u in users]})


class EchoTransport:
    """`--inproc`: stands in for the socket and the server. Every frame
    written is answered at the next loop iteration (HELLO with a map, PAY
    with one ok result per record carrying its id), so a round measures the
    client's own CPU per payment, with no kernel and no server sharing the
    cores. The echo costs the same for both clients (about 0.3 us a record; 1-record
    PAY frames are answered with numpy, at a fraction of that)."""
    ZEROS = bytes(72)

    def __init__(self, protocol, loop):
        self.protocol, self.loop = protocol, loop

    def write(self, data) -> None:
        data = bytes(data)
        frames = np.frombuffer(data, ONE_PAY_FRAME) if len(data) % 96 == 0 else None
        if (frames is not None and (frames["size"] == 80).all()
                and (frames["op"] == 16).all()):
            # The usual write of `pay1`: only 1-record PAY frames; answered
            # with numpy so that the echo costs a fraction of the client.
            replies = np.zeros(len(frames), ONE_PAY_FRAME)
            replies["size"], replies["op"] = 80, 16
            replies["request_id"] = frames["request_id"]
            replies["body"][:, :8] = frames["body"][:, :8]
            self.loop.call_soon(self.protocol.data_received, replies.tobytes())
            return
        replies, at = [], 0
        while at < len(data):
            size, op, _, rid = HEADER.unpack_from(data, at)
            body = data[at + 16:at + 16 + size]
            at += 16 + size
            if op == 16:
                payload = b"".join(body[i:i + 8] + self.ZEROS for i in range(0, size, 80))
            else:
                payload = HELLO_REPLY
            replies.append(HEADER.pack(len(payload), op, 0, rid) + payload)
        self.loop.call_soon(self.protocol.data_received, b"".join(replies))

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def get_extra_info(self, name):
        return None


async def echo_client(module):
    client = module.AsyncClient()
    protocol = module._Protocol(client)
    protocol.connection_made(EchoTransport(protocol, asyncio.get_running_loop()))
    await client.hello()
    return client


async def failover_client(port: int | None):
    """The failover client of one address, over an echo or a server connection."""
    from engine.client import failover
    if port is not None:
        return await client_after.AsyncClient.connect("127.0.0.1", port,
                                                      retry_deadline_ms=10_000)
    route = failover._Route([failover.Address("127.0.0.1", 1)],
                            failover.RetryPolicy(10_000, 50, 2_000))
    client = failover.FailoverAsyncClient(route, {"timeout_ms": 10_000})
    client._adopt(await echo_client(client_after))
    return client


class GcMeter:
    """The collections the garbage collector ran, and the time it took, while on."""

    def __init__(self):
        self.collections, self.seconds, self._started = 0, 0.0, 0.0
        self.on = False

    def __call__(self, phase: str, info: dict) -> None:
        if not self.on:
            return
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.collections += 1
            self.seconds += time.perf_counter() - self._started


async def one_round(module, port: int | None, workload: str, seconds: float,
                    connections: int, window: int, id_base: int) -> dict:
    clients = [await (failover_client(port) if module == "failover" else
                      echo_client(module) if port is None else
                      module.AsyncClient.connect("127.0.0.1", port))
               for _ in range(connections)]
    state = {"go": True, "measuring": False, "count": 0, "bad": 0}
    latencies_ns: list[int] = []
    next_id = [id_base]

    async def worker(client, k: int):
        record = np.zeros(1, PAY_RECORD)
        calls = 0
        while state["go"] and calls < 10_000_000:
            calls += 1
            pid = next_id[0]
            next_id[0] += 1
            payer, merchant = pid % USERS + 1, pid % 100 + 1
            t0 = time.perf_counter_ns()
            if workload == "pay_one":
                result = await client.pay_one(id=pid, payer=payer, merchant=merchant, amount=100)
                status = result.status
            else:
                record[0] = (pid, payer, merchant, 100, 0, 0, (0, 0, 0, 0), 0)
                status = (await client.pay(record))["status"][0]
            if state["measuring"]:
                latencies_ns.append(time.perf_counter_ns() - t0)
                state["count"] += 1
                state["bad"] += status != STATUS_OK

    tasks = [asyncio.ensure_future(worker(c, k)) for c in clients for k in range(window)]
    await asyncio.sleep(0.5)                     # warm-up
    meter = GcMeter()
    gc.callbacks.append(meter)
    state["measuring"] = meter.on = True
    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.sleep(seconds)
    state["measuring"] = meter.on = False
    cpu, elapsed = time.process_time() - cpu0, time.perf_counter() - t0
    gc.callbacks.remove(meter)
    state["go"] = False
    await asyncio.wait(tasks, timeout=ROUND_DEADLINE_S)
    for client in clients:
        client.close()
    latencies_ns.sort()
    n = state["count"]
    return {"rate": n / elapsed, "count": n, "bad": state["bad"], "client_cpu_s": cpu,
            "client_us_per_payment": 1e6 * cpu / max(n, 1),
            "p50_ms": latencies_ns[n // 2] / 1e6 if n else None,
            "p99_ms": latencies_ns[min(n - 1, n * 99 // 100)] / 1e6 if n else None,
            "gc_collections": meter.collections, "gc_share": meter.seconds / max(cpu, 1e-9),
            "next_id": next_id[0]}


async def main_async(args, server: Server | None) -> list[dict]:
    if server is not None:
        await setup_world(server.port)
    if args.gc_threshold:
        gc.set_threshold(args.gc_threshold)
    chosen = args.clients.split(",")
    modules = {"before": client_before(args.before) if "before" in chosen else None,
               "after": client_after, "failover": "failover"}
    modules = {k: v for k, v in modules.items() if k in chosen}
    rows, id_base = [], 1
    for round_no in range(1, args.rounds + 1):
        for workload in args.workloads.split(","):
            for name, module in modules.items():
                server_cpu0 = server.cpu_seconds() if server else 0.0
                row = await asyncio.wait_for(one_round(
                    module, server.port if server else None, workload, args.seconds,
                    args.connections, args.window, id_base), ROUND_DEADLINE_S)
                id_base = row.pop("next_id")
                row["server_us_per_payment"] = (1e6 * (server.cpu_seconds() - server_cpu0)
                                                / max(row["count"], 1)) if server else 0.0
                row.update(round=round_no, workload=workload, client=name, load=load())
                rows.append(row)
                print(f"round {round_no} {workload:7} {name:6} {row['rate']:>9,.0f}/s  "
                      f"client {row['client_us_per_payment']:5.1f} us/pay  "
                      f"server {row['server_us_per_payment']:5.1f} us/pay  "
                      f"p50 {row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:6.2f} ms  "
                      f"gc {row['gc_share']:4.0%} of the CPU ({row['gc_collections']}x)  "
                      f"bad {row['bad']}  ({row['load']})", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=4.0, help="measured seconds per round")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--window", type=int, default=64, help="coroutines per connection")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--before", default=BEFORE_DEFAULT,
                   help="git revision of the 'before' client (default: the client before issue 16)")
    p.add_argument("--memory", action="store_true", help="in-memory server (default durable)")
    p.add_argument("--clients", default="before,after", help="which clients to run")
    p.add_argument("--inproc", action="store_true",
                   help="no server, no socket: an in-process echo answers (client CPU alone)")
    p.add_argument("--workloads", default="pay_one,pay1", help="which workloads to run")
    p.add_argument("--gc-threshold", type=int, default=0,
                   help="the collector's young-generation threshold (default: Python's, 700); "
                        "see docs/client.md, 'A gateway process'")
    p.add_argument("--profile", help="cProfile this process into PATH (distorts the rates)")
    args = p.parse_args(argv)
    kind = "none (in-process echo)" if args.inproc else "in-memory" if args.memory else "durable"
    print(f"machine: {machine()}; server: {kind} "
          f"scanpay serve; client: {getattr(client_after, 'IMPLEMENTATION', 'python')}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-client-") as tmp:
        server = None if args.inproc else Server(tmp, args.memory)
        try:
            import uvloop
            if args.profile:
                import cProfile
                cProfile.runctx("uvloop.run(main_async(args, server))", globals(),
                                {"uvloop": uvloop, "args": args, "server": server},
                                args.profile)
            else:
                uvloop.run(main_async(args, server))
        finally:
            if server is not None:
                server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
