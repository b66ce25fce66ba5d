"""The formats of the replicated stream's command messages
(docs/replication.md, "Message formats").

A command message carries its commands framed as journal entries
(engine/storage/journal.py: CRC32C over each entry, its command seq).

- Format 1 (no Scanpay-Format header; all that nodes before format 2
  wrote): the entries' bytes as they are.
- Format 2 (`Scanpay-Format: 2`): the same entries, packed. A batch of
  fixed-size records (PAY, ISSUE, CAPTURE and REFUND records) goes as byte
  planes: all its records' byte 0, then all their byte 1, and so on, where a
  plane in which every record holds the same byte is left out (the first
  record, sent whole, gives that byte). Everything else goes as is. In the
  benchmark's traffic 31 of a PAY record's 80 bytes vary within a batch, so
  NATS receives, hashes, compresses, writes (twice on each of 3 servers) and
  serves 2.6 times fewer bytes: the bulk of its CPU per payment.

A reader unpacks to exactly the bytes the leader framed, then checks them as
before (every entry's CRC, the command seqs): the CRC, taken by the leader
over the unpacked entry, checks the packing too.

Packed payload: blocks, one after another, each a BLOCK header then:
- RAW: `head_bytes` bytes of journal entries as they are;
- PLANES: one journal entry: `head_bytes` bytes (the entry's header, the
  command's header and draws), then `stride` bytes saying which planes
  follow (1) or were left out (0), the first record (`stride` bytes), the
  planes sent (`count` bytes each); the entry is the head, `count` records
  of `stride` bytes, and zeros up to the journal's 8-byte alignment.
"""
from __future__ import annotations

import struct

from engine import _packing
from engine.core.command import HEADER as COMMAND_HEADER
from engine.protocol.records import RECORD_DTYPES_BY_OP
from engine.storage.journal import ENTRY_ALIGN_BYTES, ENTRY_HEADER_BYTES

HEADER_FORMAT = "Scanpay-Format"    # a message's format; absent: FORMAT_ENTRIES
FORMAT_ENTRIES = 1                  # the entries as they are (no header)
FORMAT_PLANES = 2
FORMATS = (FORMAT_ENTRIES, FORMAT_PLANES)
# tag, reserved (0), stride, head_bytes, count
BLOCK = struct.Struct("<BBHII")
TAG_RAW, TAG_PLANES = 0, 1
# A batch of fewer records goes as is: its planes would save little.
PLANES_RECORDS_MIN = 64
# The most a message may unpack to: a leader cuts its messages by their
# unpacked size, at most NATS's max_payload, itself at most 64 MiB.
UNPACKED_BYTES_MAX = 64 << 20
# Record sizes by op: the records of every fixed-record op are whole u64
# words (ext/packing.pyx compares them as such).
STRIDES = {op: dtype.itemsize for op, dtype in RECORD_DTYPES_BY_OP.items()}
STRIDE_MAX = _packing.STRIDE_MAX
assert all(stride % 8 == 0 and stride <= STRIDE_MAX for stride in STRIDES.values())


class PackingError(ValueError):
    """A packed payload that does not unpack (the reader stops: StreamCorrupt)."""


def pack(frames: list) -> bytes:
    """The packed payload of journal entries, each a tuple of buffers as
    engine/storage/journal.py's _encode_entry frames it."""
    out: list = []
    raw: list = []
    raw_bytes = 0
    for frame in frames:
        planes = _planes(frame) if len(frame) == 3 else None
        if planes is None:
            raw.extend(frame)
            raw_bytes += sum(len(part) for part in frame)
            continue
        if raw:
            out.append(BLOCK.pack(TAG_RAW, 0, 0, raw_bytes, 0))
            out.extend(raw)
            raw, raw_bytes = [], 0
        out.extend(planes)
    if raw:
        out.append(BLOCK.pack(TAG_RAW, 0, 0, raw_bytes, 0))
        out.extend(raw)
    return b"".join(out)


def _planes(frame: tuple) -> list | None:
    """A PLANES block of one entry (header, command payload, padding), or
    None when it is not a big enough batch of records."""
    header, payload, padding = frame
    op, _reserved, draws, _now = COMMAND_HEADER.unpack_from(payload)
    stride = STRIDES.get(op)
    head = COMMAND_HEADER.size + 8 * draws
    body_bytes = len(payload) - head
    if stride is None or body_bytes < 0 or body_bytes % stride:
        return None
    count = body_bytes // stride
    if count < PLANES_RECORDS_MIN:
        return None
    assert not padding, "whole u64 words need no padding (the reader writes none)"
    records = memoryview(payload)[head:]
    flags = _packing.varying(records, stride)
    if flags.count(1) * count + 2 * stride + 2 * BLOCK.size >= body_bytes:
        return None                     # saves less than a block header: as is
    return [BLOCK.pack(TAG_PLANES, 0, stride, len(header) + head, count), header,
            memoryview(payload)[:head], flags, records[:stride],
            _packing.gather(records, flags)]


def unpack(data) -> bytearray:
    """The journal entries of a packed payload (a bytes-like object), in
    one buffer. Raises PackingError."""
    mv = memoryview(data)
    blocks = list(_blocks(mv))
    out = bytearray(sum(block[-1] for block in blocks))
    at = 0
    for tag, offset, head_bytes, flags, count, size in blocks:
        out[at:at + head_bytes] = mv[offset:offset + head_bytes]
        if tag == TAG_PLANES:
            stride = len(flags)
            offset += head_bytes + 2 * stride
            _packing.scatter(memoryview(out)[at + head_bytes:at + head_bytes + stride * count],
                             mv[offset - stride:offset], flags,
                             mv[offset:offset + flags.count(1) * count])
        at += size                      # (the padding after the records: zeros already)
    return out


def _blocks(mv: memoryview):
    """(tag, offset after the header, head bytes, plane flags, count,
    unpacked bytes) of every block, checked. Raises PackingError."""
    size = len(mv)
    total = offset = 0
    while offset < size:
        if size - offset < BLOCK.size:
            raise PackingError(f"a block header is cut short at byte {offset}")
        tag, reserved, stride, head_bytes, count = BLOCK.unpack_from(mv, offset)
        offset += BLOCK.size
        if reserved != 0 or tag not in (TAG_RAW, TAG_PLANES):
            raise PackingError(f"unknown block (tag {tag}, reserved {reserved}) at byte "
                               f"{offset - BLOCK.size}")
        if tag == TAG_RAW:
            if stride or count:
                raise PackingError(f"a raw block with stride {stride}, count {count}")
            _take(mv, offset, head_bytes)
            block = (tag, offset, head_bytes, b"", 0, head_bytes)
            offset += head_bytes
        else:
            block, offset = _planes_block(mv, offset, stride, head_bytes, count)
        total += block[-1]
        if total > UNPACKED_BYTES_MAX:
            raise PackingError(f"unpacks to more than {UNPACKED_BYTES_MAX} bytes")
        yield block


def _take(mv: memoryview, offset: int, length: int) -> memoryview:
    if offset + length > len(mv):
        raise PackingError(f"a block of {length} bytes at byte {offset} runs past the end "
                           f"({len(mv) - offset} bytes left)")
    return mv[offset:offset + length]


def _planes_block(mv: memoryview, offset: int, stride: int, head_bytes: int,
                  count: int) -> tuple[tuple, int]:
    """A PLANES block at `offset` (after its header), checked: its
    description (as `_blocks` yields it) and the offset after it."""
    if (not 0 < stride <= STRIDE_MAX or count == 0
            or head_bytes < ENTRY_HEADER_BYTES + COMMAND_HEADER.size):
        raise PackingError(f"a planes block of stride {stride}, head {head_bytes} bytes, "
                           f"{count} records")
    body_bytes = stride * count
    if head_bytes + body_bytes > UNPACKED_BYTES_MAX:
        raise PackingError(f"a planes block of {count} records of {stride} bytes")
    flags = bytes(_take(mv, offset + head_bytes, stride))
    sent = flags.count(1)
    if sent + flags.count(0) != stride:
        raise PackingError("a planes block's plane flags are not 0 or 1")
    end = offset + head_bytes + 2 * stride + sent * count
    _take(mv, offset, end - offset)
    padding = -(head_bytes - ENTRY_HEADER_BYTES + body_bytes) % ENTRY_ALIGN_BYTES
    return (TAG_PLANES, offset, head_bytes, flags, count, head_bytes + body_bytes + padding), end
