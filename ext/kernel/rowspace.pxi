# Row spaces: the memory a large table's rows live in, reserved once and
# never moved, so that a table grows without copying a row (issue 16).
#
# A RowSpace is one anonymous private mapping, reserved as address space
# only (PROT_NONE, MAP_NORESERVE: no memory, no commit charge) as large as
# the table can ever be. Growing makes more of it readable and writable
# (mprotect, a few microseconds whatever the table's size). The base address
# never changes: the raw pointers of _bind() and every numpy view handed out
# stay valid, and a table array is only ever replaced by a longer view of
# the same bytes. Copying tables of hundreds of megabytes at every 1.5x step
# stopped the writer for over a second at 1-2 M payments.
#
# Pages must still be faulted in (and zeroed by the OS) before rows go
# there; on the shared VMs measured that costs 0.3 s per GiB and more (the
# host backs the guest's memory on first touch), as much as the apply of a
# batch. A populate thread does it ahead of the writer (populate_later): a
# table that grows batch by batch finds its next rows' pages present, as
# an engine sized up front does. What the thread has not done yet, the
# writer does at reserve time, in one call, bounded by the batch.
#
# Small tables stay plain numpy arrays, grown by copying (at most
# SPACE_FROM_BYTES a copy, a millisecond or two): a space reserves up to the
# machine's memory in address space, and the tests keep hundreds of small
# ledgers alive at once, more than the 128 TiB of a process could reserve.
# A table moves into its row space, once, when it first outgrows that.
import os as _os
import queue as _queue
import threading as _threading

from posix.mman cimport (mmap, munmap, mprotect, madvise, PROT_NONE, PROT_READ, PROT_WRITE,
                          MAP_PRIVATE, MAP_ANONYMOUS, MAP_NORESERVE, MAP_FAILED,
                          MADV_HUGEPAGE, MADV_DONTNEED)
from posix.unistd cimport sysconf, _SC_PAGESIZE
from libc.errno cimport errno, ENOMEM
from libc.string cimport memcpy

cdef extern from *:
    """
    #ifndef MADV_POPULATE_WRITE
    #define MADV_POPULATE_WRITE 23      /* Linux 5.14 */
    #endif
    #define scanpay_touch_for_write(address) __atomic_fetch_add((char*)(address), 0, __ATOMIC_RELAXED)
    """
    int MADV_POPULATE_WRITE
    int _SC_PHYS_PAGES
    # Faults a page in for writing without changing its byte, even if another
    # thread writes it meanwhile (an atomic add of zero).
    void touch_for_write "scanpay_touch_for_write"(char* address) nogil

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
# Tables above this size live in a row space (see above).
cdef size_t SPACE_FROM_BYTES = 8 << 20
# How far ahead of the rows reserved the populate thread faults pages in:
# AHEAD_STEPS times the rows the reserve added, at most AHEAD_BYTES_MAX.
# Eight batches of slack absorb the thread's delays on a busy machine.
cdef size_t AHEAD_STEPS = 8
cdef size_t AHEAD_BYTES_MAX = 32 << 20
cdef size_t POPULATE_CHUNK_BYTES = 4 << 20
POPULATE_JOBS_MAX = 256


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
    """Fault in the pages of [start, start + length) for writing, in one
    call, changing no byte (the writer may be writing rows there)."""
    cdef size_t at = 0
    if madvise(start, length, MADV_POPULATE_WRITE) == 0:
        return
    while at < length:              # before Linux 5.14: touch each page
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
            self.mapping = <char*>mmap(NULL, self.mapped, PROT_NONE,
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
        if mprotect(self.base + self.committed, end - self.committed, PROT_READ | PROT_WRITE):
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
        """Fault in now what the populate thread has not yet of the pages of
        bytes [0, need_bytes) (committed), rather than one page fault at a
        time inside the next apply."""
        cdef size_t end = self.populate_end(need_bytes)
        cdef size_t at = self.populated // PAGE_BYTES * PAGE_BYTES
        if end <= self.populated:
            return
        with nogil:
            fault_in(self.base + at, end - at)
        if end > self.populated:        # the populate thread may have gone further meanwhile
            self.populated = end

    cdef void populate_later(self, size_t need_bytes):
        """Ask the populate thread to fault in the pages of [0, need_bytes)."""
        cdef size_t end = self.populate_end(need_bytes)
        if end <= self.populated or end <= self.requested:
            return
        jobs = populate_jobs()
        try:
            jobs.put_nowait((self, end))
            self.requested = end
        except _queue.Full:         # the writer populates at reserve time instead
            pass

    cdef void populated_by_thread(self, size_t end) noexcept nogil:
        """The populate thread's part, without the GIL, in chunks: mprotect
        (a reserve) and fork (a snapshot) wait for the memory map's lock,
        which one madvise holds for its whole range. `populated` is read
        and written by both threads without a lock: an aligned 8-byte
        store, and a stale value only repeats work that changes nothing."""
        cdef size_t start = self.populated // PAGE_BYTES * PAGE_BYTES, stop
        while start < end:
            stop = min(start + POPULATE_CHUNK_BYTES, end)
            fault_in(self.base + start, stop - start)
            if stop > self.populated:
                self.populated = stop
            start = stop

    cdef int grow(self, size_t need, size_t ahead) except -1:
        """Room for bytes [0, need): committed and faulted in, now for what
        the populate thread has not done yet, and by the thread up to
        `ahead` bytes further."""
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


# The populate thread: one per process, started on first use (and again in
# a forked child, which has no thread of its parent's).
_populate = {"pid": 0, "jobs": None}


def _populate_loop(jobs):
    """Fault in what each job asks; a job holds its space, so the mapping
    outlives the work on it."""
    cdef RowSpace space
    cdef size_t end
    while True:
        space, end = jobs.get()
        with nogil:
            space.populated_by_thread(end)
        space = None


cdef object populate_jobs():
    if _populate["pid"] != _os.getpid():
        jobs = _queue.Queue(POPULATE_JOBS_MAX)
        _threading.Thread(target=_populate_loop, args=(jobs,), daemon=True,
                          name="scanpay-populate").start()
        _populate.update(pid=_os.getpid(), jobs=jobs)
    return _populate["jobs"]


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


cdef RowSpace space_with(object dtype, int64_t rows, object copy_from=None):
    """A new row space for `rows` rows of `dtype`, populated, holding a copy of
    `copy_from` (an array of `dtype`) if given."""
    dtype = np.dtype(dtype)
    cdef size_t need = <size_t>max(rows, 1) * dtype.itemsize
    cdef RowSpace space = RowSpace(dtype, space_bytes_for(dtype.itemsize), need)
    space.populate(need)
    cdef cnp.ndarray source
    if copy_from is not None and len(copy_from):
        source = np.ascontiguousarray(copy_from, dtype)
        memcpy(space.base, cnp.PyArray_DATA(source), source.nbytes)
    return space
