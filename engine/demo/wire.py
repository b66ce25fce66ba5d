"""The demo's traffic over the wire: a durable `scanpay` server on a
temporary data directory, and many concurrent gateway connections sending
PAY frames, each frame's latency recorded in an HdrHistogram.

The server runs in this process on its own thread and event loop (uvloop);
the gateways are `engine.client.AsyncClient`s on the main thread. The world
is built into the server's engine before it listens (the operator's setup).
"""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
from hdrh.histogram import HdrHistogram

from engine.client import AsyncClient
from engine.demo.stop import STOP
from engine.server.config import Config
from engine.server.server import Server
from engine.protocol.status import Status

CONNECTIONS = 16
FRAME_RECORDS = 512
LATENCY_US_MAX = 60_000_000


class BackgroundServer:
    """A Server on its own thread, started and stopped from this one."""

    def __init__(self, engine, data_dir: str):
        import uvloop
        self.loop = uvloop.new_event_loop()
        self.server = Server(Config(data=data_dir, listen="127.0.0.1:0"), engine=engine)
        ready = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.server.start())
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="scanpay-server", daemon=True)
        self.thread.start()
        if not ready.wait(30):
            raise RuntimeError("the demo server did not start")
        self.host, self.port = self.server.config.host_port

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(120)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


def stream(frames, host, port: int, on_reply, on_dry, server_of: bool = False) -> HdrHistogram:
    """Send every frame over CONNECTIONS pipelined connections; call
    on_reply(frame, results) as replies come; return the latency histogram.

    `host` may name several servers (a replicated cluster: the gateways are
    failover clients, engine/client/failover.py); with `server_of`,
    on_reply gets a third argument, the address of the server that answered.
    A `(CLOCK, now_ms)` item among the frames sets the engine clock there
    (a server started with a test clock: `scanpay demo --cluster`)."""
    latency = HdrHistogram(1, LATENCY_US_MAX, 3)

    async def gateway(queue: asyncio.Queue) -> None:
        async with await AsyncClient.connect(host, port, timeout_ms=120_000,
                                             client_name="scanpay-demo") as client:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, tuple):
                    await client.call(item[0], {"now": item[1]})
                    continue
                started = time.perf_counter()
                results = await client.pay(item)
                latency.record_value(max(1, int((time.perf_counter() - started) * 1e6)))
                if server_of:
                    on_reply(item, results, getattr(client, "address", f"{host}:{port}"))
                else:
                    on_reply(item, results)
                dry = np.unique(item["payer"][results["status"] == Status.insufficient_funds])
                if len(dry):
                    await client.call("TOPUP", {"topups": on_dry(dry)})

    async def main() -> None:
        # Ctrl-C cancels this task (engine/demo/stop.py): the gateways are
        # cancelled with it and close their connections.
        with STOP.cancels(asyncio.current_task()):
            queues = [asyncio.Queue(maxsize=4) for _ in range(CONNECTIONS)]
            workers = [asyncio.ensure_future(gateway(q)) for q in queues]
            for i, frame in enumerate(frames):
                await queues[i % CONNECTIONS].put(frame)
            for q in queues:
                await q.put(None)
            await asyncio.gather(*workers)

    try:
        asyncio.run(main())
    except asyncio.CancelledError:
        STOP.check()                    # cancelled by a stop signal: KeyboardInterrupt
        raise
    STOP.check()
    return latency
