"""Shared fixtures: zmq context and sockets, sessions, a kernel on real sockets, captures."""
from __future__ import annotations

import threading
from typing import Any, Callable, Iterator

import pytest
import zmq

from streamkernel.session import Session

from .harness import KEY, KernelHarness, load_capture


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    t = threading.Thread(target=ctx.term, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "zmq context did not terminate: a socket was left open"


@pytest.fixture
def socket(context: zmq.Context) -> Iterator[Callable[[int], zmq.Socket]]:
    made: list[zmq.Socket] = []

    def make(kind: int) -> zmq.Socket:
        s = context.socket(kind)
        s.linger = 0
        made.append(s)
        return s
    yield make
    for s in made:
        s.close(linger=0)


@pytest.fixture
def session() -> Session:
    return Session(KEY)


@pytest.fixture
def harness() -> Iterator[KernelHarness]:
    h = KernelHarness()
    yield h
    h.close()


@pytest.fixture
def make_harness() -> Iterator[Callable[..., KernelHarness]]:
    made: list[KernelHarness] = []

    def make(**kwargs: Any) -> KernelHarness:
        h = KernelHarness(**kwargs)
        made.append(h)
        return h
    yield make
    for h in made:
        h.close()


@pytest.fixture
def capture() -> Callable[[str], dict]:
    return load_capture


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """One line of replay totals when tests/test_replay.py ran."""
    import sys
    replays = sys.modules.get("tests.test_replay")
    stats = getattr(replays, "STATS", None)
    if stats and stats["captures"]:
        terminalreporter.write_line(
            "capture replays: %d captures replayed, %d messages compared, "
            "%d registration requests compared" % (stats["captures"], stats["compared"],
                                                   stats["registrations"]))
