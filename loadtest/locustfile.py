"""Load test of a running `scanpay serve` over the wire protocol, with locust.

    .venv/bin/locust -f loadtest/locustfile.py --headless -u 50 -r 10 -t 30s \\
        --csv /tmp/scanpay-load --host tcp://127.0.0.1:7411

On test start it refuses a server that holds data outside the load test's
own ids (see Safety in loadtest/README.md; SCANPAY_LOAD_ALLOW_SHARED=1 runs
beside it anyway), builds a small world (merchants, wallets, top-ups, stocks,
coupons; idempotent, so it can run again on the same data directory), then
each locust user runs: single PAY with automatic coupon selection, PAY
batches of 64, QUOTE, and ISSUE. Every frame is one locust request
(request_type PAY / ISSUE / QUOTE); error frames and statuses that mean a bug
or a broken world are failures.

Settings (environment variables):
  SCANPAY_HOST, SCANPAY_PORT   server address (else --host tcp://HOST:PORT or unix:///PATH;
                               default 127.0.0.1:7411). Loopback only.
  SCANPAY_USERS                wallets in the world (default 1000)
  SCANPAY_MERCHANTS            merchants (default 20)
  SCANPAY_COUPONS_PER_USER     coupons issued to each wallet at setup (default 2)
  SCANPAY_BATCH                records per PAY batch (default 64)
  SCANPAY_KEY_ID, SCANPAY_SECRET  HELLO key, when the server has keys
  SCANPAY_MAX_RUN_S            stop after this long when no -t/--run-time is given (default 120)
  SCANPAY_LOAD_ID_PREFIX       top 16 bits of every id it writes (default 0x5C00)
  SCANPAY_LOAD_ALLOW_SHARED    1: run against a server holding other data (never writes it)
"""
import ipaddress
import logging
import os
import random
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import gevent
import gevent.event
import numpy as np
from locust import User, constant, events, task
from locust.runners import WorkerRunner

try:
    import engine.client  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

sys.path.insert(0, str(Path(__file__).resolve().parent))   # load_world.py beside this file

from engine.client import Client, ConnectionLost, ProtocolError, parse_address  # noqa: E402
from engine.protocol.errors import EngineError  # noqa: E402
from engine.protocol.limits import BATCH_RECORDS_MAX  # noqa: E402
from engine.protocol.records import ISSUE_RECORD, PAY_RECORD  # noqa: E402
from engine.protocol.status import STATUS_NAMES, Status  # noqa: E402

import load_world  # noqa: E402
from load_world import ID_BASE, WorldError, fresh_id  # noqa: E402

log = logging.getLogger("scanpay.loadtest")


def _env_int(name: str, default: int, low: int, high: int) -> int:
    value = int(os.environ.get(name, default))
    if not low <= value <= high:
        raise SystemExit(f"{name}={value}: must be in {low}..{high}")
    return value


WALLETS = _env_int("SCANPAY_USERS", 1000, 1, 1_000_000)
MERCHANTS = _env_int("SCANPAY_MERCHANTS", 20, 1, 100_000)
COUPONS_PER_USER = _env_int("SCANPAY_COUPONS_PER_USER", 2, 0, 100)
BATCH_RECORDS = _env_int("SCANPAY_BATCH", 64, 1, BATCH_RECORDS_MAX)
MAX_RUN_S = _env_int("SCANPAY_MAX_RUN_S", 120, 1, 86_400)
KEY_ID = os.environ.get("SCANPAY_KEY_ID")
SECRET = os.environ.get("SCANPAY_SECRET")
TIMEOUT_MS = 10_000
AMOUNT_MIN, AMOUNT_MAX = 1_00, 500_00
# World ids: users and merchants ID_BASE+1.., stocks ID_BASE+9001..9003
# (loadtest/load_world.py): the load test's own namespace.
USER_BASE = MERCHANT_BASE = ID_BASE + 1
ISSUE_STOCKS = [s["id"] for s in load_world.stocks()]    # coupons of every stock

# Statuses that mean the world or the engine is wrong, not load.
PAY_OK = {Status.ok}
ISSUE_OK = {Status.ok}


def target() -> dict:
    """Where to connect, from SCANPAY_HOST/PORT or --host; refuses non-loopback."""
    host = os.environ.get("SCANPAY_HOST")
    port = os.environ.get("SCANPAY_PORT")
    url = _environment_host or ""
    if url.startswith("unix://"):
        return {"unix": urlparse(url).path}
    if host is None and url:
        host, parsed_port = parse_address(url)
        port = port or parsed_port
    host = host or "127.0.0.1"
    port = int(port or 7411)
    for *_, sockaddr in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP):
        if not ipaddress.ip_address(sockaddr[0]).is_loopback:
            raise WorldError(f"{host} is not a loopback address: this load test only targets "
                             "a server on this machine (127.0.0.1, ::1, localhost)")
    return {"host": host, "port": port}


_environment_host = None
_world_failed = gevent.event.Event()


def connect() -> Client:
    return Client.connect(**target(), key_id=KEY_ID, secret=SECRET, timeout_ms=TIMEOUT_MS,
                          client_name="scanpay-locust")


def prepare(client: Client) -> None:
    """Refuse a server holding other data (unless SCANPAY_LOAD_ALLOW_SHARED=1),
    then build the world in the load test's namespace."""
    load_world.check_server(client)
    load_world.build_world(client, WALLETS, MERCHANTS, COUPONS_PER_USER)


@events.init.add_listener
def on_init(environment, **_):
    """Refuse a non-loopback target before anything starts."""
    global _environment_host
    _environment_host = environment.host
    try:
        target()
    except (WorldError, OSError, ValueError) as e:
        log.error("%s", e)
        sys.exit(2)


@events.test_start.add_listener
def on_test_start(environment, **_):
    global _environment_host
    _environment_host = environment.host
    runner = environment.runner
    options = environment.parsed_options
    if options is not None and not getattr(options, "run_time", None):
        # Never run unattended forever: without -t, stop after MAX_RUN_S.
        log.warning("no --run-time given: stopping after %d s (SCANPAY_MAX_RUN_S)", MAX_RUN_S)
        gevent.spawn_later(MAX_RUN_S, runner.quit)
    if isinstance(runner, WorkerRunner):
        return      # the master builds the world once
    started = time.perf_counter()
    try:
        with connect() as client:
            prepare(client)
    except (OSError, EngineError, WorldError, ProtocolError) as e:
        hint = " (is `scanpay serve` running there?)" if isinstance(e, ConnectionRefusedError) else ""
        log.error("world setup failed: %s%s", e, hint)
        environment.process_exit_code = 2
        _world_failed.set()
        gevent.spawn(runner.quit)   # not from this greenlet: it is the runner's spawner
        return
    log.info("world ready in %.1f s: %d merchants, %d wallets, %d coupons", time.perf_counter()
             - started, MERCHANTS, WALLETS, WALLETS * COUPONS_PER_USER)


class ScanpayUser(User):
    """A payment gateway: one connection, one request at a time."""

    wait_time = constant(0)

    def on_start(self):
        global _environment_host
        _environment_host = _environment_host or self.environment.host
        self.client = None
        self.rng = random.Random()
        if _world_failed.is_set():
            gevent.sleep(MAX_RUN_S)     # idle until the quit scheduled at setup kills us

    def on_stop(self):
        if self.client is not None:
            self.client.close()

    # -- tasks ------------------------------------------------------------------

    @task(10)
    def pay_single(self):
        record = np.zeros(1, PAY_RECORD)
        self._fill(record)
        self._request("PAY", "single", lambda c: c.pay(record), self._check_pay)

    @task(2)
    def pay_batch(self):
        records = np.zeros(BATCH_RECORDS, PAY_RECORD)
        self._fill(records)
        self._request("PAY", f"batch{BATCH_RECORDS}", lambda c: c.pay(records), self._check_pay)

    @task(3)
    def quote(self):
        request = {"payer": self._user(), "merchant": self._merchant(),
                   "amount": self.rng.randint(AMOUNT_MIN, AMOUNT_MAX)}
        self._request("QUOTE", "quote", lambda c: c.call("QUOTE", request), self._check_map)

    @task(2)
    def issue(self):
        record = np.zeros(1, ISSUE_RECORD)
        record["coupon"] = fresh_id()
        record["stock"] = self.rng.choice(ISSUE_STOCKS)
        record["user"] = self._user()
        self._request("ISSUE", "single", lambda c: c.issue(record), self._check_issue)

    # -- helpers ------------------------------------------------------------------

    def _user(self) -> int:
        return USER_BASE + self.rng.randrange(WALLETS)

    def _merchant(self) -> int:
        return MERCHANT_BASE + self.rng.randrange(MERCHANTS)

    def _fill(self, records: np.ndarray) -> None:
        n = len(records)
        records["id"] = [fresh_id() for _ in range(n)]
        records["payer"] = [self._user() for _ in range(n)]
        records["merchant"] = [self._merchant() for _ in range(n)]
        records["amount"] = [self.rng.randint(AMOUNT_MIN, AMOUNT_MAX) for _ in range(n)]

    @staticmethod
    def _check_pay(results) -> str | None:
        return _bad_statuses(results["status"], PAY_OK)

    @staticmethod
    def _check_issue(results) -> str | None:
        return _bad_statuses(results["status"], ISSUE_OK)

    @staticmethod
    def _check_map(reply) -> str | None:
        status = reply.get("status", 0)
        return None if status == Status.ok else f"status {reply.get('error', status)}"

    def _request(self, request_type: str, name: str, send, check) -> None:
        started = time.perf_counter()
        exception = None
        length = 0
        try:
            if self.client is None:
                self.client = connect()
            reply = send(self.client)
            length = self.client.last_reply_bytes
            problem = check(reply)
            if problem:
                exception = WorldError(problem)
        except (ConnectionLost, OSError, ProtocolError) as e:
            exception = e
            if self.client is not None:
                self.client.close()
            self.client = None      # the next task reconnects
        except EngineError as e:    # an error frame: busy, bad_body, ...
            exception = e
        self.environment.events.request.fire(
            request_type=request_type, name=name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length, exception=exception, context={})


def _bad_statuses(statuses: np.ndarray, ok: set) -> str | None:
    bad = ~np.isin(statuses, list(ok))
    if not bad.any():
        return None
    first = int(statuses[bad][0])
    # One failure row per status in locust's report: no counts in the text.
    return f"record status {STATUS_NAMES.get(first, first)}"
