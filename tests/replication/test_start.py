"""Starting a replicated server: it refuses, in one line, a stream with
fewer replicas than configured (unless --allow-unreplicated) and NATS
servers that do not answer."""
import os
import subprocess
import sys

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
