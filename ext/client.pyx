# cython: boundscheck=False, wraparound=False, cdivision=True
"""The client's hot path (engine/client.py), compiled: the twin of
engine/_client_py.py, with the same functions, results and errors (see
there for what each does; tests/client/test_client.py compares the two).

A gateway's single payments used to cost the Python client about 30 us
each: a tuple of range-checked fields, numpy building a one-row structured
array from it, `tolist()` and a struct per result, a header tuple and a
body copy per reply frame. Here a record is checked and written straight
into the connection's pending frame body, and a reply body becomes
PayResult structs of plain ints in one pass, with no numpy in between.
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.dict cimport PyDict_DelItem, PyDict_GetItem
from cpython.ref cimport Py_INCREF, PyObject
cimport numpy as cnp
from cpython.object cimport PyTypeObject
from cpython.long cimport PyLong_AsLongLong, PyLong_AsUnsignedLongLong
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

cimport cython

import sys

import numpy as np

cnp.import_array()

cdef extern from "numpy/arrayobject.h":
    # numpy's own __init__.pxd leaves it out; it steals a reference to descr.
    PyTypeObject PyArray_Type
    object PyArray_NewFromDescr(PyTypeObject* subtype, cnp.PyArray_Descr* descr, int nd,
                                cnp.npy_intp* dims, cnp.npy_intp* strides, void* data,
                                int flags, PyObject* obj)

assert sys.byteorder == "little", "frames and records are little-endian; so are the structs here"

cdef enum:
    HEADER_BYTES = 16
    PAY_BYTES = 80
    ISSUE_BYTES = 32
    PAY_RESULT_BYTES = 80
    ISSUE_RESULT_BYTES = 24
    COUPONS_MAX = 4

# Word for word engine/_client_py.py's (the owner); the twin tests compare errors.
U64_MAX = 2**64 - 1
U32_MAX = 2**32 - 1
I64_MIN, I64_MAX = -2**63, 2**63 - 1
REPLY_BYTES_MAX = 64 << 20


cdef packed struct Header:
    uint32_t size
    uint16_t op
    uint16_t flags
    uint64_t request_id


cdef packed struct PayRecord:
    uint64_t id
    uint64_t payer
    uint64_t merchant
    int64_t amount
    uint32_t flags
    uint32_t goods_tag
    uint64_t coupons[4]
    uint64_t user_data


cdef packed struct IssueRecord:
    uint64_t coupon
    uint64_t stock
    uint64_t user
    uint64_t reserved


cdef packed struct PayResultRow:
    uint64_t id
    uint32_t status
    uint32_t flags
    int64_t cash
    int64_t discount
    int64_t fee
    uint64_t timestamp
    uint64_t coupons[4]


cdef packed struct IssueResultRow:
    uint64_t coupon
    uint32_t status
    uint32_t flags
    uint64_t expires_at


assert sizeof(PayRecord) == PAY_BYTES and sizeof(PayResultRow) == PAY_RESULT_BYTES
assert sizeof(IssueRecord) == ISSUE_BYTES and sizeof(IssueResultRow) == ISSUE_RESULT_BYTES

cdef object PayResult = None
cdef object BatchWaiter = None
cdef object IssueResult = None
cdef object ProtocolError = None


def configure(pay_result, issue_result, protocol_error, batch_waiter):
    """engine/client.py hands over its result, error and batch classes (it owns them)."""
    global PayResult, IssueResult, ProtocolError, BatchWaiter
    PayResult, IssueResult, ProtocolError = pay_result, issue_result, protocol_error
    BatchWaiter = batch_waiter


cdef inline bint is_int(object value):
    return type(value) is int or (isinstance(value, int) and not isinstance(value, bool))


cdef object range_error(str name, object value, object low, object high):
    return ValueError(f"{name} must be an int in {low}..{high}, got {value!r}")


cdef uint64_t u64(str name, object value, uint64_t high) except? 0xFFFFFFFFFFFFFFFF:
    cdef uint64_t x
    if not is_int(value) or value < 0:
        raise range_error(name, value, 0, high)
    try:
        x = PyLong_AsUnsignedLongLong(value)
    except OverflowError:
        raise range_error(name, value, 0, high) from None
    if x > high:
        raise range_error(name, value, 0, high)
    return x


cdef int64_t i64(str name, object value) except? -1:
    if not is_int(value):
        raise range_error(name, value, I64_MIN, I64_MAX)
    try:
        return PyLong_AsLongLong(value)
    except OverflowError:
        raise range_error(name, value, I64_MIN, I64_MAX) from None


cdef char* grow(bytearray out, Py_ssize_t n) except NULL:
    cdef Py_ssize_t size = PyByteArray_GET_SIZE(out)
    PyByteArray_Resize(out, size + n)
    return PyByteArray_AS_STRING(out) + size


def pack_pay(bytearray out, id, payer, merchant, amount, flags, goods_tag, coupons,
             user_data):
    cdef PayRecord r
    cdef Py_ssize_t k, n
    cdef tuple cs = coupons if type(coupons) is tuple else tuple(coupons)
    n = len(cs)
    if n > COUPONS_MAX:
        raise ValueError(f"at most {COUPONS_MAX} coupons, got {n}")
    for k in range(COUPONS_MAX):
        r.coupons[k] = u64("coupon id", cs[k], U64_MAX) if k < n else 0
    r.id = u64("id", id, U64_MAX)
    r.payer = u64("payer", payer, U64_MAX)
    r.merchant = u64("merchant", merchant, U64_MAX)
    r.amount = i64("amount", amount)
    r.flags = <uint32_t>u64("flags", flags, U32_MAX)
    r.goods_tag = <uint32_t>u64("goods_tag", goods_tag, U32_MAX)
    r.user_data = u64("user_data", user_data, U64_MAX)
    memcpy(grow(out, PAY_BYTES), &r, PAY_BYTES)


def pack_issue(bytearray out, coupon, stock, user):
    cdef IssueRecord r
    r.coupon = u64("coupon", coupon, U64_MAX)
    r.stock = u64("stock", stock, U64_MAX)
    r.user = u64("user", user, U64_MAX)
    r.reserved = 0
    memcpy(grow(out, ISSUE_BYTES), &r, ISSUE_BYTES)


cdef Py_ssize_t whole(const uint8_t[::1] body, Py_ssize_t size, str what) except -1:
    if body.shape[0] % size:
        raise ProtocolError(f"a {what} body of {body.shape[0]} bytes is not a whole "
                            f"number of {size}-byte results")
    return body.shape[0] // size


def pay_results(const uint8_t[::1] body):
    cdef Py_ssize_t n = whole(body, PAY_RESULT_BYTES, "PAY"), i, k
    cdef PayResultRow r
    cdef list out = []
    cdef list coupons
    for i in range(n):
        memcpy(&r, &body[i * PAY_RESULT_BYTES], PAY_RESULT_BYTES)
        coupons = []
        for k in range(COUPONS_MAX):
            if r.coupons[k]:
                coupons.append(r.coupons[k])
        out.append(PayResult(r.id, r.status, r.flags, r.cash, r.discount, r.fee,
                             r.timestamp, tuple(coupons)))
    return out


def issue_results(const uint8_t[::1] body):
    cdef Py_ssize_t n = whole(body, ISSUE_RESULT_BYTES, "ISSUE"), i
    cdef IssueResultRow r
    cdef list out = []
    for i in range(n):
        memcpy(&r, &body[i * ISSUE_RESULT_BYTES], ISSUE_RESULT_BYTES)
        out.append(IssueResult(r.coupon, r.status, r.flags, r.expires_at))
    return out


def append_frame(bytearray out, uint16_t op, uint64_t request_id, body):
    frame_into(out, op, request_id, body)


cdef int frame_into(bytearray out, uint16_t op, uint64_t request_id, body) except -1:
    """append_frame's work, callable from Requests.send without a Python call."""
    cdef Py_buffer view
    cdef Header h
    cdef char* p
    if (type(body) is cnp.ndarray and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>body)
            and cnp.PyArray_NBYTES(<cnp.ndarray>body) <= 0xFFFFFFFF):
        # A record array (pay(), issue()): its bytes straight from the array,
        # a quarter of what exporting a structured array's buffer costs.
        h.size = <uint32_t>cnp.PyArray_NBYTES(<cnp.ndarray>body)
        h.op, h.flags, h.request_id = op, 0, request_id
        p = grow(out, HEADER_BYTES + h.size)
        memcpy(p, &h, HEADER_BYTES)
        memcpy(p + HEADER_BYTES, cnp.PyArray_DATA(<cnp.ndarray>body), h.size)
        return 0
    # PyBUF_SIMPLE: the bytes of any C-contiguous exporter (a structured
    # numpy array too) without building its format string.
    PyObject_GetBuffer(body, &view, PyBUF_SIMPLE)
    try:
        if view.len > 0xFFFFFFFF:
            raise ValueError(f"a frame body of {view.len} bytes does not fit the u32 size")
        h.size = <uint32_t>view.len
        h.op = op
        h.flags = 0
        h.request_id = request_id
        p = grow(out, HEADER_BYTES + view.len)
        memcpy(p, &h, HEADER_BYTES)
        memcpy(p + HEADER_BYTES, view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
    return 0


def batch_body(records, dtype, Py_ssize_t batch_max):
    cdef cnp.ndarray a
    cdef Py_ssize_t n
    if not isinstance(records, cnp.ndarray) or (
            <object>cnp.PyArray_DESCR(<cnp.ndarray>records) is not dtype
            and records.dtype != dtype):
        raise TypeError(f"records must be a numpy array of dtype {dtype}, "
                        f"got {getattr(records, 'dtype', type(records).__name__)}")
    a = <cnp.ndarray>records
    n = cnp.PyArray_DIM(a, 0) if cnp.PyArray_NDIM(a) == 1 else 0
    if cnp.PyArray_NDIM(a) != 1 or not 1 <= n <= batch_max:
        raise ValueError(f"a batch holds 1..{batch_max} records, got "
                         f"{n if cnp.PyArray_NDIM(a) == 1 else records.shape}; split it into several calls")
    if not cnp.PyArray_IS_C_CONTIGUOUS(a):
        a = np.ascontiguousarray(a)
    return a


def batch_reply(bytes body, cnp.dtype dtype, Py_ssize_t n):
    cdef cnp.npy_intp dims[1]
    cdef Py_ssize_t size = len(body)
    if size != n * dtype.itemsize:
        raise ProtocolError(f"expected {n} results of {dtype.itemsize} bytes, "
                            f"got a body of {size} bytes")
    dims[0] = n
    Py_INCREF(dtype)                # PyArray_NewFromDescr steals a reference to it
    # Read-only (no NPY_ARRAY_WRITEABLE) over the reply's bytes, no copy: what
    # np.frombuffer gives, without its argument parsing and buffer export.
    reply = PyArray_NewFromDescr(&PyArray_Type, <cnp.PyArray_Descr*>dtype, 1, dims, NULL,
                                 <void*>PyBytes_AS_STRING(body), 0, NULL)
    cnp.set_array_base(reply, body)
    return reply


def resolve(list futures, list results):
    cdef Py_ssize_t i, n = len(futures)
    if len(results) != n:
        raise ProtocolError(f"expected {n} results, got {len(results)}")
    for i in range(n):
        future = futures[i]
        if not future.done():
            future.set_result(results[i])


cdef int hand_over(uint16_t op, uint16_t flags, uint64_t request_id, bytes body,
                   dict pending, room_waiters, slow) except -1:
    """A plain reply (no flags, the op sent) to a Future waiting under its
    request id with no timer of its own, while nobody waits for room,
    resolves that Future here; any other frame goes to slow()."""
    cdef PyObject* found = PyDict_GetItem(pending, request_id)
    cdef tuple entry = <tuple>found if found is not NULL else None
    if (entry is not None and flags == 0 and entry[2] is None
            and type(entry[0]) is not BatchWaiter and entry[1] == op
            and len(room_waiters) == 0):
        PyDict_DelItem(pending, request_id)
        waiter = entry[0]
        if not waiter.done():
            waiter.set_result(body)
    else:
        slow(op, flags, request_id, body)
    return 0


cdef class FrameCutter:
    """Cuts the reply stream into frames; keeps a partial frame for the next feed."""
    cdef bytearray buffer
    cdef readonly object error

    def __cinit__(self):
        self.buffer = bytearray()
        self.error = None

    def feed(self, data):
        cdef list frames = []
        if self.error is None:
            self.consume(data, frames, None, None, None)
        return frames, self.error

    def deliver(self, data, dict pending, room_waiters, slow):
        if self.error is None:
            self.consume(data, None, pending, room_waiters, slow)
        return self.error

    cdef int consume(self, data, list frames, dict pending, room_waiters, slow) except -1:
        """Cut `data` after what is buffered: each complete frame goes to
        `frames` (feed) or is handed over (deliver); a partial one stays."""
        cdef const uint8_t[::1] view
        cdef Py_ssize_t at
        if PyByteArray_GET_SIZE(self.buffer) == 0 and type(data) is bytes:
            view = data                     # the usual case: nothing left over, no copy
            at = self.cut(view, frames, pending, room_waiters, slow)
            if at < view.shape[0]:
                self.buffer += view[at:]
        else:
            self.buffer += data
            view = self.buffer
            at = self.cut(view, frames, pending, room_waiters, slow)
            view = None                     # release the buffer before resizing it
            if at:
                del self.buffer[:at]
        return 0

    cdef Py_ssize_t cut(self, const uint8_t[::1] view, list frames, dict pending,
                        room_waiters, slow) except -1:
        """The offset after the last complete frame; a broken header sets `error`."""
        cdef Py_ssize_t at = 0, end, n = view.shape[0]
        cdef Header h
        while n - at >= HEADER_BYTES:
            memcpy(&h, &view[at], HEADER_BYTES)
            if h.size > REPLY_BYTES_MAX:
                self.error = ProtocolError(f"reply of {h.size} bytes: the stream is broken")
                break
            end = at + HEADER_BYTES + h.size
            if end > n:
                break
            body = PyBytes_FromStringAndSize(<const char*>&view[at + HEADER_BYTES], h.size)
            if frames is not None:
                frames.append((h.op, h.flags, h.request_id, body))
            else:
                hand_over(h.op, h.flags, h.request_id, body, pending, room_waiters, slow)
            at = end
        return at

    @property
    def buffered_bytes(self):
        return PyByteArray_GET_SIZE(self.buffer)


@cython.final                 # no subclass: send() and has_slot() are direct C calls
cdef class Requests:
    """One connection's requests in flight and the frames of this loop tick
    (see engine/_client_py.py): what AsyncClient's request path reads on
    every call, as C fields, and the room check, the Future, the frame and
    the pending entry of a request in one call."""
    cdef public bytearray out
    cdef public dict pending
    cdef public object sweep
    cdef public Py_ssize_t open_frames
    cdef public bint paused, tick_scheduled, closed
    cdef readonly uint64_t next_id, last_id
    cdef readonly Py_ssize_t in_flight_max
    cdef object _timeout_ms
    cdef double timeout_s
    cdef object loop, create_future, time, on_tick, on_sweep, on_expire

    def __init__(self, loop, timeout_ms, Py_ssize_t in_flight_max, on_tick, on_sweep,
                 on_expire):
        self.out, self.pending, self.sweep = bytearray(), {}, None
        self.open_frames, self.paused, self.tick_scheduled, self.closed = 0, False, False, False
        self.next_id, self.last_id = 1, 0
        self.in_flight_max, self.timeout_ms = in_flight_max, timeout_ms
        self.loop, self.create_future, self.time = loop, loop.create_future, loop.time
        self.on_tick, self.on_sweep, self.on_expire = on_tick, on_sweep, on_expire

    @property
    def timeout_ms(self):
        return self._timeout_ms

    @timeout_ms.setter
    def timeout_ms(self, timeout_ms):
        # AsyncClient.timeout_ms sets it: the default timeout of later requests
        self._timeout_ms, self.timeout_s = timeout_ms, timeout_ms / 1000

    cpdef bint has_slot(self):
        return len(self.pending) + self.open_frames < self.in_flight_max

    def has_room(self):
        return self.has_slot() and not self.paused

    def request(self, uint16_t op, body, timeout_ms):
        if self.closed or self.paused or not self.has_slot():
            return None
        future = self.create_future()
        self.send(op, body, future, timeout_ms)
        return future

    cpdef send(self, uint16_t op, body, waiter, timeout_ms):
        cdef uint64_t request_id = self.next_id
        cdef double deadline = 0.0
        frame_into(self.out, op, request_id, body)      # may refuse the body
        self.next_id += 1
        self.last_id = request_id
        if not timeout_ms or timeout_ms == self._timeout_ms:
            timer, deadline = None, self.time() + self.timeout_s
            if self.sweep is None:
                self.sweep = self.loop.call_at(deadline, self.on_sweep)
        else:
            timer = self.loop.call_later(timeout_ms / 1000, self.on_expire, request_id)
        self.pending[request_id] = (waiter, op, timer, deadline)
        if not self.tick_scheduled:
            self.schedule_tick()
        return request_id

    cpdef schedule_tick(self):
        # on_tick runs after every callback already ready in this loop
        # iteration, so all calls made in this tick are in its one write.
        self.tick_scheduled = True
        self.loop.call_soon(self.on_tick)

    def forget(self, request_id):
        cdef PyObject* found = PyDict_GetItem(self.pending, request_id)
        if found is NULL:
            return False
        entry = <tuple>found
        PyDict_DelItem(self.pending, request_id)
        if entry[2] is not None:
            entry[2].cancel()
        return True
