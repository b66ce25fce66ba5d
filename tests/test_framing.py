"""The PAY fast path of the frame layer (ext/framing.pyx) against the general
parser: the same frames, in the same order, however the stream is cut."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from engine import frame
from engine._framing import pack_pay_replies, take_pay_run
from engine.dispatch import OP_PAY, OP_PING
from engine.records import PAY_RECORD

RECORD = PAY_RECORD.itemsize
FAST = (OP_PAY, RECORD, 8)                  # at most 8 records per run


def expand(items) -> list:
    """Runs back into (op, flags, request_id, body) frames."""
    out = []
    for item in items:
        if isinstance(item, frame.PayRun):
            out.extend((OP_PAY, 0, rid, body) for rid, body in item.frames())
        else:
            out.append(item)
    return out


a_frame = st.one_of(
    st.tuples(st.just(OP_PAY), st.just(0), st.integers(1, 2**64 - 1),
              st.integers(1, 5).map(lambda n: n * RECORD)),          # good PAY
    st.tuples(st.just(OP_PAY), st.just(0), st.integers(0, 9), st.sampled_from([0, 10, 65])),
    st.tuples(st.just(OP_PAY), st.just(2), st.integers(0, 9), st.just(RECORD)),  # a flag
    st.tuples(st.just(OP_PING), st.just(0), st.integers(0, 9), st.integers(0, 70)))


@settings(max_examples=150, deadline=None)
@given(st.lists(a_frame, max_size=25), st.lists(st.integers(1, 400), max_size=30),
       st.randoms(use_true_random=False))
def test_runs_cut_the_same_frames_as_the_general_parser(frames, cuts, rnd):
    stream = b"".join(frame.HEADER.pack(size, op, flags, rid) + rnd.randbytes(size)
                      for op, flags, rid, size in frames)
    pieces, at = [], 0
    for cut in cuts:
        pieces.append(stream[at:at + cut])
        at += cut
    pieces.append(stream[at:])
    fast, slow = frame.FrameReader(), frame.FrameReader()
    got, want = [], []
    for piece in pieces:
        got += expand(fast.feed(piece, FAST))
        want += slow.feed(piece)
    assert got == want
    assert fast.buffered_bytes == slow.buffered_bytes == 0
    assert [(op, fl, rid, len(body)) for op, fl, rid, body in got] == frames


def test_a_run_stops_at_the_record_limit_and_at_anything_else():
    def pay(rid, records):
        return frame.HEADER.pack(records * RECORD, OP_PAY, 0, rid) + bytes(records * RECORD)
    stream = pay(1, 3) + pay(2, 5) + pay(3, 1) + frame.encode(OP_PING, 4) + pay(5, 2)
    count, end, body, rids, sizes = take_pay_run(stream, 0, OP_PAY, RECORD, 8, 1 << 20)
    assert (count, len(body), rids.tolist(), sizes.tolist()) == (2, 8 * RECORD, [1, 2],
                                                                 [3 * RECORD, 5 * RECORD])
    count, end, *_ = take_pay_run(stream, end, OP_PAY, RECORD, 8, 1 << 20)
    assert count == 1                        # frame 3, then the PING ends the run
    assert take_pay_run(stream, end, OP_PAY, RECORD, 8, 1 << 20)[0] == 0
    # A frame over max_frame is left to the general parser, which refuses it.
    big = pay(9, 4)
    assert take_pay_run(big, 0, OP_PAY, RECORD, 8, 2 * RECORD)[0] == 0
    with pytest.raises(frame.FrameError):
        frame.FrameReader(2 * RECORD).feed(big, (OP_PAY, RECORD, 8))


def test_replies_are_packed_in_request_order():
    results = np.arange(3 * RECORD, dtype=np.uint8) % 251
    reply = pack_pay_replies(results, np.array([7, 2**64 - 1], np.uint64),
                             np.array([RECORD, 2 * RECORD], np.uint32), OP_PAY)
    assert reply == (frame.encode(OP_PAY, 7, results[:RECORD].tobytes())
                     + frame.encode(OP_PAY, 2**64 - 1, results[RECORD:].tobytes()))
    with pytest.raises(AssertionError):
        pack_pay_replies(results[:-1], np.array([7], np.uint64),
                         np.array([3 * RECORD], np.uint32), OP_PAY)
