# cython: boundscheck=False, wraparound=False, cdivision=True
"""PAY replies sent by a sender thread the moment their fsync returns.

At 100-200 k single-record PAY frames a second from 64 connections, the
event loop spent about a third of its time in the reply writes (on loopback
a send also runs the receiver's TCP input), and every reply waited for the
loop to wake up after the fsync and reach its connection in the release
round. The replies of a PAY batch are known as soon as the kernel applied it
(before its fsync), so the writer queues them here (`Sends`, one per fsync).
The sync thread hands each `Sends` over once its fdatasync has returned,
through a `Courier` (a C queue and condition), and the sender thread
(engine/server/writer.py) waits there and sends them without the GIL, one sendmsg
per connection, while the sync thread goes on with the next fsync. (With a
Python queue the woken sender first had to take the GIL back from the busy
event loop: the `send` stage measured 0.77-1.10 ms on the mean that way,
0.58-0.78 ms with the courier, twelve runs each side by side.)
No reply can leave before its fsync: a `Sends` is handed over only after
the fsync covering its batches returned.

Order per connection is the hard part, and `Outlet` keeps it: the writer
queues a member only if every earlier reply of its connection is itself
queued here (engine/server/connection.py `may_send_directly`), and the sender sends
a connection's members strictly in the order they were queued, each only if
all before it went out whole. The first one that cannot (a short send, a
full socket buffer, a member whose fsync's sends had already run) blocks the
outlet: it and every later one are left to the event loop, which writes
them through the transport in request order, once the sender is done with
that fsync. The event loop unblocks an outlet only when nothing is queued
on it and the transport has nothing buffered.

The outlet sends on a dup of the transport's socket, so that the number can
never name another connection's socket while a send is queued; the dup is
closed once the connection is gone and nothing is queued.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.ref cimport Py_DECREF, Py_INCREF, PyObject
from libc.errno cimport EINTR, EIO, errno
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset
from posix.time cimport CLOCK_MONOTONIC, CLOCK_REALTIME, clock_gettime, timespec
from posix.unistd cimport close, dup, fdatasync, read, write

from time import perf_counter


cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void* iov_base
        size_t iov_len
    ssize_t pwritev(int fd, const iovec* iov, int iovcnt, int64_t offset)


cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    enum: EFD_NONBLOCK
    enum: EFD_CLOEXEC


cdef extern from "<sys/socket.h>" nogil:
    struct msghdr:
        iovec* msg_iov
        size_t msg_iovlen
    ssize_t sendmsg(int fd, const msghdr* msg, int flags)
    enum: MSG_DONTWAIT
    enum: MSG_NOSIGNAL


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    int pthread_mutex_init(pthread_mutex_t* mutex, const void* attr)
    int pthread_mutex_destroy(pthread_mutex_t* mutex)
    int pthread_mutex_lock(pthread_mutex_t* mutex)
    int pthread_mutex_unlock(pthread_mutex_t* mutex)
    int pthread_cond_init(pthread_cond_t* cond, const void* attr)
    int pthread_cond_destroy(pthread_cond_t* cond)
    int pthread_cond_wait(pthread_cond_t* cond, pthread_mutex_t* mutex)
    int pthread_cond_timedwait(pthread_cond_t* cond, pthread_mutex_t* mutex,
                               const timespec* abstime)
    int pthread_cond_signal(pthread_cond_t* cond)
    int pthread_cond_broadcast(pthread_cond_t* cond)


cdef class Outlet:
    """A connection's socket as the sender thread sees it."""
    cdef readonly int fd
    # Event loop only: members queued so far, and those not yet released.
    cdef readonly int64_t queued
    cdef readonly int64_t outstanding
    # Sender thread (and `reset`, only while nothing is outstanding):
    cdef int64_t sent_whole             # members sent whole, in queue order
    cdef int blocked

    def __cinit__(self, int fd):
        self.fd = dup(fd)
        if self.fd < 0:
            raise OSError(errno, "dup of a connection's socket failed")

    @property
    def blocked(self) -> bool:
        return self.blocked != 0

    def block(self) -> None:
        """No more sends from the sender thread (the connection is closing)."""
        self.blocked = 1

    def reset(self) -> None:
        """Sends from the sender thread may resume: only when nothing is outstanding
        and the transport has nothing buffered (the caller checks the latter)."""
        assert self.outstanding == 0, "reset with members outstanding"
        self.blocked = 0
        self.sent_whole = self.queued

    def released(self) -> None:
        """One queued member was released by the event loop."""
        assert self.outstanding > 0
        self.outstanding -= 1

    def close(self) -> None:
        assert self.outstanding == 0, "closing an outlet with members outstanding"
        self.blocked = 1
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1

    def __dealloc__(self):
        if self.fd >= 0:
            close(self.fd)


cdef struct Entry:
    int fd
    int* blocked
    int64_t* sent_whole
    int64_t seq                         # the member's place in its outlet's queue
    const uint8_t* data
    Py_ssize_t size
    Py_ssize_t sent                     # bytes sent; -1 never tried


cdef enum:
    GROUP_ENTRIES_MAX = 64              # entries of one connection per sendmsg


cdef Py_ssize_t send_group(Entry* entries, Py_ssize_t count, Py_ssize_t first,
                           uint8_t* taken) noexcept nogil:
    """Send entry `first` and the later entries of its outlet (next in its
    queue) in one sendmsg; the first that cannot go out whole blocks the
    outlet. Returns how many went out whole."""
    cdef iovec iov[GROUP_ENTRIES_MAX]
    cdef Py_ssize_t members[GROUP_ENTRIES_MAX]
    cdef Py_ssize_t n = 0, j, k, left
    cdef int64_t* outlet_sent = entries[first].sent_whole
    cdef int64_t seq = entries[first].seq
    cdef Entry* e
    cdef msghdr msg
    cdef ssize_t sent
    for j in range(first, count):
        e = &entries[j]
        if e.sent_whole != outlet_sent:
            continue
        taken[j] = 1
        if n < GROUP_ENTRIES_MAX and e.seq == seq + n:
            iov[n].iov_base = <void*>e.data
            iov[n].iov_len = e.size
            members[n] = j
            n += 1
        # else left unsent (sent stays -1): the outlet blocks below or next time
    e = &entries[first]
    if e.blocked[0] or seq != outlet_sent[0] or e.fd < 0:
        e.blocked[0] = 1                # an earlier member was not sent: keep order
        return 0
    memset(&msg, 0, sizeof(msg))
    msg.msg_iov = iov
    msg.msg_iovlen = n
    while True:
        sent = sendmsg(e.fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL)
        if sent >= 0 or errno != EINTR:
            break
    left = sent if sent > 0 else 0
    for k in range(n):
        e = &entries[members[k]]
        e.sent = min(left, e.size)
        left -= e.sent
        if e.sent == e.size:
            outlet_sent[0] += 1
        else:                           # a full socket buffer, or the peer is gone
            e.blocked[0] = 1
            return k
    for j in range(first, count):       # any of this outlet's entries not in the group
        if entries[j].sent_whole == outlet_sent and entries[j].sent < 0:
            entries[j].blocked[0] = 1
    return n


cdef Py_ssize_t send_entries(Entry* entries, Py_ssize_t count) noexcept nogil:
    """Send every entry that may go out, in order, a connection's entries in
    one sendmsg. Returns how many went out whole, or -1 (out of memory:
    none sent)."""
    cdef Py_ssize_t i, whole = 0
    cdef uint8_t* taken = <uint8_t*>calloc(count + 1, 1)
    if taken == NULL:
        return -1
    for i in range(count):
        if not taken[i]:
            whole += send_group(entries, count, i, taken)
    free(taken)
    return whole


cdef class Sends:
    """The replies one fsync releases: filled by the event loop's writer,
    sent once by the sender thread after that fsync (`Courier.next_sent`)."""
    cdef list keep                      # outlets and buffers the entries point into
    cdef Entry* entries
    cdef Py_ssize_t count, capacity
    cdef readonly bint done             # no more entries (sending began, or never will)
    cdef readonly bint handed           # given to the sender thread: its replies wait for it
    cdef readonly bint finished         # its sends have run (or never will)
    cdef readonly bint sent_here        # by the sync thread (Courier.send_here), not the sender
    cdef readonly double finished_at    # time.perf_counter() when they had
    cdef readonly Py_ssize_t whole      # entries sent whole

    def __cinit__(self):
        self.keep = []
        self.entries = NULL
        self.count = 0
        self.capacity = 0
        self.done = False
        self.handed = False
        self.finished = False

    def __dealloc__(self):
        PyMem_Free(self.entries)

    def add(self, Outlet outlet, bytes buffer, Py_ssize_t start, Py_ssize_t end) -> int:
        """Queue buffer[start:end] on `outlet`; the entry's index, or -1 when
        these sends already ran (the event loop writes it instead)."""
        cdef Entry* grown
        cdef Entry* e
        assert 0 <= start <= end <= PyBytes_GET_SIZE(buffer)
        if self.done:
            return -1
        if self.count == self.capacity:
            grown = <Entry*>PyMem_Malloc(max(16, 2 * self.capacity) * sizeof(Entry))
            if grown == NULL:
                raise MemoryError()
            for i in range(self.count):
                grown[i] = self.entries[i]
            PyMem_Free(self.entries)
            self.entries = grown
            self.capacity = max(16, 2 * self.capacity)
        e = &self.entries[self.count]
        e.fd = outlet.fd
        e.blocked = &outlet.blocked
        e.sent_whole = &outlet.sent_whole
        e.seq = outlet.queued
        e.data = <const uint8_t*>PyBytes_AS_STRING(buffer) + start
        e.size = end - start
        e.sent = -1
        outlet.queued += 1
        outlet.outstanding += 1
        self.keep.append(outlet)
        self.keep.append(buffer)
        self.count += 1
        return self.count - 1

    def close(self) -> None:
        """No more entries, and no sends: what was not sent stays unsent."""
        self.done = True

    def withdraw(self) -> None:
        """Take every entry back, as if never added, and close: right after
        they were added (none was sent, and each is the last queued on its
        outlet), so that the event loop writes them and no outlet blocks."""
        cdef Outlet outlet
        assert not self.handed
        for i in range(self.count - 1, -1, -1):
            outlet = <Outlet>self.keep[2 * i]
            assert self.entries[i].seq == outlet.queued - 1, "withdrawn after a later add"
            outlet.queued -= 1
            outlet.outstanding -= 1
        self.count = 0
        self.keep = []
        self.done = True

    def hand(self) -> None:
        """Its fsync returned and it is queued for the sender thread: no
        more entries, and the event loop waits for `finished`."""
        self.done = True
        self.handed = True

    def abandon(self) -> None:
        """Handed but never to be sent (the courier refused it): finished with
        nothing sent, so the event loop writes every reply."""
        assert self.handed and not self.finished
        self.finish(0)

    cdef void finish(self, Py_ssize_t whole):
        self.whole = whole
        self.finished_at = perf_counter()
        self.finished = True

    def sent(self, Py_ssize_t index) -> int:
        """Bytes of entry `index` the sender thread sent (0 if none)."""
        assert 0 <= index < self.count
        return max(self.entries[index].sent, 0)

    def __len__(self):
        return self.count


cdef struct Parcel:
    PyObject* sends                     # a reference the courier holds
    Entry* entries
    Py_ssize_t count


cdef class Courier:
    """Hands each fsync's `Sends` from the sync thread to the sender thread.

    The sender thread waits on a C condition and sends without the GIL, so
    a reply can leave as soon as its fdatasync has returned and been handed
    over, without the sender first waiting for the GIL (which the event loop
    holds most of the time). It takes the GIL only afterwards, to mark the
    `Sends` finished. Bounded: `put` refuses when `capacity` are waiting."""
    cdef pthread_mutex_t lock
    cdef pthread_cond_t ready
    cdef Parcel* ring
    cdef readonly Py_ssize_t capacity
    cdef Py_ssize_t head, count
    cdef bint closed
    cdef bint sending                   # the sender thread is sending a parcel
    cdef bint here                      # `send_here` is sending one on its own thread

    def __cinit__(self, Py_ssize_t capacity):
        assert capacity > 0
        self.ring = <Parcel*>PyMem_Malloc(capacity * sizeof(Parcel))
        if self.ring == NULL:
            raise MemoryError()
        self.capacity = capacity
        pthread_mutex_init(&self.lock, NULL)
        pthread_cond_init(&self.ready, NULL)

    def __dealloc__(self):
        cdef Py_ssize_t k
        for k in range(self.count):         # never sent: their replies were written by the loop
            Py_DECREF(<object>self.ring[(self.head + k) % self.capacity].sends)
        PyMem_Free(self.ring)
        pthread_cond_destroy(&self.ready)
        pthread_mutex_destroy(&self.lock)

    def put(self, Sends sends) -> bool:
        """Queue a handed `Sends` for the sender thread; False if the courier
        is closed or full (the caller then lets the event loop write them).
        Its entries are fixed from here: `hand` set `done`, so `add` (which
        runs with the GIL) can no longer grow them while they are sent."""
        cdef bint queued = False
        assert sends.handed and not sends.finished
        Py_INCREF(sends)
        with nogil:
            pthread_mutex_lock(&self.lock)
            if not self.closed and self.count < self.capacity:
                self.ring[(self.head + self.count) % self.capacity] = Parcel(
                    <PyObject*>sends, sends.entries, sends.count)
                self.count += 1
                queued = True
                pthread_cond_signal(&self.ready)
            pthread_mutex_unlock(&self.lock)
        if not queued:
            Py_DECREF(sends)
        return queued

    def send_here(self, Sends sends) -> bool:
        """Send a handed `Sends` now, on the calling thread (the sync thread,
        right after its fdatasync), instead of waking the sender thread for
        it: only when the sender thread is idle with nothing queued, so that
        every earlier fsync's replies have been sent and none can be
        overtaken. False: nothing was
        done (`put` it). Saves the wake-up of another thread, and a core to
        run it on, between a lone request's fsync and its reply. (A `put`
        meanwhile waits: the sender thread takes nothing until this is sent.)"""
        cdef bint mine = False
        cdef Py_ssize_t whole = 0
        assert sends.handed and not sends.finished
        with nogil:
            mine = self.claim_here()
            if mine:
                whole = send_entries(sends.entries, sends.count)
                self.release_here()
        if mine:
            sends.sent_here = True
            sends.finish(max(whole, 0))     # out of memory: none sent, the event loop writes
        return mine

    cdef bint claim_here(self) noexcept nogil:
        """True if the calling thread may send now, ahead of the sender
        thread: it is idle with nothing queued, so every earlier fsync's
        replies have gone out and none can be overtaken. Then the sender
        thread takes nothing until `release_here`."""
        cdef bint mine = False
        pthread_mutex_lock(&self.lock)
        if not self.closed and self.count == 0 and not self.sending and not self.here:
            mine = True
            self.here = True            # the sender waits until it is sent
        pthread_mutex_unlock(&self.lock)
        return mine

    cdef void release_here(self) noexcept nogil:
        pthread_mutex_lock(&self.lock)
        self.here = False
        if self.count or self.closed:   # the sender waited for this one
            pthread_cond_signal(&self.ready)
        pthread_mutex_unlock(&self.lock)

    def close(self) -> None:
        """The sender thread's `next_sent` returns None once the queue is empty."""
        with nogil:
            pthread_mutex_lock(&self.lock)
            self.closed = True
            pthread_cond_signal(&self.ready)
            pthread_mutex_unlock(&self.lock)

    def next_sent(self):
        """In the sender thread: wait for the next `Sends`, send it without the
        GIL, mark it finished and return it; None once closed and empty."""
        cdef Parcel parcel
        cdef bint got = False
        cdef Py_ssize_t whole = 0
        with nogil:
            pthread_mutex_lock(&self.lock)
            while (self.count == 0 and not self.closed) or self.here:
                pthread_cond_wait(&self.ready, &self.lock)
            if self.count:
                parcel = self.ring[self.head]
                self.head = (self.head + 1) % self.capacity
                self.count -= 1
                got = True
                self.sending = True
            pthread_mutex_unlock(&self.lock)
            if got:
                whole = send_entries(parcel.entries, parcel.count)
                pthread_mutex_lock(&self.lock)
                self.sending = False
                pthread_mutex_unlock(&self.lock)
        if not got:
            return None
        sends = <Sends>parcel.sends
        Py_DECREF(sends)                    # the courier's reference; `sends` holds its own
        sends.finish(max(whole, 0))        # out of memory: none sent, the event loop writes
        return sends


cdef enum:
    JOB_NONE = 0                        # no job
    JOB_QUEUED = 1                      # a write waits for the thread
    JOB_WRITING = 2                     # being written and synced; sends may still attach
    JOB_SENDING = 3                     # synced (or failed): its sends are fixed
    JOB_DONE = 4                        # finished; the event loop has not taken it yet
    JOB_BUFFERS_MAX = 64                # buffers in one write (a journal entry has 1-3)


cdef double monotonic_s() noexcept nogil:
    """time.perf_counter()'s clock (CLOCK_MONOTONIC on Linux)."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef int write_all(int fd, iovec* iov, int count, int64_t offset) noexcept nogil:
    """pwritev until every byte is written (a regular file may write short);
    0, or the errno of the failure. Advances `iov`."""
    cdef ssize_t written
    cdef int i = 0
    while i < count:                    # each round writes at least a byte, or returns
        written = pwritev(fd, iov + i, count - i, offset)
        if written < 0:
            if errno == EINTR:
                continue
            return errno
        if written == 0:
            return EIO
        offset += written
        while i < count and <size_t>written >= iov[i].iov_len:
            written -= iov[i].iov_len
            i += 1
        if i < count and written:
            iov[i].iov_base = <uint8_t*>iov[i].iov_base + written
            iov[i].iov_len -= written
    return 0


cdef int sync_data(int fd) noexcept nogil:
    """fdatasync, retried on EINTR as Python's os.fdatasync is (PEP 475); 0
    or the errno."""
    for _ in range(1000):               # a signal storm: bounded, then EINTR is the answer
        if fdatasync(fd) == 0:
            return 0
        if errno != EINTR:
            return errno
    return EINTR


cdef class Syncer:
    """A lone request's journal write, fdatasync and reply, on a thread that
    never takes the GIL (issue 16; engine/server/lone_sync.py).

    A caller paying one at a time used to cost two hand-offs of the GIL per
    payment on top of the fsync: the sync thread, woken by an executor job,
    waited for the event loop to release the GIL before it could write, and
    took it again after. Here the event loop hands over a write it has fully
    planned (`start`: the journal's fd, its buffers, the offset); the thread,
    waiting on a C condition, does pwritev + fdatasync and sends the replies
    attached meanwhile (`attach`, the PAY batch's `Sends`, through the
    courier's ordering) without the GIL, then makes `fileno` (an eventfd)
    readable. The event loop takes the outcome (`take`) and does the
    journal's bookkeeping itself. One job at a time."""
    cdef pthread_mutex_t lock
    cdef pthread_cond_t wake            # a job queued, the test gate opened, or closing
    cdef pthread_cond_t finished        # a job is done
    cdef Courier courier
    cdef readonly int fileno            # eventfd: readable once a job is done
    cdef int state
    cdef bint closed
    cdef list keep                      # the job's buffers
    cdef Sends sends                    # attached to the job (its Entry array is read)
    cdef iovec iov[JOB_BUFFERS_MAX]
    cdef int iov_count
    cdef int fd
    cdef int64_t offset
    cdef Entry* entries
    cdef Py_ssize_t entry_count
    cdef bint attached
    cdef int error                      # the outcome: 0 or an errno
    cdef double started_at
    cdef double synced_at
    cdef Py_ssize_t whole               # entries sent whole; -1: not sent here
    # Test hooks: stop before the fdatasync; fail the next one with an errno.
    cdef bint hold
    cdef bint at_gate
    cdef int fail_errno

    def __cinit__(self, Courier courier):
        self.courier = courier
        self.fileno = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.fileno < 0:
            raise OSError(errno, "eventfd failed")
        pthread_mutex_init(&self.lock, NULL)
        pthread_cond_init(&self.wake, NULL)
        pthread_cond_init(&self.finished, NULL)

    def __dealloc__(self):
        if self.fileno >= 0:
            close(self.fileno)
        pthread_cond_destroy(&self.finished)
        pthread_cond_destroy(&self.wake)
        pthread_mutex_destroy(&self.lock)

    @property
    def busy(self) -> bool:
        """A job was started and not yet taken."""
        return self.state != JOB_NONE

    def start(self, int fd, list buffers, int64_t offset) -> None:
        """Queue a write of `buffers` (bytes) at `offset` into `fd`, then an
        fdatasync of `fd`; the thread runs it. One job at a time: the last
        one must have been taken."""
        cdef iovec iov[JOB_BUFFERS_MAX]
        cdef int count = len(buffers)
        cdef bint queued = False
        if not 0 < count <= JOB_BUFFERS_MAX:
            raise ValueError(f"a write of 1..{JOB_BUFFERS_MAX} buffers, not {count}")
        for i in range(count):
            buffer = buffers[i]
            if type(buffer) is not bytes:
                raise TypeError("the buffers must be bytes")
            iov[i].iov_base = <void*>PyBytes_AS_STRING(buffer)
            iov[i].iov_len = PyBytes_GET_SIZE(buffer)
        pthread_mutex_lock(&self.lock)
        if self.state == JOB_NONE and not self.closed:
            memcpy(self.iov, iov, count * sizeof(iovec))
            self.iov_count = count
            self.fd = fd
            self.offset = offset
            self.attached = False
            self.state = JOB_QUEUED
            queued = True
        pthread_mutex_unlock(&self.lock)
        if not queued:
            raise RuntimeError("the syncer is closed, or its last job was not taken")
        # After the unlock: a thread woken while the lock is still held would
        # sleep again at once, on the lock (a second wake-up for one job).
        pthread_cond_signal(&self.wake)
        self.keep = list(buffers)

    def attach(self, Sends sends) -> bool:
        """The replies the running job releases: the thread sends them right
        after its fdatasync (if the sender thread has nothing left to send,
        so that none is overtaken). False if too late (the job has synced,
        or there is none): the caller sends them otherwise."""
        cdef bint ok = False
        if sends.done:
            return False
        pthread_mutex_lock(&self.lock)
        if (self.state == JOB_QUEUED or self.state == JOB_WRITING) and not self.attached:
            self.entries = sends.entries
            self.entry_count = sends.count
            self.attached = True
            ok = True
        pthread_mutex_unlock(&self.lock)
        if ok:
            sends.hand()                    # no more entries; the loop waits for `finished`
            self.sends = sends
        return ok

    def take(self):
        """The outcome of the finished job, (errno or 0, started_at, synced_at),
        once; None while it runs or when there is none. Marks its attached
        sends finished."""
        cdef uint64_t count
        cdef Py_ssize_t whole
        pthread_mutex_lock(&self.lock)
        if self.state != JOB_DONE:
            pthread_mutex_unlock(&self.lock)
            return None
        outcome = (self.error, self.started_at, self.synced_at)
        whole = self.whole
        self.state = JOB_NONE
        self.attached = False
        self.entries = NULL
        pthread_mutex_unlock(&self.lock)
        read(self.fileno, &count, sizeof(count))    # drained (EAGAIN if already)
        sends, self.sends, self.keep = self.sends, None, None
        if sends is not None:
            sends.sent_here = whole >= 0
            sends.finish(max(whole, 0))     # not sent here: the event loop writes them
        return outcome

    def wait_done(self, double timeout_s) -> bool:
        """Until the job (if any) has finished, at most `timeout_s`; True if
        none runs now."""
        cdef timespec deadline
        cdef int rc = 0
        cdef bint idle
        clock_gettime(CLOCK_REALTIME, &deadline)
        deadline.tv_sec += <long>timeout_s
        deadline.tv_nsec += <long>((timeout_s - <long>timeout_s) * 1e9)
        if deadline.tv_nsec >= 1000000000:
            deadline.tv_sec += 1
            deadline.tv_nsec -= 1000000000
        with nogil:
            pthread_mutex_lock(&self.lock)
            while self.state != JOB_NONE and self.state != JOB_DONE and rc == 0:
                rc = pthread_cond_timedwait(&self.finished, &self.lock, &deadline)
            idle = self.state == JOB_NONE or self.state == JOB_DONE
            pthread_mutex_unlock(&self.lock)
        return idle

    def serve(self) -> None:
        """The thread's body: run each job as it is queued; return once
        closed (a job queued before still runs)."""
        cdef Courier courier = self.courier
        with nogil:
            self.run(courier)

    cdef void run(self, Courier courier) noexcept nogil:
        cdef iovec iov[JOB_BUFFERS_MAX]
        cdef int count, fd, error
        cdef int64_t offset
        cdef double started, synced
        cdef Py_ssize_t whole
        cdef bint attached, hooked
        pthread_mutex_lock(&self.lock)
        while True:                         # one job a round; ends when closed
            while self.state != JOB_QUEUED and not self.closed:
                pthread_cond_wait(&self.wake, &self.lock)
            if self.state != JOB_QUEUED:
                break
            self.state = JOB_WRITING
            count = self.iov_count
            memcpy(iov, self.iov, count * sizeof(iovec))
            fd = self.fd
            offset = self.offset
            hooked = self.hold or self.fail_errno != 0
            pthread_mutex_unlock(&self.lock)
            started = monotonic_s()
            error = write_all(fd, iov, count, offset)
            if hooked:                      # (tests only: no lock taken otherwise)
                error = self.gate(error)
            if error == 0:
                error = sync_data(fd)
            synced = monotonic_s()
            pthread_mutex_lock(&self.lock)
            self.state = JOB_SENDING        # `attach` refuses from here
            attached = self.attached
            pthread_mutex_unlock(&self.lock)
            whole = -1
            if error == 0 and attached and courier.claim_here():
                whole = send_entries(self.entries, self.entry_count)
                courier.release_here()
                if whole < 0:               # out of memory: none sent, the event loop writes
                    whole = 0
            pthread_mutex_lock(&self.lock)
            self.error = error
            self.started_at = started
            self.synced_at = synced
            self.whole = whole
            self.state = JOB_DONE
            pthread_mutex_unlock(&self.lock)
            pthread_cond_broadcast(&self.finished)
            self.notify()
            pthread_mutex_lock(&self.lock)
        pthread_mutex_unlock(&self.lock)

    cdef int gate(self, int error) noexcept nogil:
        """The test hooks, between the write and the fdatasync."""
        pthread_mutex_lock(&self.lock)
        while self.hold and not self.closed:
            self.at_gate = True
            pthread_cond_wait(&self.wake, &self.lock)
        self.at_gate = False
        if error == 0 and self.fail_errno:
            error = self.fail_errno
            self.fail_errno = 0
        pthread_mutex_unlock(&self.lock)
        return error

    cdef void notify(self) noexcept nogil:
        cdef uint64_t one = 1
        write(self.fileno, &one, sizeof(one))   # cannot fill: the loop drains it each time

    def close(self) -> None:
        """The thread returns from `serve` once its queued job (if any) ran."""
        with nogil:
            pthread_mutex_lock(&self.lock)
            self.closed = True
            pthread_cond_broadcast(&self.wake)
            pthread_mutex_unlock(&self.lock)

    # -- test hooks --------------------------------------------------------

    def hold_before_fdatasync(self, bint hold) -> None:
        """Tests: jobs started from now on stop after their write, before
        their fdatasync, until released (hold False)."""
        pthread_mutex_lock(&self.lock)
        self.hold = hold
        pthread_cond_broadcast(&self.wake)
        pthread_mutex_unlock(&self.lock)

    @property
    def held(self) -> bool:
        """Tests: a job waits at the gate now."""
        return self.at_gate

    def fail_next_fdatasync(self, int error) -> None:
        """Tests: the next job started fails with errno `error` instead of
        its fdatasync (not run)."""
        pthread_mutex_lock(&self.lock)
        self.fail_errno = error
        pthread_mutex_unlock(&self.lock)
