"""The replicated log (engine/replication/log.py) under an embedded Engine:
appends fenced by the stream's last sequence, replay from snapshot + stream,
and Scanpay's own checks of what it reads."""

import pytest

from engine import Engine
from engine.core.command import Command
from engine.protocol.errors import NotLeader
from engine.protocol.ops import OP_PAY
from engine.replication import packing
from engine.replication.log import StreamCorrupt
from engine.storage.journal import _encode_entry
from support.servers import pay_batch


def world(engine):
    engine.call("MERCHANTS", {"merchants": [{"id": 7}]})
    engine.call("WALLETS", {"users": [42]})
    engine.call("TOPUP", {"topups": [{"id": 1, "user": 42, "amount": 10**9}]})


def test_commands_reach_the_stream_and_a_second_node_replays_them(logs, tmp_path):
    leader = Engine(tmp_path / "a", journal=logs.log(tmp_path / "a", lead=True))
    world(leader)
    out = leader.pay(pay_batch(50))
    assert (out["status"] == 0).all()
    log = leader.storage.journal
    assert log.durable_seq == 4 and log.stream_seq == 4      # one message per write here
    follower = Engine(tmp_path / "b", journal=logs.log(tmp_path / "b"))
    assert follower.digest() == leader.digest()
    assert follower.storage.journal.durable_seq == 4
    with pytest.raises(NotLeader):
        follower.pay(pay_batch(1, start_id=1000))
    assert follower.digest() == leader.digest()
    leader.close()
    follower.close()


def test_a_restart_reads_its_snapshot_and_the_stream_after_it(logs, tmp_path):
    leader = Engine(tmp_path / "a", journal=logs.log(tmp_path / "a", lead=True))
    world(leader)
    leader.pay(pay_batch(10))
    info = leader.snapshot()
    assert info["ok"] and info["seq"] == 4
    leader.pay(pay_batch(10, start_id=100))
    digest = leader.digest()
    leader.close()
    again = Engine(tmp_path / "a", journal=logs.log(tmp_path / "a"))
    assert again.storage.snapshot_seq == 4
    assert again.digest() == digest
    again.close()


def test_a_deposed_writer_is_refused_answers_not_leader_and_rebuilds(logs, tmp_path):
    first = Engine(tmp_path / "a", journal=logs.log(tmp_path / "a", lead=True))
    world(first)
    second = Engine(tmp_path / "b", journal=logs.log(tmp_path / "b", lead=True))
    first.pay(pay_batch(5))                 # the stream moves on without `second`
    with pytest.raises(NotLeader):
        second.pay(pay_batch(5, start_id=500))
    log = second.storage.journal
    assert log.dropped_count == 1 and log.failed
    assert second.digest() == first.digest()     # rebuilt from the stream
    assert second.call("GET_PAYMENTS", {"ids": [500]})["results"][0]["error"] == "payment_not_found"
    first.close()
    second.close()


def test_a_message_that_breaks_the_crc_is_refused_loudly(logs, tmp_path):
    leader = Engine(tmp_path / "a", journal=logs.log(tmp_path / "a", lead=True))
    world(leader)
    loop, stream = logs.streams[0]
    frame, _ = _encode_entry(4, b"\x01\x00" + bytes(30))
    bad = bytearray(b"".join(frame))
    bad[-1] ^= 0xFF
    loop.call(stream.append(bytes(bad), 3, "evil.4", 4, None, 5), 10)
    leader.close()
    with pytest.raises(StreamCorrupt, match="message 4: entry checksum mismatch"):
        Engine(tmp_path / "b", journal=logs.log(tmp_path / "b"))


def test_a_missing_message_is_refused_loudly(logs, tmp_path):
    leader = Engine(tmp_path / "a", journal=logs.log(tmp_path / "a", lead=True))
    world(leader)
    leader.pay(pay_batch(3))
    loop, stream = logs.streams[0]
    assert loop.call(stream.js.delete_msg(logs.names.stream, 2), 10)
    leader.close()
    with pytest.raises(StreamCorrupt, match="message 2 is missing"):
        Engine(tmp_path / "b", journal=logs.log(tmp_path / "b"))


def test_engine_time_never_goes_back_across_leaders(logs, tmp_path):
    """A new leader whose clock is behind stamps its commands at the last
    stamp it applied, not at its clock: max(previous stamp, clock)."""
    ahead_ms = 4_000_000_000_000
    first = Engine(tmp_path / "a", journal=logs.log(tmp_path / "a", lead=True),
                   clock=lambda: ahead_ms)
    world(first)
    first.close()
    second = Engine(tmp_path / "b", journal=logs.log(tmp_path / "b"), clock=lambda: 1000)
    second.storage.journal.lead(second.storage.journal.new_token())
    out = second.pay(pay_batch(1))
    assert out["timestamp"][0] == ahead_ms
    second.close()


def test_packed_and_plain_messages_replay_to_the_same_state(logs, tmp_path):
    """The leader packs its record batches (format 2: fewer bytes in the
    stream); a reader unpacks them, and still reads format 1 messages."""
    plain = Engine(tmp_path / "a", journal=logs.log(tmp_path / "a", lead=True,
                                                     message_format=packing.FORMAT_ENTRIES))
    world(plain)
    plain.pay(pay_batch(2000))
    plain.close()
    packed = Engine(tmp_path / "b", journal=logs.log(tmp_path / "b", lead=True))
    packed.pay(pay_batch(2000, start_id=10_000))
    digest = packed.digest()
    loop, stream = logs.streams[0]
    first, second = (loop.call(stream.get(seq), 10) for seq in (4, 5))
    assert first.format == packing.FORMAT_ENTRIES and packing.HEADER_FORMAT not in first.headers
    assert second.headers[packing.HEADER_FORMAT] == "2"
    assert len(second.data) < len(first.data) / 4
    packed.close()
    reader = Engine(tmp_path / "c", journal=logs.log(tmp_path / "c"))
    assert reader.digest() == digest
    assert reader.call("GET_PAYMENTS", {"ids": [1, 11_999]})["results"][1]["amount"] == 2099
    reader.close()


def packed_pay_message(seq: int) -> bytes:
    records = pay_batch(100, start_id=1 << 20)
    frame, _ = _encode_entry(seq, Command(OP_PAY, 10**12, (), records.tobytes()).encode())
    return packing.pack([frame])


def test_a_packed_message_that_breaks_the_crc_is_refused_loudly(logs, tmp_path):
    leader = Engine(tmp_path / "a", journal=logs.log(tmp_path / "a", lead=True))
    world(leader)
    leader.close()
    loop, stream = logs.streams[0]
    bad = bytearray(packed_pay_message(4))
    bad[-1] ^= 0x01                     # the last plane: an amount's low byte
    loop.call(stream.append(bytes(bad), 3, "evil.4", 4, None, 5, packing.FORMAT_PLANES), 10)
    with pytest.raises(StreamCorrupt, match="message 4: entry checksum mismatch"):
        Engine(tmp_path / "b", journal=logs.log(tmp_path / "b"))


@pytest.mark.parametrize("fmt, error", [(3, "message format '3' is unknown to this node"),
                                        (2, "a packed message that does not unpack")])
def test_an_unknown_format_or_a_bad_packing_is_refused_loudly(logs, tmp_path, fmt, error):
    leader = Engine(tmp_path / "a", journal=logs.log(tmp_path / "a", lead=True))
    world(leader)
    leader.close()
    loop, stream = logs.streams[0]
    payload = packed_pay_message(4)[:-1] if fmt == 2 else packed_pay_message(4)
    loop.call(stream.append(payload, 3, "other.4", 4, None, 5, fmt), 10)
    with pytest.raises(StreamCorrupt, match=f"message 4: {error}"):
        Engine(tmp_path / "b", journal=logs.log(tmp_path / "b"))
