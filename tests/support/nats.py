"""A local NATS JetStream cluster for the replication tests
(engine/replication/nats_servers.py): started in a temp dir on loopback
ports, stopped by pid."""
import asyncio

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
