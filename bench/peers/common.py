"""What every peer returns, and the small process helpers they share."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import time

import numpy as np

from engine.ports import free_port  # noqa: F401 (the peers' one way to a port)

from .workload import FinalState, Payment

STOP_TIMEOUT_S = 30
READY_TIMEOUT_S = 60


@dataclasses.dataclass
class Run:
    """One measured run of one peer in one mode."""
    peer: str
    column: str                 # "many" (many callers / batched) or "one" (one at a time)
    how: str                    # what the figure measured: connections, pipeline, batch
    payments: int
    seconds: float
    latencies_s: list[float]    # per `latency_of`
    latency_of: str             # "payment", "frame of 8,190", "pipeline of 64", ...
    state: FinalState
    row: str = ""               # the table row, when a peer has several (default: peer)

    @property
    def rate(self) -> float:
        return self.payments / self.seconds

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q)) * 1e3

    def summary(self) -> dict:
        return {"peer": self.peer, "column": self.column, "how": self.how,
                "payments": self.payments, "seconds": round(self.seconds, 4),
                "payments_per_s": round(self.rate, 1), "latency_of": self.latency_of,
                "p50_ms": round(self.percentile_ms(50), 4),
                "p99_ms": round(self.percentile_ms(99), 4),
                "state_hash": self.state.digest()}



def wait_port(port: int, proc: subprocess.Popen | None, log_path: str,
              timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited (code {proc.returncode}); its log "
                               f"{log_path} ends: {tail(log_path)}")
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s; "
                       f"log {log_path}: {tail(log_path)}")


def tail(path: str, chars: int = 1500) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-chars:]
    except OSError as e:
        return f"(unreadable: {e})"


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Signal the process we started (by pid), SIGKILL if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


def chunks(items: list, size: int):
    for lo in range(0, len(items), size):
        yield items[lo:lo + size]


def one_at_a_time(pay_one, payments: list[Payment], clock) -> tuple[list[str], list[float]]:
    """Drive a blocking `pay_one(payment) -> outcome name` one payment at a time."""
    names, latencies = [], []
    for p in payments:
        t0 = clock()
        names.append(pay_one(p))
        latencies.append(clock() - t0)
    return names, latencies


def lanes_in_threads(conns: list, lanes: list, payer_of, clock):
    """Each lane in its own thread on its own connection, all released at
    once: (outcome names, seconds from the release to the last lane's end,
    latencies). `payer_of(conn)` gives the lane's pay_one. The connections
    are closed at the end; a lane's error is raised here."""
    import threading
    results: list = [None] * len(lanes)
    errors: list = []
    gate = threading.Barrier(len(lanes) + 1)

    def lane_thread(k: int) -> None:
        try:
            gate.wait()
            results[k] = one_at_a_time(payer_of(conns[k]), lanes[k], clock)
        except BaseException as e:          # reported by the main thread
            errors.append(e)
    # Daemons: on Ctrl-C the main thread stops the server and must not wait for them.
    threads = [threading.Thread(target=lane_thread, args=(k,), daemon=True)
               for k in range(len(lanes))]
    for t in threads:
        t.start()
    gate.wait()
    started = clock()
    for t in threads:
        t.join()
    seconds = clock() - started
    for conn in conns:
        conn.close()
    if errors:
        raise errors[0]
    return ([n for r in results for n in r[0]], seconds, [x for r in results for x in r[1]])
