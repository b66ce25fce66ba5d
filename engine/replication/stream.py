"""The JetStream side of the replicated log: names, the stream's settings and
their check at start, appends fenced by the stream's last sequence, reads.

Every coroutine here runs on the NATS loop (engine/replication/loop_thread.py).
Names carry the shard id (0 until accounts are sharded, a later issue): one
stream and one lease bucket per shard, each with its own leader.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time

import nats
import nats.errors
import nats.js.errors
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from engine.replication.packing import FORMAT_ENTRIES, HEADER_FORMAT

log = logging.getLogger("scanpay.replication")

# JetStream's error code for a publish whose Nats-Expected-Last-Sequence is
# not the stream's last sequence: another writer appended first.
ERR_WRONG_LAST_SEQUENCE = 10071
EXPECTED_LAST_SEQUENCE = "Nats-Expected-Last-Sequence"
MSG_ID = "Nats-Msg-Id"
# Our headers: the last command seq the stream holds up to and including this
# message (so a reader knows the command seq at any message), and the kind of
# a record message (absent: a batch of commands).
HEADER_LAST = "Scanpay-Last"
HEADER_KIND = "Scanpay-Kind"
KIND_TERM = "term"                  # a new leader's first append (engine/replication/node.py)
KIND_CHECKPOINT = "checkpoint"      # the leader's state digest at a command seq
DUPLICATE_WINDOW_S = 120            # a re-sent append is recognised by its msg id this long
CONNECT_TIMEOUT_S = 2.0            # one server
FIRST_CONNECT_TIMEOUT_S = 10.0      # any server, at start (then: reconnect for ever)
ERROR_LOG_INTERVAL_S = 10.0         # the same connection error is logged this often
RECONNECT_WAIT_S = 0.25
API_TIMEOUT_S = 5.0
READY_TIMEOUT_S = 30.0              # a starting cluster elects its JetStream meta leader
# Stream creation can fail while the cluster elects its meta leader; retried
# this often within READY_TIMEOUT_S.
READY_POLL_S = 0.25
# A cluster that has not seen all its peers yet (just started, or one is
# briefly away) answers this: retried until READY_TIMEOUT_S, as a cluster
# still electing its meta leader is.
PLACEMENT_PENDING = "no suitable peers for placement"
# What one read asks for: messages, and bytes (a message is at most max_payload).
FETCH_MESSAGES_MAX = 256
FETCH_BYTES_MAX = 32 << 20


class StreamSettingsError(Exception):
    """The stream (or the NATS cluster) is not as this node is configured to
    need it; the message says what to do. Refuses the start."""


class Refused(Exception):
    """The stream refused an append: its last sequence was not the one the
    append expected (another writer appended first)."""


@dataclasses.dataclass(frozen=True)
class Names:
    shard: int = 0

    @property
    def stream(self) -> str:
        return f"scanpay_{self.shard}"

    @property
    def subject(self) -> str:
        return f"scanpay.{self.shard}.log"

    @property
    def tip(self) -> str:
        """Core NATS subject the leader announces each append on: a hint that
        wakes followers, never data (they read the stream)."""
        return f"scanpay.{self.shard}.tip"

    @property
    def lease_bucket(self) -> str:
        return f"scanpay_lease_{self.shard}"

    @property
    def snapshot_bucket(self) -> str:
        """The object store of the leader's snapshots (engine/replication/snapshot_store.py)."""
        return f"scanpay_snapshots_{self.shard}"


@dataclasses.dataclass
class Message:
    seq: int                        # stream sequence
    headers: dict
    data: bytes

    @property
    def kind(self) -> str | None:
        return self.headers.get(HEADER_KIND)

    @property
    def last_command(self) -> int:
        return int(self.headers.get(HEADER_LAST, "-1"))

    @property
    def format(self) -> int:
        """Its payload's format (engine/replication/packing.py); 0 when the
        header is not a number (unknown)."""
        value = self.headers.get(HEADER_FORMAT)
        if value is None:
            return FORMAT_ENTRIES
        return int(value) if value.isdigit() else 0


def parse_servers(text: str) -> list[str]:
    """`nats://h1:4222,nats://h2:4222` (or without the scheme) as a list of URLs."""
    servers = [s.strip() for s in text.split(",") if s.strip()]
    if not servers:
        raise ValueError("replicate: give the NATS servers, e.g. nats://h1:4222,nats://h2:4222")
    return [s if "://" in s else f"nats://{s}" for s in servers]


async def probe(servers: list[str]) -> None:
    """Fail at once when no server accepts a TCP connection (nats-py, set to
    reconnect for ever, would retry until the start's timeout)."""
    from urllib.parse import urlsplit
    errors = []
    for server in servers:
        url = urlsplit(server)
        try:
            _reader, writer = await asyncio.wait_for(
                asyncio.open_connection(url.hostname, url.port or 4222), CONNECT_TIMEOUT_S)
            writer.close()
            return
        except (OSError, asyncio.TimeoutError) as error:
            errors.append(f"{url.netloc}: {error.strerror if isinstance(error, OSError) else 'timeout'}")
    raise ConnectionRefusedError(f"no NATS server accepts connections ({'; '.join(errors)})")


class ConnectionNotes:
    """nats-py's connection callbacks as log lines: one per change, not one
    traceback per reconnect attempt (its default)."""

    def __init__(self):
        self.nc = None
        self.last_error = None
        self.logged_at = 0.0
        self.suppressed = 0
        self.closing = False

    async def error(self, error: Exception) -> None:
        if self.nc is None:                 # not connected yet: the start's one line says it
            return
        now = time.monotonic()
        self.suppressed += 1
        if self.last_error is None or now - self.logged_at > ERROR_LOG_INTERVAL_S:
            more = f"; {self.suppressed - 1} more since the last line" if self.suppressed > 1 else ""
            log.warning("NATS: %s: %s (reconnecting%s)", type(error).__name__, error, more)
            self.last_error, self.logged_at, self.suppressed = str(error), now, 0

    async def disconnected(self) -> None:
        if not self.closing:
            log.warning("NATS: connection lost; reconnecting")

    async def reconnected(self) -> None:
        url = self.nc.connected_url if self.nc is not None else None
        log.warning("NATS: reconnected to %s", url.netloc if url else "?")
        self.last_error = None


class Stream:
    """One shard's stream on a NATS connection (made by `connect`)."""

    def __init__(self, nc, names: Names):
        self.nc = nc
        self.js = nc.jetstream(timeout=API_TIMEOUT_S)
        self.names = names
        self.notes = ConnectionNotes()

    @classmethod
    async def connect(cls, servers: list[str], names: Names) -> "Stream":
        """Connected to one of `servers` (reconnecting for ever once it is),
        or TimeoutError after FIRST_CONNECT_TIMEOUT_S."""
        await probe(servers)
        notes = ConnectionNotes()
        nc = await asyncio.wait_for(nats.connect(
            servers, connect_timeout=CONNECT_TIMEOUT_S, reconnect_time_wait=RECONNECT_WAIT_S,
            max_reconnect_attempts=-1, allow_reconnect=True, name="scanpay",
            error_cb=notes.error, disconnected_cb=notes.disconnected,
            reconnected_cb=notes.reconnected), FIRST_CONNECT_TIMEOUT_S)
        notes.nc = nc
        stream = cls(nc, names)
        stream.notes = notes
        return stream

    @property
    def max_payload(self) -> int:
        return self.nc.max_payload

    async def close(self) -> None:
        self.notes.closing = True
        if not self.nc.is_closed:
            await self.nc.close()

    # -- settings -----------------------------------------------------------

    async def ensure(self, replicas: int, allow_unreplicated: bool) -> int:
        """The stream, created if missing (file storage, `replicas`
        replicas); refuses one with fewer replicas unless allow_unreplicated.
        Returns its replica count."""
        found: int = await until_ready(lambda: self._ensure_once(replicas, allow_unreplicated))
        return found

    async def _ensure_once(self, replicas: int, allow_unreplicated: bool) -> int:
        try:
            info = await self.js.stream_info(self.names.stream)
        except nats.js.errors.NotFoundError:
            info = await self._create(replicas, allow_unreplicated)
        have = info.config.num_replicas or 1
        if info.config.storage != StorageType.FILE:
            raise StreamSettingsError(
                f"stream {self.names.stream} keeps its messages in memory, not in files: "
                f"recreate it with file storage (or let scanpay create it)")
        if have < replicas and not allow_unreplicated:
            raise StreamSettingsError(
                f"stream {self.names.stream} has {have} replica(s), fewer than the {replicas} "
                f"configured: a lost NATS node could lose acknowledged payments; raise its "
                f"replicas (nats stream edit {self.names.stream} --replicas {replicas}) or "
                f"start with --allow-unreplicated")
        if have < replicas:
            log.warning("UNREPLICATED: stream %s has %d replica(s), fewer than the %d "
                        "configured (--allow-unreplicated)", self.names.stream, have, replicas)
        return have

    async def _create(self, replicas: int, allow_unreplicated: bool):
        config = StreamConfig(
            name=self.names.stream, subjects=[self.names.subject], storage=StorageType.FILE,
            num_replicas=replicas, retention=RetentionPolicy.LIMITS,
            discard=DiscardPolicy.NEW, allow_direct=True, duplicate_window=DUPLICATE_WINDOW_S,
            max_msg_size=self.max_payload, deny_delete=False, deny_purge=False)
        try:
            return await self.js.add_stream(config)
        except nats.js.errors.APIError as error:
            if PLACEMENT_PENDING in (error.description or ""):
                raise nats.js.errors.ServiceUnavailableError(description=error.description)
            if not allow_unreplicated or replicas == 1:
                raise StreamSettingsError(
                    f"cannot create stream {self.names.stream} with {replicas} replicas "
                    f"({error.description}): the NATS cluster needs at least {replicas} "
                    f"JetStream servers; add them, or start with --allow-unreplicated") from None
            log.warning("UNREPLICATED: cannot create stream %s with %d replicas (%s); "
                        "creating it with 1 (--allow-unreplicated)", self.names.stream,
                        replicas, error.description)
            return await self.js.add_stream(config, num_replicas=1)

    # -- appends and reads --------------------------------------------------

    async def append(self, payload: bytes, expected: int, msg_id: str, last_command: int,
                     kind: str | None, timeout_s: float,
                     message_format: int = FORMAT_ENTRIES) -> int:
        """Append one message if the stream's last sequence is `expected`;
        its stream sequence. Raises Refused when it is not; any other error
        (a timeout: stored or not) leaves the outcome unknown."""
        headers = {EXPECTED_LAST_SEQUENCE: str(expected), MSG_ID: msg_id,
                   HEADER_LAST: str(last_command)}
        if kind is not None:
            headers[HEADER_KIND] = kind
        if message_format != FORMAT_ENTRIES:
            headers[HEADER_FORMAT] = str(message_format)
        try:
            ack = await self.js.publish(self.names.subject, payload, timeout=timeout_s,
                                        headers=headers)
        except nats.js.errors.APIError as error:
            if error.err_code == ERR_WRONG_LAST_SEQUENCE:
                raise Refused(error.description) from None
            raise
        if ack.seq != expected + 1:     # a duplicate of our own earlier append
            raise Refused(f"the stream holds this append at {ack.seq}, not at {expected + 1}")
        return ack.seq

    async def announce(self, seq: int) -> None:
        """The tip hint (nats-py only buffers it): its loss delays followers
        by one poll at most."""
        try:
            await self.nc.publish(self.names.tip, str(seq).encode())
        except nats.errors.Error:
            pass

    async def last_seq(self, timeout_s: float = API_TIMEOUT_S) -> int:
        """The stream's last sequence, from its leader. JetStream does not
        answer this request while the stream has no leader (not even with
        an error): a request sent then times out, however soon a leader is
        elected; a takeover asks with a short `timeout_s` and asks again."""
        info = await asyncio.wait_for(self.js.stream_info(self.names.stream), timeout_s)
        return info.state.last_seq

    async def first_seq(self) -> int:
        info = await self.js.stream_info(self.names.stream)
        return info.state.first_seq

    async def purge_before(self, seq: int) -> None:
        """Remove the messages before `seq` (JetStream's purge keeps `seq`
        and what follows)."""
        await self.js.purge_stream(self.names.stream, seq=seq)

    async def get(self, seq: int) -> Message | None:
        """The message at `seq` (None: there is none)."""
        try:
            raw = await self.js.get_msg(self.names.stream, seq=seq)
        except nats.js.errors.NotFoundError:
            return None
        return Message(raw.seq, dict(raw.headers or {}), raw.data or b"")

    async def fetch(self, after: int, messages_max: int = FETCH_MESSAGES_MAX,
                    bytes_max: int = FETCH_BYTES_MAX, timeout_s: float = API_TIMEOUT_S
                    ) -> list[Message]:
        """The messages after stream seq `after`, in order, as many as one
        batched direct get returns (none: nothing there yet on the replica
        that answered). A deleted message is simply absent: the caller sees
        the gap in the sequences."""
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox, max_msgs=messages_max + 1)
        try:
            request = {"seq": after + 1, "batch": messages_max, "max_bytes": bytes_max}
            await self.nc.publish(f"$JS.API.DIRECT.GET.{self.names.stream}",
                                  json.dumps(request).encode(), reply=inbox)
            found = []
            for _ in range(messages_max + 1):
                msg = await sub.next_msg(timeout_s)
                headers = dict(msg.headers or {})
                status = headers.get("Status")
                if status in ("204", "404"):        # end of batch; nothing there
                    break
                if status is not None:
                    raise nats.js.errors.APIError(description=f"direct get: status {status} "
                                                              f"{headers.get('Description')}")
                found.append(Message(int(headers["Nats-Sequence"]), headers, msg.data))
            return found
        finally:
            await sub.unsubscribe()

# What a starting cluster answers while it elects its JetStream meta leader
# (or has just lost it): retried until READY_TIMEOUT_S.
NOT_READY_ERRORS = (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError,
                    nats.errors.NoRespondersError)


async def until_ready(attempt):
    """`await attempt()` again while the NATS cluster is not ready, until
    READY_TIMEOUT_S: while it elects its JetStream meta leader (an API call
    times out, no responders, unavailable) or has not seen every peer yet
    (a StreamSettingsError naming PLACEMENT_PENDING). A node's start waits
    this way for each JetStream call it makes before it serves: finding or
    creating the stream, the lease bucket and the snapshot bucket, and
    reading the stored snapshots and the stream's first message. An attempt
    that timed out after the server acted is safe to repeat: each one looks
    for what exists first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT_S
    while True:
        try:
            return await attempt()
        except NOT_READY_ERRORS as error:
            if loop.time() > deadline:
                why = getattr(error, "description", None) or type(error).__name__
                raise StreamSettingsError(
                    f"the NATS cluster's JetStream was not ready within "
                    f"{READY_TIMEOUT_S:.0f} s ({why}): check that the servers run with "
                    f"JetStream enabled and see each other") from None
        except StreamSettingsError as error:
            if PLACEMENT_PENDING not in str(error) or loop.time() > deadline:
                raise
        await asyncio.sleep(READY_POLL_S)
