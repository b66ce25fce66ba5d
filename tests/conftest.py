"""Shared test setup: bounded hypothesis profiles, and AUDIT after every test.

Every Engine a test creates is audited when the test ends: whatever the test
did, every invariant of AUDIT must still hold. A test that corrupts state on
purpose marks itself `@pytest.mark.no_audit`.
"""
import os

import pytest
from hypothesis import HealthCheck, settings

import engine.core.engine as engine_module

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
