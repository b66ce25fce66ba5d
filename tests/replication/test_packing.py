"""The packed format of the stream's command messages
(engine/replication/packing.py): it unpacks to exactly the journal entries
the leader framed, it is smaller for record batches, and a payload that does
not unpack is refused, never guessed at."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.command import Command
from engine.protocol.limits import BATCH_RECORDS_MAX
from engine.protocol.ops import OP_CAPTURE_RECORDS, OP_ISSUE, OP_PAY, OP_WALLETS
from engine.protocol.records import CAPTURE_RECORD, ISSUE_RECORD, PAY_RECORD
from engine.replication import packing
from engine.storage.journal import _encode_entry, _walk

ENTRY_BYTES_MAX = 64 << 20


def pay_records(n: int, seed: int = 0) -> np.ndarray:
    """Like traffic: sequential ids, random payers among a few, small amounts."""
    rng = np.random.default_rng(seed)
    records = np.zeros(n, PAY_RECORD)
    records["id"] = np.arange(1 << 41, (1 << 41) + n)
    records["payer"] = rng.choice(rng.integers(0, 2**63, 500, dtype=np.uint64), n)
    records["merchant"] = rng.choice(rng.integers(0, 2**63, 20, dtype=np.uint64), n)
    records["amount"] = rng.integers(100, 200_000, n)
    records["goods_tag"] = rng.integers(0, 9, n)
    records["user_data"] = rng.integers(0, 2**63, n, dtype=np.uint64)
    return records


def entry(seq: int, op: int, body: bytes, draws: tuple = ()) -> tuple:
    return _encode_entry(seq, Command(op, 1_700_000_000_000 + seq, draws, body).encode())[0]


def raw(frames: list) -> bytes:
    return b"".join(bytes(part) for frame in frames for part in frame)


def entries_of(payload, first_seq: int) -> list:
    stop: list = []
    found = [(seq, bytes(memoryview(payload)[start:end]))
             for seq, start, end, _next in _walk(memoryview(payload), 0, first_seq,
                                                 ENTRY_BYTES_MAX, stop)]
    assert not stop, stop
    return found


def test_a_mixed_message_unpacks_to_the_entries_framed_and_packs_pay_batches_small():
    issue = np.zeros(300, ISSUE_RECORD)
    issue["coupon"] = np.arange(300) + 9
    frames = [entry(1, OP_WALLETS, b"\x81\xa5users\x91\x2a"),
              entry(2, OP_PAY, pay_records(BATCH_RECORDS_MAX).tobytes(), draws=(5, 6)),
              entry(3, OP_PAY, pay_records(10).tobytes()),              # small: as is
              entry(4, OP_ISSUE, issue.tobytes()),
              entry(5, OP_PAY, pay_records(3000, seed=1).tobytes()),
              entry(6, OP_WALLETS, b"\x80")]
    packed = packing.pack(frames)
    assert bytes(packing.unpack(packed)) == raw(frames)
    assert entries_of(packing.unpack(packed), 1) == entries_of(raw(frames), 1)
    # 80 bytes a payment as is; the planes that vary: ids (2 bytes), payers,
    # merchants and user data (8 each), amounts (3), goods tags (1).
    assert len(packed) < 0.45 * len(raw(frames))


def test_batches_that_would_not_shrink_go_as_they_are():
    noise = np.random.default_rng(3).integers(0, 256, 200 * 80, dtype=np.uint8)
    odd = pay_records(100).tobytes() + b"\x01"          # not whole records
    capture = np.zeros(1000, CAPTURE_RECORD)
    capture["payment"] = np.arange(1000)
    frames = [entry(1, OP_PAY, noise.tobytes()), entry(2, OP_PAY, odd),
              entry(3, OP_CAPTURE_RECORDS, capture.tobytes())]
    packed = packing.pack(frames)
    assert bytes(packing.unpack(packed)) == raw(frames)
    blocks = block_tags(packed)
    assert blocks == [packing.TAG_RAW, packing.TAG_PLANES]      # noise and odd, then capture
    assert len(packed) <= len(raw(frames)) + packing.BLOCK.size


def block_tags(packed: bytes) -> list:
    """The tags of a packed payload's blocks (walking its headers)."""
    tags, offset = [], 0
    while offset < len(packed):
        tag, _, stride, head_bytes, count = packing.BLOCK.unpack_from(packed, offset)
        tags.append(tag)
        offset += packing.BLOCK.size + head_bytes
        if tag == packing.TAG_PLANES:
            sent = np.frombuffer(packed, np.uint8, stride, offset)
            offset += 2 * stride + int(sent.sum()) * count
    return tags


def test_a_payload_that_does_not_unpack_is_refused():
    frames = [entry(1, OP_PAY, pay_records(500).tobytes())]
    packed = bytearray(packing.pack(frames))
    cases = {
        "cut short": bytes(packed[:-1]),
        "header cut": bytes(packed[:5]),
        "unknown tag": bytes([7]) + bytes(packed[1:]),
        "reserved set": bytes(packed[:1]) + b"\x01" + bytes(packed[2:]),
        "trailing bytes": bytes(packed) + b"\x00" * 3,
    }
    flags_at = packing.BLOCK.size + packing.BLOCK.unpack_from(packed)[3]
    bad_flags = bytearray(packed)
    bad_flags[flags_at] = 2
    cases["plane flag 2"] = bytes(bad_flags)
    huge = bytearray(packed)
    packing.BLOCK.pack_into(huge, 0, packing.TAG_PLANES, 0, 80,
                            packing.BLOCK.unpack_from(packed)[3], 2**32 - 1)
    cases["too many records"] = bytes(huge)
    wide = bytearray(packed)
    packing.BLOCK.pack_into(wide, 0, packing.TAG_PLANES, 0, packing.STRIDE_MAX + 8,
                            packing.BLOCK.unpack_from(packed)[3], 500)
    cases["records too wide"] = bytes(wide)
    for name, payload in cases.items():
        with pytest.raises(packing.PackingError):
            packing.unpack(payload)
            pytest.fail(name)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([OP_PAY, OP_ISSUE, OP_WALLETS]),
                          st.integers(0, 300), st.integers(0, 3)), min_size=1, max_size=5),
       st.integers(0, 2**32 - 1))
def test_any_entries_unpack_to_themselves(specs, seed):
    rng = np.random.default_rng(seed)
    frames = []
    for seq, (op, n, varying_fields) in enumerate(specs, 1):
        dtype = {OP_PAY: PAY_RECORD, OP_ISSUE: ISSUE_RECORD}.get(op)
        if dtype is None:
            body = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        else:
            records = np.zeros(n, dtype)
            for name in dtype.names[:varying_fields]:
                records[name] = rng.integers(0, 2**16, records[name].shape)
            body = records.tobytes()
        frames.append(entry(seq, op, body, draws=tuple(range(seq % 3))))
    assert bytes(packing.unpack(packing.pack(frames))) == raw(frames)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10**9), st.integers(1, 255))
def test_a_damaged_payload_is_refused_or_fails_the_entries_crc(position, xor):
    """Any flipped byte: unpack refuses it, or what it unpacks to fails the
    journal's CRC walk (the check every reader makes next)."""
    frames = [entry(1, OP_PAY, pay_records(200).tobytes()), entry(2, OP_WALLETS, b"\x80")]
    packed = bytearray(packing.pack(frames))
    packed[position % len(packed)] ^= xor
    try:
        out = packing.unpack(bytes(packed))
    except packing.PackingError:
        return
    stop: list = []
    walked = list(_walk(memoryview(out), 0, 1, ENTRY_BYTES_MAX, stop))
    assert stop or (len(walked) == 2 and bytes(out) == raw(frames))
