"""The public API: every exported name resolves, and importing has no side effects."""
from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys

import pytest

import streamkernel

MODULES = sorted(m.name for m in pkgutil.iter_modules(streamkernel.__path__)
                 if m.name != "__main__")


def test_every_module_is_listed() -> None:
    assert {"protocol", "errors", "config", "session", "serialize", "outstream", "kernel",
            "heartbeat", "engine", "stream"} <= set(MODULES)


def test_package_all_resolves() -> None:
    assert len(streamkernel.__all__) == len(set(streamkernel.__all__))
    for name in streamkernel.__all__:
        assert hasattr(streamkernel, name), name
    assert isinstance(streamkernel.__version__, str)


@pytest.mark.parametrize("name", MODULES)
def test_module_all_resolves(name: str) -> None:
    module = importlib.import_module("streamkernel." + name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, "streamkernel.%s has no __all__" % name
    assert len(exported) == len(set(exported)), "duplicates in streamkernel.%s.__all__" % name
    for attr in exported:
        assert hasattr(module, attr), "streamkernel.%s.__all__ names missing %r" % (name, attr)
        assert not attr.startswith("_") or attr == "__version__"


def test_package_reexports_are_the_module_objects() -> None:
    from streamkernel import config, errors, kernel, serialize, session
    assert streamkernel.Session is session.Session
    assert streamkernel.Kernel is kernel.Kernel
    assert streamkernel.EngineConfig is config.EngineConfig
    assert streamkernel.disambiguate_url is config.disambiguate_url
    assert streamkernel.MessageError is errors.MessageError
    assert streamkernel.SerializationError is errors.SerializationError
    assert streamkernel.interactive is serialize.interactive
    assert streamkernel.pack_apply_message is serialize.pack_apply_message


def test_errors_share_one_base() -> None:
    from streamkernel import errors
    for name in errors.__all__:
        obj = getattr(errors, name)
        if isinstance(obj, type):
            assert issubclass(obj, errors.StreamKernelError), name


_IMPORT_CHECK = r"""
import json, os, sys, threading
fds = sorted(os.listdir("/proc/self/fd"))
threads = threading.active_count()
saved = sys.stdout, sys.stderr, sys.displayhook, sys.excepthook
import streamkernel
for name in %(modules)r:
    __import__("streamkernel." + name)
import zmq
import asyncio
policy = asyncio.get_event_loop_policy()
print(json.dumps({
    "fds_before": fds,
    "fds_after": sorted(os.listdir("/proc/self/fd")),
    "threads": [threads, threading.active_count()],
    "streams_kept": all(a is b for a, b in zip(saved, (sys.stdout, sys.stderr,
                                                        sys.displayhook, sys.excepthook))),
    "zmq_context": zmq.Context._instance is not None,
    "event_loop": getattr(getattr(policy, "_local", None), "_loop", None) is not None,
}))
"""


def test_importing_has_no_side_effects() -> None:
    code = _IMPORT_CHECK % {"modules": MODULES}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", "importing wrote to stderr: %r" % proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, "importing wrote to stdout: %r" % proc.stdout
    report = json.loads(lines[0])
    assert report["fds_before"] == report["fds_after"], "importing opened files or sockets"
    assert report["threads"][0] == report["threads"][1], "importing started threads"
    assert report["streams_kept"], "importing replaced sys.stdout/stderr/hooks"
    assert not report["zmq_context"], "importing created a zmq context"
    assert not report["event_loop"], "importing created an event loop"
