"""Replay a capture against an engine and collect what the engine sends.

:func:`replay` feeds the recorded requests, frames unchanged, to a *target* and
returns the engine's messages as the engine sent them. A target has ``feed(msg)``,
``collect(timeout)`` and an optional ``gate`` (:class:`ReplyGate`): with a gate
the engine pauses as it starts on a request that others were queued behind in the
recording, until they are queued again, so stop-on-error, aborts and clears see
the same queue. Targets: ``tests/harness.KernelHarness`` and :class:`EngineTarget` (a stub
hub serving an engine process or an :class:`~streamkernel.engine.Engine` thread).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import zmq

from .capture import REPLY_STREAMS, Capture, Message, replay_plan
from .session import Session

log = logging.getLogger(__name__)

#: How long to wait for the engine at each step.
TIMEOUT = 5.0
#: Output is complete once nothing arrives for this long after the last reply.
SETTLE = 0.25
#: Time for messages sent while the engine is held to reach its sockets.
ARRIVAL = 0.05


class ReplyGate:
    """Holds the engine's thread when it first sends something about an armed request.

    That is the request's pyin (execute) or its reply: the engine has read the
    request and served control before it, and has not looked at its queue again.
    What is sent while it is held is queued as if it had arrived while the request ran.
    """

    def __init__(self, limit: float = 10.0) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._armed: dict[str, tuple[threading.Event, threading.Event]] = {}

    def arm(self, msg_id: str) -> None:
        """Hold the engine when it first sends a message about request ``msg_id``."""
        with self._lock:
            self._armed[msg_id] = (threading.Event(), threading.Event())

    def held(self, msg_id: str) -> bool:
        """True while the engine is held at request ``msg_id``."""
        with self._lock:
            events = self._armed.get(msg_id)
        return events is not None and events[0].is_set()

    def release(self, msg_id: str) -> None:
        with self._lock:
            events = self._armed.pop(msg_id, None)
        if events is not None:
            events[1].set()

    def release_all(self) -> None:
        with self._lock:
            armed, self._armed = list(self._armed.values()), {}
        for _, release in armed:
            release.set()

    def sending(self, msg_id: str | None) -> None:
        """Called on the engine's thread before it sends a message whose parent is ``msg_id``."""
        if not self._armed or msg_id is None:
            return
        with self._lock:
            events = self._armed.get(msg_id)
        if events is not None:
            events[0].set()
            if not events[1].wait(self.limit):
                log.warning("gate: not released within %.1f s", self.limit)


class GatedSession(Session):
    """A Session that asks a :class:`ReplyGate` before sending each message.

    After an error reply the engine's thread pauses for ``pause_after_error``
    seconds, as a descheduled thread would. A client that sends its next request
    once it has the reply must not see it caught by the stop-on-error drain that
    follows; the pause makes that deterministic instead of a rare race.
    """

    def __init__(self, *args: Any, gate: ReplyGate, pause_after_error: float = ARRIVAL,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = gate
        self.pause_after_error = pause_after_error

    def send(self, stream: Any, msg_or_type: dict[str, Any] | str,  # type: ignore[override]
             content: Any = None, parent: Any = None,
             *args: Any, **kwargs: Any) -> dict[str, Any]:
        if isinstance(msg_or_type, dict):
            msg_type, parent = msg_or_type.get("msg_type", ""), msg_or_type.get("parent_header")
        else:
            msg_type = msg_or_type
        if parent:
            self.gate.sending(_field(parent, "msg_id"))
        msg = super().send(stream, msg_or_type, content, parent, *args, **kwargs)
        if msg_type.endswith("_reply") and _field(msg.get("content"), "status") == "error":
            time.sleep(self.pause_after_error)
        return msg


def _field(part: Any, key: str) -> Any:
    """``part[key]`` of a header or content given as a dict or as packed JSON."""
    if isinstance(part, (bytes, bytearray, memoryview)):
        try:
            part = json.loads(bytes(part))
        except ValueError:
            return None
    if not isinstance(part, dict):
        return None
    return part.get("header", part).get(key) if key == "msg_id" else part.get(key)


class Target(Protocol):
    """Where a replay goes: ``feed`` sends an incoming message to the engine, frames
    unchanged; ``collect`` returns what the engine sent within ``timeout`` seconds."""

    gate: ReplyGate | None

    def feed(self, message: Message) -> None: ...

    def collect(self, timeout: float) -> list[Message]: ...


@dataclass
class ReplayResult:
    """What the engine sent (as it sent it) and what went wrong on the way."""

    messages: list[Message] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def replay(capture: Capture, target: Target, *, timeout: float = TIMEOUT,
           settle: float = SETTLE) -> ReplayResult:
    """Send the requests of ``capture`` to ``target`` as the recording's clients did."""
    result = ReplayResult()
    replies = 0
    gate = target.gate

    def pump(wait: float) -> None:
        nonlocal replies
        for m in target.collect(wait):
            result.messages.append(m)
            replies += m.stream in REPLY_STREAMS

    def wait_replies(n: int, why: str) -> None:
        deadline = time.monotonic() + timeout
        while replies < n and time.monotonic() < deadline:
            pump(0.02)
        if replies < n:
            result.problems.append("%d of %d replies within %.1f s (%s)"
                                   % (replies, n, timeout, why))

    plan = replay_plan(capture)
    by_id = {s.message.msg_id: s.message for s in plan}
    held: str | None = None
    try:
        for step in plan:
            m = step.message
            if held is not None and step.hold_on != held:
                time.sleep(ARRIVAL)
                gate.release(held)  # type: ignore[union-attr]
                held = None
            if step.hold_on is None:
                wait_replies(step.after_replies, "before %s %s" % (m.msg_type, m.msg_id[:8]))
            elif gate is not None and held is None:
                deadline = time.monotonic() + timeout
                while not gate.held(step.hold_on) and time.monotonic() < deadline:
                    pump(0.01)
                if gate.held(step.hold_on):
                    held = step.hold_on
                else:
                    holder = by_id[step.hold_on]
                    result.problems.append("the engine sent nothing about %s %s within %.1f s"
                                           % (holder.msg_type, holder.msg_id[:8], timeout))
            if step.hold and gate is not None:
                gate.arm(m.msg_id)
            target.feed(m)
        if held is not None:
            time.sleep(ARRIVAL)
            gate.release(held)  # type: ignore[union-attr]
            held = None
        wait_replies(len(capture.replies()), "at the end")
        quiet_since = time.monotonic()
        deadline = quiet_since + timeout
        while time.monotonic() - quiet_since < settle and time.monotonic() < deadline:
            before = len(result.messages)
            pump(0.02)
            if len(result.messages) != before:
                quiet_since = time.monotonic()
    finally:
        if gate is not None:
            gate.release_all()
    return result


# -- a stub hub serving an engine -------------------------------------------------------------

class EngineTarget:
    """A stub hub on 127.0.0.1 that registers one engine and replays to it.

    The engine is ``command`` (a process; ``{config}`` in it becomes the connection
    file) or, without a command, an :class:`~streamkernel.engine.Engine` run in a thread
    of this process with a :class:`ReplyGate`. The hub answers registration with the
    capture's engine id, signed with the capture's key. The engine names its peers
    itself, so the first routing frame it sees differs from the recorded one; what it
    sends is reported with the recorded peer ids.
    """

    def __init__(self, capture: Capture, command: Sequence[str] | None = None, *,
                 timeout: float = TIMEOUT, log_path: str | None = None) -> None:
        from .testing import StubHub  # zmq-only helper, shared with the engine tests

        self.capture = capture
        self.peers = dict({"mux": b"\x00mux", "task": b"task", "control": b"\x00ctl"},
                          **capture.peers())
        self.kinds = {v: k for k, v in self.peers.items()}
        self.hub = StubHub(capture.exec_key.encode(), heartbeat_period=0.5)
        self.gate: ReplyGate | None = None
        self.registration: list[Message] = []
        self.ident: str | None = None
        self.proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._engine: Any = None
        self._loop: Any = None
        self._tmp = tempfile.TemporaryDirectory(prefix="sk-replay-")
        config = self.hub.write_connection_file(os.path.join(self._tmp.name, "engine.json"))
        try:
            if command:
                argv = [a.replace("{config}", config) for a in command]
                self._log = open(log_path or os.path.join(self._tmp.name, "engine.log"), "wb")
                self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT)
            else:
                self.gate = ReplyGate()
                self._start_thread(config)
            self._register(timeout)
        except BaseException:
            self.close()
            raise

    def _start_thread(self, config: str) -> None:
        from .config import EngineConfig
        from .engine import Engine

        ready = threading.Event()
        cfg = EngineConfig.from_file(config, heartbeat_timeout=0)

        def run() -> None:
            from tornado.ioloop import IOLoop
            asyncio.set_event_loop(asyncio.new_event_loop())
            self._loop = IOLoop.current()
            engine = Engine(cfg, loop=self._loop)
            # the kernel gets its session at registration: make it one that asks the gate
            old = engine.session
            engine.session = GatedSession(old.key, session=old.session, parse_dates=False,
                                          signature_scheme=old.signature_scheme,
                                          gate=self.gate)  # type: ignore[arg-type]
            self._engine = engine
            self._engine.start()
            ready.set()
            try:
                self._loop.start()
            finally:
                self._engine.close()
                self._loop.close(all_fds=False)

        self._thread = threading.Thread(target=run, name="replay-engine", daemon=True)
        self._thread.start()
        if not ready.wait(TIMEOUT):
            raise RuntimeError("the in-process engine did not start")

    def _register(self, timeout: float) -> None:
        sock = self.hub.sockets["registration"]
        deadline = time.monotonic() + timeout
        while not sock.poll(50):
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError("the engine exited with status %d before registering"
                                   % self.proc.returncode)
            if time.monotonic() > deadline:
                raise TimeoutError("no registration_request within %.1f s" % timeout)
        frames = sock.recv_multipart()
        request = Message("registration", "out", frames[1:], time.time())
        self.registration.append(request)
        self.ident = str(request.content.get("queue") or frames[0].decode("ascii", "replace"))
        content = {"status": "ok", "id": self.capture.engine_id, "mux": self.hub.urls["mux"],
                   "task": self.hub.urls["task"], "control": self.hub.urls["control"],
                   "iopub": self.hub.urls["iopub"],
                   "heartbeat": [self.hub.urls["ping"], self.hub.urls["pong"]]}
        reply = self.hub.session.msg("registration_reply", content)
        out = self.hub.session.serialize(reply, [frames[0]])
        sock.send_multipart(out)
        self.registration.append(Message("registration", "in", out[1:], time.time()))
        self.hub.engines[self.capture.engine_id] = self.ident
        self.hub.wait_beating(self.capture.engine_id, timeout)
        # A bound SUB attaches a new publisher, and sends it the subscription, only when
        # the socket is used: poll it while the engine's connections complete.
        deadline = time.monotonic() + 0.2
        while time.monotonic() < deadline:
            self.hub.sockets["iopub"].poll(10)

    def feed(self, message: Message) -> None:
        kind = self.kinds.get(message.idents[0], "mux") if message.idents else "mux"
        if message.stream == "control":
            kind = "control"
        assert self.ident is not None
        self.hub.sockets[kind].send_multipart([self.ident.encode()] + message.frames[1:])

    def collect(self, timeout: float) -> list[Message]:
        poller = zmq.Poller()
        for kind in ("mux", "task", "control", "iopub"):
            poller.register(self.hub.sockets[kind], zmq.POLLIN)
        out = []
        for sock, _ in poller.poll(int(timeout * 1000)):
            kind = next(k for k, s in self.hub.sockets.items() if s is sock)
            while sock.poll(0):
                frames = sock.recv_multipart()
                now = time.time()
                if kind == "iopub":
                    out.append(Message("iopub", "out", frames, now))
                else:
                    stream = "control" if kind == "control" else "shell"
                    out.append(Message(stream, "out", [self.peers[kind]] + frames[1:], now))
        return out

    def exited(self, timeout: float) -> int | None:
        """The engine's exit status once it exits within ``timeout`` s (thread: 0)."""
        if self.proc is not None:
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return None
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return None
            code = getattr(self._engine, "exit_code", None)
            return 0 if code is None else code
        return None

    def close(self) -> None:
        """Stop the engine (by its PID, or its loop) and the hub."""
        if self.gate is not None:
            self.gate.release_all()
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
            self._log.close()
        if self._thread is not None and self._thread.is_alive():
            if self._loop is not None and self._engine is not None:
                self._loop.add_callback(self._engine.exit, 0)
            self._thread.join(TIMEOUT)
        self.hub.close()
        self._tmp.cleanup()

    def __enter__(self) -> EngineTarget:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def default_command() -> list[str]:
    """``python -m streamkernel --config {config}`` with this interpreter."""
    return [sys.executable, "-E", "-m", "streamkernel", "--config", "{config}"]


__all__ = ["ReplyGate", "GatedSession", "Target", "ReplayResult",
           "replay", "EngineTarget", "default_command", "TIMEOUT", "SETTLE"]
