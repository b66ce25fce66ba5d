"""The fixture of every client test folder: `impl`."""
import pytest

from engine import client as client_module


@pytest.fixture(params=sorted(client_module.IMPLEMENTATIONS))
def impl(request):
    """Every client test runs on the compiled hot path and on its Python twin."""
    before = client_module.use_implementation(request.param)
    try:
        yield request.param
    finally:
        client_module.use_implementation(before)
