"""One replicated node of `scanpay serve --replicate` (docs/replication.md):
its role, the lease, following the stream, and taking over.

Threads and loops:
- the NATS loop (engine/replication/loop_thread.py) runs the lease: renew
  it while leading, watch it while following, take it when it is free;
- the server's event loop owns the engine's state: it applies the stream as
  a follower (`follow_loop`) and, once this node holds the lease, catches up
  to the stream's end, appends the new term's first record and only then
  takes writes (`take_over`);
- the engine's sync thread appends the leader's batches (engine/replication/log.py);
  a refused append calls `deposed`.

Roles: `follower` (reads, applies the stream; writes get not_leader naming
the leader), `candidate` (holds the lease, catching up), `leader`.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time

import nats.errors
import nats.js.errors

from engine.protocol.errors import EngineError, Unavailable
from engine.replication.checkpoint import Checkpoints, DigestMismatch
from engine.replication.lease import Lease, LeaseLost
from engine.replication.log import StreamLog, StreamTrimmed, StreamUnavailable
from engine.replication.snapshot_store import SnapshotRefused, SnapshotStore
from engine.replication.loop_thread import LoopThread
from engine.replication.stream import (API_TIMEOUT_S, KIND_CHECKPOINT, KIND_TERM, Names, Refused,
                                       Stream, parse_servers, until_ready)
from engine.storage import snapshot as snapshots
from engine.storage.journal import JournalError

log = logging.getLogger("scanpay.replication")

FOLLOWER, CANDIDATE, LEADER = "follower", "candidate", "leader"
CONNECT_TIMEOUT_S = 40.0            # connect, and find or create the stream and the bucket
RENEWALS_PER_LEASE = 3              # the leader renews this often per lease length
WATCHES_PER_LEASE = 6               # a follower looks at the lease this often
# A look at the key, and a release: JetStream leaves a read unanswered while
# the bucket has no leader, and a look sent then must not wait out the
# API's 5 s once a leader is back.
LEASE_LOOK_TIMEOUT_S = 1.0
FOLLOW_POLL_S = 0.2                 # a follower reads the stream at least this often
IDLE_POLL_S = 0.01                  # while not following (taking over, pending appends)
LEADER_POLL_S = 0.1                 # the leader looks for finished digests this often
# The leader looks for a finished snapshot to publish this often: the engine
# reaps its snapshots only at writes, and an idle leader has none.
SNAPSHOT_LOOK_S = 1.0
ERROR_WAIT_S = 0.25                 # after NATS did not answer a follower's read
# A lease holder waits this long for the stream to answer (it may have no
# leader yet: JetStream elects one in 4 to 9 s) before giving the lease up.
# Another node could do no better meanwhile, and the holder keeps renewing.
TAKEOVER_TIMEOUT_S = 30.0
TAKEOVER_TRIES_MAX = 120            # catch up + term record (the loop's bound)
TAKEOVER_RETRY_WAIT_S = 0.25
# One takeover read: JetStream leaves a request to a leaderless stream
# unanswered, so a short timeout re-asks soon after a leader is elected
# (the API's own 5 s made one lost request cost 5 s, and gave the lease up).
TAKEOVER_READ_TIMEOUT_S = 1.0
CATCH_UP_EMPTY_READS_MAX = 400      # reads that found nothing while the stream reports more
EXIT_STREAM_BROKEN = 3              # `scanpay serve` exit code: stopped rather than apply a bad stream
NATS_ERRORS = (TimeoutError, asyncio.TimeoutError, nats.errors.Error, nats.js.errors.Error,
               OSError)


class TakeoverRetry(Exception):
    """A takeover try found the stream not ready (the message says why): try again."""


def fatal(why: str) -> None:
    """Stop the process now, after one critical line: a node that cannot
    trust the stream (or learn an append's outcome) must neither reply nor
    serve reads. Its clients see lost connections: no reply, retry."""
    log.critical("%s; this node stops (exit %d)", why, EXIT_STREAM_BROKEN)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(EXIT_STREAM_BROKEN)


class ReplicaNode:
    """Made before the engine (it connects, and checks the stream and the
    lease bucket: blocking); `start` once the server listens."""

    def __init__(self, config, names: Names = Names()):
        self.config = config
        self.names = names
        self.lease_s = config.lease_ms / 1000
        self.nats = LoopThread()
        self.stream = None
        try:
            self.stream = self.nats.call(Stream.connect(parse_servers(config.replicate), names),
                                         CONNECT_TIMEOUT_S)
            self.nats.call(self.stream.ensure(config.replicas, config.allow_unreplicated),
                           CONNECT_TIMEOUT_S)
            self.lease = Lease(self.stream, self.lease_s)
            self.nats.call(self.lease.open(config.replicas, config.allow_unreplicated),
                           CONNECT_TIMEOUT_S)
            self.log = StreamLog(config.data, self.nats, self.stream,
                                 message_format=config.stream_format)
            self.store = SnapshotStore(self.stream, config.store_snapshots)
            self.nats.call(self.store.open(config.replicas, config.allow_unreplicated),
                           CONNECT_TIMEOUT_S)
            self.join_from_store()
        except BaseException:
            self.close()
            raise
        self.log.on_deposed = self.deposed
        self.log.on_fatal = fatal
        self.log.on_appended = self.appended
        self.log.on_snapshot = self.snapshot_written
        self.upload = None              # the snapshot upload in flight (one at a time)
        self.upload_lock = threading.Lock()     # writer thread and the idle look start uploads
        self.published_seq = 0          # command seq of the last snapshot sent for upload
        self.snapshot_looked_at = 0.0   # monotonic time of the idle leader's last look
        self.checkpoints = Checkpoints(config.checkpoint_every_entries)
        self.checkpoint_lock = threading.Lock()     # one thread appends checkpoint records
        self.seen_generation = 0
        self.role = FOLLOWER
        self.address = ""
        self.engine = None
        self.loop = None                # the server's event loop
        self.wake = None
        self.stopping = False
        self.revision = None            # the lease's revision while this node holds it (NATS loop)
        self.renewed_at = 0.0
        self.tasks = []
        self.lease_future = None
        self.takeovers = 0

    # -- lifecycle (server loop) ---------------------------------------------

    def start(self, engine, address: str) -> None:
        self.engine = engine
        self.engine.on_applied = self.checkpoints.applied
        self.seen_generation = engine.generation
        self.address = address
        self.loop = asyncio.get_running_loop()
        self.wake = asyncio.Event()
        self.nats.call(self.stream.nc.subscribe(self.names.tip, cb=self._tip), CONNECT_TIMEOUT_S)
        self.tasks.append(self.loop.create_task(self.follow_loop()))
        self.lease_future = self.nats.submit(self.lease_loop())
        log.info("replicated node at %s: following stream %s from message %d (command %d)",
                 address, self.names.stream, self.log.stream_seq, self.log.durable_seq)

    async def _tip(self, _msg) -> None:
        """NATS loop: the leader appended (a hint): wake the follower."""
        if self.loop is not None and not self.stopping:
            self.loop.call_soon_threadsafe(self.wake.set)

    async def stop(self) -> None:
        """After the writer stopped: give the lease up, stop following."""
        self.stopping = True
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):     # noqa: BLE001 - stopping
                pass
        if self.lease_future is not None:
            try:
                await asyncio.wait_for(asyncio.wrap_future(self.lease_future), 5)
            except (asyncio.TimeoutError, Exception):       # noqa: BLE001 - stopping
                pass

    def close(self) -> None:
        """After the engine closed: the NATS connection and its thread."""
        if self.stream is not None:
            try:
                self.nats.call(self.stream.close(), 5)
            except Exception:           # noqa: BLE001 - closing anyway
                pass
        self.nats.stop()

    def hello(self) -> dict:
        return {"durability": "replicated", "role": self.role, "leader": self.log.leader,
                "stream_seq": self.log.stream_seq, "checkpoint": self.checkpoints.last}

    def write_refusal(self):
        """What a write gets now without reaching the writer, or None."""
        if self.log.failed:
            return self.log.not_leader()
        if self.log.stalled:
            return Unavailable("the replicated stream does not answer (see the server log); "
                               "nothing applied; retry later")
        return None

    def position(self) -> int:
        """The stream seq the state reflects (replies to reads say it)."""
        return self.log.stream_seq

    # -- snapshots in the object store --------------------------------------------

    def local_snapshot(self) -> tuple[str, int, int] | None:
        """(path, command seq, stream seq) of the newest local snapshot whose
        header and meta verify, or None."""
        for info in reversed(snapshots.list_snapshots(self.config.data)):
            try:
                meta = snapshots.load_meta(info.path)
                return info.path, info.seq, int(meta["replication"]["stream_seq"])
            except (OSError, snapshots.SnapshotCorrupt, KeyError, TypeError, ValueError):
                continue                # the engine's load logs and skips it too
        return None

    def join_from_store(self) -> None:
        """At start, before the engine loads: a snapshot in the store newer
        than the newest local one is downloaded (the newest that verifies;
        a corrupt one is refused in one line and an older one tried). Refuses
        the start if the stream no longer holds what the state needs."""
        local = self.local_snapshot()
        have = local[2] if local is not None else 0
        # Reads at start: a cluster still starting is waited for (until_ready).
        for stored in reversed(self.nats.call(until_ready(self.store.entries),
                                              CONNECT_TIMEOUT_S)):
            if stored.stream_seq <= have:
                break
            try:
                self.nats.call(self.store.download(stored, self.config.data), CONNECT_TIMEOUT_S)
            except SnapshotRefused as error:
                log.error("snapshot store: refusing %s (%s); falling back to an older one",
                          stored.name, error)
                continue
            log.warning("joined from snapshot %s of the object store (command %d, stream "
                        "message %d)", stored.name, stored.seq, stored.stream_seq)
            have = stored.stream_seq
            break
        first = self.nats.call(until_ready(self.stream.first_seq), CONNECT_TIMEOUT_S)
        if self.log.stream_seq > have and first > have + 1:
            raise JournalError(
                f"the stream starts at message {first} (trimmed), but the newest snapshot this "
                f"node can load ends at {have}: no valid snapshot in the object store "
                f"{self.names.snapshot_bucket} covers the gap; restore one there (or in "
                f"{self.config.data}) before starting this node")

    def snapshot_written(self) -> None:
        """Writer thread, after a local snapshot was reaped: the leader uploads it."""
        self.publish_newest()

    def publish_newest(self) -> None:
        """The leader uploads its newest local snapshot if it has not sent it
        yet (on the NATS loop, one upload at a time: a snapshot finished
        meanwhile waits for the next look). From the writer thread after a
        snapshot is reaped, and from the idle leader's look (`lead_idle`):
        a finished snapshot file is complete (written under a temp name, then
        renamed), reaped or not."""
        with self.upload_lock:
            if self.log.token is None or (self.upload is not None and not self.upload.done()):
                return
            local = self.local_snapshot()
            if local is None or local[1] <= self.published_seq:
                return
            self.published_seq = local[1]
            self.upload = self.nats.submit(self.publish_and_trim(*local))

    async def publish_and_trim(self, path: str, seq: int, stream_seq: int) -> None:
        """NATS loop: the snapshot into the store, then the stream purged
        below the oldest snapshot the store keeps (never further)."""
        try:
            stored = await self.store.entries()
            if stored and stored[-1].stream_seq >= stream_seq:
                return                  # (a new leader's snapshot from before it led)
            kept = await self.store.publish(path, seq, stream_seq)
            log.info("snapshot at command %d (stream message %d) published", seq, stream_seq)
            # The purge keeps the message the oldest kept snapshot ends with
            # (one more than it needs): the stream's last message then always
            # stays, and a start reads the command seq from it (log.refresh).
            if len(kept) >= self.store.keep and kept[0].stream_seq > 1:
                await self.stream.purge_before(kept[0].stream_seq)
                log.info("stream trimmed below message %d (the oldest snapshot kept ends "
                         "there)", kept[0].stream_seq)
        except (*NATS_ERRORS, SnapshotRefused) as error:
            log.warning("snapshot at command %d not published (%s: %s); the next one will be",
                        seq, type(error).__name__, error)

    # -- the lease (NATS loop) -------------------------------------------------

    def me(self) -> dict:
        return {"address": self.address, "pid": os.getpid()}

    async def lease_loop(self) -> None:
        while not self.stopping:
            try:
                if self.revision is not None:
                    await self.renew()
                else:
                    await self.watch()
            except NATS_ERRORS as error:
                log.debug("lease: NATS did not answer (%s)", error)
            await asyncio.sleep(self.lease_wait_s())
        if self.revision is not None and await self.release(self.revision):
            log.info("lease released")

    def lease_wait_s(self) -> float:
        """Until the next renewal or look. A holder whose renewals fail
        wakes at the end of its lease by its own clock (which ends before
        the bucket's: it counts from before the request) and steps down
        then, not up to a renewal interval later."""
        if self.revision is None:
            return self.lease_s / WATCHES_PER_LEASE
        left_s = self.renewed_at + self.lease_s - time.monotonic()
        return max(0.0, min(self.lease_s / RENEWALS_PER_LEASE, left_s))

    async def renew(self) -> None:
        """Renew the lease, counting its length from before the request (the
        bucket counts from when it stored it, which is later); not renewed
        within the lease: lost, even while the request is still pending."""
        sent = time.monotonic()
        revision = self.revision
        left_s = self.lease_s - (sent - self.renewed_at)
        if left_s <= 0:
            return self.lost(f"not renewed for {self.lease_s:g} s")
        try:
            renewed = await asyncio.wait_for(self.lease.renew(self.me(), revision), left_s)
        except LeaseLost as error:
            return self.lost(str(error))
        except asyncio.TimeoutError:
            return self.lost(f"not renewed for {self.lease_s:g} s")
        if self.revision != revision:
            # Lost while the request was out (deposed, or the takeover gave
            # up): that stays so; the key it renewed is released.
            await self.release(renewed)
            return
        self.revision = renewed
        self.renewed_at = sent

    async def release(self, revision: int) -> bool:
        """Give the key at `revision` up (a follower may take it at once
        rather than after its TTL); False if it was not there any more or
        NATS did not answer."""
        try:
            return await asyncio.wait_for(self.lease.release(revision), LEASE_LOOK_TIMEOUT_S)
        except NATS_ERRORS as error:
            log.debug("lease: not released (%s); it expires", error)
            return False

    async def give_up(self, why: str) -> None:
        """NATS loop: a takeover that could not finish. This node follows and
        releases the key: the other node need not wait for its TTL."""
        revision = self.revision
        self.lost(why)
        if revision is not None and await self.release(revision):
            log.info("lease released")

    def lost(self, why: str) -> None:
        if self.revision is None:
            return
        self.revision = None
        self.log.step_down()
        if self.role != FOLLOWER:
            log.warning("lease lost (%s): this node follows now", why)
        self.role = FOLLOWER

    async def watch(self) -> None:
        found = await asyncio.wait_for(self.lease.holder(), LEASE_LOOK_TIMEOUT_S)
        if found is not None:
            holder, revision = found
            if holder == self.me():
                # This node's own entry, though it holds no lease: a create or
                # a renewal NATS took after its answer was lost (it times out
                # while the bucket elects a leader, then lands). Freed now,
                # not a whole lease after the bucket came back.
                if await self.release(revision):
                    log.info("lease: the key held this node's entry from a request whose "
                             "answer was lost; released")
                return
            self.log.leader = holder.get("address", "")
            return
        self.log.leader = ""
        if self.role != FOLLOWER or not self.log.idle or self.stopping:
            return
        sent = time.monotonic()
        revision = await self.lease.acquire(self.me())
        if revision is None:
            return
        self.revision = revision
        self.renewed_at = sent
        self.role = CANDIDATE
        self.loop.call_soon_threadsafe(self._start_takeover)

    def appended(self, _stream_seq: int, durable_seq: int) -> None:
        """The leader's sync thread after each message the stream
        acknowledged (or the event loop's helper thread while no write
        comes): the checkpoint records whose command is in the stream now."""
        with self.checkpoint_lock:
            token = self.log.token
            for seq, digest in self.checkpoints.ready(durable_seq):
                if token is None:
                    return
                try:
                    self.log.append_record(KIND_CHECKPOINT, {"seq": seq, "digest": digest},
                                           token)
                except Refused as refusal:
                    self.log.refuse(f"the stream refused checkpoint record {seq} ({refusal})")
                    return
                self.checkpoints.appended_record(seq, digest)

    async def lead_idle(self) -> None:
        """The leader, between writes: a digest that finished after the last
        append is appended now, not at the next write; a snapshot that
        finished is published (about once a second)."""
        durable = self.log.durable_seq
        if self.log.token is not None and self.checkpoints.ready(durable):
            await asyncio.to_thread(self.append_idle)
        now = time.monotonic()
        if now - self.snapshot_looked_at >= SNAPSHOT_LOOK_S:
            self.snapshot_looked_at = now
            await asyncio.to_thread(self.publish_newest)   # (reads a snapshot's header)
        await asyncio.sleep(LEADER_POLL_S)

    def append_idle(self) -> None:
        # The log's append round first, then checkpoint_lock: the order the
        # sync thread takes them in (it calls `appended` inside its round).
        with self.log.append_round:
            self.appended(self.log.stream_seq, self.log.durable_seq)

    def deposed(self) -> None:
        """Sync thread: the stream refused this node's append."""
        self.nats.loop.call_soon_threadsafe(self.lost, "the stream refused an append")

    # -- following and taking over (server loop) --------------------------------

    def _start_takeover(self) -> None:
        if not self.stopping:
            self.tasks.append(self.loop.create_task(self.take_over()))

    async def follow_loop(self) -> None:
        while not self.stopping:
            if self.role == LEADER:
                await self.lead_idle()
                continue
            if self.role != FOLLOWER or not self.log.idle:
                await asyncio.sleep(IDLE_POLL_S)
                continue
            try:
                got = await self.follow_step()
                self.checkpoints.verify()
            except (StreamUnavailable, EngineError, *NATS_ERRORS) as error:
                log.debug("following: %s", error)
                await asyncio.sleep(ERROR_WAIT_S)
                continue
            except (JournalError, DigestMismatch) as error:
                fatal(f"the replicated stream cannot be applied: {error}")
            except Exception as error:      # a bug: stop loudly rather than fall behind silently
                log.exception("following the stream failed")
                fatal(f"following the stream failed unexpectedly: {error!r}")
            if not got:
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), FOLLOW_POLL_S)
                except asyncio.TimeoutError:
                    pass

    async def follow_step(self, timeout_s: float = API_TIMEOUT_S) -> bool:
        """Read and apply what follows the state in the stream; False if nothing."""
        try:
            self.engine._ensure_current()   # a refused leader rebuilds first
        except EngineError:
            await self.check_rebuildable()  # (the rebuild failed: it is retried)
            raise
        self.log.settle()
        if self.engine.generation != self.seen_generation:
            self.seen_generation = self.engine.generation
            self.checkpoints.forget_after(self.log.durable_seq)     # digests of dropped commands
        after = self.log.stream_seq
        messages = await self.nats.run(self.stream.fetch(after, timeout_s=timeout_s))
        if not messages:
            return False
        if after != self.log.stream_seq or not self.log.idle:
            return True                     # the state moved meanwhile: read again
        if messages[0].seq != after + 1:    # trimmed past this node: it says so and stops
            await asyncio.to_thread(self.log.check_not_trimmed, after, messages)
        decoded = self.log.decode(messages, after, self.log.durable_seq + 1,
                                  commands_as="command")
        if not self.log.advance(decoded):
            return True                     # the log moved meanwhile: read again
        self.engine.apply_replicated(decoded.commands)
        for _stream_seq, kind, body in decoded.records:
            if kind == KIND_CHECKPOINT:
                self.checkpoints.claim(int(body.get("seq", -1)), str(body.get("digest", "")))
        return True

    async def check_rebuildable(self) -> None:
        """After a failed rebuild: StreamTrimmed (the node stops, saying to
        restart it: a start loads the store's newest snapshot) if the stream
        no longer holds what follows the snapshot the rebuild starts from,
        which no retry can change."""
        local = await asyncio.to_thread(self.local_snapshot)
        have = local[2] if local is not None else 0
        first = await self.nats.run(self.stream.first_seq())
        if first > have + 1:
            raise StreamTrimmed(have, first)

    async def take_over(self) -> None:
        """This node holds the lease: catch up to the stream's end, append the
        term record (after which no older leader's append can land), lead.
        A try the stream does not answer (no leader yet) is tried again
        while this node holds the lease, up to TAKEOVER_TIMEOUT_S."""
        started = time.monotonic()
        why = "no try"
        try:
            for tries in range(1, TAKEOVER_TRIES_MAX + 1):
                if self.revision is None or self.stopping:
                    return
                try:
                    if await self.try_take_over():
                        self.takeovers += 1
                        log.warning("leading from stream message %d (command %d), %.0f ms after "
                                    "taking the lease (%d tries)", self.log.stream_seq,
                                    self.log.durable_seq, (time.monotonic() - started) * 1000,
                                    tries)
                    return
                except TakeoverRetry as retry:
                    why = str(retry)
                except (StreamUnavailable, EngineError, *NATS_ERRORS) as error:
                    why = f"the stream did not answer: {type(error).__name__}: {error}"
                log.debug("takeover try %d: %s", tries, why)
                if time.monotonic() - started >= TAKEOVER_TIMEOUT_S:
                    break
                await asyncio.sleep(TAKEOVER_RETRY_WAIT_S)
            log.error("could not take over in %d tries over %.1f s (the last: %s); giving the "
                      "lease up", tries, time.monotonic() - started, why)
        except (JournalError, DigestMismatch) as error:
            fatal(f"the replicated stream cannot be applied: {error}")
        except Exception:                   # a bug: give the lease to another node
            log.exception("taking over failed; giving the lease up")
        self.nats.submit(self.give_up("the takeover failed"))

    async def try_take_over(self) -> bool:
        """One try: True once leading, False if the lease went meanwhile;
        TakeoverRetry (or a NATS error) if the stream was not ready."""
        if not self.log.idle:
            raise TakeoverRetry("its own appends are still being resolved")
        self.engine._ensure_current()
        self.log.settle()
        end = await self.nats.run(self.stream.last_seq(TAKEOVER_READ_TIMEOUT_S))
        for _ in range(CATCH_UP_EMPTY_READS_MAX):
            if self.log.stream_seq >= end:
                break
            if not await self.follow_step(TAKEOVER_READ_TIMEOUT_S):
                await asyncio.sleep(0.005)  # the replica that answered lags its leader
        else:
            raise TakeoverRetry(f"caught up to stream message {self.log.stream_seq} of {end} "
                                f"only (the replica that answered lags)")
        token = self.log.new_token()
        body = {"address": self.address, "token": token, "seq": self.log.durable_seq,
                "now": self.engine._now()}
        try:                                # off the event loop: NATS may be slow to answer
            await asyncio.to_thread(self.log.append_record, KIND_TERM, body, token)
        except Refused as refusal:          # the stream moved on: catch up again
            raise TakeoverRetry(f"the term record was refused ({refusal})") from None
        return await self.nats.run(self.lead_if_held(token))

    async def lead_if_held(self, token: str) -> bool:
        """NATS loop (where `lost` runs, so the lease cannot go in between):
        lead, if this node still holds the lease."""
        if self.revision is None:
            return False
        self.log.lead(token)
        self.checkpoints.appended = self.log.durable_seq    # the last leader's, or none
        self.log.leader = self.address
        self.role = LEADER
        return True
