"""Suite-wide fixtures: tests marked ``one_at_a_time`` run one after another across xdist workers."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

# Property tests judge what is generated, not how fast: beside five other workers on two cores
# input generation alone can take over a second, which Hypothesis's speed check would fail.
settings.register_profile("suite", suppress_health_check=[HealthCheck.too_slow], deadline=None)
settings.load_profile("suite")

# Longer than any one of the marked tests takes on a loaded machine, shorter than pytest's timeout.
_LOCK_WAIT_S = 600.0


@pytest.fixture(autouse=True)
def _one_at_a_time(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Holds the session's one-at-a-time lock for a marked test's setup, run and teardown."""
    if request.node.get_closest_marker("one_at_a_time") is None:
        yield
        return
    # Every worker's base directory is a child of the session's: the lock file is the session's own.
    base = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        base = base.parent
    with (base / "one-at-a-time.lock").open("a") as lock:
        deadline = time.monotonic() + _LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"{request.node.nodeid}: another one_at_a_time test held {lock.name} for "
                        f"{_LOCK_WAIT_S:g} s: look for a hung test in the other workers"
                    )
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
