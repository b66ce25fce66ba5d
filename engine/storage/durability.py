"""The engine's data directory: journal segments plus snapshots.

Journal before acknowledge: a command is appended, applied, and acknowledged
after the fsync that covers it. Snapshots are written by a forked child from
a copy-on-write image of the state, so the engine pauses only for the fork.
Recovery loads the newest valid snapshot and replays the journal after it.
A storage failure is a fail-stop: the journal drops every entry that was
not durable yet (their commands are answered `unavailable`), the engine
rebuilds its state from the snapshot and the durable journal (as at start),
and writes are refused with `unavailable` until the storage works again.
"""
import json
import logging
import os
import resource
import time


from engine.storage import snapshot as snapshots
from engine._kernel import Ledger
from engine.core import campaigns
from engine.core.command import decode
from engine.protocol.errors import EngineError, Unavailable
from engine.storage.journal import Journal, JournalError, JournalUnavailable
from engine.core.tombstones import ScopedTombstones
from engine.core.state import State
from engine.core.topups import Topups

log = logging.getLogger("scanpay.storage")

# A snapshot is due after this many journal entries or this many journal
# bytes, whichever comes first. Bytes bound the replay after a crash (1 GiB
# is ~13M payments, ~6 s of replay); entries bound it when batches are tiny.
# (Entries alone, 20,000, meant a snapshot every 12 s at 200k single-record
# payments/s, and 164M payments of replay at full batches.)
SNAPSHOT_EVERY_ENTRIES_DEFAULT = 1_000_000
SNAPSHOT_EVERY_MB_DEFAULT = 1024
RETAIN_SNAPSHOTS_DEFAULT = 2
SNAPSHOT_MB_PER_S_DEFAULT = 64          # pacing of snapshot writes (None: full speed)
SNAPSHOT_NICE = 10                      # the snapshot child yields the cores to the engine
RECOVER_INTERVAL_MS = 1_000             # how often failed storage (or a failed rebuild) is retried


def state_to_snapshot(state: State) -> tuple[dict, dict]:
    arrays, scalars = state.ledger.dump()
    arrays = dict(arrays)
    arrays["topups"] = state.topups.to_array()
    arrays["campaign_members"], campaign_meta = campaigns.to_snapshot(state.campaigns)
    meta = {"ledger": scalars, "now": state.now, "tz_offset_ms": state.tz_offset_ms,
            "hold_ms": state.hold_ms, "settlements": state.settlements,
            "programs": {str(k): v for k, v in state.programs.items()},
            "scoped_tombstones": state.scoped_tombstones.to_meta(),
            "segments": {str(k): d for k, d in state.segments.items()},
            "campaigns": campaign_meta,
            "stock_names": {str(k): v for k, v in state.stock_names.items()}}
    return arrays, meta


def state_from_snapshot(arrays: dict, meta: dict) -> State:
    ledger = Ledger.load(arrays, meta["ledger"])
    topups = Topups(arrays["topups"])
    return State(tz_offset_ms=meta["tz_offset_ms"], hold_ms=meta["hold_ms"], ledger=ledger,
                 now=meta["now"], topups=topups, settlements=meta["settlements"],
                 programs={int(k): v for k, v in meta["programs"].items()},
                 # (absent from snapshots written before scoped reversals)
                 scoped_tombstones=ScopedTombstones.from_meta(meta.get("scoped_tombstones", {})),
                 # (absent from snapshots written before precision marketing)
                 segments={int(k): d for k, d in meta.get("segments", {}).items()},
                 campaigns=campaigns.from_snapshot(arrays.get("campaign_members"),
                                                   meta.get("campaigns", {})),
                 stock_names={int(k): v for k, v in meta.get("stock_names", {}).items()})


class Storage:
    def __init__(self, path: str, *, snapshot_every_entries: int = SNAPSHOT_EVERY_ENTRIES_DEFAULT,
                 snapshot_every_mb: int = SNAPSHOT_EVERY_MB_DEFAULT,
                 retain_snapshots: int = RETAIN_SNAPSHOTS_DEFAULT, fs=None,
                 segment_bytes_max: int | None = None,
                 snapshot_mb_per_s: int | None = SNAPSHOT_MB_PER_S_DEFAULT,
                 journal_prealloc: bool = False, journal=None):
        assert snapshot_every_entries >= 1 and snapshot_every_mb >= 1 and retain_snapshots >= 1
        assert snapshot_mb_per_s is None or snapshot_mb_per_s > 0
        self.path = str(path)
        self.snapshot_every_entries = snapshot_every_entries
        self.snapshot_every_bytes = snapshot_every_mb << 20
        self.bytes_since_snapshot = 0       # journaled since the last snapshot began
        self.snapshot_mb_per_s = snapshot_mb_per_s
        self.retain_snapshots = retain_snapshots
        options = {"fs": fs, "prealloc": journal_prealloc}
        if segment_bytes_max:
            options["segment_bytes_max"] = segment_bytes_max
        # `journal`: one opened elsewhere with the same interface, the
        # replicated stream (engine/replication/log.py) in place of segments.
        self.journal = journal if journal is not None else Journal.open(self.path, **options)
        self.snapshot_seq = 0
        self.snapshot_child = None          # (pid, seq, started) of a running snapshot
        self.last_snapshot = None           # info of the last finished snapshot
        self.recover_after = 0.0

    # -- settings ---------------------------------------------------------

    def check_settings(self, settings: dict) -> None:
        """The settings replay depends on (time zone, hold length, currency)
        are fixed when the data directory is made: replaying a journal under
        other settings would rebuild another state."""
        path = os.path.join(self.path, "settings.json")
        if not os.path.exists(path):
            with open(path + ".tmp", "w") as f:
                json.dump(settings, f, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.rename(path + ".tmp", path)
            return
        with open(path) as f:
            kept = json.load(f)
        if kept != settings:
            raise ValueError(
                f"{self.path} was made with settings {kept}, not {settings}: open it with "
                f"the same settings (or start a new data directory)")

    # -- recovery ---------------------------------------------------------

    def newest_snapshot_seq(self) -> int:
        """The seq of the newest snapshot file (0: none), before verifying it."""
        found = snapshots.list_snapshots(self.path)
        return found[-1].seq if found else 0

    def load_state(self, rows_for: snapshots.RowsFor | None = None) -> State | None:
        loaded = snapshots.load_latest(self.path, rows_for, Ledger.allocate)
        if loaded is None:
            return None
        seq, arrays, meta = loaded
        if seq > self.journal.last_seq:
            raise JournalError(
                f"snapshot {seq} is ahead of the journal (last entry {self.journal.last_seq}) "
                f"in {self.path}: journal segments are missing; restore them from backup")
        self.snapshot_seq = seq
        # Ledger.load's LayoutError (a ValueError: row layouts of another
        # version, counts that do not fit their rows), Topups' ValueError, or
        # a missing table: raised in every build, never an assert.
        try:
            state = state_from_snapshot(arrays, meta)
        except (ValueError, KeyError) as error:
            raise JournalError(
                f"snapshot {seq} in {self.path} holds tables this version cannot load "
                f"({error}); run the version that wrote it, or move the snapshot files "
                f"aside to rebuild the state by replaying the journal from entry 1 "
                f"(only if no journal segment was removed since)") from None
        log.info("loaded snapshot at entry %d", seq)
        return state

    def commands_after(self, seq: int, replaying: bool = False):
        """The journaled commands after `seq`. Replayed ones count towards
        the next snapshot as if just journaled."""
        for _seq, payload in self.journal.read(seq + 1):
            if replaying:
                self.bytes_since_snapshot += len(payload)
            yield decode(payload)

    def prepare_reload(self) -> None:
        """Before the engine rebuilds its state after a storage failure: the
        load starts from no snapshot, as at start (`snapshot_seq` may name one
        whose child failed or still writes). A child still writing is left
        to finish: its snapshot is of a durable entry (`snapshot` syncs before
        the fork), so it is valid whenever it is done, and the load takes the
        newest finished one meanwhile."""
        self.reap_snapshot(block=False)
        self.snapshot_seq = 0
        self.bytes_since_snapshot = 0
        reload = getattr(self.journal, "prepare_reload", None)
        if reload is not None:              # the replicated stream: read as it is now
            reload()

    # -- writes -----------------------------------------------------------

    def before_write(self) -> None:
        """Refuse writes while storage is failed; retry it now and then. (The
        engine has rebuilt its state to the journal's durable prefix before:
        the entries dropped by the failure are gone from both.)"""
        if not self.journal.failed:
            return
        if getattr(self.journal, "replicated", False):
            self.journal.recover()          # NotLeader unless this node leads
            return
        if time.monotonic() >= self.recover_after:
            self.recover_after = time.monotonic() + RECOVER_INTERVAL_MS / 1000
            try:
                self.journal.recover()      # it logs that writes are accepted again
                return
            except JournalUnavailable:
                pass
        raise Unavailable("storage failed; writes are refused until it works again "
                          "(see the server log); retry later")

    def append(self, command) -> int:
        payload = command.encode()
        try:
            seq = self.journal.append(payload)
        except JournalUnavailable as e:
            raise Unavailable(f"storage failed: {e}") from None
        self.bytes_since_snapshot += len(payload)
        return seq

    def sync(self) -> int:
        try:
            return self.journal.sync()
        except JournalUnavailable as e:
            raise Unavailable(f"storage failed, the change is not acknowledged: {e}") from None

    def lone_written(self, write, error: int) -> int:
        """Journal.lone_written, its failure as `sync`'s."""
        try:
            return self.journal.lone_written(write, error)
        except JournalUnavailable as e:
            raise Unavailable(f"storage failed, the change is not acknowledged: {e}") from None

    def after_write(self, engine) -> None:
        self.reap_snapshot(block=False)
        due = (self.journal.last_seq - self.snapshot_seq >= self.snapshot_every_entries
               or self.bytes_since_snapshot >= self.snapshot_every_bytes)
        if due and self.snapshot_child is None:
            self.snapshot(engine.state, wait=False)

    # -- snapshots --------------------------------------------------------

    def snapshot(self, state: State, wait: bool = True) -> dict:
        """Snapshot the state at the last journaled entry (which is applied
        and, after this sync, durable): a forked child writes it while the
        engine goes on; the engine pauses only for the fork."""
        self.reap_snapshot(block=True)
        self.sync()
        seq = self.journal.last_seq
        # A storage failure drops only entries that are not durable: the
        # state forked here never holds one.
        assert seq == self.journal.durable_seq, "snapshot of entries not durable"
        # Where the snapshot stands in a replicated stream, if it is one.
        position = getattr(self.journal, "snapshot_meta", None)
        extra = position(seq) if position is not None else {}
        started = time.perf_counter()
        pid = os.fork()
        if pid == 0:                        # child: write and leave, touching nothing else
            code = 1
            try:
                # Close (never LOCK_UN: that would unlock the engine too) this
                # child's copy of the journal's flock'ed fd, so that if the
                # engine dies while this child still writes, a restart is not
                # refused as "open in another process".
                if self.journal._lock_fd is not None:
                    os.close(self.journal._lock_fd)
                # Nor may it keep the server's sockets (a restarted server
                # must be able to bind): it needs no inherited fd but stderr.
                os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
                # The engine's threads come first: the child only uses what
                # they leave of the cores and, paced, of the disk.
                os.nice(SNAPSHOT_NICE)
                arrays, meta = state_to_snapshot(state)
                meta.update(extra)
                snapshots.write_snapshot(self.path, seq, arrays, meta,
                                         self.snapshot_mb_per_s << 20
                                         if self.snapshot_mb_per_s else None)
                code = 0
            finally:
                os._exit(code)
        pause_ms = (time.perf_counter() - started) * 1000
        self.snapshot_child = (pid, seq, started, pause_ms)
        self.snapshot_seq = seq
        self.bytes_since_snapshot = 0
        if wait:
            return self.reap_snapshot(block=True)
        return {"seq": seq, "pause_ms": pause_ms, "done": False}

    def reap_snapshot(self, block: bool) -> dict | None:
        if self.snapshot_child is None:
            return None
        pid, seq, started, pause_ms = self.snapshot_child
        done, status = os.waitpid(pid, 0 if block else os.WNOHANG)
        if done == 0:
            return None
        self.snapshot_child = None
        info = {"seq": seq, "pause_ms": pause_ms, "done": True,
                "write_ms": (time.perf_counter() - started) * 1000}
        if os.waitstatus_to_exitcode(status) != 0:
            log.error("snapshot at entry %d failed (child exit %s); the journal still "
                      "holds everything", seq, os.waitstatus_to_exitcode(status))
            info["ok"] = False
            return info
        info["ok"] = True
        self.last_snapshot = info
        self.apply_retention()
        log.info("snapshot at entry %d: pause %.1f ms, written in %.0f ms",
                 seq, pause_ms, info["write_ms"])
        return info

    def apply_retention(self) -> None:
        kept = snapshots.list_snapshots(self.path)[-self.retain_snapshots:]
        if not kept:
            return
        snapshots.remove_snapshots_before(self.path, kept[0].seq, keep=self.retain_snapshots)
        self.journal.remove_segments_before(kept[0].seq + 1)

    def close(self) -> None:
        self.reap_snapshot(block=True)
        try:
            self.journal.sync()
        except (JournalUnavailable, EngineError):     # (EngineError: a replicated log refused)
            log.error("journal close: the last entries could not be made durable")
        self.journal.close()
