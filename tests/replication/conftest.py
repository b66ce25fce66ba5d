"""One NATS JetStream cluster per test module (starting one takes seconds);
each test gets the stream and the lease bucket fresh."""
import pytest

from support.nats import LogHarness, start_cluster


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory):
    cluster = start_cluster(str(tmp_path_factory.mktemp("nats")), nodes=3)
    yield cluster
    cluster.stop()


@pytest.fixture
def logs(nats_cluster):
    harness = LogHarness(nats_cluster)
    harness.delete_stream()
    yield harness
    harness.delete_stream()
    harness.close()
