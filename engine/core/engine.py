"""The embeddable engine: one writer applying batches and map calls to the
in-memory state, deterministically, at stamped engine times.

Every state-changing call becomes a `Command` (op, engine time, random draws,
body) that is journaled, applied, and acknowledged only once the journal's
fsync covering it has returned. Replay applies the same commands through the
same `_execute`, so a recovered engine equals the one that crashed.

A storage failure is a fail-stop, recovered in process: the journal drops
the commands that were not durable (their callers get `unavailable`), and
before the next read or write the engine rebuilds its state from the
snapshot and the durable journal, exactly as at start (`_ensure_current`).
"""
import concurrent.futures
import os
import logging
import secrets
import threading
import time
from typing import Any, Callable

import msgspec
import numpy as np

from engine.core import canonical, export, scope

from engine.storage import durability
from engine.core.command import Command
from engine.core.ops.money import BuiltLater
from engine.core.dispatch import MAP_OPS, MAP_OPS_BY_CODE
from engine.protocol.ops import (OP_CAPTURE_RECORDS, OP_EXPIRE, OP_ISSUE, OP_PAY, OP_REFUND_RECORDS,
                                 PLANNED_OPS)
from engine._kernel import TABLE_ROWS
from engine.storage.durability import Storage
from engine.protocol.errors import BadBody, Unavailable, UnknownOp
from engine.core.group_commit import COMMIT_SIBLINGS_DEFAULT, commit_wait_s
from engine.storage.journal import JournalError
from engine.protocol.records import (
    CAPTURE_RECORD, ISSUE_RECORD, ISSUE_RESULT, PAY_RECORD, PAY_RESULT, REFUND_RECORD,
    REFUND_RESULT)
from engine.protocol.limits import BATCH_RECORDS_MAX, PAYMENT_CODE_MAX, PAYMENT_CODE_MIN
from engine.core.state import HOLD_MS_DEFAULT, TZ_OFFSET_MS_DEFAULT, State
from engine.server.threads import NICE_MIN, raise_thread_priority

log = logging.getLogger("scanpay.engine")

SYNC_IDLE_WAIT_S = 5.0          # a rebuild waits this long for the sync thread to finish
# Record ops: op -> (record dtype, result dtype, the kernel's batch apply).
RECORD_OPS = {
    OP_PAY: (PAY_RECORD, PAY_RESULT, "pay"),
    OP_ISSUE: (ISSUE_RECORD, ISSUE_RESULT, "issue"),
    OP_CAPTURE_RECORDS: (CAPTURE_RECORD, PAY_RESULT, "capture_records"),
    OP_REFUND_RECORDS: (REFUND_RECORD, REFUND_RESULT, "refund_records"),
}
CAPACITY_TABLES = ("users", "merchants", "stocks", "coupons", "payments", "codes",
                   "refunds", "tombstones", "memberships", "visits", "earnings")


def with_visits(capacity: dict) -> dict:
    """A payments hint sizes the visits too, unless they have their own: a
    payment adds at most one visit row (a new payer at a merchant), and
    growing the visits index mid-traffic rehashes it while replies wait."""
    if "payments" in capacity and "visits" not in capacity:
        return {**capacity, "visits": capacity["payments"]}
    return capacity


def rows_for_tables(capacity: dict, tail: dict):
    """What a snapshot load allocates for each ledger array: the table's
    capacity hint, or its loaded rows plus the journal tail, if more. Loading
    with that headroom spares copying every table once more right after."""
    wanted = {}
    for table, names in TABLE_ROWS.items():
        for name in names + (("auth_queue",) if table == "payments" else ()):
            wanted[name] = (int(capacity.get(table, 0)), tail.get(table, 0))

    def rows_for(name: str, rows: int) -> int:
        hint, more = wanted.get(name, (0, 0))
        return max(hint, rows + more)
    return rows_for


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def random_payment_code() -> int:
    """18 decimal digits from the OS CSPRNG."""
    return PAYMENT_CODE_MIN + secrets.randbelow(PAYMENT_CODE_MAX - PAYMENT_CODE_MIN)


def random_key() -> int:
    """64 bits of a campaign's key from the OS CSPRNG."""
    return secrets.randbits(64)


class SyncFuture(concurrent.futures.Future):
    """Done once one group-commit fsync has made everything journaled before
    it durable (its result: the durable seq). The sync thread notes, before
    completing it, when that fsync's write + fdatasync began and returned
    (`time.perf_counter` seconds; 0.0 until then), for the server's latency
    metrics."""

    def __init__(self):
        super().__init__()
        self.sync_started_at = 0.0
        self.synced_at = 0.0
        self.waited = False     # it waited for the group-commit window first
        self.lone = False       # made by the lone-sync thread (engine/server/lone_sync.py)

    def cancel(self) -> bool:
        """Refused: every command the fsync covers shares this future, so
        one waiter that gives up must not cancel it for the others (nor make
        the sync thread's `set_result` fail on a cancelled future)."""
        return False


class Engine:
    """Scanpay in process. `Engine()` keeps state in memory; `Engine(path)`
    journals every change to the data directory `path` and recovers from it.

    >>> eng = Engine()
    >>> eng.call("WALLETS", {"users": [1]})
    {'results': [{'status': 0}]}
    """

    # perf_counter when the sync thread last returned from an fsync that
    # covered more than one requester (engine/server/lone_sync.py reads it).
    group_synced_at = 0.0

    def __init__(self, path: str | os.PathLike[str] | None = None, *,
                 clock: Callable[[], int] | None = None,
                 code_source: Callable[[], int] | None = None,
                 key_source: Callable[[], int] | None = None,
                 tz_offset_ms: int = TZ_OFFSET_MS_DEFAULT,
                 hold_ms: int = HOLD_MS_DEFAULT, currency: str = "CNY",
                 capacity: dict[str, int] | None = None, commit_interval_us: int = 0,
                 commit_siblings: int = COMMIT_SIBLINGS_DEFAULT,
                 io_threads_nice: int = 0, **storage_options: Any) -> None:
        self.clock = clock or wall_clock_ms
        self.code_source = code_source or random_payment_code
        # Campaign keys (CAMPAIGNS' holdout draw): u64s from the OS CSPRNG.
        self.key_source = key_source or random_key
        self.currency = currency
        self.hold_ms = hold_ms
        self.tz_offset_ms = tz_offset_ms
        self.storage = None
        self._tail_counted = {}         # snapshot seq -> rows its journal tail adds
        for table in capacity or {}:
            if table not in CAPACITY_TABLES:
                raise ValueError(f"capacity: unknown table {table!r} (known: {CAPACITY_TABLES})")
        self._capacity = with_visits(capacity or {})
        if path is not None:
            self.storage = Storage(path, **storage_options)
            self.storage.check_settings({"tz_offset_ms": tz_offset_ms, "hold_ms": hold_ms,
                                         "currency": currency})
        self._load_state()
        # Fail-stop bookkeeping (`_ensure_current`): the journal seq of the
        # last command applied to the state, whether the state must be
        # rebuilt, when a failed rebuild may be tried again, the engine time
        # the next command may not go below, and how many rebuilds there were
        # (the server's writer turns replies computed before one into
        # `unavailable`).
        self._applied_seq = self.storage.journal.last_seq if self.storage else 0
        self._stale = False
        self._rebuild_after = 0.0
        self._now_floor_ms = 0
        self.generation = 0
        # The sync thread (and the server's sender thread) at this nice value
        # relative to the process: engine/server/threads.py says why.
        assert NICE_MIN <= io_threads_nice <= 0
        self.io_threads_nice = io_threads_nice
        self._sync_pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="scanpay-sync", initializer=raise_thread_priority,
            initargs=(io_threads_nice, "sync")) if self.storage else None
        self._sync_lock = threading.Lock()
        self._sync_waiting = None       # the future the next fsync completes
        self._sync_busy = False         # the sync thread is running fsyncs
        self._lone_out = False          # a lone sync is out (lone_sync.begin)
        # Group commit window (engine/core/group_commit.py): under load (the
        # fsync covers at least commit_siblings requesters) an fsync starts
        # up to this long after the one before, and covers everything
        # journaled meanwhile; otherwise at once. The
        # server sets it (Config.commit_interval_us); an embedded engine,
        # whose callers wait for each write in turn, leaves it 0.
        assert commit_interval_us >= 0 and commit_siblings >= 0
        self._commit_interval_s = commit_interval_us / 1e6
        self._commit_siblings = commit_siblings
        self._sync_started_at = 0.0
        self._sync_requesters = 0       # requesters the next fsync covers so far
        self.commit_waits = 0           # fsyncs that waited for the window
        # Called in the sync thread with each fsync's future once that fsync
        # has returned, before the future completes: the server's writer
        # hands the replies it covers to its sender thread (ext/outlet.pyx).
        self.on_durable = None
        self.lone_sync = None   # the server's lone-request fsync (engine/server/lone_sync.py)
        # Called with (state, seq) right after each journaled command is
        # applied, live (not on replay): a replicated node's checkpoints
        # (engine/replication/checkpoint.py).
        self.on_applied = None

    # -- time -------------------------------------------------------------

    def _now(self) -> int:
        """max(last kept stamp, clock): engine time never goes back, not
        even behind the stamps of commands a storage failure dropped."""
        return max(self.state.now, self._now_floor_ms, int(self.clock()))

    # -- fail-stop after a storage failure ----------------------------------

    def _ensure_current(self) -> None:
        """Before any read or write: if a storage failure dropped commands
        that the state had applied, rebuild the state from the last snapshot
        and the durable journal (the start-up path; replay is deterministic).
        Raises Unavailable while that cannot be done (retried every
        RECOVER_INTERVAL_MS)."""
        if self.storage is None:
            return
        if not self._stale and self._applied_seq <= self.storage.journal.last_seq:
            return
        if time.monotonic() < self._rebuild_after:
            raise Unavailable("storage failed; the state is being rebuilt from the journal "
                              "(see the server log); retry later")
        self._stale = True
        self._now_floor_ms = max(self._now_floor_ms, self.state.now)
        try:
            self._rebuild()
        except (OSError, JournalError, concurrent.futures.TimeoutError) as error:
            self._rebuild_after = time.monotonic() + durability.RECOVER_INTERVAL_MS / 1000
            log.error("rebuilding the state after a storage failure failed (%s); reads and "
                      "writes are refused until it succeeds (retried)", error)
            raise Unavailable(f"storage failed and the state could not be rebuilt yet: "
                              f"{error}; retry later") from None
        self._stale = False
        self.generation += 1

    def _rebuild(self) -> None:
        """The state as the journal's durable prefix says, in place of one
        that holds dropped commands."""
        started = time.perf_counter()
        self._wait_sync_idle()
        journal = self.storage.journal
        assert journal.last_seq == journal.durable_seq, "rebuild with entries pending"
        why = ("the replicated stream refused them (answered not_leader)"
               if getattr(journal, "replicated", False) else
               "storage failed (answered unavailable)")
        log.warning("dropping the %d applied commands after journal entry %d: %s; rebuilding "
                    "the state from the journal", self._applied_seq - journal.durable_seq,
                    journal.durable_seq, why)
        self.storage.prepare_reload()
        self._tail_counted.clear()          # the tails are longer than at start
        self._load_state()
        self._applied_seq = journal.durable_seq
        log.warning("state rebuilt at journal entry %d in %.3f s", self._applied_seq,
                    time.perf_counter() - started)

    def _wait_sync_idle(self) -> None:
        """Until the sync thread has completed every fsync requested so far.
        After a failure each of them finds the journal failed and fails, so
        none can complete `ok` for a dropped command once the journal has
        recovered: the journal may recover only after this."""
        if self.lone_sync is not None:
            self.lone_sync.settle(SYNC_IDLE_WAIT_S)     # raises TimeoutError like the pool
        self._sync_pool.submit(lambda: None).result(timeout=SYNC_IDLE_WAIT_S)

    def _storage_ready(self) -> None:
        """Before a command is journaled: the state holds no dropped command,
        and the journal takes writes (retried at most every
        RECOVER_INTERVAL_MS; else Unavailable: nothing applied)."""
        self._ensure_current()
        if not self.storage.journal.failed:
            return                  # (if it fails from here on, append refuses)
        if getattr(self.storage.journal, "replicated", False):
            # A replicated node that does not lead: NotLeader at once. (Its
            # sync thread may be busy for long sending an append again; a
            # refused log recovers only by a rebuild, never here.)
            self.storage.before_write()
            return
        try:
            self._wait_sync_idle()
        except concurrent.futures.TimeoutError:
            raise Unavailable("storage failed; writes are refused until it works again "
                              "(see the server log); retry later") from None
        self.storage.before_write()
        # Commands may have been dropped after the check above, before the
        # sync thread was idle: rebuild now, before anything is appended.
        self._ensure_current()

    def _load_state(self) -> None:
        """The state from the newest snapshot and the journal after it (an
        empty one without storage): at start, and after a storage failure."""
        # The old state goes first: two copies of a large state may not fit.
        self.state = State(tz_offset_ms=self.tz_offset_ms, hold_ms=self.hold_ms)
        if self.storage is not None:
            tail = self._tail_records(self.storage.newest_snapshot_seq())
            recovered = self.storage.load_state(rows_for_tables(self._capacity, tail))
            if recovered is not None:
                self.state = recovered
        # Before replay, so that replay does not grow the tables step by step.
        # A hint is the table's whole size: after a restart it is not added again.
        ledger = self.state.ledger
        for table, rows in self._capacity.items():
            ledger.reserve(table, max(0, int(rows) - ledger.rows(table)))
        if self.storage is not None:
            self._replay()

    # -- the write path ---------------------------------------------------

    def _execute(self, command: Command):
        """Apply one command to the state: deterministic, no clock, no I/O."""
        assert command.now >= self.state.now, "engine time went back"
        self.state.now = command.now
        ledger = self.state.ledger
        ledger.expire(command.now)          # docs/reference/rules.md: before applying anything
        if command.op == OP_EXPIRE:
            return None
        if command.op in RECORD_OPS:
            record, result, apply = RECORD_OPS[command.op]
            out = np.empty(len(command.body) // record.itemsize, result)
            if command.op == OP_PAY and self.state.scoped_tombstones:
                scope.pay(self.state, command.body, command.now, out)
            else:
                getattr(ledger, apply)(command.body, command.now, out.view(np.uint8))
            return out
        spec = MAP_OPS_BY_CODE[command.op]
        request = msgspec.msgpack.decode(command.body)
        return spec.apply(self.state, request, command.now, command.draws)

    def _begin(self, command: Command, requesters: int = 1):
        """Journal the command and start the fsync that covers it, in a worker
        thread, so that it runs while the kernel applies (without the GIL).
        Returns the future of that fsync (None for an in-memory engine)."""
        if self.storage is None:
            return None
        self._applied_seq = self.storage.append(command)
        return self._request_sync(requesters)

    def _command(self, op: int, body, draws) -> Command:
        """The next command, stamped, once the state is current and the
        storage takes writes (else Unavailable: nothing applied)."""
        if self.storage is not None:
            generation = self.generation
            self._storage_ready()
            if self.generation != generation and getattr(MAP_OPS_BY_CODE.get(op), "draw", None):
                # Its draws were made from the state before the rebuild (a
                # payment code for a user that may not exist any more).
                raise Unavailable("storage failed and the state was rebuilt from the "
                                  "journal; retry")
        return Command(op, self._now(), tuple(draws), body)

    def _request_sync(self, requesters: int = 1):
        """A future done once everything appended so far is durable.

        Group commit: one fsync runs at a time, and every request made while
        it runs shares the single next one, which covers them all. (A sync job
        per command would queue thousands a second behind one another, each
        waiting for the GIL, and every reply behind them.) `requesters`: how
        many reply destinations wait for this command (the window's rule)."""
        if self._lone_out and requesters == 1 and self.lone_sync is not None:
            # The last lone sync may have returned with the event loop not yet
            # at its eventfd (the caller's next request came first): take it now.
            self.lone_sync.reap()
        with self._sync_lock:
            self._sync_requesters += requesters
            if self._sync_waiting is None:
                if (requesters == 1 and not self._sync_busy and not self._lone_out
                        and self.lone_sync is not None):
                    lone = self.lone_sync.begin()
                    if lone is not None:        # a lone request on an idle journal
                        self._lone_out = True
                        self._sync_requesters = 0
                        self._sync_started_at = time.perf_counter()
                        return lone
                # (While a lone sync is out, the sync thread's `sync` waits for
                # it first, without the event loop: journal.py `_settle_offload`.)
                self._sync_waiting = SyncFuture()
                if not self._sync_busy:
                    self._sync_busy = True
                    self._sync_pool.submit(self._sync_worker)
            return self._sync_waiting

    def lone_synced(self, future: SyncFuture, write, error: int) -> None:
        """A lone sync (`lone_sync.begin`) has returned, with `error` (0 or
        an errno): its entries are durable, or the journal failed; `future`
        completes accordingly. (On the event loop, or on the sync thread
        when an fsync there waited for it.)"""
        try:
            durable_seq = self.storage.lone_written(write, error)
        except Unavailable as failure:      # those writes are not acknowledged
            future.set_exception(failure)
        else:
            future.set_result(durable_seq)
        with self._sync_lock:
            self._lone_out = False

    def fsync_waiting(self) -> bool:
        """Whether a command journaled since the running fsync began waits
        for the next one (a hint: read without the lock)."""
        return self._sync_waiting is not None

    def _commit_wait(self) -> bool:
        """Before an fsync: the group-commit window, if the rule says it
        pays. True if it waited."""
        if not self._commit_interval_s:
            return False
        with self._sync_lock:
            requesters = self._sync_requesters
        now = time.perf_counter()
        wait_s = commit_wait_s(self._commit_interval_s, self._commit_siblings, requesters,
                               now - self._sync_started_at)
        if wait_s > 0:
            self.commit_waits += 1
            time.sleep(wait_s)
            now = time.perf_counter()
        self._sync_started_at = now
        return wait_s > 0

    def _sync_worker(self) -> None:
        """The sync thread: fsync for the waiting requests until none wait."""
        while True:
            waited = self._commit_wait()
            with self._sync_lock:
                future, self._sync_waiting = self._sync_waiting, None
                grouped, self._sync_requesters = self._sync_requesters > 1, 0
                if future is None:
                    self._sync_busy = False
                    return
            future.waited = waited
            future.sync_started_at = time.perf_counter()
            try:
                durable_seq = self.storage.sync()
            except BaseException as error:  # Unavailable: those writes are not acknowledged
                future.set_exception(error)
                continue
            future.synced_at = time.perf_counter()
            if grouped:
                self.group_synced_at = future.synced_at
            if self.on_durable is not None:
                try:
                    self.on_durable(future)
                except Exception:           # the replies then go out from the event loop
                    log.exception("the on_durable hook failed")
            future.set_result(durable_seq)

    def _write(self, op: int, body, draws=()):
        """Journal, apply and make durable one command; then return its result."""
        command = self._command(op, body, draws)
        durable = self._begin(command)
        try:
            result = self._execute(command)
            if self.on_applied is not None:
                self.on_applied(self.state, self._applied_seq)
        finally:
            if durable is not None:
                durable.result()        # raises Unavailable: not acknowledged
        if self.storage is not None:
            self.storage.after_write(self)
        return result

    def write_command(self, op: int, body, draws=(), requesters: int = 1):
        """For the server's writer: journal and apply a command now; return
        (result, durability future or None). Reply only once the future is done.
        `requesters`: the reply destinations waiting for it (group commit's rule)."""
        command = self._command(op, body, draws)
        durable = self._begin(command, requesters)
        result = self._execute(command)
        if self.on_applied is not None:
            self.on_applied(self.state, self._applied_seq)
        if self.storage is not None:
            self.storage.after_write(self)
        return result, durable

    def read_command(self, spec, request):
        """A read-only map op: (reply, durability future or None). A read never
        changes state, except that holds which have expired are voided first,
        as a journaled EXPIRE command, as before any other command."""
        self._ensure_current()
        durable = self.expire_due()
        return spec.apply(self.state, request, self._now(), ()), durable

    def expire_due(self):
        """Void the holds that have expired, as a journaled EXPIRE command,
        as before any other command: its durability future (None when none
        was due, or in memory). Reads call it before they look at the state.
        A replicated follower writes nothing: it reads the state as of the
        leader's stream, whose own commands void the holds."""
        if self.follows():
            return None
        if self.state.ledger.expiry_due(self._now()):
            return self.write_command(OP_EXPIRE, b"")[1]
        return None

    def follows(self) -> bool:
        """A replicated node that does not lead now (docs/replication.md)."""
        return (self.storage is not None and getattr(self.storage.journal, "replicated", False)
                and self.storage.journal.failed)

    def apply_replicated(self, commands) -> None:
        """A replicated follower: apply the leader's commands, (seq, Command)
        in order, which its log has already taken as durable (they are in the
        stream). The state must be current (`_ensure_current` first)."""
        assert not self._stale
        for seq, command in commands:
            if seq != self._applied_seq + 1:
                raise JournalError(f"replicated command {seq} does not follow the applied "
                                   f"command {self._applied_seq}")
            self._execute(command)
            self._applied_seq = seq
            if self.on_applied is not None:
                self.on_applied(self.state, seq)
        self.storage.after_write(self)

    def sync_pending(self):
        """A future that completes when everything applied so far is durable."""
        if self.storage is None:
            return None
        return self._request_sync()

    def _replay(self) -> None:
        started = time.perf_counter()
        self._reserve_for_replay()
        count = 0
        for command in self.storage.commands_after(self.storage.snapshot_seq, replaying=True):
            self._execute(command)
            count += 1
        if count:
            log.info("replayed %d journal entries in %.3f s", count,
                     time.perf_counter() - started)

    def _reserve_for_replay(self) -> None:
        """Make room once for what the journal tail adds: growing the tables
        step by step while replaying copies them again and again. (Loading
        the snapshot already made this room when it was the newest one.)"""
        tail = self._tail_records(self.storage.snapshot_seq)
        self.state.ledger.reserve_payments(tail["payments"])     # and their visits
        self.state.ledger.reserve("coupons", tail["coupons"])

    def _tail_records(self, seq: int) -> dict[str, int]:
        """Rows the journal after entry `seq` may add, by table: each PAY
        record a payment and a visit, each ISSUE record a coupon. Reading the
        tail costs little next to applying it (it stays in the page cache)."""
        if seq in self._tail_counted:
            return self._tail_counted[seq]
        records = {OP_PAY: 0, OP_ISSUE: 0}
        for command in self.storage.commands_after(seq):
            if command.op in records:
                records[command.op] += len(command.body) // RECORD_OPS[command.op][0].itemsize
        tail = {"payments": records[OP_PAY], "visits": records[OP_PAY],
                "coupons": records[OP_ISSUE]}
        self._tail_counted[seq] = tail
        return tail

    # -- batches ----------------------------------------------------------

    def pay(self, records: np.ndarray | bytes) -> np.ndarray:
        """Apply PayRecords (ndarray of PAY_RECORD, or their bytes)."""
        records = as_batch(records, PAY_RECORD)
        return self._write(OP_PAY, records.view(np.uint8).data)

    def issue(self, records: np.ndarray | bytes) -> np.ndarray:
        """Apply IssueRecords (ndarray of ISSUE_RECORD, or their bytes)."""
        records = as_batch(records, ISSUE_RECORD)
        return self._write(OP_ISSUE, records.view(np.uint8).data)

    def capture(self, records: np.ndarray | bytes) -> np.ndarray:
        """CAPTURE as a batch of CaptureRecords (extension; same rules as the map)."""
        records = as_batch(records, CAPTURE_RECORD)
        return self._write(OP_CAPTURE_RECORDS, records.view(np.uint8).data)

    def refund(self, records: np.ndarray | bytes) -> np.ndarray:
        """REFUND as a batch of RefundRecords (extension; same rules as the map)."""
        records = as_batch(records, REFUND_RECORD)
        return self._write(OP_REFUND_RECORDS, records.view(np.uint8).data)

    def kernel_pay(self, records: np.ndarray, now_ms: int, out: np.ndarray) -> None:
        """The raw kernel apply of one checked batch at a given engine time:
        no journal, no stamp (benchmarks and the reference comparison)."""
        self.state.ledger.pay(records.view(np.uint8), now_ms, out.view(np.uint8))

    # -- map operations ---------------------------------------------------

    def call(self, op: str, request: dict[str, Any]) -> dict[str, Any]:
        """A map operation of docs/reference/protocol.md by name, with the same maps."""
        spec = MAP_OPS.get(op)
        if spec is None:
            planned = " (not implemented yet)" if op in PLANNED_OPS.values() else ""
            raise UnknownOp(f"unknown operation {op!r}{planned}")
        if not spec.writes:
            reply, durable = self.read_command(spec, request)
            if durable is not None:
                durable.result()
            return reply.build() if isinstance(reply, BuiltLater) else reply
        spec.check_body(request)
        try:
            body = msgspec.msgpack.encode(request)
        except OverflowError:
            # An int MessagePack cannot carry (>= 2**64 or < -2**63) can only be
            # out of range for its field: journal it as a marker that fails the
            # same field check, so the item gets invalid_argument as it would
            # in memory, and replay sees exactly what was applied.
            body = msgspec.msgpack.encode(out_of_range_ints_marked(request))
        except (TypeError, msgspec.EncodeError) as e:
            raise BadBody(f"the request is not a MessagePack map: {e}") from None
        except RecursionError:              # replay could not decode it either
            raise BadBody("the request nests too deep to encode") from None
        return self._write(spec.code, body, self.draws_for(spec, request))

    def draws_for(self, spec, request) -> tuple:
        """The random draws a map write needs, made outside the apply (from
        the current state: they depend on it)."""
        self._ensure_current()
        if not spec.draw:
            return ()
        return tuple(spec.draw(self.state, request, getattr(self, spec.draw_source)))

    # -- state ------------------------------------------------------------

    def snapshot(self, wait: bool = True) -> dict[str, Any]:
        """Write a snapshot of the state now (durable engines only)."""
        if self.storage is None:
            raise ValueError("an in-memory engine has nothing to snapshot to")
        self._ensure_current()
        return self.storage.snapshot(self.state, wait=wait)

    def close(self) -> None:
        if self.storage is not None:
            self.storage.close()
            self._sync_pool.shutdown()
            self.storage = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def canonical(self) -> dict[str, Any]:
        """The whole state as canonical tables (engine/core/canonical.py)."""
        self._ensure_current()
        return export.canonical(self.state)

    def digest(self) -> str:
        """SHA-256 of the whole state: equal for engines fed the same input."""
        return canonical.digest(self.canonical())

    def audit(self) -> dict[str, Any]:
        return self.call("AUDIT", {})

    def counts(self) -> dict[str, int]:
        self._ensure_current()
        ledger = self.state.ledger
        return {"users": ledger.n_users, "merchants": ledger.n_merchants,
                "stocks": ledger.n_stocks, "coupons": ledger.n_coupons,
                "payments": ledger.n_payments, "codes": ledger.n_codes}

    def memory_bytes(self) -> dict[str, int]:
        """Bytes allocated per table, rows and index together."""
        ledger = self.state.ledger
        return {
            "users": ledger.users.nbytes + ledger.users_ix.nbytes,
            "merchants": ledger.merchants.nbytes + ledger.merchants_ix.nbytes,
            "stocks": (ledger.stocks.nbytes + ledger.stocks_ix.nbytes
                       + ledger.lists.nbytes + ledger.slots.nbytes),
            "coupons": ledger.coupons.nbytes + ledger.coupons_ix.nbytes,
            "payments": (ledger.pay_req.nbytes + ledger.pay_res.nbytes
                         + ledger.pay_meta.nbytes + ledger.payments_ix.nbytes),
            "codes": ledger.codes.nbytes + ledger.codes_ix.nbytes,
        }


def out_of_range_ints_marked(value):
    if isinstance(value, int) and not isinstance(value, bool):
        return value if -(2**63) <= value < 2**64 else "<integer out of range>"
    if isinstance(value, dict):
        return {k: out_of_range_ints_marked(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [out_of_range_ints_marked(v) for v in value]
    return value


def as_batch(records, dtype: np.dtype) -> np.ndarray:
    """A contiguous batch of 1..BATCH_RECORDS_MAX records of `dtype`."""
    if isinstance(records, (bytes, bytearray, memoryview)):
        if len(records) % dtype.itemsize:
            raise BadBody(f"body of {len(records)} bytes is not a whole number "
                          f"of {dtype.itemsize}-byte records")
        records = np.frombuffer(records, dtype)
    if not isinstance(records, np.ndarray) or records.dtype != dtype or records.ndim != 1:
        raise BadBody(f"a batch is a 1-d array of dtype {dtype}")
    if not 1 <= len(records) <= BATCH_RECORDS_MAX:
        raise BadBody(f"a batch holds 1 to {BATCH_RECORDS_MAX} records, got {len(records)}")
    return np.ascontiguousarray(records)
