"""Replicated servers (`scanpay serve --replicate`): a leader that replies
after the stream's acknowledgement, followers that apply the stream and serve
reads stating the stream seq, and writes to a follower refused `not_leader`."""
import time

import pytest

from engine.core.command import Command
from engine.protocol.errors import NotLeader
from engine.protocol.ops import OP_EXPIRE
from engine.replication.stream import KIND_CHECKPOINT
from engine.storage.journal import _encode_entry
from support.replicas import Node, stopped_loudly, wait_for_leader, wait_for_seq
from support.servers import pay_batch

LEASE_MS = 4000                     # no failover here: none spurious on a busy machine


CHECKPOINT_EVERY = 5
EXIT_TIMEOUT_S = 15


@pytest.fixture
def nodes(logs, tmp_path):
    made = [Node(str(tmp_path), logs.cluster.servers, LEASE_MS, f"s{i}",
                 checkpoint_every_entries=CHECKPOINT_EVERY) for i in range(2)]
    yield made
    for node in made:
        node.stop()


def build_world(c):
    c.call("MERCHANTS", {"merchants": [{"id": 7}]})
    c.call("WALLETS", {"users": [42]})
    c.call("TOPUP", {"topups": [{"id": 1, "user": 42, "amount": 10**9}]})


def leader_and_follower_after_writes(nodes, writes: int):
    """Both nodes started, the world built and `writes` one-payment PAY
    batches answered by the leader; the follower has applied them."""
    for node in nodes:
        node.start()
    leader = wait_for_leader(nodes)
    follower = next(n for n in nodes if n is not leader)
    with leader.client() as c:
        build_world(c)
        for i in range(writes):
            out = c.pay(pay_batch(1, start_id=1 + i))
            assert out["status"][0] == 0
    wait_for_seq(follower, leader.hello()["stream_seq"])
    return leader, follower


def test_leader_replicates_and_a_follower_serves_reads_with_the_stream_seq(nodes):
    leader, follower = leader_and_follower_after_writes(nodes, 20)
    at = leader.hello()["stream_seq"]       # (a checkpoint record may follow the writes)
    hello = wait_for_seq(follower, at)
    assert hello["role"] == "follower" and hello["leader"] == leader.address
    with follower.client() as c:
        reply = c.call("BALANCES", {"users": [42]})
        assert reply["stream_seq"] >= at
        assert reply["users"][0]["balance"] == 10**9 - 100 * 20
        payments = c.call("GET_PAYMENTS", {"ids": [1, 20]})
        assert [p["status"] for p in payments["results"]] == [0, 0]
        with pytest.raises(NotLeader, match=leader.address):
            c.pay(pay_batch(1, start_id=99))
        with pytest.raises(NotLeader, match=leader.address):
            c.call("WALLETS", {"users": [43]})
        audit = c.call("AUDIT", {})
        assert audit["ok"] and audit["stream_seq"] >= at
        assert audit["seq"] == 3 + 20                   # the refused writes changed nothing


def append_foreign(logs, payload: bytes, kind=None, last_command=None) -> None:
    """A message no Scanpay leader wrote, at the stream's end."""
    loop, stream = logs.stream()
    last = loop.call(stream.last_seq(), 10)
    if last_command is None:
        last_command = loop.call(stream.get(last), 10).last_command
    loop.call(stream.append(payload, last, f"foreign.{last}", last_command, kind, 5), 10)


def append_foreign_command(logs, follower: Node) -> None:
    """A valid command (an EXPIRE that changes nothing) that no Scanpay
    leader wrote, after the last command `follower` applied."""
    with follower.client() as c:
        seq, now = c.call("AUDIT", {})["seq"], c.call("AUDIT", {})["now"]
    command = Command(OP_EXPIRE, now + 1, (), b"").encode()
    frame, _ = _encode_entry(seq + 1, command)
    append_foreign(logs, b"".join(frame), last_command=seq + 1)


def test_a_wrong_checkpoint_digest_stops_the_follower(nodes, logs):
    leader, follower = leader_and_follower_after_writes(nodes, 9)
    deadline = time.monotonic() + EXIT_TIMEOUT_S
    while (follower.hello()["checkpoint"] or {}).get("seq") != 10:
        assert time.monotonic() < deadline, (follower.hello(), follower.log_tail())
        time.sleep(0.05)
    digest = follower.hello()["checkpoint"]["digest"]
    assert leader.hello()["checkpoint"] == {"seq": 10, "digest": digest}
    wrong = "0" * 64
    append_foreign(logs, ('{"digest": "%s", "seq": 10}' % wrong).encode(), KIND_CHECKPOINT)
    line = stopped_loudly(follower, "checkpoint at command 10")
    assert wrong in line and digest in line
    assert leader.running()


def test_a_corrupted_command_message_stops_the_follower(nodes, logs):
    leader, follower = leader_and_follower_after_writes(nodes, 2)
    with follower.client() as c:
        seq = c.call("AUDIT", {})["seq"]         # the last command the follower applied
    frame, _ = _encode_entry(seq + 1, b"\x01\x00" + bytes(30))
    bad = bytearray(b"".join(frame))
    bad[20] ^= 0x01                             # one bit of the command
    append_foreign(logs, bytes(bad), last_command=seq + 1)
    stopped_loudly(follower, "entry checksum mismatch")
    assert leader.running()


def test_a_refused_leader_answers_not_leader_and_rejoins_by_itself(nodes, logs):
    """Another writer appends behind the leader's back: the leader's next
    append is refused, that write is answered not_leader (and applied
    nowhere), and the node catches up as a follower with no request asking."""
    leader, follower = leader_and_follower_after_writes(nodes, 2)
    append_foreign_command(logs, follower)
    with leader.client() as c:
        with pytest.raises(NotLeader):
            c.pay(pay_batch(1, start_id=777))
    end = wait_for_seq(follower, leader.hello()["stream_seq"] + 1)["stream_seq"]
    hello = wait_for_seq(leader, end)
    assert hello["role"] in ("follower", "candidate", "leader")
    log_text = open(leader.log_path).read()
    assert "deposed: the stream refused an append" in log_text, leader.log_tail()
    for node in nodes:
        with node.client() as c:
            found = c.call("GET_PAYMENTS", {"ids": [777]})["results"][0]
            assert found["error"] == "payment_not_found", node.name


def test_a_refused_leader_whose_snapshot_the_stream_no_longer_covers_stops_loudly(nodes, logs):
    """A refused leader rebuilds from its snapshot (none here: the stream's
    start) and the stream after it; trimmed past that (an operator's purge
    here), no retry can succeed: it stops in one critical line saying to
    restart it, rather than refuse everything for ever."""
    leader, follower = leader_and_follower_after_writes(nodes, 2)
    append_foreign_command(logs, follower)
    loop, stream = logs.stream()
    loop.call(stream.purge_before(loop.call(stream.last_seq(), 10)), 10)
    with leader.client() as c:
        with pytest.raises(NotLeader):
            c.pay(pay_batch(1, start_id=777))
    line = stopped_loudly(leader, "state ends at stream message 0, but the stream was trimmed")
    assert "restart the node" in line
