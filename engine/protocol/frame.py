"""Frames of docs/reference/protocol.md: a 16-byte header (u32 size, u16 op, u16 flags,
u64 request_id, little-endian) and a body.

`FrameReader` cuts a byte stream into frames with no per-record work: a PAY
body stays one bytes object that becomes a batch with `np.frombuffer`. Runs
of PAY frames skip it altogether: `engine._framing.PayBatch` (ext/framing.pyx)
copies them from the read buffer straight into a kernel batch.
"""
import struct

import msgspec

from engine.protocol.limits import FRAME_BYTES_MAX_DEFAULT, FRAME_HEADER_BYTES
from engine.protocol.status import ErrorCode

HEADER = struct.Struct("<IHHQ")
HEADER_BYTES = HEADER.size
FLAG_ERROR = 1
assert HEADER_BYTES == FRAME_HEADER_BYTES

_encoder = msgspec.msgpack.Encoder()


class FrameError(Exception):
    """The stream is unusable (bad header, oversized frame): close after replying."""

    def __init__(self, code: ErrorCode, message: str, op: int = 0, request_id: int = 0):
        super().__init__(message)
        self.code = code
        self.message = message
        self.op = op
        self.request_id = request_id


def encode(op: int, request_id: int, body=b"", flags: int = 0) -> bytes:
    """One frame: header and body in one buffer, one copy of the body (any
    C-contiguous buffer: bytes, a memoryview of records), so one write. The
    only frame encoder: the server and the clients both use it."""
    view = memoryview(body).cast("B")       # its size in bytes, whatever its items
    return b"".join((HEADER.pack(view.nbytes, op, flags, request_id), view))


def encode_map(op: int, request_id: int, reply: dict, flags: int = 0) -> bytes:
    return encode(op, request_id, _encoder.encode(reply), flags)


def encode_error(op: int, request_id: int, code: ErrorCode, message: str,
                 retryable: bool = False) -> bytes:
    body = {"code": int(code), "name": code.name, "message": message, "retryable": retryable}
    return encode_map(op, request_id, body, FLAG_ERROR)


class FrameReader:
    """Incremental parser. A read goes `buffer = begin(data)`, then
    `next_frame(buffer, at)` as long as it returns a frame (others, such as
    the PAY fast path, may consume frames from the same buffer in between),
    then `keep(buffer, at)` for the partial frame left over."""

    def __init__(self, frame_bytes_max: int = FRAME_BYTES_MAX_DEFAULT):
        self.frame_bytes_max = frame_bytes_max
        self.buffer = bytearray()

    def begin(self, data):
        """The bytes to parse: the partial frame of the last read plus `data`,
        or in the usual case (nothing left over) `data` itself, uncopied."""
        if self.buffer:
            self.buffer += data
            return self.buffer
        return data

    def next_frame(self, buffer, at: int):
        """((op, flags, request_id, body), end) of the frame at `at`, or None
        when it is incomplete. Raises FrameError when the stream is unusable."""
        if len(buffer) - at < HEADER_BYTES:
            return None
        size, op, flags, request_id = HEADER.unpack_from(buffer, at)
        if size > self.frame_bytes_max:
            raise FrameError(ErrorCode.frame_too_large,
                             f"frame body of {size} bytes is over max_frame "
                             f"{self.frame_bytes_max}", op, request_id)
        if flags:                           # none for requests: docs/reference/protocol.md
            raise FrameError(ErrorCode.bad_frame,
                             f"request flags must be 0 (got {flags}): protocol.md defines none "
                             f"for requests, and bit 0 marks error replies", op, request_id)
        end = at + HEADER_BYTES + size
        if len(buffer) < end:
            return None
        return (op, flags, request_id, bytes(buffer[at + HEADER_BYTES:end])), end

    def keep(self, buffer, at: int) -> None:
        """Keep what is left of `buffer` from `at` for the next read."""
        if buffer is self.buffer:
            if at:
                del buffer[:at]
        elif at < len(buffer):
            self.buffer += memoryview(buffer)[at:]

    def feed(self, data) -> list:
        """Every complete frame of the stream so far (the general path alone)."""
        buffer = self.begin(data)
        frames, at = [], 0
        while (parsed := self.next_frame(buffer, at)) is not None:
            item, at = parsed
            frames.append(item)
        self.keep(buffer, at)
        return frames

    @property
    def buffered_bytes(self) -> int:
        return len(self.buffer)
