import pytest

from pool import WorkerPool


@pytest.fixture(scope="session")
def pool():
    """The gloo worker processes, started on first use and stopped at the end of the session."""
    workers = WorkerPool()
    yield workers
    workers.close()
