# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The load generator's event loop (bench/loadgen.py), with the GIL released.

A load generator written in Python costs more per frame than the server it
measures: at 100-200 k single-record frames a second it filled its own core,
fell behind its schedule and read replies late, so part of every latency it
reported was its own. This loop drives PAY frames over already-connected,
non-blocking sockets with epoll and plain send/recv, no Python object per
frame or per reply:

- closed loop (`rate_per_s == 0`): every connection keeps `window` frames in
  flight and sends as many new ones as replies arrive, in one send;
- open loop: frame i is due at start + i / frame_rate, and the frames due are
  handed out round robin on a `tick_us` tick, one send per connection per
  tick; a connection with `window` frames in flight keeps the rest in a
  backlog (bounded; overflow is counted and dropped), so latency is measured
  both from the actual send and from the scheduled time (coordinated
  omission corrected).

Every record is a copy of the next row of the traffic pool with a fresh
payment id. Latencies go into per-microsecond count arrays (exact; values
past `HIST_US_MAX` fold into the last bucket, and the true maximum is kept),
which the caller turns into an HdrHistogram.
"""
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memmove, memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

import numpy as np

cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void* ptr
        int fd
        uint32_t u32
        uint64_t u64
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    enum:
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLL_CTL_ADD
        EPOLL_CTL_MOD
        EPOLL_CTL_DEL
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event* event)
    int epoll_pwait2(int epfd, epoll_event* events, int maxevents, const timespec* timeout,
                     const void* sigmask)

cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    ssize_t recv(int fd, void* buf, size_t n, int flags)
    enum:
        MSG_NOSIGNAL

cdef extern from "<unistd.h>" nogil:
    int close(int fd)

cdef enum:
    HIST_US_MAX = 2_000_000                 # 2 s; slower replies land in the last bucket
    ERROR_SAMPLES_MAX = 32                  # error bodies kept for the caller to name
    ERROR_SAMPLE_BYTES = 512
    HEADER_BYTES = 16
    FLAG_ERROR = 1
    EVENTS_MAX = 256
    READS_PER_WAKE_MAX = 64                 # bounded loop: recv calls per ready socket
    DRAIN_NS = 2_000_000_000                # after the run: wait this long for replies
    STATUS_SLOTS = 64

HISTOGRAM_US_MAX = HIST_US_MAX


cdef packed struct Header:
    uint32_t size
    uint16_t op
    uint16_t flags
    uint64_t request_id


cdef struct Conn:
    int fd
    bint open_
    bint want_out                           # EPOLLOUT registered: a send was short
    uint64_t next_rid
    int64_t inflight                        # frames queued or sent, not yet answered
    uint8_t* rbuf
    Py_ssize_t rlen
    uint8_t* wbuf
    Py_ssize_t wlen
    Py_ssize_t woff
    int64_t* sent_ns                        # by request id & ring mask
    int64_t* sched_ns
    int64_t* backlog_ns                     # open loop: due frames not yet sent (a ring)
    Py_ssize_t backlog_head
    Py_ssize_t backlog_len


cdef inline int64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1_000_000_000 + ts.tv_nsec


cdef class Loop:
    """One run of the load generator over `fds` (connected, non-blocking)."""
    cdef Conn* conns
    cdef int n_conns
    cdef int epfd
    cdef const uint8_t[:, ::1] pool
    cdef Py_ssize_t pool_at
    cdef uint64_t next_id
    cdef Py_ssize_t records, record_bytes, frame_bytes, reply_frame_bytes
    cdef Py_ssize_t window, ring_mask, backlog_max, rbuf_bytes
    cdef uint16_t op
    cdef bint measuring, stopping
    # results
    cdef int64_t frames, payments, sent_frames, error_count, connection_lost, backlog_dropped
    cdef int64_t max_send_ns, max_sched_ns, measure_start_ns, measure_end_ns, bad_replies
    cdef int64_t[::1] hist_send, hist_sched, statuses
    cdef Py_ssize_t hist_max
    cdef uint8_t[:, ::1] error_samples
    cdef int64_t[::1] error_sample_bytes
    cdef Py_ssize_t error_samples_kept

    def __cinit__(self, fds, const uint8_t[:, ::1] pool, uint64_t id_base,
                  Py_ssize_t records, Py_ssize_t window, Py_ssize_t backlog_max=100_000,
                  uint16_t op=16):
        cdef Py_ssize_t ring = 4096, i
        cdef Conn* c
        assert pool.shape[0] > 0 and records > 0 and window > 0 and len(fds) > 0
        assert backlog_max > 0
        self.pool = pool
        self.record_bytes = pool.shape[1]
        self.records = records
        self.frame_bytes = HEADER_BYTES + records * self.record_bytes
        self.reply_frame_bytes = self.frame_bytes          # a PayResult is as long as a record
        self.window = window
        while ring < 2 * window:
            ring *= 2
        self.ring_mask = ring - 1
        self.backlog_max = backlog_max
        self.rbuf_bytes = max(4 * self.reply_frame_bytes, 256 * 1024)
        self.next_id = id_base
        self.op = op
        self.hist_max = HIST_US_MAX
        self.hist_send = np.zeros(HIST_US_MAX + 1, np.int64)
        self.hist_sched = np.zeros(HIST_US_MAX + 1, np.int64)
        self.statuses = np.zeros(STATUS_SLOTS, np.int64)
        self.error_samples = np.zeros((ERROR_SAMPLES_MAX, ERROR_SAMPLE_BYTES), np.uint8)
        self.error_sample_bytes = np.zeros(ERROR_SAMPLES_MAX, np.int64)
        self.n_conns = len(fds)
        self.epfd = epoll_create1(0)
        if self.epfd < 0:
            raise OSError(errno, "epoll_create1 failed")
        self.conns = <Conn*>PyMem_Malloc(self.n_conns * sizeof(Conn))
        if self.conns == NULL:
            raise MemoryError()
        memset(self.conns, 0, self.n_conns * sizeof(Conn))
        for i in range(self.n_conns):
            c = &self.conns[i]
            c.fd = fds[i]
            c.open_ = True
            c.next_rid = 1
            c.rbuf = <uint8_t*>PyMem_Malloc(self.rbuf_bytes)
            c.wbuf = <uint8_t*>PyMem_Malloc(window * self.frame_bytes)
            c.sent_ns = <int64_t*>PyMem_Malloc(ring * sizeof(int64_t))
            c.sched_ns = <int64_t*>PyMem_Malloc(ring * sizeof(int64_t))
            c.backlog_ns = <int64_t*>PyMem_Malloc(max(backlog_max, 1) * sizeof(int64_t))
            if (c.rbuf == NULL or c.wbuf == NULL or c.sent_ns == NULL or c.sched_ns == NULL
                    or c.backlog_ns == NULL):
                raise MemoryError()
            self.watch(i, EPOLL_CTL_ADD, EPOLLIN)

    def __dealloc__(self):
        cdef int i
        if self.conns != NULL:
            for i in range(self.n_conns):
                PyMem_Free(self.conns[i].rbuf)
                PyMem_Free(self.conns[i].wbuf)
                PyMem_Free(self.conns[i].sent_ns)
                PyMem_Free(self.conns[i].sched_ns)
                PyMem_Free(self.conns[i].backlog_ns)
            PyMem_Free(self.conns)
        if self.epfd >= 0:
            close(self.epfd)

    cdef int watch(self, int i, int op, uint32_t events) noexcept nogil:
        cdef epoll_event ev
        ev.events = events
        ev.data.u64 = i
        return epoll_ctl(self.epfd, op, self.conns[i].fd, &ev)

    # -- sending ------------------------------------------------------------

    cdef void queue_frame(self, Conn* c, int64_t sched) noexcept nogil:
        """Append one PAY frame of fresh records to the connection's send buffer."""
        cdef Py_ssize_t k, row
        cdef uint8_t* out
        cdef Header* h
        cdef uint64_t rid = c.next_rid
        if c.woff:                                  # keep the unsent bytes at the front
            memmove(c.wbuf, c.wbuf + c.woff, c.wlen - c.woff)
            c.wlen -= c.woff
            c.woff = 0
        out = c.wbuf + c.wlen
        h = <Header*>out
        h.size = <uint32_t>(self.records * self.record_bytes)
        h.op = self.op
        h.flags = 0
        h.request_id = rid
        out += HEADER_BYTES
        for k in range(self.records):
            row = self.pool_at
            self.pool_at += 1
            if self.pool_at == self.pool.shape[0]:
                self.pool_at = 0
            memcpy(out, &self.pool[row, 0], self.record_bytes)
            (<uint64_t*>out)[0] = self.next_id      # the record's payment id: fresh
            self.next_id += 1
            out += self.record_bytes
        c.wlen += self.frame_bytes
        c.next_rid += 1
        c.inflight += 1
        c.sent_ns[rid & self.ring_mask] = 0         # set when the bytes leave
        c.sched_ns[rid & self.ring_mask] = sched
        self.sent_frames += 1

    cdef void flush(self, int i) noexcept nogil:
        """Send what is queued; the send time of each frame is when its last
        byte was handed to the socket."""
        cdef Conn* c = &self.conns[i]
        cdef ssize_t sent
        cdef Py_ssize_t before, at, end
        cdef int64_t t
        cdef uint64_t rid
        while c.open_ and c.wlen > c.woff:
            sent = send(c.fd, c.wbuf + c.woff, c.wlen - c.woff, MSG_NOSIGNAL)
            if sent < 0:
                if errno == EINTR:
                    continue
                if errno == EAGAIN:
                    break
                self.lose(i)
                return
            # stamp the frames whose last byte went out in this send
            t = now_ns()
            before = c.woff
            c.woff += sent
            at = 0
            while at < c.wlen:
                end = at + self.frame_bytes
                if end > before and end <= c.woff:
                    rid = (<Header*>(c.wbuf + at)).request_id
                    c.sent_ns[rid & self.ring_mask] = t
                    if c.sched_ns[rid & self.ring_mask] == 0:
                        c.sched_ns[rid & self.ring_mask] = t
                at = end
        if c.wlen == c.woff:
            c.wlen = 0
            c.woff = 0
        if c.open_ and (c.wlen > 0) != c.want_out:
            c.want_out = c.wlen > 0
            self.watch(i, EPOLL_CTL_MOD, EPOLLIN | (EPOLLOUT if c.want_out else 0))

    cdef void top_up(self, int i) noexcept nogil:
        """Closed loop: refill the window. Open loop: send the backlog first."""
        cdef Conn* c = &self.conns[i]
        if self.stopping or not c.open_:
            return
        while c.backlog_len and c.inflight < self.window:
            self.queue_frame(c, c.backlog_ns[c.backlog_head])
            c.backlog_head = (c.backlog_head + 1) % self.backlog_max
            c.backlog_len -= 1

    cdef void due(self, int i, int64_t sched) noexcept nogil:
        """Open loop: a frame scheduled for `sched` goes to connection i."""
        cdef Conn* c = &self.conns[i]
        if not c.open_:
            return
        if c.backlog_len == 0 and c.inflight < self.window:
            self.queue_frame(c, sched)
        elif c.backlog_len < self.backlog_max:
            c.backlog_ns[(c.backlog_head + c.backlog_len) % self.backlog_max] = sched
            c.backlog_len += 1
        else:
            self.backlog_dropped += 1

    # -- receiving ----------------------------------------------------------

    cdef void lose(self, int i) noexcept nogil:
        cdef Conn* c = &self.conns[i]
        if c.open_:
            c.open_ = False
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, c.fd, NULL)
            if not self.stopping:
                self.connection_lost += 1

    cdef void receive(self, int i) noexcept nogil:
        cdef Conn* c = &self.conns[i]
        cdef ssize_t got
        cdef int reads = 0
        while c.open_ and reads < READS_PER_WAKE_MAX:
            reads += 1
            if c.rlen == self.rbuf_bytes:           # a reply larger than the buffer
                self.bad_replies += 1
                self.lose(i)
                return
            got = recv(c.fd, c.rbuf + c.rlen, self.rbuf_bytes - c.rlen, 0)
            if got < 0:
                if errno == EINTR:
                    continue
                if errno != EAGAIN:
                    self.lose(i)
                return
            if got == 0:
                self.lose(i)
                return
            c.rlen += got
            self.parse(i, now_ns())
            if got < self.rbuf_bytes - c.rlen:      # short read: the socket is drained
                return

    cdef void parse(self, int i, int64_t t) noexcept nogil:
        cdef Conn* c = &self.conns[i]
        cdef Py_ssize_t at = 0, end, k, n
        cdef const Header* h
        cdef uint64_t slot
        cdef uint32_t status
        cdef int64_t lat
        while c.rlen - at >= HEADER_BYTES:
            h = <const Header*>(c.rbuf + at)
            end = at + HEADER_BYTES + h.size
            if end > c.rlen:
                break
            slot = h.request_id & self.ring_mask
            c.inflight -= 1
            if self.measuring:
                if h.flags & FLAG_ERROR:
                    self.keep_error(c.rbuf + at + HEADER_BYTES, h.size)
                else:
                    n = h.size // self.record_bytes
                    if h.size % self.record_bytes or n != self.records:
                        self.bad_replies += 1
                    for k in range(n):
                        status = (<const uint32_t*>(c.rbuf + at + HEADER_BYTES
                                                    + k * self.record_bytes + 8))[0]
                        self.statuses[min(status, STATUS_SLOTS - 1)] += 1
                    self.frames += 1
                    self.payments += n
                    lat = t - c.sent_ns[slot]
                    self.record(&self.hist_send[0], lat)
                    if lat > self.max_send_ns:
                        self.max_send_ns = lat
                    lat = t - c.sched_ns[slot]
                    self.record(&self.hist_sched[0], lat)
                    if lat > self.max_sched_ns:
                        self.max_sched_ns = lat
            at = end
        if at:
            memmove(c.rbuf, c.rbuf + at, c.rlen - at)
            c.rlen -= at

    cdef inline void record(self, int64_t* hist, int64_t lat_ns) noexcept nogil:
        cdef int64_t us = lat_ns // 1000
        if us < 1:
            us = 1
        if us > self.hist_max:
            us = self.hist_max
        hist[us] += 1

    cdef void keep_error(self, const uint8_t* body, Py_ssize_t size) noexcept nogil:
        self.error_count += 1
        if self.error_samples_kept < ERROR_SAMPLES_MAX:
            size = min(size, ERROR_SAMPLE_BYTES)
            memcpy(&self.error_samples[self.error_samples_kept, 0], body, size)
            self.error_sample_bytes[self.error_samples_kept] = size
            self.error_samples_kept += 1

    # -- the loop -----------------------------------------------------------

    def run(self, double rate_per_s, int64_t tick_us, double warmup_s, double duration_s):
        """Drive the load; returns the figures as a dict (see bench/loadgen.py)."""
        with nogil:
            self.drive(rate_per_s, tick_us * 1000, <int64_t>(warmup_s * 1e9),
                       <int64_t>(duration_s * 1e9))
        samples = [bytes(self.error_samples[k, :self.error_sample_bytes[k]])
                   for k in range(self.error_samples_kept)]
        return {
            "frames": self.frames, "payments": self.payments, "sent_frames": self.sent_frames,
            "measured_s": (self.measure_end_ns - self.measure_start_ns) / 1e9,
            "error_count": self.error_count, "error_samples": samples,
            "connection_lost": self.connection_lost, "backlog_dropped": self.backlog_dropped,
            "bad_replies": self.bad_replies,
            "statuses": np.asarray(self.statuses).copy(),
            "hist_send_us": np.asarray(self.hist_send), "hist_sched_us": np.asarray(self.hist_sched),
            "max_send_us": self.max_send_ns // 1000, "max_sched_us": self.max_sched_ns // 1000,
        }

    cdef void drive(self, double rate_per_s, int64_t tick_ns, int64_t warmup_ns,
                    int64_t duration_ns) noexcept nogil:
        cdef epoll_event[EVENTS_MAX] events
        cdef timespec wait
        cdef int64_t t0 = now_ns(), t, t_measure, t_end, next_tick, frame_due, wait_ns
        cdef int64_t frames_scheduled = 0, drain_until
        cdef double period_ns = 1e9 * self.records / rate_per_s if rate_per_s > 0 else 0
        cdef bint open_loop = rate_per_s > 0
        cdef int i, k, nev, rr = 0
        t_measure = t0 + warmup_ns
        t_end = t_measure + duration_ns
        next_tick = t0
        if not open_loop:
            for i in range(self.n_conns):
                while self.conns[i].inflight < self.window:
                    self.queue_frame(&self.conns[i], 0)
                self.flush(i)
        while True:
            t = now_ns()
            if not self.measuring and t >= t_measure:
                self.measuring = True
                self.measure_start_ns = t
            if t >= t_end:
                break
            if open_loop and t >= next_tick:
                # every frame due by now, round robin over the connections
                frame_due = <int64_t>((t - t0) / period_ns) + 1
                while frames_scheduled < frame_due:
                    self.due(rr, t0 + <int64_t>(frames_scheduled * period_ns))
                    rr = (rr + 1) % self.n_conns
                    frames_scheduled += 1
                for i in range(self.n_conns):
                    self.flush(i)
                next_tick += tick_ns
                if next_tick <= t:              # behind: no burst of catch-up ticks
                    next_tick = t + tick_ns
            wait_ns = (next_tick if open_loop else t_end) - t
            wait_ns = max(0, min(wait_ns, 50_000_000))
            wait.tv_sec = wait_ns // 1_000_000_000
            wait.tv_nsec = wait_ns % 1_000_000_000
            nev = epoll_pwait2(self.epfd, events, EVENTS_MAX, &wait, NULL)
            for k in range(nev):
                i = <int>events[k].data.u64
                if events[k].events & (EPOLLIN | EPOLLERR | EPOLLHUP):
                    self.receive(i)
                if self.conns[i].open_:
                    if open_loop:
                        self.top_up(i)
                    else:
                        while self.conns[i].inflight < self.window:
                            self.queue_frame(&self.conns[i], 0)
                    self.flush(i)
            if self.all_lost():
                break
        self.measuring = False
        self.measure_end_ns = now_ns()
        self.stopping = True
        # let what is in flight land (not counted), then hand the sockets back
        drain_until = now_ns() + DRAIN_NS
        while now_ns() < drain_until and self.any_inflight():
            wait.tv_sec = 0
            wait.tv_nsec = 10_000_000
            nev = epoll_pwait2(self.epfd, events, EVENTS_MAX, &wait, NULL)
            for k in range(nev):
                i = <int>events[k].data.u64
                self.receive(i)
                self.flush(i)

    cdef bint all_lost(self) noexcept nogil:
        cdef int i
        for i in range(self.n_conns):
            if self.conns[i].open_:
                return False
        return True

    cdef bint any_inflight(self) noexcept nogil:
        cdef int i
        for i in range(self.n_conns):
            if self.conns[i].open_ and self.conns[i].inflight > 0:
                return True
        return False
