# cython: boundscheck=False, wraparound=False, cdivision=True
"""Byte planes of a batch of fixed-size records: the inner loops of the
replicated stream's format 2 (engine/replication/packing.py owns the format).

Numpy did the same in three passes with temporaries (an XOR of every record
with the first, a reduction, a gather through a strided view): about 45-57 ns
a PAY record each way on this machine, paid by the leader and by every
follower for every payment. Here each way is one pass without the GIL.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcpy, memset

cdef enum:
    STRIDE_LIMIT = 1024             # bytes a record (the biggest is 80)
    WORDS_LIMIT = 128               # STRIDE_LIMIT in u64 words
    BLOCK_RECORDS = 64              # records a pass of gather and scatter takes

STRIDE_MAX = STRIDE_LIMIT


def varying(const uint8_t[::1] records, Py_ssize_t stride) -> bytes:
    """`stride` bytes: 1 for each byte of the record that is not the same
    in every record of `records` (whole records of whole u64 words)."""
    cdef Py_ssize_t count, words, i, k
    cdef uint64_t acc[WORDS_LIMIT]
    cdef const uint64_t* rec
    if stride <= 0 or stride % 8 or stride > STRIDE_LIMIT or records.shape[0] % stride:
        raise ValueError(f"records of {stride} bytes (whole u64 words, at most "
                         f"{STRIDE_LIMIT}) in {records.shape[0]} bytes")
    count = records.shape[0] // stride
    words = stride // 8
    out = PyBytes_FromStringAndSize(NULL, stride)
    cdef uint8_t* flags = <uint8_t*>PyBytes_AS_STRING(out)
    memset(acc, 0, sizeof(acc))
    if count:
        rec = <const uint64_t*>&records[0]
        with nogil:
            for i in range(1, count):
                for k in range(words):
                    acc[k] |= rec[i * words + k] ^ rec[k]
    for k in range(stride):
        flags[k] = ((acc[k // 8] >> (8 * (k % 8))) & 0xFF) != 0
    return out


cdef Py_ssize_t columns(const uint8_t[::1] flags, Py_ssize_t* cols) except -1:
    """The indexes of the flags that are 1 into `cols`; how many."""
    cdef Py_ssize_t k, sent = 0
    for k in range(flags.shape[0]):
        if flags[k] > 1:
            raise ValueError(f"a plane flag of {flags[k]} (0 or 1)")
        if flags[k]:
            cols[sent] = k
            sent += 1
    return sent


def gather(const uint8_t[::1] records, const uint8_t[::1] flags) -> bytes:
    """The planes of `records` whose flag is 1, one after another."""
    cdef Py_ssize_t stride = flags.shape[0]
    cdef Py_ssize_t cols[STRIDE_LIMIT]
    cdef Py_ssize_t count, sent, i, j
    if stride <= 0 or stride > STRIDE_LIMIT or records.shape[0] % stride:
        raise ValueError(f"records of {stride} bytes in {records.shape[0]} bytes")
    count = records.shape[0] // stride
    sent = columns(flags, cols)
    out = PyBytes_FromStringAndSize(NULL, sent * count)
    cdef uint8_t* planes = <uint8_t*>PyBytes_AS_STRING(out)
    cdef const uint8_t* rec
    cdef Py_ssize_t start, end
    if count:
        rec = &records[0]
        with nogil:
            # A block of records at a time (in L1), one plane after another:
            # each plane's bytes are written in a run, not one byte to each
            # of `sent` streams per record.
            start = 0
            while start < count:
                end = start + BLOCK_RECORDS if start + BLOCK_RECORDS < count else count
                for j in range(sent):
                    for i in range(start, end):
                        planes[j * count + i] = rec[i * stride + cols[j]]
                start = end
    return out


def scatter(uint8_t[::1] records, const uint8_t[::1] first, const uint8_t[::1] flags,
            const uint8_t[::1] planes) -> None:
    """Fill `records` (whole records of len(flags) bytes) from the first
    record and the planes whose flag is 1: what `gather` took apart."""
    cdef Py_ssize_t stride = flags.shape[0]
    cdef Py_ssize_t cols[STRIDE_LIMIT]
    cdef Py_ssize_t count, sent, i, j
    if stride <= 0 or stride > STRIDE_LIMIT or records.shape[0] % stride or first.shape[0] != stride:
        raise ValueError(f"records of {stride} bytes in {records.shape[0]} bytes, a first "
                         f"record of {first.shape[0]}")
    count = records.shape[0] // stride
    sent = columns(flags, cols)
    if planes.shape[0] != sent * count:
        raise ValueError(f"{planes.shape[0]} bytes of planes, expected {sent} of {count}")
    cdef uint8_t* rec
    cdef const uint8_t* src
    cdef Py_ssize_t start, end
    if count:
        rec = &records[0]
        src = &planes[0] if sent else NULL
        with nogil:
            start = 0
            while start < count:                                # blocks, as in gather
                end = start + BLOCK_RECORDS if start + BLOCK_RECORDS < count else count
                for i in range(start, end):
                    memcpy(&rec[i * stride], &first[0], stride)
                for j in range(sent):
                    for i in range(start, end):
                        rec[i * stride + cols[j]] = src[j * count + i]
                start = end
