"""A Kernel on real 127.0.0.1 sockets, run on its own IOLoop thread, and a hub-side
peer that sends requests and collects replies and iopub output.

The harness is also a replay target (:func:`streamkernel.replay.replay`): ``feed``
and ``collect`` speak in messages as the engine sees them, and ``gate`` can hold the
kernel thread when it first sends something about a given request."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
import time
from typing import Any, Sequence

import zmq
from tornado.ioloop import IOLoop

from streamkernel import protocol
from streamkernel.capture import Message
from streamkernel.kernel import Kernel
from streamkernel.replay import GatedSession, ReplyGate
from streamkernel.session import Session
from streamkernel.stream import KernelStream

CAPTURES = os.path.join(os.path.dirname(__file__), "captures")
KEY = b"test-key-0123"
ENGINE_ID = "a8f3e9d2-5b1c-4e7a-9f60-1d2c3b4a5e6f"
CLIENT_ID = b"c0ffee00-1111-2222-3333-444455556666"
#: Routing ids the engine sees for each hub-side peer, as libzmq would make them.
PEERS = {"mux": b"\x00k\x8bEg", "task": b"task", "control": b"\x00\xe4<\x98i"}
TIMEOUT = 10.0


def load_capture(name: str) -> dict[str, Any]:
    """Load ``tests/captures/<name>.json`` with frames decoded to bytes."""
    path = name if name.endswith(".json") else os.path.join(CAPTURES, name + ".json")
    with open(path) as f:
        cap = json.load(f)
    for m in cap["messages"]:
        m["frames"] = [base64.b64decode(fr) for fr in m["frames"]]
    return cap


class KernelHarness:
    """Runs a Kernel in a thread; the test thread plays hub and client."""

    def __init__(self, key: bytes = KEY, engine_id: str = ENGINE_ID, int_id: int = 0,
                 peers: dict[str, bytes] | None = None, stream_class: type = KernelStream,
                 **kernel_kwargs: Any) -> None:
        """``stream_class``: the engine's KernelStream, or ZMQStream as an embedding host."""
        self.key = key
        self.stream_class = stream_class
        self.engine_id = engine_id
        self.int_id = int_id
        self.peers = dict(PEERS, **(peers or {}))
        self.kernel_kwargs = kernel_kwargs
        self.context = zmq.Context()
        self.client = Session(key, session=CLIENT_ID.decode())
        self.hub: dict[str, zmq.Socket] = {}
        self.urls: dict[str, str] = {}
        for kind, sock_type in (("mux", zmq.ROUTER), ("task", zmq.ROUTER),
                                ("control", zmq.ROUTER), ("iopub", zmq.SUB)):
            sock = self.context.socket(sock_type)
            sock.linger = 0
            port = sock.bind_to_random_port("tcp://127.0.0.1")
            self.urls[kind] = "tcp://127.0.0.1:%d" % port
            self.hub[kind] = sock
        self.hub["iopub"].setsockopt(zmq.SUBSCRIBE, b"")
        self.kernel: Kernel | None = None
        self.loop: IOLoop | None = None
        self.gate = ReplyGate()
        self.shutdown_called = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(TIMEOUT):
            raise RuntimeError("kernel thread did not start")
        self._wait_connected()

    # -- kernel thread ----------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(asyncio.new_event_loop())
        self.loop = IOLoop.current()
        bident = self.engine_id.encode()
        shell = self.context.socket(zmq.ROUTER)
        shell.setsockopt(zmq.IDENTITY, bident)
        for kind in ("mux", "task"):
            shell.setsockopt(zmq.CONNECT_ROUTING_ID, self.peers[kind])
            shell.connect(self.urls[kind])
        control = self.context.socket(zmq.ROUTER)
        control.setsockopt(zmq.IDENTITY, bident)
        control.setsockopt(zmq.CONNECT_ROUTING_ID, self.peers["control"])
        control.connect(self.urls["control"])
        iopub = self.context.socket(zmq.PUB)
        iopub.connect(self.urls["iopub"])
        self.streams = [self.stream_class(s, self.loop) for s in (shell, control, iopub)]
        session = GatedSession(self.key, session=self.engine_id, parse_dates=False,
                               gate=self.gate)
        kwargs = dict(session=session, control_stream=self.streams[1],
                      shell_streams=[self.streams[0]], iopub_stream=self.streams[2],
                      loop=self.loop, int_id=self.int_id, ident=self.engine_id,
                      on_shutdown=self.shutdown_called.set)
        kwargs.update(self.kernel_kwargs)
        self.kernel = Kernel(**kwargs)
        self.kernel.start()
        self._ready.set()
        try:
            self.loop.start()
        finally:
            for stream in self.streams:
                stream.close(linger=0)
            self.loop.close(all_fds=False)

    def _wait_connected(self) -> None:
        """Wait until iopub and every hub peer routes to the engine."""
        deadline = time.monotonic() + TIMEOUT
        ready = False
        while time.monotonic() < deadline and not ready:
            self.loop.add_callback(self.kernel._publish, "ping", {}, b"ping")
            ready = bool(self.hub["iopub"].poll(50))
        while self.hub["iopub"].poll(50):
            self.hub["iopub"].recv_multipart()
        for kind in ("mux", "task", "control"):
            self.hub[kind].setsockopt(zmq.ROUTER_MANDATORY, 1)
        time.sleep(0.05)

    # -- hub side ---------------------------------------------------------------------

    def send_frames(self, kind: str, frames: Sequence[bytes]) -> None:
        """Send raw frames (routing prefix after the engine's id, then the message)."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                self.hub[kind].send_multipart([self.engine_id.encode()] + list(frames))
                return
            except zmq.ZMQError as e:  # EHOSTUNREACH until the engine has connected
                if e.errno != zmq.EHOSTUNREACH or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def request(self, msg_type: str, content: dict[str, Any] | None = None, *,
                kind: str = "mux", buffers: Sequence[Any] = (), client_id: bytes = CLIENT_ID,
                session: Session | None = None, subheader: dict[str, Any] | None = None
                ) -> dict[str, Any]:
        """Send a signed request via ``kind`` (mux, task or control); return the message."""
        session = session or self.client
        msg = session.msg(msg_type, content or {}, subheader=subheader)
        frames = session.serialize(msg, [client_id]) + list(buffers)
        self.send_frames(kind, frames)
        return msg

    def recv(self, kind: str = "mux", timeout: float = TIMEOUT) -> tuple[list[bytes], dict]:
        """Receive one reply on ``kind``: (routing prefix after the engine id, message)."""
        sock = self.hub[kind]
        if not sock.poll(timeout * 1000):
            raise TimeoutError("no message on %s within %.1f s" % (kind, timeout))
        frames = sock.recv_multipart()
        assert frames[0] == self.engine_id.encode(), frames[0]
        idents, rest = self.client.feed_identities(frames[1:])
        return idents, self.client.deserialize(rest)

    def recv_raw(self, kind: str = "mux", timeout: float = TIMEOUT) -> list[bytes]:
        """Receive one message's frames on ``kind`` (iopub: topic first)."""
        sock = self.hub[kind]
        if not sock.poll(timeout * 1000):
            raise TimeoutError("no message on %s within %.1f s" % (kind, timeout))
        return sock.recv_multipart()

    def iopub(self, settle: float = 0.2) -> list[tuple[bytes, dict]]:
        """Every iopub message published so far: (topic, message)."""
        out = []
        while self.hub["iopub"].poll(settle * 1000):
            frames = self.hub["iopub"].recv_multipart()
            idents, rest = self.client.feed_identities(frames)
            out.append((idents[0], self.client.deserialize(rest)))
        return out

    def no_message(self, kind: str = "mux", wait: float = 0.3) -> bool:
        """True when nothing arrives on ``kind`` within ``wait`` seconds."""
        return not self.hub[kind].poll(wait * 1000)

    # -- replay target ----------------------------------------------------------------

    def feed(self, message: Message) -> None:
        """Deliver a recorded incoming message: the engine receives exactly its frames."""
        kind = message.stream
        if kind != "control":
            kind = next((k for k in ("mux", "task") if self.peers[k] == message.idents[0]),
                        "mux")
        self.send_frames(kind, message.frames[1:])

    def collect(self, timeout: float) -> list[Message]:
        """Messages the engine sent within ``timeout`` s, with the frames it sent."""
        poller = zmq.Poller()
        for kind in ("mux", "task", "control", "iopub"):
            poller.register(self.hub[kind], zmq.POLLIN)
        out = []
        for sock, _ in poller.poll(int(timeout * 1000)):
            kind = next(k for k, s in self.hub.items() if s is sock)
            while sock.poll(0):
                frames = sock.recv_multipart()
                if kind == "iopub":
                    out.append(Message("iopub", "out", frames, time.time()))
                else:
                    assert frames[0] == self.engine_id.encode(), frames[0]
                    out.append(Message("control" if kind == "control" else "shell", "out",
                                       [self.peers[kind]] + frames[1:], time.time()))
        return out

    def call(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` on the kernel's thread and return its result."""
        box: list[Any] = []
        done = threading.Event()

        def run() -> None:
            try:
                box.append(fn(*args))
            finally:
                done.set()
        self.loop.add_callback(run)
        if not done.wait(TIMEOUT):
            raise TimeoutError("kernel thread busy")
        return box[0] if box else None

    def close(self) -> None:
        """Stop the kernel thread and close every socket."""
        self.gate.release_all()
        if self.loop is not None:
            self.loop.add_callback(self.loop.stop)
        self._thread.join(TIMEOUT)
        for sock in self.hub.values():
            sock.close(linger=0)
        self.context.term()
