"""The local NATS JetStream cluster (engine/replication/nats_servers.py):
configs that fsync every write, nodes that start, replicate and stop by pid."""
import asyncio
import os

import nats
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import NoStreamResponseError

from engine.replication.nats_servers import NatsCluster, node_config, server_env
from support.nats import start_cluster


def test_every_node_config_syncs_always_and_routes_to_the_others(tmp_path):
    cluster = NatsCluster(str(tmp_path), nodes=3)
    text = node_config(cluster.nodes[0], cluster.nodes)
    assert "sync_interval: always" in text
    for peer in cluster.nodes[1:]:
        assert f"nats-route://127.0.0.1:{peer.cluster_port}" in text
    assert f"nats-route://127.0.0.1:{cluster.nodes[0].cluster_port}" not in text
    assert len({n.port for n in cluster.nodes} | {n.cluster_port for n in cluster.nodes}) == 6


STREAM_READY_TIMEOUT_S = 30.0


async def publish_r3(urls):
    nc = await nats.connect(urls)
    try:
        js = nc.jetstream(timeout=10)
        info = await js.add_stream(StreamConfig(name="probe", subjects=["probe"],
                                                storage=StorageType.FILE, num_replicas=3))
        # A new R3 stream answers once its replicas have elected a leader:
        # until then a publish finds no responder. Re-sent with one
        # Nats-Msg-Id, so that it is stored once however often it is sent.
        deadline = asyncio.get_running_loop().time() + STREAM_READY_TIMEOUT_S
        while True:
            try:
                ack = await js.publish("probe", b"x", headers={"Nats-Msg-Id": "probe-1"})
                break
            except NoStreamResponseError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.2)
        info = await js.stream_info("probe")
        return ack.seq, info.config.num_replicas, len(info.cluster.replicas or [])
    finally:
        await nc.close()


def test_a_three_node_cluster_stores_r3_and_stops_by_pid(tmp_path):
    cluster = start_cluster(str(tmp_path), nodes=3)
    try:
        assert all(node.running() for node in cluster.nodes)
        seq, replicas, followers = asyncio.run(publish_r3(cluster.urls))
        assert (seq, replicas, followers) == (1, 3, 2)
        for node in cluster.nodes:
            assert os.path.isdir(os.path.join(node.directory, "jetstream"))
            with open(f"/proc/{node.pid}/environ", "rb") as f:
                environ = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if item)
            assert environ[b"GOMAXPROCS"] == server_env(3)["GOMAXPROCS"].encode()
    finally:
        cluster.stop()
    assert not any(node.running() for node in cluster.nodes)
    for node in cluster.nodes:
        assert node.process.returncode is not None


def test_each_server_gets_its_share_of_the_cores_unless_told(monkeypatch):
    """Three servers on 2 cores spun for work with Go's default (every core
    each): a local cluster's servers share the cores this process may use."""
    monkeypatch.delenv("GOMAXPROCS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert server_env(3)["GOMAXPROCS"] == str(max(1, cores // 3))
    assert server_env(1)["GOMAXPROCS"] == str(cores)
    monkeypatch.setenv("GOMAXPROCS", "7")
    assert server_env(3)["GOMAXPROCS"] == "7"
