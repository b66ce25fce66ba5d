"""The journal of a replicated engine: a JetStream stream in place of local
segment files (docs/replication.md).

`StreamLog` has the journal's interface as engine/storage/durability.py and
engine/core/engine.py use it (append, sync, read, last_seq, durable_seq,
failed, recover), so group commit, replay and the fail-stop rebuild work
unchanged:

- `append` (the writer's thread) frames a command as a journal entry (the
  journal's CRC32C framing and sequence number, engine/storage/journal.py)
  into memory; only the leader may append (else NotLeader: nothing applied).
- `sync` (the group-commit thread) sends everything appended since the last
  one as one message (split only above the server's max_payload), with
  Nats-Expected-Last-Sequence = the last stream sequence this node holds, and
  returns once the stream has acknowledged it: a quorum of NATS nodes has it
  on disk. An append the stream refuses (another writer appended first) drops
  every pending entry, answers them `not_leader` (nothing of them is in the
  stream) and marks the log refused: the engine then rebuilds its state from
  its snapshot and the stream (`prepare_reload`), as after a storage failure.
  An append whose outcome is unknown (a timeout, a lost connection) is sent
  again, same message id, until the stream answers: JetStream recognises a
  stored one as a duplicate, so nothing is acknowledged twice or guessed.
- `read` (replay) and `decode` + `advance` (a follower) take the stream's
  messages in order and check them: no gap in the stream sequences, every
  entry's CRC, the command sequence continuous across messages.

Each message carries the last command seq it brings the stream to
(Scanpay-Last), so any message tells the command seq there; snapshots record
the stream seq they include (`snapshot_meta`), so a restart reads the stream
from there.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import secrets
import threading
import time

import nats.errors
import nats.js.errors

from engine.core.command import decode as decode_command
from engine.protocol.errors import NotLeader, Unavailable
from engine.replication import packing
from engine.replication.loop_thread import LoopThread
from engine.replication.stream import Message, Refused, Stream
from engine.storage import snapshot as snapshots
from engine.storage.journal import (ENTRY_BYTES_MAX_DEFAULT, LOCK_NAME, JournalError,
                                    _encode_entry, _walk)

log = logging.getLogger("scanpay.replication")

# Room for a message's headers within the server's max_payload.
HEADERS_BYTES_MAX = 1024
PUBLISH_TIMEOUT_S = 2.0             # one publish; then it is sent again (same msg id)
# An append whose outcome is unknown is sent again this many times, waiting
# up to APPEND_RETRY_WAIT_MAX_S between tries (about an hour in all), before
# the node gives up and stops: it can neither acknowledge nor refuse the batch.
APPEND_TRIES_MAX = 4000
APPEND_RETRY_WAIT_MAX_S = 1.0
# A replica that answers a read may lag its leader: a read of messages the
# leader reported is retried this many times, READ_LAG_WAIT_S apart.
READ_LAG_TRIES_MAX = 400
READ_LAG_WAIT_S = 0.025
CALL_MARGIN_S = 2.0                 # beyond a coroutine's own timeout, for the thread hop
ADVICE_CORRUPT = (
    "the replicated stream does not hold what this node expects; the node stops rather "
    "than apply it: compare `nats stream info` on every NATS server, and restore the "
    "stream (or this node's data directory) before starting it again")


class StreamCorrupt(JournalError):
    """The stream breaks Scanpay's own checks: a gap, a bad CRC, a command
    sequence out of order, a message that is not ours."""

    def __init__(self, stream_seq: int, detail: str):
        super().__init__(f"stream message {stream_seq}: {detail}; {ADVICE_CORRUPT}")
        self.stream_seq = stream_seq
        self.detail = detail


class StreamTrimmed(JournalError):
    """The messages this node needs next were purged (the stream is trimmed
    below the oldest snapshot in the object store): it must start again from
    a snapshot of the store."""

    def __init__(self, after: int, first: int):
        super().__init__(
            f"this node's state ends at stream message {after}, but the stream was trimmed "
            f"and starts at {first}: restart the node; at start it loads the newest snapshot "
            f"from the object store (docs/replication.md, \"Snapshots in the store\")")


class StreamUnavailable(JournalError):
    """NATS did not answer a read in time (retried by the engine's rebuild)."""


@dataclasses.dataclass
class Decoded:
    """Messages checked and decoded, ready to apply (`StreamLog.advance`)."""
    after: int                      # the stream seq they follow
    stream_seq: int                 # the last one's
    last_seq: int                   # command seq after them
    commands: list                  # (seq, Command)
    records: list                   # (stream seq, kind, body dict)


def lock_data_dir(path: str) -> int:
    """The data directory's lock (the journal's lock file): one process per directory."""
    os.makedirs(path, exist_ok=True)
    fd = os.open(os.path.join(path, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise JournalError(f"journal {path} is open in another process (or another "
                           f"Journal object): close that one first") from None
    return fd


def message_entries(message: Message, expected: int, entry_bytes_max: int):
    """The (seq, payload) of the command entries of one message, checked:
    every entry's CRC, seqs from `expected` on, the whole payload used, and
    the message's Scanpay-Last header agreeing. Raises StreamCorrupt."""
    last = message.last_command
    if last < 0:
        raise StreamCorrupt(message.seq, "not a Scanpay message (no Scanpay-Last header)")
    if message.kind is not None:
        if last != expected - 1 or message.data[:1] != b"{":
            raise StreamCorrupt(message.seq, f"a {message.kind} record at command {last}, "
                                             f"expected {expected - 1}")
        return []
    mv = memoryview(message_payload(message))
    stop: list = []
    found = []
    end = 0
    for seq, start, payload_end, offset_next in _walk(mv, 0, expected, entry_bytes_max, stop):
        found.append((seq, mv[start:payload_end]))
        end = offset_next
    if stop or end != len(mv) or not found:
        detail = stop[0][1] if stop else (f"{len(mv) - end} bytes after the last entry"
                                          if found else "no entry")
        raise StreamCorrupt(message.seq, f"{detail} (expected command seq {expected})")
    if found[-1][0] != last:
        raise StreamCorrupt(message.seq, f"entries end at command {found[-1][0]}, its "
                                         f"header says {last}")
    return found


def message_payload(message: Message):
    """A command message's journal entries, unpacked as its format says.
    Raises StreamCorrupt (an unknown format: written by a newer node)."""
    message_format = message.format
    if message_format == packing.FORMAT_ENTRIES:
        return message.data
    if message_format != packing.FORMAT_PLANES:
        named = message.headers.get(packing.HEADER_FORMAT)
        raise StreamCorrupt(message.seq, f"message format {named!r} is unknown to this node "
                                         f"(it reads formats "
                                         f"{', '.join(map(str, packing.FORMATS))}): a newer "
                                         f"Scanpay wrote it; upgrade this node")
    try:
        return packing.unpack(message.data)
    except packing.PackingError as error:
        raise StreamCorrupt(message.seq, f"a packed message that does not unpack "
                                         f"({error})") from None


class StreamLog:
    """The journal interface over one shard's stream. See the module docstring."""

    replicated = True

    def __init__(self, path: str, loop: LoopThread, stream: Stream, *,
                 publish_timeout_s: float = PUBLISH_TIMEOUT_S,
                 entry_bytes_max: int = ENTRY_BYTES_MAX_DEFAULT,
                 message_format: int = packing.FORMAT_PLANES):
        if message_format not in packing.FORMATS:
            raise ValueError(f"stream message format {message_format}: expected one of "
                             f"{packing.FORMATS}")
        self._dir = str(path)
        self.message_format = message_format    # of the command messages it appends
        self.loop = loop
        self.stream = stream
        self.publish_timeout_s = publish_timeout_s
        self.entry_bytes_max = entry_bytes_max
        # Messages are cut by their unpacked size: a packed one is at most
        # one block header bigger (packing.pack), within the headers' room.
        self.message_bytes_max = stream.max_payload - HEADERS_BYTES_MAX
        self._lock = threading.Lock()       # the fields below, against the sync thread
        self._io_lock = threading.RLock()   # one append round (or reload) at a time
        self._pending: list = []            # (seq, entry buffers, bytes), not in the stream yet
        self._last_seq = 0
        self._durable_seq = 0
        self.stream_seq = 0                 # the stream seq the durable prefix ends at
        self._refused: str | None = None    # an append was refused: rebuild before anything
        self._stalled = False               # an append's outcome is being found out
        self.token: str | None = None       # while leading: the writer's token (message ids)
        self.leader = ""                    # the leader's client address, for not_leader
        self.on_deposed = None              # called (sync thread) when an append is refused
        self.on_appended = None             # called (sync thread) after each acknowledged message
        self.on_fatal = None                # called when no outcome can be found; must not return
        self.on_snapshot = None             # called (writer thread) after a local snapshot is done
        self.closing = False                # the server stops: an unanswered append stops it
        self.fsync_count = 0                # messages appended (the journal's fsyncs)
        self.dropped_count = 0
        self._lock_fd: int | None = lock_data_dir(self._dir)
        try:
            self.refresh()
        except BaseException:
            self.close()
            raise

    # -- the journal's interface --------------------------------------------

    @property
    def last_seq(self) -> int:
        return self._last_seq

    @property
    def durable_seq(self) -> int:
        return self._durable_seq

    @property
    def failed(self) -> bool:
        """This node may not append now (a follower, or a refused leader)."""
        return self.token is None or self._refused is not None

    @property
    def first_seq(self) -> int:
        return 1

    @property
    def dir(self) -> str:
        return self._dir

    def not_leader(self) -> NotLeader:
        if self.leader:
            return NotLeader(f"this node is a follower; the leader is at {self.leader}")
        return NotLeader("this node is a follower and no leader is known yet (one is being "
                         "elected); retry shortly")

    def recover(self) -> int:
        """Before a write (Storage.before_write): only the leader writes."""
        if self.failed:
            raise self.not_leader()
        return self._durable_seq

    def append(self, payload: bytes) -> int:
        if type(payload) is not bytes:
            payload = bytes(payload)
        if len(payload) > min(self.entry_bytes_max, self.message_bytes_max - 64):
            raise Unavailable(f"a command of {len(payload)} bytes does not fit in one stream "
                              f"message (max_payload {self.stream.max_payload}); nothing applied")
        with self._lock:
            if self.failed:
                raise self.not_leader()
            if self._stalled:
                raise Unavailable("the replicated stream does not answer (see the server "
                                  "log); nothing applied; retry later")
            seq = self._last_seq + 1
            frame, frame_bytes = _encode_entry(seq, payload)
            self._pending.append((seq, frame, frame_bytes))
            self._last_seq = seq
        return seq

    def sync(self) -> int:
        """Everything appended so far into the stream; the durable seq."""
        with self._io_lock:
            with self._lock:
                if self._refused is not None:
                    raise self.not_leader()
                batch = list(self._pending)
            stored = False
            for first, last, frames in self._messages(batch):
                if self._refused is not None:       # (a checkpoint record was refused)
                    raise self.not_leader()
                try:
                    self._append_commands(first, last, frames)
                except NotLeader:
                    if stored:          # one future covers stored and refused commands
                        self._fatal(f"commands up to {first - 1} are in the stream, those "
                                    f"after were refused, and one reply covers both")
                    raise
                stored = True
            return self._durable_seq

    def _messages(self, batch: list):
        """The pending entries cut into messages of at most message_bytes_max
        (unpacked): (first seq, last seq, the entries' frames)."""
        frames, size, first = [], 0, None
        for seq, frame, frame_bytes in batch:
            if frames and size + frame_bytes > self.message_bytes_max:
                yield first, seq - 1, frames
                frames, size, first = [], 0, None
            first = seq if first is None else first
            frames.append(frame)
            size += frame_bytes
        if frames:
            yield first, batch[-1][0], frames

    def _append_commands(self, first: int, last: int, frames: list) -> None:
        token = self.token
        if self.message_format == packing.FORMAT_PLANES:
            payload = packing.pack(frames)
        else:
            payload = b"".join(part for frame in frames for part in frame)
        if token is None:                   # deposed meanwhile: fenced all the same
            token = "none"
        try:
            stream_seq = self._append(payload, f"{token}.{first}", last, None,
                                      self.message_format)
        except Refused as refusal:
            self.refuse(f"the stream refused an append after message {self.stream_seq} "
                        f"({refusal})")
            raise self.not_leader() from None
        with self._lock:
            done = 0
            while done < len(self._pending) and self._pending[done][0] <= last:
                done += 1
            del self._pending[:done]
            self._durable_seq = last
            self.stream_seq = stream_seq
            self.fsync_count += 1
        if self.on_appended is not None:
            self.on_appended(stream_seq, last)

    def _append(self, payload: bytes, msg_id: str, last: int, kind: str | None,
                message_format: int = packing.FORMAT_ENTRIES) -> int:
        """One message into the stream after self.stream_seq; its stream seq.
        Raises Refused if another writer's message is there; an unknown
        outcome (no answer) is sent again, same message id."""
        expected = self.stream_seq
        wait_s = 0.01
        for _ in range(APPEND_TRIES_MAX):
            try:
                seq = self.loop.call(
                    self.stream.append(payload, expected, msg_id, last, kind,
                                       self.publish_timeout_s, message_format),
                    self.publish_timeout_s + CALL_MARGIN_S)
                self._stalled = False
                return seq
            except Refused:
                self._stalled = False
                if self._stored_as(expected + 1, msg_id):
                    return expected + 1
                raise
            except (TimeoutError, nats.errors.Error, nats.js.errors.Error, OSError) as error:
                if self.closing:
                    self._fatal(f"stopping while the append of commands up to {last} has no "
                                f"answer from the stream: its replies are not sent")
                if not self._stalled:
                    log.error("appending to the replicated stream: no answer (%s: %s); "
                              "sending it again until the stream answers (new writes get "
                              "unavailable meanwhile)", type(error).__name__, error)
                self._stalled = True
                time.sleep(wait_s)
                wait_s = min(wait_s * 2, APPEND_RETRY_WAIT_MAX_S)
        self._fatal(f"the replicated stream did not answer an append of commands up to "
                    f"{last} in {APPEND_TRIES_MAX} tries: its outcome is unknown")

    def _stored_as(self, seq: int, msg_id: str) -> bool:
        """Does the stream hold our message (by its id) at `seq`? A refusal of
        a message sent again may only mean that the first copy was stored
        (and its duplicate window passed)."""
        for _ in range(READ_LAG_TRIES_MAX):
            try:
                found = self.loop.call(self.stream.get(seq), self.publish_timeout_s + CALL_MARGIN_S)
                return found is not None and found.headers.get("Nats-Msg-Id") == msg_id
            except (TimeoutError, nats.errors.Error, nats.js.errors.Error, OSError):
                time.sleep(READ_LAG_WAIT_S)
        self._fatal(f"cannot read stream message {seq} to learn whether an append was stored")

    def refuse(self, why: str) -> None:
        """Another writer appended: drop the pending commands (answered
        not_leader) and refuse everything until the state is rebuilt."""
        with self._lock:
            dropped = len(self._pending)
            self.dropped_count += dropped
            first = self._durable_seq + 1
            self._pending.clear()
            self._last_seq = self._durable_seq
            self._refused = why
            self.token = None
            self.leader = ""
            self._stalled = False
        log.warning("deposed: %s; commands %d..%d were not stored and are answered "
                    "not_leader; rebuilding from the snapshot and the stream, as a follower",
                    why, first, first + dropped - 1)
        if self.on_deposed is not None:
            self.on_deposed()

    def _fatal(self, why: str):
        """No outcome can be learnt: stop (on_fatal logs the one line and exits)."""
        why = f"{why}; a restarted node reads the outcome from the stream"
        if self.on_fatal is not None:
            self.on_fatal(why)
        log.critical("%s", why)
        raise SystemExit(why)

    # -- records (term, checkpoint) ------------------------------------------

    def append_record(self, kind: str, body: dict, token: str) -> int:
        """A record message after the current stream seq (from the leader's
        append round, or a new leader's first); its stream seq. Raises
        Refused (nothing dropped: a record has no command behind it)."""
        with self._io_lock:
            expected = self.stream_seq
            payload = json.dumps(body, sort_keys=True).encode()
            seq = self._append(payload, f"{token}.{kind}.{expected}", self._durable_seq, kind)
            self.stream_seq = seq
            return seq

    def lead(self, token: str) -> None:
        """This node leads from now on: its appends carry `token`."""
        with self._lock:
            assert self._refused is None and not self._pending
            self.token = token

    def step_down(self) -> None:
        """The lease is lost: refuse new appends (pending ones go on, fenced)."""
        with self._lock:
            self.token = None
            self.leader = ""                # not us any more; the lease watch names the next

    @property
    def stalled(self) -> bool:
        """An append's outcome is being found out (NATS does not answer)."""
        return self._stalled

    @property
    def append_round(self):
        """The lock held for an append round (sync): one at a time."""
        return self._io_lock

    @property
    def idle(self) -> bool:
        """No append pending: the node may read the stream as a follower."""
        return not self._pending

    def settle(self) -> None:
        """The engine's state is current again (rebuilt, or nothing was
        dropped): a refusal is over, the node reads on as a follower."""
        with self._lock:
            if not self._pending:
                self._refused = None

    @staticmethod
    def new_token() -> str:
        return secrets.token_hex(8)

    # -- positions -----------------------------------------------------------

    def refresh(self) -> None:
        """The durable prefix is the stream as it is now (at open, and before
        a rebuild after a refused append)."""
        last = self.loop.call(self.stream.last_seq(), self.publish_timeout_s + CALL_MARGIN_S)
        last_command = 0
        if last:
            message = self._get(last)
            last_command = message.last_command
            if last_command < 0:
                raise StreamCorrupt(last, "not a Scanpay message (no Scanpay-Last header)")
        with self._lock:
            self._pending.clear()
            self._last_seq = self._durable_seq = last_command
            self.stream_seq = last

    def _get(self, seq: int) -> Message:
        for _ in range(READ_LAG_TRIES_MAX):
            message = self.loop.call(self.stream.get(seq), self.publish_timeout_s + CALL_MARGIN_S)
            if message is not None:
                return message
            time.sleep(READ_LAG_WAIT_S)
        raise StreamCorrupt(seq, "the stream reports it but it cannot be read")

    def prepare_reload(self) -> None:
        """Before the engine rebuilds its state (Storage.prepare_reload): forget
        the refused appends and take the stream as it is now."""
        with self._io_lock:
            try:
                self.refresh()
            except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as error:
                raise StreamUnavailable(f"NATS did not answer: {error}") from None
            with self._lock:
                self._refused = None

    def snapshot_meta(self, seq: int) -> dict:
        """What a snapshot at command `seq` records: where it stands in the stream."""
        assert seq == self._durable_seq, "snapshot of commands not in the stream"
        return {"replication": {"stream_seq": self.stream_seq, "seq": seq}}

    def position_of(self, seq: int) -> int:
        """The stream seq at which the stream holds commands up to `seq`."""
        if seq == self._durable_seq:
            return self.stream_seq
        if seq == 0:
            return 0
        path = os.path.join(self._dir, snapshots.snapshot_name(seq))
        try:
            meta = snapshots.load_meta(path)
            return int(meta["replication"]["stream_seq"])
        except (OSError, snapshots.SnapshotCorrupt, KeyError, TypeError, ValueError) as error:
            raise JournalError(f"snapshot {seq} in {self._dir} does not say where it stands in "
                               f"the replicated stream ({error}): it was not written by a "
                               f"replicated node; move it aside to replay the stream from "
                               f"its start") from None

    # -- reads -----------------------------------------------------------------

    def read(self, from_seq: int = 1):
        """(seq, payload) of the commands from `from_seq` up to the durable
        prefix, checked (replay at start and after a refused append)."""
        cursor = self.position_of(from_seq - 1)
        end, expected = self.stream_seq, from_seq
        while cursor < end:
            messages = self._fetch_reported(cursor)
            self.check_not_trimmed(cursor, messages)
            decoded = self.decode(messages, cursor, expected, end)
            for seq, command in decoded.commands:
                yield seq, command
            cursor, expected = decoded.stream_seq, decoded.last_seq + 1

    def check_not_trimmed(self, after: int, messages: list) -> None:
        """A gap right after `after`: StreamTrimmed if a purge made it (the
        stream starts later), else decode reports the missing message."""
        if not messages or messages[0].seq == after + 1:
            return
        try:
            first = self.loop.call(self.stream.first_seq(),
                                   self.publish_timeout_s + CALL_MARGIN_S)
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as error:
            raise StreamUnavailable(f"NATS did not answer: {error}") from None
        if first > after + 1:
            raise StreamTrimmed(after, first)

    def _fetch_reported(self, after: int) -> list:
        """Messages after `after`, which the stream's leader reported: a
        replica that has none yet lags, and is asked again."""
        for _ in range(READ_LAG_TRIES_MAX):
            try:
                messages = self.loop.call(self.stream.fetch(after),
                                          self.publish_timeout_s + CALL_MARGIN_S)
            except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as error:
                raise StreamUnavailable(f"reading the stream after message {after}: "
                                        f"{error}") from None
            if messages:
                return messages
            time.sleep(READ_LAG_WAIT_S)
        raise StreamUnavailable(f"the stream reports messages after {after} but none could "
                                f"be read")

    def decode(self, messages: list, after: int, expected: int, end: int | None = None,
               commands_as: str = "payload") -> Decoded:
        """Check and decode consecutive messages after stream seq `after`,
        whose first command must be `expected` (those past `end` are left)."""
        commands, records = [], []
        cursor = after
        for message in messages:
            if end is not None and message.seq > end:
                break
            if message.seq != cursor + 1:
                raise StreamCorrupt(message.seq, f"message {cursor + 1} is missing (the "
                                                 f"stream has no message between {cursor} "
                                                 f"and {message.seq})")
            entries = message_entries(message, expected, self.entry_bytes_max)
            if message.kind is not None:
                records.append((message.seq, message.kind, self._record_body(message)))
            for seq, payload in entries:
                commands.append((seq, payload if commands_as == "payload"
                                 else decode_command(payload)))
            if entries:
                expected = entries[-1][0] + 1
            cursor = message.seq
        return Decoded(after, cursor, expected - 1, commands, records)

    @staticmethod
    def _record_body(message: Message) -> dict:
        try:
            body = json.loads(message.data)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise StreamCorrupt(message.seq, f"a {message.kind} record that is not a JSON map")
        return body

    def advance(self, decoded: Decoded) -> bool:
        """A follower applies `decoded`: the durable prefix ends after it.
        False (nothing changed) if the log moved since it was read (a record
        of the last append round landed meanwhile): read again."""
        with self._io_lock, self._lock:
            if self._pending or decoded.after != self.stream_seq:
                return False
            self._last_seq = self._durable_seq = decoded.last_seq
            self.stream_seq = decoded.stream_seq
            return True

    # -- retention and close ----------------------------------------------------

    def remove_segments_before(self, seq: int) -> list:
        """Snapshot retention, after a local snapshot: nothing is removed
        here; the node publishes the snapshot to the object store, and only
        the store's retention trims the stream (docs/replication.md)."""
        if self.on_snapshot is not None:
            self.on_snapshot()
        return []

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

