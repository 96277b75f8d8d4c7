"""StubHub: a minimal hub for one or more engines, for tests and benchmarks.

It binds the sockets a controller binds (registration, MUX, task, control,
iopub, heartbeat) on 127.0.0.1 (or ``ip``), writes a connection file, answers
registration, pings from a thread, and sends requests as a client would. With
``curve=True`` every socket is a CURVE server; ``curve_clients`` then limits
who may connect to those public keys (a ZAP authenticator on the context).
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import threading
import time
from typing import Any, Sequence

import zmq

from . import protocol
from .session import Session


class StubHub:
    """A hub on 127.0.0.1 that registers engines and plays their client."""

    def __init__(self, key: bytes = b"stub-hub-key", *, heartbeat_period: float = 0.5,
                 context: zmq.Context | None = None, location: str = "127.0.0.1",
                 ip: str = "127.0.0.1", curve: bool = False,
                 curve_clients: Sequence[bytes | str] | None = None) -> None:
        self.key = key
        self.context = context or zmq.Context()
        self._own_context = context is None
        self.ip = ip
        self.curve_publickey = self.curve_secretkey = b""
        self.auth: Any = None
        if curve:
            self.curve_publickey, self.curve_secretkey = zmq.curve_keypair()
        if curve and curve_clients is not None:
            from zmq.auth.thread import ThreadAuthenticator

            self.auth = ThreadAuthenticator(self.context)
            self.auth.start()
            self.auth.configure_curve_callback("*", _AllowKeys(curve_clients))
        self.session = Session(key)
        self.client_id = self.session.bsession
        self.heartbeat_period = heartbeat_period
        self.location = location
        self.sockets: dict[str, zmq.Socket] = {}
        self.urls: dict[str, str] = {}
        for name, kind in (("registration", zmq.ROUTER), ("mux", zmq.ROUTER),
                           ("task", zmq.ROUTER), ("control", zmq.ROUTER), ("iopub", zmq.SUB)):
            sock = self.context.socket(kind)
            sock.linger = 0
            if name == "task":
                sock.setsockopt(zmq.IDENTITY, b"task")
            self._secure(sock)
            port = sock.bind_to_random_port("tcp://" + ip)
            self.urls[name] = "tcp://%s:%d" % (ip, port)
            self.sockets[name] = sock
        self.sockets["iopub"].setsockopt(zmq.SUBSCRIBE, b"")
        self.engines: dict[int, str] = {}
        self.beating = threading.Event()
        self.beating.set()
        self.echoes: dict[bytes, int] = {}
        self._hb_ready = threading.Event()
        self._hb_stop = threading.Event()
        self._hb_thread = threading.Thread(target=self._heartbeat, daemon=True)
        self._hb_thread.start()
        self._hb_ready.wait(5)

    # -- connection file ----------------------------------------------------------------

    def connection_info(self) -> dict[str, Any]:
        """The content of an ``ipcontroller-engine.json`` for this hub."""
        info = {"url": self.urls["registration"], "exec_key": self.key.decode(),
                "ssh": "", "location": self.location}
        if self.curve_publickey:
            info["curve_serverkey"] = self.curve_publickey.decode("ascii")
        return info

    def _secure(self, sock: zmq.Socket) -> None:
        if self.curve_secretkey:
            sock.curve_server = True
            sock.curve_secretkey = self.curve_secretkey

    def write_connection_file(self, path: str, **extra: Any) -> str:
        """Write the engine connection file (plus ``extra`` keys) to ``path``."""
        info = self.connection_info()
        info.update(extra)
        with open(path, "w") as f:
            json.dump(info, f)
        return path

    # -- heartbeat -------------------------------------------------------------------------

    def _heartbeat(self) -> None:
        ping = self.context.socket(zmq.PUB)
        pong = self.context.socket(zmq.ROUTER)
        host = "tcp://" + self.ip
        for sock in (ping, pong):
            sock.linger = 0
            self._secure(sock)
        self.urls["ping"] = "%s:%d" % (host, ping.bind_to_random_port(host))
        self.urls["pong"] = "%s:%d" % (host, pong.bind_to_random_port(host))
        self._hb_ready.set()
        try:
            next_ping = 0.0
            while not self._hb_stop.is_set():
                now = time.monotonic()
                if now >= next_ping:
                    if self.beating.is_set():
                        ping.send(str(time.time()).encode())
                    next_ping = now + self.heartbeat_period
                if pong.poll(min(50, int(self.heartbeat_period * 1000))):
                    frames = pong.recv_multipart()
                    self.echoes[frames[0]] = self.echoes.get(frames[0], 0) + 1
        finally:
            ping.close(linger=0)
            pong.close(linger=0)

    # -- registration -------------------------------------------------------------------

    def register(self, timeout: float = 10.0, *, refuse: bool = False) -> int:
        """Answer one registration_request; return the engine id given."""
        sock = self.sockets["registration"]
        if not sock.poll(int(timeout * 1000)):
            raise TimeoutError("no registration_request within %.1f s" % timeout)
        idents, msg = self.session.recv(sock, mode=0)
        assert msg is not None and idents is not None
        if msg["msg_type"] != protocol.REGISTRATION_REQUEST:
            raise AssertionError("expected registration_request, got %s" % msg["msg_type"])
        self.last_registration = msg
        eid = len(self.engines)
        if refuse:
            content: dict[str, Any] = {"status": "error", "ename": "KeyError",
                                       "evalue": "queue_id in use"}
        else:
            content = {"status": "ok", "id": eid, "mux": self.urls["mux"],
                       "task": self.urls["task"], "control": self.urls["control"],
                       "iopub": self.urls["iopub"],
                       "heartbeat": [self.urls["ping"], self.urls["pong"]]}
            self.engines[eid] = msg["content"]["queue"]
        self.session.send(sock, protocol.REGISTRATION_REPLY, content, ident=idents)
        return eid

    def wait_beating(self, eid: int, timeout: float = 10.0) -> None:
        """Wait for the first heartbeat echo of engine ``eid``."""
        ident = self.engines[eid].encode()
        deadline = time.monotonic() + timeout
        while not self.echoes.get(ident):
            self.sockets["iopub"].getsockopt(zmq.EVENTS)  # a SUB takes in publishers when used
            if time.monotonic() > deadline:
                raise TimeoutError("engine %d never echoed a heartbeat" % eid)
            time.sleep(0.01)

    # -- requests -----------------------------------------------------------------------

    def send(self, eid: int, msg_type: str, content: dict[str, Any] | None = None, *,
             via: str = "mux", buffers: Sequence[Any] = (),
             subheader: dict[str, Any] | None = None) -> str:
        """Send a request to engine ``eid`` via mux, task or control; return its msg_id."""
        msg = self.session.msg(msg_type, content or {}, subheader=subheader)
        frames = self.session.serialize(msg, [self.engines[eid].encode(), self.client_id])
        self.sockets[via].send_multipart(frames + list(buffers), copy=False)
        return str(msg["msg_id"])

    def send_frames(self, eid: int, frames: Sequence[Any], via: str = "mux") -> None:
        """Send raw frames (after the engine's routing id) to engine ``eid``."""
        self.sockets[via].send_multipart([self.engines[eid].encode(), *frames], copy=False)

    def recv(self, via: str = "mux", timeout: float = 10.0, copy: bool = True
             ) -> dict[str, Any]:
        """Receive one reply (or iopub message) and return the message dict."""
        sock = self.sockets[via]
        if not sock.poll(int(timeout * 1000)):
            raise TimeoutError("nothing on %s within %.1f s" % (via, timeout))
        frames: list[Any] = sock.recv_multipart(copy=copy)  # type: ignore[call-overload]
        idents, rest = self.session.feed_identities(frames, copy=copy)
        msg = self.session.deserialize(rest, copy=copy)
        msg["idents"] = idents
        return msg

    def close(self) -> None:
        """Stop the heartbeat and close every socket."""
        self._hb_stop.set()
        self._hb_thread.join(5)
        for sock in self.sockets.values():
            sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        if self._own_context:
            self.context.term()

    def __enter__(self) -> StubHub:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _AllowKeys:
    """ZAP credentials provider: only the listed CURVE public keys (Z85) get in."""

    def __init__(self, keys: Sequence[bytes | str]) -> None:
        self.keys = {k.encode("ascii") if isinstance(k, str) else k for k in keys}

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys


# -- the legacy environment (../shared/legacy/setup.sh) --------------------------------

def read_legacy_env(legacy_dir: str) -> dict[str, str] | None:
    """PY2, LEGACY_IPYTHON, PYTHONPATH and IPYTHONDIR from ``<legacy_dir>/env.sh``, or None."""
    path = os.path.join(legacy_dir, "env.sh")
    if not os.path.exists(path):
        return None
    env: dict[str, str] = {}
    with open(path) as f:
        for line in f:
            if line.startswith("export "):
                name, _, value = line[len("export "):].strip().partition("=")
                env[name] = shlex.split(value)[0] if value else ""
    return env


def py2_env(legacy: dict[str, str], ipython_dir: str) -> dict[str, str]:
    """Environment for a Python 2 legacy process with its own IPython directory."""
    env = dict(os.environ)
    env.update(PYTHONPATH=legacy["PYTHONPATH"], IPYTHONDIR=ipython_dir)
    return env


def py3_env() -> dict[str, str]:
    """Environment for a Python 3 process: no Python 2 packages on the path."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("IPYTHONDIR", None)
    return env


def stop_process(proc: subprocess.Popen | None, timeout: float = 5.0) -> None:
    """Stop a process by its PID: SIGTERM, then SIGKILL if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout)
    except ProcessLookupError:
        pass


__all__ = ["StubHub", "read_legacy_env", "py2_env", "py3_env", "stop_process"]
