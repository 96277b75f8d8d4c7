"""A blocking Python 3 client for an IPython 0.11 controller.

It reads ``ipcontroller-client.json``, asks the hub for its addresses
(``connection_request``), and then sends execute and apply requests through the
MUX queue (to one engine) or the task scheduler (load balanced), control
requests to an engine, and queries to the hub. Replies and iopub output are
collected by the parent request's msg_id.
"""
from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from typing import Any, Callable, Sequence

import zmq

from . import protocol
from .config import disambiguate_url
from .errors import MessageError, StreamKernelError
from .serialize import deserialize_object, pack_apply_message
from .session import Session

log = logging.getLogger(__name__)


class HubError(StreamKernelError):
    """The hub answered a query with an error, or did not answer in time."""


class Client:
    """Talks to engines through a legacy controller; every call is blocking."""

    def __init__(self, url_or_file: str, exec_key: str | None = None, *,
                 context: zmq.Context | None = None, timeout: float = 10.0) -> None:
        if "://" in url_or_file:
            cfg: dict[str, Any] = {"url": url_or_file, "exec_key": exec_key or "", "location": ""}
        else:
            with open(url_or_file) as f:
                cfg = json.load(f)
        if exec_key is not None:
            cfg["exec_key"] = exec_key
        self.location = cfg.get("location") or ""
        self.context = context or zmq.Context()
        self._own_context = context is None
        self.session = Session(cfg["exec_key"])
        self.timeout = timeout
        self.replies: dict[str, dict[str, Any]] = {}
        self.iopub: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._sockets: list[zmq.Socket] = []
        self._query = self._socket(zmq.DEALER, cfg["url"])
        reply = self._hub_request("connection_request", {})
        content = reply["content"]
        self.engines: dict[int, str] = {int(k): v for k, v in content["engines"].items()}
        self._mux = self._socket(zmq.DEALER, content["mux"])
        self.task_scheme, task_url = content["task"]
        self._task = self._socket(zmq.DEALER, task_url)
        self._control = self._socket(zmq.DEALER, content["control"])
        self._iopub = self._socket(zmq.SUB, content["iopub"])
        self._iopub.setsockopt(zmq.SUBSCRIBE, b"")
        self._poller = zmq.Poller()
        for sock in (self._mux, self._task, self._control, self._iopub):
            self._poller.register(sock, zmq.POLLIN)

    def _socket(self, kind: int, url: str) -> zmq.Socket:
        sock = self.context.socket(kind)
        sock.linger = 0
        if kind != zmq.SUB:
            sock.setsockopt(zmq.IDENTITY, self.session.bsession)
        sock.connect(disambiguate_url(url, self.location))
        self._sockets.append(sock)
        return sock

    def close(self) -> None:
        """Close every socket (and the context, if this client made it)."""
        for sock in self._sockets:
            sock.close(linger=0)
        if self._own_context:
            self.context.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- hub queries ----------------------------------------------------------------

    def _hub_request(self, msg_type: str, content: dict[str, Any]) -> dict[str, Any]:
        self.session.send(self._query, msg_type, content)
        if not self._query.poll(int(self.timeout * 1000)):
            raise HubError("the hub did not answer %s within %.1f s" % (msg_type, self.timeout))
        _, msg = self.session.recv(self._query, mode=0)
        assert msg is not None
        if msg["content"].get(protocol.STATUS) != protocol.OK:
            content = msg["content"]
            raise HubError("%s failed: %s: %s" % (msg_type, content.get("ename"),
                                                  content.get("evalue")))
        return msg

    def refresh_engines(self) -> dict[int, str]:
        """Ask the hub again which engines are registered."""
        content = self._hub_request("connection_request", {})["content"]
        self.engines = {int(k): v for k, v in content["engines"].items()}
        return self.engines

    def wait_for_engines(self, n: int, timeout: float = 30.0) -> list[int]:
        """Wait until at least ``n`` engines are registered; return their ids."""
        deadline = time.monotonic() + timeout
        while len(self.refresh_engines()) < n:
            if time.monotonic() > deadline:
                raise HubError("only %d of %d engines registered after %.0f s"
                               % (len(self.engines), n, timeout))
            time.sleep(0.1)
        return sorted(self.engines)

    def queue_status(self, targets: Sequence[int] | str = "all", verbose: bool = False
                     ) -> dict[Any, Any]:
        """The hub's queue counts: ``{engine_id: {queue, tasks, completed}, 'unassigned': n}``."""
        if targets == "all":
            targets = sorted(self.refresh_engines())
        content = dict(self._hub_request("queue_request", {
            "targets": list(targets), "verbose": verbose})["content"])
        content.pop(protocol.STATUS, None)
        return {int(k) if k.isdigit() else k: v for k, v in content.items()}

    # -- requests -------------------------------------------------------------------

    def _target(self, engine: int) -> bytes:
        if engine not in self.engines:
            self.refresh_engines()
        return self.engines[engine].encode("ascii")

    def _send(self, sock: zmq.Socket, msg_type: str, content: dict[str, Any],
              ident: bytes | None, buffers: Sequence[Any] | None = None,
              subheader: dict[str, Any] | None = None) -> str:
        msg = self.session.send(sock, msg_type, content, ident=ident, buffers=buffers,
                                subheader=subheader)
        return str(msg["msg_id"])

    def execute(self, code: str, engine: int = 0) -> str:
        """Send an execute_request to one engine through the MUX queue; return its msg_id."""
        content = {"code": code, "silent": False, "user_variables": [], "user_expressions": {}}
        return self._send(self._mux, protocol.EXECUTE_REQUEST, content, self._target(engine))

    def apply(self, f: Callable[..., Any], *args: Any, engine: int | None = None,
              **kwargs: Any) -> str:
        """Send ``f(*args, **kwargs)`` to ``engine`` (MUX) or, when None, to the task scheduler."""
        buffers = pack_apply_message(f, args, kwargs)
        if engine is None:
            return self._send(self._task, protocol.APPLY_REQUEST, {}, None, buffers,
                              {"after": [], "follow": [], "timeout": None, "targets": []})
        return self._send(self._mux, protocol.APPLY_REQUEST, {}, self._target(engine), buffers)

    def complete(self, text: str, line: str | None = None, engine: int = 0) -> str:
        """Send a complete_request through the MUX queue."""
        content = {"text": text, "line": text if line is None else line, "block": None}
        return self._send(self._mux, protocol.COMPLETE_REQUEST, content, self._target(engine))

    def abort(self, msg_ids: Sequence[str] | None = None, engine: int = 0) -> str:
        """Ask an engine (over control) to abort queued requests; all waiting ones if None."""
        return self._send(self._control, protocol.ABORT_REQUEST,
                          {"msg_ids": list(msg_ids or [])}, self._target(engine))

    def clear(self, engine: int = 0) -> str:
        """Ask an engine (over control) to clear its namespace."""
        return self._send(self._control, protocol.CLEAR_REQUEST, {}, self._target(engine))

    def shutdown(self, engine: int = 0, restart: bool = False) -> str:
        """Ask an engine (over control) to shut down."""
        return self._send(self._control, protocol.SHUTDOWN_REQUEST, {"restart": restart},
                          self._target(engine))

    # -- collecting -----------------------------------------------------------------

    def _drain(self, timeout: float) -> None:
        for sock, _ in self._poller.poll(int(timeout * 1000)):
            while True:
                try:
                    idents, msg = self.session.recv(sock, zmq.NOBLOCK, copy=True)
                except MessageError as e:
                    log.warning("dropped invalid message: %s", e)
                    continue
                if msg is None:
                    break
                parent_id = msg["parent_header"].get("msg_id")
                if sock is self._iopub:
                    self.iopub[parent_id].append(msg)
                else:
                    self.replies[parent_id] = msg

    def reply(self, msg_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the reply to ``msg_id`` and return it (a message dict)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while msg_id not in self.replies:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply to %s" % msg_id)
            self._drain(min(left, 0.1))
        return self.replies[msg_id]

    def result(self, msg_id: str, timeout: float | None = None) -> Any:
        """Wait for an apply_reply and return its result (or raise RemoteError)."""
        reply = self.reply(msg_id, timeout)
        content = reply["content"]
        if content[protocol.STATUS] != protocol.OK:
            raise RemoteError(content)
        return deserialize_object(reply["buffers"])[0]

    def output(self, msg_id: str, settle: float = 0.2) -> list[dict[str, Any]]:
        """iopub messages of a request, after waiting ``settle`` seconds for late ones."""
        deadline = time.monotonic() + settle
        while (left := deadline - time.monotonic()) > 0:
            self._drain(left)
        return self.iopub.get(msg_id, [])


class RemoteError(StreamKernelError):
    """An error reply from an engine."""

    def __init__(self, content: dict[str, Any]) -> None:
        self.ename = content.get("ename", "?")
        self.evalue = content.get("evalue", "")
        self.traceback = "".join(content.get("traceback", []))
        self.status = content.get(protocol.STATUS)
        super().__init__("%s: %s" % (self.ename, self.evalue) if self.status == protocol.ERROR
                         else "request %s" % self.status)


__all__ = ["Client", "HubError", "RemoteError"]
