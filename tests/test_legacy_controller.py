"""Our engine under the real IPython 0.11 controller, driven by the Python 3 client."""
from __future__ import annotations

import os
import time

import pytest

from streamkernel.client import Client, RemoteError
from streamkernel.serialize import interactive

from .legacy_env import controller, start_engine, wait_for_log  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.legacy]


def test_engine_serves_the_legacy_controller(controller, tmp_path):  # noqa: F811
    engine, log_path = start_engine(controller.engine_file, str(tmp_path))
    try:
        wait_for_log(log_path, "registered as engine 0", engine)
        wait_for_log(controller.log_path, "Engine Connected: 0")
        with Client(controller.client_file, timeout=20) as client:
            assert client.wait_for_engines(1) == [0]
            assert client.reply(client.execute("a=5"))["content"] == {"status": "ok"}

            m = client.execute("print(a*2)\na+1")
            assert client.reply(m)["content"]["status"] == "ok"
            out = [(x["msg_type"], x["content"]) for x in client.output(m)]
            assert ("stream", {"name": "stdout", "data": "10\n"}) in out
            assert ("pyout", {"data": "6"}) in out

            read_a = interactive(lambda: a)  # noqa: F821
            assert client.result(client.apply(read_a, engine=0)) == 5     # MUX
            m = client.apply(read_a)                                       # task scheduler
            assert client.result(m) == 5
            assert client.reply(m)["header"]["engine"] == client.engines[0]

            payload = os.urandom(100 * 1024 * 1024)
            echoed = client.result(client.apply(lambda x: x, payload, engine=0), timeout=120)
            assert echoed == payload
            del echoed, payload

            m = client.execute("1/0")
            with pytest.raises(RemoteError, match="ZeroDivisionError"):
                client.result(m)
            assert client.reply(client.execute("b = a + 1"))["content"]["status"] == "ok"

            deadline = time.monotonic() + 10
            while client.queue_status()[0]["queue"] and time.monotonic() < deadline:
                time.sleep(0.05)
            status = client.queue_status()
            print("queue_status:", status)
            assert status[0] == {"queue": 0, "tasks": 0, "completed": 7}

            m = client.shutdown(0)
            assert client.reply(m)["content"] == {"restart": False, "status": "ok"}
        assert engine.wait(10) == 0
        log = wait_for_log(log_path, "exiting with status 0")
        assert "Traceback" not in log
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.wait()
