"""Snapshots: round trips of any numpy dtype, checksums, fallback to an older
snapshot, crash leftovers and retention."""
import logging
import os
import shutil
import tempfile
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from engine.protocol.records import PAY_RECORD
from engine.storage.snapshot import (
    CHUNK_BYTES, SNAPSHOT_HEADER_BYTES, SnapshotCorrupt, list_snapshots, load_latest,
    load_snapshot, remove_snapshots_before, snapshot_name, write_snapshot,
)

ALIGNED = np.dtype([("flag", "u1"), ("value", "<i8"), ("small", "<u2")], align=True)
NESTED = np.dtype([("id", "<u8"), ("inner", [("xy", "<f8", (2, 3)), ("tag", "S5")])])


def sample_arrays(seed=0):
    rng = np.random.default_rng(seed)
    pay = np.zeros(1000, PAY_RECORD)
    pay["id"] = np.arange(1, 1001)
    pay["amount"] = rng.integers(-10**14, 10**14, 1000)
    pay["coupons"] = rng.integers(0, 2**63, (1000, 4), dtype=np.uint64)
    aligned = np.zeros(7, ALIGNED)
    aligned["value"] = rng.integers(-100, 100, 7)
    nested = np.zeros(3, NESTED)
    nested["inner"]["xy"] = rng.random((3, 2, 3))
    nested["inner"]["tag"] = [b"a", b"bb", b"ccccc"]
    return {
        "pay": pay,
        "aligned": aligned,
        "nested": nested,
        "big_endian": np.arange(10, dtype=">i4"),
        "matrix": rng.integers(0, 1000, (17, 5)).astype(np.int64),
        "bools": rng.random(33) < 0.5,
        "scalar": np.array(42, dtype=np.uint64),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "empty_records": np.zeros(0, PAY_RECORD),
        "strided": np.arange(40, dtype=np.int64)[::3],  # Not contiguous.
        "fortran": np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4)),
    }


def assert_same(loaded, original):
    assert loaded.keys() == original.keys()
    for name, array in original.items():
        got = loaded[name]
        assert got.dtype == array.dtype, name
        assert got.shape == array.shape, name
        assert np.ascontiguousarray(array).tobytes() == got.tobytes(), name
        assert got.flags.writeable and got.flags.c_contiguous, name


def test_round_trip_of_every_kind_of_array(tmp_path):
    arrays = sample_arrays()
    meta = {"engine": "scanpay", "seq_applied": 12, "ids": [1, 2**64 - 1], "nested": {"a": None}}
    path = write_snapshot(tmp_path, 12, arrays, meta)
    assert os.path.basename(path) == snapshot_name(12) == "snapshot-00000000000000000012.snap"
    seq, loaded, loaded_meta = load_latest(tmp_path)
    assert seq == 12 and loaded_meta == meta
    assert_same(loaded, arrays)
    loaded["pay"]["amount"][0] = 5  # Writable, and owned by the caller.
    assert load_snapshot(path)[1]["pay"]["amount"][0] == arrays["pay"]["amount"][0]
    assert loaded["aligned"].dtype.itemsize == ALIGNED.itemsize
    assert [name for name in os.listdir(tmp_path)] == [snapshot_name(12)]  # No temp left.


def test_arrays_larger_than_a_chunk(tmp_path):
    big = np.arange(CHUNK_BYTES // 8 * 2 + 123, dtype=np.uint64)
    write_snapshot(tmp_path, 1, {"big": big, "tail": np.arange(3, dtype=np.uint8)}, {})
    _, loaded, _ = load_latest(tmp_path)
    assert np.array_equal(loaded["big"], big) and list(loaded["tail"]) == [0, 1, 2]


def test_paced_writing_keeps_under_its_rate_and_writes_the_same(tmp_path):
    arrays = {"big": np.arange(3 * CHUNK_BYTES // 8 // 2, dtype=np.int64)}   # 1.5 chunks
    size = arrays["big"].nbytes
    started = time.perf_counter()
    paced = write_snapshot(str(tmp_path / "paced"), 7, arrays, {}, bytes_per_s_max=size * 4)
    assert time.perf_counter() - started >= 0.2                # 1/4 s at that rate
    plain = write_snapshot(str(tmp_path / "plain"), 7, arrays, {})
    assert open(paced, "rb").read() == open(plain, "rb").read()
    loaded, _meta = load_snapshot(paced)[1:]
    assert np.array_equal(loaded["big"], arrays["big"])


def test_empty_snapshot_and_seq_zero(tmp_path):
    write_snapshot(tmp_path, 0, {}, {})
    assert load_latest(tmp_path) == (0, {}, {})


def test_no_snapshot_is_none(tmp_path):
    assert load_latest(tmp_path) is None
    assert load_latest(tmp_path / "missing") is None
    assert list_snapshots(tmp_path / "missing") == []


def test_object_arrays_are_refused(tmp_path):
    with pytest.raises(TypeError, match="Python objects"):
        write_snapshot(tmp_path, 1, {"o": np.array([1, "x"], dtype=object)}, {})
    assert list_snapshots(tmp_path) == [] and os.listdir(tmp_path) == []


def test_meta_must_be_json(tmp_path):
    with pytest.raises(TypeError):
        write_snapshot(tmp_path, 1, {}, {"bad": object()})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("damage", ["header", "index", "data", "padding", "truncated", "extended", "empty"])
def test_damaged_newest_snapshot_falls_back_to_the_previous(tmp_path, caplog, damage):
    old_arrays = sample_arrays(1)
    write_snapshot(tmp_path, 10, old_arrays, {"n": 10})
    new_path = write_snapshot(tmp_path, 20, sample_arrays(2), {"n": 20})
    data = bytearray(open(new_path, "rb").read())
    if damage == "header":
        data[20] ^= 1
    elif damage == "index":
        data[SNAPSHOT_HEADER_BYTES + 5] ^= 1
    elif damage == "data":
        data[-200] ^= 0x80
    elif damage == "padding":
        data[-1] ^= 1  # The last array (fortran, 24 bytes) is followed by padding.
    elif damage == "truncated":
        data = data[:-64]
    elif damage == "extended":
        data += bytes(64)
    elif damage == "empty":
        data = bytearray()
    open(new_path, "wb").write(data)
    with pytest.raises(SnapshotCorrupt):
        load_snapshot(new_path)
    with caplog.at_level(logging.WARNING, logger="engine.storage.snapshot"):
        seq, arrays, meta = load_latest(tmp_path)
    assert (seq, meta) == (10, {"n": 10})
    assert_same(arrays, old_arrays)
    assert new_path in caplog.text


def test_all_snapshots_damaged_is_none(tmp_path):
    path = write_snapshot(tmp_path, 1, {"a": np.arange(3)}, {})
    with open(path, "r+b") as file:
        file.truncate(10)
    assert load_latest(tmp_path) is None


def test_renamed_snapshot_is_rejected(tmp_path):
    path = write_snapshot(tmp_path, 5, {"a": np.arange(3)}, {})
    os.rename(path, tmp_path / snapshot_name(6))
    with pytest.raises(SnapshotCorrupt, match="file name says 6"):
        load_snapshot(str(tmp_path / snapshot_name(6)))


def test_temp_files_from_a_crash_are_ignored_then_cleaned(tmp_path):
    write_snapshot(tmp_path, 1, {"a": np.arange(3)}, {"n": 1})
    temp = tmp_path / ("." + snapshot_name(2) + ".tmp")
    temp.write_bytes(b"half a snapshot")
    assert [info.seq for info in list_snapshots(tmp_path)] == [1]
    assert load_latest(tmp_path)[0] == 1
    write_snapshot(tmp_path, 3, {"a": np.arange(4)}, {"n": 3})
    assert not temp.exists()
    assert sorted(os.listdir(tmp_path)) == [snapshot_name(1), snapshot_name(3)]
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("kept")
    remove_snapshots_before(tmp_path, 0)
    assert unrelated.exists()


def test_list_and_remove_snapshots_before(tmp_path):
    for seq in [5, 50, 500, 5000]:
        write_snapshot(tmp_path, seq, {"a": np.arange(seq % 7)}, {})
    infos = list_snapshots(tmp_path)
    assert [info.seq for info in infos] == [5, 50, 500, 5000]
    assert all(info.bytes == os.path.getsize(info.path) for info in infos)
    removed = remove_snapshots_before(tmp_path, 500)
    assert [os.path.basename(p) for p in removed] == [snapshot_name(5), snapshot_name(50)]
    # The `keep` newest always stay, whatever the seq.
    assert remove_snapshots_before(tmp_path, 10**9, keep=2) == []
    removed = remove_snapshots_before(tmp_path, 10**9, keep=1)
    assert [info.seq for info in list_snapshots(tmp_path)] == [5000]
    assert [os.path.basename(p) for p in removed] == [snapshot_name(500)]


def test_rewriting_the_same_seq_replaces_it(tmp_path):
    write_snapshot(tmp_path, 7, {"a": np.arange(3)}, {"v": 1})
    write_snapshot(tmp_path, 7, {"a": np.arange(5)}, {"v": 2})
    seq, arrays, meta = load_latest(tmp_path)
    assert (seq, meta, arrays["a"].tolist()) == (7, {"v": 2}, [0, 1, 2, 3, 4])


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_any_single_byte_flip_is_detected(data):
    directory = tempfile.mkdtemp()
    try:
        arrays = {"pay": sample_arrays()["pay"][:5], "x": np.arange(9, dtype=np.int32)}
        path = write_snapshot(directory, 3, arrays, {"k": "v"})
        size = os.path.getsize(path)
        at = data.draw(st.integers(0, size - 1))
        bit = data.draw(st.integers(0, 7))
        with open(path, "r+b") as file:
            file.seek(at)
            byte = file.read(1)[0]
            file.seek(at)
            file.write(bytes([byte ^ (1 << bit)]))
        with pytest.raises(SnapshotCorrupt):
            load_snapshot(path)
    finally:
        shutil.rmtree(directory)


def test_load_with_headroom_pads_with_zero_rows(tmp_path):
    arrays = sample_arrays(3)
    write_snapshot(str(tmp_path), 7, arrays, {"k": 1})
    path = os.path.join(str(tmp_path), snapshot_name(7))
    wanted = {"pay": 1500, "matrix": 10}             # 10 < 17 rows: no headroom asked
    seq, loaded, meta = load_snapshot(path, lambda name, rows: wanted.get(name, rows))
    assert seq == 7 and meta == {"k": 1}
    assert len(loaded["pay"]) == 1500
    assert np.array_equal(loaded["pay"][:1000], arrays["pay"])
    assert not loaded["pay"][1000:].view(np.uint8).any()
    for name in arrays:
        if name != "pay":
            assert np.array_equal(loaded[name], arrays[name]), name
            assert loaded[name].dtype == arrays[name].dtype
