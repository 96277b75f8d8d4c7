"""Kernels embedded in a host process: the 0.11 constructor, inproc sockets, no global side effects."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

from tornado.ioloop import IOLoop

from streamkernel import Kernel, Session

from .legacy_env import py3_env

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "embedded_hub.py")


def test_host_embeds_two_kernels_and_survives_one_shutdown():
    out = subprocess.run([sys.executable, SCRIPT, "--kernels", "2"], capture_output=True,
                         text=True, timeout=60, env=py3_env())
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["results"] == {"embedded-engine-0": 1, "embedded-engine-1": 11}
    assert summary["printed"] == ["0\n", "10\n"]
    assert summary["shutdown_reply"] == {"restart": False, "status": "ok"}
    assert summary["shut_down"] == [True, False]
    assert summary["still_serving"] == [True]
    assert summary["stdout_unchanged"] is True


def test_in_process_kernels_are_independent_and_restore_globals():
    from .scripts_embedded import run
    before = sys.stdout, sys.stderr, sys.displayhook
    summary = asyncio.run(asyncio.wait_for(run(2), 30))
    assert (sys.stdout, sys.stderr, sys.displayhook) == before
    assert summary["results"] == {"embedded-engine-0": 1, "embedded-engine-1": 11}


def test_legacy_constructor_keywords_are_accepted():
    ns: dict = {}

    async def build() -> Kernel:
        kernel = Kernel(config={}, int_id=3, ident="engine-3", session=Session(b"k"),
                        control_stream=None, shell_streams=[], task_stream=None,
                        iopub_stream=None, loop=IOLoop.current(), user_ns=ns,
                        exec_lines=["y = 2"], log=None, client=None)
        kernel.start()
        kernel.stop()
        return kernel

    kernel = asyncio.run(build())
    assert kernel.prefix == "engine.3"
    assert ns["y"] == 2 and kernel.user_ns is ns
