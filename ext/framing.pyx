# cython: boundscheck=False, wraparound=False
"""The PAY fast path of the frame layer, with no Python object per frame.

A gateway pipelines many small PAY frames; cutting each into a header tuple
and a body bytes object, and packing each reply header, cost more than the
kernel spends on the payment. `take_pay_run` cuts a run of consecutive
well-formed PAY frames out of the read buffer in one call (their bodies
joined, their request ids and sizes in two arrays), and `pack_pay_replies`
writes all their reply frames into one buffer. Anything else (another op, an
odd size, a flag, an incomplete frame) ends the run and is left to the
general path in engine/frame.py.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

import sys

import numpy as np

assert sys.byteorder == "little", "frames are little-endian; so are the header structs here"

cdef enum:
    HEADER_BYTES = 16


cdef packed struct Header:
    uint32_t size
    uint16_t op
    uint16_t flags
    uint64_t request_id


def take_pay_run(const uint8_t[::1] buffer, Py_ssize_t at, uint16_t op_pay,
                 uint32_t record_bytes, Py_ssize_t records_max, Py_ssize_t frame_bytes_max):
    """(frames, end, body, request_ids, sizes) of the longest run of complete
    PAY frames from `at` whose records fit in `records_max`; frames == 0 when
    the frame at `at` is not one (the caller parses it the general way)."""
    cdef Py_ssize_t n = buffer.shape[0], pos = at, records = 0, count, frames = 0
    cdef Py_ssize_t body_bytes = 0
    cdef const Header* h
    # First pass: how far the run goes (no copying yet).
    while n - pos >= HEADER_BYTES:
        h = <const Header*>&buffer[pos]
        if h.op != op_pay or h.flags != 0 or h.size == 0 or h.size % record_bytes:
            break
        if h.size > frame_bytes_max or n - pos - HEADER_BYTES < h.size:
            break
        count = h.size // record_bytes
        if records + count > records_max:
            break
        records += count
        body_bytes += h.size
        frames += 1
        pos += HEADER_BYTES + h.size
    if frames == 0:
        return 0, at, b"", None, None
    body = PyBytes_FromStringAndSize(NULL, body_bytes)     # filled below, then immutable
    request_ids = np.empty(frames, np.uint64)
    sizes = np.empty(frames, np.uint32)
    cdef uint8_t* out = <uint8_t*>PyBytes_AS_STRING(body)
    cdef uint64_t[::1] rid = request_ids
    cdef uint32_t[::1] size = sizes
    cdef Py_ssize_t k, copied = 0
    pos = at
    for k in range(frames):
        h = <const Header*>&buffer[pos]
        rid[k] = h.request_id
        size[k] = h.size
        memcpy(&out[copied], &buffer[pos + HEADER_BYTES], h.size)
        copied += h.size
        pos += HEADER_BYTES + h.size
    return frames, pos, body, request_ids, sizes


def pack_pay_replies(const uint8_t[::1] results, const uint64_t[::1] request_ids,
                     const uint32_t[::1] sizes, uint16_t op_pay):
    """Reply frames for a run: frame k carries the next sizes[k] bytes of
    `results` (a PayResult is as long as a PayRecord), in request order."""
    cdef Py_ssize_t frames = request_ids.shape[0], k, total = 0, at = 0, taken = 0
    for k in range(frames):
        total += HEADER_BYTES + sizes[k]
    assert total - frames * HEADER_BYTES == results.shape[0], "results do not fill the run"
    reply = PyBytes_FromStringAndSize(NULL, total)
    cdef uint8_t* out = <uint8_t*>PyBytes_AS_STRING(reply)
    cdef Header* h
    for k in range(frames):
        h = <Header*>&out[at]
        h.size = sizes[k]
        h.op = op_pay
        h.flags = 0
        h.request_id = request_ids[k]
        memcpy(&out[at + HEADER_BYTES], &results[taken], sizes[k])
        taken += sizes[k]
        at += HEADER_BYTES + sizes[k]
    return reply
