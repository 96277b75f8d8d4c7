#!/usr/bin/env python3
"""Measure how fast the engine reacts to interruptions and hub faults; prints JSON.

- ``sigint_reply_ms``: SIGINT to the engine while user code loops -> KeyboardInterrupt reply
- ``abort_running_reply_ms``: abort_request naming the running request -> its reply
- ``shutdown_while_running_exit_ms``: shutdown_request during a long request -> process exit
- ``heartbeat_silence_exit_s``: the hub stops pinging (connection kept) -> exit status 4,
  with ``--heartbeat-timeout`` (default 2 s)
- ``hub_gone_exit_ms``: the hub process closes its sockets -> exit status 4
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from streamkernel.testing import StubHub, py3_env, stop_process

LOOP = "import time\nwhile True: time.sleep(0.001)"


def _engine(hub: StubHub, workdir: str, *args: str) -> subprocess.Popen:
    config = hub.write_connection_file(os.path.join(workdir, "engine.json"))
    return subprocess.Popen([sys.executable, "-E", "-m", "streamkernel", "--config", config,
                             "--log-level", "ERROR", *args], env=py3_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _registered(hub: StubHub, proc: subprocess.Popen) -> int:
    eid = hub.register()
    hub.wait_beating(eid)
    time.sleep(0.2)
    return eid


def sigint_reply(hub: StubHub, proc: subprocess.Popen, eid: int) -> float:
    hub.send(eid, "execute_request", {"code": LOOP})
    time.sleep(0.3)
    t0 = time.perf_counter()
    os.kill(proc.pid, signal.SIGINT)
    reply = hub.recv(timeout=10)
    assert reply["content"]["ename"] == "KeyboardInterrupt", reply["content"]
    return (time.perf_counter() - t0) * 1000


def abort_running(hub: StubHub, proc: subprocess.Popen, eid: int) -> float:
    msg_id = hub.send(eid, "execute_request", {"code": LOOP})
    time.sleep(0.3)
    t0 = time.perf_counter()
    hub.send(eid, "abort_request", {"msg_ids": [msg_id]}, via="control")
    reply = hub.recv(timeout=10)
    assert reply["content"]["ename"] == "KeyboardInterrupt", reply["content"]
    hub.recv("control")
    return (time.perf_counter() - t0) * 1000


def repeat(fn: Callable[..., float], n: int, workdir: str) -> dict[str, Any]:
    with StubHub(heartbeat_period=0.5) as hub:
        proc = _engine(hub, workdir)
        try:
            eid = _registered(hub, proc)
            samples = [fn(hub, proc, eid) for _ in range(n)]
        finally:
            stop_process(proc)
    return {"median": round(statistics.median(samples), 1), "max": round(max(samples), 1),
            "n": n}


def shutdown_while_running(workdir: str) -> float:
    with StubHub(heartbeat_period=0.5) as hub:
        proc = _engine(hub, workdir)
        try:
            eid = _registered(hub, proc)
            hub.send(eid, "execute_request", {"code": LOOP})
            time.sleep(0.3)
            t0 = time.perf_counter()
            hub.send(eid, "shutdown_request", {"restart": False}, via="control")
            assert proc.wait(30) == 0
            return (time.perf_counter() - t0) * 1000
        finally:
            stop_process(proc)


def heartbeat_silence(workdir: str, timeout: float) -> float:
    with StubHub(heartbeat_period=0.2) as hub:
        proc = _engine(hub, workdir, "--heartbeat-timeout", str(timeout))
        try:
            _registered(hub, proc)
            hub.beating.clear()
            t0 = time.perf_counter()
            assert proc.wait(60) == 4
            return time.perf_counter() - t0
        finally:
            stop_process(proc)


def hub_gone(workdir: str) -> float:
    hub = StubHub(heartbeat_period=0.2)
    proc = _engine(hub, workdir)
    try:
        _registered(hub, proc)
        t0 = time.perf_counter()
        hub.close()
        assert proc.wait(60) == 4
        return (time.perf_counter() - t0) * 1000
    finally:
        stop_process(proc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10, help="samples per latency (10)")
    parser.add_argument("--heartbeat-timeout", type=float, default=2.0,
                        help="engine heartbeat timeout for the silence test (2.0)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as workdir:
        result = {
            "sigint_reply_ms": repeat(sigint_reply, args.repeat, workdir),
            "abort_running_reply_ms": repeat(abort_running, args.repeat, workdir),
            "shutdown_while_running_exit_ms": round(shutdown_while_running(workdir), 1),
            "heartbeat_timeout_s": args.heartbeat_timeout,
            "heartbeat_silence_exit_s": round(heartbeat_silence(workdir,
                                                                args.heartbeat_timeout), 2),
            "hub_gone_exit_ms": round(hub_gone(workdir), 1),
        }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
