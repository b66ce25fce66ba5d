"""Replicated `scanpay serve --replicate` nodes as processes, for the
replication tests (kill -9, SIGSTOP): started on loopback ports, each with
its own data directory and log file, stopped by pid."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

from engine.client import Client, hello_request
from engine.ports import free_port
from engine.replication.node import EXIT_STREAM_BROKEN
from support import ROOT

START_TIMEOUT_S = 30.0
ROLE_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
POLL_S = 0.05
CLIENT_TIMEOUT_MS = 15000           # the machine may be shared and busy
EXIT_TIMEOUT_S = 15.0               # a node that must stop by itself


class Node:
    """One `scanpay serve --replicate` process (`start` again after a kill:
    same data directory and port)."""

    def __init__(self, directory: str, servers: str, lease_ms: int, name: str, **settings):
        self.name = name
        self.data = os.path.join(directory, name)
        self.port = free_port()
        self.log_path = os.path.join(directory, f"{name}.log")
        self.config_path = os.path.join(directory, f"{name}.toml")
        self.process = None
        settings = {"lease_ms": lease_ms, "replicate": servers, **settings}
        lines = [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
        with open(self.config_path, "w") as f:
            f.write("[server]\n" + "\n".join(lines) + "\n")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> "Node":
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "engine.cli", "serve", "--config", self.config_path,
                 "--data", self.data, "--listen", self.address], cwd=ROOT,
                env={**os.environ, "PYTHONPATH": ROOT}, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL)
        if wait:
            self.wait_listening()
        return self

    def wait_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self.process.poll() is None, f"{self.name} exited: {self.log_tail()}"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                assert time.monotonic() < deadline, f"{self.name} did not start: {self.log_tail()}"
                time.sleep(POLL_S)

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)
        if sig == signal.SIGKILL:
            self.process.wait(STOP_TIMEOUT_S)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGCONT)
        self.process.terminate()
        try:
            return self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(STOP_TIMEOUT_S)

    def client(self) -> Client:
        return Client.connect("127.0.0.1", self.port, timeout_ms=CLIENT_TIMEOUT_MS)

    def hello(self) -> dict:
        with self.client() as c:
            return c.call("HELLO", hello_request())


def wait_for_leader(nodes: list, timeout_s: float = ROLE_TIMEOUT_S) -> Node:
    """The one running node whose HELLO says leader (the others follow)."""
    deadline = time.monotonic() + timeout_s
    while True:
        roles = {}
        for node in nodes:
            if node.running():
                try:
                    roles[node.name] = node.hello()["role"]
                except (OSError, Exception):    # noqa: BLE001 - starting, or just killed
                    roles[node.name] = "?"
        leaders = [n for n in nodes if roles.get(n.name) == "leader"]
        if len(leaders) == 1:
            return leaders[0]
        assert time.monotonic() < deadline, f"no single leader: {roles}"
        time.sleep(POLL_S * 4)


def wait_for_role(node: Node, role: str, timeout_s: float = ROLE_TIMEOUT_S) -> None:
    """Until `node`'s HELLO says `role` (`candidate`: it holds the lease and
    has not led yet)."""
    deadline = time.monotonic() + timeout_s
    while node.hello()["role"] != role:
        assert time.monotonic() < deadline, f"{node.name} is not {role}: {node.log_tail()}"
        time.sleep(POLL_S)


def wait_for_seq(node: Node, stream_seq: int, timeout_s: float = ROLE_TIMEOUT_S) -> dict:
    """Until `node` reflects the stream up to `stream_seq`: its HELLO."""
    deadline = time.monotonic() + timeout_s
    while True:
        hello = node.hello()
        if hello["stream_seq"] >= stream_seq:
            return hello
        assert time.monotonic() < deadline, f"{node.name} stuck at {hello}"
        time.sleep(POLL_S)


def stopped_loudly(node: Node, words: str) -> str:
    """`node` stops by itself with exit code 3 and one critical line that
    says `words`: that line."""
    assert node.process.wait(EXIT_TIMEOUT_S) == EXIT_STREAM_BROKEN, node.log_tail()
    critical = [line for line in open(node.log_path) if " CRITICAL " in line]
    assert len(critical) == 1 and words in critical[0], node.log_tail()
    return critical[0]
