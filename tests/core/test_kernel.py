"""The kernel's boundary: the suite runs on the debug kernel, whose checks
raise where money moves; Python reads the tables through read-only views and
every posting is a kernel function (issue 15)."""
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import engine._kernel as kernel
from engine.protocol.records import PAY_NO_COUPONS, PAY_RECORD, PAY_RESULT
from engine._kernel import InvariantError, Ledger

# The repository root, wherever this file sits under tests/.
ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").exists())


def wallet(balance: int) -> tuple[Ledger, int]:
    ledger = Ledger()
    user = ledger.append("users", 7)
    ledger.topup(user, balance)
    return ledger, user


def test_the_suite_runs_on_the_debug_kernel():
    # .ci/run and README.md build with SCANPAY_KERNEL_DEBUG=1.
    assert kernel.DEBUG is True


def test_a_hold_above_the_balance_raises_at_the_next_posting():
    ledger, user = wallet(100)
    ledger.check_invariants()                    # sound so far
    ledger._debug_set_held(user, 150)            # held > balance: a kernel bug
    with pytest.raises(InvariantError, match="topup: wallet"):
        ledger.topup(user, 1)


def test_a_broken_wallet_raises_in_the_pay_batch_that_posts_to_it():
    ledger, user = wallet(100)
    merchant = ledger.append("merchants", 9)
    ledger.configure("merchants", merchant, {"active": 1})
    records = np.zeros(2, PAY_RECORD)
    records["id"], records["payer"], records["merchant"] = [1, 2], 7, 9
    records["amount"], records["flags"] = 10, PAY_NO_COUPONS
    out = np.zeros(2, PAY_RESULT)
    ledger.pay(records[:1].tobytes(), 0, out[:1].view(np.uint8))
    assert out["status"][0] == 0                 # sound: the check is silent
    ledger._debug_set_held(user, -1)             # a kernel bug
    with pytest.raises(InvariantError, match="pay: wallet"):
        ledger.pay(records[1:].tobytes(), 0, out[1:].view(np.uint8))
    ledger._debug_set_held(user, 0)
    ledger.check_invariants()                    # reported once, then cleared


def test_topup_posts_both_sides_and_checks_its_arguments():
    ledger, user = wallet(100)
    assert (int(ledger.users["balance"][user]), ledger.bank) == (100, -100)
    with pytest.raises(ValueError):
        ledger.topup(user, 0)
    with pytest.raises(IndexError):
        ledger.topup(user + 1, 5)
    assert (int(ledger.users["balance"][user]), ledger.bank) == (100, -100)


def test_python_cannot_write_the_tables_or_the_accounts():
    ledger, user = wallet(100)
    with pytest.raises(ValueError):             # numpy: assignment destination is read-only
        ledger.users["balance"][user] = 10**6
    with pytest.raises(AttributeError):
        ledger.bank = 0
    with pytest.raises(AttributeError):
        ledger.n_users = 0
    arrays, _scalars = ledger.dump()
    assert not arrays["users"].flags.writeable
    assert int(ledger.users["balance"][user]) == 100


def test_configure_sets_definitions_only():
    ledger, user = wallet(100)
    merchant = ledger.append("merchants", 9)
    ledger.configure("merchants", merchant, {"fee_bps": 30, "active": 1})
    assert int(ledger.merchants["fee_bps"][merchant]) == 30
    for table, slot, field in (("merchants", merchant, "balance"), ("users", user, "balance"),
                               ("merchants", merchant, "period_active")):
        with pytest.raises(ValueError):
            ledger.configure(table, slot, {field: 1})
    with pytest.raises(IndexError):
        ledger.configure("merchants", merchant + 1, {"fee_bps": 1})
    assert int(ledger.merchants["balance"][merchant]) == 0


def test_a_ledger_loaded_from_another_ones_dump_shares_no_rows():
    ledger, user = wallet(100)
    copy = Ledger.load(*ledger.dump())
    copy.topup(user, 5)
    assert int(copy.users["balance"][user]) == 105
    assert int(ledger.users["balance"][user]) == 100


def test_load_refuses_tables_it_cannot_take_with_a_real_error():
    """Not an assert (python -O drops those): the kernel would run past its rows."""
    ledger, _user = wallet(100)
    arrays, scalars = ledger.dump()
    assert issubclass(kernel.LayoutError, ValueError)
    with pytest.raises(kernel.LayoutError, match="users index: 12 entries"):
        Ledger.load(dict(arrays, users_ix=arrays["users_ix"][:12]), scalars)
    with pytest.raises(kernel.LayoutError, match="auth_head is 1"):
        Ledger.load(arrays, dict(scalars, auth_head=1))
    with pytest.raises(kernel.LayoutError, match="slots: n_slots is 1, for 0 rows"):
        Ledger.load(arrays, dict(scalars, n_slots=1))
    assert Ledger.load(arrays, scalars).dump()[1] == scalars


def test_ci_runs_the_readme_test_command_with_the_debug_kernel():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert "SCANPAY_KERNEL_DEBUG=1 .venv/bin/pip install" in ci
    assert ci in (ROOT / "README.md").read_text()


def test_the_generated_struct_layouts_are_up_to_date():
    # ext/kernel/layout.pxi is generated from ext/tables.pxd.
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "generate_layout.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_dtype_that_differs_from_its_struct_by_one_offset_refuses_to_load(monkeypatch):
    kernel.check_layouts()                       # the real dtypes match
    names = list(kernel.USER.names)
    swapped = np.dtype({"names": names, "formats": [kernel.USER.fields[n][0] for n in names],
                        "offsets": [kernel.USER.fields[n][1] for n in names],
                        "itemsize": kernel.USER.itemsize})
    fields = {n: kernel.USER.fields[n] for n in names}
    # balance and held swap places: same total size, wrong offsets.
    order = ["id", "held", "balance"] + names[3:]
    moved = np.dtype({"names": order, "formats": [fields[n][0] for n in order],
                      "offsets": [fields[n][1] for n in names],
                      "itemsize": kernel.USER.itemsize})
    assert moved.itemsize == kernel.USER.itemsize and swapped == kernel.USER
    monkeypatch.setattr(kernel, "USER", moved)
    with pytest.raises(ImportError, match="User"):
        kernel.check_layouts()


def test_a_kernel_constant_that_differs_from_its_owner_refuses_to_load(monkeypatch):
    kernel.check_constants()                     # the real owners agree
    monkeypatch.setattr(kernel, "_limits", SimpleNamespace(
        COUPONS_PER_PAYMENT_MAX=5, TAGS_PER_MERCHANT_MAX=16))
    with pytest.raises(ImportError, match="COUPONS_PER_PAYMENT_MAX"):
        kernel.check_constants()
