"""A StubHub driven by JSON lines, for tests that run it inside a network namespace.

    python -m tests.nshub --ip '*' --location 10.71.0.1 --connection-file PATH

It writes the engine connection file, prints ``{"ready": urls}``, then answers one
JSON line on stdout for each command line on stdin:

    {"op": "register"}                        -> {"id", "uuid"}
    {"op": "wait_beating", "id": 0}           -> {"echoes"}
    {"op": "execute", "id": 0, "code": "..."} -> {"reply", "pyout", "seconds"}
        (with "pyout": true it also waits for the value on iopub)
    {"op": "wait_iopub", "id": 0}             -> {"probes"}: executes until a pyout arrives
    {"op": "echoes"}                          -> {"echoes": {uuid: count}}
    {"op": "shutdown", "id": 0}               -> {"reply"} (the shutdown_reply content)
    {"op": "quit"}                            -> {"bye": true}, then it exits

A failing command answers ``{"error": "..."}``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from streamkernel.testing import StubHub


def _execute(hub: StubHub, eid: int, code: str, timeout: float, want_pyout: bool
             ) -> dict[str, Any]:
    start = time.monotonic()
    msg_id = hub.send(eid, "execute_request", {"code": code, "silent": False,
                                               "user_variables": [], "user_expressions": {}})
    reply = hub.recv("mux", timeout=timeout)
    seconds = time.monotonic() - start
    if reply["parent_header"].get("msg_id") != msg_id:
        raise AssertionError("reply to another request: %r" % reply["parent_header"])
    pyout = None
    deadline = time.monotonic() + (min(timeout, 0.5) if want_pyout else 0.0)
    while pyout is None and time.monotonic() < deadline:
        try:
            msg = hub.recv("iopub", timeout=max(0.01, deadline - time.monotonic()))
        except TimeoutError:
            break
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "pyout":
            pyout = msg["content"]["data"]
    return {"reply": reply["content"], "pyout": pyout, "seconds": round(seconds, 4)}


def _answer(hub: StubHub, cmd: dict[str, Any]) -> dict[str, Any]:
    op = cmd["op"]
    timeout = float(cmd.get("timeout", 10))
    if op == "register":
        eid = hub.register(timeout)
        return {"id": eid, "uuid": hub.engines[eid]}
    if op == "wait_beating":
        hub.wait_beating(int(cmd["id"]), timeout)
        return {"echoes": hub.echoes.get(hub.engines[int(cmd["id"])].encode(), 0)}
    if op == "execute":
        return _execute(hub, int(cmd["id"]), str(cmd["code"]), timeout,
                        bool(cmd.get("pyout")))
    if op == "wait_iopub":  # until a pyout gets through: the SUB's subscription has arrived
        deadline = time.monotonic() + timeout
        probes = 0
        while time.monotonic() < deadline:
            probes += 1
            if _execute(hub, int(cmd["id"]), "'iopub'", timeout, True)["pyout"] is not None:
                return {"probes": probes}
        raise TimeoutError("no pyout from engine %s within %.1f s" % (cmd["id"], timeout))
    if op == "echoes":
        return {"echoes": {k.decode(): v for k, v in hub.echoes.items()}}
    if op == "shutdown":
        hub.send(int(cmd["id"]), "shutdown_request", {"restart": False}, via="control")
        return {"reply": hub.recv("control", timeout=timeout)["content"]}
    if op == "quit":
        return {"bye": True}
    raise ValueError("unknown op %r" % op)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.nshub")
    p.add_argument("--ip", default="*")
    p.add_argument("--location", default="")
    p.add_argument("--connection-file", required=True)
    p.add_argument("--heartbeat-period", type=float, default=0.2)
    p.add_argument("--extra", default="{}", help="JSON object of more connection-file keys")
    args = p.parse_args(argv)
    with StubHub(b"netns-hub-key", heartbeat_period=args.heartbeat_period, ip=args.ip,
                 location=args.location) as hub:
        hub.write_connection_file(args.connection_file, **json.loads(args.extra))
        print(json.dumps({"ready": hub.urls}), flush=True)
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                cmd = json.loads(line)
                answer = _answer(hub, cmd)
            except Exception as e:  # report, keep serving
                answer = {"error": "%s: %s" % (type(e).__name__, e)}
            print(json.dumps(answer), flush=True)
            if answer.get("bye"):
                break
    return 0


if __name__ == "__main__":
    sys.exit(main())
