"""ext/outlet.pyx on its own: the sender thread's sends keep each
connection's order, stop at the first short send, and never send a member
whose predecessor was not sent whole; the courier hands each fsync's sends
to the sender thread, which sends them without the GIL."""
import ctypes
import socket
import threading
import time

import pytest

from engine._outlet import Courier, Outlet, Sends


def receive_all(sock, size_max=1 << 22) -> bytes:
    sock.setblocking(False)
    out = bytearray()
    while len(out) < size_max:
        try:
            chunk = sock.recv(1 << 16)
        except BlockingIOError:
            break
        if not chunk:
            break
        out += chunk
    return bytes(out)


def send(sends) -> int:
    """What the sender thread does with a handed Sends; how many entries went
    out whole."""
    courier = Courier(1)
    assert courier.put(sends)
    assert courier.next_sent() is sends and sends.finished
    return sends.whole


def release_all(outlet, count):
    for _ in range(count):
        outlet.released()


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_entries_of_one_outlet_go_out_in_order_in_one_sendmsg(pair):
    a, b = pair
    outlet = Outlet(a.fileno())
    other_a, other_b = socket.socketpair()
    other = Outlet(other_a.fileno())
    sends = Sends()
    buffer = b"0123456789abcdef"
    assert sends.add(outlet, buffer, 0, 4) == 0
    assert sends.add(other, buffer, 4, 8) == 1
    assert sends.add(outlet, buffer, 8, 16) == 2
    sends.hand()
    assert sends.add(outlet, buffer, 0, 1) == -1       # handed over: no more entries
    assert send(sends) == 3 and sends.finished
    assert [sends.sent(i) for i in range(3)] == [4, 4, 8]
    assert receive_all(b) == b"012389abcdef"
    assert receive_all(other_b) == b"4567"
    assert not outlet.blocked and outlet.outstanding == 2
    release_all(outlet, 2)
    release_all(other, 1)
    other.close()
    other_a.close()
    other_b.close()
    outlet.close()


def test_a_full_socket_blocks_the_outlet_until_reset(pair):
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    outlet = Outlet(a.fileno())
    big = bytes(range(256)) * 4096                      # 1 MiB: more than the socket holds
    first = Sends()
    first.add(outlet, big, 0, len(big))
    first.add(outlet, b"after", 0, 5)
    first.hand()
    assert send(first) == 0
    assert 0 < first.sent(0) < len(big) and first.sent(1) == 0
    assert outlet.blocked
    second = Sends()                                    # the next fsync's: skipped too
    second.add(outlet, b"later", 0, 5)
    second.hand()
    assert send(second) == 0 and second.sent(0) == 0
    got = receive_all(b)
    assert got == big[:first.sent(0)]                   # a prefix, nothing out of order
    release_all(outlet, 3)
    outlet.reset()                                      # the event loop wrote the rest
    third = Sends()
    third.add(outlet, b"again", 0, 5)
    third.hand()
    assert send(third) == 1
    assert receive_all(b) == b"again"
    release_all(outlet, 1)
    outlet.close()


def test_a_member_whose_sends_never_ran_blocks_the_ones_after_it(pair):
    """A Sends made after its fsync's hook ran is never sent: the event loop
    writes its entries, so a later fsync's entries for the same connection
    must not go out before them."""
    a, b = pair
    outlet = Outlet(a.fileno())
    missed = Sends()
    missed.add(outlet, b"first", 0, 5)
    missed.close()                                      # released by the event loop instead
    later = Sends()
    later.add(outlet, b"second", 0, 6)
    later.hand()
    assert send(later) == 0 and later.sent(0) == 0
    assert outlet.blocked and receive_all(b) == b""
    release_all(outlet, 2)
    outlet.close()


def test_a_closed_peer_blocks_without_raising(pair):
    a, b = pair
    outlet = Outlet(a.fileno())
    b.close()
    sends = Sends()
    sends.add(outlet, b"nobody", 0, 6)
    sends.hand()
    assert send(sends) == 0 and outlet.blocked      # EPIPE, no SIGPIPE
    release_all(outlet, 1)
    outlet.close()
    with pytest.raises(AssertionError):
        Outlet(a.fileno()).released()                   # nothing outstanding


def handed(outlet, data: bytes) -> Sends:
    sends = Sends()
    sends.add(outlet, data, 0, len(data))
    sends.hand()
    return sends


def test_the_courier_sends_each_fsyncs_replies_in_order_then_ends_when_closed(pair):
    a, b = pair
    outlet = Outlet(a.fileno())
    courier = Courier(4)
    batches = [handed(outlet, f"fsync {k};".encode()) for k in range(3)]
    assert all(courier.put(sends) for sends in batches)
    sent = [courier.next_sent() for _ in batches]
    assert sent == batches and all(sends.finished and sends.finished_at > 0 for sends in sent)
    assert receive_all(b) == b"fsync 0;fsync 1;fsync 2;"
    courier.close()
    assert courier.next_sent() is None
    assert not courier.put(handed(outlet, b"late"))     # closed: the event loop writes it
    release_all(outlet, 4)
    outlet.close()


def test_a_full_courier_refuses_and_abandoned_sends_send_nothing(pair):
    a, b = pair
    outlet = Outlet(a.fileno())
    courier = Courier(1)
    first, second = handed(outlet, b"first"), handed(outlet, b"second")
    assert courier.put(first) and not courier.put(second)
    second.abandon()
    assert second.finished and second.sent(0) == 0
    assert courier.next_sent() is first
    assert receive_all(b) == b"first"
    release_all(outlet, 2)
    outlet.close()


class PollFd(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_int), ("events", ctypes.c_short), ("revents", ctypes.c_short)]


def readable_while_holding_the_gil(sock, timeout_ms: int) -> bool:
    """poll(2) called through ctypes.PyDLL, which keeps the GIL for the whole
    call: True only if another thread made `sock` readable without the GIL."""
    fd = PollFd(sock.fileno(), 1, 0)                    # POLLIN
    return ctypes.PyDLL(None).poll(ctypes.byref(fd), 1, timeout_ms) == 1


def test_the_courier_sends_while_another_thread_holds_the_gil(pair):
    """The sender thread waits and sends without the GIL: a reply goes out
    while the event loop holds it."""
    a, b = pair
    outlet = Outlet(a.fileno())
    courier = Courier(2)
    done = []
    sender = threading.Thread(target=lambda: done.append(courier.next_sent()))
    sender.start()
    time.sleep(0.05)                                    # the sender waits in next_sent
    sends = handed(outlet, b"durable reply")
    assert courier.put(sends)
    assert readable_while_holding_the_gil(b, 2000)
    sender.join(5)
    assert receive_all(b) == b"durable reply"
    assert done == [sends] and sends.finished
    courier.close()
    release_all(outlet, 1)
    outlet.close()


def test_send_here_sends_on_the_calling_thread_only_when_nothing_is_queued(pair):
    """The sync thread sends a lone request's replies itself (no wake-up of
    the sender thread), but only when no earlier fsync's replies are queued
    or being sent: those must go out first."""
    a, b = pair
    outlet = Outlet(a.fileno())
    courier = Courier(4)
    lone = handed(outlet, b"lone;")
    assert courier.send_here(lone)
    assert lone.finished and lone.sent_here and lone.whole == 1
    assert receive_all(b) == b"lone;"                   # sent before it returned
    queued, behind = handed(outlet, b"queued;"), handed(outlet, b"behind;")
    assert courier.put(queued)
    assert not courier.send_here(behind)                 # would overtake `queued`
    assert not behind.finished and not behind.sent_here
    assert courier.put(behind)
    assert courier.next_sent() is queued and courier.next_sent() is behind
    assert not queued.sent_here and receive_all(b) == b"queued;behind;"
    courier.close()
    assert not courier.send_here(handed(outlet, b"late"))  # closed: the event loop writes it
    release_all(outlet, 4)
    outlet.close()


@pytest.fixture
def syncer():
    """A Syncer with its thread serving, and the Courier it sends through."""
    from engine._outlet import Syncer
    courier = Courier(4)
    syncer = Syncer(courier)
    thread = threading.Thread(target=syncer.serve, daemon=True)
    thread.start()
    yield syncer, courier
    syncer.hold_before_fdatasync(False)
    syncer.close()
    thread.join(5)
    assert not thread.is_alive()


def finished(syncer, timeout_s=5.0):
    assert syncer.wait_done(timeout_s)
    outcome = syncer.take()
    assert outcome is not None and syncer.take() is None     # taken once
    return outcome


def test_the_syncer_writes_syncs_then_sends_what_was_attached(tmp_path, pair, syncer):
    """Syncer (the lone-sync thread): pwritev at the offset, fdatasync, then
    the attached replies, all on its own thread; held before the fdatasync,
    nothing is sent; the eventfd says when it is done."""
    import os
    import select
    syncer, _courier = syncer
    a, b = pair
    outlet = Outlet(a.fileno())
    fd = os.open(tmp_path / "journal", os.O_RDWR | os.O_CREAT)
    os.pwrite(fd, b"0" * 16, 0)
    syncer.hold_before_fdatasync(True)
    syncer.start(fd, [b"abc", b"defg"], 4)
    with pytest.raises(RuntimeError):
        syncer.start(fd, [b"x"], 0)                  # one job at a time
    replies = Sends()
    assert replies.add(outlet, b"reply;", 0, 6) == 0
    assert syncer.attach(replies) and replies.handed and replies.done
    for _ in range(1000):
        if syncer.held:
            break
        time.sleep(0.001)
    assert syncer.held and not syncer.wait_done(0.05)
    assert receive_all(b) == b""                     # not before its fdatasync
    assert os.pread(fd, 16, 0) == b"0000abcdefg00000"   # written, at its offset
    assert select.select([syncer.fileno], [], [], 0)[0] == []
    syncer.hold_before_fdatasync(False)
    error, started_at, synced_at = finished(syncer)
    assert error == 0 and 0 < started_at <= synced_at <= time.perf_counter()
    assert receive_all(b) == b"reply;"
    assert replies.finished and replies.sent_here and replies.sent(0) == 6
    late = Sends()
    late.add(outlet, b"late", 0, 4)
    assert not syncer.attach(late) and not late.handed      # no job: the writer sends it
    late.withdraw()
    assert outlet.queued == 1 and outlet.outstanding == 1   # as if never added
    release_all(outlet, 1)
    os.close(fd)
    outlet.close()


def test_a_failed_sync_sends_nothing_and_says_why(tmp_path, pair, syncer):
    """The fdatasync's errno is the outcome, and the attached replies are
    left unsent (the event loop answers `unavailable` instead)."""
    import errno
    import os
    syncer, _courier = syncer
    a, b = pair
    outlet = Outlet(a.fileno())
    fd = os.open(tmp_path / "journal", os.O_RDWR | os.O_CREAT)
    syncer.fail_next_fdatasync(errno.EIO)
    syncer.hold_before_fdatasync(True)
    syncer.start(fd, [b"abc"], 0)
    replies = Sends()
    replies.add(outlet, b"reply;", 0, 6)
    assert syncer.attach(replies)
    syncer.hold_before_fdatasync(False)
    assert finished(syncer)[0] == errno.EIO
    assert replies.finished and not replies.sent_here and replies.sent(0) == 0
    assert receive_all(b) == b""
    bad = os.open(tmp_path / "journal", os.O_RDONLY)     # read only: pwritev fails
    syncer.start(bad, [b"abc"], 0)
    assert finished(syncer)[0] == errno.EBADF
    os.close(bad)
    os.close(fd)
    release_all(outlet, 1)
    outlet.close()


def test_the_syncer_waits_for_the_sender_threads_replies_first(tmp_path, pair, syncer):
    """Replies the sender thread has not sent yet are never overtaken: while
    the courier holds some, the syncer sends nothing (the event loop writes
    its replies after them)."""
    import os
    syncer, courier = syncer
    a, b = pair
    outlet = Outlet(a.fileno())
    fd = os.open(tmp_path / "journal", os.O_RDWR | os.O_CREAT)
    earlier = handed(outlet, b"earlier;")
    assert courier.put(earlier)                          # no sender thread takes it yet
    syncer.start(fd, [b"abc"], 0)
    replies = Sends()
    replies.add(outlet, b"reply;", 0, 6)
    syncer.attach(replies)
    finished(syncer)
    assert not replies.sent_here and replies.sent(0) == 0 and receive_all(b) == b""
    assert courier.next_sent() is earlier and receive_all(b) == b"earlier;"
    os.close(fd)
    release_all(outlet, 2)
    outlet.close()
