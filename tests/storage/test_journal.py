"""The journal: round trips, segment rolls, torn tails vs corruption, group
commit and storage failures (injected through the `fs` parameter)."""
import errno
import logging
import os
import shutil
import tempfile
import time

import msgspec
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

import engine.storage.durability as durability
from support.faulty_fs import FaultyFs, GatedFs
from engine import Engine
from engine.core.dispatch import MAP_OPS
from engine.protocol.errors import Unavailable
from engine.storage.journal import (
    ENTRY_HEADER_BYTES, MANIFEST_NAME, SEGMENT_HEADER_BYTES, Journal, JournalCorrupt,
    JournalError, JournalUnavailable, Manifest, _write_manifest, segment_name, verify,
)


def payload_of(seq, size=None):
    size = (seq * 37) % 300 if size is None else size
    return bytes((seq + i) % 251 for i in range(size))


def segments_in(directory):
    return sorted(name for name in os.listdir(directory) if name.endswith(".seg"))


def read_all(journal, from_seq=1):
    return [(seq, bytes(payload)) for seq, payload in journal.read(from_seq)]


def write_journal(directory, payloads, **kwargs):
    with Journal.open(directory, **kwargs) as journal:
        for payload in payloads:
            journal.append(payload)
        journal.sync()


def entry_offsets(path):
    """(offset, frame bytes) of every entry in a healthy segment file."""
    data = open(path, "rb").read()
    offsets, offset = [], SEGMENT_HEADER_BYTES
    while offset < len(data):
        payload_bytes = int.from_bytes(data[offset + 4:offset + 8], "little")
        frame = ENTRY_HEADER_BYTES + payload_bytes + (-payload_bytes % 8)
        offsets.append((offset, frame))
        offset += frame
    return offsets


def crash_manifest(directory, segment_seq, durable_seq, first_seq=1):
    """The manifest of a journal that crashed while entries after
    `durable_seq` were being written (never reported durable)."""
    _write_manifest(str(directory), Manifest(first_seq, segment_seq, durable_seq))


def quarantined(directory):
    """{name: bytes} of the files recovery moved to quarantine/."""
    folder = os.path.join(directory, "quarantine")
    if not os.path.isdir(folder):
        return {}
    return {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)}


def flip(path, offset):
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0x5A]))


# ------------------------------------------------------------- round trips

def test_round_trip_and_reopen(tmp_path):
    sizes = [0, 1, 7, 8, 9, 4095, 4096, 4097, 100_000]
    payloads = [payload_of(i, size) for i, size in enumerate(sizes)]
    with Journal.open(tmp_path) as journal:
        assert (journal.last_seq, journal.durable_seq, journal.first_seq) == (0, 0, 1)
        assert [journal.append(p) for p in payloads] == list(range(1, len(sizes) + 1))
        assert journal.durable_seq == 0
        assert read_all(journal) == []  # Not durable yet: not readable.
        assert journal.sync() == len(sizes)
        assert read_all(journal) == list(enumerate(payloads, 1))
    with Journal.open(tmp_path) as journal:
        assert journal.last_seq == journal.durable_seq == len(sizes)
        assert read_all(journal) == list(enumerate(payloads, 1))
        assert read_all(journal, from_seq=5) == list(enumerate(payloads, 1))[4:]
        assert read_all(journal, from_seq=len(sizes) + 1) == []
        # Appends continue after the last entry.
        assert journal.append(b"next") == len(sizes) + 1
        journal.sync()
    with Journal.open(tmp_path) as journal:
        assert read_all(journal)[-1] == (len(sizes) + 1, b"next")


def test_accepts_bytes_like_and_copies_it(tmp_path):
    with Journal.open(tmp_path) as journal:
        buffer = bytearray(b"abc")
        journal.append(buffer)
        buffer[0] = ord("X")  # Mutating after append must not change the entry.
        journal.append(memoryview(b"defg"))
        journal.sync()
        assert read_all(journal) == [(1, b"abc"), (2, b"defg")]


def test_payloads_are_zero_copy_read_only_views(tmp_path):
    with Journal.open(tmp_path) as journal:
        journal.append(b"\x01" * 80)
        journal.sync()
        [(seq, payload)] = list(journal.read())
        assert isinstance(payload, memoryview) and payload.readonly


def test_entry_bytes_max_is_enforced(tmp_path):
    with Journal.open(tmp_path, entry_bytes_max=100) as journal:
        journal.append(bytes(100))
        with pytest.raises(AssertionError, match="entry_bytes_max"):
            journal.append(bytes(101))
        assert journal.sync() == 1


def test_lowering_entry_bytes_max_never_truncates_an_intact_entry(tmp_path):
    write_journal(tmp_path, [b"small", bytes(500)])
    with pytest.raises(JournalCorrupt, match="exceeds entry_bytes_max"):
        Journal.open(tmp_path, entry_bytes_max=100)
    with Journal.open(tmp_path) as journal:
        assert journal.last_seq == 2


def test_second_open_of_the_same_directory_is_refused(tmp_path):
    with Journal.open(tmp_path):
        with pytest.raises(JournalError, match="open in another"):
            Journal.open(tmp_path)
    Journal.open(tmp_path).close()


def test_close_syncs_pending_entries(tmp_path):
    journal = Journal.open(tmp_path)
    journal.append(b"a")
    journal.close()
    journal.close()  # Idempotent.
    with Journal.open(tmp_path) as journal:
        assert read_all(journal) == [(1, b"a")]


# ---------------------------------------------------------- segment rolls

def test_seq_continuity_across_segment_rolls(tmp_path):
    payloads = [payload_of(seq) for seq in range(1, 201)]
    segment_bytes_max = 1024
    with Journal.open(tmp_path, segment_bytes_max=segment_bytes_max) as journal:
        for index, payload in enumerate(payloads):
            journal.append(payload)
            if index % 7 == 0:
                journal.sync()  # Rolls both inside and between batches.
    report = verify(tmp_path)
    assert report.ok and report.entries == 200
    assert len(report.segments) > 10
    seq_next = 1
    for segment in report.segments:
        assert os.path.basename(segment.file) == segment_name(segment.first_seq)
        assert segment.first_seq == seq_next and segment.entries >= 1
        assert segment.bytes <= segment_bytes_max or segment.entries == 1
        seq_next = segment.last_seq + 1
    with Journal.open(tmp_path, segment_bytes_max=segment_bytes_max) as journal:
        assert read_all(journal) == list(enumerate(payloads, 1))
        assert read_all(journal, 150) == list(enumerate(payloads, 1))[149:]


def test_an_entry_larger_than_a_segment_gets_a_segment_of_its_own(tmp_path):
    with Journal.open(tmp_path, segment_bytes_max=256) as journal:
        journal.append(b"small")
        journal.append(bytes(1000))
        journal.append(b"after")
        journal.sync()
        assert read_all(journal) == [(1, b"small"), (2, bytes(1000)), (3, b"after")]
    assert segments_in(tmp_path) == [segment_name(1), segment_name(2), segment_name(3)]


def test_remove_segments_before(tmp_path):
    with Journal.open(tmp_path, segment_bytes_max=200) as journal:
        for seq in range(1, 41):
            journal.append(payload_of(seq, 50))
        journal.sync()
        starts = [int(name[8:28]) for name in segments_in(tmp_path)]
        removed = journal.remove_segments_before(20)
        kept = [start for start in starts if start not in
                {int(os.path.basename(path)[8:28]) for path in removed}]
        # Every removed segment ends before 20; the first kept one holds 19 or less.
        assert kept[0] <= 20 and all(int(os.path.basename(p)[8:28]) < 20 for p in removed)
        assert journal.first_seq == kept[0]
        assert read_all(journal, 20)[0] == (20, payload_of(20, 50))
        with pytest.raises(ValueError, match="starts at seq"):
            list(journal.read(1))
        # Never the active segment, even when everything is older.
        journal.remove_segments_before(10**6)
        assert segments_in(tmp_path) == [segment_name(starts[-1])]
        journal.append(b"more")
        journal.sync()
    with Journal.open(tmp_path, segment_bytes_max=200) as journal:
        assert journal.first_seq == starts[-1] and journal.last_seq == 41
        assert read_all(journal, journal.first_seq)[-1] == (41, b"more")


# --------------------------------------------------- torn tails vs corruption

def test_torn_tail_at_every_byte_offset_of_the_last_entry(tmp_path, caplog):
    payloads = [payload_of(1, 10), payload_of(2, 20), payload_of(3, 37)]
    source = tmp_path / "source"
    write_journal(source, payloads)
    path = source / segment_name(1)
    last_offset, last_frame = entry_offsets(path)[-1]
    data = path.read_bytes()
    assert last_offset + last_frame == len(data)
    for size in range(last_offset, len(data)):
        directory = tmp_path / f"torn-{size}"
        directory.mkdir()
        (directory / segment_name(1)).write_bytes(data[:size])
        crash_manifest(directory, 1, 2)     # crashed while writing entry 3
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="engine.storage.journal"):
            journal = Journal.open(directory)
        with journal:
            assert read_all(journal) == list(enumerate(payloads[:2], 1))
            assert journal.last_seq == journal.durable_seq == 2
            if size > last_offset:
                assert f"byte offset {last_offset}" in caplog.text
                assert f"dropping {size - last_offset} bytes" in caplog.text
                assert str(directory / segment_name(1)) in caplog.text
                # Never deleted: the dropped bytes (up to the last non-zero one) are kept.
                kept = data[last_offset:size].rstrip(b"\0")
                assert quarantined(directory) == (
                    {f"{segment_name(1)}.{last_offset}.torn": kept} if kept else {})
            assert os.path.getsize(directory / segment_name(1)) == last_offset
            assert journal.append(b"again") == 3
        with Journal.open(directory) as journal:
            assert read_all(journal)[-1] == (3, b"again")


def test_torn_tail_inside_a_new_segment_header(tmp_path, caplog):
    source = tmp_path / "source"
    with Journal.open(source, segment_bytes_max=128) as journal:
        journal.append(bytes(90))
        journal.append(bytes(90))  # Rolls to segment 2.
    data = (source / segment_name(2)).read_bytes()
    for size in range(len(data)):
        directory = tmp_path / f"torn-{size}"
        shutil.copytree(source, directory)
        (directory / segment_name(2)).write_bytes(data[:size])
        crash_manifest(directory, 1, 1)     # crashed while rolling to segment 2
        with caplog.at_level(logging.WARNING, logger="engine.storage.journal"):
            with Journal.open(directory, segment_bytes_max=128) as journal:
                assert read_all(journal) == [(1, bytes(90))]
                assert journal.append(b"x") == 2  # Seq 2 again: it was never durable.
        with Journal.open(directory, segment_bytes_max=128) as journal:
            assert read_all(journal) == [(1, bytes(90)), (2, b"x")]


def test_garbage_tail_is_truncated(tmp_path):
    write_journal(tmp_path, [b"one", b"two"])
    path = tmp_path / segment_name(1)
    size = os.path.getsize(path)
    for garbage in [b"\xff" * 100, os.urandom(333), b"\x01" + bytes(4095)]:
        with open(path, "ab") as file:
            file.write(garbage)
        with Journal.open(tmp_path) as journal:
            assert read_all(journal) == [(1, b"one"), (2, b"two")]
        assert os.path.getsize(path) == size


def test_zero_tail_is_space_allocated_ahead(tmp_path):
    """Zeros after the last entry are a preallocated segment's unused space:
    kept, written into, and never reported as damage."""
    write_journal(tmp_path, [b"one", b"two"])
    path = tmp_path / segment_name(1)
    with open(path, "ab") as file:
        file.write(bytes(4096))
    size = os.path.getsize(path)
    assert verify(str(tmp_path)).ok
    with Journal.open(tmp_path) as journal:
        assert read_all(journal) == [(1, b"one"), (2, b"two")]
        journal.append(b"three")
        journal.sync()
    assert os.path.getsize(path) == size        # written into the zeros, not appended
    with Journal.open(tmp_path) as journal:
        assert read_all(journal) == [(1, b"one"), (2, b"two"), (3, b"three")]


def wait_for_spare(journal, timeout_s=10.0):
    """Until the spare is ready, if the journal has asked for one yet."""
    deadline = time.monotonic() + timeout_s
    while journal._spare.requested and not journal._spare.ready():
        assert time.monotonic() < deadline, "the spare segment was never filled"
        time.sleep(0.001)


def test_the_next_spare_is_made_only_once_the_active_segment_fills(tmp_path):
    """A fill's writeback slows the fsyncs that run meanwhile, so the next
    spare is not made as soon as the last was taken (right after every
    start), only once the active segment is SPARE_AHEAD_FRACTION full; while
    the journal appends (no spare taken yet) it is wanted at once."""
    from engine.storage.journal import SPARE_AHEAD_FRACTION
    segment_bytes = 64 * 1024
    with Journal.open(tmp_path, segment_bytes_max=segment_bytes, prealloc=True) as journal:
        assert journal._spare.requested         # nothing preallocated yet
        journal.append(b"first")
        journal.sync()                          # an appended segment: the spare is due
        wait_for_spare(journal)
        journal.append(b"second")
        journal.sync()                          # moves to the spare
        assert journal._active_preallocated and not journal._spare.requested
        filled = os.path.getsize(tmp_path / segments_in(tmp_path)[-1])
        assert filled == segment_bytes
    # Reopened with the active segment under a quarter full: no fill at start.
    with Journal.open(tmp_path, segment_bytes_max=segment_bytes, prealloc=True) as journal:
        assert journal._active_preallocated and not journal._spare.requested
        payload = bytes(1000)
        while journal._active_bytes + 1100 < segment_bytes * SPARE_AHEAD_FRACTION:
            journal.append(payload)
            journal.sync()
            assert not journal._spare.requested  # no fill under these fsyncs
        journal.append(payload)
        journal.append(payload)
        journal.sync()
        assert journal._spare.requested         # a quarter full: the next one is made
        wait_for_spare(journal)
        assert journal._spare.ready()
    with Journal.open(tmp_path, segment_bytes_max=segment_bytes, prealloc=True) as journal:
        assert journal._spare.requested         # past a quarter: made at start


def test_preallocated_segments(tmp_path):
    """prealloc: entries go into segments zero-filled ahead of time; the
    journal reads, verifies and reopens as any other."""
    segment_bytes = 16 * 1024
    payloads = [payload_of(seq, 500) for seq in range(1, 201)]   # about 6 segments
    with Journal.open(tmp_path, segment_bytes_max=segment_bytes, prealloc=True) as journal:
        for payload in payloads:
            wait_for_spare(journal)         # every roll finds its spare ready
            journal.append(payload)
            journal.sync()
        assert read_all(journal) == list(enumerate(payloads, 1))
    names = segments_in(tmp_path)
    assert len(names) >= 5
    # The first segment was created before any spare was ready; the journal
    # moved to a preallocated one as soon as there was one.
    sizes = [os.path.getsize(tmp_path / name) for name in names]
    assert all(size == segment_bytes for size in sizes[1:]), sizes
    assert "journal-spare.tmp" in os.listdir(tmp_path)
    report = verify(str(tmp_path))
    assert report.ok and report.entries == len(payloads)
    with Journal.open(tmp_path, segment_bytes_max=segment_bytes, prealloc=True) as journal:
        assert read_all(journal) == list(enumerate(payloads, 1))
        assert journal.append(b"more") == len(payloads) + 1
        journal.sync()
    assert os.path.getsize(tmp_path / segments_in(tmp_path)[-1]) == segment_bytes


def test_torn_write_in_a_preallocated_segment_is_truncated(tmp_path, caplog):
    """A crash mid-write leaves part of an entry before the zeros: a torn
    tail, dropped as in an appended segment."""
    segment_bytes = 16 * 1024
    with Journal.open(tmp_path, segment_bytes_max=segment_bytes, prealloc=True) as journal:
        journal.append(b"first")
        journal.sync()
        wait_for_spare(journal)
        journal.append(b"second")           # moves to the preallocated segment
        journal.sync()
    path = tmp_path / segments_in(tmp_path)[-1]
    assert os.path.getsize(path) == segment_bytes
    valid = max(offset + size for offset, size in entry_offsets_upto_zeros(path))
    with open(path, "r+b") as file:
        file.seek(valid)
        file.write(b"\x2a" * 20)          # half an entry header and a bit
    with caplog.at_level(logging.WARNING, logger="engine.storage.journal"):
        with Journal.open(tmp_path, segment_bytes_max=segment_bytes, prealloc=True) as journal:
            assert read_all(journal) == [(1, b"first"), (2, b"second")]
            assert journal.append(b"third") == 3
            journal.sync()
    assert "torn tail" in caplog.text
    with Journal.open(tmp_path) as journal:
        assert read_all(journal) == [(1, b"first"), (2, b"second"), (3, b"third")]


def entry_offsets_upto_zeros(path):
    data = open(path, "rb").read()
    offsets, offset = [], SEGMENT_HEADER_BYTES
    while offset + ENTRY_HEADER_BYTES <= len(data):
        size = int.from_bytes(data[offset + 4:offset + 8], "little")
        if data[offset:offset + ENTRY_HEADER_BYTES] == bytes(ENTRY_HEADER_BYTES):
            break
        frame = ENTRY_HEADER_BYTES + size + (-size % 8)
        offsets.append((offset, frame))
        offset += frame
    return offsets


def test_leftover_spare_is_removed_on_open(tmp_path):
    write_journal(tmp_path, [b"one"])
    (tmp_path / "journal-spare.tmp").write_bytes(b"half made")
    with Journal.open(tmp_path) as journal:
        assert read_all(journal) == [(1, b"one")]
    assert "journal-spare.tmp" not in os.listdir(tmp_path)


def test_flipped_byte_in_middle_entry_is_corruption(tmp_path):
    source = tmp_path / "source"
    write_journal(source, [payload_of(1, 30), payload_of(2, 30), payload_of(3, 30)])
    path = source / segment_name(1)
    offsets = entry_offsets(path)
    middle_offset, middle_frame = offsets[1]
    for at in range(middle_offset, middle_offset + middle_frame):
        directory = tmp_path / f"flip-{at}"
        shutil.copytree(source, directory)
        flip(directory / segment_name(1), at)
        before = (directory / segment_name(1)).read_bytes()
        with pytest.raises(JournalCorrupt) as caught:
            Journal.open(directory)
        message = str(caught.value)
        assert str(directory / segment_name(1)) in message
        assert f"byte offset {middle_offset}" in message
        assert "scanpay journal verify" in message and "backup" in message
        assert caught.value.offset == middle_offset
        assert (directory / segment_name(1)).read_bytes() == before  # Nothing dropped.
        with pytest.raises(JournalCorrupt):  # The failed open released its lock.
            Journal.open(directory)


def test_damage_in_a_closed_segment_is_corruption_even_at_its_end(tmp_path):
    with Journal.open(tmp_path, segment_bytes_max=128) as journal:
        for seq in range(1, 5):
            journal.append(bytes(90))
    assert len(segments_in(tmp_path)) == 4
    path = tmp_path / segment_name(2)
    with open(path, "r+b") as file:
        file.truncate(os.path.getsize(path) - 1)
    with pytest.raises(JournalCorrupt, match="closed segment"):
        Journal.open(tmp_path, segment_bytes_max=128)


def test_missing_middle_segment_is_a_gap(tmp_path):
    with Journal.open(tmp_path, segment_bytes_max=128) as journal:
        for seq in range(1, 5):
            journal.append(bytes(90))
    os.unlink(tmp_path / segment_name(2))
    with pytest.raises(JournalCorrupt, match="gap") as caught:
        Journal.open(tmp_path, segment_bytes_max=128)
    assert segment_name(3) in str(caught.value)
    report = verify(tmp_path)
    assert report.corrupt and report.problems[0].file.endswith(segment_name(3))


def test_valid_checksum_with_wrong_seq_is_corruption(tmp_path):
    write_journal(tmp_path / "a", [b"first", b"second"])
    write_journal(tmp_path / "b", [b"x"] * 5)
    # Splice an entry with seq 5 after seq 2: checksums pass, the seq does not.
    entry = (tmp_path / "b" / segment_name(1)).read_bytes()[SEGMENT_HEADER_BYTES + 4 * 24:]
    with open(tmp_path / "a" / segment_name(1), "ab") as file:
        file.write(entry)
    with pytest.raises(JournalCorrupt, match="seq 5, expected 3"):
        Journal.open(tmp_path / "a")


def test_flipped_byte_in_last_segment_header_with_entries_is_corruption(tmp_path):
    write_journal(tmp_path, [b"a", b"b"])
    flip(tmp_path / segment_name(1), 20)
    with pytest.raises(JournalCorrupt, match="valid entry"):
        Journal.open(tmp_path)


def test_verify_reports_and_modifies_nothing(tmp_path):
    with Journal.open(tmp_path, segment_bytes_max=128) as journal:
        for seq in range(1, 4):
            journal.append(bytes(90))
    report = verify(tmp_path)
    assert report.ok and [s.entries for s in report.segments] == [1, 1, 1]
    assert [(s.first_seq, s.last_seq) for s in report.segments] == [(1, 1), (2, 2), (3, 3)]
    last = tmp_path / segment_name(3)
    with open(last, "ab") as file:
        file.write(b"\x01\x02\x03")
    before = {name: (tmp_path / name).read_bytes() for name in segments_in(tmp_path)}
    report = verify(tmp_path)
    assert [p.kind for p in report.problems] == ["torn_tail"] and not report.corrupt
    flip(tmp_path / segment_name(1), SEGMENT_HEADER_BYTES + 20)
    before[segment_name(1)] = (tmp_path / segment_name(1)).read_bytes()
    report = verify(tmp_path)
    assert [p.kind for p in report.problems] == ["corrupt", "torn_tail"]
    assert report.problems[0].offset == SEGMENT_HEADER_BYTES
    assert before == {name: (tmp_path / name).read_bytes() for name in segments_in(tmp_path)}


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=8),
       segment_bytes_max=st.integers(64, 700), data=st.data())
def test_random_damage_never_yields_a_wrong_payload(sizes, segment_bytes_max, data):
    """A truncation or a byte flip anywhere, after a clean close or in the
    image a crash leaves: every payload read is exact; the only loss allowed
    is a tail beyond the durable mark; anything else is JournalCorrupt."""
    directory = tempfile.mkdtemp()
    try:
        payloads = [payload_of(seq, size) for seq, size in enumerate(sizes, 1)]
        crashed = data.draw(st.booleans())
        with Journal.open(directory, segment_bytes_max=segment_bytes_max) as journal:
            for payload in payloads:
                journal.append(payload)
                if data.draw(st.booleans()):
                    journal.sync()
            journal.sync()
            if crashed:     # the files as they are now; the manifest as last written
                image = os.path.join(directory, "crash")
                os.mkdir(image)
                for name in segments_in(directory) + [MANIFEST_NAME]:
                    shutil.copy(os.path.join(directory, name), image)
        if crashed:
            directory = image
        manifest = verify(directory).manifest
        mark = manifest.durable_seq
        names = segments_in(directory)
        last_path = os.path.join(directory, names[-1])
        last_first_seq = int(names[-1][8:28])
        last_entries = entry_offsets(last_path)
        assert last_entries  # Rolls only ever start a segment with an entry.
        truncate = data.draw(st.booleans())
        if truncate:
            size = data.draw(st.integers(0, os.path.getsize(last_path) - 1))
            with open(last_path, "r+b") as file:
                file.truncate(size)
            # Entries wholly below the cut survive; the rest are the tail.
            surviving = last_first_seq - 1 + sum(
                1 for offset, frame in last_entries if offset + frame <= size)
            header_cut = size < SEGMENT_HEADER_BYTES and last_first_seq <= manifest.segment_seq
        else:
            name = data.draw(st.sampled_from(names))
            path = os.path.join(directory, name)
            at = data.draw(st.integers(0, os.path.getsize(path) - 1))
            in_last_entry = name == names[-1] and at >= last_entries[-1][0]
            flip(path, at)
        try:
            with Journal.open(directory, segment_bytes_max=segment_bytes_max) as journal:
                got = read_all(journal)
        except JournalCorrupt:
            # Cutting a torn tail beyond the mark is never refused.
            assert not truncate or surviving < mark or header_cut
            event("corrupt")
            return
        event("intact" if len(got) == len(payloads) else "tail dropped")
        seqs = [seq for seq, _ in got]
        assert seqs == list(range(1, len(seqs) + 1))
        assert len(got) >= mark             # nothing reported durable is ever lost
        for seq, payload in got:
            assert payload == payloads[seq - 1]
        if truncate:
            assert len(got) == surviving
        else:
            # A flip may only cost the entry it hit, and only if that was the last.
            assert len(got) == len(payloads) or (in_last_entry and len(got) == len(payloads) - 1)
    finally:
        shutil.rmtree(directory.removesuffix("/crash"))


# ------------------------------------------------------------- group commit

# Group commit is the engine's (`Engine._request_sync`, engine/core/engine.py):
# its sync thread calls `Journal.sync` for every command journaled meanwhile.

def wallets_command(eng, user):
    """Journals and applies one WALLETS command as the server's writer does:
    (its journal seq, the future of the fsync that covers it)."""
    _, durable = eng.write_command(MAP_OPS["WALLETS"].code,
                                   msgspec.msgpack.encode({"users": [user]}))
    return eng.storage.journal.last_seq, durable


def wallets_found(datadir, users):
    with Engine(datadir) as eng:
        found = eng.call("BALANCES", {"users": list(users)})["users"]
    return [user for user, entry in zip(users, found) if entry["status"] == 0]


def test_commands_journaled_during_an_fsync_share_the_next_one(tmp_path):
    fs = GatedFs()
    callers = 64
    datadir = str(tmp_path / "data")
    eng = Engine(datadir, fs=fs)
    journal = eng.storage.journal
    fsyncs_before, count_before = fs.calls["fdatasync"], journal.fsync_count
    gate = fs.hold_next()               # the first fsync waits: the others pile up
    pending = [wallets_command(eng, user) for user in range(1, callers + 1)]
    gate.set()
    for seq, durable in pending:
        assert durable.result(timeout=10) >= seq
    assert journal.durable_seq == journal.last_seq
    fsyncs = fs.calls["fdatasync"] - fsyncs_before
    seqs = [seq for seq, _ in pending]
    assert seqs == list(range(seqs[0], seqs[0] + callers))
    assert 1 <= fsyncs < callers // 4, fsyncs
    assert journal.fsync_count - count_before == fsyncs
    eng.close()
    with Journal.open(datadir) as reopened:
        assert [seq for seq, _ in reopened.read(seqs[0])] == seqs
    assert wallets_found(datadir, range(1, callers + 1)) == list(range(1, callers + 1))


def test_appends_after_an_inflight_fsync_started_wait_for_the_next(tmp_path):
    fs = GatedFs()
    eng = Engine(str(tmp_path / "data"), fs=fs)
    journal = eng.storage.journal
    durable_before, count_before = journal.durable_seq, journal.fsync_count
    gate = fs.hold_next()
    seq_a, task_a = wallets_command(eng, 1)
    assert fs.entered.wait(10)          # a's fsync is in flight
    seq_b, task_b = wallets_command(eng, 2)
    seq_c, task_c = wallets_command(eng, 3)
    time.sleep(0.01)
    assert not task_a.done() and not task_b.done()
    assert journal.durable_seq == durable_before
    gate.set()
    assert task_a.result(timeout=10) == seq_a  # Its fsync covered only a.
    assert task_b.result(timeout=10) >= seq_b and task_c.result(timeout=10) >= seq_c
    assert journal.fsync_count - count_before == 2  # b and c shared the second one.
    # A cancelled waiter does not cancel the shared fsync.
    gate = fs.hold_next()
    seq_d, waiter = wallets_command(eng, 4)
    seq_e, other = wallets_command(eng, 5)
    assert fs.entered.wait(10)
    assert not waiter.cancel()
    gate.set()
    assert waiter.result(timeout=10) >= seq_d
    assert other.result(timeout=10) >= seq_e == journal.last_seq
    eng.close()


def test_a_sync_with_nothing_pending_returns_at_once(tmp_path):
    fs = FaultyFs()
    with Engine(str(tmp_path / "data"), fs=fs) as eng:
        durable = eng.storage.journal.durable_seq
        before = fs.calls["fdatasync"]
        assert eng.sync_pending().result(timeout=10) == durable
        seq, future = wallets_command(eng, 1)
        assert future.result(timeout=10) == seq
        assert eng.sync_pending().result(timeout=10) == seq
        assert fs.calls["fdatasync"] == before + 1
    with Journal.open(tmp_path / "journal-only", fs=fs) as journal:
        before = fs.calls["fdatasync"]
        assert journal.sync() == 0
        journal.append(b"x")
        assert journal.sync() == 1
        assert journal.sync() == 1
        assert fs.calls["fdatasync"] == before + 1


# ------------------------------------------------------------------ failures

def test_fdatasync_eio_drops_the_pending_entries_then_recover(tmp_path):
    """Fail-stop: the entries that were not durable when the fsync failed are
    dropped at once (their callers are told `unavailable`) and never written
    later, even once the storage works again; the journal goes on from the
    durable seq."""
    fs = FaultyFs()
    journal = Journal.open(tmp_path, fs=fs)
    for seq in range(1, 4):
        journal.append(payload_of(seq))
    assert journal.sync() == 3
    journal.append(payload_of(4))
    journal.append(payload_of(5))
    fs.fail("fdatasync", errno.EIO)
    with pytest.raises(JournalUnavailable) as caught:
        journal.sync()
    message = str(caught.value)
    assert "EIO" in message and "after seq 3" in message and "dropped" in message
    assert caught.value.retryable
    assert journal.failed and journal.durable_seq == 3
    assert journal.last_seq == 3 and journal.dropped_count == 2
    with pytest.raises(JournalUnavailable):
        journal.append(b"refused")
    with pytest.raises(JournalUnavailable):
        journal.sync()
    assert [seq for seq, _ in journal.read()] == [1, 2, 3]  # Only what is durable.
    # Still broken: recover fails, stays failed, reports nothing new.
    with pytest.raises(JournalUnavailable):
        journal.recover()
    assert journal.failed and journal.durable_seq == 3
    fs.heal()
    assert journal.recover() == 3
    assert not journal.failed and journal.last_seq == 3
    assert journal.append(b"after") == 4
    assert journal.sync() == 4
    journal.close()
    with Journal.open(tmp_path) as journal:
        assert read_all(journal) == [(seq, payload_of(seq)) for seq in range(1, 4)] + [
            (4, b"after")]
    assert not os.path.exists(tmp_path / "journal-probe.tmp")


def test_enospc_on_a_partial_write_is_cut_back_at_once(tmp_path):
    fs = FaultyFs()
    journal = Journal.open(tmp_path, fs=fs)
    journal.append(b"durable")
    journal.sync()
    durable_bytes = os.path.getsize(tmp_path / segment_name(1))
    for seq in range(2, 12):
        journal.append(payload_of(seq, 5000))
    fs.fail("pwritev", errno.ENOSPC)
    fs.partial_then_fail = True
    with pytest.raises(JournalUnavailable, match="ENOSPC"):
        journal.sync()
    assert journal.durable_seq == journal.last_seq == 1
    # Half a batch reached the file; the failure cut it back to the durable prefix.
    assert os.path.getsize(tmp_path / segment_name(1)) == durable_bytes
    # The disk is still full: recover's probe write fails.
    with pytest.raises(JournalUnavailable, match="ENOSPC"):
        journal.recover()
    fs.heal()
    assert journal.recover() == 1
    journal.close()
    with Journal.open(tmp_path) as journal:
        assert read_all(journal) == [(1, b"durable")]
    assert verify(tmp_path).ok


def test_failure_across_a_segment_roll_then_recover(tmp_path):
    fs = FaultyFs()
    journal = Journal.open(tmp_path, fs=fs, segment_bytes_max=256)
    journal.append(bytes(100))
    journal.sync()
    for seq in range(2, 10):
        journal.append(payload_of(seq, 100))
    # The roll's fdatasync of segment 1 succeeds; a later one fails.
    fs.fail("fdatasync", errno.EIO, after=2)
    with pytest.raises(JournalUnavailable):
        journal.sync()
    assert journal.durable_seq == 1
    # The segments rolled to for dropped entries are gone at once.
    assert segments_in(tmp_path) == [segment_name(1)]
    fs.heal()
    fs.fail("unlink", errno.EIO)  # The storage is still flaky during recovery.
    with pytest.raises(JournalUnavailable):
        journal.recover()
    fs.heal()
    assert journal.recover() == 1
    for seq in range(2, 6):
        journal.append(payload_of(seq + 100, 100))
    assert journal.sync() == 5
    journal.close()
    with Journal.open(tmp_path, segment_bytes_max=256) as journal:
        assert read_all(journal) == [(1, bytes(100))] + [
            (seq, payload_of(seq + 100, 100)) for seq in range(2, 6)]
    assert verify(tmp_path).ok


def test_failure_on_the_very_first_sync_then_recover(tmp_path):
    fs = FaultyFs()
    journal = Journal.open(tmp_path, fs=fs)
    journal.append(b"first")
    fs.fail("fsync", errno.EIO)  # The directory fsync after creating the segment.
    with pytest.raises(JournalUnavailable):
        journal.sync()
    assert journal.durable_seq == 0
    fs.heal()
    assert journal.recover() == 0
    assert segments_in(tmp_path) == []
    assert journal.append(b"again") == 1
    journal.close()
    with Journal.open(tmp_path) as journal:
        assert read_all(journal) == [(1, b"again")]


def test_a_failed_group_commit_reaches_every_waiter(tmp_path, monkeypatch):
    monkeypatch.setattr(durability, "RECOVER_INTERVAL_MS", 0)   # every write retries
    fs = GatedFs()
    datadir = str(tmp_path / "data")
    eng = Engine(datadir, fs=fs)
    journal = eng.storage.journal
    seq_ok, future = wallets_command(eng, 1)
    assert future.result(timeout=10) == seq_ok
    gate = fs.hold_next()
    seq_held, held = wallets_command(eng, 2)
    assert fs.entered.wait(10)
    behind = [wallets_command(eng, user)[1] for user in range(3, 13)]
    fs.fail("fdatasync", errno.EIO)
    gate.set()
    assert held.result(timeout=10) == seq_held
    for waiter in behind:
        with pytest.raises(Unavailable):
            waiter.result(timeout=10)
    assert journal.durable_seq == seq_held
    fs.heal()
    eng.call("WALLETS", {"users": [100]})   # the journal recovers, goes on after seq_held
    assert eng.sync_pending().result(timeout=10) == journal.durable_seq == seq_held + 1
    eng.close()
    users = [1, 2, 100] + list(range(3, 13))
    assert wallets_found(datadir, users) == [1, 2, 100]


def test_crash_while_failed_keeps_only_the_durable_prefix(tmp_path):
    """Closed (or killed) while the storage still fails: the entry that was
    not durable was cut off at the failure, so a restart does not find it
    (though the page cache held it)."""
    fs = FaultyFs()
    journal = Journal.open(tmp_path, fs=fs)
    journal.append(b"one")
    journal.sync()
    journal.append(b"two")
    fs.fail("fdatasync", errno.EIO)
    with pytest.raises(JournalUnavailable):
        journal.sync()
    # As a SIGKILL would leave it (no close; the kernel drops the lock).
    journal._release_dir()
    with Journal.open(tmp_path) as reopened:
        assert read_all(reopened) == [(1, b"one")]
    journal.close()
    with Journal.open(tmp_path) as reopened:
        assert read_all(reopened) == [(1, b"one")]


def test_short_writes_are_completed(tmp_path):
    fs = FaultyFs()
    fs.write_bytes_max = 50
    payloads = [payload_of(seq, 1000 + seq) for seq in range(1, 30)]
    with Journal.open(tmp_path, fs=fs, segment_bytes_max=8000) as journal:
        for payload in payloads:
            journal.append(payload)
        journal.sync()
    with Journal.open(tmp_path) as journal:
        assert read_all(journal) == list(enumerate(payloads, 1))


# ------------------------------------- the durable mark: never delete, never skip

def crash_image(journal, image):
    """The files a crash would leave now (journal still open): the segments
    as written and the manifest as last written."""
    os.mkdir(image)
    for name in segments_in(journal.dir) + [MANIFEST_NAME]:
        shutil.copy(os.path.join(journal.dir, name), image)
    return image


def test_foreign_file_under_a_segment_name_is_refused_and_kept(tmp_path):
    """Random bytes named like a segment used to be a "torn tail at byte
    offset 0": deleted, and the journal started empty."""
    garbage = os.urandom(100_000)
    path = tmp_path / segment_name(1)
    path.write_bytes(garbage)
    with pytest.raises(JournalCorrupt, match="foreign file under a segment name") as caught:
        Journal.open(tmp_path)
    assert caught.value.file == str(path) and caught.value.offset == 0
    assert path.read_bytes() == garbage
    assert verify(tmp_path).corrupt


def test_a_torn_segment_header_is_quarantined_not_deleted(tmp_path, caplog):
    with Journal.open(tmp_path, segment_bytes_max=128) as journal:
        journal.append(bytes(90))
        journal.sync()
        image = crash_image(journal, tmp_path / "crash")
        journal.append(bytes(90))           # rolls to segment 2
    # The crash came while segment 2 got its header: 20 of its 32 bytes.
    header = (tmp_path / segment_name(2)).read_bytes()[:SEGMENT_HEADER_BYTES]
    (image / segment_name(2)).write_bytes(header[:20])
    with caplog.at_level(logging.WARNING, logger="engine.storage.journal"):
        with Journal.open(image, segment_bytes_max=128) as journal:
            assert read_all(journal) == [(1, bytes(90))]
    assert segment_name(2) not in segments_in(image)
    # Kept up to the last non-zero byte (the zeros after it carry nothing).
    assert quarantined(image) == {f"{segment_name(2)}.0.torn": header[:20].rstrip(b"\0")}
    assert "dropping 20 bytes (0 entries" in caplog.text
    assert str(image / "quarantine") in caplog.text


@pytest.mark.parametrize("crashed", [False, True])
def test_deleting_the_last_segment_is_refused(tmp_path, crashed):
    """Without a snapshot, a deleted last segment used to leave a shorter
    journal that started silently: every entry in it was lost."""
    with Journal.open(tmp_path / "data", segment_bytes_max=1024) as journal:
        for seq in range(1, 21):            # 8 entries a segment: 1.., 9.., 17..20
            journal.append(payload_of(seq, 100))
            journal.sync()
        if crashed:     # the mark was last rewritten after the roll, not at close
            directory = crash_image(journal, tmp_path / "crash")
    directory = tmp_path / "crash" if crashed else tmp_path / "data"
    names = segments_in(directory)
    assert len(names) >= 3
    os.unlink(directory / names[-1])
    with pytest.raises(JournalCorrupt, match="missing") as caught:
        Journal.open(directory, segment_bytes_max=1024)
    assert caught.value.file == str(directory / names[-1])
    assert verify(directory).corrupt


def test_retention_moves_the_first_seq_so_only_a_missing_first_segment_after_it_is_refused(
        tmp_path):
    with Journal.open(tmp_path, segment_bytes_max=128) as journal:
        for seq in range(1, 6):
            journal.append(bytes(90))
            journal.sync()
        assert [os.path.basename(p) for p in journal.remove_segments_before(3)] == \
            [segment_name(1), segment_name(2)]
    with Journal.open(tmp_path, segment_bytes_max=128) as journal:    # retention: fine
        assert journal.first_seq == 3 and read_all(journal, 3)[-1][0] == 5
    os.unlink(tmp_path / segment_name(3))
    with pytest.raises(JournalCorrupt, match="must start at seq 3"):
        Journal.open(tmp_path, segment_bytes_max=128)


def test_a_lost_manifest_is_refused(tmp_path):
    write_journal(tmp_path, [b"one", b"two"])
    os.unlink(tmp_path / MANIFEST_NAME)
    with pytest.raises(JournalCorrupt, match="manifest is missing"):
        Journal.open(tmp_path)
    (tmp_path / MANIFEST_NAME).write_bytes(os.urandom(48))
    with pytest.raises(JournalCorrupt, match="manifest checksum"):
        Journal.open(tmp_path)


def test_flipped_byte_in_the_last_acknowledged_entry_is_corruption(tmp_path):
    """It used to be dropped as "a torn tail that was never acknowledged"."""
    write_journal(tmp_path / "data", [payload_of(seq, 800) for seq in range(1, 4)])
    last_offset, last_frame = entry_offsets(tmp_path / "data" / segment_name(1))[-1]
    for at in (last_offset + 100, last_offset + last_frame - 20, last_offset + 2):
        directory = tmp_path / f"flip-{at}"
        shutil.copytree(tmp_path / "data", directory)
        flip(directory / segment_name(1), at)
        before = (directory / segment_name(1)).read_bytes()
        with pytest.raises(JournalCorrupt) as caught:
            Journal.open(directory)
        assert caught.value.offset == last_offset
        assert "seq 3" in str(caught.value)
        assert (directory / segment_name(1)).read_bytes() == before


def test_flipped_byte_in_a_whole_last_entry_is_corruption_even_after_a_crash(tmp_path):
    """Without the mark (a crash before the entry's segment was named), the
    shape decides: every byte of the entry is there, so it was written in
    full and damaged afterwards, not torn."""
    write_journal(tmp_path, [payload_of(seq, 800) for seq in range(1, 4)])
    crash_manifest(tmp_path, 1, 2)
    last_offset, _ = entry_offsets(tmp_path / segment_name(1))[-1]
    flip(tmp_path / segment_name(1), last_offset + 300)
    with pytest.raises(JournalCorrupt, match="every byte of the entry is present"):
        Journal.open(tmp_path)


def test_zeroed_last_entry_is_corruption(tmp_path):
    """Zeros look like space never written: it used to be dropped without
    even a warning. The mark says the entry was durable."""
    write_journal(tmp_path, [payload_of(seq, 100) for seq in range(1, 4)])
    last_offset, last_frame = entry_offsets(tmp_path / segment_name(1))[-1]
    with open(tmp_path / segment_name(1), "r+b") as file:
        file.seek(last_offset)
        file.write(bytes(last_frame))
    with pytest.raises(JournalCorrupt, match="ends at seq 2, but entries up to seq 3"):
        Journal.open(tmp_path)
    report = verify(tmp_path)
    assert report.corrupt and report.manifest.durable_seq == 3


def test_truncated_active_segment_is_refused_once_the_mark_covers_it(tmp_path):
    write_journal(tmp_path, [payload_of(seq, 100) for seq in range(1, 4)])
    last_offset, _ = entry_offsets(tmp_path / segment_name(1))[-1]
    os.truncate(tmp_path / segment_name(1), last_offset + 10)
    with pytest.raises(JournalCorrupt, match="reported durable"):
        Journal.open(tmp_path)
    assert os.path.getsize(tmp_path / segment_name(1)) == last_offset + 10


def test_spare_is_removed_when_the_disk_fills(tmp_path, monkeypatch, caplog):
    """ENOSPC while zero-filling used to leave the half-made spare behind,
    holding the space the journal needed."""
    real_pwrite = os.pwrite
    chunks = [0]

    def pwrite(fd, data, offset):
        chunks[0] += 1
        if chunks[0] > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    with caplog.at_level(logging.WARNING, logger="engine.storage.journal"):
        journal = Journal.open(tmp_path, segment_bytes_max=1 << 20, prealloc=True)
        journal._spare._thread.join(timeout=10)
        assert not journal._spare._thread.is_alive()
        assert chunks[0] == 4
        assert "journal-spare.tmp" not in os.listdir(tmp_path)
        journal.append(b"still works")
        journal.sync()
        journal.close()
    assert "No space left" in caplog.text


def test_spare_is_not_made_while_the_disk_cannot_hold_it(tmp_path, monkeypatch, caplog):
    real_statvfs = os.statvfs

    class Full:
        def __init__(self, path):
            stat = real_statvfs(path)
            self.f_frsize = stat.f_frsize
            self.f_bavail = (1 << 20) // stat.f_frsize     # 1 MiB free

    monkeypatch.setattr(os, "statvfs", Full)
    with caplog.at_level(logging.WARNING, logger="engine.storage.journal"):
        with Journal.open(tmp_path, segment_bytes_max=1 << 20, prealloc=True) as journal:
            journal._spare._thread.join(timeout=10)
            assert "journal-spare.tmp" not in os.listdir(tmp_path)
            journal.append(b"appended")
    assert "not preallocating" in caplog.text


def test_an_entry_with_an_unwritten_sector_is_a_torn_write(tmp_path, caplog):
    """The shape rule must not refuse a real torn write: an entry whose
    header made it to disk but one of whose sectors did not (still zero, as
    preallocated) is dropped to quarantine/, not refused."""
    with Journal.open(tmp_path / "data") as journal:
        journal.append(payload_of(1, 100))
        journal.sync()
        directory = crash_image(journal, tmp_path / "crash")
    path = directory / segment_name(1)
    with Journal.open(tmp_path / "whole") as other:     # the bytes entry 2 would have had
        other.append(payload_of(1, 100))
        other.append(payload_of(2, 3000))
    offset, frame = entry_offsets(tmp_path / "whole" / segment_name(1))[-1]
    entry = bytearray((tmp_path / "whole" / segment_name(1)).read_bytes()[offset:offset + frame])
    sector = 512 - offset % 512 + 512                   # file offset of a whole sector inside
    entry[sector:sector + 512] = bytes(512)
    with open(path, "ab") as file:
        file.write(bytes(entry) + bytes(8192))
    with caplog.at_level(logging.WARNING, logger="engine.storage.journal"):
        with Journal.open(directory) as journal:
            assert read_all(journal) == [(1, payload_of(1, 100))]
    assert "torn tail" in caplog.text and "1 entries from seq 2" in caplog.text
    kept, = quarantined(directory).values()
    assert kept == bytes(entry).rstrip(b"\0")


# ------------------------------------------------------------- lone writes

def preallocated_journal(directory, segment_bytes=64 * 1024):
    """A journal writing into a preallocated segment, two entries durable
    (the manifest rewritten after the roll: a lone write refuses until then)."""
    journal = Journal.open(directory, segment_bytes_max=segment_bytes, prealloc=True)
    journal.append(b"first")
    journal.sync()
    wait_for_spare(journal)
    journal.append(b"second")
    journal.sync()                          # moves to the spare
    assert journal._active_preallocated
    journal.append(b"x")
    assert journal.lone_write(1 << 16, 64, wait=lambda: None) is None   # the manifest is due
    assert journal.sync() == 3
    return journal


def make(write) -> int:
    """What the lone-sync thread does with a LoneWrite (ext/outlet.pyx Syncer)."""
    os.pwritev(write.fd, write.buffers, write.offset)
    os.fdatasync(write.fd)
    return 0


def test_a_lone_write_made_elsewhere_is_durable_once_its_outcome_is_taken(tmp_path):
    """Journal.lone_write: the pending entries as one pwritev + fdatasync that
    another thread makes; durable_seq moves only once `lone_written` has
    the outcome, and the entries read back after a reopen."""
    journal = preallocated_journal(tmp_path)
    journal.append(b"four")
    journal.append(payload_of(5, 700))
    write = journal.lone_write(1 << 16, 64, wait=lambda: None)
    assert (write.target, write.entries) == (5, 2)
    assert journal.lone_write(1 << 16, 64, wait=lambda: None) is None   # one at a time
    assert make(write) == 0
    assert journal.durable_seq == 3             # not before its outcome is taken
    assert journal.lone_written(write, 0) == 5
    assert journal.lone_written(write, 0) == 5  # taken again: the same answer
    assert journal.durable_seq == 5
    journal.append(b"six")
    assert journal.sync() == 6                  # the journal's own writes go on after it
    journal.close()
    with Journal.open(tmp_path) as journal:
        assert read_all(journal) == [(1, b"first"), (2, b"second"), (3, b"x"), (4, b"four"),
                                     (5, payload_of(5, 700)), (6, b"six")]


def test_a_sync_while_a_lone_write_is_out_waits_for_it_first(tmp_path):
    """The journal does no I/O of its own while a lone write is out: `sync`
    first calls the write's `wait` (which takes its outcome), then writes
    what was appended after it, after it in the file."""
    journal = preallocated_journal(tmp_path)
    journal.append(b"four")
    waited = []

    def wait():
        waited.append(True)
        journal.lone_written(write, make(write))
    write = journal.lone_write(1 << 16, 64, wait)
    journal.append(b"five")                     # appended while the write is out
    assert journal.sync() == 5 and waited == [True]
    journal.close()
    with Journal.open(tmp_path) as journal:
        assert [p for _s, p in read_all(journal)] == [b"first", b"second", b"x", b"four",
                                                      b"five"]


def test_a_failed_lone_write_fails_the_journal_as_a_failed_sync(tmp_path):
    """An errno from the lone write's pwritev or fdatasync: the journal fails
    (entries after the durable one dropped, the file cut back, appends
    refused) and the outcome is JournalUnavailable, as from `sync`."""
    journal = preallocated_journal(tmp_path)
    journal.append(b"four")
    write = journal.lone_write(1 << 16, 64, wait=lambda: None)
    os.pwritev(write.fd, write.buffers, write.offset)    # written, never synced
    journal.append(b"five")                     # appended meanwhile: dropped too
    with pytest.raises(JournalUnavailable, match="EIO"):
        journal.lone_written(write, errno.EIO)
    with pytest.raises(JournalUnavailable):
        journal.lone_written(write, errno.EIO)  # the same answer again
    assert journal.failed and journal.durable_seq == 3 and journal.last_seq == 3
    assert journal.dropped_count == 2
    with pytest.raises(JournalUnavailable):
        journal.append(b"refused")
    assert journal.lone_write(1 << 16, 64, wait=lambda: None) is None    # failed: none
    assert journal.recover() == 3
    assert journal.append(b"after") == 4 and journal.sync() == 4
    journal.close()
    with Journal.open(tmp_path) as journal:
        assert [p for _s, p in read_all(journal)] == [b"first", b"second", b"x", b"after"]


def test_a_lone_write_is_refused_whenever_a_sync_would_do_more(tmp_path):
    """None (the sync thread's `sync` instead): nothing pending, a test `fs`,
    too many bytes or buffers, a segment roll due."""
    journal = preallocated_journal(tmp_path, segment_bytes=16 * 1024)
    assert journal.lone_write(1 << 16, 64, wait=lambda: None) is None    # nothing pending
    journal.append(payload_of(4, 5000))
    assert journal.lone_write(4096, 64, wait=lambda: None) is None       # too big
    assert journal.lone_write(1 << 16, 1, wait=lambda: None) is None     # too many buffers
    journal.append(payload_of(5, 12000))
    assert journal.lone_write(1 << 16, 64, wait=lambda: None) is None    # a roll is due
    assert journal.sync() == 5
    journal.close()
    faulty = Journal.open(tmp_path / "faulty", fs=FaultyFs())
    faulty.append(b"x")
    assert faulty.lone_write(1 << 16, 64, wait=lambda: None) is None     # a test fs
    faulty.close()
