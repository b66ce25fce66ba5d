"""Checkpoint digests computed in forked children (engine/replication/checkpoint.py),
without NATS: a digest matches the state's, and a stuck child is killed, not
left to hold a slot for ever."""
import logging
import os
import time

import pytest

from engine import Engine
from engine.core import canonical, export
from engine.replication import checkpoint
from engine.replication.checkpoint import Checkpoints, DigestMismatch

WAIT_S = 10.0


def collected(points: Checkpoints, seq: int) -> str:
    deadline = time.monotonic() + WAIT_S
    while seq not in points.digests:
        assert time.monotonic() < deadline, points.children
        time.sleep(0.01)
        points.collect()
    return points.digests[seq]


def test_a_checkpoint_digest_is_the_states_digest():
    state = Engine().state
    points = Checkpoints(every=5)
    points.applied(state, 4)                    # not a checkpoint: no child
    assert points.children == {}
    points.applied(state, 5)
    assert collected(points, 5) == canonical.digest(export.canonical(state))
    with pytest.raises(DigestMismatch, match="checkpoint at command 5"):
        points.claim(5, "f" * 64)               # compared at once: it differs
    points.applied(state, 10)
    points.claim(10, canonical.digest(export.canonical(state)))
    collected(points, 10)
    points.verify()
    assert points.last == {"seq": 10, "digest": points.digests[10]}


def test_the_last_checkpoint_is_the_newest_checked_whatever_order_children_finish_in():
    """Seen in the node tests: the child of checkpoint 10 finished before
    the child of 5, and the node showed 5 as its last for ever after."""
    state = Engine().state
    points = Checkpoints(every=5)
    points.applied(state, 5)
    points.applied(state, 10)
    digest = canonical.digest(export.canonical(state))
    five = points.children.pop(5)                       # 5's child out of sight
    points.claim(10, digest)
    ten = collected(points, 10)
    points.verify()
    assert points.last == {"seq": 10, "digest": ten}
    points.children[5] = five                           # 5's child done after 10's
    points.claim(5, digest)
    collected(points, 5)
    points.verify()
    assert points.claims == {} and points.last == {"seq": 10, "digest": ten}


def test_a_follower_that_leads_appends_only_checkpoints_the_stream_lacks():
    """Checkpoints 5 and 10 computed as a follower, 5's record read from the
    stream; leading, the node appends 10 only (a record for 5 again would
    show an older checkpoint as the leader's last)."""
    state = Engine().state
    points = Checkpoints(every=5)
    points.applied(state, 5)
    points.applied(state, 10)
    collected(points, 5)
    points.claim(5, points.digests[5])
    ten = collected(points, 10)
    assert points.ready(durable_seq=10) == [(10, ten)]
    points.appended_record(10, ten)
    assert points.ready(durable_seq=10) == [] and points.last == {"seq": 10, "digest": ten}


def hang(_state, write_fd):
    """A digest child that never finishes (as one stuck on a lock would)."""
    os.close(write_fd)
    time.sleep(60)
    os._exit(0)


def test_a_stuck_digest_child_is_killed_and_its_checkpoint_skipped(monkeypatch, caplog):
    monkeypatch.setattr(checkpoint, "digest_child", hang)
    monkeypatch.setattr(checkpoint, "DIGEST_TIMEOUT_S", 0.2)
    points = Checkpoints(every=5)
    points.applied(Engine().state, 5)
    (pid, _fd, _started), = points.children.values()
    time.sleep(0.3)
    with caplog.at_level(logging.ERROR, logger="scanpay.replication"):
        points.collect()
    assert points.children == {} and points.skipped == 1 and 5 not in points.digests
    assert "checkpoint 5 skipped: its digest child ran over" in caplog.text
    try:
        os.kill(pid, 0)
        raise AssertionError(f"the stuck child {pid} still exists")
    except ProcessLookupError:
        pass                                    # killed and reaped
