"""Shared test setup: bounded hypothesis profiles, AUDIT after every test,
and the fixtures many folders use (clock, ledger_impl, real). What they are
built from lives in tests/support/.

Every Engine a test creates is audited when the test ends: whatever the test
did, every invariant of AUDIT must still hold. A test that corrupts state on
purpose marks itself `@pytest.mark.no_audit`.
"""
import os

import pytest
from hypothesis import HealthCheck, settings

import engine.core.engine as engine_module
from support.clock import Clock
from support.ledgers import LEDGER_IMPLS, ReferenceLedger, audit_reference
from support.servers import RealServer

settings.register_profile(
    "ci", max_examples=100, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "long", max_examples=1000, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "thorough", max_examples=2000, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    config.addinivalue_line("markers", "no_audit: the test corrupts state on purpose")


@pytest.fixture(autouse=True)
def audit_every_engine(request, monkeypatch):
    created = []
    original_init = engine_module.Engine.__init__

    def tracking_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        created.append(self)

    monkeypatch.setattr(engine_module.Engine, "__init__", tracking_init)
    yield
    if request.node.get_closest_marker("no_audit"):
        return
    for eng in created:
        report = eng.audit()
        failed = {k: v["detail"] for k, v in report["checks"].items() if not v["ok"]}
        assert report["ok"], f"AUDIT failed after the test: {failed}"


@pytest.fixture
def clock():
    """A fresh settable Clock at T0_MS (tests/support/clock.py)."""
    return Clock()


@pytest.fixture(params=sorted(LEDGER_IMPLS))
def ledger_impl(request):
    """Make a ledger of each implementation in turn: the Engine and the
    plain-Python reference (tests/support/ledgers.py). Every reference the
    test made is audited at the end, as every Engine is."""
    made = []

    def make(**kwargs):
        ledger = LEDGER_IMPLS[request.param](**kwargs)
        made.append(ledger)
        return ledger

    yield make
    if request.node.get_closest_marker("no_audit"):
        return
    for ledger in made:
        if isinstance(ledger, ReferenceLedger):
            audit_reference(ledger)


@pytest.fixture
def real():
    """A real server over an in-memory Engine, on its own thread (tests/support/servers.py)."""
    with RealServer() as server:
        yield server
