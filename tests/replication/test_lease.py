"""The lease as the node holds it (engine/replication/node.py), on a fake
bucket: what a renewal still out does when the node has just lost the
lease, and that a node giving the lease up releases the key."""
import asyncio
import time
import types

from engine.replication.node import FOLLOWER, LEADER, ReplicaNode

LEASE_S = 2.0


class Bucket:
    """The lease key's revisions; `renew` answers once `answer` is set."""

    def __init__(self):
        self.answer = asyncio.Event()
        self.released = []

    async def renew(self, _me: dict, revision: int) -> int:
        await self.answer.wait()
        return revision + 1

    async def release(self, revision: int) -> bool:
        self.released.append(revision)
        return True


def holder(bucket: Bucket, revision: int) -> ReplicaNode:
    """A node that leads and holds the key at `revision` (nothing else of it set)."""
    node = ReplicaNode.__new__(ReplicaNode)
    node.lease, node.lease_s, node.address = bucket, LEASE_S, "127.0.0.1:1"
    node.revision, node.renewed_at, node.role = revision, time.monotonic(), LEADER
    node.log = types.SimpleNamespace(step_down=lambda: None)
    return node


def test_a_renewal_answered_after_the_lease_was_lost_does_not_take_it_back():
    """The stream refused an append (or the takeover gave up) while a
    renewal was out: its answer must not make the node hold the key again
    (it would renew it for ever as a follower, and no node could lead);
    the key it renewed is released."""
    bucket = Bucket()
    node = holder(bucket, 5)

    async def lose_during_the_renewal():
        renewing = asyncio.ensure_future(node.renew())
        await asyncio.sleep(0)              # the renewal is out
        node.lost("the stream refused an append")
        bucket.answer.set()
        await renewing

    asyncio.run(lose_during_the_renewal())
    assert node.revision is None and node.role == FOLLOWER
    assert bucket.released == [6]


def test_giving_the_lease_up_releases_the_key():
    """A takeover that could not finish: the other node may take the key at
    once, not after its TTL."""
    bucket = Bucket()
    node = holder(bucket, 5)
    asyncio.run(node.give_up("the takeover failed"))
    assert node.revision is None and node.role == FOLLOWER
    assert bucket.released == [5]


def test_a_holder_whose_renewals_fail_wakes_at_the_end_of_its_lease():
    """It steps down then, by its own clock, not up to a renewal interval
    after its lease ended."""
    node = holder(Bucket(), 5)
    node.renewed_at = time.monotonic() - LEASE_S + 0.1
    assert node.lease_wait_s() <= 0.1
    node.renewed_at = time.monotonic()
    assert abs(node.lease_wait_s() - LEASE_S / 3) < 0.05


def test_a_follower_frees_a_key_that_holds_its_own_entry():
    """A create (or renewal) whose answer was lost while the bucket elected
    a leader, and that NATS took all the same: the key names this node, which
    holds no lease. It is released at once (at its revision), not left for a
    whole lease in which no node leads."""
    class Stale(Bucket):
        async def holder(self):
            return node.me(), 7

    bucket = Stale()
    node = holder(bucket, None)
    node.role = FOLLOWER
    node.log.leader = "127.0.0.1:2"
    asyncio.run(node.watch())
    assert bucket.released == [7] and node.revision is None
