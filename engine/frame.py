"""Frames of PROTOCOL.md: a 16-byte header (u32 size, u16 op, u16 flags,
u64 request_id, little-endian) and a body.

`FrameReader` cuts a byte stream into frames with no per-record work: a PAY
body stays one bytes object that becomes a batch with `np.frombuffer`.
"""
import struct
from dataclasses import dataclass

import msgspec
import numpy as np

from ._framing import pack_pay_replies, take_pay_run
from .status import ErrorCode

HEADER = struct.Struct("<IHHQ")
HEADER_BYTES = HEADER.size
FLAG_ERROR = 1
FRAME_BYTES_MAX_DEFAULT = 1 << 20            # announced in HELLO as max_frame
assert HEADER_BYTES == 16

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
    return HEADER.pack(len(body), op, flags, request_id) + bytes(body)


def encode_map(op: int, request_id: int, reply: dict, flags: int = 0) -> bytes:
    return encode(op, request_id, _encoder.encode(reply), flags)


def encode_error(op: int, request_id: int, code: ErrorCode, message: str,
                 retryable: bool = False) -> bytes:
    body = {"code": int(code), "name": code.name, "message": message, "retryable": retryable}
    return encode_map(op, request_id, body, FLAG_ERROR)


@dataclass(slots=True)
class PayRun:
    """Consecutive well-formed PAY frames cut in one step (ext/framing.pyx):
    their bodies joined, their request ids and body sizes side by side."""
    body: bytes
    request_ids: np.ndarray     # u64
    sizes: np.ndarray           # u32, body bytes of each frame

    def frames(self):
        """(request_id, body) of each frame, for frame-by-frame handling."""
        at = 0
        for request_id, size in zip(self.request_ids.tolist(), self.sizes.tolist()):
            yield request_id, self.body[at:at + size]
            at += size

    def replies(self, results: np.ndarray, op: int) -> bytes:
        """The run's reply frames, one buffer, from its results in order."""
        return pack_pay_replies(results.view(np.uint8), self.request_ids, self.sizes, op)


class FrameReader:
    """Incremental parser: feed() bytes, get complete (op, flags, request_id,
    body) frames, and, when asked for, runs of PAY frames as `PayRun`s."""

    def __init__(self, frame_bytes_max: int = FRAME_BYTES_MAX_DEFAULT):
        self.frame_bytes_max = frame_bytes_max
        self.buffer = bytearray()

    def feed(self, data, pay_run: tuple[int, int, int] | None = None) -> list:
        """`pay_run` = (PAY op, record bytes, records per run at most): cut
        runs of PAY frames in one step instead of frame by frame."""
        if self.buffer:
            self.buffer += data
            buffer = self.buffer
        else:           # the usual case: no partial frame left from the last read
            buffer = data
        frames = []
        at = 0
        while len(buffer) - at >= HEADER_BYTES:
            if pay_run is not None:
                count, end, body, request_ids, sizes = take_pay_run(
                    buffer, at, pay_run[0], pay_run[1], pay_run[2], self.frame_bytes_max)
                if count:
                    frames.append(PayRun(body, request_ids, sizes))
                    at = end
                    continue
            size, op, flags, request_id = HEADER.unpack_from(buffer, at)
            if size > self.frame_bytes_max:
                raise FrameError(ErrorCode.frame_too_large,
                                 f"frame body of {size} bytes is over max_frame "
                                 f"{self.frame_bytes_max}", op, request_id)
            if flags & FLAG_ERROR:
                raise FrameError(ErrorCode.bad_frame,
                                 "a request must not carry the error flag", op, request_id)
            end = at + HEADER_BYTES + size
            if len(buffer) < end:
                break
            frames.append((op, flags, request_id, bytes(buffer[at + HEADER_BYTES:end])))
            at = end
        if buffer is self.buffer:
            if at:
                del buffer[:at]
        elif at < len(buffer):              # keep the partial frame for the next read
            self.buffer += memoryview(buffer)[at:]
        return frames

    @property
    def buffered_bytes(self) -> int:
        return len(self.buffer)
