"""`scanpay journal verify DIR` and `scanpay journal inspect DIR`: what a data
directory holds, and whether an engine started on it would recover exactly.

Both read the directory and change nothing (no truncation of a torn tail, no
lock taken, no snapshot written). They check every checksum
(engine.storage.journal.verify), load and check every snapshot, replay the newest
valid snapshot plus the journal after it (what `Engine(path)` does at start)
and, when the journal still starts at entry 1, replay everything from entry 1
too: both must give the same state, and each snapshot must equal the full
replay at its seq. Then AUDIT runs on the recovered state.

`verify` exits 0 only if all is well (a torn tail, which every crash may
leave and the engine moves to quarantine/ at start, is a warning), 1 if anything is wrong
(including entries it could not read),
2 if DIR is not a data directory. `inspect` prints the same facts and exits 0
whatever it finds; `--entries N` lists the first and last N entries.
"""
from __future__ import annotations

import collections
import datetime
import fcntl
import os
import sys
import time
from dataclasses import dataclass, field

import msgspec

from engine.storage import journal as journal_module
from engine.storage import snapshot as snapshot_module
from engine.core.command import decode
from engine.protocol.ops import OP_EXPIRE, OP_NAMES, OP_PAY
from engine.protocol.records import RECORD_DTYPES_BY_OP
from engine.core.state import HOLD_MS_DEFAULT, TZ_OFFSET_MS_DEFAULT

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2
NAMES = OP_NAMES                  # every op, the internal EXPIRE included

RECORD_OPS = RECORD_DTYPES_BY_OP


def add_parsers(subparsers) -> None:
    """Register `journal verify` and `journal inspect` on a subparsers object."""
    p = subparsers.add_parser(
        "journal", help="verify or inspect a data directory (journal and snapshots)",
        description="Read-only checks of a data directory: checksums, snapshots, "
                    "replay, AUDIT. Never modifies anything.")
    sub = p.add_subparsers(dest="journal_command", required=True)
    for name, text in (
            ("verify", "check every checksum, replay and AUDIT; exit 0 only if all is well"),
            ("inspect", "print what the directory holds (never fails on what it finds)")):
        q = sub.add_parser(name, help=text, description=text)
        q.add_argument("dir", help="the data directory (the server's --data)")
        q.add_argument("--hold-ms", dest="hold_ms", type=int, default=None,
                       help="hold duration the engine runs with (default: the snapshot's, "
                            f"else {HOLD_MS_DEFAULT})")
        q.add_argument("--tz-offset-ms", dest="tz_offset_ms", type=int, default=None,
                       help="engine time zone offset (default: the snapshot's, "
                            f"else {TZ_OFFSET_MS_DEFAULT})")
        q.add_argument("--no-replay", dest="no_replay", action="store_true",
                       help="checksums and snapshots only (fast): no replay, no AUDIT")
        if name == "inspect":
            q.add_argument("--entries", type=int, default=0, metavar="N",
                           help="list the first and the last N entries")


def run(args) -> int:
    """Run `journal verify|inspect` for parsed args; returns the exit code."""
    strict = args.journal_command == "verify"
    out = sys.stdout
    if not os.path.isdir(args.dir):
        print(f"scanpay journal {args.journal_command}: {args.dir} is not a directory "
              f"(give the server's data directory, --data)", file=sys.stderr)
        return EXIT_USAGE
    report = examine(args.dir, hold_ms=args.hold_ms, tz_offset_ms=args.tz_offset_ms,
                     replay=not args.no_replay, entries=getattr(args, "entries", 0))
    if report.empty:
        print(f"scanpay journal {args.journal_command}: {args.dir} holds no journal segment "
              f"and no snapshot: not a data directory (or an engine never wrote to it)",
              file=sys.stderr)
        return EXIT_USAGE
    report.print(out, strict)
    if not strict:
        return EXIT_OK
    return EXIT_OK if not report.errors else EXIT_PROBLEMS


# ------------------------------------------------------------------ examine

@dataclass
class Report:
    dir: str
    empty: bool = False
    in_use: bool = False
    segments: list = field(default_factory=list)       # journal.SegmentReport
    problems: list = field(default_factory=list)       # journal.Problem
    snapshots: list = field(default_factory=list)      # (info, ok, detail)
    entries: int = 0
    first_seq: int = 0
    last_seq: int = 0
    by_op: collections.Counter = field(default_factory=collections.Counter)
    now_min: int | None = None
    now_max: int | None = None
    listing_first: list = field(default_factory=list)
    listing_last: collections.deque = field(default_factory=collections.deque)
    settings: str = ""
    lines: list = field(default_factory=list)          # replay and state facts
    digest: str | None = None
    audit: dict | None = None
    counts: dict | None = None
    errors: list = field(default_factory=list)
    warnings: list = field(default_factory=list)

    def error(self, text: str) -> None:
        self.errors.append(text)

    def warn(self, text: str) -> None:
        self.warnings.append(text)

    def print(self, out, strict: bool) -> None:
        w = lambda text="": print(text, file=out)  # noqa: E731
        w(f"data directory: {os.path.abspath(self.dir)}")
        if self.in_use:
            w("  (an engine has it open: the newest entries may be written while this reads)")
        total = sum(s.bytes for s in self.segments)
        if self.segments:
            w(f"journal: {len(self.segments)} segment(s), entries {self.first_seq}.."
              f"{self.last_seq} ({self.entries} valid entries, {total:,} bytes)")
        else:
            w("journal: no segment")
        for s in self.segments:
            tail = "" if s.valid_bytes == s.bytes else (
                f" ({s.zero_tail_bytes:,} bytes zero-filled ahead)" if s.whole
                else f" ({s.bytes - s.valid_bytes} bytes not valid)")
            w(f"  {os.path.basename(s.file)}  seq {s.first_seq}..{s.last_seq}  "
              f"{s.entries} entries  {s.bytes:,} bytes{tail}")
        if self.by_op:
            w("entries by op: " + ", ".join(f"{name} {n}" for name, n in
                                           sorted(self.by_op.items(), key=lambda x: -x[1])))
        if self.now_min is not None:
            w(f"time range: {iso(self.now_min)} .. {iso(self.now_max)} (engine time, UTC)")
        w(f"snapshots: {len(self.snapshots)}")
        for info, ok, detail in self.snapshots:
            w(f"  {os.path.basename(info.path)}  seq {info.seq}  {info.bytes:,} bytes  "
              + ("ok" if ok else f"INVALID: {detail}"))
        if self.settings:
            w(f"settings: {self.settings}")
        for line in self.lines:
            w(line)
        if self.counts:
            w("state: " + ", ".join(f"{k} {v:,}" for k, v in self.counts.items()))
        if self.digest:
            w(f"state digest: {self.digest}")
        if self.audit is not None:
            failed = {k: v["detail"] for k, v in self.audit["checks"].items() if not v["ok"]}
            if self.audit["ok"]:
                w(f"AUDIT: ok ({len(self.audit['checks'])} checks)")
            else:
                w(f"AUDIT: FAILED {len(failed)} of {len(self.audit['checks'])} checks")
                for name, detail in failed.items():
                    w(f"  {name}: {detail}")
        if self.listing_first:
            w(f"first {len(self.listing_first)} entries:")
            for line in self.listing_first:
                w(f"  {line}")
            if self.listing_last:
                w(f"last {len(self.listing_last)} entries:")
                for line in self.listing_last:
                    w(f"  {line}")
        for text in self.warnings:
            w(f"WARNING: {text}")
        for text in self.errors:
            w(f"ERROR: {text}")
        if self.errors:
            w(f"result: {'FAILED' if strict else 'problems found'} "
              f"({len(self.errors)} error(s), {len(self.warnings)} warning(s))")
        else:
            w(f"result: OK" + (f" ({len(self.warnings)} warning(s))" if self.warnings else ""))


def iso(ms: int) -> str:
    moment = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def probe_lock(dir: str) -> bool:
    """Whether an engine holds the directory (without taking the lock)."""
    path = os.path.join(dir, journal_module.LOCK_NAME)
    if not os.path.exists(path):
        return False
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def entries_of(segments: list, from_seq: int = 1):
    """(seq, payload) of the valid, contiguous entries of the segments, read
    straight from the files. Stops at the first gap or damaged segment (a
    zero-filled unused tail is not damage); callers check the count."""
    expected = None
    for s in segments:
        if expected is not None and s.first_seq != expected:
            return
        if s.entries:
            yield from journal_module._read_segment(
                s.file, s.first_seq, max(from_seq, s.first_seq), s.last_seq,
                journal_module.ENTRY_BYTES_MAX_DEFAULT)
        expected = s.last_seq + 1
        if not s.whole:
            return                     # damaged here: what follows is not trusted


def summary(seq: int, command) -> str:
    name = NAMES.get(command.op, f"op {command.op}")
    text = f"seq {seq}  {name}  {iso(command.now)}"
    if command.draws:
        text += f"  draws {len(command.draws)}"
    dtype = RECORD_OPS.get(command.op)
    if dtype is not None:
        import numpy as np
        records = np.frombuffer(command.body, dtype)
        text += f"  {len(records)} records"
        if command.op == OP_PAY and len(records):
            text += (f", amount {int(records['amount'].sum()):,}, ids "
                     f"{int(records['id'].min())}..{int(records['id'].max())}")
        return text
    if command.op == OP_EXPIRE:
        return text + "  (expiry of holds found by a read)"
    try:
        request = msgspec.msgpack.decode(command.body)
    except msgspec.DecodeError:
        return text + f"  {len(command.body)} bytes (not MessagePack)"
    if isinstance(request, dict):
        parts = [f"{k}: {len(v)} items" if isinstance(v, list) else f"{k}: {v!r}"
                 for k, v in request.items()]
        return text + "  " + (", ".join(parts) if parts else "{}")
    return text + f"  {type(request).__name__}"


def examine(dir: str, *, hold_ms=None, tz_offset_ms=None, replay=True, entries=0) -> Report:
    report = Report(dir)
    report.in_use = probe_lock(dir)
    verified = journal_module.verify(dir)
    report.segments, report.problems = verified.segments, verified.problems
    snapshots = snapshot_module.list_snapshots(dir)
    if not report.segments and not snapshots:
        report.empty = True
        return report
    if report.in_use:
        report.warn("an engine has this directory open (journal.lock is held): a torn "
                    "tail may just be an entry being written; stop the engine for a "
                    "conclusive check")
    for problem in report.problems:
        where = f"{problem.file} at byte offset {problem.offset}: {problem.detail}"
        if problem.kind == "torn_tail":
            report.warn(f"torn tail in {where}. A crash leaves this; those bytes come after "
                        f"every entry reported durable, and the engine moves them to "
                        f"{journal_module.QUARANTINE_DIR}/ when it starts (nothing to do)")
        else:
            report.error(f"journal corrupt: {where}. The engine refuses to start on it. "
                         f"Restore the data directory from a backup or a replica; do not "
                         f"delete segments by hand")
    if report.segments:
        report.first_seq = report.segments[0].first_seq
        report.last_seq = report.segments[-1].last_seq
        report.entries = verified.entries

    # Snapshots: each one loaded and checked in full.
    valid = []
    meta_newest = None
    for info in snapshots:
        try:
            seq, arrays, meta = snapshot_module.load_snapshot(info.path)
        except (snapshot_module.SnapshotCorrupt, OSError) as e:
            report.snapshots.append((info, False, getattr(e, "detail", str(e))))
            report.error(f"snapshot {info.path} is invalid ({getattr(e, 'detail', e)}). "
                         f"The engine skips it and starts from an older snapshot (or the "
                         f"journal); move the file out of the directory once the rest verifies")
            continue
        del arrays
        report.snapshots.append((info, True, ""))
        valid.append(info)
        meta_newest = meta
    if snapshots and not valid and report.first_seq > 1:
        report.error(f"no valid snapshot, and the journal starts at entry {report.first_seq} "
                     f"(older segments were removed after snapshots): the state cannot be "
                     f"rebuilt; restore the directory from a backup")

    _entry_stats(report, entries)
    unknown = [name for name in report.by_op
               if name.startswith("op ") or name in ("HELLO", "PING", "CLOCK")]
    if unknown:
        report.error(f"entries of unknown ops ({', '.join(unknown)}): written by a newer "
                     f"engine? Verify with the version that wrote them")
    if not replay:
        return report

    # Settings the replay needs (not journaled): the snapshot's, unless given.
    hold = hold_ms if hold_ms is not None else (meta_newest or {}).get("hold_ms", HOLD_MS_DEFAULT)
    tz = tz_offset_ms if tz_offset_ms is not None else (meta_newest or {}).get(
        "tz_offset_ms", TZ_OFFSET_MS_DEFAULT)
    report.settings = f"hold_ms {hold}, tz_offset_ms {tz}" + (
        " (from the newest snapshot)" if meta_newest and hold_ms is None and tz_offset_ms is None
        else "")
    if meta_newest and (meta_newest.get("hold_ms"), meta_newest.get("tz_offset_ms")) != (hold, tz):
        report.warn(f"the newest snapshot was written with hold_ms {meta_newest.get('hold_ms')}, "
                    f"tz_offset_ms {meta_newest.get('tz_offset_ms')}, not the settings given")
    _replays(report, valid, hold, tz)
    return report


def _entry_stats(report: Report, entries: int) -> None:
    """Entry statistics (and the listing) from every valid entry, read in
    order; entries that could not be read are an error that says so."""
    listing_last = collections.deque(maxlen=max(entries, 0))
    read = 0
    try:
        for seq, payload in entries_of(report.segments):
            read += 1
            command = decode(payload)
            report.by_op[NAMES.get(command.op, f"op {command.op}")] += 1
            if report.now_min is None or command.now < report.now_min:
                report.now_min = command.now
            if report.now_max is None or command.now > report.now_max:
                report.now_max = command.now
            if entries > 0:
                if len(report.listing_first) < entries:
                    report.listing_first.append(summary(seq, command))
                else:
                    listing_last.append(summary(seq, command))
    except (journal_module.JournalError, ValueError, msgspec.DecodeError) as e:
        report.error(f"reading the journal failed: {e}")
    if read < report.entries:
        report.error(f"only {read} of the {report.entries} valid entries could be read in "
                     f"order (the rest follow a gap or damage reported above): entries after "
                     f"seq {report.first_seq + read - 1} were not checked or replayed")
    report.listing_last = listing_last


def _engine(hold: int, tz: int):
    from engine.core.engine import Engine
    return Engine(hold_ms=hold, tz_offset_ms=tz)


def _from_snapshot(info, hold: int, tz: int):
    from engine.storage.durability import state_from_snapshot
    _seq, arrays, meta = snapshot_module.load_snapshot(info.path)
    eng = _engine(hold, tz)
    eng.state = state_from_snapshot(arrays, meta)
    return eng


def _apply(report: Report, eng, segments, from_seq: int, stop_seqs=(), at_seq=None):
    """Execute entries >= from_seq; calls at_seq(seq, eng) at each seq of
    stop_seqs. Returns (entries applied, last seq applied) or None on failure."""
    count, last, command = 0, from_seq - 1, None
    try:
        for seq, payload in entries_of(segments, from_seq):
            command = decode(payload)
            eng._execute(command)
            count, last = count + 1, seq
            if seq in stop_seqs:
                at_seq(seq, eng)
    except Exception as e:                  # a poison entry: say where
        name = NAMES.get(command.op, command.op) if command is not None else "?"
        report.error(f"replay failed at entry {last + 1} ({name}): {type(e).__name__}: {e}. "
                     f"The engine cannot start on this journal either; keep the directory "
                     f"and report it")
        return None
    return count, last


def _replays(report: Report, valid: list, hold: int, tz: int) -> None:
    if _replay_as_the_engine_starts(report, valid, hold, tz):
        _full_replay(report, valid, hold, tz)


def _replay_as_the_engine_starts(report: Report, valid: list, hold: int, tz: int) -> bool:
    """1. What Engine(path) does: the newest valid snapshot plus the entries
    after it. False if that could not be done (the report says why)."""
    segments = report.segments
    newest = valid[-1] if valid else None
    base = newest.seq if newest else 0
    if newest is not None and base > report.last_seq:
        report.error(f"snapshot {base} is ahead of the journal (last entry {report.last_seq}): "
                     f"journal segments are missing; restore them from a backup")
        return False
    if report.segments and report.first_seq > base + 1:
        report.error(f"replay needs entries from {base + 1} but the journal starts at "
                     f"{report.first_seq}: restore the missing segments (or valid snapshot) "
                     f"from a backup")
        return False
    started = time.perf_counter()
    eng = _from_snapshot(newest, hold, tz) if newest else _engine(hold, tz)
    applied = _apply(report, eng, segments, base + 1)
    if applied is None:
        return False
    count, last = applied
    seconds = time.perf_counter() - started
    what = f"snapshot {base} + {count} entries" if newest else f"{count} entries from entry 1"
    rate = f", {count / seconds:,.0f} entries/s" if count and seconds > 0 else ""
    report.lines.append(f"replay (as the engine starts): {what} ({base + 1}..{last}) "
                        f"in {seconds:.2f} s{rate}")
    report.digest = eng.digest()
    report.counts = eng.counts()
    report.audit = eng.audit()
    if not report.audit["ok"]:
        report.error("AUDIT fails on the recovered state: an invariant of the ledger does not "
                     "hold; keep the directory as it is and report it (see the checks above)")
    return True


def _full_replay(report: Report, valid: list, hold: int, tz: int) -> None:
    """2. Full replay from entry 1, when retention has not removed it; each
    snapshot must equal the replay at its seq."""
    segments = report.segments
    newest = valid[-1] if valid else None
    if not segments or report.first_seq != 1:
        if segments:
            report.lines.append(f"full replay from entry 1: not possible, the journal starts at "
                                f"entry {report.first_seq} (retention after snapshots: normal)")
        return
    if not newest:
        report.lines.append("full replay from entry 1: that was it (no snapshot)")
        return
    digests = {}
    for info in valid:
        digests[info.seq] = _from_snapshot(info, hold, tz).digest()
    mismatched = []

    def at_seq(seq, full):
        if full.digest() != digests[seq]:
            mismatched.append(seq)

    started = time.perf_counter()
    full = _engine(hold, tz)
    if 0 in digests:
        at_seq(0, full)
    applied = _apply(report, full, segments, 1, set(digests), at_seq)
    if applied is None:
        return
    count, _last = applied
    seconds = time.perf_counter() - started
    equal = full.digest() == report.digest
    report.lines.append(f"full replay from entry 1: {count} entries in {seconds:.2f} s: "
                        + ("same state digest" if equal else "DIFFERENT state digest")
                        + f"; snapshots at {', '.join(str(s) for s in digests)} "
                        + ("equal the replay at their seq" if not mismatched else
                           f"differ at {mismatched}"))
    if not equal:
        report.error("snapshot + tail and the full replay give different states: a snapshot "
                     "does not match the journal (were hold_ms/tz_offset_ms changed? pass "
                     "--hold-ms/--tz-offset-ms); keep the directory and report it")
    for seq in mismatched:
        report.error(f"snapshot {seq} differs from the replay of entries 1..{seq}: that "
                     f"snapshot is wrong (or the settings differ); move it out of the directory")
