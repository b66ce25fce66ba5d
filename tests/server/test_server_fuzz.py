"""The server survives anything a client sends (docs/reference/protocol.md, issue 4).

Hypothesis writes a byte stream of well-formed, half-formed and random
frames over a real socket, cut into random chunks: every op code, bodies
of the right and wrong sizes, random MessagePack and garbage, bad flags,
oversized headers. Whatever it sends:
- every reply is a whole frame, and every error frame names a code of
  docs/reference/protocol.md with a message;
- another connection is served meanwhile and afterwards (PING, a payment);
- payments only come from well-formed PAY frames (none at all when keys
  are configured: a random stream cannot authenticate), and AUDIT holds after
  every example (tests/conftest.py audits every Engine a test made);
- nothing is logged at ERROR (an exception in a protocol callback would be);
- on a durable server, the journal replays to the very state it served.
"""
import asyncio
import logging
import tempfile

import msgspec
import numpy as np
from hypothesis import given, settings, strategies as st

from engine import Engine

from engine.protocol import frame
from engine.protocol.auth import Key
from engine.server.config import Config
from engine.protocol.ops import OP_NAMES, OP_PAY
from engine.protocol.records import PAY_RECORD, PAY_RESULT
from engine.server.server import Server
from engine.protocol.status import ErrorCode, Status
from support.wire import hello

FRAME_BYTES_MAX = 4096
IDLE_S = 0.15                       # no reply for this long: the server has answered all it will
REQUEST_IDS_MAX = 1 << 32
FIELD_NAMES = ["merchants", "users", "topups", "stocks", "id", "user", "amount", "merchant",
               "fee_bps", "payment", "payments", "coupons", "budget", "kind", "value",
               "threshold", "per_user_limit", "now", "protocol", "client", "key_id", "limit",
               "period", "program", "points", "code", "ids", "since", "until", "max_issued"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 63), (1 << 64) - 1),
                    st.integers(-3, 100), st.text(max_size=8), st.floats(allow_nan=False),
                    st.binary(max_size=8))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.sampled_from(FIELD_NAMES), inner, max_size=4)), max_leaves=12)
# Hostile shapes (issue 14): nesting past any limit (which raised RecursionError
# out of the handler), and maps repeating a key (the last one won).
hostile_bodies = st.one_of(
    st.integers(30, 3000).map(lambda depth: b"\x81\xa1a" * depth + b"\x01"),
    st.integers(30, 3000).map(lambda depth: b"\x91" * depth + b"\xc0"),
    st.tuples(st.sampled_from(FIELD_NAMES), st.integers(0, 1 << 40)).map(
        lambda kv: b"\x82" + msgspec.msgpack.encode(kv[0]) + b"\x05"
        + msgspec.msgpack.encode(kv[0]) + msgspec.msgpack.encode(kv[1])))
map_bodies = st.one_of(
    st.dictionaries(st.sampled_from(FIELD_NAMES), values, max_size=5).map(msgspec.msgpack.encode),
    values.map(msgspec.msgpack.encode),
    st.binary(max_size=64),
    hostile_bodies)


@st.composite
def pay_bodies(draw):
    """PAY records against the test world (merchants 1, 2; users 1, 2), with
    unknown ones, odd amounts and sizes that are not whole records."""
    count = draw(st.integers(0, 4))
    records = np.zeros(count, PAY_RECORD)
    for i in range(count):
        records[i]["id"] = draw(st.integers(0, 40))
        records[i]["payer"] = draw(st.sampled_from([1, 2, 3, 0]))
        records[i]["merchant"] = draw(st.sampled_from([1, 2, 99]))
        records[i]["amount"] = draw(st.integers(-5, 2_000_000))
        records[i]["flags"] = draw(st.sampled_from([0, 0, 1, 0xFFFFFFFF]))
    body = records.tobytes()
    cut = draw(st.sampled_from([0, 0, 0, 1, -1]))     # a byte short or over, sometimes
    return body[:cut] if cut < 0 else body + b"\x00" * cut


@st.composite
def pieces(draw):
    """One piece of the stream: mostly frames, some garbage."""
    kind = draw(st.sampled_from(["pay", "pay", "records", "map", "map", "ping", "garbage",
                                 "header"]))
    request_id = draw(st.integers(0, REQUEST_IDS_MAX))
    if kind == "garbage":
        return draw(st.binary(min_size=1, max_size=40))
    if kind == "header":                # a header alone: odd flags or a size over the limit
        size = draw(st.sampled_from([0, 1, FRAME_BYTES_MAX + 1, 1 << 31]))
        return frame.HEADER.pack(size, draw(st.integers(0, 0xFFFF)),
                                 draw(st.integers(0, 0xFFFF)), request_id)
    if kind == "pay":
        op, body = OP_PAY, draw(pay_bodies())
    elif kind == "records":
        op, body = draw(st.sampled_from([17, 18, 19])), draw(st.binary(max_size=100))
    elif kind == "ping":
        op, body = 2, draw(st.sampled_from([b"", b"x"]))
    else:
        op = draw(st.one_of(st.sampled_from(sorted(OP_NAMES)), st.integers(0, 0xFFFF)))
        body = draw(map_bodies)
    flags = draw(st.sampled_from([0] * 6 + [frame.FLAG_ERROR, 2]))      # a bad_frame, sometimes
    return frame.encode(op, request_id, body, flags)


def whole_pay_records(stream: bytes) -> int:
    """An upper bound on the payments a stream can make: the records of every
    well-formed PAY frame in it (flags 0, whole records), wherever a frame
    could start."""
    total = 0
    for at in range(len(stream) - frame.HEADER.size + 1):
        size, op, flags, _rid = frame.HEADER.unpack_from(stream, at)
        if (op == OP_PAY and flags == 0 and size and size % PAY_RECORD.itemsize == 0
                and at + frame.HEADER.size + size <= len(stream)):
            total += size // PAY_RECORD.itemsize
    return total


ADMIN = Key("ops", "admin-secret-0123456789ab", "admin")


async def call(reader, writer, op, request_id, body=b""):
    writer.write(frame.encode(op, request_id, body))
    header = await asyncio.wait_for(reader.readexactly(frame.HEADER.size), 5)
    size, reply_op, flags, reply_id = frame.HEADER.unpack(header)
    reply = await asyncio.wait_for(reader.readexactly(size), 5)
    assert (reply_op, reply_id) == (op, request_id)
    return flags, reply


async def replies_until_quiet(reader) -> list:
    """Every reply frame the server sends until it closes or goes quiet."""
    out = []
    while True:
        try:
            header = await asyncio.wait_for(reader.readexactly(frame.HEADER.size), IDLE_S)
            size, op, flags, request_id = frame.HEADER.unpack(header)
            body = await asyncio.wait_for(reader.readexactly(size), 5)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            return out
        out.append((op, flags, request_id, body))


def check_reply(op, flags, request_id, body) -> None:
    assert 0 <= request_id < 1 << 64
    if flags & frame.FLAG_ERROR:
        error = msgspec.msgpack.decode(body)
        assert error["name"] in ErrorCode.__members__ and error["code"] == ErrorCode[error["name"]]
        assert isinstance(error["message"], str) and error["message"]
    elif op == OP_PAY:
        results = np.frombuffer(body, PAY_RESULT)
        assert all(int(s) in Status._value2member_map_ for s in results["status"])


class Errors(logging.Handler):
    """Log records at ERROR and above, from any logger."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@settings(max_examples=40, deadline=None)
@given(st.lists(pieces(), min_size=1, max_size=12), st.lists(st.integers(1, 200), max_size=8),
       st.booleans(), st.booleans())
def test_the_server_survives_any_stream_and_changes_only_what_valid_frames_ask(parts, cuts,
                                                                              auth, durable):
    stream = b"".join(parts)

    async def main(data: str):
        config = Config(data=data, listen="127.0.0.1:0", frame_bytes_max=FRAME_BYTES_MAX,
                        inflight_frames_max=8, keys=[ADMIN] if auth else [])
        server = Server(config, engine=None if durable else Engine())
        engine = server.engine
        await server.start()
        host, port = server.config.host_port
        witness = await asyncio.open_connection(host, port)
        if auth:
            body = msgspec.msgpack.encode(hello(ADMIN.key_id, ADMIN.secret))
            flags, _ = await call(*witness, 1, 1, body)
            assert flags == 0
        for op, request in ((32, {"merchants": [{"id": 1, "fee_bps": 60}, {"id": 2}]}),
                            (33, {"users": [1, 2]}),
                            (34, {"topups": [{"id": 1, "user": 1, "amount": 10**9}]})):
            flags, _ = await call(*witness, op, 1, msgspec.msgpack.encode(request))
            assert flags == 0
        payments_before = engine.counts()["payments"]

        reader, writer = await asyncio.open_connection(host, port)
        at = 0
        for cut in cuts + [len(stream)]:                # random chunks, then the rest
            writer.write(stream[at:at + cut])
            at += cut
            await asyncio.sleep(0)
        for reply in await replies_until_quiet(reader):
            check_reply(*reply)
        writer.close()

        # The other connection is still served, and can still pay.
        assert await call(*witness, 2, 7) == (0, b"")
        paid = np.zeros(1, PAY_RECORD)
        paid["id"], paid["payer"], paid["merchant"], paid["amount"] = 1 << 40, 1, 1, 100
        flags, body = await call(*witness, OP_PAY, 8, paid.tobytes())
        assert flags == 0 and np.frombuffer(body, PAY_RESULT)["status"][0] == Status.ok
        made = engine.counts()["payments"] - payments_before - 1
        assert 0 <= made <= (0 if auth else whole_pay_records(stream))
        witness[1].close()
        await server.stop()
        if durable:                         # what it served is what its journal replays to
            assert Engine(data).digest() == engine.digest()
    errors = Errors()
    logging.getLogger().addHandler(errors)
    try:
        with tempfile.TemporaryDirectory(prefix="scanpay-fuzz-") as data:
            asyncio.run(main(data if durable else ""))
    finally:
        logging.getLogger().removeHandler(errors)
    assert not errors.records, [r.getMessage() for r in errors.records]
