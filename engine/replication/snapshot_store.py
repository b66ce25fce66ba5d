"""Snapshots in a JetStream object store: how new nodes join, and how far
the stream may be trimmed (docs/replication.md, "Snapshots in the store").

The bucket `scanpay_snapshots_<shard>` (file storage, replicated like the
stream) holds the leader's newest snapshot files, each named by the stream
seq and command seq it includes (`snapshot-<stream seq>-<command seq>`),
with its SHA-256 in the object's description (nats-py checks its own digest
of the chunks too; ours is taken from the file on disk before the upload, so
it also catches an object replaced by another writer). The store keeps the
`keep` newest; the stream is purged below the oldest of those, never below.

Every coroutine here runs on the NATS loop (engine/replication/loop_thread.py).
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import re

import nats.js.errors
from nats.js.api import ObjectMeta, ObjectStoreConfig, StorageType

from engine.replication.stream import StreamSettingsError, until_ready
from engine.storage import snapshot as snapshots

log = logging.getLogger("scanpay.replication")

OBJECT_NAME = re.compile(r"^snapshot-(\d{12})-(\d{12})$")
HASH_CHUNK_BYTES = 1 << 20          # the file is hashed in reads of this size
TEMP_SUFFIX = ".download"           # a download in progress (removed on failure)


class SnapshotRefused(Exception):
    """A snapshot in the store that this node will not load (wrong checksum,
    unreadable, not a snapshot): the message says which and why."""


@dataclasses.dataclass(frozen=True)
class Stored:
    stream_seq: int                 # the last stream message the snapshot includes
    seq: int                        # its command seq
    name: str


def object_name(stream_seq: int, seq: int) -> str:
    return f"snapshot-{stream_seq:012d}-{seq:012d}"


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class SnapshotStore:
    """One shard's snapshot bucket on a Stream's connection (NATS loop only)."""

    def __init__(self, stream, keep: int):
        if keep < 1:
            raise ValueError(f"store_snapshots must be at least 1, not {keep}")
        self.js = stream.js
        self.bucket = stream.names.snapshot_bucket
        self.keep = keep
        self.store = None

    async def open(self, replicas: int, allow_unreplicated: bool) -> None:
        """The bucket, created if missing (`replicas`, file storage). A
        starting cluster may not place the replicas yet (a peer not yet seen)
        or still elect its meta leader: retried until READY_TIMEOUT_S
        (until_ready), as the stream and the lease bucket are."""
        await until_ready(lambda: self._open(replicas, allow_unreplicated))

    async def _open(self, replicas: int, allow_unreplicated: bool) -> None:
        try:
            self.store = await self.js.object_store(self.bucket)
        except nats.js.errors.BucketNotFoundError:
            made = replicas
            try:
                self.store = await self.js.create_object_store(self.bucket, ObjectStoreConfig(
                    storage=StorageType.FILE, replicas=replicas))
            except nats.js.errors.APIError as error:
                if not allow_unreplicated:
                    raise StreamSettingsError(
                        f"cannot create the snapshot bucket {self.bucket} with {replicas} "
                        f"replicas ({error.description}); add NATS servers or start with "
                        f"--allow-unreplicated") from None
                made = 1
                self.store = await self.js.create_object_store(self.bucket, ObjectStoreConfig(
                    storage=StorageType.FILE, replicas=1))
            log.info("snapshot bucket %s created (%d replica(s))", self.bucket, made)

    async def entries(self) -> list[Stored]:
        """The snapshots in the store, oldest first (other objects ignored)."""
        try:
            infos = await self.store.list(ignore_deletes=True)
        except nats.js.errors.NotFoundError:
            return []
        found = []
        for info in infos:
            match = OBJECT_NAME.match(info.name or "")
            if match and not info.deleted:
                found.append(Stored(int(match.group(1)), int(match.group(2)), info.name))
        found.sort(key=lambda stored: stored.stream_seq)
        return found

    async def publish(self, path: str, seq: int, stream_seq: int) -> list[Stored]:
        """Upload the local snapshot file `path` (at command `seq`, stream
        `stream_seq`), then delete all but the `keep` newest; what is kept."""
        sha256 = await asyncio.to_thread(file_sha256, path)
        description = json.dumps({"sha256": sha256, "seq": seq, "stream_seq": stream_seq})
        name = object_name(stream_seq, seq)
        with open(path, "rb") as file:
            await self.store.put(name, file, meta=ObjectMeta(name=name, description=description))
        kept = await self.entries()
        for old in kept[:-self.keep]:
            await self.store.delete(old.name)
        return kept[-self.keep:]

    async def download(self, stored: Stored, directory: str) -> str:
        """`stored` as a local snapshot file in `directory`, its checksum and
        header checked; its path. SnapshotRefused if it does not verify."""
        final = os.path.join(directory, snapshots.snapshot_name(stored.seq))
        temp = final + TEMP_SUFFIX
        try:
            with open(temp, "wb") as file:
                result = await self.store.get(stored.name, writeinto=file)
                file.flush()
                os.fsync(file.fileno())
            expected = self._expected_sha256(result.info)
            actual = await asyncio.to_thread(file_sha256, temp)
            if actual != expected:
                raise SnapshotRefused(f"checksum mismatch (SHA-256 {actual}, its "
                                      f"description says {expected})")
            os.rename(temp, final)
            meta = snapshots.load_meta(final)
            if int(meta["replication"]["stream_seq"]) != stored.stream_seq:
                os.unlink(final)
                raise SnapshotRefused("its meta names another stream seq than its object name")
        except nats.js.errors.DigestMismatchError:
            raise SnapshotRefused("its chunks do not match the store's digest") from None
        except (snapshots.SnapshotCorrupt, KeyError, TypeError, ValueError) as error:
            if os.path.exists(final):
                os.unlink(final)
            raise SnapshotRefused(f"not a valid snapshot ({error})") from None
        finally:
            if os.path.exists(temp):
                os.unlink(temp)
        return final

    @staticmethod
    def _expected_sha256(info) -> str:
        try:
            return str(json.loads(info.description or "")["sha256"])
        except (ValueError, KeyError, TypeError):
            raise SnapshotRefused("its description holds no SHA-256") from None
