"""The harness the lifecycle and membership differential tests share: one
engine and one reference on one clock and one code source, every step sent
to both and compared."""
from __future__ import annotations

import numpy as np

from engine import Engine

from engine.core import audit, canonical
from engine.protocol.limits import PAYMENT_CODE_MIN
from support.clock import Clock

HOLD_MS = 10_000


class Codes:
    """A deterministic code source; both sides draw the same sequence."""

    def __init__(self):
        self.n = 0

    def __call__(self) -> int:
        self.n += 1
        return PAYMENT_CODE_MIN + 1000 * self.n


def strip_messages(value):
    """Map replies without their free-text `message` keys."""
    if isinstance(value, dict):
        return {k: strip_messages(v) for k, v in value.items() if k != "message"}
    if isinstance(value, list):
        return [strip_messages(v) for v in value]
    return value


class Pair:
    """The engine and `reference_class` on one clock; every step goes to both."""

    def __init__(self, reference_class, t0: int):
        self.clock = Clock(t0)
        self.eng = Engine(clock=self.clock, code_source=Codes(), hold_ms=HOLD_MS)
        self.ref = reference_class(clock=self.clock, code_source=Codes(), hold_ms=HOLD_MS)
        self.log = []                 # the op sequence, for a readable failure

    def _both(self, what, fn):
        self.log.append(what)
        a, b = fn(self.eng), fn(self.ref)
        if isinstance(a, np.ndarray):
            assert np.array_equal(a, b), self._failure(f"engine    {a}\n reference {b}")
        else:
            a, b = strip_messages(a), strip_messages(b)
            assert a == b, self._failure(f"engine    {a}\n reference {b}")
        return a

    def _failure(self, text: str) -> str:
        steps = "\n".join(f"  {i}: {s}" for i, s in enumerate(self.log[-40:]))
        return f"mismatch at the last step:\n{steps}\n {text}"

    def call(self, op, request):
        return self._both(f"call({op!r}, {request!r})", lambda x: x.call(op, request))

    def batch(self, method, records):
        return self._both(f"{method}({records.tolist()!r})",
                          lambda x: getattr(x, method)(records.copy()))

    def assert_same_tables(self, tables=None) -> None:
        """The canonical tables of the engine and the reference (those named,
        or all) are equal, so are their digests, and AUDIT holds on the
        reference's."""
        a, b = self.eng.canonical(), self.ref.canonical()
        if tables is not None:
            a, b = {n: a[n] for n in tables}, {n: b[n] for n in tables}
        differences = canonical.diff(a, b)
        assert not differences, self._failure("canonical tables differ (engine vs reference):\n"
                                              + "\n".join(differences))
        assert canonical.digest(a) == canonical.digest(b)
        report = audit.audit(b)
        assert report["ok"], {k: v for k, v in report["checks"].items() if not v["ok"]}

    def tick(self, ms: int):
        self.log.append(f"clock += {ms}")
        self.clock.now_ms += ms
