"""An `fs` for the journal: the os calls it makes, counted, with injectable
failures (EIO, ENOSPC, short and partial writes)."""
import collections
import os
import threading


class FaultyFs:
    """The os calls the journal makes, counted, with injectable failures."""

    def __init__(self):
        self.calls = collections.Counter()
        self.faults = {}  # name -> [successful calls left, errno]
        self.write_bytes_max = None  # Simulates short writes.
        self.partial_then_fail = False  # On a pwritev fault, first write half.

    def fail(self, name, error, after=0):
        self.faults[name] = [after, error]

    def heal(self):
        self.faults.clear()

    def _check(self, name):
        self.calls[name] += 1
        fault = self.faults.get(name)
        if fault is not None:
            if fault[0] > 0:
                fault[0] -= 1
            else:
                raise OSError(fault[1], os.strerror(fault[1]))

    def open(self, *args):
        self._check("open")
        return os.open(*args)

    def pwritev(self, fd, buffers, offset):
        try:
            self._check("pwritev")
        except OSError:
            if self.partial_then_fail and buffers:
                half = b"".join(bytes(b) for b in buffers)
                os.pwrite(fd, half[:max(1, len(half) // 2)], offset)
                self.partial_then_fail = False
                return max(1, len(half) // 2)
            raise
        if self.write_bytes_max is not None:
            data = b"".join(bytes(b) for b in buffers)[:self.write_bytes_max]
            return os.pwrite(fd, data, offset)
        return os.pwritev(fd, buffers, offset)

    def fdatasync(self, fd):
        self._check("fdatasync")
        os.fdatasync(fd)

    def fsync(self, fd):
        self._check("fsync")
        os.fsync(fd)

    def ftruncate(self, fd, length):
        self._check("ftruncate")
        os.ftruncate(fd, length)

    def close(self, fd):
        self._check("close")
        os.close(fd)

    def unlink(self, path):
        self._check("unlink")
        os.unlink(path)


class GatedFs(FaultyFs):
    """A FaultyFs whose next fdatasync, once `hold_next` is called, waits at a
    gate and then succeeds whatever faults are armed: a test can pipeline
    commands behind that fsync, arm a fault for the fsyncs after it, and
    open the gate."""

    def __init__(self):
        super().__init__()
        self.gate = None
        self.entered = threading.Event()    # the held fdatasync has begun

    def hold_next(self) -> threading.Event:
        self.entered.clear()
        self.gate = threading.Event()
        return self.gate

    def fdatasync(self, fd):
        gate, self.gate = self.gate, None
        if gate is None:
            return super().fdatasync(fd)
        self.calls["fdatasync"] += 1
        self.entered.set()
        if not gate.wait(30):
            raise AssertionError("the test never opened the gate")
        os.fdatasync(fd)
