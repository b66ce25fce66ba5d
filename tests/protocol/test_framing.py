"""The PAY fast path of the frame layer (ext/framing.pyx): frames cut straight
into a kernel batch must be exactly the frames the general parser sees, in
the same order, however the stream is cut, and their replies must go back
to each connection in request order."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from engine.protocol import frame
from engine._framing import PayBatch
from engine.protocol.ops import OP_PAY, OP_PING
from engine.protocol.records import PAY_RECORD

RECORD = PAY_RECORD.itemsize


def pay(rid: int, records: int, fill: int = 0) -> bytes:
    return frame.encode(OP_PAY, rid, bytes([fill]) * (records * RECORD))


def new_batch(records_max: int) -> PayBatch:
    batch = PayBatch(records_max, RECORD, 1 << 20, OP_PAY)
    batch.parts.append(("the connection", None))          # member 0
    return batch


def cut_with_batches(pieces, records_max: int) -> list:
    """Parse the pieces as a connection does: PAY runs into batches of at most
    `records_max` records, everything else through the general parser; then
    expand the batches back into (op, flags, request_id, body) frames."""
    reader = frame.FrameReader()
    batches, out = [], []
    error = None
    for piece in pieces:
        buffer = reader.begin(piece)
        at = 0
        while at < len(buffer) and error is None:
            while True:                     # as intake_pay: a new batch when one is full
                if not batches or batches[-1][0].room == 0:
                    batches.append((new_batch(records_max), len(out)))
                frames, records, end, blocked = batches[-1][0].take(buffer, at, 0, 1 << 30)
                if frames:
                    out.append(("batch", len(batches) - 1))
                    at = end
                if not blocked or blocked > records_max:
                    break
                batches.append((new_batch(records_max), len(out)))
            try:
                parsed = reader.next_frame(buffer, at)
            except frame.FrameError as e:   # the stream ends here, as in a connection
                error = e.code
                break
            if parsed is None:
                break
            item, at = parsed
            out.append(item)
            batches.append((new_batch(records_max), len(out)))   # later frames: after it
        if error is not None:
            break
        reader.keep(buffer, at)
    frames, expanded = [], set()
    for item in out:
        if item[0] != "batch":
            frames.append(item)
        elif item[1] not in expanded:
            expanded.add(item[1])
            frames.extend(batch_frames(batches[item[1]][0]))
    return frames, error, reader


def general_parse(stream: bytes):
    """The general parser alone: (frames, the stream error's code or None)."""
    reader = frame.FrameReader()
    frames, at = [], 0
    try:
        while (parsed := reader.next_frame(stream, at)) is not None:
            item, at = parsed
            frames.append(item)
    except frame.FrameError as e:
        return frames, e.code
    return frames, None


def batch_frames(batch: PayBatch) -> list:
    """A batch back into frames, through its own reply path: the 'results'
    are the records themselves, so each reply body is its request body."""
    body = batch.body()
    replies, ends = batch.replies(np.frombuffer(body, np.uint8))
    assert len(ends) == 1 and ends[0] == len(replies)
    return frame.FrameReader().feed(replies)


a_frame = st.one_of(
    st.tuples(st.just(OP_PAY), st.just(0), st.integers(1, 2**64 - 1),
              st.integers(1, 5).map(lambda n: n * RECORD)),          # good PAY
    st.tuples(st.just(OP_PAY), st.just(0), st.integers(0, 9), st.sampled_from([0, 10, 65])),
    st.tuples(st.just(OP_PAY), st.just(2), st.integers(0, 9), st.just(RECORD)),  # bad_frame
    st.tuples(st.just(OP_PING), st.just(0), st.integers(0, 9), st.integers(0, 70)))


@settings(max_examples=150, deadline=None)
@given(st.lists(a_frame, max_size=25), st.lists(st.integers(1, 400), max_size=30),
       st.integers(1, 8), st.randoms(use_true_random=False))
def test_batches_take_the_same_frames_as_the_general_parser(frames, cuts, records_max, rnd):
    stream = b"".join(frame.encode(op, rid, rnd.randbytes(size), flags)
                      for op, flags, rid, size in frames)
    pieces, at = [], 0
    for cut in cuts:
        pieces.append(stream[at:at + cut])
        at += cut
    pieces.append(stream[at:])
    got, error, reader = cut_with_batches(pieces, records_max)
    # A PAY frame larger than a batch is left to the general parser too; a
    # flagged frame ends the stream with bad_frame on either path.
    assert (got, error) == general_parse(stream)
    assert error is not None or reader.buffered_bytes == 0


def test_a_run_stops_at_the_batch_room_and_at_anything_else():
    stream = pay(1, 3) + pay(2, 5) + pay(3, 1) + frame.encode(OP_PING, 4) + pay(5, 2)
    batch = PayBatch(8, RECORD, 1 << 20, OP_PAY)
    frames, records, end, blocked = batch.take(stream, 0, 0, 1 << 30)
    assert (frames, records, blocked, batch.room) == (2, 8, 1, 0)    # frame 3 does not fit
    assert batch.take(stream, end, 0, 1 << 30)[0] == 0
    other = PayBatch(8, RECORD, 1 << 20, OP_PAY)
    frames, records, end, blocked = other.take(stream, end, 0, 1 << 30)
    assert (frames, records, blocked) == (1, 1, 0)                   # the PING ends the run
    # The caller's room (the writer's queue) limits a run as the batch does.
    assert PayBatch(8, RECORD, 1 << 20, OP_PAY).take(stream, 0, 0, 2)[:2] == (0, 0)
    # A frame over max_frame is left to the general parser, which refuses it.
    big = pay(9, 4)
    assert PayBatch(8, RECORD, 2 * RECORD, OP_PAY).take(big, 0, 0, 1 << 30)[0] == 0
    with pytest.raises(frame.FrameError):
        frame.FrameReader(2 * RECORD).feed(big)


def test_replies_go_to_each_member_in_request_order():
    batch = PayBatch(100, RECORD, 1 << 20, OP_PAY)
    batch.parts.extend([("conn a", None), ("conn b", None)])
    # Interleaved runs of two members: a(1), b(2,3), a(4), b(5)
    for member, stream in ((0, pay(1, 1, 11)), (1, pay(2, 2, 22) + pay(3, 1, 33)),
                           (0, pay(4, 3, 44)), (1, pay(5, 1, 55))):
        assert batch.take(stream, 0, member, 1 << 30)[0] >= 1
    assert (batch.frames, batch.records) == (5, 8)
    results = np.frombuffer(batch.body(), np.uint8)      # each reply echoes its request
    replies, ends = batch.replies(results)
    a, b = replies[:ends[0]], replies[ends[0]:ends[1]]
    assert ends[1] == len(replies)
    assert a == pay(1, 1, 11) + pay(4, 3, 44)
    assert b == pay(2, 2, 22) + pay(3, 1, 33) + pay(5, 1, 55)
    assert batch.request_ids(1).tolist() == [2, 3, 5]
    with pytest.raises(AssertionError):
        batch.replies(results[:-1])
