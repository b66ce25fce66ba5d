"""Failover: SIGKILL the leader under pipelined load, again and again; pause
it past its lease (SIGSTOP) and let it come back (SIGCONT).

Gateways pipeline PAY frames to whichever node leads (the test tells them),
and note the figures of every payment answered `ok`. Whatever happens to
the leader, every one of those is on the node that leads at the end, with
the same figures; AUDIT holds there and on every follower, and the
followers hold the same balances once they reach the leader's stream seq.
"""
import random
import signal
import time

import pytest

from support.failover import (CHECKPOINT_EVERY, Load, build_world, check_acked_on,
                              check_converged, pass_checkpoints_until_agreed)
from support.replicas import Node, wait_for_leader

LEASE_MS = 2000
CYCLES = 5
FAILOVER_BOUND_S = 15.0             # a sanity bound; bench/ measures the real figure


@pytest.fixture
def nodes(logs, tmp_path):
    made = []

    def make(count: int) -> list:
        made.extend(Node(str(tmp_path), logs.cluster.servers, LEASE_MS, f"s{i}",
                         checkpoint_every_entries=CHECKPOINT_EVERY) for i in range(count))
        for node in made:
            node.start()
        return made
    yield make
    for node in made:
        node.stop()


def test_sigkill_the_leader_under_pipelined_load_loses_no_answered_payment(nodes):
    group = nodes(3)
    leader = wait_for_leader(group)
    build_world(leader)
    load = Load(leader)
    rng = random.Random(17)
    failovers_s = []
    try:
        for _cycle in range(CYCLES):
            time.sleep(rng.uniform(0.3, 1.0))
            killed = load.leader
            started = time.monotonic()
            killed.signal(signal.SIGKILL)
            load.leader = wait_for_leader([n for n in group if n is not killed])
            failovers_s.append(time.monotonic() - started)
            killed.start()                  # back as a follower, replaying the stream
        time.sleep(0.5)
    finally:
        load.stop()
    assert len(load.acked) > 200, f"the load never got going ({len(load.acked)} acked)"
    print(f"failover after SIGKILL (s): {[round(s, 2) for s in failovers_s]}")
    assert max(failovers_s) < FAILOVER_BOUND_S, failovers_s
    leader = wait_for_leader(group)
    check_acked_on(leader, load.acked)
    pass_checkpoints_until_agreed(leader, group)
    check_converged(leader, group)


def test_a_paused_leader_is_refused_and_rejoins_as_a_follower(nodes):
    group = nodes(2)
    old = wait_for_leader(group)
    build_world(old)
    load = Load(old)
    try:
        time.sleep(0.5)
        old.signal(signal.SIGSTOP)
        new = wait_for_leader([n for n in group if n is not old])
        load.leader = new
        time.sleep(0.3)                     # the new leader appends meanwhile
        old.signal(signal.SIGCONT)
        deadline = time.monotonic() + 20
        while old.hello()["role"] != "follower":
            assert time.monotonic() < deadline, old.log_tail()
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        load.stop()
    assert wait_for_leader(group) is new
    log_text = open(old.log_path).read()
    assert "deposed:" in log_text or "lease lost" in log_text, old.log_tail()
    check_acked_on(new, load.acked)
    pass_checkpoints_until_agreed(new, group)
    check_converged(new, group)
