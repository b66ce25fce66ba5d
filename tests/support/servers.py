"""A real server on its own thread and event loop, for the blocking client,
the admin commands, the CLI and locust to talk to (the `real` fixture in
tests/conftest.py starts one), and the world and batches those tests send."""
import asyncio
import socket
import threading

import numpy as np

from engine import Engine
from engine.cli import admin
from engine.protocol import frame
from engine.ports import free_port
from engine.protocol.ops import OP_PAY
from engine.protocol.records import PAY_RECORD
from engine.server.config import Config
from engine.server.server import Server

START_TIMEOUT_S = 10



class RealServer:
    """`with RealServer(engine=None, **settings) as running:` serves an
    in-memory Engine (a new one, or `engine`) on a loopback port (a free one,
    or `listen="127.0.0.1:PORT"` among the settings, to start again on the
    same port); `running` has .server, .engine and .port."""

    def __init__(self, engine=None, **settings):
        self.given_engine = engine
        self.settings = settings
        self.started = threading.Event()
        self.error = None

    def __enter__(self):
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.thread.start()
        assert self.started.wait(START_TIMEOUT_S), self.error
        if self.error:
            raise self.error
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(START_TIMEOUT_S)

    async def _main(self):
        self.loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        try:
            self.engine = self.given_engine if self.given_engine is not None else Engine()
            settings = {"data": "", "listen": "127.0.0.1:0", **self.settings}
            self.server = Server(Config(**settings), engine=self.engine)
            await self.server.start()
            self.port = self.server.config.host_port[1]
        except Exception as e:     # noqa: BLE001 - reported by __enter__
            self.error = e
            self.started.set()
            return
        self.started.set()
        await self.stopping.wait()
        await self.server.stop()


async def setup_world(c):
    """Two merchants, two funded wallets and one platform stock, through a client."""
    replies = [
        await c.call("MERCHANTS", {"merchants": [{"id": 1, "fee_bps": 60}, {"id": 2}]}),
        await c.call("WALLETS", {"users": [1, 2]}),
        await c.call("TOPUP", {"topups": [{"id": 1, "user": 1, "amount": 10**9},
                                          {"id": 2, "user": 2, "amount": 10**9}]}),
        await c.call("STOCKS", {"stocks": [{
            "id": 5, "funder": "platform", "kind": "fixed", "value": 5_00, "min_spend": 20_00,
            "valid_from": 0, "valid_until": 2**62, "stacking": "stackable"}]}),
    ]
    for reply in replies:
        assert all(r["status"] == 0 for r in reply["results"]), reply


def pay_batch(n, start_id=1):
    records = np.zeros(n, PAY_RECORD)
    records["id"] = np.arange(start_id, start_id + n)
    records["payer"], records["merchant"] = 42, 7
    records["amount"] = np.arange(n) + 100
    return records


def pay_frame(gateway: int, seq: int, records_per_frame: int = 4, users: int = 8) -> bytes:
    """PAY frame `seq` of pipelining gateway `gateway` (the crash and failover
    tests): ids unique across gateways and frames, payers 1..users at merchant 1."""
    records = np.zeros(records_per_frame, PAY_RECORD)
    records["id"] = [(gateway << 40) | (seq * records_per_frame + k)
                     for k in range(records_per_frame)]
    records["payer"] = 1 + (seq + gateway) % users
    records["merchant"] = 1
    records["amount"] = 100 + seq % 50
    return frame.encode(OP_PAY, seq, records.tobytes())


def admin_main(argv):
    """`scanpay <admin command> ARGV` in process: (exit code, stdout, stderr)."""
    import argparse
    import io
    parser = argparse.ArgumentParser(prog="scanpay")
    admin.add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    assert admin.handles(args)
    out, err = io.StringIO(), io.StringIO()
    code = admin.run(args, out, err)
    return code, out.getvalue(), err.getvalue()
