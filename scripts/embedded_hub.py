#!/usr/bin/env python3
"""An example host that embeds N kernels in its own process, on inproc sockets.

It builds the sockets, streams and sessions itself, constructs ``Kernel(...)``
for each engine, runs execute and apply requests on all of them, shuts one
down, checks the others keep serving, and prints a JSON summary.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import zmq
from tornado.ioloop import IOLoop
from zmq.eventloop.zmqstream import ZMQStream

from streamkernel import Kernel, Session, interactive
from streamkernel.serialize import deserialize_object, pack_apply_message

KEY = b"embedded-hub-key"


class EmbeddedEngine:
    """One kernel plus the host-side sockets that talk to it."""

    def __init__(self, ctx: zmq.Context, loop: IOLoop, index: int) -> None:
        self.index = index
        self.ident = "embedded-engine-%d" % index
        self.client = Session(KEY)
        self.replies: dict[str, dict[str, Any]] = {}
        self.output: list[dict[str, Any]] = []
        self.shut_down = False
        self.host: dict[str, zmq.Socket] = {}
        engine_side: dict[str, zmq.Socket] = {}
        for name in ("shell", "control", "iopub"):
            url = "inproc://engine-%d-%s" % (index, name)
            host = ctx.socket(zmq.SUB if name == "iopub" else zmq.ROUTER)
            host.bind(url)
            engine = ctx.socket(zmq.PUB if name == "iopub" else zmq.ROUTER)
            if name != "iopub":
                engine.setsockopt(zmq.IDENTITY, self.ident.encode())
            engine.connect(url)
            self.host[name], engine_side[name] = host, engine
        self.host["iopub"].setsockopt(zmq.SUBSCRIBE, b"")
        for name in ("shell", "control", "iopub"):
            ZMQStream(self.host[name], loop).on_recv(self._collect)
        self.kernel = Kernel(
            int_id=index, ident=self.ident, session=Session(KEY, session=self.ident,
                                                            parse_dates=False),
            control_stream=ZMQStream(engine_side["control"], loop),
            shell_streams=[ZMQStream(engine_side["shell"], loop)],
            iopub_stream=ZMQStream(engine_side["iopub"], loop),
            loop=loop, user_ns={}, exec_lines=["engine_index = %d" % index],
            on_shutdown=self._on_shutdown)
        self.kernel.start()

    def _on_shutdown(self) -> None:
        self.shut_down = True

    def _collect(self, frames: list[bytes]) -> None:
        _, rest = self.client.feed_identities(frames)
        msg = self.client.deserialize(rest)
        if msg["msg_type"].endswith("_reply"):
            self.replies[msg["parent_header"]["msg_id"]] = msg
        else:
            self.output.append(msg)

    def send(self, msg_type: str, content: dict[str, Any], via: str = "shell",
             buffers: list[Any] | None = None) -> str:
        msg = self.client.send(self.host[via], msg_type, content, buffers=buffers,
                               ident=[self.ident.encode(), self.client.bsession])
        return str(msg["msg_id"])

    async def reply(self, msg_id: str, timeout: float = 10.0) -> dict[str, Any]:
        for _ in range(int(timeout * 1000)):
            if msg_id in self.replies:
                return self.replies[msg_id]
            await asyncio.sleep(0.001)
        raise TimeoutError("no reply to %s from engine %d" % (msg_id, self.index))


async def run(n: int) -> dict[str, Any]:
    ctx = zmq.Context()
    loop = IOLoop.current()
    engines = [EmbeddedEngine(ctx, loop, i) for i in range(n)]
    stdout_before = sys.stdout
    summary: dict[str, Any] = {"kernels": n, "results": {}}
    for e in engines:
        r = await e.reply(e.send("execute_request", {"code": "x = engine_index * 10\nprint(x)"}))
        assert r["content"]["status"] == "ok", r["content"]
        read_x = interactive(lambda: x + 1)  # noqa: F821
        r = await e.reply(e.send("apply_request", {}, buffers=pack_apply_message(read_x)))
        summary["results"][e.ident] = deserialize_object(r["buffers"])[0]
    first = engines[0]
    r = await first.reply(first.send("shutdown_request", {"restart": False}, via="control"))
    summary["shutdown_reply"] = r["content"]
    for _ in range(3000):
        if first.shut_down:
            break
        await asyncio.sleep(0.001)
    summary["shut_down"] = [e.shut_down for e in engines]
    for e in engines[1:]:
        r = await e.reply(e.send("execute_request", {"code": "x"}))
        summary.setdefault("still_serving", []).append(r["content"]["status"] == "ok")
    summary["stdout_unchanged"] = sys.stdout is stdout_before
    summary["printed"] = [m["content"]["data"] for e in engines for m in e.output
                          if m["msg_type"] == "stream"]
    for e in engines:
        e.kernel.stop()
    ctx.destroy(linger=0)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", type=int, default=2, help="how many kernels (default 2)")
    args = parser.parse_args(argv)
    summary = asyncio.run(asyncio.wait_for(run(args.kernels), 60))
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
