"""`Requests`, a connection's request state: ext/client.pyx (engine._client)
against its plain-Python twin (engine/_client_py.py). The same random
sequence of operations goes to both over a recording fake loop; every
return value, error type, frame byte, pending entry and loop call must be
the same, and both must keep to the model (room, request ids, deadlines).
"""
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import _client as compiled
from engine import _client_py as python
from engine import client as client_module      # configures both with the result types

TWINS = (compiled, python)
TIMEOUT_MS = 250
IN_FLIGHT_MAX = 3
HEADER = client_module.HEADER


class Handle:
    """A timer: its cancel() is recorded in the loop's log."""

    def __init__(self, log: list, number: int):
        self.log, self.number = log, number

    def cancel(self):
        self.log.append(("cancel", self.number))


class Token:
    """A Future the fake loop made, named by the order it was made in."""

    def __init__(self, number: int):
        self.number = number

    def __eq__(self, other):
        return type(other) is Token and other.number == self.number

    def __hash__(self):
        return self.number


class FakeLoop:
    """Records every call a Requests makes on its loop; time moves 0.125 s a read."""

    def __init__(self):
        self.now, self.log, self.futures = 1000.0, [], 0

    def time(self):
        self.now += 0.125
        return self.now

    def create_future(self):
        self.futures += 1
        return Token(self.futures)

    def _timer(self, kind, when, callback, args):
        self.log.append((kind, when, callback, args))
        return Handle(self.log, len(self.log))

    def call_at(self, when, callback, *args):
        return self._timer("at", when, callback, args)

    def call_later(self, delay_s, callback, *args):
        return self._timer("later", delay_s, callback, args)

    def call_soon(self, callback, *args):
        self.log.append(("soon", callback, args))


operations = st.lists(st.one_of(
    st.tuples(st.just("request"), st.sampled_from([1, 16, 17]), st.binary(max_size=40),
              st.sampled_from([None, 0, TIMEOUT_MS, 40])),
    st.tuples(st.just("send"), st.sampled_from([16, 17]), st.one_of(st.binary(max_size=40),
                                                                    st.just(5)),
              st.sampled_from([None, TIMEOUT_MS, 90])),
    st.tuples(st.just("forget"), st.integers(0, 12)),
    st.tuples(st.just("reply"), st.integers(0, 12)),
    st.tuples(st.just("set"), st.sampled_from(["paused", "tick_scheduled", "closed"]),
              st.booleans()),
    st.tuples(st.just("frames"), st.integers(-1, 1)),
    st.tuples(st.just("swept")),
), max_size=30)


def apply(state, loop, operation):
    """One operation on `state`: what it returns, or the type of its error."""
    kind, *args = operation
    try:
        if kind == "request":
            return ("future", state.request(*args))
        if kind == "send":
            return ("id", state.send(args[0], args[1], ("waiter", args[0]), args[2]))
        if kind == "forget":
            return ("forgot", state.forget(args[0]))
        if kind == "reply":                 # what deliver() does with a reply
            return ("replied", state.pending.pop(args[0], None) is not None)
        if kind == "set":
            setattr(state, args[0], args[1])
            return ("set",)
        if kind == "frames":
            state.open_frames = max(0, state.open_frames + args[0])
            return ("frames",)
        state.sweep = None                  # the sweep timer ran
        return ("swept",)
    except Exception as e:     # noqa: BLE001 - the error's type is the result compared
        return ("error", type(e))


def snapshot(state, loop):
    pending = {rid: (waiter, op, timer is None, deadline)
               for rid, (waiter, op, timer, deadline) in state.pending.items()}
    return (bytes(state.out), pending, state.next_id, state.last_id, state.open_frames,
            state.has_room(), state.has_slot(), state.tick_scheduled, state.sweep is not None,
            list(loop.log))


def run(module, sequence):
    loop = FakeLoop()
    state = module.Requests(loop, TIMEOUT_MS, IN_FLIGHT_MAX, "tick", "sweep", "expire")
    trace = []
    for operation in sequence:
        room = state.has_room() and not state.closed
        result = apply(state, loop, operation)
        check_the_model(state, operation, result, room)
        trace.append((result, snapshot(state, loop)))
    return trace


def check_the_model(state, operation, result, room):
    assert state.has_slot() == (len(state.pending) + state.open_frames < IN_FLIGHT_MAX)
    assert state.has_room() == (state.has_slot() and not state.paused)
    assert list(state.pending) == sorted(state.pending)      # the sweep relies on it
    if operation[0] == "request":
        assert (result[1] is None) == (not room)
    if result[0] in ("id", "future") and result[1] is not None:
        rid = state.last_id
        assert rid == state.next_id - 1 and rid in state.pending
        size, op, flags, frame_id = HEADER.unpack_from(state.out, len(state.out) - HEADER.size
                                                       - len(operation[2]))
        assert (size, op, flags, frame_id) == (len(operation[2]), operation[1], 0, rid)
        _, _, timer, deadline = state.pending[rid]
        if operation[3] in (None, 0, TIMEOUT_MS):
            assert timer is None and deadline > 1000.0
        else:
            assert timer is not None and deadline == 0.0
        assert state.tick_scheduled


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations)
def test_requests_twins_agree_on_any_sequence(sequence):
    got = [run(module, sequence) for module in TWINS]
    assert got[0] == got[1]


def test_a_request_frames_registers_and_schedules_once():
    for module in TWINS:
        loop = FakeLoop()
        state = module.Requests(loop, TIMEOUT_MS, 2, "tick", "sweep", "expire")
        first = state.request(16, b"abc", None)
        assert first == Token(1) and state.last_id == 1
        second = state.request(16, b"", 40)          # its own timer, no sweep
        assert second == Token(2) and state.last_id == 2
        assert state.request(16, b"", None) is None and state.has_room() is False
        assert bytes(state.out) == (HEADER.pack(3, 16, 0, 1) + b"abc" + HEADER.pack(0, 16, 0, 2))
        assert loop.log == [("at", 1000.125 + 0.25, "sweep", ()), ("soon", "tick", ()),
                            ("later", 0.04, "expire", (2,))]
        assert state.forget(2) and not state.forget(2)
        assert loop.log[-1] == ("cancel", 3)          # the own timer goes with its entry
        assert state.has_room()
        state.closed = True
        assert state.request(16, b"", None) is None


def test_a_refused_body_changes_nothing():
    for module in TWINS:
        loop = FakeLoop()
        state = module.Requests(loop, TIMEOUT_MS, 2, "tick", "sweep", "expire")
        try:
            state.request(16, 5, None)
        except TypeError:
            pass
        else:
            raise AssertionError(f"{module.__name__}: an int body was framed")
        assert (bytes(state.out), state.pending, state.next_id, loop.log) == (b"", {}, 1, [])


def test_a_new_default_timeout_applies_to_later_requests():
    """AsyncClient.timeout_ms is settable (it was a plain attribute): the
    state takes it for the deadlines of the requests sent afterwards."""
    for module in TWINS:
        loop = FakeLoop()
        state = module.Requests(loop, TIMEOUT_MS, 4, "tick", "sweep", "expire")
        state.request(16, b"", None)
        state.timeout_ms = 1000
        state.request(16, b"", None)
        state.request(16, b"", TIMEOUT_MS)            # no longer the default: a timer
        assert state.timeout_ms == 1000
        assert [entry[3] for entry in state.pending.values()] == [
            1000.125 + 0.25, 1000.25 + 1.0, 0.0], module.__name__
        assert loop.log[-1] == ("later", 0.25, "expire", (3,))
