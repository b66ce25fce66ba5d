"""A lone request's fsync and reply on a thread that never takes the GIL.

A caller paying one at a time waits, each payment, for one fdatasync and
for whatever hands the work between threads around it. Through the sync
thread's executor job that was about 6.5 wake-ups of a thread a payment
against PostgreSQL's 3 (docs/performance.md, "One caller: where the tail
comes from"): the job woke the sync thread, which then waited for the event
loop to release the GIL before it could write, and took it again after the
fdatasync. On a shared machine each wake-up is a chance to wait behind
another tenant's work.

So when a request finds the journal idle and nothing queued behind it, the
event loop plans the journal write itself (`Journal.lone_write`: the fd,
the buffers, the offset) and hands it to a `Syncer` (ext/outlet.pyx) whose
thread waits on a C condition: it writes, fdatasyncs and sends the PAY
replies the writer attached meanwhile (`attach`), all without the GIL, then
makes an eventfd readable. The event loop takes the outcome (`reap`) and
does the bookkeeping: the journal's durable mark, the fsync future.
Whatever is journaled meanwhile waits for the next fsync, on the
group-commit sync thread as before, which starts at once: its `sync` first
waits for the lone write (without the GIL) and takes the outcome itself if
the event loop has not yet (`wait`), so the fsync cadence under load does
not depend on when the loop gets to the eventfd. No reply leaves before its
fdatasync returned, and a failed write fails the journal exactly as a
failed `sync` does.
"""
from __future__ import annotations

import logging
import threading
import time

from engine._outlet import Syncer
from engine.core.engine import SyncFuture
from engine.server.threads import raise_thread_priority

log = logging.getLogger("scanpay.writer")

# The largest write taken this way: a lone caller's entry is a few hundred
# bytes. A big PAY frame's fsync stays on the sync thread, which goes on with
# the next fsync at once instead of waiting for the event loop to take this
# one's outcome between two applies.
LONE_BYTES_MAX = 64 << 10
LONE_BUFFERS_MAX = 64           # Syncer's JOB_BUFFERS_MAX (a journal entry has 1-3)
# No lone sync this soon after the sync thread's last fsync of a group (more
# than one requester): while many callers keep it busy (a group every few
# ms), the moments the server is drained would otherwise send an fsync now
# and then the other way (5-40 a second under 16 connections x 64), and the
# many-caller path should stay the sync thread's alone. A lone caller's
# fsyncs on the sync thread (after a segment roll, say) cover one
# requester each, so they do not keep it from the lone path.
LONE_AFTER_GROUP_S = 0.010
SETTLE_WARN_S = 5.0             # a journal I/O waiting for a lone write says so this often
SETTLE_ROUNDS_MAX = 120         # ... and gives up after this many rounds (10 min)


class LoneSync:
    """The writer's lone-request path (`Engine.lone_sync`). On the event
    loop, except the thread in `serve` and `wait` (the sync thread's)."""

    def __init__(self, writer):
        self.writer = writer
        self.engine = writer.engine
        self.journal = writer.engine.storage.journal
        self.syncer = Syncer(writer.courier)
        self.job = None                 # (future, journal write) in flight
        self.last = None                # the future of the last lone sync begun
        self.thread = None
        self.syncs = 0                  # lone syncs started (observability)

    @staticmethod
    def supported(engine) -> bool:
        """A local journal (a replicated node's log syncs otherwise)."""
        return engine.storage is not None and hasattr(engine.storage.journal, "lone_write")

    def start(self, loop) -> None:
        self.thread = threading.Thread(target=self.serve, name="scanpay-lone-sync", daemon=True)
        self.thread.start()
        loop.add_reader(self.syncer.fileno, self.reap)

    def serve(self) -> None:
        raise_thread_priority(self.engine.io_threads_nice, "lone sync")
        self.syncer.serve()

    def stop(self, loop) -> None:
        """After the writer released everything: no job is out."""
        self.settle(SETTLE_WARN_S)
        loop.remove_reader(self.syncer.fileno)
        self.syncer.close()
        self.thread.join()

    def begin(self) -> SyncFuture | None:
        """Engine._request_sync, for a lone requester on an idle journal: the
        future of a sync started on the thread, or None (then the sync thread)."""
        writer = self.writer
        deliveries = writer.deliveries
        if (self.job is not None or writer.queue or len(deliveries) > 1
                or deliveries and deliveries[0][0] is not self.last
                or time.perf_counter() - self.engine.group_synced_at < LONE_AFTER_GROUP_S):
            # Something queued behind it, or earlier replies not yet released
            # (other than the last lone sync's, done): others are paying too
            # (a group is forming; under load the sync thread, which goes on
            # from fsync to fsync, serves them better).
            return None
        write = self.journal.lone_write(LONE_BYTES_MAX, LONE_BUFFERS_MAX, self.wait)
        if write is None:
            return None
        future = SyncFuture()
        future.lone = True
        self.syncer.start(write.fd, write.buffers, write.offset)
        self.job = (future, write)
        self.last = future
        self.syncs += 1
        return future

    def attach(self, durable, sends) -> bool:
        """The PAY replies `durable` releases, for the thread to send right
        after its fdatasync. False if that fdatasync has already returned
        (the apply took longer): the entries are withdrawn, and the writer's
        release writes them, as for replies queued too late for the sender."""
        if durable is not self.last:
            return True                     # not a lone sync's
        job = self.job
        if job is not None and job[0] is durable and self.syncer.attach(sends):
            return True
        sends.withdraw()
        self.writer.sends.pop(durable, None)
        return False

    def reap(self) -> None:
        """The eventfd is readable (or a wait): take the finished job's
        outcome. Only one thread takes it (`Syncer.take`)."""
        outcome = self.syncer.take()
        if outcome is None:
            return
        future, write = self.job
        self.job = None
        error, future.sync_started_at, future.synced_at = outcome
        self.writer.sends.pop(future, None)
        self.engine.lone_synced(future, write, error)

    def wait(self) -> None:
        """For the journal's own I/O (Journal.lone_write's `wait`; on the sync
        thread when an fsync waits for this one, or on the event loop): until
        the job is done, then its outcome taken here unless another thread
        took it, however long the disk takes, as a sync holding the journal would."""
        for _ in range(SETTLE_ROUNDS_MAX):
            if self.syncer.wait_done(SETTLE_WARN_S):
                self.reap()
                return
            log.warning("a lone fsync has not returned for %.0f s; the journal waits for it",
                        SETTLE_WARN_S)
        raise TimeoutError("a lone fsync did not return")

    def settle(self, timeout_s: float) -> None:
        """Engine._wait_sync_idle: the job, if any, done and reaped within
        `timeout_s` (else TimeoutError)."""
        if self.job is None:
            return
        if not self.syncer.wait_done(timeout_s):
            raise TimeoutError(f"a lone fsync did not return within {timeout_s} s")
        self.reap()
