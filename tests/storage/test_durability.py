"""Durability of Engine(path), proven by crashing it.

- SIGKILL at random moments of a child process (tests/support/crash_child.py) that
  drives a deterministic stream of every write op; after each restart, every
  acknowledged op must be in the journal at the seq it was acknowledged with,
  and replay to the same result; the recovered state must equal a reference
  engine fed the journal's commands (or the op stream itself), and AUDIT must
  pass. Also SIGKILL during frequent snapshots with retention, and during a
  long snapshot write (the restart must not wait for the orphaned writer).
- Torn writes and flipped bytes in the journal (hypothesis): a prefix of the
  acknowledged ops is recovered, or the engine refuses with JournalCorrupt
  naming the file and offset; never a wrong state.
- Snapshot plus tail replay equals full replay; a damaged newest snapshot
  falls back to the older one.
- Storage failures injected through the journal's `fs`: Unavailable, nothing
  unacknowledged reported durable, writes continue once storage works again.

Every loop is bounded by a count and by time (the whole file: well under 3
minutes on 2 cores).
"""
from __future__ import annotations

import errno
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from support import ROOT as ROOT_DIR, crash_child as cc
import engine.storage.durability as durability
from support.clock import Clock
from support.faulty_fs import FaultyFs
from engine import Engine
from engine.core import canonical
from engine.core.command import decode
from engine.protocol.ops import OP_EXPIRE, OP_ISSUE, OP_NAMES, OP_PAY
from engine.protocol.errors import Unavailable
from engine.storage.journal import JournalCorrupt, JournalError, verify
from engine.protocol.records import PAY_RECORD, RESULT_DUPLICATE
from engine.storage.snapshot import list_snapshots, load_snapshot
from engine.protocol.status import Status

CHILD = Path(cc.__file__)
ROOT = Path(ROOT_DIR)
log = logging.getLogger("test_durability")


# ------------------------------------------------------------------ helpers

class Run:
    """One child process: its output lines, parsed."""

    def __init__(self, lines: list[str], returncode: int, killed_at: float | None,
                 stderr: str):
        self.lines = lines
        self.returncode = returncode
        self.killed_at = killed_at
        self.stderr = stderr
        self.ready = None
        self.acks: dict[int, tuple[int, str]] = {}   # k -> (seq, result digest)
        self.reads: dict[int, int] = {}              # k -> journal seq after the read
        self.errs: dict[int, str] = {}
        self.snapshot_seq = None
        self.done = False
        for line in lines:
            word, *rest = line.split()
            if word == "ready":
                self.ready = (int(rest[0]), int(rest[1]))
            elif word == "ack":
                self.acks[int(rest[0])] = (int(rest[1]), rest[2])
            elif word == "read":
                self.reads[int(rest[0])] = int(rest[1])
            elif word == "err":
                self.errs[int(rest[0])] = rest[1]
            elif word == "snapshot":
                self.snapshot_seq = int(rest[0])
            elif word == "done":
                self.done = True

    @property
    def answered(self) -> list[int]:
        """Op indexes answered in this run (ack, read or err), in order."""
        return sorted([*self.acks, *self.reads, *self.errs])


def run_child(datadir, *args, kill_after: float | None = None, kill_on: str | None = None,
              after_ready: bool = False, timeout: float = 60.0) -> Run:
    """Start crash_child on datadir; SIGKILL it `kill_after` seconds after the
    start (after its `ready` line if after_ready), or as soon as a line
    starting with `kill_on` arrives (from the reader thread, so within
    microseconds). Returns the whole lines it wrote."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(CHILD), str(datadir), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    lines: list[str] = []
    killed = [None]
    started = time.monotonic()

    def kill():
        if killed[0] is None:
            killed[0] = time.monotonic() - started
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def reader():
        buffer = b""
        while True:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buffer += chunk
            *whole, buffer = buffer.split(b"\n")
            for raw in whole:
                line = raw.decode()
                lines.append(line)
                if kill_on is not None and line.startswith(kill_on):
                    kill()
        # A partial last line (no newline) was never acknowledged: dropped.

    stderr_chunks: list[bytes] = []
    threads = [threading.Thread(target=reader, daemon=True),
               threading.Thread(target=lambda: stderr_chunks.append(proc.stderr.read()),
                                daemon=True)]
    for t in threads:
        t.start()
    deadline = started + timeout
    ready_at = None
    while proc.poll() is None and time.monotonic() < deadline:
        if after_ready and ready_at is None and any(l.startswith("ready") for l in lines):
            ready_at = time.monotonic()
        origin = ready_at if after_ready else started
        if kill_after is not None and origin is not None and time.monotonic() - origin >= kill_after:
            kill()
        time.sleep(0.005)
    if proc.poll() is None:
        kill()
    proc.wait()
    # A snapshot writer the child forked inherits its stdout and may outlive
    # it: do not wait for EOF. What the dead child wrote is in the pipe already.
    for t in threads:
        t.join(0.2)
    return Run(list(lines), proc.returncode, killed[0],
               b"".join(stderr_chunks).decode(errors="replace"))


def journal_commands(eng: Engine):
    """(seq, Command) of every journal entry an open durable engine holds."""
    for seq, payload in eng.storage.journal.read(eng.storage.journal.first_seq):
        yield seq, decode(bytes(payload))


def replay_reference(eng: Engine) -> tuple[Engine, dict[int, str], dict[int, object]]:
    """A fresh in-memory engine fed the journal's commands through `_execute`
    (the journal must start at 1): (engine, seq -> result digest, seq -> command)."""
    assert eng.storage.journal.first_seq == 1
    ref = Engine(hold_ms=cc.HOLD_MS)
    digests, commands = {}, {}
    for seq, command in journal_commands(eng):
        result = ref._execute(command)
        commands[seq] = command
        if result is not None:
            digests[seq] = cc.result_digest(result)
    return ref, digests, commands


def assert_audit_ok(eng: Engine) -> None:
    report = eng.audit()
    failed = {k: v["detail"] for k, v in report["checks"].items() if not v["ok"]}
    assert report["ok"], f"AUDIT failed: {failed}"


def stream_engine(seed: int, last_k: int, resent=frozenset(), codes=False) -> Engine:
    """The independent reference: an in-memory engine fed ops 0..last_k of the
    stream at their engine times; ops in `resent` are sent twice (as a
    restarted child re-sends the op it had no acknowledgement for)."""
    clock = Clock(cc.op_time_ms(0))
    ref = Engine(clock=clock, hold_ms=cc.HOLD_MS)
    ref.stream_digests = {}
    last_code = [0]
    for k in range(last_k + 1):
        clock.now_ms = cc.op_time_ms(k)
        name, payload = cc.op_at(seed, k, codes=codes)
        digests = [cc.result_digest(cc.send(ref, name, payload, last_code))]
        if k in resent:
            digests.append(cc.result_digest(cc.send(ref, name, payload, last_code)))
        ref.stream_digests[k] = digests
    return ref


def send_stream(eng: Engine, seed: int, ks, codes=False) -> None:
    clock = eng.clock = Clock(cc.op_time_ms(0))
    last_code = [0]
    for k in ks:
        clock.now_ms = cc.op_time_ms(k)
        name, payload = cc.op_at(seed, k, codes=codes)
        cc.send(eng, name, payload, last_code)


@pytest.fixture
def fast_recover(monkeypatch):
    """Storage.before_write retries a failed journal at most every
    RECOVER_INTERVAL_MS: every write retries in tests."""
    monkeypatch.setattr(durability, "RECOVER_INTERVAL_MS", 0)


# ------------------------------------------------------- SIGKILL: journal only

CRASH_ITERATIONS = 18
CRASH_SECONDS = 40.0


def test_sigkill_at_random_moments_loses_no_acknowledged_op(tmp_path):
    """Kill the child 18 times at random moments (in startup and recovery too);
    every acknowledged op survives, at the seq it was acknowledged with, with
    the same result; at most one unacknowledged entry per kill; idempotent
    retries of acknowledged payments replay byte for byte with the duplicate
    flag; the recovered state equals a reference fed the journal."""
    datadir = tmp_path / "data"
    seed, rng = 11, random.Random(20240611)
    acks: dict[int, tuple[int, str]] = {}
    reads: dict[int, int] = {}
    next_k, kills, runs = 0, 0, 0
    started = time.monotonic()
    while runs < CRASH_ITERATIONS and time.monotonic() - started < CRASH_SECONDS:
        early = rng.random() < 0.25          # in startup or recovery
        run = run_child(datadir, "--seed", seed, "--start", next_k, after_ready=not early,
                        kill_after=rng.uniform(0.05, 1.2) if early else rng.uniform(0.0, 0.8))
        runs += 1
        assert run.killed_at is not None and not run.done, run.stderr
        kills += 1
        if run.ready is None:
            assert not run.answered
            continue                     # killed while starting (or recovering)
        # The journal holds every acknowledged entry (and maybe one more).
        assert run.ready[0] >= max([seq for seq, _ in acks.values()], default=0)
        answered = run.answered
        # Answers come in stream order, from where the test said to start.
        assert answered == list(range(next_k, next_k + len(answered))), answered[:5]
        assert not run.errs, run.errs            # no refusal is expected here
        acks.update(run.acks)
        reads.update(run.reads)
        if answered:
            next_k = answered[-1] + 1
    assert runs >= 5 and len(acks) > 50, (runs, len(acks))

    eng = Engine(str(datadir), hold_ms=cc.HOLD_MS)
    assert_audit_ok(eng)
    ref, digests, commands = replay_reference(eng)
    # Every acknowledged op is durable at its seq and replays to the same result.
    for k, (seq, digest) in sorted(acks.items()):
        assert digests.get(seq) == digest, f"op {k}: journal entry {seq} replays differently"
    assert eng.digest() == ref.digest()
    # Nothing but the acknowledged ops (and EXPIREs of reads), plus at most one
    # unacknowledged entry per kill: an op applied and synced, killed before its ack.
    explained = {seq for seq, _ in acks.values()} | set(reads.values())
    extra = [seq for seq in commands if seq not in explained
             and commands[seq].op != OP_EXPIRE]
    assert len(extra) <= kills, (len(extra), kills)
    assert len({seq for seq, _ in acks.values()}) == len(acks)   # one entry per ack

    before = ref.canonical()
    resent = resend_acknowledged(eng, acks, commands)
    assert resent > 100
    assert_audit_ok(eng)
    live = eng.digest()
    eng.close()
    with Engine(str(datadir), hold_ms=cc.HOLD_MS) as again:
        assert again.digest() == live
    log.info("crash test: %d runs, %d kills, %d acks, %d unacknowledged entries survived, "
             "%d payments re-sent as duplicates; state %s", runs, kills, len(acks),
             len(extra), resent, {k: len(v) for k, v in before.items()})


def resend_acknowledged(eng, acks: dict, commands: dict) -> int:
    """Idempotent retries after restarts: every acknowledged PAY and ISSUE,
    re-sent now, replays its successful records byte for byte, plus the flag.
    Returns the records re-sent."""
    resent = 0
    for k, (seq, _digest) in sorted(acks.items()):
        command = commands[seq]
        if command.op not in (OP_PAY, OP_ISSUE):
            continue
        original = ref_result(command, seq, commands)
        again = eng.pay(bytes(command.body)) if command.op == OP_PAY else eng.issue(
            bytes(command.body))
        ok = original["status"] == 0
        expected = original[ok].copy()
        expected["flags"] |= RESULT_DUPLICATE
        assert again[ok].tobytes() == expected.tobytes(), f"op {k} (seq {seq})"
        resent += int(ok.sum())
    return resent


_RESULT_CACHE: dict = {}


def ref_result(command, seq: int, commands: dict):
    """The result of journal entry `seq` on a reference fed entries 1..seq
    (cached: one replay per test)."""
    key = id(commands)
    if key not in _RESULT_CACHE:
        _RESULT_CACHE.clear()
        ref, results = Engine(hold_ms=cc.HOLD_MS), {}
        for s in sorted(commands):
            result = ref._execute(commands[s])
            if commands[s].op in (OP_PAY, OP_ISSUE):
                results[s] = result
        _RESULT_CACHE[key] = results
    return _RESULT_CACHE[key][seq]


# -------------------------------------------- SIGKILL: snapshots and retention

SNAPSHOT_CRASH_ITERATIONS = 12
SNAPSHOT_CRASH_SECONDS = 30.0


def test_sigkill_during_frequent_snapshots_with_retention(tmp_path):
    """A snapshot every 4 entries, 2 kept, small segments (retention deletes
    them): kills land during snapshot writes. The recovered state equals an
    independent reference fed the op stream itself, and every acknowledged
    result equals the reference's."""
    datadir = tmp_path / "data"
    seed, rng = 5, random.Random(777)
    options = ["--reproducible", "--snapshot-every", 4, "--retain", 2,
               "--segment-bytes", 200_000, "--slow-snapshot", 0.05]
    acks: dict[int, tuple[int, str]] = {}
    first_of_run: set[int] = set()
    next_k, runs, mid_snapshot = 0, 0, 0
    started = time.monotonic()
    while runs < SNAPSHOT_CRASH_ITERATIONS and time.monotonic() - started < SNAPSHOT_CRASH_SECONDS:
        early = rng.random() < 0.2
        run = run_child(datadir, "--seed", seed, "--start", next_k, *options,
                        after_ready=not early,
                        kill_after=rng.uniform(0.05, 1.2) if early else rng.uniform(0.0, 0.7))
        runs += 1
        assert run.ready is not None or not run.answered, run.stderr
        assert "Traceback" not in run.stderr, run.stderr
        if datadir.is_dir() and any(n.endswith(".tmp") for n in os.listdir(datadir)):
            mid_snapshot += 1            # a snapshot write was in progress
        answered = run.answered
        assert answered == list(range(next_k, next_k + len(answered)))
        assert not run.errs, run.errs
        acks.update(run.acks)
        if answered:
            first_of_run.add(next_k)
            next_k = answered[-1] + 1
    assert len(acks) > 30, len(acks)

    last = next_k - 1
    # A clock that never passes the journal's time: a read (AUDIT) at a later
    # time would first journal the expiry of holds (engine.read_command).
    eng = Engine(str(datadir), hold_ms=cc.HOLD_MS, clock=Clock(0))
    recovered = eng.digest()
    assert_audit_ok(eng)
    assert eng.digest() == recovered
    assert eng.storage.snapshot_seq > 0
    assert eng.storage.journal.first_seq > 1, "retention removed no segment"
    ref = stream_engine(seed, last, resent=first_of_run)
    for k, (_seq, digest) in acks.items():
        assert digest in ref.stream_digests[k], f"op {k}: result differs from the reference"
    # The op after the last answered one may have been journaled, unacknowledged.
    candidates = [ref.digest()]
    diffs = [canonical.diff(ref.canonical(), eng.canonical())]
    send_stream(ref, seed, [last + 1])
    candidates.append(ref.digest())
    diffs.append(canonical.diff(ref.canonical(), eng.canonical()))
    assert recovered in candidates, (
        f"recovered state (snapshot {eng.storage.snapshot_seq}, journal "
        f"{eng.storage.journal.first_seq}..{eng.storage.journal.last_seq}) is neither the "
        f"reference after op {last} nor after op {last + 1}; runs started at "
        f"{sorted(first_of_run)}; differences: {diffs[0][:6]} / {diffs[1][:6]}")
    # And the recovered engine goes on like the reference.
    send_stream(eng, seed, range(last + 1 if recovered == candidates[0] else last + 2, last + 20))
    send_stream(ref, seed, range(last + 2, last + 20))
    assert eng.digest() == ref.digest()
    eng.close()
    log.info("snapshot crash test: %d runs, %d killed mid-snapshot-write, %d acks",
             runs, mid_snapshot, len(acks))


def test_restart_right_after_a_crash_during_a_long_snapshot(tmp_path):
    """SIGKILL the engine while its forked child is still writing a snapshot
    (made slow: a big state, a slow disk): the engine must restart at once
    (the orphaned writer must not keep the journal locked), and the snapshot
    the orphan leaves afterwards must be valid and consistent."""
    datadir = tmp_path / "data"
    run = run_child(datadir, "--seed", 2, "--count", 26, "--reproducible",
                    "--snapshot-at", 25, "--slow-snapshot", 2.5, "--hold",
                    kill_on="snapshot")
    assert run.snapshot_seq is not None, run.stderr
    writer = int(run.lines[-1].split()[2]) if run.lines[-1].startswith("snapshot") else int(
        next(line for line in run.lines if line.startswith("snapshot")).split()[2])
    os.kill(writer, 0)                   # the orphaned writer is still running
    started = time.monotonic()
    eng = Engine(str(datadir), hold_ms=cc.HOLD_MS)
    restart_seconds = time.monotonic() - started
    assert eng.digest() == stream_engine(2, 25).digest()
    send_stream(eng, 2, range(26, 40))
    digest = eng.digest()
    eng.close()
    deadline = time.monotonic() + 30
    while not any(s.seq == run.snapshot_seq for s in list_snapshots(str(datadir))):
        assert time.monotonic() < deadline, "the orphaned writer never finished"
        time.sleep(0.05)
    with Engine(str(datadir), hold_ms=cc.HOLD_MS) as again:
        assert again.digest() == digest
    _seq, arrays, meta = load_snapshot(
        os.path.join(datadir, f"snapshot-{run.snapshot_seq:020d}.snap"))
    snap = Engine(hold_ms=cc.HOLD_MS)
    snap.state = durability.state_from_snapshot(arrays, meta)
    assert snap.digest() == stream_engine(2, 25).digest()
    log.info("restart during an orphaned snapshot write took %.3f s", restart_seconds)


# ------------------------------------------------------------------ torn writes

TORN_OPS = 140


@pytest.fixture(scope="module")
def torn_journal(tmp_path_factory):
    """A journal of TORN_OPS ops in small segments, and the state digest after
    each seq (a reference replayed entry by entry)."""
    datadir = tmp_path_factory.mktemp("torn") / "data"
    eng = Engine(str(datadir), hold_ms=cc.HOLD_MS, segment_bytes_max=256 * 1024)
    send_stream(eng, 9, range(TORN_OPS))
    eng.close()
    with Engine(str(datadir), hold_ms=cc.HOLD_MS) as opened:
        ref = Engine(hold_ms=cc.HOLD_MS)
        prefix = {0: ref.digest()}
        for seq, command in journal_commands(opened):
            ref._execute(command)
            prefix[seq] = ref.digest()
        last = opened.storage.journal.last_seq
    report = verify(str(datadir))
    assert report.ok and len(report.segments) >= 3
    # seq -> (segment path, byte offset where the entry ends)
    ends = {}
    for segment in report.segments:
        data = Path(segment.file).read_bytes()
        offset, seq = 32, segment.first_seq
        while offset < len(data):
            n = int.from_bytes(data[offset + 4:offset + 8], "little")
            offset += 16 + n + (-n % 8)
            ends[seq] = (os.path.basename(segment.file), offset)
            seq += 1
    return datadir, prefix, last, ends


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_torn_or_flipped_journal_recovers_a_prefix_or_refuses(torn_journal, tmp_path_factory,
                                                             data):
    datadir, prefix, last, ends = torn_journal
    copy = tmp_path_factory.mktemp("copy") / "data"
    shutil.copytree(datadir, copy)
    segments = sorted(p.name for p in copy.glob("journal-*.seg"))
    # The last segment is where torn writes happen; closed ones get damage too.
    name = data.draw(st.sampled_from(segments + [segments[-1]] * 2), label="segment")
    path = copy / name
    size = path.stat().st_size
    mode = data.draw(st.sampled_from(["truncate", "flip"]), label="mode")
    offset = data.draw(st.integers(0, size - 1), label="offset")
    if mode == "truncate":
        os.truncate(path, offset)
    else:
        with open(path, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([byte ^ data.draw(st.integers(1, 255), label="xor")]))
    # Entries that end at or before the damage are intact: never lost.
    intact = max([seq for seq, (seg, end) in ends.items()
                  if seg < name or (seg == name and end <= offset)], default=0)
    try:
        eng = Engine(str(copy), hold_ms=cc.HOLD_MS)
    except JournalCorrupt as e:
        assert e.file.startswith(str(copy)) and os.path.basename(e.file).startswith("journal-")
        assert f"at byte offset {e.offset}" in str(e) and "verify" in str(e)
        assert verify(str(copy)).corrupt
        return
    recovered = eng.storage.journal.last_seq
    # A closed segment is durable in full: damage there is never recovered from.
    assert name == segments[-1], f"damage in closed segment {name} was accepted"
    assert intact <= recovered <= last
    assert eng.digest() == prefix[recovered], "recovered state is not the journal prefix"
    assert verify(str(copy)).ok             # the torn tail was truncated
    eng.close()


# ------------------------------------------------------------------ snapshots

def test_snapshot_plus_tail_equals_full_replay(tmp_path):
    datadir = str(tmp_path / "data")
    eng = Engine(datadir, hold_ms=cc.HOLD_MS, retain_snapshots=10)
    taken = []
    for lo, hi in ((0, 40), (40, 80), (80, 120)):
        send_stream(eng, 4, range(lo, hi))
        info = eng.snapshot()
        assert info["ok"] and info["pause_ms"] >= 0
        taken.append(info["seq"])
    send_stream(eng, 4, range(120, 150))             # the tail
    # The snapshot writers closed their copies of the lock: the engine holds it.
    with pytest.raises(JournalError, match="open in another process"):
        Engine(datadir)
    live = eng.digest()
    eng.close()
    with Engine(datadir, hold_ms=cc.HOLD_MS) as again:
        assert again.storage.snapshot_seq == taken[-1]
        assert again.digest() == live
        ref, _, _ = replay_reference(again)          # full replay from entry 1
        assert ref.digest() == live
        # Each snapshot equals the full replay up to its seq.
        ref = Engine(hold_ms=cc.HOLD_MS)
        for seq, command in journal_commands(again):
            ref._execute(command)
            if seq in taken:
                _seq, arrays, meta = load_snapshot(
                    os.path.join(datadir, f"snapshot-{seq:020d}.snap"))
                snap = Engine(hold_ms=cc.HOLD_MS)
                snap.state = durability.state_from_snapshot(arrays, meta)
                assert snap.digest() == ref.digest(), f"snapshot {seq}"
    assert stream_engine(4, 149).digest() == live


def test_retention_removes_old_segments_and_snapshots_yet_recovery_is_exact(tmp_path):
    datadir = str(tmp_path / "data")
    eng = Engine(datadir, hold_ms=cc.HOLD_MS, snapshot_every_entries=15,
                 retain_snapshots=2, segment_bytes_max=64 * 1024)
    send_stream(eng, 6, range(200))
    live = eng.digest()
    eng.close()
    snapshots = list_snapshots(datadir)
    assert len(snapshots) == 2
    first = verify(datadir).segments[0].first_seq
    assert 1 < first <= snapshots[0].seq + 1          # kept from the older snapshot on
    with Engine(datadir, hold_ms=cc.HOLD_MS) as again:
        assert again.storage.snapshot_seq == snapshots[-1].seq
        assert again.digest() == live
    assert stream_engine(6, 199).digest() == live


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_newest_snapshot_falls_back_to_the_older_one(tmp_path, caplog, damage):
    datadir = str(tmp_path / "data")
    eng = Engine(datadir, hold_ms=cc.HOLD_MS, snapshot_every_entries=25,
                 retain_snapshots=2, segment_bytes_max=64 * 1024)
    send_stream(eng, 8, range(160))
    live = eng.digest()
    eng.close()
    older, newest = list_snapshots(datadir)[-2:]
    if damage == "flip":
        with open(newest.path, "r+b") as f:
            f.seek(newest.bytes // 2)
            byte = f.read(1)[0]
            f.seek(newest.bytes // 2)
            f.write(bytes([byte ^ 0x40]))
    else:
        os.truncate(newest.path, newest.bytes - 100)
    with caplog.at_level(logging.WARNING):
        with Engine(datadir, hold_ms=cc.HOLD_MS) as again:
            assert again.storage.snapshot_seq == older.seq   # and a longer replay
            assert again.digest() == live
    assert any("skipping" in r.getMessage() and newest.path in r.getMessage()
               for r in caplog.records)


def test_all_snapshots_damaged_after_retention_refuses_to_start(tmp_path):
    """The journal's head was removed by retention, so without a snapshot
    there is nothing to start from: the engine must refuse, not start empty."""
    datadir = str(tmp_path / "data")
    eng = Engine(datadir, hold_ms=cc.HOLD_MS, snapshot_every_entries=25,
                 retain_snapshots=2, segment_bytes_max=64 * 1024)
    send_stream(eng, 8, range(160))
    eng.close()
    for info in list_snapshots(datadir):
        os.truncate(info.path, 64)
    with pytest.raises((ValueError, JournalError), match="journal starts at seq|snapshot"):
        Engine(datadir, hold_ms=cc.HOLD_MS)


# ------------------------------------------------------------ storage failures

def batch_of(seed: int, k: int):
    """A PAY op of the stream at or after k (its records)."""
    while True:
        name, payload = cc.op_at(seed, k, codes=False)
        if name == "PAY":
            return k, payload
        k += 1


def engine_before_a_fault(tmp_path):
    """A durable engine on a fault-injecting fs, 60 ops of stream 3 in, and
    the next PAY batch of the stream at its engine time: (data dir, fs,
    engine, acknowledged digest, durable seq, op number, the batch)."""
    datadir = str(tmp_path / "data")
    fs = FaultyFs()
    eng = Engine(datadir, hold_ms=cc.HOLD_MS, fs=fs)
    send_stream(eng, 3, range(60))
    k, records = batch_of(3, 60)
    eng.clock = Clock(cc.op_time_ms(k))
    return datadir, fs, eng, eng.digest(), eng.storage.journal.durable_seq, k, records


def test_fdatasync_eio_is_unavailable_then_writes_resume(tmp_path, fast_recover):
    datadir, fs, eng, acked, durable, k, records = engine_before_a_fault(tmp_path)

    fs.fail("fdatasync", errno.EIO)
    with pytest.raises(Unavailable) as caught:
        eng.pay(records)                 # applied, but not durable: not acknowledged
    assert caught.value.retryable and "EIO" in caught.value.message
    assert eng.storage.journal.durable_seq == durable
    # While storage fails, every write is refused (each one retries recover()).
    for op in (lambda: eng.pay(records),
               lambda: eng.call("TOPUP", {"topups": [{"id": 9_999_999, "user": 1, "amount": 5}]}),
               lambda: eng.call("WALLETS", {"users": [77_777]})):
        with pytest.raises(Unavailable):
            op()
    assert eng.storage.journal.durable_seq == durable

    assert eng.digest() == acked          # the failed batch was dropped from the state too
    fs.heal()
    again = eng.pay(records)              # the client's retry: recover() first
    assert eng.storage.journal.durable_seq == durable + 1
    ok = again["status"] == 0
    assert ok.any() and not (again["flags"] & RESULT_DUPLICATE).any()
    send_stream(eng, 3, range(k + 1, k + 30))
    live = eng.digest()
    eng.close()
    with Engine(datadir, hold_ms=cc.HOLD_MS) as reopened:
        assert reopened.digest() == live
        ref, _, commands = replay_reference(reopened)
        assert ref.digest() == live
        # The batch answered unavailable was never journaled: only its retry.
        assert bytes(commands[durable + 1].body) == records.tobytes()
        assert bytes(commands[durable + 2].body) != records.tobytes()
    assert acked != live


def test_enospc_partial_write_then_restart_keeps_only_acknowledged(tmp_path, fast_recover):
    datadir, fs, eng, acked, durable, k, records = engine_before_a_fault(tmp_path)
    fs.fail("pwritev", errno.ENOSPC)
    fs.partial_then_fail = True                     # half the entry reaches the file
    with pytest.raises(Unavailable, match="ENOSPC"):
        eng.pay(records)
    with pytest.raises(Unavailable):
        eng.issue(cc.issue_batch(k, np.random.default_rng(1)))
    eng.close()                           # still failing: the pending entry is dropped
    with Engine(datadir, hold_ms=cc.HOLD_MS) as reopened:   # torn tail truncated
        assert reopened.digest() == acked
        assert reopened.storage.journal.last_seq == durable
    assert verify(datadir).ok


def test_eio_on_a_segment_roll_and_on_snapshot(tmp_path, fast_recover):
    """Failures at other places: the fdatasync of a full segment before the
    roll, and a snapshot while storage fails."""
    datadir = str(tmp_path / "data")
    fs = FaultyFs()
    eng = Engine(datadir, hold_ms=cc.HOLD_MS, fs=fs, segment_bytes_max=64 * 1024)
    send_stream(eng, 12, range(40))
    fs.fail("open", errno.EIO)            # creating the next segment fails
    k = 40
    while True:
        name, payload = cc.op_at(12, k, codes=False)
        eng.clock = Clock(cc.op_time_ms(k))
        try:
            cc.send(eng, name, payload, [0])
        except Unavailable:
            break
        k += 1
        assert k < 400, "no segment roll happened"
    with pytest.raises(Unavailable):
        eng.snapshot()
    fs.heal()
    cc.send(eng, name, payload, [0])      # the retry (idempotent) succeeds
    send_stream(eng, 12, range(k + 1, k + 20))
    info = eng.snapshot()
    assert info["ok"]
    live = eng.digest()
    eng.close()
    assert verify(datadir).ok
    with Engine(datadir, hold_ms=cc.HOLD_MS) as reopened:
        assert reopened.digest() == live


# ----------------------------------------- unavailable means nothing applied

FAULTS = [("fdatasync", errno.EIO), ("pwritev", errno.ENOSPC)]


def pay_records(ids, payer=1, merchant=1, amount=100) -> np.ndarray:
    records = np.zeros(len(ids), PAY_RECORD)
    records["id"], records["payer"], records["merchant"], records["amount"] = (
        ids, payer, merchant, amount)
    return records


def small_world(eng: Engine) -> None:
    eng.call("MERCHANTS", {"merchants": [{"id": 1, "fee_bps": 60}]})
    eng.call("WALLETS", {"users": [1, 2]})
    eng.call("TOPUP", {"topups": [{"id": 1, "user": 1, "amount": 10**7}]})


def balance_of(eng: Engine, user: int) -> int:
    return eng.call("BALANCES", {"users": [user]})["users"][0]["balance"]


def payments_found(eng: Engine, ids) -> list[int]:
    results = eng.call("GET_PAYMENTS", {"ids": [int(i) for i in ids]})["results"]
    return [int(i) for i, r in zip(ids, results) if r["status"] == Status.ok]


@pytest.mark.parametrize("call, error", FAULTS, ids=["fdatasync-EIO", "pwritev-ENOSPC"])
def test_payments_answered_unavailable_are_not_applied_nor_durable_later(
        tmp_path, fast_recover, call, error):
    """Issue 14: batches in flight behind an fsync when the journal's write
    or fdatasync fails are answered unavailable, and then they are not
    visible, not applied, and never durable (after the storage heals, after
    a restart); a retry of the same payment ids succeeds once. The payments
    answered ok before are all there, and engine time does not go back."""
    from support.faulty_fs import GatedFs
    datadir = str(tmp_path / "data")
    fs = GatedFs()
    clock = Clock(cc.T0)
    eng = Engine(datadir, fs=fs, clock=clock)
    small_world(eng)
    acked = list(range(1, 51))
    assert (eng.pay(pay_records(acked))["status"] == Status.ok).all()
    before = balance_of(eng, 1)
    # Pipelined as the server's writer does: the first batch's fsync is held
    # while ten more batches are journaled and applied behind it.
    gate = fs.hold_next()
    _, first = eng.write_command(OP_PAY, pay_records([51]).tobytes())
    assert fs.entered.wait(10)
    acked.append(51)
    clock.advance(60_000)
    failed = list(range(1000, 1100))
    behind = [eng.write_command(OP_PAY, pay_records(failed[i:i + 10]).tobytes())[1]
              for i in range(0, 100, 10)]
    stamp_ms = eng.state.now
    fs.fail(call, error)
    gate.set()
    first.result(timeout=10)
    for future in behind:
        with pytest.raises(Unavailable):
            future.result(timeout=10)
    clock.advance(-30_000)                # the clock steps back meanwhile
    # Right after: not visible, not debited; writes refused, reads served.
    assert payments_found(eng, acked + failed) == acked
    assert balance_of(eng, 1) == before - 100
    with pytest.raises(Unavailable):
        eng.pay(pay_records(failed))
    with pytest.raises(Unavailable):
        eng.call("TOPUP", {"topups": [{"id": 2, "user": 2, "amount": 5}]})
    assert payments_found(eng, failed) == []
    # Space freed: the next write works, and what failed stays absent.
    fs.heal()
    eng.call("TOPUP", {"topups": [{"id": 2, "user": 2, "amount": 5}]})
    assert eng.state.now >= stamp_ms, "engine time went back"
    assert payments_found(eng, acked + failed) == acked
    assert balance_of(eng, 1) == before - 100
    eng.close()
    with Engine(datadir) as reopened:       # replay from disk
        assert payments_found(reopened, acked + failed) == acked
        assert balance_of(reopened, 1) == before - 100
        first_retry = reopened.pay(pay_records(failed))
        assert (first_retry["status"] == Status.ok).all()
        assert not (first_retry["flags"] & RESULT_DUPLICATE).any()
        second_retry = reopened.pay(pay_records(failed))
        assert (second_retry["flags"] & RESULT_DUPLICATE).all()
        assert balance_of(reopened, 1) == before - 100 * 101
        assert reopened.audit()["ok"]
    assert verify(datadir).ok


def test_a_failure_right_after_the_state_check_is_rebuilt_before_the_next_append(
        tmp_path, fast_recover):
    """The race a fail-stop must close: the engine finds its state current,
    then the sync thread fails an fsync (dropping batch B) and the storage
    heals at once, before the engine journals the next batch C. The journal
    recovers, and the state is rebuilt before C is applied: C is applied to
    a state without B, and B's fsync is never reported done."""
    from support.faulty_fs import GatedFs
    datadir = str(tmp_path / "data")
    fs = GatedFs()
    eng = Engine(datadir, fs=fs)
    small_world(eng)
    gate = fs.hold_next()
    _, durable_a = eng.write_command(OP_PAY, pay_records([1]).tobytes())
    assert fs.entered.wait(10)
    _, durable_b = eng.write_command(OP_PAY, pay_records([2]).tobytes())
    fs.fail("fdatasync", errno.EIO)
    ensure_current = eng._ensure_current
    raced = []

    def fail_meanwhile():
        ensure_current()
        if not raced:                     # the first check passed: now the failure
            raced.append(True)
            gate.set()
            with pytest.raises(Unavailable):
                durable_b.result(timeout=10)
            fs.heal()                       # and the storage works again at once
    eng._ensure_current = fail_meanwhile
    result = eng.pay(pay_records([3]))
    assert raced and result["status"][0] == Status.ok
    durable_a.result(timeout=1)
    del eng._ensure_current
    assert payments_found(eng, [1, 2, 3]) == [1, 3]
    live = eng.digest()
    eng.close()
    with Engine(datadir) as reopened:
        assert reopened.digest() == live
        assert payments_found(reopened, [1, 2, 3]) == [1, 3]


def test_a_snapshot_written_across_a_storage_failure_stays_valid(tmp_path, fast_recover):
    """A snapshot child still writing when the journal fails was forked at a
    durable entry: the rebuild does not wait for it, and once written it
    loads (with the journal after it) to the state the engine went on with."""
    from support.faulty_fs import GatedFs
    datadir = str(tmp_path / "data")
    fs = GatedFs()
    eng = Engine(datadir, fs=fs, snapshot_mb_per_s=1)     # ~1.5 MB: over a second
    small_world(eng)
    eng.pay(pay_records(range(1, 51)))
    eng.pay(pay_records(range(10_000, 13_000), amount=1))
    info = eng.snapshot(wait=False)
    gate = fs.hold_next()
    _, durable = eng.write_command(OP_PAY, pay_records([51]).tobytes())
    assert fs.entered.wait(10)
    _, dropped = eng.write_command(OP_PAY, pay_records(range(100, 110)).tobytes())
    fs.fail("pwritev", errno.ENOSPC)
    gate.set()
    durable.result(timeout=10)
    with pytest.raises(Unavailable):
        dropped.result(timeout=10)
    assert payments_found(eng, [51] + list(range(100, 110))) == [51]
    assert eng.storage.snapshot_child is not None, "the rebuild waited for the snapshot"
    fs.heal()
    eng.pay(pay_records([52]))
    assert eng.storage.reap_snapshot(block=True)["ok"]
    assert list_snapshots(datadir)[-1].seq == info["seq"]
    live = eng.digest()
    eng.close()
    with Engine(datadir) as reopened:
        assert reopened.storage.snapshot_seq == info["seq"]
        assert reopened.digest() == live
        assert payments_found(reopened, [51, 52] + list(range(100, 110))) == [51, 52]


# ------------------------------------------------------------------ pause

def test_snapshot_pause_is_reported(tmp_path, capsys):
    """The fork pause of engine.snapshot() on a mid-size state (not asserted:
    a shared 2-core VM; the figure goes to the log and the terminal)."""
    from engine.demo.world import World, build
    datadir = str(tmp_path / "data")
    spec = World(users=50_000, merchants=200, stocks=20, seed=3)
    eng = Engine(datadir, clock=Clock(spec.now_ms))
    build(eng, spec)
    pauses, info = [], None
    for _ in range(3):
        info = eng.snapshot()
        assert info["ok"]
        pauses.append(info["pause_ms"])
    size = list_snapshots(datadir)[-1].bytes
    eng.close()
    with capsys.disabled():
        print(f"\n  snapshot of {spec.users:,} users / {len(eng.state.topups):,} top-ups "
              f"({size / 1e6:.0f} MB): pause_ms {', '.join(f'{p:.1f}' for p in pauses)}, "
              f"write {info['write_ms']:.0f} ms")


def test_restart_loads_with_headroom_and_keeps_hints_and_topups(tmp_path):
    """A capacity hint is a table's whole size: a restart loads the snapshot
    into arrays that already hold the hint (or the journal tail), instead of
    adding the hint again; top-ups loaded from the snapshot stay idempotent."""
    datadir = str(tmp_path / "data")
    hints = {"payments": 50_000, "visits": 50_000, "users": 100}
    eng = Engine(datadir, hold_ms=cc.HOLD_MS, capacity=hints)
    send_stream(eng, 5, range(0, 40))
    eng.snapshot()
    send_stream(eng, 5, range(40, 60))               # a tail after the snapshot
    topup_k2 = cc.op_at(5, 2)[1]["topups"][0]        # kept in the snapshot
    live, payments = eng.digest(), eng.state.ledger.rows("payments")
    eng.close()
    with Engine(datadir, hold_ms=cc.HOLD_MS, capacity=hints) as again:
        ledger = again.state.ledger
        assert again.digest() == live
        assert ledger.rows("payments") == payments > 0
        assert len(ledger.pay_req) == len(ledger.pay_meta) == hints["payments"]
        assert len(ledger.visits) == hints["visits"]
        assert not ledger.pay_meta[payments:].view(np.uint8).any()    # rows past n are zero
        same = again.call("TOPUP", {"topups": [topup_k2]})["results"][0]
        assert same == {"status": 0, "duplicate": True}
        other = dict(topup_k2, amount=topup_k2["amount"] + 1)
        assert again.call("TOPUP", {"topups": [other]})["results"][0]["status"] == \
            Status.exists_with_different_fields
        live = again.digest()
    # Without hints, the load makes room for the tail it is about to replay.
    with Engine(datadir, hold_ms=cc.HOLD_MS) as bare:
        assert bare.digest() == live
        assert len(bare.state.ledger.pay_req) >= payments


def older_row_layout(arrays: dict, meta: dict) -> None:
    arrays["users"] = np.zeros(len(arrays["users"]), [("id", "<u8"), ("balance", "<i8")])


def count_past_its_rows(arrays: dict, meta: dict) -> None:
    meta["ledger"]["n_users"] = len(arrays["users"]) + 1_000_000


def snapshot_the_kernel_cannot_take(tmp_path, damage) -> str:
    """A data directory whose newest snapshot is a valid file (checksums and
    all) holding tables this kernel cannot take: damage(arrays, meta)."""
    from engine.storage.snapshot import write_snapshot
    datadir = str(tmp_path / "data")
    with Engine(datadir) as eng:
        eng.call("WALLETS", {"users": [1, 2]})
        eng.snapshot()
    path = list_snapshots(datadir)[-1].path
    seq, arrays, meta = load_snapshot(path)
    damage(arrays, meta)
    os.unlink(path)
    write_snapshot(datadir, seq, arrays, meta)
    return datadir


@pytest.mark.parametrize("damage", [older_row_layout, count_past_its_rows])
def test_snapshot_of_other_row_layouts_is_refused_with_what_to_do(tmp_path, damage):
    datadir = snapshot_the_kernel_cannot_take(tmp_path, damage)
    with pytest.raises(JournalError, match="cannot load.*move the snapshot files aside"):
        Engine(datadir)


@pytest.mark.parametrize("damage", [older_row_layout, count_past_its_rows])
def test_a_snapshot_the_kernel_cannot_take_is_refused_under_python_O(tmp_path, damage):
    """The load checks its input with real errors, not asserts (which
    `python -O` drops): the operator gets the same one line, and the kernel
    never runs on rows of another layout or past the end of its rows."""
    datadir = snapshot_the_kernel_cannot_take(tmp_path, damage)
    served = subprocess.run(
        [sys.executable, "-O", "-m", "engine.cli", "serve", "--data", datadir, "--listen",
         "127.0.0.1:0"], capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert served.returncode == 2, served.stderr
    lines = served.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in served.stderr, served.stderr
    assert lines[0].startswith("scanpay serve: the journal cannot be opened ")
    assert "cannot load (users: " in lines[0] and "move the snapshot files aside" in lines[0]


def test_group_commit_shares_one_fsync_among_the_commands_made_meanwhile(tmp_path):
    import msgspec
    from engine.core.dispatch import MAP_OPS

    class SlowFs(FaultyFs):
        def fdatasync(self, fd):
            time.sleep(0.02)                # a slow disk: commands pile up meanwhile
            super().fdatasync(fd)
    fs = SlowFs()
    datadir = str(tmp_path / "data")
    eng = Engine(datadir, fs=fs)
    before = fs.calls["fdatasync"]
    syncs = []                              # journal syncs run by the sync thread
    storage_sync = eng.storage.sync
    eng.storage.sync = lambda: syncs.append(1) or storage_sync()
    wallets = MAP_OPS["WALLETS"].code
    futures = [eng.write_command(wallets, msgspec.msgpack.encode({"users": [u]}))[1]
               for u in range(1, 41)]
    seqs = [f.result(timeout=10) for f in futures]
    assert seqs == sorted(seqs) and seqs[-1] == eng.storage.journal.last_seq
    assert fs.calls["fdatasync"] - before <= 4      # 40 commands, a few fsyncs
    assert len(syncs) <= 4                  # and as few sync jobs, not one per command
    eng.close()
    with Engine(datadir) as again:
        assert again.call("BALANCES", {"users": [1, 40]})["users"][1]["status"] == 0


def test_commit_interval_spaces_the_fsyncs_and_each_covers_what_came_meanwhile(tmp_path):
    import msgspec
    from engine.core.dispatch import MAP_OPS
    wallets = MAP_OPS["WALLETS"].code
    interval_s = 0.03
    # The fixed window (commit_siblings = 0): every fsync waits for it.
    with Engine(str(tmp_path / "data"), commit_interval_us=int(interval_s * 1e6),
                commit_siblings=0) as eng:
        started = []                        # when each journal sync began
        storage_sync = eng.storage.sync
        eng.storage.sync = lambda: started.append(time.perf_counter()) or storage_sync()
        futures = []
        began_s = time.perf_counter()
        for user in range(1, 61):           # 60 commands over about 3 intervals
            futures.append(eng.write_command(wallets, msgspec.msgpack.encode({"users": [user]}))[1])
            time.sleep(interval_s / 20)
        submitted_s = time.perf_counter() - began_s
        seqs = [f.result(timeout=10) for f in futures]
        assert seqs == sorted(seqs) and seqs[-1] == eng.storage.journal.last_seq
        gaps = np.diff(started)
        # Each fsync covers everything that came during its window: at most
        # one fsync per interval of submitting (plus the first and the last),
        # however long a busy machine stretched the 60 sleeps.
        assert 2 <= len(started) <= submitted_s / interval_s + 2, (started, submitted_s)
        assert len(started) < len(futures) // 4, started
        assert gaps.min() >= interval_s * 0.95   # never two fsyncs closer than the interval


def test_a_snapshot_is_due_by_journal_bytes_as_well_as_entries(tmp_path):
    from engine.storage.durability import Storage

    class Command:
        def __init__(self, size):
            self.size = size

        def encode(self):
            return bytes(self.size)

    storage = Storage(str(tmp_path / "data"), snapshot_every_entries=1000, snapshot_every_mb=1)
    started = []
    storage.snapshot = lambda state, wait=True: started.append(storage.journal.last_seq)
    engine = type("E", (), {"state": None})()
    for _ in range(3):                      # 3 entries of 400 KiB: due at the third
        storage.append(Command(400 << 10))
        storage.after_write(engine)
    assert started == [3]
    storage.close()
    # After a restart the replayed tail counts too.
    again = Storage(str(tmp_path / "data"), snapshot_every_entries=1000, snapshot_every_mb=1)
    list(again.commands_after(0, replaying=True))
    assert again.bytes_since_snapshot >= 3 * (400 << 10)
    again.close()


# ---------------------------------------- the durable mark (issue 14, storage)

def test_foreign_file_under_a_segment_name_stops_the_engine_and_serve(tmp_path):
    """Random bytes named like the first segment, beside a valid
    settings.json: the engine used to delete them as a torn tail and serve
    an empty ledger. Now it refuses, keeps the file, and `scanpay serve`
    says so in one line."""
    datadir = tmp_path / "data"
    Engine(str(datadir), hold_ms=cc.HOLD_MS).close()        # settings.json and a manifest
    for name in os.listdir(datadir):
        if name.startswith("journal"):
            os.unlink(datadir / name)
    garbage = os.urandom(100_000)
    segment = datadir / "journal-00000000000000000001.seg"
    segment.write_bytes(garbage)
    with pytest.raises(JournalCorrupt, match="foreign file"):
        Engine(str(datadir), hold_ms=cc.HOLD_MS)
    served = subprocess.run(
        [sys.executable, "-m", "engine.cli", "serve", "--data", str(datadir), "--listen",
         "127.0.0.1:0"], capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert served.returncode == 2, served.stderr          # a start-up failure (engine/cli/__init__.py)
    lines = served.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in served.stderr, served.stderr
    assert lines[0].startswith("scanpay serve: the journal is damaged ")
    assert str(segment) in lines[0] and "scanpay journal verify" in lines[0]
    assert segment.read_bytes() == garbage


def test_deleting_the_last_of_two_segments_is_refused(tmp_path):
    """Without a snapshot, deleting the last segment used to start the
    engine silently without every payment it held."""
    datadir = str(tmp_path / "data")
    eng = Engine(datadir, hold_ms=cc.HOLD_MS, segment_bytes_max=256 * 1024)
    send_stream(eng, 5, range(120))
    payments = eng.counts()["payments"]
    eng.close()
    segments = verify(datadir).segments
    assert len(segments) >= 2 and not list_snapshots(datadir)
    os.unlink(segments[-1].file)
    with pytest.raises(JournalCorrupt, match="missing") as caught:
        Engine(datadir, hold_ms=cc.HOLD_MS)
    assert caught.value.file == segments[-1].file
    assert payments > 0
