"""A local Scanpay cluster in one directory, for trying replication and for
tests: N NATS servers (engine/replication/nats_servers.py) and N
`scanpay serve --replicate` nodes on loopback, one of which leads
(`scanpay cluster up|status|down`, engine/cli/cluster.py; `scanpay demo
--cluster`).

The directory holds:

    cluster.json      the plan (ports, settings) and the pids: what status and down read
    cluster.lock      held while a command starts or stops the cluster
    nats/n1 .. nN     each NATS server's config, JetStream store and log
    s1 .. sN          each scanpay node's data directory (its snapshots)
    s1.toml, s1.log   each node's config and log

Ports from a base P: scanpay nodes P .. P+N-1, NATS clients P+10 .., NATS
routes P+20 ..; P = 0 takes free ports. Every process runs in a session of
its own, so it outlives the command that started it and the terminal's
Ctrl-C; it is stopped by its pid, and a pid is trusted only while the
process holding it started when the one recorded did (/proc/<pid>/stat),
so a pid the system reused is never signalled.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time

from engine.ports import bindable, free_ports
from engine.replication.nats_servers import NatsCluster, nats_server_binary

STATE_NAME = "cluster.json"
LOCK_NAME = "cluster.lock"
STATE_VERSION = 1
BASE_PORT_DEFAULT = 7411
NATS_PORT_OFFSET = 10               # NATS client ports: base + 10 + i
ROUTE_PORT_OFFSET = 20              # NATS cluster (route) ports: base + 20 + i
NODES_MAX = 9                       # fits the port offsets above
REPLICAS_MAX = 3                    # the stream's replicas: min(nodes, 3)
LISTEN_TIMEOUT_S = 60.0             # a node connects to NATS, checks the stream, listens
ROLE_TIMEOUT_S = 60.0               # then takes the lease (or follows)
STOP_TIMEOUT_S = 15.0               # SIGTERM, then SIGKILL
POLL_S = 0.05
HELLO_TIMEOUT_MS = 3000
HOST = "127.0.0.1"
LEADER, FOLLOWER = "leader", "follower"


class ClusterError(Exception):
    """A mistake or a failure the operator can act on: one line, no traceback."""


# -- processes, by pid -------------------------------------------------------------

def process_start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot), or None when no
    live process has that pid (gone, or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):         # exited, not yet reaped
        return None
    return int(fields[19])              # field 22 of proc(5): starttime


@dataclasses.dataclass
class Member:
    """One process of the cluster: a NATS server (`n1`) or a scanpay node (`s1`)."""
    name: str
    port: int
    cluster_port: int = 0           # NATS servers: their route port
    pid: int = 0
    started: int = 0                # process_start_ticks(pid) when it was started

    def alive(self) -> bool:
        return self.pid > 0 and process_start_ticks(self.pid) == self.started

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"


def plan_ports(nodes: int, base_port: int) -> tuple[list[int], list[int], list[int]]:
    """(scanpay ports, NATS client ports, NATS route ports)."""
    if base_port == 0:
        ports = free_ports(3 * nodes)
        return ports[:nodes], ports[nodes:2 * nodes], ports[2 * nodes:]
    if not 1024 <= base_port <= 65535 - ROUTE_PORT_OFFSET - nodes:
        raise ClusterError(f"--base-port {base_port} is out of range: give 1024.."
                           f"{65535 - ROUTE_PORT_OFFSET - nodes}, or 0 for free ports")
    return ([base_port + i for i in range(nodes)],
            [base_port + NATS_PORT_OFFSET + i for i in range(nodes)],
            [base_port + ROUTE_PORT_OFFSET + i for i in range(nodes)])


def package_root() -> str:
    """The folder holding the `engine` package this process runs: the nodes
    run the same code (a source tree or an installed copy)."""
    import engine
    return os.path.dirname(os.path.dirname(os.path.abspath(engine.__file__)))


def log_last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f.readlines()[-50:] if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"


@dataclasses.dataclass
class Settings:
    """What every scanpay node of the cluster is started with ([server] settings)."""
    lease_ms: int = 3000
    checkpoint_every_entries: int = 100_000
    test_clock: bool = False
    capacity: dict = dataclasses.field(default_factory=dict)
    server: dict = dataclasses.field(default_factory=dict)     # more [server] settings

    def toml(self, servers: str, replicas: int) -> str:
        server = {**self.server, "replicate": servers, "replicas": replicas,
                  "lease_ms": self.lease_ms,
                  "checkpoint_every_entries": self.checkpoint_every_entries,
                  "test_clock": self.test_clock}
        lines = ["[server]"] + [f"{key} = {json.dumps(value)}" for key, value in server.items()]
        if self.capacity:
            lines += ["[capacity]"] + [f"{table} = {int(rows)}"
                                       for table, rows in self.capacity.items()]
        return "\n".join(lines) + "\n"


class DirectoryLock:
    """cluster.lock, held while one command starts or stops the cluster."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, LOCK_NAME)
        self.fd = -1

    def __enter__(self) -> "DirectoryLock":
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise ClusterError(f"another `scanpay cluster` command is starting or stopping "
                               f"the cluster in {os.path.dirname(self.path)}: wait for it, "
                               f"or give another --dir") from None
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


class LocalCluster:
    """The cluster of one directory: `prepare` (a new plan, or the one a
    stopped cluster left there), `up`, `status`, `down`; `load` for a running one."""

    def __init__(self, directory: str, nats: list[Member], nodes: list[Member],
                 settings: Settings):
        self.directory = os.path.abspath(directory)
        self.nats = nats
        self.nodes = nodes
        self.settings = settings
        self.children = {}          # name -> Popen of the processes this process started

    # -- the plan ------------------------------------------------------------------

    @classmethod
    def plan(cls, directory: str, nodes: int = 3, base_port: int = BASE_PORT_DEFAULT,
             settings: Settings | None = None) -> "LocalCluster":
        if not 1 <= nodes <= NODES_MAX:
            raise ClusterError(f"--nodes {nodes}: a local cluster has 1 to {NODES_MAX} nodes")
        scanpay, clients, routes = plan_ports(nodes, base_port)
        return cls(directory, [Member(f"n{i + 1}", clients[i], routes[i]) for i in range(nodes)],
                   [Member(f"s{i + 1}", scanpay[i]) for i in range(nodes)],
                   settings or Settings())

    @classmethod
    def prepare(cls, directory: str, nodes: int = 3, base_port: int = BASE_PORT_DEFAULT,
                settings: Settings | None = None) -> "LocalCluster":
        """What `up` starts in `directory`: the cluster a `down` left there
        (same ports, its data kept), else a new one; refused when a cluster
        runs there, or the directory holds something else."""
        directory = os.path.abspath(directory)
        if os.path.exists(os.path.join(directory, STATE_NAME)):
            cluster = cls.load(directory)
            cluster.check_stopped()
            if len(cluster.nodes) != nodes:
                raise ClusterError(f"{directory} holds a stopped {len(cluster.nodes)}-node "
                                   f"cluster, not {nodes}: `scanpay cluster up --dir "
                                   f"{directory} --nodes {len(cluster.nodes)}` starts it again, "
                                   f"or give another --dir")
            return cluster
        if os.path.isfile(directory):
            raise ClusterError(f"{directory} is a file: --dir must name a directory")
        if os.path.isdir(directory) and set(os.listdir(directory)) - {LOCK_NAME}:
            raise ClusterError(f"{directory} is not empty and holds no cluster "
                               f"({STATE_NAME}): give a new or empty --dir")
        return cls.plan(directory, nodes, base_port, settings)

    @classmethod
    def load(cls, directory: str) -> "LocalCluster":
        directory = os.path.abspath(directory)
        path = os.path.join(directory, STATE_NAME)
        try:
            with open(path) as f:
                state = json.load(f)
            if state.get("version") != STATE_VERSION:
                raise ValueError(f"version {state.get('version')!r}, expected {STATE_VERSION}")
            return cls(directory, [Member(**m) for m in state["nats"]],
                       [Member(**m) for m in state["nodes"]], Settings(**state["settings"]))
        except FileNotFoundError:
            raise ClusterError(f"no cluster in {directory} (no {STATE_NAME}): start one with "
                               f"`scanpay cluster up --dir {directory}`") from None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ClusterError(f"cannot read {path} ({error}): it was not written by this "
                               f"version of `scanpay cluster`") from None

    def save(self) -> None:
        state = {"version": STATE_VERSION, "settings": dataclasses.asdict(self.settings),
                 "nats": [dataclasses.asdict(m) for m in self.nats],
                 "nodes": [dataclasses.asdict(m) for m in self.nodes]}
        path = os.path.join(self.directory, STATE_NAME)
        with open(path + ".tmp", "w") as f:
            json.dump(state, f, indent=1)
        os.replace(path + ".tmp", path)

    @property
    def replicas(self) -> int:
        return min(len(self.nats), REPLICAS_MAX)

    @property
    def servers(self) -> str:
        """The NATS servers as `--replicate` takes them."""
        return ",".join(f"nats://{m.address}" for m in self.nats)

    @property
    def addresses(self) -> list[str]:
        return [m.address for m in self.nodes]

    def running(self) -> list[Member]:
        return [m for m in self.nats + self.nodes if m.alive()]

    def check_stopped(self) -> None:
        alive = self.running()
        if alive:
            pids = ", ".join(f"{m.name} pid {m.pid}" for m in alive)
            raise ClusterError(f"a cluster runs in {self.directory} ({pids}): see `scanpay "
                               f"cluster status --dir {self.directory}`, stop it with `scanpay "
                               f"cluster down --dir {self.directory}`, or give another --dir")

    def log_path(self, member: Member) -> str:
        if member in self.nats:
            return os.path.join(self.directory, "nats", member.name, "nats.log")
        return os.path.join(self.directory, f"{member.name}.log")

    # -- starting ------------------------------------------------------------------

    def up(self) -> "LocalCluster":
        """Start the NATS servers, then one node (it takes the lease and
        leads), then the others (they follow); stop all of them if any fails."""
        os.makedirs(self.directory, exist_ok=True)
        with DirectoryLock(self.directory):
            self.check_stopped()
            self.check_ports()
            self.save()
            try:
                self.start_nats()
                first, rest = self.nodes[0], self.nodes[1:]
                self.start_node(first)
                self.wait_role(first, LEADER)
                for member in rest:
                    self.start_node(member, wait=False)
                for member in rest:
                    self.wait_listening(member)
                    self.wait_role(member, FOLLOWER)
            except BaseException:
                self.stop_all()
                raise
        return self

    def check_ports(self) -> None:
        for member in self.nodes + self.nats:       # the base port first
            for port in (member.port, member.cluster_port):
                if port and not bindable(port, HOST):
                    raise ClusterError(
                        f"port {port} on {HOST} is taken (another process listens there): "
                        f"stop it, or give other ports with --base-port P (scanpay P.., NATS "
                        f"P+{NATS_PORT_OFFSET}.., routes P+{ROUTE_PORT_OFFSET}..) or "
                        f"--base-port 0 (free ports), in a new --dir")

    def start_nats(self) -> None:
        try:
            nats_server_binary()
        except FileNotFoundError as error:
            raise ClusterError(str(error)) from None
        cluster = NatsCluster(os.path.join(self.directory, "nats"), len(self.nats),
                              detached=True)
        for node, member in zip(cluster.nodes, self.nats):
            node.port, node.cluster_port = member.port, member.cluster_port
        try:
            cluster.start()
        except RuntimeError as error:
            raise ClusterError(f"a NATS server did not start: {error}") from None
        for node, member in zip(cluster.nodes, self.nats):
            self._record(member, node.process)
        self.save()

    def start_nats_member(self, member: Member) -> None:
        """Start NATS server `member` again (after a kill): same config and store."""
        assert member in self.nats and not member.alive(), member
        cluster = NatsCluster(os.path.join(self.directory, "nats"), len(self.nats),
                              detached=True)
        node = next(n for n in cluster.nodes if n.name == member.name)
        node.port, node.cluster_port = member.port, member.cluster_port
        try:
            cluster.start_node(node)
        except RuntimeError as error:
            raise ClusterError(f"NATS server {member.name} did not start: {error}") from None
        self._record(member, node.process)
        self.save()

    def stream_leader(self) -> Member | None:
        """The NATS server that leads the stream now (JetStream's stream info)."""
        import asyncio
        urls = [f"nats://{m.address}" for m in self.nats if m.alive()]
        stream = asyncio.run(nats_view(urls)).get("stream") if urls else None
        name = (stream or {}).get("leader")
        return next((m for m in self.nats if m.name == name), None)

    def _record(self, member: Member, process: subprocess.Popen) -> None:
        member.pid = process.pid
        member.started = process_start_ticks(process.pid) or 0
        self.children[member.name] = process

    def start_node(self, member: Member, wait: bool = True) -> None:
        """Start scanpay node `member` (again, after a stop or a kill: same
        data directory and port)."""
        assert member in self.nodes and not member.alive(), member
        config = os.path.join(self.directory, f"{member.name}.toml")
        with open(config, "w") as f:
            f.write(self.settings.toml(self.servers, self.replicas))
        path = os.environ.get("PYTHONPATH")
        env = {**os.environ, "PYTHONPATH": package_root() + (os.pathsep + path if path else "")}
        command = [sys.executable, "-m", "engine.cli", "serve", "--config", config,
                   "--data", os.path.join(self.directory, member.name),
                   "--listen", member.address]
        with open(self.log_path(member), "ab") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=env, cwd=self.directory,
                                       start_new_session=True)
        self._record(member, process)
        self.save()
        if wait:
            self.wait_listening(member)

    def _exited(self, member: Member, doing: str) -> ClusterError:
        self._reap(member)
        return ClusterError(f"scanpay node {member.name} exited {doing}: "
                            f"{log_last_line(self.log_path(member))} (see {self.log_path(member)})")

    def wait_listening(self, member: Member, timeout_s: float = LISTEN_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if not member.alive():
                raise self._exited(member, "at start")
            try:
                socket.create_connection((HOST, member.port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise ClusterError(f"scanpay node {member.name} does not listen on "
                                       f"{member.address} after {timeout_s:.0f} s: see "
                                       f"{self.log_path(member)}") from None
                time.sleep(POLL_S)

    def wait_role(self, member: Member, role: str, timeout_s: float = ROLE_TIMEOUT_S) -> dict:
        """Until `member`'s HELLO says `role`: that HELLO."""
        deadline = time.monotonic() + timeout_s
        while True:
            if not member.alive():
                raise self._exited(member, f"before it became {role}")
            hello = hello_of(member)
            if hello is not None and hello.get("role") == role:
                return hello
            if time.monotonic() > deadline:
                said = hello.get("role") if hello else "no answer"
                raise ClusterError(f"scanpay node {member.name} is not {role} after "
                                   f"{timeout_s:.0f} s ({said}): see {self.log_path(member)}")
            time.sleep(POLL_S * 4)

    # -- roles, kills and stops --------------------------------------------------------

    def leader(self, exclude: tuple = ()) -> Member | None:
        """The one running node whose HELLO says leader (None: none, or several)."""
        leaders = [m for m in self.nodes if m not in exclude and m.alive()
                   and (hello_of(m) or {}).get("role") == LEADER]
        return leaders[0] if len(leaders) == 1 else None

    def wait_leader(self, exclude: tuple = (), timeout_s: float = ROLE_TIMEOUT_S) -> Member:
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.leader(exclude)
            if found is not None:
                return found
            if time.monotonic() > deadline:
                raise ClusterError(f"no single leader after {timeout_s:.0f} s: see "
                                   f"`scanpay cluster status --dir {self.directory}`")
            time.sleep(POLL_S)

    def _reap(self, member: Member) -> None:
        process = self.children.get(member.name)
        if process is not None:
            process.poll()          # a child of this process: no zombie left behind

    def _wait_gone(self, member: Member, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while member.alive():
            self._reap(member)
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_S)
        self._reap(member)
        return True

    def kill(self, member: Member, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to a running member (SIGKILL: and wait until it is gone)."""
        if not member.alive():
            raise ClusterError(f"{member.name} is not running")
        os.kill(member.pid, sig)
        if sig == signal.SIGKILL and not self._wait_gone(member, STOP_TIMEOUT_S):
            raise ClusterError(f"{member.name} (pid {member.pid}) survived SIGKILL")

    def stop_member(self, member: Member) -> str:
        """SIGTERM (after SIGCONT: a paused process must be able to exit),
        then SIGKILL after STOP_TIMEOUT_S. What was done, in words."""
        if not member.alive():
            self._reap(member)
            return "not running"
        pid = member.pid
        os.kill(pid, signal.SIGCONT)
        os.kill(pid, signal.SIGTERM)
        if self._wait_gone(member, STOP_TIMEOUT_S):
            return f"stopped (pid {pid})"
        os.kill(pid, signal.SIGKILL)
        self._wait_gone(member, STOP_TIMEOUT_S)
        return f"killed (pid {pid}: SIGTERM was not enough within {STOP_TIMEOUT_S:.0f} s)"

    def stop_all(self) -> list[tuple[str, str]]:
        """The followers, then the leader (it gives its lease up), then NATS."""
        leaders = [m for m in self.nodes if m.alive() and (hello_of(m) or {}).get("role") == LEADER]
        order = [m for m in self.nodes if m not in leaders] + leaders + self.nats
        done = [(m.name, self.stop_member(m)) for m in order]
        for member in order:
            member.pid = member.started = 0
        self.save()
        return done

    def down(self) -> list[tuple[str, str]]:
        with DirectoryLock(self.directory):
            return self.stop_all()


def hello_of(member: Member) -> dict | None:
    """The node's HELLO reply, or None when it does not answer."""
    from engine.client import Client, hello_request
    try:
        with Client.connect(HOST, member.port, timeout_ms=HELLO_TIMEOUT_MS,
                            client_name="scanpay-cluster") as client:
            return client.call("HELLO", hello_request(client_name="scanpay-cluster"))
    except Exception:       # noqa: BLE001 - down, starting, or not a scanpay node
        return None


# -- status ------------------------------------------------------------------------

NATS_TIMEOUT_S = 3.0


async def _quiet(_error) -> None:
    """nats-py's error callback: status says it in one line instead."""


async def nats_view(urls: list[str]) -> dict:
    """The stream (last sequence, replicas, which server leads it) and the
    lease (holder, revision, age) as NATS holds them; {"error": ...} when
    no server answers."""
    import asyncio

    import nats
    from engine.replication.stream import Names
    names = Names()
    try:
        nc = await asyncio.wait_for(nats.connect(
            urls, connect_timeout=1, allow_reconnect=False, max_reconnect_attempts=0,
            error_cb=_quiet, name="scanpay-cluster-status"), NATS_TIMEOUT_S * len(urls))
    except Exception as error:      # noqa: BLE001 - any failure to connect is one line
        return {"error": f"no NATS server answers ({type(error).__name__}: {error})"}
    try:
        js = nc.jetstream(timeout=NATS_TIMEOUT_S)
        return {"stream": await _stream_view(js, names.stream),
                "lease": await _lease_view(js, names.lease_bucket)}
    finally:
        await nc.close()


async def _stream_view(js, name: str) -> dict | None:
    import nats.js.errors
    try:
        info = await js.stream_info(name)
    except nats.js.errors.NotFoundError:
        return None
    except Exception as error:      # noqa: BLE001 - no stream leader now, a timeout
        return {"name": name, "error": f"{type(error).__name__}: {error}"}
    cluster = info.cluster
    peers = [{"name": p.name, "current": bool(p.current), "lag": p.lag or 0}
             for p in (cluster.replicas or [])] if cluster else []
    return {"name": name, "first_seq": info.state.first_seq, "last_seq": info.state.last_seq,
            "messages": info.state.messages, "bytes": info.state.bytes,
            "replicas": info.config.num_replicas or 1,
            "leader": cluster.leader if cluster else None, "peers": peers}


async def _lease_view(js, bucket: str) -> dict | None:
    """The lease key's last value: {holder, revision, age_ms, ttl_ms}; holder
    None when it was released or has expired."""
    import datetime

    import nats.js.errors
    from engine.replication.lease import LEASE_KEY
    stream = f"KV_{bucket}"
    try:
        ttl_s = (await js.stream_info(stream)).config.max_age or 0
        raw = await js.get_msg(stream, subject=f"$KV.{bucket}.{LEASE_KEY}")
    except nats.js.errors.NotFoundError:
        return None
    except Exception as error:      # noqa: BLE001
        return {"error": f"{type(error).__name__}: {error}"}
    age_ms = None
    if raw.time is not None:
        stamp = raw.time if isinstance(raw.time, datetime.datetime) else None
        if stamp is not None:
            age_ms = int((datetime.datetime.now(datetime.timezone.utc) - stamp).total_seconds() * 1000)
    operation = (raw.headers or {}).get("KV-Operation")
    try:
        holder = json.loads(raw.data or b"") if operation is None else None
    except ValueError:
        holder = {"address": "?"}
    if age_ms is not None and age_ms > ttl_s * 1000:
        holder = None               # expired: NATS removes it (TTL), a follower takes it
    return {"holder": holder, "revision": raw.seq, "age_ms": age_ms,
            "ttl_ms": int(ttl_s * 1000)}


def node_view(member: Member, last_seq: int | None) -> dict:
    view = {"name": member.name, "address": member.address, "pid": member.pid,
            "running": member.alive(), "role": None, "stream_seq": None, "lag": None,
            "leader": None, "checkpoint": None}
    if not view["running"]:
        view["pid"] = None
        return view
    hello = hello_of(member)
    if hello is None:
        view["role"] = "no answer"
        return view
    view.update(role=hello.get("role"), stream_seq=hello.get("stream_seq"),
                leader=hello.get("leader"), checkpoint=hello.get("checkpoint"))
    if last_seq is not None and view["stream_seq"] is not None:
        view["lag"] = max(0, last_seq - view["stream_seq"])
    return view


def checkpoint_view(nodes: list[dict]) -> dict | None:
    """The last checkpoint any node appended or checked: its seq, the digest
    of each node that has it, whether they agree, and who is not there yet."""
    have = [n for n in nodes if n["checkpoint"]]
    if not have:
        return None
    seq = max(n["checkpoint"]["seq"] for n in have)
    digests = {n["name"]: n["checkpoint"]["digest"] for n in have
               if n["checkpoint"]["seq"] == seq}
    return {"seq": seq, "digests": digests, "agree": len(set(digests.values())) == 1,
            "behind": [n["name"] for n in nodes if n["running"] and n["name"] not in digests]}


def status(cluster: LocalCluster) -> dict:
    """Everything `scanpay cluster status` shows, as data (its --json)."""
    import asyncio
    nats_servers = [{"name": m.name, "url": f"nats://{m.address}", "running": m.alive(),
                     "pid": m.pid if m.alive() else None} for m in cluster.nats]
    urls = [n["url"] for n in nats_servers if n["running"]]
    view = asyncio.run(nats_view(urls)) if urls else {"error": "no NATS server runs"}
    stream = view.get("stream")
    last_seq = stream.get("last_seq") if stream else None
    for server in nats_servers:
        server["stream_leader"] = bool(stream) and stream.get("leader") == server["name"]
    nodes = [node_view(m, last_seq) for m in cluster.nodes]
    checkpoint = checkpoint_view(nodes)
    leaders = [n for n in nodes if n["role"] == LEADER]
    if not any(n["running"] for n in nodes + nats_servers):
        problems = ["down: no process of it runs"]
    else:
        problems = [f"{n['name']} is not running" for n in nodes + nats_servers
                    if not n["running"]]
    problems += [f"{n['name']} does not answer" for n in nodes if n["role"] == "no answer"]
    if len(leaders) != 1 and urls:
        problems.append(f"{len(leaders)} leaders")
    if (view.get("error") and urls) or (stream or {}).get("error"):
        problems.append(view.get("error") or stream["error"])
    if checkpoint is not None and not checkpoint["agree"]:
        problems.append(f"the digests at checkpoint {checkpoint['seq']} differ")
    return {"directory": cluster.directory, "nats": nats_servers, "stream": stream,
            "nats_error": view.get("error"),
            "lease": view.get("lease"), "nodes": nodes, "checkpoint": checkpoint,
            "addresses": ",".join(cluster.addresses), "servers": cluster.servers,
            "problems": problems, "healthy": not problems}
