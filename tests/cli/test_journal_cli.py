"""`scanpay journal verify|inspect DIR`: output, exit codes, read-only."""
import os
import time

import pytest

from support import crash_child as cc
from support.clock import Clock
from engine import Engine
from engine.cli import main
from engine.storage.journal import verify
from engine.storage.snapshot import list_snapshots


def build(datadir, ops=120, seed=4, **storage):
    """A data directory written by the durable engine: ops of the crash stream."""
    clock = Clock(cc.op_time_ms(0))
    eng = Engine(str(datadir), clock=clock,
                 hold_ms=cc.HOLD_MS, **storage)
    last_code = [0]
    for k in range(ops):
        clock.now_ms = cc.op_time_ms(k)
        name, payload = cc.op_at(seed, k)
        cc.send(eng, name, payload, last_code)
        # A snapshot due while the last one's child still writes is put off
        # to a later entry: wait for each, so snapshots land at exact seqs
        # however slow the machine is.
        eng.storage.reap_snapshot(block=True)
    return eng


def cli(capsys, *argv):
    code = main(["journal", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def files_of(datadir):
    return {name: os.path.getsize(os.path.join(datadir, name)) for name in os.listdir(datadir)}


def test_verify_healthy_directory_with_snapshots(tmp_path, capsys):
    datadir = tmp_path / "data"
    eng = build(datadir, snapshot_every_entries=40, retain_snapshots=10)
    digest = eng.digest()
    eng.close()
    before = files_of(datadir)
    code, out = cli(capsys, "verify", datadir)
    assert code == 0, out
    assert "journal: 1 segment(s), entries 1.." in out
    assert "entries by op: PAY " in out and "ISSUE " in out and "TOPUP " in out
    assert "time range: 2023-11-14T22:13:20.000Z .. " in out
    assert "snapshots: 2" in out and "seq 40 " in out and " ok" in out
    assert "settings: hold_ms 40000" in out
    assert "replay (as the engine starts): snapshot 80 + " in out
    assert "full replay from entry 1: " in out and "same state digest" in out
    assert "snapshots at 40, 80 equal the replay at their seq" in out
    assert f"state digest: {digest}" in out
    assert "AUDIT: ok" in out
    assert out.rstrip().endswith("result: OK")
    assert files_of(datadir) == before                 # read-only


def test_verify_after_retention_replays_from_the_snapshot(tmp_path, capsys):
    datadir = tmp_path / "data"
    eng = build(datadir, ops=160, snapshot_every_entries=20, retain_snapshots=2,
                segment_bytes_max=64 * 1024)
    digest = eng.digest()
    eng.close()
    first = verify(str(datadir)).segments[0].first_seq
    assert first > 1
    code, out = cli(capsys, "verify", datadir)
    assert code == 0, out
    assert f"not possible, the journal starts at entry {first}" in out
    assert f"state digest: {digest}" in out and "result: OK" in out


def test_torn_tail_is_a_warning_and_is_left_alone(tmp_path, capsys):
    datadir = tmp_path / "data"
    build(datadir, ops=30).close()
    segment = verify(str(datadir)).segments[-1].file
    with open(segment, "ab") as f:
        f.write(b"\x17" * 37)                          # half an entry: a crash mid-write
    before = files_of(datadir)
    code, out = cli(capsys, "verify", datadir)
    assert code == 0, out
    assert "WARNING: torn tail in " in out and "byte offset" in out
    assert "moves them to quarantine/ when it starts" in out
    assert files_of(datadir) == before                 # not truncated by verify


def test_corrupt_journal_fails_verify_and_inspect_reports_it(tmp_path, capsys):
    datadir = tmp_path / "data"
    eng = build(datadir, ops=40)
    eng.close()
    segment = verify(str(datadir)).segments[-1].file
    offset = os.path.getsize(segment) // 2
    with open(segment, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))
    code, out = cli(capsys, "verify", datadir)
    assert code == 1, out
    assert f"ERROR: journal corrupt: {segment} at byte offset " in out
    assert "restore the data directory from a backup".lower() in out.lower()
    assert "result: FAILED" in out
    # The prefix before the damage still replays (and AUDIT holds on it).
    assert "replay (as the engine starts): " in out and "AUDIT: ok" in out
    code, out = cli(capsys, "inspect", datadir, "--entries", 2)
    assert code == 0, out
    assert "ERROR: journal corrupt" in out and "result: problems found" in out


def test_invalid_snapshot_fails_verify_but_the_older_one_is_used(tmp_path, capsys):
    datadir = tmp_path / "data"
    eng = build(datadir, snapshot_every_entries=40, retain_snapshots=10)
    digest = eng.digest()
    eng.close()
    newest = list_snapshots(str(datadir))[-1]
    os.truncate(newest.path, newest.bytes - 64)
    code, out = cli(capsys, "verify", datadir)
    assert code == 1, out
    assert f"{os.path.basename(newest.path)}  seq {newest.seq}" in out and "INVALID" in out
    assert "replay (as the engine starts): snapshot 40 + " in out
    assert f"state digest: {digest}" in out


def test_inspect_lists_entries(tmp_path, capsys):
    datadir = tmp_path / "data"
    build(datadir, ops=50).close()
    code, out = cli(capsys, "inspect", datadir, "--entries", 3)
    assert code == 0, out
    assert "first 3 entries:" in out and "last 3 entries:" in out
    assert "seq 1  MERCHANTS  2023-11-14T22:13:20.000Z  merchants: 20 items" in out
    assert "seq 2  WALLETS" in out and "users: 300 items" in out
    assert " records" in out                            # a batch summary among the last
    assert "result: OK" in out


def test_inspect_no_replay_is_fast_and_says_less(tmp_path, capsys):
    datadir = tmp_path / "data"
    build(datadir, ops=20).close()
    code, out = cli(capsys, "inspect", datadir, "--no-replay")
    assert code == 0 and "entries by op:" in out and "state digest" not in out


def test_running_engine_is_noticed(tmp_path, capsys):
    datadir = tmp_path / "data"
    eng = build(datadir, ops=20)                       # still open: holds journal.lock
    code, out = cli(capsys, "verify", datadir)
    assert code == 0, out
    assert "an engine has this directory open" in out
    eng.close()


def test_not_a_data_directory(tmp_path, capsys):
    code, out = cli(capsys, "verify", tmp_path / "missing")
    assert code == 2 and "is not a directory" in out
    (tmp_path / "empty").mkdir()
    code, out = cli(capsys, "inspect", tmp_path / "empty")
    assert code == 2 and "not a data directory" in out
    with pytest.raises(SystemExit):
        main(["journal", "check", str(tmp_path)])


def test_verify_reads_every_entry_of_preallocated_segments(tmp_path, capsys):
    """Segments zero-filled ahead end in zeros: verify used to stop at the
    first such closed segment, replay a part of the journal and say OK."""
    datadir = tmp_path / "data"
    clock = Clock(cc.op_time_ms(0))
    eng = Engine(str(datadir), clock=clock,
                 hold_ms=cc.HOLD_MS, segment_bytes_max=128 * 1024, journal_prealloc=True)
    last_code = [0]
    for k in range(150):
        spare = eng.storage.journal._spare
        for _ in range(10_000):             # every roll finds its spare ready, once it is wanted
            if spare.ready() or not spare.requested:
                break
            time.sleep(0.001)
        clock.now_ms = cc.op_time_ms(k)
        name, payload = cc.op_at(4, k)
        cc.send(eng, name, payload, last_code)
    digest = eng.digest()
    last = eng.storage.journal.last_seq
    eng.close()
    segments = verify(str(datadir)).segments
    assert len(segments) >= 4
    assert sum(1 for s in segments[:-1] if s.zero_tail_bytes) >= 2
    code, out = cli(capsys, "verify", datadir, "--hold-ms", cc.HOLD_MS)
    assert code == 0, out
    assert f"replay (as the engine starts): {last} entries from entry 1 (1..{last})" in out
    assert f"state digest: {digest}" in out and "result: OK" in out
    assert "bytes zero-filled ahead" in out


def test_verify_says_what_it_could_not_read(tmp_path, capsys):
    datadir = tmp_path / "data"
    build(datadir, ops=40, segment_bytes_max=4 * 1024).close()
    segments = verify(str(datadir)).segments
    assert len(segments) >= 3
    os.unlink(segments[1].file)                  # a gap: what follows is not replayed
    code, out = cli(capsys, "verify", datadir)
    assert code == 1, out
    assert f"only {segments[0].entries} of the " in out and "were not checked" in out
