"""The lockstep harness of the kernel-versus-reference test
(tests/core/test_differential.py): two implementations on one Clock and on
code sources loaded with the same draws, every step sent to both and every
reply compared, then the canonical tables of the scope and the accounting
invariants. (tests/support/differential_pair.py is the lighter harness the
money and membership differential tests share.)"""
from __future__ import annotations

import numpy as np

from engine.core import canonical
from engine.protocol.errors import EngineError
from support.clock import Clock
from support.differential_pair import strip_messages
from support.reference import Reference

CODE_BASE = 10**17


class CodeSource:
    """Codes for one implementation. Before every step the harness loads both
    sources with the same short list (drawn from a tiny pool, so a draw often
    equals a code issued before and must be drawn again); past the list it
    returns fresh codes from a per-step base. So the two implementations get
    the same codes even if one drew a different number of times in an
    earlier step."""

    def __init__(self):
        self.queue: list[int] = []
        self.base = CODE_BASE + 10**9
        self.n = 0

    def load(self, queue: list[int], step: int) -> None:
        self.queue = list(queue)
        self.base = CODE_BASE + 10**9 * (step + 1)
        self.n = 0

    def __call__(self) -> int:
        if self.queue:
            return self.queue.pop(0)
        self.n += 1
        return self.base + self.n


# ---------------------------------------------------------------------------
# The harness
# ---------------------------------------------------------------------------

class Pair:
    """Two implementations driven in lockstep; every reply compared."""

    def __init__(self, make_a, make_b, t0: int):
        self.clock = Clock(t0)
        self.codes_a, self.codes_b = CodeSource(), CodeSource()
        self.a = make_a(clock=self.clock, code_source=self.codes_a)
        self.b = make_b(clock=self.clock, code_source=self.codes_b)
        self.step = 0
        self.log: list[str] = []
        self.issued_codes: list[int] = []
        self.pay_history: list = []

    def _both(self, what: str, fn):
        self.step += 1
        self.log.append(what)
        out = []
        for impl in (self.a, self.b):
            try:
                out.append(("ok", fn(impl)))
            except EngineError as e:
                out.append(("raises", type(e).__name__))
        (ka, va), (kb, vb) = out
        context = "\n".join(self.log[-12:])
        assert ka == kb, f"one raised, one did not: {out}\nlast steps:\n{context}"
        if ka == "raises":
            assert va == vb, f"different errors {va} vs {vb}\nlast steps:\n{context}"
            return None
        if isinstance(va, np.ndarray):
            assert va.dtype == vb.dtype, f"dtypes {va.dtype} vs {vb.dtype}"
            assert np.array_equal(va, vb) and va.tobytes() == vb.tobytes(), (
                f"record results differ at step {self.step}:\nengine    {va}\nreference {vb}"
                f"\nlast steps:\n{context}")
        else:
            sa, sb = strip_messages(va), strip_messages(vb)
            assert sa == sb, (f"map replies differ at step {self.step}:\nengine    {sa}\n"
                              f"reference {sb}\nlast steps:\n{context}")
        return vb

    @staticmethod
    def _show(records) -> str:
        if len(records) > 8:
            return f"<{len(records)} records>"
        return str([tuple(v.tolist() if isinstance(v, np.ndarray) else v for v in r.item())
                    for r in records])

    def pay(self, records):
        res = self._both(f"pay {self._show(records)}", lambda e: e.pay(records.copy()))
        if res is not None:
            self.pay_history.extend(records.tolist())
        return res

    def issue(self, records):
        return self._both(f"issue {self._show(records)}", lambda e: e.issue(records.copy()))

    def call(self, op, request, code_queue=()):
        self.codes_a.load(list(code_queue), self.step)
        self.codes_b.load(list(code_queue), self.step)
        reply = self._both(f"call {op} {request!r}", lambda e: e.call(op, request))
        if op == "PAYMENT_CODE" and reply and reply.get("status") == 0:
            self.issued_codes.append(reply["code"])
        return reply

    def held(self, payer: int) -> list[int]:
        """Coupon ids the payer (a user id, or a payment code) holds, read from
        the reference side (used only to steer the random requests)."""
        ref = self.b
        code = ref.codes.get(payer)
        user = code.user if code is not None else payer
        return [c.id for c in ref.coupons.values() if c.user == user]

    def tick(self, ms):
        self.clock.now_ms += ms
        self.log.append(f"clock += {ms} -> {self.clock.now_ms}")

    def finish(self):
        ta, tb = in_scope(self.a.canonical()), in_scope(self.b.canonical())
        problems = canonical.diff(ta, tb)
        assert not problems, "canonical tables differ:\n" + "\n".join(problems) + \
            "\nsteps:\n" + "\n".join(self.log)
        assert scope_digest(ta) == scope_digest(tb)
        if not isinstance(self.a, Reference):
            # AUDIT of the engine. (engine/core/audit.py also checks the tables of
            # later work, membership and analytics, which this reference leaves
            # empty; the reference is checked by check_invariants below.)
            report = self.a.call("AUDIT", {})
            assert report["ok"] is True, report
        check_invariants(tb)


# The canonical tables and columns this scope defines. The engine's tables
# already hold the state of later work (campaign-control days, membership and
# analytics tables); those are compared by the differential tests of that work
# (tests/core/test_differential_money.py, ...), not here.
OUT_OF_SCOPE_COLUMNS: dict = {}
SCOPE_TABLES = ("meta", "users", "merchants", "merchant_tags", "stocks", "stock_lists",
                "stock_slots", "coupons", "payments", "topups", "codes", "refunds",
                "tombstones", "settlements")


def in_scope(tables: dict) -> dict:
    """The tables of SCOPE_TABLES without the columns of later work; a table
    of later work absent from an implementation counts as empty."""
    out = {}
    for name, (dtype, _key) in canonical.TABLES.items():
        table = tables.get(name, np.zeros(0, dtype))
        if name not in SCOPE_TABLES:
            table = np.zeros(0, dtype)
        drop = OUT_OF_SCOPE_COLUMNS.get(name, ())
        if drop:
            table = table.copy()
            for col in drop:
                table[col] = 0
        out[name] = table
    return out


def scope_digest(tables: dict) -> str:
    return canonical.digest(tables)


def check_invariants(t: dict) -> None:
    """Accounting invariants of docs/reference/rules.md on canonical tables (independent of
    engine/core/audit.py, so the reference is checked even before it exists)."""
    meta = t["meta"][0]
    total = (int(t["users"]["balance"].sum()) + int(t["merchants"]["balance"].sum())
             + int(t["stocks"]["campaign"].sum()) + int(meta["fees"]) + int(meta["bank"]))
    assert total == 0, f"balances sum to {total}"
    assert (t["users"]["balance"] >= 0).all()
    for s in t["stocks"]:
        if s["funder"] == canonical.FUNDER_PLATFORM:
            assert s["campaign"] == -s["spent"]
        if s["budget"]:
            assert s["spent"] + s["reserved"] <= s["budget"]
        if s["max_issued"]:
            assert s["issued"] <= s["max_issued"]
    used = t["coupons"][t["coupons"]["state"] == canonical.COUPON_USED]
    applied_ids = [int(c) for p in t["payments"] for c in p["result"]["coupons"] if c]
    assert sorted(applied_ids) == sorted(int(c) for c in used["id"])
    assert len(applied_ids) == len(set(applied_ids))
    for p in t["payments"]:
        r = p["result"]
        assert r["cash"] + r["discount"] == p["request"]["amount"]
        assert int(p["applied"].sum()) == r["discount"]
