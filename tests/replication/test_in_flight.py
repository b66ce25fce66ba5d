"""Appends in flight (engine/replication/log.py, docs/replication.md
"Appends in flight"): a leader sends a batch's message before the ones
before it are acknowledged; their futures (the replies) complete strictly
in order, each after its own acknowledgement; a refusal fails every later
one; a lost answer is sent again and stored once; a new leader's term record
(an atomic batch of APPENDS_IN_FLIGHT_MAX copies) fences an old leader's
appends in flight."""
import asyncio
import time

import nats.errors
import numpy as np
import pytest

from engine import Engine
from engine.protocol.errors import NotLeader
from engine.protocol.ops import OP_PAY
from engine.replication.log import APPENDS_IN_FLIGHT_MAX, StreamLog
from engine.replication.stream import KIND_CHECKPOINT, KIND_TERM, Refused
from support.servers import pay_batch

WAIT_S = 10.0                       # a bound on every wait below


class Held:
    """The stream, with the leader's appends held by the test: before they
    are sent (`hold_sends`), or after, their answers (`hold_answers`); an
    answer in `lose` is dropped once (the message is stored, the leader sees
    a timeout)."""

    def __init__(self, stream):
        self.stream = stream
        self.hold_sends = False
        self.hold_answers = False
        self.released: set = set()      # msg ids let through
        self.lose: set = set()
        self.sent: list = []            # msg ids, in the order they reached the stream

    def __getattr__(self, name):
        return getattr(self.stream, name)

    async def _until_released(self, msg_id: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while msg_id not in self.released and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    async def append(self, payload, expected, msg_id, last_command, kind, timeout_s):
        if self.hold_sends:
            await self._until_released(msg_id)
        self.sent.append(msg_id)
        try:
            seq = await self.stream.append(payload, expected, msg_id, last_command, kind,
                                           timeout_s)
        except Exception as error:      # noqa: BLE001 - the answer is held like any other
            seq = error
        if self.hold_answers:
            await self._until_released(msg_id)
        if msg_id in self.lose:
            self.lose.discard(msg_id)
            raise nats.errors.TimeoutError
        if isinstance(seq, Exception):
            raise seq
        return seq


def world(engine):
    engine.call("MERCHANTS", {"merchants": [{"id": 7}]})
    engine.call("WALLETS", {"users": [42]})
    engine.call("TOPUP", {"topups": [{"id": 1, "user": 42, "amount": 10**9}]})


def held_leader(logs, path):
    loop, stream = logs.stream()
    held = Held(stream)
    log = StreamLog(str(path), loop, held)
    log.lead(log.new_token())
    engine = Engine(path, journal=log)
    world(engine)
    held.sent.clear()
    return engine, log, held


def wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def three_in_flight(engine, log, start_id: int = 100) -> list:
    """Three PAY writes, each its own append, all three in flight at once."""
    futures = []
    for i in range(3):
        body = pay_batch(1, start_id=start_id + i).view(np.uint8).data
        _result, durable = engine.write_command(OP_PAY, body)
        futures.append(durable)
        wait_until(lambda: len(log._in_flight) == i + 1, f"append {i} in flight")
    return futures


def msg_ids(log) -> list:
    ids = [m.msg_id for m in log._in_flight]
    assert len(ids) == 3
    return ids


def three_held(logs, path, hold: str):
    """A leader with three appends in flight, `hold` ("hold_sends" or
    "hold_answers") set: (engine, log, held, futures, their msg ids)."""
    engine, log, held = held_leader(logs, path)
    setattr(held, hold, True)
    futures = three_in_flight(engine, log)
    return engine, log, held, futures, msg_ids(log)


def completion_order(futures) -> list:
    order = []
    for index, future in enumerate(futures):
        future.add_done_callback(lambda _f, index=index: order.append(index))
    return order


def test_answers_out_of_order_complete_the_replies_in_order(logs, tmp_path):
    engine, log, held, futures, (first, second, third) = three_held(logs, tmp_path / "a",
                                                                    "hold_answers")
    order = completion_order(futures)
    held.released |= {third, second}
    later = list(log._in_flight)[1:]
    wait_until(lambda: all(m.future.done() for m in later), "the last two answered")
    time.sleep(0.2)
    assert not any(f.done() for f in futures), "a reply before an earlier append's answer"
    held.released.add(first)
    seqs = [f.result(WAIT_S) for f in futures]
    assert order == [0, 1, 2] and seqs == sorted(seqs) and seqs[-1] == log.durable_seq
    assert log.stream_seq == 6 and log.appends_in_flight_max == APPENDS_IN_FLIGHT_MAX
    engine.close()


def test_a_refusal_in_the_middle_fails_every_later_append_and_the_node_follows(logs, tmp_path):
    engine, log, held, futures, (first, second, third) = three_held(logs, tmp_path / "a",
                                                                    "hold_sends")
    held.released.add(first)
    assert futures[0].result(WAIT_S) == 4
    # A new leader takes over: its term record (a fence of copies) lands
    # after the first append, before the other two reach the stream.
    other = logs.log(tmp_path / "b")
    token = other.new_token()
    fence_end = other.append_record(KIND_TERM, {"token": token}, token)
    assert fence_end == 4 + APPENDS_IN_FLIGHT_MAX
    held.released |= {second, third}
    for future in futures[1:]:
        with pytest.raises(NotLeader):
            future.result(WAIT_S)
    assert log.failed and log.dropped_count == 2
    assert held.sent[0] == first and second in held.sent     # (sent; the stream refused it)
    loop, stream = logs.streams[0]
    assert loop.call(stream.last_seq(), 10) == fence_end      # neither landed
    assert engine.follows()
    with pytest.raises(NotLeader):
        engine.pay(pay_batch(1, start_id=500))
    again = Engine(tmp_path / "c", journal=logs.log(tmp_path / "c"))
    assert engine.digest() == again.digest()      # rebuilt: the first one only
    assert engine.call("GET_PAYMENTS", {"ids": [101]})["results"][0]["error"] == "payment_not_found"
    engine.close()
    again.close()
    other.close()


def old_pipeline(stream, expected: list):
    """An old leader's appends in flight, each expecting the stream seq the
    one before it would get; what the stream answered each."""
    async def send():
        return await asyncio.gather(*[
            stream.append(b"{}", seq, f"old.{seq}", 0, KIND_CHECKPOINT, 5) for seq in expected],
            return_exceptions=True)
    return send()


def test_one_foreign_message_alone_would_not_fence_appends_in_flight(logs):
    """Why a term record is a fence of copies: JetStream checks each
    append's expected last sequence on its own, so after one foreign
    message, the append in flight behind a refused one lands."""
    loop, stream = logs.stream()
    assert loop.call(stream.append(b"{}", 0, "old.0", 0, KIND_CHECKPOINT, 5), 10) == 1
    assert loop.call(stream.append(b"{}", 1, "new.term", 0, KIND_TERM, 5), 10) == 2
    refused, landed = loop.call(old_pipeline(stream, [1, 2]), 10)
    assert isinstance(refused, Refused) and landed == 3


def test_a_term_fence_refuses_every_append_in_flight_of_the_old_leader(logs):
    loop, stream = logs.stream()
    assert loop.call(stream.append(b"{}", 0, "old.0", 0, KIND_CHECKPOINT, 5), 10) == 1
    end = loop.call(stream.append_fence(b"{}", 1, "new.term", 0, KIND_TERM,
                                        APPENDS_IN_FLIGHT_MAX, 5), 10)
    assert end == 1 + APPENDS_IN_FLIGHT_MAX
    answers = loop.call(old_pipeline(stream, list(range(1, 1 + APPENDS_IN_FLIGHT_MAX))), 10)
    assert all(isinstance(answer, Refused) for answer in answers), answers
    assert loop.call(stream.last_seq(), 10) == end
    # Sent again (its answer lost): the stream says so; the log reads its first copy.
    with pytest.raises(Refused):
        loop.call(stream.append_fence(b"{}", 1, "new.term", 0, KIND_TERM,
                                      APPENDS_IN_FLIGHT_MAX, 5), 10)


def test_a_lost_answer_is_sent_again_with_those_after_it_and_stored_once(logs, tmp_path):
    engine, log, held, futures, (first, second, third) = three_held(logs, tmp_path / "a",
                                                                    "hold_answers")
    held.lose.add(first)
    held.released |= {first, second, third}
    assert [f.result(WAIT_S) for f in futures] == [4, 5, 6]
    assert held.sent.count(first) == 2 and held.sent.count(second) == 2
    loop, stream = logs.streams[0]
    assert loop.call(stream.last_seq(), 10) == 6         # each once
    assert [loop.call(stream.get(s), 10).headers["Nats-Msg-Id"] for s in (4, 5, 6)] == \
        [first, second, third]
    again = Engine(tmp_path / "b", journal=logs.log(tmp_path / "b"))
    assert again.digest() == engine.digest()
    engine.close()
    again.close()
