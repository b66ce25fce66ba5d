"""AUDIT in the server without stopping payments.

AUDIT reads the whole state (about 4 s at 1 M payments). Run in the writer,
every payment waited for it. Instead the writer forks a child between two
batches, as a snapshot does (engine/storage/durability.py): the child runs the same
checks (engine/core/audit.py) on its copy-on-write image of the state as of that
point, writes the report as MessagePack to a pipe and exits; the event loop
reads the pipe and releases the reply, while the writer goes on applying
batches.

- The report reflects the state after journal entry `seq` at engine time
  `now` (both added to the reply): every request the writer took before the
  AUDIT, and none after.
- One audit child at a time. An AUDIT that arrives while one runs waits
  (up to AUDITS_WAITING_MAX of them, then `busy`); when the child is done,
  one new child serves every waiting AUDIT, so each report reflects a state
  at least as new as its request.
- A child that fails, dies or outlives `timeout_s` (it is then killed)
  gives an `unavailable` error reply (retryable), never a hang.
- The child runs under SCHED_IDLE: it gets a core only when no other thread
  wants one, and a waking writer takes the core back at once (a nice-19
  child could keep it until its deadline). Under full load the payments keep
  their CPU and the audit takes longer (docs/performance.md, "AUDIT under
  load"). A stopping server lets it run at normal priority.
- The child first lets go of the pages the writer writes and the checks do
  not read, so that the writer does not copy a shared page at every other
  write (release_writer_pages says why).
- The event loop never waits for the child: it reads the report as the
  child writes it, and answers once the child's pidfd says it has exited
  (exiting frees the child's gigabytes, which at SCHED_IDLE on a busy
  machine may take seconds).

The embedded `Engine` keeps AUDIT in process (its caller waits for it
anyway). Linux only, as the snapshots.
"""
import contextlib
import ctypes
import logging
import os
import resource
import signal
import time

import msgspec
import numpy as np

from engine.core import audit as audit_checks
from engine.core import export
from engine.protocol.errors import Busy, EngineError, Unavailable
from engine.core.ops.query import audit_refusal

log = logging.getLogger("scanpay.audit")

AUDIT_TIMEOUT_S = 600               # a child still running after this is killed
# The child's scheduling: SCHED_IDLE (None), or a nice value (to measure
# against). A waking thread preempts an idle-policy task at once; a nice-19
# task on the core is preempted only once its virtual deadline has passed
# (wakeup preemption in the kernel's kernel/sched/fair.c), so the writer may
# wait for it.
AUDIT_NICE = None
AUDITS_WAITING_MAX = 64             # AUDITs waiting for the next child; more get busy
REPORT_BYTES_MAX = 16 << 20         # a report is a few KiB; a child sending more is broken
READ_CHUNK_BYTES = 1 << 16
PAGE_BYTES = resource.getpagesize()
RELEASE_BYTES_MIN = 1 << 20         # smaller tables are not worth a system call
MADV_DONTNEED = 4                   # <sys/mman.h> on Linux
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
# Tests only: called in the child before the checks (to hold it back, or
# make it fail). Never set in production.
CHILD_HOOK = None


class AuditRun:
    """One audit child: the AUDITs it answers and what its report reflects."""
    __slots__ = ("pid", "fd", "pidfd", "works", "durable", "seq", "now", "started",
                 "pause_ms", "timer", "chunks", "size", "killed_because", "generation")

    def __init__(self, pid, fd, pidfd, works, durable, seq, now, started, generation):
        self.pid, self.fd, self.pidfd = pid, fd, pidfd
        self.works, self.durable = works, durable
        self.seq, self.now = seq, now
        # The engine's rebuild count at the fork: if a storage failure drops
        # commands before the report comes back, the report saw them.
        self.generation = generation
        self.started = started
        self.pause_ms = (time.perf_counter() - started) * 1000     # the writer's, for the fork
        self.timer = None
        self.chunks = []
        self.size = 0
        self.killed_because = None


class Audits:
    """The server's AUDITs, for one Writer (engine/server/writer.py)."""

    def __init__(self, writer, timeout_s: float = AUDIT_TIMEOUT_S):
        self.writer = writer
        self.timeout_s = timeout_s
        self.running = None                 # the AuditRun of the child, until it is reaped
        self.waiting = []                   # Work: AUDITs for the next child
        self.children = 0                   # children forked so far (metrics, tests)

    @property
    def active(self) -> bool:
        return self.running is not None or bool(self.waiting)

    def ready(self) -> bool:
        """AUDITs wait and no child runs: the writer calls start() now."""
        return self.running is None and bool(self.waiting)

    def request(self, work) -> None:
        """In the writer, for an AUDIT it took from its queue."""
        refusal = audit_refusal(work.request)
        if refusal is not None:
            return self.writer.schedule(None, [(work.deliver, refusal)])
        if len(self.waiting) >= AUDITS_WAITING_MAX:
            return self.writer.schedule(None, [(work.deliver, Busy(
                f"{AUDITS_WAITING_MAX} AUDITs already wait for the running one; retry later"))])
        self.waiting.append(work)
        if self.running is None:
            self.start()

    def start(self) -> None:
        """In the writer, between batches: fork a child for every waiting AUDIT."""
        works, self.waiting = self.waiting, []
        engine = self.writer.engine
        if self.writer.position is not None:    # replicated: the stream seq it reflects
            from engine.server.writer import with_position
            for work in works:
                work.deliver = with_position(work.deliver, self.writer.position())
        try:
            engine._ensure_current()        # a state holding dropped commands is rebuilt first
            durable = engine.expire_due()   # as any read does first
        except EngineError as error:        # storage failed: the EXPIRE is refused
            return self.writer.schedule(None, [(w.deliver, error) for w in works])
        seq = engine.storage.journal.last_seq if engine.storage is not None else 0
        now = engine._now()
        started = time.perf_counter()
        try:
            pid, read_fd, pidfd = fork_child(engine.state, not self.writer.stopping)
        except OSError as e:
            log.error("could not fork the audit process: %s", e)
            error = Unavailable(f"could not start the audit process ({e}); retry later")
            return self.writer.schedule(durable, [(w.deliver, error) for w in works])
        self.children += 1
        run = self.running = AuditRun(pid, read_fd, pidfd, works, durable, seq, now, started,
                                      engine.generation)
        loop = self.writer.loop
        loop.add_reader(read_fd, self.readable, run)
        loop.add_reader(pidfd, self.exited, run)
        run.timer = loop.call_later(self.timeout_s, self.kill, run, "timed out")

    def hurry(self) -> None:
        """The server stops: the running child may take a core like any
        other process (payments no longer need them)."""
        if self.running is not None:
            with contextlib.suppress(OSError):
                os.sched_setscheduler(self.running.pid, os.SCHED_OTHER, os.sched_param(0))

    def readable(self, run: AuditRun) -> None:
        """In the event loop: the child's report, until end of file."""
        while run.fd is not None:
            try:
                data = os.read(run.fd, READ_CHUNK_BYTES)
            except BlockingIOError:
                return
            except OSError as e:
                log.error("reading the audit report failed: %s", e)
                data = b""
            if not data:                    # answered once the child is reaped
                self.stop_reading(run)
                return
            run.chunks.append(data)
            run.size += len(data)
            if run.size > REPORT_BYTES_MAX:
                self.stop_reading(run)
                self.kill(run, f"sent more than {REPORT_BYTES_MAX} bytes")

    def stop_reading(self, run: AuditRun) -> None:
        self.writer.loop.remove_reader(run.fd)
        os.close(run.fd)
        run.fd = None

    def kill(self, run: AuditRun, because: str) -> None:
        """Stop a child; its exit then finishes the run as failed."""
        if run.killed_because is None:
            run.killed_because = because
            with contextlib.suppress(ProcessLookupError):
                os.kill(run.pid, signal.SIGKILL)

    def exited(self, run: AuditRun) -> None:
        """In the event loop: the child has exited (its pidfd is readable)."""
        loop = self.writer.loop
        loop.remove_reader(run.pidfd)
        os.close(run.pidfd)
        run.timer.cancel()
        cpu_s = 0.0
        try:
            # (WNOHANG all the same: a pidfd is readable once the child is a zombie)
            reaped, status, usage = os.wait4(run.pid, os.WNOHANG)
            exit_code = os.waitstatus_to_exitcode(status) if reaped else 0
            cpu_s = usage.ru_utime + usage.ru_stime
        except ChildProcessError:           # reaped elsewhere: judge by its report
            exit_code = 0
        if run.fd is not None:              # the rest of what it wrote (no writer left)
            self.readable(run)
            if run.fd is not None:
                self.stop_reading(run)
        reply = self.reply(run, exit_code, time.perf_counter() - run.started, cpu_s)
        self.running = None
        self.writer.schedule(run.durable, [(w.deliver, reply) for w in run.works])
        self.writer.wake.set()              # the writer starts the next child, or stops

    def reply(self, run: AuditRun, exit_code: int, took_s: float, cpu_s: float):
        """The reply for the run's AUDITs: the report, or an Unavailable."""
        what = f"audit at entry {run.seq}"
        if run.generation != self.writer.engine.generation:
            message = ("storage failed while the audit ran: the state it checked held "
                       "commands that were not made durable and were dropped; retry")
        elif run.killed_because is not None:
            message = f"the audit process {run.killed_because} (after {took_s:.1f} s) and was killed"
        elif exit_code == -signal.SIGKILL:
            message = ("the audit process was killed (signal 9: by the kernel's OOM killer? "
                       "it needs memory for a copy of the tables; see the kernel log)")
        elif exit_code != 0:
            message = f"the audit process died (exit code {exit_code})"
        else:
            report = decoded(run.chunks)
            if report is None:
                report = {"failed": "its report is not MessagePack"}
            if "failed" not in report:
                log.info("%s: %s in %.1f s (%.1f CPU-s; fork pause %.1f ms)", what,
                         "ok" if report["ok"] else "FAILED", took_s, cpu_s, run.pause_ms)
                return {**report, "seq": run.seq, "now": run.now}
            message = f"the audit failed to run: {report['failed']}"
        log.error("%s: %s", what, message)
        return Unavailable(f"{message}; nothing was changed; retry AUDIT (see the server log)")


def decoded(chunks: list):
    """The report in `chunks`, or None if it is not (all of) one."""
    try:
        report = msgspec.msgpack.decode(b"".join(chunks))
    except msgspec.DecodeError:
        return None
    return report if isinstance(report, dict) else None


def fork_child(state, idle: bool) -> tuple[int, int, int]:
    """(pid, read end of its report pipe, its pidfd). `idle`: SCHED_IDLE."""
    read_fd, write_fd = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(read_fd)
        os.close(write_fd)
        raise
    if pid == 0:
        child_main(state, write_fd, idle)       # never returns
    os.close(write_fd)
    os.set_blocking(read_fd, False)
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:                             # (not before Linux 5.3)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_fd)
        raise
    return pid, read_fd, pidfd


def child_main(state, write_fd: int, idle: bool) -> None:
    """The audit child: compute, write the pipe, leave. It touches nothing
    the server's other threads may hold (no logging, no journal, no
    sockets), as the snapshot child (engine/storage/durability.py)."""
    code = 1
    try:
        # Keep no inherited fd but stdio and the pipe: a restarted server
        # must be able to bind and lock its data directory while we run.
        os.closerange(3, write_fd)
        os.closerange(write_fd + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        # The server's handlers (its event loop's) mean nothing here: a stop
        # of the service (SIGTERM to the whole group) ends this child at once.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        try:
            release_writer_pages(state)
            # The writer and its threads come first: we use what they leave.
            if idle and AUDIT_NICE is None:
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            elif idle:
                os.nice(AUDIT_NICE)
            if CHILD_HOOK is not None:
                CHILD_HOOK()
            payload = msgspec.msgpack.encode(audit_checks.audit(export.canonical(state)))
        except Exception as e:              # noqa: BLE001 - the server logs it
            payload = msgspec.msgpack.encode({"failed": f"{type(e).__name__}: {e}"})
        view = memoryview(payload)
        while view:                         # blocking: the event loop reads as we write
            view = view[os.write(write_fd, view):]
        # End of file for the server now: exiting frees this process's
        # gigabytes, which takes a while at SCHED_IDLE on a busy machine.
        os.close(write_fd)
        code = 0
    finally:
        os._exit(code)


def release_writer_pages(state) -> None:
    """Let go of this child's share of what the writer writes and the checks
    do not read: the tables' free rows (their reserved capacity, where the
    writer appends) and the id indexes other than export.INDEXES_READ.

    While a page is shared with this child, the writer's first write to it
    faults and copies it, and splits the 2 MiB page it sits on (numpy asks
    for huge pages; a split page stays split, and random accesses to it miss
    the TLB). Measured at 1 M payments, a forked child that only slept held
    the kernel at a third to a half of its rate per CPU-second, a fault every
    8 payments or so (appended rows, index inserts). Pages this child has
    dropped are the writer's alone again: they fault once per 2 MiB, as
    without a child. What stays shared (the used rows, which the checks
    read) faults at most once per page per audit."""
    arrays, _scalars = state.ledger.dump()      # views of the used rows; the indexes
    for name, array in arrays.items():
        if name.endswith("_ix"):
            if name[:-len("_ix")] not in export.INDEXES_READ:
                release(array)
            continue
        whole = array.base                      # the table with its free rows
        if (isinstance(whole, np.ndarray) and whole.dtype == array.dtype and whole.ndim == 1
                and whole.ctypes.data == array.ctypes.data and len(whole) > len(array)):
            release(whole[len(array):])
    # Large tables: their row spaces past the used rows, with the pages
    # faulted in ahead of the writer (ext/kernel/rowspace.pxi).
    state.ledger.release_free_pages()


def release(array: np.ndarray) -> None:
    """Drop this process's pages of `array`'s buffer (whole pages inside it
    only: its neighbours in the heap stay). Reading it afterwards would read
    zeros: only for buffers this process never reads again."""
    if not isinstance(array, np.ndarray) or array.nbytes < RELEASE_BYTES_MIN:
        return
    start = -(-array.ctypes.data // PAGE_BYTES) * PAGE_BYTES
    end = (array.ctypes.data + array.nbytes) // PAGE_BYTES * PAGE_BYTES
    if end > start:
        _libc.madvise(start, end - start, MADV_DONTNEED)
