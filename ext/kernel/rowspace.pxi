# Row spaces: the memory a large table's rows live in, reserved once and
# never moved, so that a table grows without copying a row (issue 16).
#
# A RowSpace is one anonymous private mapping, reserved as address space
# only (MAP_NORESERVE: no memory, no commit charge) as large as the table
# can ever be; a page exists once touched. The base address never changes:
# the raw pointers of _bind() and every numpy view handed out stay valid,
# and a table array is only ever replaced by a longer view of the same
# bytes. Copying tables of hundreds of megabytes at every 1.5x step stopped
# the writer for over a second at 1-2 M payments. The mapping is writable
# from the start (growing is bookkeeping, no system call), except under
# strict overcommit (vm.overcommit_memory = 2, which ignores MAP_NORESERVE
# and would charge the whole reservation): there it is mapped PROT_NONE and
# growing makes more of it writable (mprotect), so that only what is used
# is charged.
#
# Pages must still be faulted in, and zeroed by the OS, before rows go
# there: on the shared VM measured, 0.15 to 7.5 GB/s depending on whether
# the host had backed the guest's memory yet, so at worst as much as the
# apply of the batch itself. A populate thread (Populator) faults them in
# ahead of the writer (populate_later), AHEAD_STEPS reserves' worth: a
# table that grows batch by batch finds its next rows' pages present, as an
# engine sized up front does. What the thread has not reached, the apply
# faults in itself, a page at a time (the writer faulting pages in at
# reserve time, populate_mode 1, measured slower than both).
#
# Small tables stay plain numpy arrays, grown by copying (at most
# SPACE_FROM_BYTES a copy, well under a millisecond): a space reserves up to the
# machine's memory in address space, and the tests keep hundreds of small
# ledgers alive at once, more than the 128 TiB of a process could reserve.
# A table moves into its row space, once, when it first outgrows that; the
# space is made, and faulted in by the thread, when the table is half way.
import os as _os
import threading as _threading

from cpython.ref cimport Py_DECREF, Py_INCREF, PyObject

from posix.mman cimport (mmap, munmap, mprotect, madvise, PROT_NONE, PROT_READ, PROT_WRITE,
                          MAP_PRIVATE, MAP_ANONYMOUS, MAP_NORESERVE, MAP_FAILED,
                          MADV_HUGEPAGE, MADV_DONTNEED)
from posix.unistd cimport sysconf, _SC_PAGESIZE
from libc.errno cimport errno, ENOMEM
from libc.string cimport memcpy

cdef extern from *:
    """
    #define scanpay_touch_for_write(address) __atomic_fetch_add((char*)(address), 0, __ATOMIC_RELAXED)
    """
    int _SC_PHYS_PAGES
    # Faults a page in for writing without changing its byte, even if another
    # thread writes it meanwhile (an atomic add of zero).
    void touch_for_write "scanpay_touch_for_write"(char* address) nogil

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    int pthread_mutex_init(pthread_mutex_t* mutex, const void* attr)
    int pthread_mutex_lock(pthread_mutex_t* mutex)
    int pthread_mutex_unlock(pthread_mutex_t* mutex)
    int pthread_cond_init(pthread_cond_t* cond, const void* attr)
    int pthread_cond_wait(pthread_cond_t* cond, pthread_mutex_t* mutex)
    int pthread_cond_signal(pthread_cond_t* cond)

# A slot is an int32: no table holds more rows than this.
SPACE_ROWS_MAX = 2**31 - 1
# Huge pages: numpy asks for them on arrays of 4 MiB and more; so does a
# space once it commits that much (a 40-byte wallet row read at random
# misses the TLB on 4 KiB pages).
cdef size_t HUGE_PAGE_BYTES = 2 << 20
cdef size_t HUGE_FROM_BYTES = 4 << 20
cdef size_t PAGE_BYTES = <size_t>sysconf(_SC_PAGESIZE)
# No table can outgrow the machine's memory; reserving more address space
# than that would only bring closer the limit of 128 TiB a process has.
cdef size_t MEMORY_BYTES = <size_t>sysconf(_SC_PHYS_PAGES) * PAGE_BYTES
cdef int RESERVE_TRIES_MAX = 40     # halvings of a refused reservation


def _strict_overcommit() -> bool:
    try:
        with open("/proc/sys/vm/overcommit_memory") as f:
            return f.read().strip() == "2"
    except OSError:
        return True                 # not Linux, or no /proc: the careful way


cdef bint STRICT_COMMIT = _strict_overcommit()
# Tables above this size live in a row space (see above). 1 MiB, not 8: a
# table growing by batches of 8,190 payments is copied at nearly every batch
# until it moves (the 1.5x step is less than a batch): with the index moves,
# the writer's reserve took 59-92 ms of the first 30 batches of bench_growth
# up to 8 MiB, 40-53 ms up to 1 MiB (issue 16, docs/performance.md).
cdef size_t SPACE_FROM_BYTES = 1 << 20
# How far ahead of the rows reserved the populate thread faults pages in:
# AHEAD_STEPS times the rows the reserve added, at most AHEAD_BYTES_MAX.
# Eight batches of slack absorb the thread's delays on a busy machine.
cdef size_t AHEAD_STEPS = 8
cdef size_t AHEAD_BYTES_MAX = 32 << 20
cdef size_t POPULATE_CHUNK_BYTES = 4 << 20
cdef enum:
    POPULATE_JOBS_MAX = 256     # jobs waiting or done (not yet let go of), at most
    # Who faults in a row space's pages (tune_growth's populate_mode):
    POPULATE_LAZY = 0           # the apply, a fault at a time, as it writes rows
    POPULATE_AT_RESERVE = 1     # the writer, in one call per reserve
    POPULATE_AHEAD = 2          # the populate thread ahead, the apply what it has not reached
cdef int POPULATE_MODE = POPULATE_AHEAD
cdef int POPULATE_NICE = 0          # the populate thread's nice, over the process's
# Bytes of pages faulted in by the writer (populate(): a capacity hint, or
# populate_mode 1) and by the populate thread: populate_stats().
cdef size_t populated_by_writer = 0
cdef size_t populated_by_thread_bytes = 0


def populate_stats():
    """{"writer_bytes", "thread_bytes", "thread_cpu_s"}: pages faulted in so
    far by the writer (populate()) and by the populate thread, in bytes (not
    those the apply faulted in itself), and the thread's CPU seconds."""
    return {"writer_bytes": populated_by_writer, "thread_bytes": populated_by_thread_bytes,
            "thread_cpu_s": _thread_cpu_s(_populator.get("thread"))}


def _thread_cpu_s(thread) -> float:
    """CPU seconds of a thread of this process, from /proc (0.0 if unknown)."""
    if thread is None or _populator["pid"] != _os.getpid():
        return 0.0
    try:
        with open(f"/proc/self/task/{thread.native_id}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


cdef inline size_t round_up(size_t n, size_t grain) noexcept nogil:
    return (n + grain - 1) // grain * grain


cdef size_t power_of_two_at_least(size_t n) noexcept:
    cdef size_t p = 1
    while p < n:
        p <<= 1
    return p


# The most address space a row space reserves (tune_growth sets it lower).
cdef size_t SPACE_BYTES_MAX = power_of_two_at_least(MEMORY_BYTES)


def space_bytes_for(int64_t itemsize):
    """Address space reserved for a table of `itemsize`-byte rows: its most
    rows, at most the machine's memory (rounded up to a power of two)."""
    return min(<size_t>SPACE_ROWS_MAX * itemsize, SPACE_BYTES_MAX)


cdef void fault_in(char* start, size_t length) noexcept nogil:
    """Fault in the pages of [start, start + length) for writing, changing
    no byte (the writer may be writing rows there): a write fault per page
    (per 2 MiB on huge pages; the other touches find the page present).
    Not MADV_POPULATE_WRITE: it holds the memory map's lock for its whole
    range, and every mmap, munmap or madvise of the writer (numpy's result
    arrays, a new index table) waited for it, 10-12 ms at a time on the
    shared VM (perf sched); a fault takes only its VMA's lock."""
    cdef size_t at = 0
    while at < length:
        touch_for_write(start + at)
        at += PAGE_BYTES


cdef class RowSpace:
    """Address space for one array; bytes [0, committed) are usable. numpy
    arrays are views of it (np.frombuffer), and keep it alive."""
    cdef char* mapping          # what mmap returned (munmap'ed when the last view dies)
    cdef size_t mapped
    cdef char* base             # aligned to a huge page
    cdef readonly size_t reserved
    cdef readonly size_t committed
    cdef readonly size_t populated  # bytes [0, populated) are faulted in
    cdef size_t requested           # ... or asked of the populate thread
    cdef bint huge
    cdef bint adoptable         # made by Ledger.allocate: a Ledger.load may take it over
    cdef readonly object dtype
    cdef Py_ssize_t shape[1]

    def __cinit__(self, dtype, size_t reserve_bytes, size_t need_bytes=0):
        self.dtype = np.dtype(dtype)
        reserve_bytes = round_up(max(reserve_bytes, need_bytes, 1), PAGE_BYTES)
        cdef int tries = 0
        while True:
            # One huge page more, to align the base: a table's huge pages
            # then start at its first row.
            self.mapped = reserve_bytes + HUGE_PAGE_BYTES
            self.mapping = <char*>mmap(NULL, self.mapped,
                                       PROT_NONE if STRICT_COMMIT else PROT_READ | PROT_WRITE,
                                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
            if self.mapping != <char*>MAP_FAILED:
                break
            if errno != ENOMEM or tries >= RESERVE_TRIES_MAX:
                raise MemoryError(f"cannot reserve {reserve_bytes} bytes of address space")
            tries += 1
            if tries == 1:
                # Ledgers not yet collected (reference cycles) hold spaces.
                import gc
                gc.collect()
            elif reserve_bytes // 2 >= round_up(max(need_bytes, 1), PAGE_BYTES):
                reserve_bytes = round_up(reserve_bytes // 2, PAGE_BYTES)
        self.base = <char*>round_up(<size_t>self.mapping, HUGE_PAGE_BYTES)
        self.reserved = reserve_bytes
        if need_bytes:
            self.commit(need_bytes)

    def __dealloc__(self):
        if self.mapping != NULL and self.mapping != <char*>MAP_FAILED:
            munmap(self.mapping, self.mapped)

    def __getbuffer__(self, Py_buffer* buffer, int flags):
        self.shape[0] = <Py_ssize_t>self.committed
        buffer.buf = self.base
        buffer.obj = self
        buffer.len = <Py_ssize_t>self.committed
        buffer.readonly = 0
        buffer.itemsize = 1
        buffer.format = NULL
        buffer.ndim = 1
        buffer.shape = self.shape
        buffer.strides = NULL
        buffer.suboffsets = NULL
        buffer.internal = NULL

    def __releasebuffer__(self, Py_buffer* buffer):
        pass

    cdef inline size_t grain(self, size_t nbytes) noexcept:
        return HUGE_PAGE_BYTES if nbytes >= HUGE_FROM_BYTES else PAGE_BYTES

    cdef int commit(self, size_t need_bytes) except -1:
        """Make bytes [0, need_bytes) usable (not yet faulted in)."""
        if need_bytes <= self.committed:
            return 0
        if need_bytes > self.reserved:
            raise MemoryError(f"a row space of {self.reserved} bytes cannot hold {need_bytes}")
        cdef size_t end = min(round_up(need_bytes, self.grain(need_bytes)), self.reserved)
        if STRICT_COMMIT and mprotect(self.base + self.committed, end - self.committed,
                                      PROT_READ | PROT_WRITE):
            raise MemoryError(f"cannot commit {end} bytes for rows (errno {errno})")
        if end >= HUGE_FROM_BYTES and not self.huge:
            madvise(self.base, self.reserved, MADV_HUGEPAGE)    # advice: failure is harmless
            self.huge = True
        self.committed = end
        return 0

    cdef size_t populate_end(self, size_t need_bytes) noexcept:
        return min(round_up(need_bytes, HUGE_PAGE_BYTES if self.huge else PAGE_BYTES),
                   self.committed)

    cdef void populate(self, size_t need_bytes) noexcept:
        """Fault in now the pages of bytes [0, need_bytes) (committed) that
        are not yet: a capacity hint's, a new space's first rows."""
        cdef size_t end = self.populate_end(need_bytes)
        cdef size_t at = self.populated // PAGE_BYTES * PAGE_BYTES
        if end <= self.populated:
            return
        with nogil:
            fault_in(self.base + at, end - at)
        global populated_by_writer
        populated_by_writer += end - at
        if end > self.populated:        # the populate thread may have gone further meanwhile
            self.populated = end

    cdef void populate_later(self, size_t need_bytes):
        """Ask the populate thread to fault in the pages of [0, need_bytes)."""
        cdef size_t end = self.populate_end(need_bytes)
        if end <= self.populated or end <= self.requested or POPULATE_MODE != POPULATE_AHEAD:
            return
        if populator().put(self, end):
            self.requested = end        # else the writer populates at reserve time

    cdef int grow(self, size_t need, size_t ahead) except -1:
        """Room for bytes [0, need), committed, with the populate thread
        asked to fault them in and `ahead` bytes further."""
        if need > self.populated + ahead:
            # A jump far past the pages faulted in: a capacity hint on a
            # table loaded from a snapshot, or the load's own headroom. The
            # thread does it all, out of the caller's time (a restart does
            # not wait for gigabytes of zero pages); rows written before it
            # gets there fault in one by one, as they did in numpy arrays.
            self.commit(need)
            self.populate_later(need)
            return 0
        self.commit(min(need + ahead, self.reserved))
        if POPULATE_MODE == POPULATE_AT_RESERVE:
            self.populate(need)
        self.populate_later(min(need + ahead, self.reserved))
        return 0

    cdef object rows(self, size_t nbytes):
        """A view of the rows in bytes [0, nbytes) (committed): what the
        table shows as its capacity, the rows reserved (a hint is exact);
        the pages committed and faulted in beyond are slack, as a
        malloc'ed array's unused tail is."""
        assert nbytes <= self.committed
        return np.frombuffer(self, self.dtype, nbytes // self.dtype.itemsize)

    cdef bint claim(self) noexcept:
        """True once: the space was made by Ledger.allocate for a load."""
        cdef bint was = self.adoptable
        self.adoptable = False
        return was


cdef struct PopulateJob:
    PyObject* space             # a RowSpace, referenced until the writer lets it go
    char* base
    size_t* populated           # the space's `populated`
    size_t end


cdef bint populate_job(PopulateJob* job) noexcept nogil:
    """Fault in the next chunk of [*populated, end) of a space; True once
    the job is done. A chunk at a time: mprotect (a reserve under strict
    overcommit) and fork (a snapshot) wait for the memory map's lock, which
    one madvise holds for its whole range; and the thread takes its jobs in
    turns, a chunk each (Populator.run). `populated` is read and written by
    both threads without a lock: an aligned 8-byte store, and a stale value
    only repeats work that changes nothing."""
    global populated_by_thread_bytes
    cdef size_t start = job.populated[0] // PAGE_BYTES * PAGE_BYTES, stop
    if start >= job.end:
        return True
    stop = min(start + POPULATE_CHUNK_BYTES, job.end)
    fault_in(job.base + start, stop - start)
    populated_by_thread_bytes += stop - start
    if stop > job.populated[0]:
        job.populated[0] = stop
    return stop >= job.end


cdef class Populator:
    """The populate thread and its queue, one per process (populator()).

    The thread waits on a C condition and works without the GIL, from start
    to end: with a Python queue it took the GIL back from the writer twice
    a job, and on a busy machine the writer then waited for a thread that
    waited for a core (the Courier of ext/outlet.pyx, for the same reason).
    A job holds its space, so the mapping outlives the work on it; the
    thread hands finished jobs back and the writer, which holds the GIL,
    lets go of them at its next put."""
    cdef pthread_mutex_t lock
    cdef pthread_cond_t ready
    cdef PopulateJob waiting[POPULATE_JOBS_MAX]
    cdef PyObject* finished[POPULATE_JOBS_MAX]
    cdef Py_ssize_t head, count, n_finished

    def __cinit__(self):
        pthread_mutex_init(&self.lock, NULL)
        pthread_cond_init(&self.ready, NULL)

    cdef bint put(self, RowSpace space, size_t end):
        """Queue a job; False when POPULATE_JOBS_MAX are waiting or not let go of."""
        cdef PyObject* done[POPULATE_JOBS_MAX]
        cdef Py_ssize_t n, k
        cdef bint queued = False
        # With the GIL: the thread never takes it, and letting it go here
        # could hand it to another thread (the server's event loop).
        pthread_mutex_lock(&self.lock)
        n = self.n_finished
        for k in range(n):
            done[k] = self.finished[k]
        self.n_finished = 0
        if self.count < POPULATE_JOBS_MAX:
            k = (self.head + self.count) % POPULATE_JOBS_MAX
            self.waiting[k].space = <PyObject*>space
            self.waiting[k].base = space.base
            self.waiting[k].populated = &space.populated
            self.waiting[k].end = end
            self.count += 1
            queued = True
            pthread_cond_signal(&self.ready)
        pthread_mutex_unlock(&self.lock)
        if queued:
            Py_INCREF(space)
        for k in range(n):
            Py_DECREF(<object>done[k])
        return queued

    def run(self):
        """The thread: forever, without the GIL. Jobs take turns, a chunk
        each (round robin): a large one (an index table prepared for its
        next resize, 32 MiB and more, a capacity hint on a loaded table)
        must not hold up the next rows' pages of the tables growing batch by
        batch, or the writer catches up with them and faults them in itself
        (measured: 8 faults of 2 MiB in 4 batches, 15 ms each, behind a
        prepared payment index)."""
        cdef PopulateJob job
        cdef bint done
        with nogil:
            while True:
                pthread_mutex_lock(&self.lock)
                while self.count == 0:
                    pthread_cond_wait(&self.ready, &self.lock)
                job = self.waiting[self.head]
                pthread_mutex_unlock(&self.lock)
                done = populate_job(&job)
                pthread_mutex_lock(&self.lock)
                self.head = (self.head + 1) % POPULATE_JOBS_MAX
                if done:
                    self.count -= 1
                    self.finished[self.n_finished] = job.space
                    self.n_finished += 1
                else:       # to the back of the queue (the slot just left is free)
                    self.waiting[(self.head + self.count - 1) % POPULATE_JOBS_MAX] = job
                pthread_mutex_unlock(&self.lock)


# One per process: a forked child (a snapshot, an audit) has no thread of its
# parent's, and its copy of the queue may hold a lock the parent's thread had.
_populator = {"pid": 0, "populator": None, "thread": None}


cdef Populator populator():
    if _populator["pid"] != _os.getpid():
        made = Populator()
        thread = _threading.Thread(target=made.run, daemon=True, name="scanpay-populate")
        thread.start()
        if POPULATE_NICE:
            try:
                _os.setpriority(_os.PRIO_PROCESS, thread.native_id,
                                min(19, _os.getpriority(_os.PRIO_PROCESS, 0) + POPULATE_NICE))
            except OSError:         # lowering needs no privilege; never fatal if it fails
                pass
        _populator.update(pid=_os.getpid(), populator=made, thread=thread)
    return _populator["populator"]


cdef RowSpace space_of(object arr):
    """The row space `arr` views from its start, or None."""
    base = arr
    while isinstance(base, np.ndarray):     # numpy stops collapsing bases at the memoryview
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    if isinstance(base, RowSpace) and arr.ctypes.data == <size_t>(<RowSpace>base).base:
        return <RowSpace>base
    return None


cdef RowSpace space_with(object dtype, int64_t rows, object copy_from=None,
                         RowSpace prepared=None):
    """A row space for `rows` rows of `dtype` holding a copy of `copy_from`
    (an array of `dtype`) if given: `prepared` (prepared_space) if it is
    large enough, its pages faulted in by the populate thread, else a new
    one, faulted in now (a capacity hint asks for that)."""
    dtype = np.dtype(dtype)
    cdef size_t need = <size_t>max(rows, 1) * dtype.itemsize
    cdef RowSpace space = prepared
    if space is None or need > space.reserved:
        space = RowSpace(dtype, space_bytes_for(dtype.itemsize), need)
        space.populate(need)
    else:
        space.commit(need)
    cdef cnp.ndarray source
    if copy_from is not None and len(copy_from):
        source = np.ascontiguousarray(copy_from, dtype)
        memcpy(space.base, cnp.PyArray_DATA(source), source.nbytes)
    return space


cdef RowSpace prepared_space(object dtype, size_t nbytes):
    """A row space for a table about to move into one, its first `nbytes`
    faulted in by the populate thread meanwhile: the move then copies the
    rows into present pages, and the writer faults in no fresh memory (on
    the shared VM, up to 6 ms a MiB when the host has not backed it yet)."""
    dtype = np.dtype(dtype)
    cdef RowSpace space = RowSpace(dtype, space_bytes_for(dtype.itemsize), nbytes)
    space.populate_later(nbytes)
    return space
