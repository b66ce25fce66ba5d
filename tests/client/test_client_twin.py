"""The client's hot path: ext/client.pyx (engine._client) against its
plain-Python twin (engine/_client_py.py). Random records, result bodies and
reply streams go to both; the results, the bytes and the errors must be the
same, and both must agree with numpy's reading of the docs/reference/protocol.md layouts.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import _client as compiled
from engine import _client_py as python
from engine import client as client_module      # configures both with the result types

PAY_RECORD, PAY_RESULT = client_module.PAY_RECORD, client_module.PAY_RESULT
ISSUE_RECORD, ISSUE_RESULT = client_module.ISSUE_RECORD, client_module.ISSUE_RESULT

TWINS = (compiled, python)
SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

# Values around and past every field's range, and things that are not ints.
edgy = st.one_of(
    st.integers(-2**64, 2**65),
    st.sampled_from([0, 1, -1, 2**32 - 1, 2**32, 2**63 - 1, 2**63, -2**63, -2**63 - 1,
                     2**64 - 1, 2**64, True, False, 1.0, "1", None]),
)
fine_u64 = st.integers(0, 2**64 - 1)


def outcome(fn, *args):
    """What a call gives: ("ok", value) or ("error", type, message)."""
    try:
        return ("ok", fn(*args))
    except Exception as e:     # noqa: BLE001 - the error is the result compared
        return ("error", type(e), str(e))


def packed(module, pack, *fields):
    out = bytearray(b"keep")
    result = outcome(pack, out, *fields)
    return result if result[0] == "error" else ("ok", bytes(out))


@SETTINGS
@given(st.lists(st.one_of(edgy, fine_u64), min_size=7, max_size=7),
       st.lists(st.one_of(fine_u64, edgy), max_size=6))
def test_pack_pay_twins_agree(fields, coupons):
    id_, payer, merchant, amount, flags, goods_tag, user_data = fields
    args = (id_, payer, merchant, amount, flags, goods_tag, coupons, user_data)
    got = [packed(m, m.pack_pay, *args) for m in TWINS]
    assert got[0] == got[1]
    if got[0][0] == "ok":         # the spec layout, as numpy reads it
        row = np.frombuffer(got[0][1][4:], PAY_RECORD)[0]
        assert (int(row["id"]), int(row["amount"]), int(row["user_data"])) == (
            id_, amount, user_data)
        assert [int(c) for c in row["coupons"]] == list(coupons) + [0] * (4 - len(coupons))
    else:
        assert got[0][1] is ValueError or got[0][1] is TypeError


@SETTINGS
@given(st.lists(edgy, min_size=3, max_size=3))
def test_pack_issue_twins_agree(fields):
    got = [packed(m, m.pack_issue, *fields) for m in TWINS]
    assert got[0] == got[1]
    if got[0][0] == "ok":
        row = np.frombuffer(got[0][1][4:], ISSUE_RECORD)[0]
        assert [int(row[k]) for k in ("coupon", "stock", "user", "reserved")] == [*fields, 0]


@SETTINGS
@given(st.binary(max_size=8 * 80 + 7))
def test_result_bodies_twins_agree(body):
    for name, dtype in (("pay_results", PAY_RESULT), ("issue_results", ISSUE_RESULT)):
        got = [outcome(getattr(m, name), body) for m in TWINS]
        assert got[0] == got[1]
        if len(body) % dtype.itemsize == 0:
            rows = np.frombuffer(body, dtype).tolist()
            assert got[0][0] == "ok" and len(got[0][1]) == len(rows)
            for result, row in zip(got[0][1], rows):
                values = [v for v in row if not isinstance(v, tuple)]
                assert list(client_module.msgspec.structs.astuple(result))[:len(values)] == values
        else:
            assert got[0][1] is client_module.ProtocolError


frames = st.lists(st.tuples(
    st.one_of(st.integers(0, 300), st.sampled_from([64 << 20, (64 << 20) + 1, 2**32 - 1])),
    st.integers(0, 2**16 - 1), st.integers(0, 2**16 - 1), st.integers(0, 2**64 - 1)),
    max_size=12)


@SETTINGS
@given(frames, st.lists(st.integers(0, 400), max_size=8), st.binary(max_size=20), st.data())
def test_frame_cutters_agree_on_any_stream(headers, cuts, tail, data):
    stream = bytearray()
    for size, op, flags, rid in headers:
        body = bytes((rid + i) & 0xFF for i in range(min(size, 300)))
        stream += client_module.HEADER.pack(size, op, flags, rid) + body
    stream += tail
    stream = bytes(stream)
    points = sorted({min(c, len(stream)) for c in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)])]
    if data.draw(st.booleans()):
        pieces = [bytearray(p) for p in pieces]         # uvloop hands bytes; be general
    cutters = [m.FrameCutter() for m in TWINS]
    for piece in pieces:
        got = [cutter.feed(piece) for cutter in cutters]
        described = [(frames, None if e is None else (type(e), str(e))) for frames, e in got]
        assert described[0] == described[1]
        assert cutters[0].buffered_bytes == cutters[1].buffered_bytes


def test_the_cutter_keeps_a_partial_frame_and_stops_at_a_broken_header():
    for module in TWINS:
        cutter = module.FrameCutter()
        frame = client_module.HEADER.pack(3, 16, 0, 7) + b"abc"
        assert cutter.feed(frame[:5]) == ([], None) and cutter.buffered_bytes == 5
        assert cutter.feed(frame[5:] + frame[:16]) == ([(16, 0, 7, b"abc")], None)
        frames, error = cutter.feed(b"abc" + client_module.HEADER.pack((64 << 20) + 1, 1, 0, 1))
        assert frames == [(16, 0, 7, b"abc")]
        assert isinstance(error, client_module.ProtocolError) and "broken" in str(error)
        assert cutter.feed(frame)[1] is error             # broken for good


@pytest.mark.parametrize("module", TWINS, ids=["cython", "python"])
def test_a_bad_record_leaves_the_pending_body_alone(module):
    out = bytearray()
    module.pack_pay(out, 1, 2, 3, 4, 0, 0, (5,), 0)
    with pytest.raises(ValueError, match="at most 4 coupons"):
        module.pack_pay(out, 1, 2, 3, 4, 0, 0, (1, 2, 3, 4, 5), 0)
    with pytest.raises(ValueError, match="amount must be an int"):
        module.pack_pay(out, 1, 2, 3, 2**63, 0, 0, (), 0)
    with pytest.raises(ValueError, match="flags must be an int in 0..4294967295, got True"):
        module.pack_pay(out, 1, 2, 3, 4, True, 0, (), 0)
    assert len(out) == 80


@SETTINGS
@given(st.integers(0, 2**16 - 1), st.integers(0, 2**64 - 1), st.binary(max_size=300),
       st.integers(0, 3))
def test_append_frame_twins_agree(op, request_id, body, records):
    rows = np.zeros(records, PAY_RECORD)
    rows["id"] = np.arange(records) + request_id % 1000
    for payload in (body, bytearray(body), rows, rows[::-1].copy()):
        got = [bytearray(b"x") for _ in TWINS]
        for out, module in zip(got, TWINS):
            module.append_frame(out, op, request_id, payload)
        assert got[0] == got[1]
        raw = bytes(memoryview(payload).cast("B"))
        assert got[0] == b"x" + client_module.HEADER.pack(len(raw), op, 0, request_id) + raw


@pytest.mark.parametrize("module", TWINS, ids=["cython", "python"])
def test_resolve_skips_callers_that_gave_up_and_checks_the_count(module):
    import asyncio

    async def main():
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in range(3)]
        futures[1].cancel()
        with pytest.raises(client_module.ProtocolError, match="expected 3 results, got 2"):
            module.resolve(futures, ["a", "b"])
        assert not futures[0].done()
        module.resolve(futures, ["a", "b", "c"])
        assert (futures[0].result(), futures[1].cancelled(), futures[2].result()) == (
            "a", True, "c")
    asyncio.run(main())


def test_the_client_falls_back_to_the_python_twin_when_the_extension_is_missing():
    """A checkout without the build still has a working client."""
    import subprocess
    import sys
    code = (
        "import sys; sys.modules['engine._client'] = None\n"   # import of it fails
        "import numpy as np\n"
        "from engine import client\n"
        "rows = np.zeros(1, client.PAY_RESULT); rows['coupons'][0, 1] = 9\n"
        "print(client.IMPLEMENTATION, sorted(client.IMPLEMENTATIONS),"
        " client.pay_results(rows)[0].coupons)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["python", "['python']", "(9,)"]
    assert client_module.IMPLEMENTATION == "cython"     # here, the build is there


class _Sink:
    """A transport that keeps what the client writes."""

    def __init__(self):
        self.written = bytearray()
        self.closed = False

    def write(self, data):
        self.written += data

    def is_closing(self):
        return self.closed

    def close(self):
        self.closed = True

    def get_extra_info(self, name):
        return None


def _describe(future):
    if not future.done():
        return ("pending",)
    if future.cancelled():
        return ("cancelled",)
    error = future.exception()
    if error is not None:
        return ("error", type(error).__name__, str(error))
    return ("ok", future.result())


def _client_outcome(implementation: str, pays: int, pieces: list) -> tuple:
    """Two requests (a PING as request 1, then at the end of the tick a
    coalesced PAY frame of `pays` records as request 2) on a client of
    `implementation`, then the reply
    stream `pieces`: what each caller got, and whether the client closed."""
    import asyncio

    async def main():
        before = client_module.use_implementation(implementation)
        try:
            c = client_module.AsyncClient(timeout_ms=60_000)
        finally:
            client_module.use_implementation(before)
        protocol = client_module._Protocol(c)
        protocol.connection_made(_Sink())
        calls = [asyncio.ensure_future(c.pay_one(id=i + 1, payer=1, merchant=1, amount=5))
                 for i in range(pays)]
        ping = asyncio.ensure_future(c.ping())
        for _ in range(3):
            await asyncio.sleep(0)
        for piece in pieces:
            protocol.data_received(piece)
        for _ in range(3):
            await asyncio.sleep(0)
        outcome = ([_describe(f) for f in calls], _describe(ping),
                   None if c._closed is None else type(c._closed).__name__)
        c.close()
        for f in [*calls, ping]:
            f.cancel()
        return outcome
    return asyncio.run(main())


reply_frames = st.lists(st.tuples(
    st.sampled_from([1, 2, 0, 7]),                    # request id: the PAY, the PING, ...
    st.sampled_from([16, 2, 17]), st.sampled_from([0, 1]),
    st.one_of(st.binary(max_size=200),                # any body, or whole results
              st.integers(0, 3).map(lambda n: bytes(range(80)) * n))),
    max_size=4)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 3), reply_frames, st.lists(st.integers(0, 800), max_size=4),
       st.one_of(st.none(), st.binary(min_size=240, max_size=240)), st.integers(0, 4))
def test_whole_clients_agree_on_any_reply_stream(pays, frames, cuts, results, at):
    if results is not None:            # the right PAY reply (random result bytes) somewhere
        frames = list(frames)
        frames.insert(min(at, len(frames)), (2, 16, 0, results[:80 * pays]))
    stream = b"".join(client_module.HEADER.pack(len(body), op, flags, rid) + body
                      for rid, op, flags, body in frames)
    points = sorted({min(c, len(stream)) for c in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)])]
    outcomes = [_client_outcome(name, pays, pieces) for name in ("cython", "python")]
    assert outcomes[0] == outcomes[1]


class Waiter:
    """A stand-in for an asyncio Future that records what it was given."""

    def __init__(self, done=False):
        self._done, self.result = done, None

    def done(self):
        return self._done

    def set_result(self, value):
        assert not self._done
        self._done, self.result = True, value


def a_pending_table(data, request_ids):
    """request id -> (waiter, op, timer, deadline), of every kind deliver() meets."""
    pending = {}
    for rid in request_ids:
        kind = data.draw(st.sampled_from(["plain", "plain", "done", "timer", "batch"]))
        waiter = (client_module._Batch([], None) if kind == "batch"
                  else Waiter(done=kind == "done"))
        op = data.draw(st.sampled_from([16, 17, 1]))
        pending[rid] = (waiter, op, object() if kind == "timer" else None, 0.0)
    return pending


def what_deliver_should_do(table, cut, room_waited):
    """The model: each cut frame in order, a plain reply to a plain waiter
    resolves it (once: its entry leaves), every other frame goes to slow."""
    pending, slow, resolved = dict(table), [], {}
    for op, flags, rid, body in cut:
        entry = pending.get(rid)
        if (entry is not None and flags == 0 and entry[2] is None and not room_waited
                and type(entry[0]) is Waiter and entry[1] == op):
            del pending[rid]
            if not entry[0].done():
                resolved[rid] = body
        else:
            slow.append((op, flags, rid, body))
    return slow, sorted(pending), resolved


@SETTINGS
@given(frames, st.lists(st.integers(0, 400), max_size=6), st.booleans(), st.data())
def test_deliver_twins_hand_over_the_frames_as_the_model_says(headers, cuts, room_waited,
                                                                data):
    """deliver() resolves exactly the plain replies to plain waiters (no flags,
    the op sent, no timer of their own, nobody waiting for room) and hands
    every other frame to `slow` in stream order; both twins, on any stream
    cut anywhere, with the frames that feed() cuts."""
    stream = bytearray()
    for size, op, flags, rid in headers:
        body = bytes((rid + i) & 0xFF for i in range(min(size, 300)))
        stream += client_module.HEADER.pack(size, op, flags, rid % 8) + body
    points = sorted({min(c, len(stream)) for c in cuts})
    pieces = [bytes(stream[a:b]) for a, b in zip([0, *points], [*points, len(stream)])]
    table = a_pending_table(data, range(8))
    fed = python.FrameCutter()
    cut = [frame for piece in pieces for frame in fed.feed(piece)[0]]
    expected = what_deliver_should_do(table, cut, room_waited)
    for module in TWINS:
        pending = {rid: (Waiter(w.done()) if type(w) is Waiter else w, *rest)
                   for rid, (w, *rest) in table.items()}
        waiters = {rid: entry[0] for rid, entry in pending.items()}
        slow, cutter = [], module.FrameCutter()
        errors = [cutter.deliver(piece, pending, [object()] if room_waited else [],
                                 lambda *frame: slow.append(frame)) for piece in pieces]
        resolved = {rid: w.result for rid, w in waiters.items()
                    if type(w) is Waiter and w.result is not None}
        assert (slow, sorted(pending), resolved) == expected, module.__name__
        assert [e and str(e) for e in errors] == [
            e and str(e) for e in (python.FrameCutter().feed(b"".join(pieces[:k + 1]))[1]
                                   for k in range(len(pieces)))]
        assert cutter.buffered_bytes == fed.buffered_bytes


@SETTINGS
@given(st.integers(0, 3), st.integers(1, 6), st.sampled_from(["pay", "issue", "other"]),
       st.booleans(), st.booleans())
def test_batch_body_and_reply_twins_agree(n, batch_max, kind, strided, two_d):
    dtype = {"pay": PAY_RECORD, "issue": ISSUE_RECORD, "other": np.dtype("<u8")}[kind]
    records = np.arange(max(n, 1) * 2 * dtype.itemsize, dtype=np.uint8).view(dtype)[:2 * n]
    records = records[::2] if strided else records[:n]
    if two_d:
        records = records.reshape(1, -1)
    got = [outcome(m.batch_body, records, PAY_RECORD, batch_max) for m in TWINS]
    if got[0][0] == "ok":
        assert got[1][0] == "ok" and got[0][1].tobytes() == got[1][1].tobytes()
        assert got[0][1].flags.c_contiguous and got[0][1].tobytes() == records.tobytes()
    else:
        assert got[0] == got[1]
    for result_dtype in (PAY_RESULT, ISSUE_RESULT):
        for size in (n * result_dtype.itemsize, n * result_dtype.itemsize + 1):
            body = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
            replies = [outcome(m.batch_reply, body, result_dtype, n) for m in TWINS]
            if replies[0][0] == "error":
                assert replies[0] == replies[1] and replies[0][1] is client_module.ProtocolError
                continue
            a, b = replies[0][1], replies[1][1]
            assert a.dtype == b.dtype == result_dtype and a.tobytes() == b.tobytes() == body
            assert not a.flags.writeable and not b.flags.writeable
