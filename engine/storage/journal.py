"""Append-only journal: checksummed, sequence-numbered entries in segment files.

The journal knows nothing of payments: an entry is opaque bytes. Entry
sequence numbers start at 1 and are contiguous across segments. The byte
layout and the recovery rules are in docs/storage-format.md.

Durability contract: `durable_seq` only ever names entries that were written
and fdatasync'ed (and whose segment's directory entry was fsync'ed). Nothing
else is ever reported durable, even after a storage failure.

Fail-stop: when a write or fdatasync fails, every entry after `durable_seq`
is dropped (the caller answers its command `unavailable`) and the files are
cut back to the durable prefix; the journal refuses appends until
`recover()` finds the storage working, and then goes on from `durable_seq +
1`. A dropped entry is never written again: after a failed fsync the caller
has already been told it failed (docs/operations-durability.md).

Threading: `append` runs on the caller's thread (the event loop) and only
encodes into memory. Writing and fsync happen in `sync`, which the engine's
group commit (`Engine._request_sync`, engine/core/engine.py) calls on its sync
thread, one fdatasync for every command journaled meanwhile; or, for a lone
request on an idle journal, in a write planned by `lone_write` that the
server's lone-sync thread makes without the GIL (engine/server/lone_sync.py),
its outcome given back to `lone_written`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno as errno_module
import fcntl
import logging
import os
import re
import struct
import threading
import time
from typing import Callable, Iterator

import crc32c
import numpy as np

log = logging.getLogger(__name__)

SEGMENT_MAGIC = b"SCNPJRNL"
SEGMENT_VERSION = 1
# magic, version, header_bytes, first_seq, flags, crc32c over bytes [0, 28).
# `flags` was "reserved, 0" before the manifest existed; readers of either
# kind ignore it, so the segment format stays version 1 both ways.
SEGMENT_HEADER = struct.Struct("<8sIIQII")
# The segment was written by a journal that keeps journal.manifest: a
# directory with such a segment and no manifest has lost its manifest.
SEGMENT_FLAG_MANIFEST = 1
SEGMENT_HEADER_BYTES = SEGMENT_HEADER.size
# crc32c over bytes [4, entry end incl. padding), payload_bytes, seq.
ENTRY_HEADER = struct.Struct("<IIQ")
ENTRY_HEADER_BYTES = ENTRY_HEADER.size
ENTRY_ALIGN_BYTES = 8

SEGMENT_BYTES_MAX_DEFAULT = 64 * 1024 * 1024
ENTRY_BYTES_MAX_DEFAULT = 64 * 1024 * 1024
SEQ_MAX = 2**64 - 1

# Payloads up to this size are copied into one buffer with their header: one
# iovec instead of three. Larger ones are written from the caller's bytes.
ENTRY_INLINE_BYTES_MAX = 4096
IOV_MAX = 1024

SEGMENT_NAME = re.compile(r"^journal-(\d{20})\.seg$")
LOCK_NAME = "journal.lock"
# The durable high-water mark (docs/storage-format.md, "Manifest"): rewritten
# (tmp, fsync, rename, dir fsync) at open, at the first commit after a
# segment roll, at retention and at close.
MANIFEST_NAME = "journal.manifest"
MANIFEST_MAGIC = b"SCNPMNFT"
MANIFEST_VERSION = 1
# magic, version, bytes, first_seq, segment_seq, durable_seq, reserved, crc
# over bytes [0, 44).
MANIFEST = struct.Struct("<8sIIQQQII")
# Torn tails are moved here (never deleted): <segment>.<offset>.torn
QUARANTINE_DIR = "quarantine"
QUARANTINE_COPIES_MAX = 1000        # name suffixes tried for one torn tail
# Entries are written in sectors: an unwritten sector of a torn write still
# holds what was there before (zeros: preallocated or past the old EOF).
SECTOR_BYTES = 512
# The next segment, zero-filled ahead of time (`prealloc`); renamed into
# place when the active segment is full.
SPARE_NAME = "journal-spare.tmp"
# Zero-filling must not crowd out the journal's own fsyncs: each chunk's
# writeback holds the device while an fsync waits behind it. Measured on the
# project VM (8 KiB fdatasyncs meanwhile): p99 0.45 ms alone, 2.1-4.4 ms
# beside 1 MiB chunks at 32-128 MB/s, 0.5-1.2 ms beside 128 KiB chunks at
# 32 MB/s. A 64 MiB segment is ready in 2 s: enough for a journal written at
# up to ~30 MB/s (200k small payments a second); faster ones append.
SPARE_CHUNK_BYTES = 128 << 10
SPARE_BYTES_PER_S_MAX = 32 << 20
# A spare is only made while the disk holds this many segments more: the
# spare must never take the last room the journal itself needs.
SPARE_FREE_SEGMENTS_MIN = 2
# The next spare is zero-filled once the active (preallocated) segment is
# this full, not as soon as the last spare was taken: the fill's writeback
# delays every fsync that runs meanwhile (p99 0.5-1.2 ms instead of 0.45,
# above), and a server starts by taking its first spare, so filling the
# next one at once put 2 s of slower fsyncs right after every start. Ahead
# of the active segment's end by three quarters of it (48 MiB), a fill
# paced at 32 MB/s is ready in time for a journal written at up to 24 MB/s.
SPARE_AHEAD_FRACTION = 0.25

_ENTRY_REST = struct.Struct("<IQ")  # The checksummed part of the header.
_CRC = struct.Struct("<I")
_ZEROS = bytes(ENTRY_ALIGN_BYTES)
_PADDING = [_ZEROS[:-size % ENTRY_ALIGN_BYTES] for size in range(ENTRY_ALIGN_BYTES)]

assert SEGMENT_HEADER_BYTES == 32
assert MANIFEST.size == 48
assert ENTRY_HEADER_BYTES == 16
assert SEGMENT_HEADER_BYTES % ENTRY_ALIGN_BYTES == 0

ADVICE_CORRUPT = (
    "the journal is damaged before its tail, so entries that were acknowledged "
    "as durable may be affected; do not start the engine on it: run "
    "`scanpay journal verify <dir>` to see every problem, then restore the "
    "journal directory from a backup or a replica"
)
ADVICE_UNAVAILABLE = (
    "fix the storage (free space on a full disk, check the device and kernel "
    "log for I/O errors); the engine retries it (Journal.recover()) and then "
    "accepts writes again, without restart; the entries that were not durable "
    "were dropped and answered unavailable, clients retry them"
)
# recover() writes and fdatasyncs this much into a scratch file before it
# accepts appends again: a disk with less room than about one full PAY batch
# entry (8,190 records, 655 KB) would fail the next write at once.
PROBE_NAME = "journal-probe.tmp"
PROBE_BYTES = 1 << 20
# The journal's own I/O waits this long for the outcome of a lone write that
# has returned (`lone_written` from the thread that took it: bookkeeping only).
LONE_SETTLE_S = 60


class JournalError(Exception):
    """Base class of the journal's errors."""


class JournalCorrupt(JournalError):
    """The on-disk journal is damaged somewhere other than a torn tail."""

    def __init__(self, file: str, offset: int, detail: str):
        super().__init__(f"journal corrupt: {file} at byte offset {offset}: "
                         f"{detail}; {ADVICE_CORRUPT}")
        self.file = file
        self.offset = offset
        self.detail = detail


class JournalUnavailable(JournalError):
    """Storage failed (EIO, ENOSPC, ...). Retryable after `Journal.recover()`."""

    retryable = True


@dataclasses.dataclass
class Problem:
    file: str
    offset: int
    kind: str  # "torn_tail" (open() truncates it) or "corrupt" (open() refuses).
    detail: str


@dataclasses.dataclass
class SegmentReport:
    file: str
    first_seq: int
    last_seq: int  # first_seq - 1 when the segment holds no entry.
    entries: int
    bytes: int  # File size.
    valid_bytes: int  # Bytes up to the end of the last valid entry.
    # Zeros after the last entry (space allocated ahead): with valid_bytes,
    # the whole file; 0 when the segment has a problem.
    zero_tail_bytes: int = 0

    @property
    def whole(self) -> bool:
        """Every byte is a valid entry or unused zero-filled space."""
        return self.valid_bytes + self.zero_tail_bytes == self.bytes


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The journal's durable high-water mark (journal.manifest)."""
    first_seq: int  # First seq the journal must still hold (retention removed older).
    segment_seq: int  # Newest segment whose header was durable (0: none yet).
    durable_seq: int  # Every entry up to here was reported durable.


@dataclasses.dataclass
class VerifyReport:
    dir: str
    segments: list[SegmentReport]
    problems: list[Problem]
    manifest: Manifest | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def corrupt(self) -> bool:
        return any(problem.kind == "corrupt" for problem in self.problems)

    @property
    def entries(self) -> int:
        return sum(segment.entries for segment in self.segments)


def segment_name(first_seq: int) -> str:
    return f"journal-{first_seq:020d}.seg"


def verify(dir: str, *, entry_bytes_max: int = ENTRY_BYTES_MAX_DEFAULT) -> VerifyReport:
    """Checks every segment and entry against each other and against the
    manifest's mark, by the same rules as `Journal.open`; modifies nothing."""
    examined = _examine(dir, entry_bytes_max)
    return VerifyReport(dir, examined.reports, examined.problems, examined.manifest)


@dataclasses.dataclass
class _Segment:
    first_seq: int
    path: str


@dataclasses.dataclass(eq=False)
class LoneWrite:
    """A sync that another thread makes (`Journal.lone_write`): `buffers`
    written at `offset` into `fd`, then an fdatasync of `fd`; `size` bytes,
    the journal's first `entries` pending entries, up to seq `target`."""
    fd: int
    buffers: list
    offset: int
    target: int
    size: int
    entries: int
    wait: Callable[[], object]      # returns once the write is done (its outcome taken)
    outcome: "int | JournalUnavailable | None" = None


class Journal:
    """An open journal directory. Use `Journal.open`."""

    def __init__(self, dir: str, fs, segment_bytes_max: int, entry_bytes_max: int):
        self._dir = dir
        self._fs = fs
        self._segment_bytes_max = segment_bytes_max
        self._entry_bytes_max = entry_bytes_max
        # Guards the fields below against the sync worker thread.
        self._lock = threading.Lock()
        # Held for the whole of any write/fsync/recover: one I/O at a time.
        self._io_lock = threading.RLock()
        self._segments: list[_Segment] = []
        self._last_seq = 0
        self._durable_seq = 0
        # Where the durable prefix ends: recover() truncates back to it.
        self._durable_segment_seq: int | None = None
        self._durable_bytes = 0
        # Entries not yet durable, in seq order: (seq, buffers, bytes). Kept
        # until their fdatasync succeeds; dropped when a write or fsync fails.
        self._pending: list[tuple[int, tuple, int]] = []
        self._fd: int | None = None  # Active (last) segment.
        self._active_bytes = 0
        self._write_at = 0  # Where the next write goes in the active segment.
        # Preallocation: segments are zero-filled ahead of time (the spare),
        # so that an fdatasync writes data blocks only, not the file's size
        # and extents through the filesystem's own journal.
        self._spare: "_Spare | None" = None
        self._active_preallocated = False
        self._dir_dirty = False  # A segment was created or removed since the last dir fsync.
        self._failure: str | None = None
        self._closed = False
        self._lock_fd: int | None = None
        # The last journal.manifest written (or read at open). Its own lock:
        # retention (engine thread) and the sync worker both rewrite it.
        self._manifest: Manifest | None = None
        self._manifest_lock = threading.Lock()
        # A write another thread makes now (`lone_write`), until its outcome is
        # taken; notified when it is (for a sync that waits for it).
        self._offload: LoneWrite | None = None
        self._offload_taken = threading.Condition(threading.Lock())
        self.fsync_count = 0  # fdatasync calls that covered new entries (observability).
        self.dropped_count = 0  # entries dropped by storage failures (observability).

    # ------------------------------------------------------------------ open

    @classmethod
    def open(cls, dir: str, *, segment_bytes_max: int = SEGMENT_BYTES_MAX_DEFAULT,
             entry_bytes_max: int = ENTRY_BYTES_MAX_DEFAULT, fs=None,
             prealloc: bool = False) -> "Journal":
        """Opens (or creates) the journal in `dir`, validating every entry.

        A torn tail of the last segment, after every entry ever reported
        durable, is moved to quarantine/ and cut off (logged); any other damage,
        and a journal that ends before its durable mark, raises JournalCorrupt. `fs` supplies the OS calls (default: `os`).
        `prealloc`: write into segments zero-filled ahead of time by a
        background thread (see `_Spare`); a server's fsyncs are then cheaper
        and steadier (docs/operations-durability.md).
        """
        assert 0 < entry_bytes_max < 2**32, entry_bytes_max
        assert segment_bytes_max >= SEGMENT_HEADER_BYTES + ENTRY_HEADER_BYTES, segment_bytes_max
        journal = cls(dir, fs if fs is not None else os, segment_bytes_max, entry_bytes_max)
        if not os.path.isdir(dir):
            os.makedirs(dir)
            _fsync_dir_os(os.path.dirname(os.path.abspath(dir)))
        journal._lock_dir()
        try:
            journal._load()
            journal._save_manifest()    # the mark: everything loaded is durable now
        except BaseException:
            journal._release_dir()
            raise
        if prealloc:
            journal._spare = _Spare(os.path.join(dir, SPARE_NAME), segment_bytes_max)
            journal._spare.start()
            journal._want_spare()
        return journal

    def _lock_dir(self) -> None:
        fd = os.open(os.path.join(self._dir, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JournalError(f"journal {self._dir} is open in another process "
                               f"(or another Journal object): close that one first") from None
        self._lock_fd = fd

    def _release_dir(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _load(self) -> None:
        examined = _examine(self._dir, self._entry_bytes_max)
        for problem in examined.problems:
            if problem.kind != "torn_tail":
                raise JournalCorrupt(problem.file, problem.offset, problem.detail)
        seq_next = None
        for (name_seq, path), scan in zip(examined.listing, examined.scans):
            if scan.problem is not None:
                assert path == examined.listing[-1][1], "a torn tail is only ever last"
                self._quarantine_tail(path, scan, name_seq + scan.entries)
                if scan.valid_bytes == 0:
                    # The segment's own header was torn: it never held a
                    # durable entry. Its name still says which seq comes next.
                    seq_next = name_seq
                    continue
            self._segments.append(_Segment(name_seq, path))
            seq_next = name_seq + scan.entries
            self._active_bytes = scan.valid_bytes
        self._last_seq = seq_next - 1 if seq_next is not None else 0
        self._manifest = examined.manifest
        with contextlib.suppress(FileNotFoundError):   # half made when the last process stopped
            os.unlink(os.path.join(self._dir, SPARE_NAME))
        if self._segments:
            active = self._segments[-1]
            self._fd = self._fs.open(active.path, os.O_WRONLY | os.O_CLOEXEC)
            self._write_at = self._active_bytes
            self._active_preallocated = os.fstat(self._fd).st_size > self._active_bytes
            # The previous process may have crashed with entries only in the page cache.
            self._fs.fdatasync(self._fd)
            self._durable_segment_seq = active.first_seq
            self._durable_bytes = self._active_bytes
        self._fsync_dir()
        self._durable_seq = self._last_seq

    def _quarantine_tail(self, path: str, scan: "_Scan", seq_first: int) -> None:
        """Copies a torn tail to quarantine/ (fsync'd), then cuts it off the
        segment (removes the segment if its header was torn): recovery
        deletes no byte that is not kept elsewhere."""
        mv = memoryview(_read_file(path))
        start = scan.valid_bytes
        end = _nonzero_end(mv, start)
        entries = _count_entries(mv[:end], start, seq_first)
        kept = "all of them zero, nothing to keep"
        if end > start:
            kept = "kept in " + _write_quarantine(
                self._dir, f"{os.path.basename(path)}.{start}.torn", mv[start:end])
        del mv
        log.warning("journal: torn tail in %s at byte offset %d: dropping %d bytes "
                    "(%d entries from seq %d on, never reported durable: %s); %s",
                    path, start, scan.file_bytes - start, entries, seq_first,
                    scan.problem.detail, kept)
        if start == 0:
            self._fs.unlink(path)
        else:
            fd = self._fs.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                self._fs.ftruncate(fd, start)
                self._fs.fdatasync(fd)
            finally:
                self._fs.close(fd)
        self._dir_dirty = True

    def _save_manifest(self) -> None:
        """Rewrites journal.manifest if the durable state moved past it."""
        with self._manifest_lock:
            with self._lock:
                first_seq = self._segments[0].first_seq if self._segments else self._last_seq + 1
                manifest = Manifest(first_seq, self._durable_segment_seq or 0, self._durable_seq)
            if manifest == self._manifest:
                return
            assert self._manifest is None or manifest.durable_seq >= self._manifest.durable_seq
            _write_manifest(self._dir, manifest)
            self._manifest = manifest

    # ---------------------------------------------------------------- append

    @property
    def last_seq(self) -> int:
        """Seq of the last appended entry (0 if none)."""
        return self._last_seq

    @property
    def durable_seq(self) -> int:
        """Highest seq known written and fdatasync'ed."""
        return self._durable_seq

    @property
    def first_seq(self) -> int:
        """Seq of the oldest entry still on disk (last_seq + 1 if none)."""
        with self._lock:
            if self._segments:
                return self._segments[0].first_seq
            return self._last_seq + 1

    @property
    def failed(self) -> bool:
        return self._failure is not None

    @property
    def dir(self) -> str:
        return self._dir

    def append(self, payload: bytes) -> int:
        """Queues one entry in memory and returns its seq. Durable after `sync`."""
        if type(payload) is not bytes:
            payload = bytes(payload)  # Also a copy the caller cannot mutate later.
        if len(payload) > self._entry_bytes_max:
            raise AssertionError(f"journal entry of {len(payload)} bytes exceeds "
                                 f"entry_bytes_max {self._entry_bytes_max}")
        with self._lock:
            if self._failure is not None:
                raise self._unavailable()
            assert not self._closed, "journal is closed"
            seq = self._last_seq + 1
            assert seq <= SEQ_MAX
            frame, frame_bytes = _encode_entry(seq, payload)
            self._pending.append((seq, frame, frame_bytes))
            self._last_seq = seq
        return seq

    # ------------------------------------------------------------------ sync

    def sync(self) -> int:
        """Writes and fdatasyncs everything appended so far; returns durable_seq."""
        return self._sync_io()

    def _sync_io(self) -> int:
        self._settle_offload()
        with self._io_lock:
            assert self._offload is None, "a lone write began during a sync"
            with self._lock:
                if self._failure is not None:
                    raise self._unavailable()
                assert not self._closed, "journal is closed"
                batch = list(self._pending)
                target = self._last_seq
            if target == self._durable_seq:
                assert not batch
                return target
            assert batch and batch[0][0] == self._durable_seq + 1 and batch[-1][0] == target
            try:
                self._write_batch(batch)
                self._fs.fdatasync(self._fd)
                if self._dir_dirty:
                    self._fsync_dir()
            except OSError as error:
                self._fail(error)
                self._cut_back()
                raise self._unavailable() from error
            with self._lock:
                assert self._pending[len(batch) - 1][0] == target
                del self._pending[:len(batch)]
                self._durable_seq = target
                self._durable_segment_seq = self._segments[-1].first_seq
                self._durable_bytes = self._active_bytes
                self.fsync_count += 1
            return target

    def _write_batch(self, batch: list) -> None:
        if self._manifest is not None and (self._durable_segment_seq or 0) != self._manifest.segment_seq:
            # The last roll is durable: from now on the mark says that
            # segment exists (so losing it is corruption, not an empty tail).
            self._save_manifest()
        buffers: list = []
        if (self._spare is not None and not self._active_preallocated and self._spare.ready()
                and self._active_bytes > SEGMENT_HEADER_BYTES):
            self._roll(batch[0][0])         # move to a preallocated segment as soon as one is ready
        for seq, frame, frame_bytes in batch:
            if self._fd is None or (self._active_bytes > SEGMENT_HEADER_BYTES and
                                    self._active_bytes + frame_bytes > self._segment_bytes_max):
                self._write_all(buffers)
                buffers = []
                self._roll(seq)
            buffers.extend(frame)
            self._active_bytes += frame_bytes
        self._write_all(buffers)
        self._want_spare()

    def _want_spare(self) -> None:
        """Start zero-filling the next spare once it is due: at once while the
        journal appends (no preallocated segment yet, or the last spare was
        not ready in time), else once the active segment is
        SPARE_AHEAD_FRACTION full."""
        if self._spare is None or self._spare.requested:
            return
        if (not self._active_preallocated
                or self._active_bytes >= self._segment_bytes_max * SPARE_AHEAD_FRACTION):
            self._spare.want()

    def _roll(self, first_seq: int) -> None:
        """Closes the active segment and starts one whose first entry is `first_seq`."""
        if self._fd is not None:
            # A closed segment is durable before its successor exists, so a torn
            # tail can only ever be in the last segment.
            self._fs.fdatasync(self._fd)
            self._fs.close(self._fd)
            self._fd = None
        path = os.path.join(self._dir, segment_name(first_seq))
        self._active_preallocated = self._spare is not None and self._spare.take(path)
        flags = os.O_WRONLY | os.O_CLOEXEC
        if not self._active_preallocated:
            flags |= os.O_CREAT | os.O_EXCL
        self._fd = self._fs.open(path, flags, 0o644)
        with self._lock:
            self._segments.append(_Segment(first_seq, path))
        self._dir_dirty = True
        self._active_bytes = SEGMENT_HEADER_BYTES
        self._write_at = 0
        self._write_all([_encode_segment_header(first_seq)])

    def _write_all(self, buffers: list) -> None:
        """writev until every byte is written (regular files may write short)."""
        done = 0
        while done < len(buffers):
            chunk = buffers[done:done + IOV_MAX]
            written = self._fs.pwritev(self._fd, chunk, self._write_at)
            if written <= 0:
                raise OSError(errno_module.EIO, "pwritev wrote no bytes")
            self._write_at += written
            for buffer in chunk:
                if written < len(buffer):
                    break
                written -= len(buffer)
                done += 1
            if written:
                buffers[done] = memoryview(buffers[done])[written:]

    def _fsync_dir(self) -> None:
        fd = self._fs.open(self._dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._fs.fsync(fd)
        finally:
            self._fs.close(fd)
        self._dir_dirty = False

    # ------------------------------------------------------- a lone write

    def lone_write(self, bytes_max: int, buffers_max: int, wait) -> "LoneWrite | None":
        """The entries not yet durable as one write that another thread
        makes: a pwritev of `buffers` at `offset` into `fd`, then an
        fdatasync of `fd` (the server's lone request, engine/server/lone_sync.py).
        Only when that is all their sync would do: the real `os` (no test
        `fs`), no roll, no directory or manifest to fsync, at most
        `bytes_max` in at most `buffers_max` buffers, and no other I/O
        running. None otherwise: `sync` as usual.

        Until its outcome is given to `lone_written`, the journal does no
        I/O of its own: `sync`, `recover` and `close` first call `wait()`
        (before they take the journal's I/O lock, which `lone_written`
        needs), and then wait until some thread has given that outcome."""
        if self._fs is not os or self._offload is not None:
            return None
        if not self._io_lock.acquire(blocking=False):
            return None                     # a sync is running
        try:
            with self._lock:
                if self._failure is not None or self._closed or not self._pending:
                    return None
                batch = list(self._pending)
            size = sum(frame_bytes for _seq, _frame, frame_bytes in batch)
            buffers = [buffer for _seq, frame, _bytes in batch for buffer in frame]
            if (self._fd is None or self._dir_dirty or size > bytes_max
                    or len(buffers) > buffers_max or self._roll_due(size)):
                return None
            write = LoneWrite(self._fd, buffers, self._write_at, batch[-1][0], size,
                              len(batch), wait)
            self._offload = write
            return write
        finally:
            self._io_lock.release()

    def _roll_due(self, size: int) -> bool:
        """Whether writing `size` bytes now would do more than write: roll
        to a new segment, or rewrite the manifest first (`_write_batch`)."""
        if self._manifest is not None and (self._durable_segment_seq or 0) != self._manifest.segment_seq:
            return True
        if (self._spare is not None and not self._active_preallocated and self._spare.ready()
                and self._active_bytes > SEGMENT_HEADER_BYTES):
            return True
        return self._active_bytes + size > self._segment_bytes_max

    def lone_written(self, write: "LoneWrite", error: int) -> int:
        """The outcome of a `lone_write` (0, or the errno its pwritev or
        fdatasync failed with): its entries are durable (returns
        durable_seq), or the journal fails as in `sync` (raises
        JournalUnavailable). Called again for the same write, the same answer."""
        if write.outcome is None:
            with self._io_lock:
                if write.outcome is None:
                    assert self._offload is write
                    write.outcome = self._lone_outcome(write, error)
                    with self._offload_taken:
                        self._offload = None
                        self._offload_taken.notify_all()
        if isinstance(write.outcome, JournalUnavailable):
            raise write.outcome
        return write.outcome

    def _lone_outcome(self, write: "LoneWrite", error: int) -> "int | JournalUnavailable":
        if error:
            self._fail(OSError(error, os.strerror(error)))
            self._cut_back()                # (a partial write is past the durable end)
            return self._unavailable()
        self._write_at += write.size
        self._active_bytes += write.size
        with self._lock:
            assert self._pending[write.entries - 1][0] == write.target
            del self._pending[:write.entries]
            self._durable_seq = write.target
            self._durable_segment_seq = self._segments[-1].first_seq
            self._durable_bytes = self._active_bytes
            self.fsync_count += 1
        self._want_spare()
        return write.target

    def _settle_offload(self) -> None:
        """Before the journal's own I/O (not under `_io_lock`): a lone write
        still out is waited for, until its outcome was given to
        `lone_written` (here, through `wait`, or by another thread)."""
        write = self._offload
        if write is not None:
            write.wait()
            with self._offload_taken:
                if not self._offload_taken.wait_for(lambda: self._offload is not write,
                                                    LONE_SETTLE_S):
                    raise JournalError(f"a lone write's outcome was not taken within "
                                       f"{LONE_SETTLE_S} s")

    # ------------------------------------------------------------- failures

    def _fail(self, error: OSError) -> None:
        """Fail-stop: refuse appends, and drop every entry after durable_seq
        (with those appended while the failed write ran): the caller answers
        their commands unavailable, so they must never be written later."""
        name = errno_module.errorcode.get(error.errno, str(error.errno))
        segment = self._segments[-1].path if self._segments else self._dir
        with self._lock:
            already = self._failure is not None
            self._failure = (f"journal storage failed ({name}: {error.strerror or error}) "
                             f"writing or syncing {segment}")
            dropped = (self._durable_seq + 1, self._last_seq)
            self.dropped_count += len(self._pending)
            self._pending.clear()
            self._last_seq = self._durable_seq
        if dropped[1] >= dropped[0]:
            log.error("%s; entries %d..%d were not durable: dropped (answered unavailable, "
                      "never written later); %s", self._failure, *dropped, ADVICE_UNAVAILABLE)
        elif already:                       # a retry (recover) that failed again
            log.warning("%s: still failing; writes stay refused", self._failure)
        else:
            log.error("%s; %s", self._failure, ADVICE_UNAVAILABLE)

    def _cut_back(self) -> None:
        """Right after a failure, cut the files back to the durable prefix, so
        that a dropped entry the page cache still holds cannot come back at
        the next start; if the storage refuses even that, recover() does it."""
        try:
            self._rewind_to_durable()
        except OSError as error:
            log.error("journal: could not cut %s back to entry %d yet (%s); retried before "
                      "writes resume", self._dir, self._durable_seq, error)

    def _unavailable(self) -> JournalUnavailable:
        return JournalUnavailable(
            f"{self._failure}; entries after seq {self._durable_seq} are not durable "
            f"and were dropped; {ADVICE_UNAVAILABLE}")

    def recover(self) -> int:
        """Retries after a storage failure: cuts the files back to the durable
        prefix, checks that the storage takes a write and an fdatasync again
        (`_probe`), then accepts appends from durable_seq + 1. The entries
        dropped at the failure are not rewritten. Returns durable_seq; raises
        JournalUnavailable (still failed) if the storage still fails."""
        self._settle_offload()
        with self._io_lock:
            if self._failure is None:
                return self._sync_io()
            assert not self._pending and self._last_seq == self._durable_seq
            try:
                self._rewind_to_durable()
                self._probe()
            except OSError as error:
                self._fail(error)
                raise self._unavailable() from error
            with self._lock:
                self._failure = None
            log.warning("journal: storage recovered; appending again after entry %d",
                        self._durable_seq)
            return self._durable_seq

    def _probe(self) -> None:
        """Write PROBE_BYTES to a scratch file, fdatasync, remove it: raises
        OSError while the storage would still fail the next write."""
        path = os.path.join(self._dir, PROBE_NAME)
        fd = self._fs.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            data = memoryview(bytes(PROBE_BYTES))
            offset = 0
            for _ in range(PROBE_BYTES):            # each write makes progress
                if offset == PROBE_BYTES:
                    break
                written = self._fs.pwritev(fd, [data[offset:]], offset)
                if written <= 0:
                    raise OSError(errno_module.EIO, "pwritev wrote no bytes")
                offset += written
            self._fs.fdatasync(fd)
        finally:
            self._fs.close(fd)
            self._fs.unlink(path)

    def _rewind_to_durable(self) -> None:
        """Truncates the journal on disk back to exactly its durable prefix."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                self._fs.close(fd)
            except OSError:
                pass  # The fd is gone either way; the data is rewritten below.
        with self._lock:
            keep = sum(1 for segment in self._segments
                       if self._durable_segment_seq is not None
                       and segment.first_seq <= self._durable_segment_seq)
            doomed = self._segments[keep:]
        for segment in doomed:
            try:
                self._fs.unlink(segment.path)
            except FileNotFoundError:
                pass
            with self._lock:
                self._segments.remove(segment)
            self._dir_dirty = True
        self._active_bytes = 0
        if self._segments:
            active = self._segments[-1]
            assert active.first_seq == self._durable_segment_seq
            fd = self._fs.open(active.path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                self._fs.ftruncate(fd, self._durable_bytes)
                self._fs.fdatasync(fd)
            except OSError:
                self._fs.close(fd)
                raise
            self._fd = fd
            self._active_bytes = self._durable_bytes
            self._write_at = self._durable_bytes
            self._active_preallocated = False
        self._fsync_dir()

    # ------------------------------------------------------------------ read

    def read(self, from_seq: int = 1) -> Iterator[tuple[int, memoryview]]:
        """Yields (seq, payload) for durable entries >= from_seq, in order.

        Payloads are read-only memoryviews into a per-segment read buffer
        (zero copy; `bytes(payload)` to keep one independently). Entries
        appended after the call, or not yet durable, are not yielded.
        """
        with self._lock:
            segments = list(self._segments)
            seq_limit = self._durable_seq
        seq_first = segments[0].first_seq if segments else seq_limit + 1
        if from_seq < seq_first:
            raise ValueError(f"journal starts at seq {seq_first} (older segments were "
                             f"removed); cannot read from seq {from_seq}")
        for index, segment in enumerate(segments):
            seq_end = segments[index + 1].first_seq if index + 1 < len(segments) else seq_limit + 1
            if seq_end <= from_seq:
                continue
            if segment.first_seq > seq_limit:
                return
            yield from _read_segment(segment.path, segment.first_seq, from_seq,
                                     min(seq_end - 1, seq_limit), self._entry_bytes_max)

    # ------------------------------------------------------------- retention

    def remove_segments_before(self, seq: int) -> list[str]:
        """Deletes whole segments whose entries are all < seq; never the active
        one, nor one whose successor holds no durable entry. Returns the paths.
        Rewrites the manifest first (its first seq, and the mark: snapshots
        call this)."""
        with self._lock:
            assert not self._closed
            removable = 0
            for index in range(len(self._segments) - 1):
                successor = self._segments[index + 1].first_seq
                if successor > seq or successor > self._durable_seq:
                    break
                removable = index + 1
            doomed = self._segments[:removable]
            del self._segments[:removable]
        try:
            # The mark first: a missing first segment is retention, not loss.
            self._save_manifest()
        except OSError as error:
            with self._lock:
                self._segments[:0] = doomed
            log.error("journal: could not rewrite %s (%s); old segments are kept",
                      os.path.join(self._dir, MANIFEST_NAME), error)
            return []
        for segment in doomed:
            os.unlink(segment.path)
        if doomed:
            _fsync_dir_os(self._dir)
        return [segment.path for segment in doomed]

    # ----------------------------------------------------------------- close

    def close(self) -> None:
        """Syncs pending entries (unless failed), then releases everything."""
        if self._closed:
            return
        try:
            if self._failure is None and self._last_seq > self._durable_seq:
                self.sync()
            if self._failure is None:
                try:
                    self._save_manifest()       # the mark reaches the last entry
                except OSError as error:
                    log.error("journal: could not rewrite %s at close (%s)",
                              os.path.join(self._dir, MANIFEST_NAME), error)
        finally:
            if self._spare is not None:
                self._spare.stop()
            self._settle_offload()
            with self._io_lock:
                if self._failure is not None:
                    self._cut_back()        # a restart must not find dropped entries
                if self._fd is not None:
                    try:
                        self._fs.close(self._fd)
                    except OSError:
                        pass
                    self._fd = None
                self._closed = True
                self._release_dir()

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _free_bytes(dir: str) -> int:
    """Bytes an unprivileged writer may still use on dir's filesystem."""
    stat = os.statvfs(dir)
    return stat.f_bavail * stat.f_frsize


class _Spare:
    """The next segment, zero-filled by a background thread while the active
    one fills. Overwriting blocks that are already written makes an
    fdatasync write just those blocks; appending (or writing into fallocated
    space) also commits the file's new size or extents through the
    filesystem's journal, a second device write that needs its own kernel
    thread to be scheduled. Measured on this project's VM (ext4, 8 KiB
    writes): fdatasync p50 150-180 us appending, 92 us preallocated; with
    both cores busy, p90 4 ms appending, 125 us preallocated.

    Zero-filling is paced (SPARE_BYTES_PER_S_MAX in SPARE_CHUNK_BYTES, with
    sync_file_range) so that it does not queue the journal's own fsyncs
    behind it. If the spare
    is not ready when a segment is full, the next segment is an appending
    one, and the journal moves to the spare once it is (Journal._write_batch).
    """

    def __init__(self, path: str, size: int):
        self.path = path
        self.size = size
        self._ready = threading.Event()
        self._wanted = threading.Event()    # make one (again)
        self._requested = False             # wanted since the last take (journal's thread)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="journal-spare", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def want(self) -> None:
        """Zero-fill the next spare now, unless one is ready or being made."""
        if not self._requested:
            self._requested = True
            self._wanted.set()

    @property
    def requested(self) -> bool:
        return self._requested

    def ready(self) -> bool:
        return self._ready.is_set()

    def take(self, path: str) -> bool:
        """Rename the spare to `path` if it is ready. The next one is made
        when the journal wants it (SPARE_AHEAD_FRACTION)."""
        if not self._ready.is_set():
            return False
        os.rename(self.path, path)
        self._ready.clear()
        self._requested = False
        return True

    def stop(self) -> None:
        self._stopping = True
        self._wanted.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._stopping:
                return
            free_bytes = _free_bytes(os.path.dirname(self.path))
            if free_bytes < SPARE_FREE_SEGMENTS_MIN * self.size:
                log.warning("journal: not preallocating %s: %d bytes free, fewer than %d "
                            "segments of %d bytes; appending instead (restart once there "
                            "is room)", self.path, free_bytes, SPARE_FREE_SEGMENTS_MIN,
                            self.size)
                return
            try:
                self._fill()
            except OSError as error:        # no spare: segments are appended to, as without
                # A half-filled spare would hold the space the journal needs (ENOSPC).
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
                log.warning("journal: could not preallocate %s (%s); removed it, appending "
                            "instead", self.path, error)
                return

    def _fill(self) -> None:
        from engine.storage.snapshot import Pacer         # the same pacing as snapshots
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            zeros = bytes(SPARE_CHUNK_BYTES)
            pacer = Pacer(fd, SPARE_BYTES_PER_S_MAX)
            for offset in range(0, self.size, SPARE_CHUNK_BYTES):
                if self._stopping:
                    return
                chunk = min(SPARE_CHUNK_BYTES, self.size - offset)
                os.pwrite(fd, zeros[:chunk], offset)
                pacer.wrote(offset, chunk)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        if not self._stopping:
            self._ready.set()


# ------------------------------------------------------------------ encoding

def _encode_segment_header(first_seq: int) -> bytes:
    head = SEGMENT_HEADER.pack(SEGMENT_MAGIC, SEGMENT_VERSION, SEGMENT_HEADER_BYTES, first_seq,
                               SEGMENT_FLAG_MANIFEST, 0)
    return head[:-4] + _CRC.pack(crc32c.crc32c(head[:-4]))


def _encode_entry(seq: int, payload: bytes) -> tuple[tuple, int]:
    """The entry's buffers (header, payload, padding) and their total bytes."""
    payload_bytes = len(payload)
    padding = _PADDING[payload_bytes % ENTRY_ALIGN_BYTES]
    frame_bytes = ENTRY_HEADER_BYTES + payload_bytes + len(padding)
    # crc32c's keyword arguments cost more than the checksum of a small entry.
    if payload_bytes <= ENTRY_INLINE_BYTES_MAX:
        body = _ENTRY_REST.pack(payload_bytes, seq) + payload + padding
        return (_CRC.pack(crc32c.crc32c(body)) + body,), frame_bytes
    rest = _ENTRY_REST.pack(payload_bytes, seq)
    crc = crc32c.crc32c(padding, crc32c.crc32c(payload, crc32c.crc32c(rest)))
    return (_CRC.pack(crc) + rest, payload, padding), frame_bytes


# ------------------------------------------------------------------- scanning

@dataclasses.dataclass
class _Scan:
    entries: int
    file_bytes: int
    valid_bytes: int  # 0 when the segment header itself is bad.
    problem: Problem | None
    flagged: bool = False  # The header has SEGMENT_FLAG_MANIFEST.
    zero_tail_bytes: int = 0


@dataclasses.dataclass
class _Examined:
    listing: list[tuple[int, str]]
    scans: list[_Scan]
    reports: list[SegmentReport]
    problems: list[Problem]
    manifest: Manifest | None


def _examine(dir: str, entry_bytes_max: int) -> _Examined:
    """Every segment and entry, checked against each other and the manifest:
    what `open` loads and `verify` reports."""
    problems: list[Problem] = []
    manifest = _read_manifest(dir, problems)
    listing = _list_segments(dir)
    scans, reports = [], []
    seq_expected = None
    flagged = False
    for index, (name_seq, path) in enumerate(listing):
        is_last = index == len(listing) - 1
        if seq_expected is not None and name_seq != seq_expected:
            problems.append(Problem(path, 0, "corrupt", _gap_detail(name_seq, seq_expected)))
        scan = _scan_segment(path, _read_file(path), name_seq, is_last, entry_bytes_max)
        scan.problem = _against_mark(scan, name_seq, manifest)
        flagged |= scan.flagged
        scans.append(scan)
        reports.append(SegmentReport(path, name_seq, name_seq + scan.entries - 1, scan.entries,
                                     scan.file_bytes, scan.valid_bytes, scan.zero_tail_bytes))
        seq_expected = name_seq + scan.entries
        if scan.problem is not None:
            problems.append(scan.problem)
            seq_expected = None  # Unknown where this segment really ended: no gap check.
        elif scan.entries == 0 and not is_last:
            problems.append(Problem(path, SEGMENT_HEADER_BYTES, "corrupt", "closed segment holds no entry"))
    problems.extend(_mark_problems(dir, listing, reports, problems, manifest, flagged))
    return _Examined(listing, scans, reports, problems, manifest)


def _against_mark(scan: _Scan, name_seq: int, manifest: Manifest | None) -> Problem | None:
    """A torn tail at or before the durable mark is corruption: those bytes
    were reported durable, whatever damaged them."""
    problem = scan.problem
    if problem is None or problem.kind != "torn_tail" or manifest is None:
        return problem
    if scan.valid_bytes == 0:
        if name_seq <= manifest.segment_seq:
            return Problem(problem.file, problem.offset, "corrupt",
                           f"{problem.detail}, but {MANIFEST_NAME} says this segment's "
                           f"header was durable")
        return problem
    seq = name_seq + scan.entries
    if seq <= manifest.durable_seq:
        return Problem(problem.file, problem.offset, "corrupt",
                       f"{problem.detail}, at seq {seq}, but entries up to seq "
                       f"{manifest.durable_seq} were reported durable ({MANIFEST_NAME})")
    return problem


def _mark_problems(dir: str, listing: list, reports: list[SegmentReport],
                   problems: list[Problem], manifest: Manifest | None,
                   flagged: bool) -> list[Problem]:
    """Segments missing at either end, or a journal shorter than its mark."""
    manifest_path = os.path.join(dir, MANIFEST_NAME)
    if manifest is None:
        if flagged and not any(p.file == manifest_path for p in problems):
            return [Problem(manifest_path, 0, "corrupt",
                            f"{MANIFEST_NAME} is missing, but the segments were written by a "
                            f"journal that keeps one: the durable high-water mark is lost")]
        return []
    names = {seq for seq, _ in listing}
    found = []
    if listing and listing[0][0] > manifest.first_seq:
        found.append(Problem(listing[0][1], 0, "corrupt",
                             f"the journal must start at seq {manifest.first_seq} "
                             f"({MANIFEST_NAME}) but its oldest segment starts at seq "
                             f"{listing[0][0]}: segments before it are missing"))
    if manifest.segment_seq and manifest.segment_seq not in names:
        found.append(Problem(os.path.join(dir, segment_name(manifest.segment_seq)), 0, "corrupt",
                             f"the segment is missing, but {MANIFEST_NAME} says it was durable "
                             f"(entries up to seq {manifest.durable_seq} were reported durable)"))
    reached = reports[-1].last_seq if reports else 0
    if not found and not any(p.kind == "corrupt" for p in problems) \
            and reached < manifest.durable_seq:
        where, offset = (reports[-1].file, reports[-1].valid_bytes) if reports else (dir, 0)
        found.append(Problem(where, offset, "corrupt",
                             f"the journal ends at seq {reached}, but entries up to seq "
                             f"{manifest.durable_seq} were reported durable ({MANIFEST_NAME}): "
                             f"acknowledged entries are missing (a truncated, zeroed or "
                             f"deleted segment)"))
    return found


def _read_manifest(dir: str, problems: list[Problem]) -> Manifest | None:
    """The manifest, or None if there is none (a journal made before it
    existed); a damaged one is a problem (and None)."""
    path = os.path.join(dir, MANIFEST_NAME)
    try:
        buf = _read_file(path)
    except FileNotFoundError:
        return None
    detail = None
    if len(buf) != MANIFEST.size:
        detail = f"{MANIFEST_NAME} holds {len(buf)} bytes, not {MANIFEST.size}"
    else:
        magic, version, size, first_seq, segment_seq, durable_seq, _, crc = MANIFEST.unpack(buf)
        if crc32c.crc32c(buf[:-4]) != crc:
            detail = f"{MANIFEST_NAME} checksum mismatch"
        elif magic != MANIFEST_MAGIC or version != MANIFEST_VERSION or size != MANIFEST.size:
            detail = f"{MANIFEST_NAME} has an unknown format (magic {magic!r}, version {version})"
    if detail is not None:
        problems.append(Problem(path, 0, "corrupt", detail))
        return None
    return Manifest(first_seq, segment_seq, durable_seq)


def _write_manifest(dir: str, manifest: Manifest) -> None:
    """Atomically: a crash leaves the old manifest or the new one."""
    head = MANIFEST.pack(MANIFEST_MAGIC, MANIFEST_VERSION, MANIFEST.size, manifest.first_seq,
                         manifest.segment_seq, manifest.durable_seq, 0, 0)
    data = head[:-4] + _CRC.pack(crc32c.crc32c(head[:-4]))
    path = os.path.join(dir, MANIFEST_NAME)
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        if os.write(fd, data) != len(data):
            raise OSError(errno_module.EIO, f"short write of {path}.tmp")
        os.fdatasync(fd)
    finally:
        os.close(fd)
    os.rename(path + ".tmp", path)
    _fsync_dir_os(dir)


def _write_quarantine(dir: str, name: str, data: memoryview) -> str:
    """Writes `data` to a new file in <dir>/quarantine (fsync'd); its path."""
    quarantine = os.path.join(dir, QUARANTINE_DIR)
    created = not os.path.isdir(quarantine)
    os.makedirs(quarantine, exist_ok=True)
    for index in range(QUARANTINE_COPIES_MAX):
        path = os.path.join(quarantine, name if index == 0 else f"{name}.{index}")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            continue
        break
    else:
        raise JournalError(f"{quarantine} already holds {QUARANTINE_COPIES_MAX} copies of "
                           f"{name}: move them elsewhere, then start again")
    try:
        done = 0
        while done < len(data):     # bounded: each write moves at least one byte
            written = os.write(fd, data[done:])
            if written <= 0:
                raise OSError(errno_module.EIO, f"write of {path} wrote no bytes")
            done += written
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir_os(quarantine)
    if created:
        _fsync_dir_os(dir)
    return path


def _nonzero_end(mv: memoryview, start: int) -> int:
    """The offset just after the last non-zero byte at or after `start`
    (`start` if there is none)."""
    nonzero = np.flatnonzero(np.frombuffer(mv, np.uint8, offset=start))
    return start + int(nonzero[-1]) + 1 if len(nonzero) else start


def _count_entries(mv: memoryview, offset: int, seq: int) -> int:
    """Entry headers with consecutive seqs from `offset` (checksums aside):
    how many entries a torn tail had begun."""
    count = 0
    for _ in range(len(mv) // ENTRY_HEADER_BYTES + 1):
        if len(mv) - offset < ENTRY_HEADER_BYTES:
            break
        _, payload_bytes, entry_seq = ENTRY_HEADER.unpack_from(mv, offset)
        if entry_seq != seq + count:
            break
        count += 1
        offset += ENTRY_HEADER_BYTES + payload_bytes + (-payload_bytes % ENTRY_ALIGN_BYTES)
    return count


def _entry_whole(mv: memoryview, offset: int, seq: int, entry_bytes_max: int) -> bool:
    """The entry at `offset` has its expected seq, a length that fits, and
    no all-zero sector: all of it was written, so a bad checksum is damage
    on disk, not a torn write (whose unwritten sectors still hold zeros)."""
    if len(mv) - offset < ENTRY_HEADER_BYTES:
        return False
    _, payload_bytes, entry_seq = ENTRY_HEADER.unpack_from(mv, offset)
    if entry_seq != seq or payload_bytes > entry_bytes_max:
        return False        # the header itself is not to be trusted
    end = offset + ENTRY_HEADER_BYTES + payload_bytes + (-payload_bytes % ENTRY_ALIGN_BYTES)
    if end > len(mv):
        return False
    for sector in range(offset - offset % SECTOR_BYTES, end, SECTOR_BYTES):
        if _all_zero(mv[max(sector, offset):min(sector + SECTOR_BYTES, end)]):
            return False
    return True


def _list_segments(dir: str) -> list[tuple[int, str]]:
    listing = []
    for name in os.listdir(dir):
        match = SEGMENT_NAME.match(name)
        if match:
            listing.append((int(match.group(1)), os.path.join(dir, name)))
    listing.sort()
    return listing


def _read_file(path: str) -> bytes:
    with open(path, "rb", buffering=0) as file:
        return file.readall()


def _fsync_dir_os(dir: str) -> None:
    fd = os.open(dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _gap_detail(name_seq: int, seq_expected: int) -> str:
    return (f"segment starts at seq {name_seq} but the previous segment ends at seq "
            f"{seq_expected - 1} (a gap or overlap in the sequence)")


def _header_problem(buf, name_seq: int) -> str | None:
    if len(buf) < SEGMENT_HEADER_BYTES:
        return f"segment header is short ({len(buf)} of {SEGMENT_HEADER_BYTES} bytes)"
    magic, version, header_bytes, first_seq, _, crc = SEGMENT_HEADER.unpack_from(buf, 0)
    if crc32c.crc32c(buf[:SEGMENT_HEADER_BYTES - 4]) != crc:
        return "segment header checksum mismatch"
    if magic != SEGMENT_MAGIC:
        return f"not a journal segment (magic {magic!r})"
    if version != SEGMENT_VERSION or header_bytes != SEGMENT_HEADER_BYTES:
        return f"unsupported segment format version {version}"
    if first_seq != name_seq:
        return f"segment header says first seq {first_seq} but its name says {name_seq}"
    if first_seq == 0:
        return "segment first seq is 0"
    return None


def _walk(mv: memoryview, offset: int, seq: int, entry_bytes_max: int, stop: list):
    """Yields (seq, payload_start, payload_end, next_offset) for each valid
    entry from `offset`; on a bad one appends (offset, detail, checksum_ok) to
    `stop` and returns."""
    size = len(mv)
    unpack = ENTRY_HEADER.unpack_from
    crc_of = crc32c.crc32c
    while offset < size:
        if size - offset < ENTRY_HEADER_BYTES:
            stop.append((offset, f"entry header is short ({size - offset} of "
                                 f"{ENTRY_HEADER_BYTES} bytes)", False))
            return
        crc, payload_bytes, entry_seq = unpack(mv, offset)
        payload_end = offset + ENTRY_HEADER_BYTES + payload_bytes
        offset_next = payload_end + (-payload_bytes % ENTRY_ALIGN_BYTES)
        if offset_next > size:
            stop.append((offset, f"entry of {payload_bytes} bytes runs past the end of the "
                                 f"file ({size - offset} bytes left)", False))
            return
        if crc_of(mv[offset + 4:offset_next]) != crc:
            stop.append((offset, f"entry checksum mismatch (seq field {entry_seq}, "
                                 f"expected seq {seq})", False))
            return
        if payload_bytes > entry_bytes_max:
            # Intact, so not a torn write: was entry_bytes_max lowered?
            stop.append((offset, f"entry of {payload_bytes} bytes exceeds entry_bytes_max "
                                 f"{entry_bytes_max}", True))
            return
        if entry_seq != seq:
            stop.append((offset, f"entry has seq {entry_seq}, expected {seq}", True))
            return
        yield seq, offset + ENTRY_HEADER_BYTES, payload_end, offset_next
        offset = offset_next
        seq += 1


def _valid_entry_after(mv: memoryview, offset: int, seq_min: int) -> tuple[int, int] | None:
    """The first (offset, seq) after `offset` where a whole entry with a
    plausible seq checks out, or None: tells a torn tail (nothing valid
    follows) from corruption (valid entries follow the bad bytes)."""
    assert offset % ENTRY_ALIGN_BYTES == 0
    size = len(mv)
    seq_word_first = offset + ENTRY_ALIGN_BYTES + 8  # The seq field of a header at offset + 8.
    count = (size - seq_word_first) // 8
    if count <= 0:
        return None
    # Entries are 8-aligned, so only aligned words can be a header's seq field.
    words = np.frombuffer(mv, dtype="<u8", count=count, offset=seq_word_first)
    seq_max = min(seq_min + size // ENTRY_HEADER_BYTES, SEQ_MAX)
    for index in np.flatnonzero((words >= seq_min) & (words <= seq_max)).tolist():
        at = seq_word_first + 8 * index - 8
        crc, payload_bytes, seq = ENTRY_HEADER.unpack_from(mv, at)
        end = at + ENTRY_HEADER_BYTES + payload_bytes + (-payload_bytes % ENTRY_ALIGN_BYTES)
        if end <= size and crc32c.crc32c(mv[at + 4:end]) == crc:
            return at, seq
    return None


def _scan_segment(path: str, buf: bytes, name_seq: int, is_last: bool,
                  entry_bytes_max: int) -> _Scan:
    mv = memoryview(buf)
    detail = _header_problem(mv, name_seq)
    if detail is not None:
        problem = _classify(path, mv, 0, detail, False, name_seq, is_last)
        # A torn header is short, or zeros (a preallocated spare renamed into
        # place) with nothing written after it; anything else is not a
        # segment header this journal wrote.
        if problem.kind == "torn_tail" and len(mv) >= SEGMENT_HEADER_BYTES and not _all_zero(mv):
            problem = Problem(path, 0, "corrupt",
                              f"{detail}, and the file is not a torn segment header (it holds "
                              f"{len(mv)} bytes, not all zero): a damaged header or a foreign "
                              f"file under a segment name")
        return _Scan(0, len(buf), 0, problem)
    flagged = bool(SEGMENT_HEADER.unpack_from(mv, 0)[4] & SEGMENT_FLAG_MANIFEST)
    entries = 0
    valid_bytes = SEGMENT_HEADER_BYTES
    stop: list = []
    for _, _, _, offset_next in _walk(mv, SEGMENT_HEADER_BYTES, name_seq, entry_bytes_max, stop):
        entries += 1
        valid_bytes = offset_next
    if not stop or _all_zero(mv[valid_bytes:]):    # zeros: space preallocated ahead
        return _Scan(entries, len(buf), valid_bytes, None, flagged, len(buf) - valid_bytes)
    offset, detail, checksum_ok = stop[0]
    problem = _classify(path, mv, offset, detail, checksum_ok, name_seq + entries, is_last)
    if problem.kind == "torn_tail" and _entry_whole(mv, offset, name_seq + entries, entry_bytes_max):
        problem = Problem(path, offset, "corrupt",
                          f"{detail}, though every byte of the entry is present: damaged on "
                          f"disk, not a torn write")
    return _Scan(entries, len(buf), valid_bytes, problem, flagged)


def _all_zero(mv: memoryview) -> bool:
    head = len(mv) - len(mv) % 8
    return (not np.frombuffer(mv[:head], np.uint64).any()
            and not any(mv[head:]))


def _classify(path: str, mv: memoryview, offset: int, detail: str, checksum_ok: bool,
              seq_expected: int, is_last: bool) -> Problem:
    """A bad entry is a torn tail only if it is in the last segment, its bytes
    do not check out, and no valid entry follows it."""
    if checksum_ok:
        return Problem(path, offset, "corrupt", detail)
    if not is_last:
        return Problem(path, offset, "corrupt", f"{detail}, in a closed segment")
    later = _valid_entry_after(mv, offset, seq_expected)
    if later is not None:
        return Problem(path, offset, "corrupt",
                       f"{detail}, but a valid entry (seq {later[1]}) follows at byte "
                       f"offset {later[0]}")
    return Problem(path, offset, "torn_tail", detail)


def _read_segment(path: str, first_seq: int, from_seq: int, last_seq: int,
                  entry_bytes_max: int) -> Iterator[tuple[int, memoryview]]:
    mv = memoryview(_read_file(path))
    detail = _header_problem(mv, first_seq)
    if detail is not None:
        raise JournalCorrupt(path, 0, detail)
    stop: list = []
    seq_read = first_seq - 1
    for seq, start, end, _ in _walk(mv, SEGMENT_HEADER_BYTES, first_seq, entry_bytes_max, stop):
        if seq > last_seq:
            return
        seq_read = seq
        if seq >= from_seq:
            yield seq, mv[start:end]
    if seq_read < last_seq:
        offset, detail, _ = stop[0] if stop else (len(mv), "segment ends early", False)
        raise JournalCorrupt(path, offset, f"{detail} while reading (seq {seq_read + 1} "
                                           f"was durable)")
