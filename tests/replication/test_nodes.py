"""Replicated servers (`scanpay serve --replicate`): a leader that replies
after the stream's acknowledgement, followers that apply the stream and serve
reads stating the stream seq, and writes to a follower refused `not_leader`."""
import pytest

from engine.protocol.errors import NotLeader
from support.replicas import Node, wait_for_leader, wait_for_seq
from support.servers import pay_batch

LEASE_MS = 1500


@pytest.fixture
def nodes(logs, tmp_path):
    made = [Node(str(tmp_path), logs.cluster.servers, LEASE_MS, f"s{i}") for i in range(2)]
    yield made
    for node in made:
        node.stop()


def build_world(c):
    c.call("MERCHANTS", {"merchants": [{"id": 7}]})
    c.call("WALLETS", {"users": [42]})
    c.call("TOPUP", {"topups": [{"id": 1, "user": 42, "amount": 10**9}]})


def test_leader_replicates_and_a_follower_serves_reads_with_the_stream_seq(nodes):
    for node in nodes:
        node.start()
    leader = wait_for_leader(nodes)
    follower = next(n for n in nodes if n is not leader)
    with leader.client() as c:
        build_world(c)
        out = c.pay(pay_batch(20))
        assert (out["status"] == 0).all()
    at = leader.hello()["stream_seq"]
    hello = wait_for_seq(follower, at)
    assert hello["role"] == "follower" and hello["leader"] == leader.address
    with follower.client() as c:
        reply = c.call("BALANCES", {"users": [42]})
        assert reply["stream_seq"] >= at
        assert reply["users"][0]["balance"] == 10**9 - sum(100 + i for i in range(20))
        payments = c.call("GET_PAYMENTS", {"ids": [1, 20]})
        assert [p["status"] for p in payments["results"]] == [0, 0]
        with pytest.raises(NotLeader, match=leader.address):
            c.pay(pay_batch(1, start_id=99))
        with pytest.raises(NotLeader, match=leader.address):
            c.call("WALLETS", {"users": [43]})
        audit = c.call("AUDIT", {})
        assert audit["ok"] and audit["stream_seq"] >= at
