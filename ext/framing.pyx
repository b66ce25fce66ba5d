# cython: boundscheck=False, wraparound=False, cdivision=True
"""The PAY fast path of the frame layer: frames cut straight into a kernel
batch, with no Python object per frame.

Gateways pipeline many small PAY frames over many connections. Cutting each
into a header tuple and a body bytes object, giving it a request object,
queueing it and packing its reply cost the server ten times what the kernel
spends on the payment, and each read usually carries one or two frames. So a
`PayBatch` is filled directly from read buffers: `take` copies the bodies of a
run of well-formed PAY frames onto the batch's records and notes each
frame's (member, request id, records) in a table, where a member is one
connection's share of the batch. Once the batch is durable, `replies` writes
every reply frame into one buffer, grouped by member and in request order
within each, so each connection gets one write.

Anything else (another op, an odd size, a flag, a frame over max_frame, an
incomplete frame) ends a run and is left to the general parser in
engine/protocol/frame.py, which answers or refuses it exactly as for a lone frame.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

import sys

import numpy as np

assert sys.byteorder == "little", "frames are little-endian; so are the header structs here"

cdef enum:
    HEADER_BYTES = 16
    FRAMES_INITIAL = 64


cdef packed struct Header:
    uint32_t size
    uint16_t op
    uint16_t flags
    uint64_t request_id


cdef struct FrameRow:
    int32_t member              # index into the batch's members (connections)
    uint32_t records
    uint64_t request_id


cdef class PayBatch:
    """PAY frames from any number of connections, as one kernel batch.

    A member is one connection's run of frames answered in one reply slot
    (`parts[member]` is that connection and slot); a connection that has
    queued something else meanwhile joins again as a new member, so replies
    keep request order."""
    cdef readonly Py_ssize_t records        # taken so far
    cdef readonly Py_ssize_t frames
    cdef readonly Py_ssize_t records_max
    cdef Py_ssize_t record_bytes, frame_bytes_max
    cdef uint16_t op
    cdef uint8_t* body_buffer
    cdef Py_ssize_t body_records_capacity
    cdef FrameRow* rows
    cdef Py_ssize_t rows_capacity
    cdef public list parts                  # member -> (connection, reply slot)
    cdef public double opened_at            # time.perf_counter() when opened (metrics)

    def __cinit__(self, Py_ssize_t records_max, Py_ssize_t record_bytes,
                  Py_ssize_t frame_bytes_max, uint16_t op):
        assert records_max > 0 and record_bytes > 0
        self.records_max = records_max
        self.record_bytes = record_bytes
        self.frame_bytes_max = frame_bytes_max
        self.op = op
        self.parts = []

    def __dealloc__(self):
        PyMem_Free(self.body_buffer)
        PyMem_Free(self.rows)

    @property
    def room(self) -> int:
        """Records this batch can still take."""
        return self.records_max - self.records

    cdef int reserve(self, Py_ssize_t records, Py_ssize_t frames) except -1:
        """Grow the body and the frame table (doubling, up to records_max) so
        that a batch of a few frames costs a few small allocations."""
        cdef Py_ssize_t capacity
        cdef void* grown
        if records > self.body_records_capacity:
            capacity = max(self.body_records_capacity * 2, records, FRAMES_INITIAL)
            capacity = min(capacity, self.records_max)
            grown = PyMem_Realloc(self.body_buffer, capacity * self.record_bytes)
            if grown == NULL:
                raise MemoryError()
            self.body_buffer = <uint8_t*>grown
            self.body_records_capacity = capacity
        if frames > self.rows_capacity:
            capacity = max(self.rows_capacity * 2, frames, FRAMES_INITIAL)
            capacity = min(capacity, self.records_max)      # a frame holds >= 1 record
            grown = PyMem_Realloc(self.rows, capacity * sizeof(FrameRow))
            if grown == NULL:
                raise MemoryError()
            self.rows = <FrameRow*>grown
            self.rows_capacity = capacity
        return 0

    def take(self, const uint8_t[::1] buffer, Py_ssize_t at, int32_t member,
             Py_ssize_t records_room):
        """Take the run of complete, well-formed PAY frames at `at` for
        `member`, as far as `records_room` and the batch's own room allow.
        Returns (frames, records, end, blocked): `blocked` is the record count
        of the well-formed PAY frame at `end` that did not fit (0 when the run
        ended for another reason), so the caller can open a new batch."""
        cdef Py_ssize_t out[4]
        self.take_run(buffer, at, member, records_room, out)
        return out[0], out[1], out[2], out[3]

    cdef int take_run(self, const uint8_t[::1] buffer, Py_ssize_t at, int32_t member,
                      Py_ssize_t records_room, Py_ssize_t* out) except -1:
        """`take`, with (frames, records, end, blocked) written to out[0..3]."""
        cdef Py_ssize_t n = buffer.shape[0], pos = at, count, run_records = 0, run_frames = 0
        cdef Py_ssize_t blocked = 0
        cdef Py_ssize_t room = min(records_room, self.records_max - self.records)
        cdef const Header* h
        # First pass: how far the run goes.
        while n - pos >= HEADER_BYTES:
            h = <const Header*>&buffer[pos]
            if h.op != self.op or h.flags != 0 or h.size == 0 or h.size % self.record_bytes:
                break
            if h.size > self.frame_bytes_max or n - pos - HEADER_BYTES < h.size:
                break
            count = h.size // self.record_bytes
            if run_records + count > room:
                blocked = count
                break
            run_records += count
            run_frames += 1
            pos += HEADER_BYTES + h.size
        out[0] = run_frames
        out[1] = run_records
        out[2] = pos
        out[3] = blocked
        if run_frames == 0:
            return 0
        self.reserve(self.records + run_records, self.frames + run_frames)
        cdef uint8_t* body = self.body_buffer + self.records * self.record_bytes
        cdef FrameRow* row = self.rows + self.frames
        pos = at
        for _ in range(run_frames):
            h = <const Header*>&buffer[pos]
            row.member = member
            row.records = h.size // self.record_bytes
            row.request_id = h.request_id
            memcpy(body, &buffer[pos + HEADER_BYTES], h.size)
            body += h.size
            row += 1
            pos += HEADER_BYTES + h.size
        self.records += run_records
        self.frames += run_frames
        return 0

    def body(self) -> bytes:
        """The batch's records, one buffer, for the journal and the kernel."""
        return PyBytes_FromStringAndSize(<char*>self.body_buffer, self.records * self.record_bytes)

    def replies(self, const uint8_t[::1] results):
        """(buffer, ends): every reply frame, grouped by member (member m's
        are buffer[ends[m-1]:ends[m]]), each member's in request order. Frame
        k's reply carries its records' results (a PayResult is as long as a
        PayRecord)."""
        cdef Py_ssize_t members = len(self.parts), k, m, taken = 0, size
        assert results.shape[0] == self.records * self.record_bytes, "results do not fill the batch"
        ends = np.zeros(members, np.int64)
        cdef int64_t[::1] end = ends
        for k in range(self.frames):        # bytes per member, then where each one's begin
            m = self.rows[k].member
            assert 0 <= m < members
            end[m] += HEADER_BYTES + self.rows[k].records * self.record_bytes
        for m in range(1, members):
            end[m] += end[m - 1]
        cursor = np.empty(members, np.int64)
        cdef int64_t[::1] at = cursor
        for m in range(members):
            at[m] = end[m - 1] if m else 0
        reply = PyBytes_FromStringAndSize(NULL, end[members - 1] if members else 0)
        cdef uint8_t* out = <uint8_t*>PyBytes_AS_STRING(reply)
        cdef Header* h
        for k in range(self.frames):
            m = self.rows[k].member
            size = self.rows[k].records * self.record_bytes
            h = <Header*>&out[at[m]]
            h.size = <uint32_t>size
            h.op = self.op
            h.flags = 0
            h.request_id = self.rows[k].request_id
            memcpy(&out[at[m] + HEADER_BYTES], &results[taken], size)
            taken += size
            at[m] += HEADER_BYTES + size
        return reply, ends

    def request_ids(self, int32_t member):
        """The request ids of one member's frames, in order (for error replies)."""
        cdef Py_ssize_t k
        return np.array([self.rows[k].request_id for k in range(self.frames)
                         if self.rows[k].member == member], np.uint64)


cdef enum:
    INTAKE_BATCHES_PER_READ_MAX = 256       # a 1 MiB read of 1-record frames fills about 2


def intake_pay(writer, conn, buffer, Py_ssize_t at):
    """The PAY fast path of one read (engine/server/writer.py, engine/server/connection.py):
    take the run of PAY frames at `at` of `buffer` for `conn` into the
    writer's open PayBatch, opening batches as they fill. Returns where the
    frames taken end: `at` itself when the frame there is not for this path
    (another op, malformed, incomplete) or the writer's queue is full, so the
    general path answers it as a lone frame."""
    cdef const uint8_t[::1] view = buffer
    cdef PayBatch batch
    cdef Py_ssize_t out[4]
    cdef Py_ssize_t room, member, frames, records, request_bytes, taken = 0
    cdef bint joined
    for _ in range(INTAKE_BATCHES_PER_READ_MAX):
        if writer.stopping:
            break
        room = writer.queue_records_max - writer.queued_records
        if room <= 0:
            break
        batch = writer.pay_batch
        if batch is None or batch.records == batch.records_max:
            batch = writer.open_pay_batch()
        joined = conn.pay_batch is batch    # and its slot there is still its latest
        member = conn.pay_member if joined else len(batch.parts)
        batch.take_run(view, at, <int32_t>member, room, out)
        frames, records = out[0], out[1]
        if frames:
            if joined:
                slot = conn.pay_slot
            else:
                slot = conn.open_slot()
                batch.parts.append((conn, slot))
                conn.pay_batch = batch
                conn.pay_member = member
                conn.pay_slot = slot
            request_bytes = records * batch.record_bytes
            slot.frames += frames
            slot.request_bytes += request_bytes
            conn.inflight_frames += frames
            conn.inflight_bytes += request_bytes
            writer.queued_records += records
            taken += records
            at = out[2]
        elif batch.records == 0:            # opened for nothing: take it back
            writer.drop_pay_batch(batch)
        if out[3] == 0 or out[3] > min(<Py_ssize_t>writer.batch_records_max, room - records):
            break
        writer.pay_batch = None             # full for the next frame: open the next batch
    if taken:
        writer.wake.set()
    return at


# -- MessagePack map bodies: depth and repeated keys (engine/server/msgpack_guard.py) --

cdef enum:
    MSGPACK_DEPTH_LIMIT = 64                # the stack below; DEPTH_MAX may not exceed it


cdef inline uint64_t big_endian(const uint8_t[::1] data, Py_ssize_t at, int width):
    cdef uint64_t value = 0
    cdef int i
    for i in range(width):
        value = (value << 8) | data[at + i]
    return value


cdef object map_key(const uint8_t[::1] data, Py_ssize_t at, Py_ssize_t end, Py_ssize_t* after):
    """The decoded key at `at` (a str or an int); where its value starts goes to *after."""
    cdef uint8_t b = data[at]
    cdef int width
    cdef Py_ssize_t start, size
    if b <= 0x7f:
        after[0] = at + 1
        return b
    if b >= 0xe0:
        after[0] = at + 1
        return <int>b - 0x100
    if 0xa0 <= b <= 0xbf or 0xd9 <= b <= 0xdb:
        if b <= 0xbf:
            start, size = at + 1, b & 0x1f
        else:
            width = 1 << (b - 0xd9)
            if at + 1 + width > end:
                raise ValueError("the body ends inside a map key")
            start = at + 1 + width
            size = <Py_ssize_t>big_endian(data, at + 1, width)
        if size > end - start:
            raise ValueError("the body ends inside a map key")
        after[0] = start + size
        try:
            return (<const char*>&data[start])[:size].decode("utf-8") if size else ""
        except UnicodeDecodeError:
            raise ValueError("a map key is not UTF-8") from None
    if 0xcc <= b <= 0xd3:
        width = 1 << ((b - 0xcc) & 3)
        if at + 1 + width > end:
            raise ValueError("the body ends inside a map key")
        after[0] = at + 1 + width
        value = big_endian(data, at + 1, width)
        if b >= 0xd0 and value >> (8 * width - 1):    # signed and negative
            return <object>value - ((<object>1) << (8 * width))
        return value
    raise ValueError(f"map keys must be strings or integers (byte 0x{b:02x} at {at})")


cdef Py_ssize_t skip_item(const uint8_t[::1] data, Py_ssize_t at, Py_ssize_t end,
                          Py_ssize_t* count, bint* is_map) except -1:
    """Where the item after the one at `at` starts. For a container, its item
    count (a map's keys and values both count) goes to *count, else -1."""
    cdef uint8_t b = data[at]
    cdef int width
    count[0] = -1
    is_map[0] = False
    if b <= 0x7f or b >= 0xe0 or b == 0xc0 or b == 0xc2 or b == 0xc3:
        return at + 1
    if b <= 0x8f:
        count[0], is_map[0] = (b & 0x0f) * 2, True
        return at + 1
    if b <= 0x9f:
        count[0] = b & 0x0f
        return at + 1
    if b <= 0xbf:
        return at + 1 + (b & 0x1f)
    if b == 0xca or b == 0xcb:
        return at + (5 if b == 0xca else 9)
    if 0xcc <= b <= 0xd3:
        return at + 1 + (1 << ((b - 0xcc) & 3))
    if 0xd4 <= b <= 0xd8:
        return at + 2 + (1 << (b - 0xd4))
    if 0xc4 <= b <= 0xc9 or 0xd9 <= b <= 0xdb:     # bin, ext, str: a length, then data
        width = 1 << ((b - 0xc4) % 3 if b <= 0xc9 else b - 0xd9)
        if at + 1 + width > end:
            raise ValueError("the body ends inside an item")
        return at + 1 + width + (1 if 0xc7 <= b <= 0xc9 else 0) + <Py_ssize_t>big_endian(
            data, at + 1, width)
    if 0xdc <= b <= 0xdf:
        width = 2 if b == 0xdc or b == 0xde else 4
        if at + 1 + width > end:
            raise ValueError("the body ends inside an item")
        is_map[0] = b >= 0xde
        count[0] = <Py_ssize_t>big_endian(data, at + 1, width) * (2 if is_map[0] else 1)
        return at + 1 + width
    raise ValueError(f"byte 0x{b:02x} at {at} is not MessagePack")


def check_map_body(const uint8_t[::1] data, int depth_max):
    """Raise ValueError if the MessagePack item in `data` nests containers
    deeper than `depth_max` or repeats a key in a map (keys compared decoded).
    Iterative: an explicit stack, never the C or Python stack. Malformed
    MessagePack past what this walk needs is left for the decoder to refuse."""
    cdef Py_ssize_t end = data.shape[0], at = 0, step, count = 0, after = 0
    cdef int64_t left[MSGPACK_DEPTH_LIMIT]
    cdef bint is_map[MSGPACK_DEPTH_LIMIT]
    cdef int depth = 0
    cdef bint container_is_map = False
    if not 0 < depth_max <= MSGPACK_DEPTH_LIMIT:
        raise ValueError(f"depth_max must be 1..{MSGPACK_DEPTH_LIMIT}")
    keys = []                               # per open container: its keys (a set) or None
    for step in range(2 * end + 2):         # a step takes a byte or closes a container
        if depth:
            if left[depth - 1] == 0:
                depth -= 1
                keys.pop()
                continue
            left[depth - 1] -= 1
            if is_map[depth - 1] and left[depth - 1] % 2:    # odd items left: a key
                if at >= end:
                    raise ValueError("the body ends inside a map")
                key = map_key(data, at, end, &after)
                seen = keys[depth - 1]
                if key in seen:
                    raise ValueError(f"a map repeats the key {key!r}")
                seen.add(key)
                at = after
                continue
        elif at:
            return                          # the top-level item is done
        if at >= end:
            raise ValueError("the body ends inside an item")
        at = skip_item(data, at, end, &count, &container_is_map)
        if count >= 0:
            if count > end - at:            # each item takes at least one byte
                raise ValueError(f"a container of {count} items does not fit in the body")
            if depth >= depth_max:
                raise ValueError(f"the body nests deeper than {depth_max} levels")
            left[depth] = count
            is_map[depth] = container_is_map
            keys.append(set() if container_is_map else None)
            depth += 1
    raise AssertionError("the walk takes one byte or more per step")
