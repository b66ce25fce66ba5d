"""Atomic, checksummed snapshots of named numpy arrays plus a JSON meta dict.

A snapshot at seq S is the state after applying journal entries 1..S. One
file per snapshot, `snapshot-{seq:020d}.snap`, written to a temp file,
fsync'ed, renamed into place and the directory fsync'ed: a crash leaves
either the old set of snapshots or the new one, plus at most a temp file that
is ignored and later cleaned. Byte layout: docs/storage-format.md.

Arrays are written from their own memory and read straight into freshly
allocated arrays (no intermediate copies), in chunks that are checksummed
while still in cache.
"""
from __future__ import annotations

import ast
import ctypes
import dataclasses
import json
import logging
import os
import re
import struct
import time
from collections.abc import Callable

import crc32c
import numpy as np

log = logging.getLogger(__name__)

SNAPSHOT_MAGIC = b"SCNPSNAP"
SNAPSHOT_VERSION = 1
# magic, version, header_bytes, seq, index_bytes, data_bytes, file_bytes,
# index_crc, data_crc, reserved, header_crc (over bytes [0, 60)).
SNAPSHOT_HEADER = struct.Struct("<8sIIQQQQIIII")
SNAPSHOT_HEADER_BYTES = SNAPSHOT_HEADER.size
ALIGN_BYTES = 64  # Every array starts on a cache line.
CHUNK_BYTES = 8 * 1024 * 1024  # I/O and checksum granularity.
INDEX_BYTES_MAX = 64 * 1024 * 1024
SEQ_MAX = 2**64 - 1

SNAPSHOT_NAME = re.compile(r"^snapshot-(\d{20})\.snap$")
TEMP_NAME = re.compile(r"^\.snapshot-(\d{20})\.snap\.tmp$")

assert SNAPSHOT_HEADER_BYTES == 64

RowsFor = Callable[[str, int], int]     # (array name, rows in the file) -> rows wanted
# (array name, dtype, rows) -> a zeroed 1-D array of that many rows to read
# the array into, or None for a plain numpy one (the kernel's Ledger.allocate:
# a large table is read straight into the row space it grows in).
Allocate = Callable[[str, np.dtype, int], "np.ndarray | None"]


class SnapshotCorrupt(Exception):
    """A snapshot file fails validation."""

    def __init__(self, path: str, detail: str):
        super().__init__(f"snapshot {path} is invalid: {detail}")
        self.path = path
        self.detail = detail


@dataclasses.dataclass
class SnapshotInfo:
    seq: int
    path: str
    bytes: int


def snapshot_name(seq: int) -> str:
    return f"snapshot-{seq:020d}.snap"


def _align(size: int) -> int:
    return -(-size // ALIGN_BYTES) * ALIGN_BYTES


def _bytes_of(array: np.ndarray) -> np.ndarray:
    """A flat uint8 view of a C-contiguous array's memory (any dtype)."""
    return array.reshape(-1).view(np.uint8)


# --------------------------------------------------------------------- write

def write_snapshot(dir: str, seq: int, arrays: dict[str, np.ndarray], meta: dict,
                   bytes_per_s_max: int | None = None) -> str:
    """Writes snapshot `seq` atomically and durably; returns its path.

    The arrays must not be mutated while this runs (pass copies if another
    thread keeps changing them). `meta` must be JSON-serializable (dict keys
    become strings, tuples lists). `bytes_per_s_max` paces the writing (see
    `Pacer`); None writes at full speed.
    """
    assert 0 <= seq <= SEQ_MAX, seq
    assert isinstance(meta, dict), type(meta)
    if not os.path.isdir(dir):
        os.makedirs(dir)
        _fsync_dir(os.path.dirname(os.path.abspath(dir)))
    remove_temp_files(dir)
    layout, views, data_bytes = _layout(arrays)
    index = json.dumps({"meta": meta, "arrays": layout}, sort_keys=True,
                       separators=(",", ":")).encode()
    assert len(index) <= INDEX_BYTES_MAX, len(index)
    index += bytes(_align(len(index)) - len(index))
    file_bytes = SNAPSHOT_HEADER_BYTES + len(index) + data_bytes
    path = os.path.join(dir, snapshot_name(seq))
    temp = os.path.join(dir, "." + snapshot_name(seq) + ".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        _write_all(fd, bytes(SNAPSHOT_HEADER_BYTES))  # Filled in once the checksums are known.
        _write_all(fd, index)
        data_crc = _write_data(fd, layout, views, data_bytes, Pacer(fd, bytes_per_s_max))
        header = _encode_header(seq, len(index), data_bytes, file_bytes,
                                crc32c.crc32c(index), data_crc)
        assert os.pwrite(fd, header, 0) == SNAPSHOT_HEADER_BYTES
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(temp)
        raise
    os.close(fd)
    os.rename(temp, path)
    _fsync_dir(dir)
    return path


def _layout(arrays: dict[str, np.ndarray]) -> tuple[list[dict], list[np.ndarray], int]:
    layout, views = [], []
    offset = 0
    for name, array in arrays.items():
        assert isinstance(name, str), name
        array = np.asarray(array)
        if not array.flags.c_contiguous:
            array = array.copy(order="C")  # (np.ascontiguousarray would make 0-d arrays 1-d.)
        if array.dtype.hasobject:
            raise TypeError(f"snapshot array {name!r} has Python objects (dtype {array.dtype})")
        layout.append({"name": name, "descr": repr(np.lib.format.dtype_to_descr(array.dtype)),
                       "shape": list(array.shape), "offset": offset, "bytes": array.nbytes})
        views.append(_bytes_of(array))
        offset += _align(array.nbytes)
    return layout, views, offset


class Pacer:
    """Keeps a snapshot's writing from starving the journal's fsyncs.

    Written at full speed, a snapshot of a gigabyte leaves the page cache
    full of dirty pages, and the fsync at its end (or the kernel's own
    writeback) queues the journal's small fdatasyncs behind all of them:
    replies stalled for 0.6-0.8 s on this project's test VM. Paced, each
    chunk's writeback is started as soon as it is written and waited for one
    chunk later (sync_file_range), and the writer sleeps to stay under
    `bytes_per_s_max`: the journal's p99 fdatasync stayed at 1.7 ms at 50
    MB/s (docs/operations-durability.md)."""

    def __init__(self, fd: int, bytes_per_s_max: int | None):
        self.fd = fd
        self.bytes_per_s_max = bytes_per_s_max
        self.started = time.perf_counter()
        self.written = 0
        self.previous = None                # (offset, bytes) of the last chunk

    def wrote(self, offset: int, size: int) -> None:
        if not self.bytes_per_s_max:
            return
        if self.previous is not None:
            _sync_file_range(self.fd, *self.previous, SYNC_FILE_RANGE_WAIT_ALL)
        _sync_file_range(self.fd, offset, size, SYNC_FILE_RANGE_WRITE)
        self.previous = (offset, size)
        self.written += size
        due = self.started + self.written / self.bytes_per_s_max
        time.sleep(max(0.0, due - time.perf_counter()))


SYNC_FILE_RANGE_WRITE = 2
SYNC_FILE_RANGE_WAIT_ALL = 1 | 2 | 4        # wait before, write, wait after


def _load_sync_file_range():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):       # not Linux: pacing by sleeping alone
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return call


_sync_file_range_call = _load_sync_file_range()


def _sync_file_range(fd: int, offset: int, size: int, flags: int) -> None:
    if _sync_file_range_call is not None:
        _sync_file_range_call(fd, offset, size, flags)     # advisory: errors are ignored


def _write_data(fd: int, layout: list[dict], views: list[np.ndarray], data_bytes: int,
                pacer: Pacer) -> int:
    crc = 0
    position = 0
    file_offset = os.lseek(fd, 0, os.SEEK_CUR)
    for entry, view in zip(layout, views):
        assert entry["offset"] == position
        for start in range(0, len(view), CHUNK_BYTES):
            chunk = memoryview(view[start:start + CHUNK_BYTES])
            crc = crc32c.crc32c(chunk, value=crc)
            _write_all(fd, chunk)
            pacer.wrote(file_offset + position + start, len(chunk))
        padding = bytes(_align(len(view)) - len(view))
        crc = crc32c.crc32c(padding, value=crc)
        _write_all(fd, padding)
        position += len(view) + len(padding)
    assert position == data_bytes
    return crc


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        assert written > 0
        view = view[written:]


def _encode_header(seq: int, index_bytes: int, data_bytes: int, file_bytes: int,
                   index_crc: int, data_crc: int) -> bytes:
    head = SNAPSHOT_HEADER.pack(SNAPSHOT_MAGIC, SNAPSHOT_VERSION, SNAPSHOT_HEADER_BYTES, seq,
                                index_bytes, data_bytes, file_bytes, index_crc, data_crc, 0, 0)
    return head[:-4] + struct.pack("<I", crc32c.crc32c(head[:-4]))


def _fsync_dir(dir: str) -> None:
    fd = os.open(dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- load

def load_snapshot(path: str, rows_for: RowsFor | None = None, allocate: Allocate | None = None
                  ) -> tuple[int, dict[str, np.ndarray], dict]:
    """Loads and fully verifies one snapshot; raises SnapshotCorrupt.

    `rows_for(name, rows)` may ask for more rows than array `name` has in the
    file: the array is then allocated that long, zeroed past the loaded rows,
    so that a table about to grow is not copied again right after loading.
    `allocate`, if given, allocates the 1-D arrays (see Allocate)."""
    match = SNAPSHOT_NAME.match(os.path.basename(path))
    if match is None:
        raise SnapshotCorrupt(path, "file name is not snapshot-<seq>.snap")
    with open(path, "rb", buffering=0) as file:
        file_bytes = os.fstat(file.fileno()).st_size
        header = _read_exact(file, path, SNAPSHOT_HEADER_BYTES)
        seq, index_bytes, data_bytes, index_crc, data_crc = _decode_header(
            path, header, int(match.group(1)), file_bytes)
        index = _read_exact(file, path, index_bytes)
        if crc32c.crc32c(index) != index_crc:
            raise SnapshotCorrupt(path, "index checksum mismatch")
        try:
            decoded = json.loads(bytes(index).rstrip(b"\0"))
            meta, layout = decoded["meta"], decoded["arrays"]
        except (ValueError, KeyError, TypeError) as error:
            raise SnapshotCorrupt(path, f"index is not valid: {error}") from None
        arrays, stored = _allocate(path, layout, data_bytes, rows_for, allocate)
        crc = _read_data(file, path, layout, stored, data_bytes)
        if crc != data_crc:
            raise SnapshotCorrupt(path, "array data checksum mismatch")
    return seq, arrays, meta


def load_meta(path: str) -> dict:
    """Only the meta dict of one snapshot (its header and index, verified;
    not its arrays): what a replicated log needs to know where the snapshot
    stands in the stream (engine/replication/log.py)."""
    match = SNAPSHOT_NAME.match(os.path.basename(path))
    if match is None:
        raise SnapshotCorrupt(path, "file name is not snapshot-<seq>.snap")
    with open(path, "rb", buffering=0) as file:
        header = _read_exact(file, path, SNAPSHOT_HEADER_BYTES)
        _seq, index_bytes, _data_bytes, index_crc, _data_crc = _decode_header(
            path, header, int(match.group(1)), os.fstat(file.fileno()).st_size)
        index = _read_exact(file, path, index_bytes)
    if crc32c.crc32c(index) != index_crc:
        raise SnapshotCorrupt(path, "index checksum mismatch")
    try:
        return json.loads(bytes(index).rstrip(b"\0"))["meta"]
    except (ValueError, KeyError, TypeError) as error:
        raise SnapshotCorrupt(path, f"index is not valid: {error}") from None


def _decode_header(path: str, header: bytearray, name_seq: int,
                   file_bytes: int) -> tuple[int, int, int, int, int]:
    (magic, version, header_bytes, seq, index_bytes, data_bytes, expected_bytes,
     index_crc, data_crc, _, header_crc) = SNAPSHOT_HEADER.unpack(header)
    if crc32c.crc32c(header[:-4]) != header_crc:
        raise SnapshotCorrupt(path, "header checksum mismatch (incomplete write?)")
    if magic != SNAPSHOT_MAGIC or header_bytes != SNAPSHOT_HEADER_BYTES:
        raise SnapshotCorrupt(path, f"not a snapshot (magic {magic!r})")
    if version != SNAPSHOT_VERSION:
        raise SnapshotCorrupt(path, f"unsupported snapshot format version {version}")
    if seq != name_seq:
        raise SnapshotCorrupt(path, f"header says seq {seq} but the file name says {name_seq}")
    if index_bytes > INDEX_BYTES_MAX or index_bytes % ALIGN_BYTES or data_bytes % ALIGN_BYTES:
        raise SnapshotCorrupt(path, "implausible section sizes")
    if expected_bytes != SNAPSHOT_HEADER_BYTES + index_bytes + data_bytes or expected_bytes != file_bytes:
        raise SnapshotCorrupt(path, f"file is {file_bytes} bytes, header says {expected_bytes}")
    return seq, index_bytes, data_bytes, index_crc, data_crc


def _allocate(path: str, layout: list, data_bytes: int, rows_for: RowsFor | None,
              allocate: Allocate | None = None
              ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(arrays, stored): the arrays to return, and the views of them that the
    file's bytes are read into (the same arrays unless given headroom)."""
    arrays, stored = {}, {}
    position = 0
    try:
        for entry in layout:
            name = entry["name"]
            dtype = np.lib.format.descr_to_dtype(ast.literal_eval(entry["descr"]))
            shape = tuple(int(n) for n in entry["shape"])
            rows = rows_for(name, shape[0]) if rows_for and shape else 0
            array = (allocate(name, dtype, max(rows, shape[0]))
                     if allocate is not None and len(shape) == 1 else None)
            if array is not None:
                view = array[:shape[0]]
            elif shape and rows > shape[0]:
                # np.zeros: calloc'ed pages, zeroed by the OS as they are touched.
                array = np.zeros((rows,) + shape[1:], dtype)
                view = array[:shape[0]]
            else:
                array = view = np.empty(shape, dtype)
            if (entry["offset"] != position or view.nbytes != entry["bytes"]
                    or name in arrays):
                raise ValueError(f"array {name!r} does not match its layout")
            position += _align(view.nbytes)
            arrays[name], stored[name] = array, view
    except (ValueError, KeyError, TypeError, SyntaxError) as error:
        raise SnapshotCorrupt(path, f"index is not valid: {error}") from None
    if position != data_bytes:
        raise SnapshotCorrupt(path, "array layout does not match the data section")
    return arrays, stored


def _read_data(file, path: str, layout: list, arrays: dict[str, np.ndarray], data_bytes: int) -> int:
    crc = 0
    for entry in layout:
        view = _bytes_of(arrays[entry["name"]])
        for start in range(0, len(view), CHUNK_BYTES):
            chunk = memoryview(view[start:start + CHUNK_BYTES])
            _readinto_exact(file, path, chunk)
            crc = crc32c.crc32c(chunk, value=crc)
        padding = _align(len(view)) - len(view)
        crc = crc32c.crc32c(_read_exact(file, path, padding), value=crc)
    return crc


def _read_exact(file, path: str, size: int) -> bytearray:
    buffer = bytearray(size)
    _readinto_exact(file, path, memoryview(buffer))
    return buffer


def _readinto_exact(file, path: str, view: memoryview) -> None:
    while view:
        count = file.readinto(view)
        if not count:
            raise SnapshotCorrupt(path, "file ends early")
        view = view[count:]


# ---------------------------------------------------------- list and remove

def list_snapshots(dir: str) -> list[SnapshotInfo]:
    """Snapshot files in `dir`, oldest first (not verified; temp files ignored)."""
    if not os.path.isdir(dir):
        return []
    found = []
    for name in os.listdir(dir):
        match = SNAPSHOT_NAME.match(name)
        if match:
            path = os.path.join(dir, name)
            found.append(SnapshotInfo(int(match.group(1)), path, os.path.getsize(path)))
    found.sort(key=lambda info: info.seq)
    return found


def load_latest(dir: str, rows_for: RowsFor | None = None, allocate: Allocate | None = None
                ) -> tuple[int, dict[str, np.ndarray], dict] | None:
    """The newest snapshot that verifies, or None. Invalid ones are logged and skipped."""
    for info in reversed(list_snapshots(dir)):
        try:
            return load_snapshot(info.path, rows_for, allocate)
        except (SnapshotCorrupt, OSError) as error:
            log.warning("snapshot: skipping %s: %s; falling back to an older snapshot",
                        info.path, error)
    return None


def remove_snapshots_before(dir: str, seq: int, *, keep: int = 2) -> list[str]:
    """Deletes snapshots older than `seq`, but never the `keep` newest ones
    (so a damaged newest snapshot still has a fallback). Returns the paths."""
    assert keep >= 1, keep
    snapshots = list_snapshots(dir)
    doomed = [info.path for info in snapshots[:max(0, len(snapshots) - keep)] if info.seq < seq]
    for path in doomed:
        os.unlink(path)
    removed_temp = remove_temp_files(dir)
    if doomed or removed_temp:
        _fsync_dir(dir)
    return doomed


def remove_temp_files(dir: str) -> list[str]:
    """Deletes temp files left by a crash mid-write (single writer per dir)."""
    removed = []
    for name in os.listdir(dir):
        if TEMP_NAME.match(name):
            path = os.path.join(dir, name)
            os.unlink(path)
            log.warning("snapshot: removed %s left by an interrupted write", path)
            removed.append(path)
    return removed
