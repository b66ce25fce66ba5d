"""NATS server loss under load: the stream's own leader dies (payments pause
while JetStream elects another, then go on), then a quorum is lost (writes
are refused, nothing is acknowledged), then the servers come back (writes
resume). Every payment answered ok is in the final state, with its figures.
And a node that takes the lease while the stream has no leader waits for it."""
import signal
import time

import numpy as np
import pytest

from engine.protocol.errors import NotLeader, Unavailable
from engine.protocol.records import PAY_RECORD
from engine.protocol.status import Status
from engine.replication.node import EXIT_STREAM_BROKEN
from support.failover import (CHECKPOINT_EVERY, IN_FLIGHT_PAYMENTS_MAX, Load, build_world,
                              check_acked_on, check_converged, pass_checkpoints_until_agreed)
from support.nats import create_stream, start_cluster, stream_leader_name
from support.replicas import Node, wait_for_leader, wait_for_role
from support.servers import pay_batch

LEASE_MS = 2000
# Payments resume after the stream leader's server dies: JetStream elects
# another (4 to 9 s, its Raft timeout), and if that server also led the
# lease bucket the lease lapses meanwhile and a node takes over. Measured
# 4.3-9.5 s over 40 runs at load 6-11 (docs/replication.md, "Takeovers
# while NATS elects its leaders").
RESUME_BOUND_S = 30.0
# After two of three NATS servers come back: the cluster re-forms, the
# stream and the lease bucket elect leaders, a node leads and writes.
# Measured 1.5-7.5 s over 30 runs at load 6-11 (8.1 s before a node freed
# its own late-landed lease entry; 30 s was exceeded in one run in six when
# a takeover gave the lease up after one unanswered request).
REJOIN_BOUND_S = 30.0
LEADER_TRY_S = 1.0                  # then the load goes to whichever node leads now


@pytest.fixture
def own_cluster(tmp_path):
    cluster = start_cluster(str(tmp_path / "nats"), nodes=3)
    yield cluster
    cluster.stop()


def resumes_on_the_leader(load: Load, group: list, timeout_s: float) -> float:
    """Seconds until the load has more payments answered ok than were in
    flight now (so a frame sent after now was answered), pointed at
    whichever node leads: the lease may move while NATS elects its leaders,
    and a node that led may say so until its lease runs out."""
    started = time.monotonic()
    wanted = len(load.acked) + IN_FLIGHT_PAYMENTS_MAX + 1
    while True:
        left_s = started + timeout_s - time.monotonic()
        load.leader = wait_for_leader(group, timeout_s=max(left_s, LEADER_TRY_S))
        tried = time.monotonic()
        while len(load.acked) < wanted and time.monotonic() - tried < LEADER_TRY_S:
            time.sleep(0.02)
        if len(load.acked) >= wanted:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout_s, (
            f"payments did not resume within {timeout_s:g} s "
            f"({len(load.acked) - wanted + IN_FLIGHT_PAYMENTS_MAX + 1} more answered ok)")


@pytest.fixture
def group(own_cluster, tmp_path):
    made = [Node(str(tmp_path), own_cluster.servers, LEASE_MS, f"s{i}",
                 checkpoint_every_entries=CHECKPOINT_EVERY) for i in range(2)]
    yield made
    for node in made:
        node.stop()


def test_losing_nats_servers_under_load(own_cluster, group):
    for node in group:
        node.start()
    load = None
    try:
        leader = wait_for_leader(group)
        build_world(leader)
        load = Load(leader)
        time.sleep(0.5)
        name = stream_leader_name(own_cluster.urls)
        victim = next(n for n in own_cluster.nodes if n.name == name)
        own_cluster.kill(victim)
        pause_s = resumes_on_the_leader(load, group, RESUME_BOUND_S)
        print(f"payments resumed {pause_s:.2f} s after the stream leader's NATS server died")
        second = next(n for n in own_cluster.nodes if n.running())
        own_cluster.kill(second)
        time.sleep(1.0)
        frozen = len(load.acked)
        refused = refused_write(group)
        assert len(load.acked) == frozen, "a payment was acknowledged without a quorum"
        assert isinstance(refused, (Unavailable, NotLeader)), refused
        own_cluster.start_node(victim)
        own_cluster.start_node(second)
        rejoin_s = resumes_on_the_leader(load, group, REJOIN_BOUND_S)
        print(f"payments resumed {rejoin_s:.2f} s after both NATS servers were started again")
    finally:
        if load is not None:
            load.stop()
    leader = wait_for_leader(group)
    check_acked_on(leader, load.acked)
    pass_checkpoints_until_agreed(leader, group)
    check_converged(leader, group)


def refused_write(group: list, tries: int = 10):
    """The error a new write gets once the leader knows its stream does not
    answer (until then a write may queue behind the batch in flight: no
    reply, a timeout here, which is allowed)."""
    for i in range(tries):
        node = next(n for n in group if n.running())
        try:
            with node.client() as c:
                c.pay(pay_batch(1, start_id=(1 << 52) + i), timeout_ms=3000)
        except (Unavailable, NotLeader) as error:
            return error
        except TimeoutError:
            continue
        raise AssertionError("a write was acknowledged without a quorum")
    raise AssertionError(f"no write refused in {tries} tries")




def test_a_node_whose_stream_does_not_answer_still_stops(own_cluster, group):
    """SIGTERM while an append has no answer: the node exits without the
    replies it cannot know (exit 3, one critical line), not never."""
    node = group[0].start()
    assert wait_for_leader([node]) is node
    build_world(node)
    load = Load(node)
    try:
        time.sleep(0.5)
        for nats_node in own_cluster.nodes:
            own_cluster.kill(nats_node)
        time.sleep(3.0)                     # the append in flight has timed out by now
        node.signal(signal.SIGTERM)
        assert node.process.wait(20) == EXIT_STREAM_BROKEN, node.log_tail()
    finally:
        load.stop()
    critical = [line for line in open(node.log_path) if " CRITICAL " in line]
    assert len(critical) == 1 and "no answer from the stream" in critical[0], critical


# The stream stays without a leader this long after a node took the lease:
# longer than one JetStream API timeout (5 s), which a takeover used to
# wait out once and then give the lease up.
STREAM_DOWN_S = 6.0


def test_a_node_that_takes_the_lease_waits_for_a_stream_without_leader(own_cluster, tmp_path):
    """The stream (one replica here) loses its only NATS server and the
    leader dies: the follower takes the lease while the stream has no
    leader, holds it and leads once the stream is back, without giving the
    lease up (JetStream leaves a request to a leaderless stream unanswered;
    the takeover asks again, briefly, rather than fail)."""
    host = create_stream(own_cluster.urls, replicas=1)
    host_node = next(n for n in own_cluster.nodes if n.name == host)
    first, second = (Node(str(tmp_path), own_cluster.servers, LEASE_MS, f"s{i}",
                          allow_unreplicated=True) for i in range(2))
    try:
        assert wait_for_leader([first.start()]) is first
        second.start()
        build_world(first)
        own_cluster.kill(host_node)
        first.signal(signal.SIGKILL)
        wait_for_role(second, "candidate")
        time.sleep(STREAM_DOWN_S)
        own_cluster.start_node(host_node)
        back = time.monotonic()
        assert wait_for_leader([second]) is second
        print(f"led {time.monotonic() - back:.2f} s after the stream's server came back")
        records = np.zeros(1, PAY_RECORD)
        records["id"], records["payer"], records["merchant"], records["amount"] = 1, 1, 1, 100
        with second.client() as c:
            assert c.pay(records)["status"][0] == Status.ok
    finally:
        first.stop()
        second.stop()
    with open(second.log_path) as f:
        log = f.read()
    assert "giving the lease up" not in log and "lease lost" not in log, second.log_tail()
