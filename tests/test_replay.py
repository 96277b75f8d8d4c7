"""Replays of recorded legacy engine traffic (tests/captures/*.json) against our kernel.

Each capture's incoming frames go, unchanged, to a Kernel on real sockets
(tests/harness.py); what it sends is compared with what the legacy engine sent,
after normalising volatile values and applying the intended differences of
tests/captures/README.md (streamkernel/capture.py).
"""
from __future__ import annotations

import asyncio
import glob
import importlib
import os
import re
import threading
import time

import pytest
import zmq
from tornado.ioloop import IOLoop

from streamkernel.capture import INTENDED, Capture, compare, overrides_for
from streamkernel.config import EngineConfig
from streamkernel.engine import Engine
from streamkernel.replay import EngineTarget, replay

from .harness import CAPTURES, KernelHarness

CAPTURE_FILES = sorted(glob.glob(os.path.join(CAPTURES, "*.json")))
README = os.path.join(CAPTURES, "README.md")

#: Totals for the summary line (tests/conftest.py prints them).
STATS = {"captures": 0, "compared": 0, "registrations": 0}


def _legacy_support() -> bool:
    try:
        importlib.import_module("streamkernel.legacy")
    except ImportError:
        return False
    return True


LEGACY_SUPPORT = _legacy_support()
NO_LEGACY = ("apply requests carry Python 2 pickles: replaying them needs Python 2 client "
             "support (streamkernel.legacy), which is not importable")


def _captures(kind: str) -> list:
    params = []
    for path in CAPTURE_FILES:
        cap = Capture.load(path)
        if kind == "requests" and cap.requests():
            marks = []
            if "apply_request" in cap.msg_types("in") and not LEGACY_SUPPORT:
                marks.append(pytest.mark.xfail(strict=True, reason=NO_LEGACY))
            params.append(pytest.param(path, id=cap.scenario, marks=marks))
        elif kind == "registration" and cap.select("registration", "out"):
            params.append(pytest.param(path, id=cap.scenario))
    return params


def documented() -> dict[str, set[str]]:
    """The intended-differences table of tests/captures/README.md: id -> captures."""
    table: dict[str, set[str]] = {}
    with open(README) as f:
        for line in f:
            m = re.match(r"^\| `([a-z0-9-]+)` \|(.*)\|\s*$", line)
            if m:
                captures = m.group(2).split("|")[-1]
                table[m.group(1)] = {c.strip() for c in captures.split(",") if c.strip()}
    return table


@pytest.mark.parametrize("path", _captures("requests"))
def test_replay(path: str) -> None:
    cap = Capture.load(path)
    harness = KernelHarness(key=cap.exec_key.encode(), engine_id=cap.engine_ident,
                            int_id=cap.engine_id, peers=cap.peers())
    try:
        result = replay(cap, harness)
        shut_down = ("shutdown_request" not in cap.msg_types("in")
                     or harness.shutdown_called.wait(3))
    finally:
        harness.close()
    report = compare(cap, result.messages, overrides=overrides_for(cap),
                     problems=result.problems)
    STATS["captures"] += 1
    STATS["compared"] += report.compared
    if not report.ok:
        pytest.fail(report.format(verbose=True), pytrace=False)
    want = {rule for rule, caps in documented().items() if cap.scenario in caps}
    assert report.rules() == want, (
        "intended differences that showed up differ from tests/captures/README.md:\n"
        + report.format(verbose=True))
    assert shut_down, "shutdown_reply sent but the kernel did not shut down"


@pytest.mark.parametrize("path", _captures("registration"))
def test_registration_request(path: str) -> None:
    """Our Engine's registration_request against a stub hub matches the recorded one."""
    cap = Capture.load(path)
    with EngineTarget(cap) as target:
        report = compare(cap, target.registration[:1], our_ident=target.ident,
                         streams=("registration",))
    STATS["registrations"] += report.compared
    if not (report.compared == 1 and report.ok):
        pytest.fail(report.format(verbose=True), pytrace=False)


def test_engine_accepts_the_recorded_registration_reply() -> None:
    """The legacy hub's registration_reply, fed unchanged, registers our Engine."""
    cap = Capture.load(os.path.join(CAPTURES, "registration.json"))
    reply = cap.select("registration", "in")[0]
    context = zmq.Context()
    hub = context.socket(zmq.ROUTER)
    hub.linger = 0
    url = "tcp://127.0.0.1:%d" % hub.bind_to_random_port("tcp://127.0.0.1")
    box: dict = {}
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(asyncio.new_event_loop())
        loop = IOLoop.current()
        box["loop"] = loop
        engine = box["engine"] = Engine(EngineConfig(url=url, exec_key=cap.exec_key,
                                                     heartbeat_timeout=0), loop=loop)
        engine.start()
        ready.set()
        try:
            loop.start()
        finally:
            engine.close()
            loop.close(all_fds=False)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert ready.wait(5)
        assert hub.poll(5000)
        routing = hub.recv_multipart()[0]
        hub.send_multipart([routing] + reply.frames)
        deadline = time.monotonic() + 5
        while box["engine"].kernel is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert box["engine"].id == cap.engine_id
        assert box["engine"].kernel is not None and box["engine"].exit_code is None
    finally:
        if "loop" in box:
            box["loop"].add_callback(box["engine"].exit, 0)
        thread.join(10)
        hub.close(linger=0)
        context.term()


def test_every_intended_difference_is_documented_and_shows_up() -> None:
    table = documented()
    assert set(table) == set(INTENDED), "README table ids differ from capture.INTENDED"
    scenarios = {Capture.load(p).scenario for p in CAPTURE_FILES}
    for rule, caps in table.items():
        assert caps, "%s is listed without a capture that shows it" % rule
        assert caps <= scenarios, "%s names unknown captures %s" % (rule, caps - scenarios)


def test_every_expectation_file_belongs_to_a_capture() -> None:
    scenarios = {Capture.load(p).scenario: p for p in CAPTURE_FILES}
    for path in glob.glob(os.path.join(CAPTURES, "intended", "*.json")):
        name = os.path.basename(path)[:-len(".json")]
        assert name in scenarios, "%s has no capture" % path
        cap = Capture.load(scenarios[name])
        ids = {m.msg_id for m in cap.requests()}
        for override in overrides_for(cap):
            assert override.msg_id in ids
