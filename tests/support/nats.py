"""A local NATS JetStream cluster for the replication tests
(engine/replication/nats_servers.py): started in a temp dir on loopback
ports, stopped by pid."""
import asyncio
import time

import nats

from engine.replication.nats_servers import NatsCluster

JS_READY_TIMEOUT_S = 30.0


async def _wait_jetstream(urls: list[str]) -> None:
    """Until the cluster's JetStream answers (a meta leader is elected)."""
    nc = await nats.connect(urls, connect_timeout=2)
    try:
        js = nc.jetstream(timeout=2)
        deadline = asyncio.get_running_loop().time() + JS_READY_TIMEOUT_S
        while True:
            try:
                await js.account_info()
                return
            except Exception:       # noqa: BLE001 - not ready yet; bounded by the deadline
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.2)
    finally:
        await nc.close()


def start_cluster(directory: str, nodes: int = 3) -> NatsCluster:
    """A started cluster whose JetStream answers."""
    cluster = NatsCluster(directory, nodes).start()
    try:
        asyncio.run(_wait_jetstream(cluster.urls))
    except BaseException:
        cluster.stop()
        raise
    return cluster


async def _stream_info(urls: list[str], name: str):
    nc = await nats.connect(urls, connect_timeout=2)
    try:
        return await nc.jetstream(timeout=5).stream_info(name)
    finally:
        await nc.close()


def stream_leader_name(urls: list[str], stream: str = "scanpay_0") -> str:
    """The name of the NATS server that leads `stream` (JetStream's stream info)."""
    return asyncio.run(_stream_info(urls, stream)).cluster.leader


def create_stream(urls: list[str], replicas: int) -> str:
    """The shard's stream created as a node creates it, with `replicas`
    (a node started with allow_unreplicated takes it as it is): the name
    of the NATS server that leads it."""
    from engine.replication.stream import Names, Stream

    async def create() -> str:
        stream = await Stream.connect(urls, Names())
        try:
            await stream.ensure(replicas, allow_unreplicated=False)
            return (await stream.js.stream_info(stream.names.stream)).cluster.leader
        finally:
            await stream.close()
    return asyncio.run(create())


def wait_replicas_current(urls: list[str], streams: tuple, timeout_s: float) -> None:
    """Until every stream of `streams` has a leader and all its replicas are
    current (a restarted NATS server has caught up): losing another server
    then keeps a quorum."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            infos = [asyncio.run(_stream_info(urls, name)) for name in streams]
            if all(info.cluster.leader and info.cluster.replicas
                   and all(r.current and not r.offline for r in info.cluster.replicas)
                   for info in infos):
                return
        except Exception:           # noqa: BLE001 - electing; bounded by the deadline
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"the replicas of {streams} are not current after "
                                 f"{timeout_s:g} s")
        time.sleep(0.2)


class LogHarness:
    """StreamLogs over one cluster, each on its own NATS connection and loop
    thread (as separate nodes are), closed together."""

    def __init__(self, cluster: NatsCluster, replicas: int = 3):
        from engine.replication.loop_thread import LoopThread
        from engine.replication.stream import Names
        self.cluster = cluster
        self.replicas = replicas
        self.names = Names()
        self.loops = []
        self.streams = []
        self.LoopThread = LoopThread

    def stream(self):
        from engine.replication.stream import Stream
        loop = self.LoopThread()
        self.loops.append(loop)
        stream = loop.call(Stream.connect(self.cluster.urls, self.names), 10)
        loop.call(stream.ensure(self.replicas, allow_unreplicated=False), 40)
        self.streams.append((loop, stream))
        return loop, stream

    def log(self, path, lead: bool = False, **options):
        from engine.replication.log import StreamLog
        loop, stream = self.stream()
        stream_log = StreamLog(str(path), loop, stream, **options)
        if lead:
            stream_log.lead(stream_log.new_token())
        return stream_log

    def delete_stream(self) -> None:
        loop, stream = self.streams[0] if self.streams else self.stream()
        for name in (self.names.stream, f"KV_{self.names.lease_bucket}",
                     f"OBJ_{self.names.snapshot_bucket}"):
            try:
                loop.call(stream.js.delete_stream(name), 10)
            except Exception:       # noqa: BLE001 - not there
                pass

    def close(self) -> None:
        for loop, stream in self.streams:
            try:
                loop.call(stream.close(), 5)
            except Exception:       # noqa: BLE001 - already closed
                pass
        for loop in self.loops:
            loop.stop()
