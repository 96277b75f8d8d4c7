"""Find the legacy IPython 0.11 environment and run its controller for tests."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterator

import pytest

from streamkernel.testing import py2_env, py3_env, read_legacy_env, stop_process

LEGACY_DIR = os.environ.get("STREAMKERNEL_LEGACY_DIR", "/tmp/streamkernel-legacy")


def legacy_env() -> dict[str, str] | None:
    """The variables of ``<dir>/env.sh`` (PY2, PYTHONPATH, LEGACY_IPYTHON), or None."""
    return read_legacy_env(LEGACY_DIR)


def require_legacy() -> dict[str, str]:
    """The legacy environment, or skip the test saying how to get it."""
    env = legacy_env()
    if env is None:
        pytest.skip("legacy IPython 0.11 environment not found at %s "
                    "(build it with ../shared/legacy/setup.sh %s, or set STREAMKERNEL_LEGACY_DIR)"
                    % (LEGACY_DIR, LEGACY_DIR))
    return env


kill = stop_process


class Controller:
    """A running legacy ipcontroller with its own profile directory."""

    def __init__(self, legacy: dict[str, str], workdir: str) -> None:
        self.legacy = legacy
        self.ipython_dir = os.path.join(workdir, "ipdir")
        self.security = os.path.join(self.ipython_dir, "profile_default", "security")
        self.engine_file = os.path.join(self.security, "ipcontroller-engine.json")
        self.client_file = os.path.join(self.security, "ipcontroller-client.json")
        self.log_path = os.path.join(workdir, "controller.log")
        script = os.path.join(legacy["LEGACY_IPYTHON"], "IPython", "parallel", "scripts",
                              "ipcontroller")
        self.log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [legacy["PY2"], "-W", "ignore", script, "--ip=127.0.0.1",
             "--ipython-dir=" + self.ipython_dir],
            stdout=self.log_file, stderr=subprocess.STDOUT, env=py2_env(legacy, self.ipython_dir))
        deadline = time.monotonic() + 30
        while not (os.path.exists(self.client_file) and os.path.exists(self.engine_file)
                   and "Scheduler started" in self.log()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("ipcontroller did not start:\n" + self.log())
            time.sleep(0.1)
        time.sleep(0.3)

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stop(self) -> None:
        kill(self.proc)
        self.log_file.close()


def start_engine(config: str, workdir: str, *args: str, name: str = "engine"
                 ) -> tuple[subprocess.Popen, str]:
    """Start ``python -m streamkernel --config CONFIG``; returns (process, log path)."""
    log_path = os.path.join(workdir, name + ".log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-E", "-m", "streamkernel", "--config", config,
                                 *args], stdout=log, stderr=subprocess.STDOUT, env=py3_env())
    return proc, log_path


def wait_for_log(path: str, text: str, proc: subprocess.Popen | None = None,
                 timeout: float = 20.0) -> str:
    """Wait until ``text`` appears in the file at ``path``; return the file's content."""
    deadline = time.monotonic() + timeout
    while True:
        with open(path, "rb") as f:
            content = f.read().decode("utf-8", "replace")
        if text in content:
            return content
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            raise AssertionError("%r not in %s:\n%s" % (text, path, content))
        time.sleep(0.05)


@pytest.fixture
def controller() -> Iterator[Controller]:
    legacy = require_legacy()
    with tempfile.TemporaryDirectory(prefix="sk-ctl-") as workdir:
        ctl = Controller(legacy, workdir)
        try:
            yield ctl
        finally:
            ctl.stop()


__all__: list[Any] = ["legacy_env", "require_legacy", "Controller", "controller", "start_engine",
                      "wait_for_log", "kill", "py2_env", "py3_env", "LEGACY_DIR"]
