"""ISO 8583 adapter benchmark (issue 19): approvals per second through
`scanpay iso8583` from 16 links, with p50/p99, side by side with the same
kind of payments over Scanpay's own protocol, in one run.

    .venv/bin/python bench/bench_iso8583.py [--payments 8000] [--links 16] [--window 16]

Three processes: a durable `scanpay serve` (temp dir, loopback), `scanpay
iso8583` in front of it, and this load generator. Rounds alternate native,
ISO, native, ISO (`--rounds`), each with fresh payment codes (a code lives
60 s) drawn just before the round, so the two paths see the same engine
state and the same machine noise:

- native: 16 AsyncClient connections, each keeping `window` pay_one calls in
  flight (payment-code flag, one merchant), latency per call;
- ISO: 16 links to the adapter, each keeping `window` 0200 messages in
  flight, pre-encoded with pyiso8583 before the clock starts, replies
  decoded and matched by STAN, latency per message. Every reply must be 00.

SCANPAY_ADAPTER_PROFILE=PATH runs the adapter under cProfile (stats to PATH).

The adapter's overhead per message is reported two ways: its CPU time per
message (utime + stime of its process over the ISO rounds / messages), and
the difference in mean latency between the two paths. Bounded: every round
has a deadline; the processes are always stopped.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import resource
import struct
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import iso8583                                      # noqa: E402
from iso8583.specs import default_ascii as SPEC    # noqa: E402

from bench._common import ServerProcess, free_port, load, machine  # noqa: E402
from engine.client import AsyncClient               # noqa: E402
from engine.protocol.records import PAY_PAYER_IS_CODE        # noqa: E402
from engine.protocol.status import Status           # noqa: E402

ROUND_DEADLINE_S = 120
MERCHANT_DE42 = "MERCHANT0000001"
LENGTH = struct.Struct(">H")


def Process(args: list[str], port: int, log_path: str) -> ServerProcess:  # noqa: N802
    """`scanpay ARGS` on `port` (the adapter under cProfile when
    SCANPAY_ADAPTER_PROFILE names an output file)."""
    profile = os.environ.get("SCANPAY_ADAPTER_PROFILE") if args[0] == "iso8583" else None
    prefix = ["-m", "cProfile", "-o", profile] if profile else []
    return ServerProcess([*prefix, "-m", "engine.cli", *args], port, log_path)


# ---------------------------------------------------------------- setup

async def setup_world(client: AsyncClient, users: int) -> list[int]:
    ids = list(range(1, users + 1))
    await client.call("MERCHANTS", {"merchants": [{"id": 1, "fee_bps": 60}]})
    for start in range(0, users, 1000):
        chunk = ids[start:start + 1000]
        await client.call("WALLETS", {"users": chunk})
        await client.call("TOPUP", {"topups": [{"id": u, "user": u, "amount": 10**9}
                                               for u in chunk]})
    return ids


async def payment_codes(client: AsyncClient, users: list[int], n: int) -> list[int]:
    async def one(user):
        return (await client.call("PAYMENT_CODE", {"user": user}))["code"]
    codes = []
    for start in range(0, n, 2000):          # bounded concurrency
        codes += await asyncio.gather(*(one(users[i % len(users)])
                                        for i in range(start, min(start + 2000, n))))
    return codes


# ---------------------------------------------------------------- the two paths

def percentile(sorted_values: list[float], p: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(p * len(sorted_values)))]


async def native_round(port: int, codes: list[int], id_base: int, links: int,
                       window: int) -> tuple[float, list[float]]:
    clients = [await AsyncClient.connect("127.0.0.1", port) for _ in range(links)]
    latencies: list[float] = []

    async def worker(k: int):
        client, mine = clients[k], range(k, len(codes), links)
        sem = asyncio.Semaphore(window)

        async def one(i):
            async with sem:
                t0 = time.perf_counter()
                result = await client.pay_one(id=id_base + i, payer=codes[i], merchant=1,
                                              amount=100 + i % 900, flags=PAY_PAYER_IS_CODE)
                latencies.append(time.perf_counter() - t0)
                assert result.status == Status.ok, result
        await asyncio.gather(*(one(i) for i in mine))
    start = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker(k) for k in range(links))), ROUND_DEADLINE_S)
    elapsed = time.perf_counter() - start
    for client in clients:
        client.close()
    return elapsed, latencies


def iso_messages(codes: list[int], rrn_base: int, link: int, links: int) -> list[tuple[str, bytes]]:
    out = []
    for n, i in enumerate(range(link, len(codes), links)):
        stan = f"{n % 1_000_000:06d}"
        doc = {"t": "0200", "2": str(codes[i]), "3": "000000", "4": f"{100 + i % 900:012d}",
               "7": "1206153000", "11": stan, "32": "12345", "37": f"{rrn_base + i:012d}",
               "41": f"T{link:07d}", "42": MERCHANT_DE42, "49": "156"}
        raw, _ = iso8583.encode(doc, SPEC)
        out.append((stan, LENGTH.pack(len(raw)) + bytes(raw)))
    return out


async def iso_link(port: int, messages: list[tuple[str, bytes]], window: int,
                   latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sent_at: dict[str, float] = {}
    sem = asyncio.Semaphore(window)

    async def read_all():
        for _ in messages:
            size = LENGTH.unpack(await reader.readexactly(2))[0]
            doc, _ = iso8583.decode(await reader.readexactly(size), SPEC)
            latencies.append(time.perf_counter() - sent_at.pop(doc["11"]))
            assert doc["39"] == "00", doc["39"]
            sem.release()
    reading = asyncio.get_running_loop().create_task(read_all())
    for stan, raw in messages:
        await sem.acquire()
        sent_at[stan] = time.perf_counter()
        writer.write(raw)
    await reading
    writer.close()


async def iso_round(port: int, codes: list[int], rrn_base: int, links: int,
                    window: int) -> tuple[float, list[float]]:
    per_link = [iso_messages(codes, rrn_base, k, links) for k in range(links)]
    latencies: list[float] = []
    start = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(iso_link(port, msgs, window, latencies)
                                            for msgs in per_link)), ROUND_DEADLINE_S)
    return time.perf_counter() - start, latencies


# ---------------------------------------------------------------- where the adapter's time goes

def stage_costs(repeats: int = 5000) -> dict:
    """CPU microseconds per message of the adapter's own steps, in this process:
    pyiso8583 decode, the mapping (field checks, payment id), the response
    built and encoded by pyiso8583. Best of 3, to keep machine noise out."""
    import timeit
    from engine.iso8583 import mapping as m
    config = m.config_from({"merchants": {MERCHANT_DE42: 1}}, {})
    spec = config.build_spec()
    raw = iso_messages([123456789012345678], 1, 0, 1)[0][1][2:]
    doc = m.decode(raw, spec)
    response = {"t": "0210", **m.response_fields(doc, config.echo_fields), "39": "00",
                "38": "123456", "54": m.additional_amounts("156", 2500, 500)}
    steps = {"pyiso8583 decode": lambda: m.decode(raw, spec),
             "mapping": lambda: m.parse_request(doc, config),
             "pyiso8583 encode": lambda: m.encode(response, spec)}
    return {name: min(timeit.repeat(fn, timer=time.process_time, number=repeats, repeat=3))
            / repeats * 1e6 for name, fn in steps.items()}


# ---------------------------------------------------------------- the run

def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def summary(name: str, elapsed: float, latencies: list[float], loadgen_cpu_s: float) -> dict:
    ordered = sorted(latencies)
    return {"path": name, "approvals": len(ordered), "seconds": elapsed,
            "loadgen_us": loadgen_cpu_s / len(ordered) * 1e6,
            "rate": len(ordered) / elapsed, "p50_ms": percentile(ordered, 0.50) * 1e3,
            "p99_ms": percentile(ordered, 0.99) * 1e3,
            "mean_ms": sum(ordered) / len(ordered) * 1e3}


async def drive(args, server_port: int, adapter: Process) -> list[dict]:
    admin = await AsyncClient.connect("127.0.0.1", server_port, timeout_ms=120_000)
    users = await setup_world(admin, args.users)
    rows, adapter_cpu_s, iso_messages_n = [], 0.0, 0
    for r in range(args.rounds):
        for path in ("native", "iso"):
            codes = await payment_codes(admin, users, args.payments)
            base = (r * 2 + (path == "iso") + 1) * 10_000_000
            own0 = own_cpu_seconds()
            if path == "native":
                elapsed, lat = await native_round(server_port, codes, base, args.links, args.window)
            else:
                cpu0 = adapter.cpu_seconds()
                elapsed, lat = await iso_round(adapter.port, codes, base, args.links, args.window)
                adapter_cpu_s += adapter.cpu_seconds() - cpu0
                iso_messages_n += len(lat)
            rows.append(summary(path, elapsed, lat, own_cpu_seconds() - own0))
            print(f"round {r + 1} {path:6s} {rows[-1]['rate']:8.0f} approvals/s  "
                  f"p50 {rows[-1]['p50_ms']:6.2f} ms  p99 {rows[-1]['p99_ms']:6.2f} ms", flush=True)
    admin.close()
    rows.append({"path": "adapter cpu", "us_per_message": adapter_cpu_s / iso_messages_n * 1e6})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--payments", type=int, default=8000, help="payments per round and path")
    parser.add_argument("--links", type=int, default=16)
    parser.add_argument("--window", type=int, default=16, help="messages in flight per link")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--users", type=int, default=2000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="scanpay-iso-bench-") as tmp:
        server_port, adapter_port = free_port(), free_port()
        config = pathlib.Path(tmp, "iso.toml")
        config.write_text(f'[iso8583]\ninflight_max = 1024\n[iso8583.merchants]\n'
                          f'"{MERCHANT_DE42}" = 1\n')
        server = Process(["serve", "--data", f"{tmp}/data", "--listen",
                          f"127.0.0.1:{server_port}"], server_port, f"{tmp}/server.log")
        adapter = None
        try:
            adapter = Process(["iso8583", "--listen", f"127.0.0.1:{adapter_port}", "--engine",
                               f"127.0.0.1:{server_port}", "--config", str(config)],
                              adapter_port, f"{tmp}/adapter.log")
            import uvloop
            rows = uvloop.run(drive(args, server_port, adapter))
        finally:
            if adapter is not None:
                adapter.stop()
            server.stop()
    print_table(rows, args)
    costs = stage_costs()
    print("adapter steps, us per message (in this process, best of 3): " + ", ".join(
        f"{name} {us:.1f}" for name, us in costs.items()))
    return 0


def print_table(rows: list[dict], args) -> None:
    print(f"\n{machine()}; {load()} at the end")
    print(f"{args.links} links/connections, {args.window} in flight each, "
          f"{args.payments} payments per round and path, durable server\n")
    print("| path | round | approvals/s | p50 ms | p99 ms | mean ms | load generator CPU us/msg |")
    print("|---|---|---|---|---|---|---|")
    rounds = {"native": 0, "iso": 0}
    for row in rows:
        if "rate" in row:
            rounds[row["path"]] += 1
            print(f"| {row['path']} | {rounds[row['path']]} | {row['rate']:,.0f} | "
                  f"{row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['mean_ms']:.2f} | "
                  f"{row['loadgen_us']:.0f} |")
    native = [r for r in rows if r.get("path") == "native"]
    iso = [r for r in rows if r.get("path") == "iso"]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)     # noqa: E731
    print(f"\nadapter CPU per message: {rows[-1]['us_per_message']:.1f} us; "
          f"mean latency added: {mean(iso, 'mean_ms') - mean(native, 'mean_ms'):.2f} ms; "
          f"ISO/native rate: {mean(iso, 'rate') / mean(native, 'rate'):.2f}")


if __name__ == "__main__":
    sys.exit(main())
