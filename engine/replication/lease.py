"""The leader's lease: key `leader` in a JetStream key-value bucket.

The bucket (`scanpay_lease_<shard>`, replicated like the stream) keeps each
value for the lease's length (its TTL): a leader that stops renewing loses
the key when that runs out, and a follower that then finds no key creates
it (create succeeds for one node only). Renewal is a compare-and-set on the
key's revision, so a leader whose key another node took learns it at its
next renewal. The lease only says who should write: the stream's
Nats-Expected-Last-Sequence is what fences a deposed writer
(engine/replication/log.py), so no clock assumption keeps the ledger safe.
"""
from __future__ import annotations

import json

import nats.js.errors
from nats.js.api import KeyValueConfig, StorageType

from engine.replication.stream import StreamSettingsError, until_ready

LEASE_KEY = "leader"


class LeaseLost(Exception):
    """The key is gone or holds another revision: another node may lead."""


class Lease:
    """The lease bucket of one shard, on a Stream's connection (NATS loop only)."""

    def __init__(self, stream, lease_s: float):
        self.js = stream.js
        self.bucket = stream.names.lease_bucket
        self.lease_s = lease_s
        self.kv = None

    async def open(self, replicas: int, allow_unreplicated: bool) -> None:
        """The bucket, created if missing; refused if its TTL or replicas
        are not this node's (every node must agree on the lease)."""
        await until_ready(lambda: self._open(replicas, allow_unreplicated))

    async def _open(self, replicas: int, allow_unreplicated: bool) -> None:
        try:
            self.kv = await self.js.key_value(self.bucket)
        except nats.js.errors.BucketNotFoundError:
            try:
                self.kv = await self.js.create_key_value(KeyValueConfig(
                    bucket=self.bucket, history=1, ttl=self.lease_s, replicas=replicas,
                    storage=StorageType.FILE))
            except nats.js.errors.APIError as error:
                if not allow_unreplicated:
                    raise StreamSettingsError(
                        f"cannot create the lease bucket {self.bucket} with {replicas} "
                        f"replicas ({error.description}); add NATS servers or start with "
                        f"--allow-unreplicated") from None
                self.kv = await self.js.create_key_value(KeyValueConfig(
                    bucket=self.bucket, history=1, ttl=self.lease_s, replicas=1,
                    storage=StorageType.FILE))
        await self._check(replicas, allow_unreplicated)

    async def _check(self, replicas: int, allow_unreplicated: bool) -> None:
        info = await self.js.stream_info(f"KV_{self.bucket}")
        ttl_s = (info.config.max_age or 0)
        if abs(ttl_s - self.lease_s) > 0.001:
            raise StreamSettingsError(
                f"the lease bucket {self.bucket} has a TTL of {ttl_s:g} s, this node's "
                f"lease_ms says {self.lease_s:g} s: give every node the same lease_ms (or "
                f"delete the bucket while no node runs: nats kv del {self.bucket})")
        have = info.config.num_replicas or 1
        if have < replicas and not allow_unreplicated:
            raise StreamSettingsError(
                f"the lease bucket {self.bucket} has {have} replica(s), fewer than the "
                f"{replicas} configured; recreate it or start with --allow-unreplicated")

    async def holder(self) -> tuple[dict, int] | None:
        """Who holds the lease now, and the key's revision (None: nobody)."""
        try:
            entry = await self.kv.get(LEASE_KEY)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        try:
            holder = json.loads(entry.value or b"")
        except ValueError:
            holder = None
        return (holder if isinstance(holder, dict) else {"address": ""}), entry.revision

    async def acquire(self, me: dict) -> int | None:
        """Take the lease if nobody holds it: its revision, or None."""
        try:
            return await self.kv.create(LEASE_KEY, json.dumps(me).encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            return None

    async def renew(self, me: dict, revision: int) -> int:
        """The new revision; LeaseLost if the key is not at `revision` any more."""
        try:
            return await self.kv.update(LEASE_KEY, json.dumps(me).encode(), last=revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise LeaseLost(f"the lease key is no longer at revision {revision}") from None

    async def release(self, revision: int) -> bool:
        """Give the lease up (a clean stop): a follower may take it at once.
        False if the key was no longer at `revision` (nothing deleted)."""
        try:
            await self.kv.delete(LEASE_KEY, last=revision)
            return True
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
