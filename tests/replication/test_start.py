"""Starting a replicated server: it refuses, in one line, a stream with
fewer replicas than configured (unless --allow-unreplicated) and NATS
servers that do not answer."""
import os
import subprocess
import sys

import pytest

from engine.ports import free_port
from support import ROOT
from support.nats import start_cluster
from support.replicas import Node, wait_for_leader

SERVE_TIMEOUT_S = 60


def serve(data: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.cli", "serve", "--data", data,
                           "--listen", f"127.0.0.1:{free_port()}", *args], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True,
                          text=True, timeout=SERVE_TIMEOUT_S)


def test_one_nats_server_is_refused_for_three_replicas_unless_allowed(tmp_path):
    cluster = start_cluster(str(tmp_path / "nats"), nodes=1)
    node = Node(str(tmp_path), cluster.servers, 1500, "s0", allow_unreplicated=True)
    try:
        refused = serve(str(tmp_path / "refused"), "--replicate", cluster.servers)
        assert refused.returncode == 2
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1, refused.stderr
        assert "3 replicas" in lines[0] and "--allow-unreplicated" in lines[0]
        node.start()
        assert wait_for_leader([node]) is node
        assert "UNREPLICATED" in open(node.log_path).read()
    finally:
        node.stop()
        cluster.stop()


def test_nats_servers_that_do_not_answer_are_one_line(tmp_path):
    result = serve(str(tmp_path / "d"), "--replicate", f"nats://127.0.0.1:{free_port()}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "the NATS servers do not answer" in lines[0], result.stderr


def test_a_cluster_not_ready_yet_is_waited_for_then_refused_in_one_line(monkeypatch):
    """Finding or creating the stream, the lease bucket and the snapshot
    bucket at start all go through until_ready: an API call that times out
    while a starting cluster elects its meta leader is tried again (a lease
    bucket create that timed out once failed a node's start), placement not
    yet possible too; other refusals and a cluster that never gets ready end
    in a StreamSettingsError that says what to check."""
    import asyncio

    import nats.errors

    from engine.replication import stream

    monkeypatch.setattr(stream, "READY_POLL_S", 0.001)
    failures = [nats.errors.TimeoutError(), nats.errors.NoRespondersError(),
                stream.StreamSettingsError(f"cannot create ({stream.PLACEMENT_PENDING})")]
    attempts = []

    async def flaky():
        attempts.append(1)
        if failures:
            raise failures.pop(0)
        return "opened"

    assert asyncio.run(stream.until_ready(flaky)) == "opened" and len(attempts) == 4

    async def refused():
        raise stream.StreamSettingsError("the lease bucket has a TTL of 3 s")
    attempts.clear()
    with pytest.raises(stream.StreamSettingsError, match="TTL"):
        asyncio.run(stream.until_ready(lambda: (attempts.append(1), refused())[1]))
    assert len(attempts) == 1                       # a refusal is not tried again

    monkeypatch.setattr(stream, "READY_TIMEOUT_S", 0.01)

    async def never():
        raise nats.errors.TimeoutError()
    with pytest.raises(stream.StreamSettingsError, match="not ready within .*JetStream enabled"):
        asyncio.run(stream.until_ready(never))
