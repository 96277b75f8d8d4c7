"""Kernel: serves execute, apply, complete and clear requests, plus abort and shutdown.

ZMQStream callbacks dispatch control and shell (MUX and task) messages. Control
is drained before each shell message; while a request runs, the control thread
(watcher.py) answers abort and shutdown. Every request that passes the session's
checks gets exactly one reply, sent back through the routing prefix it came with.
"""
from __future__ import annotations

import ast
import ctypes
import functools
import logging
import math
import os
import re
import rlcompleter
import signal
import sys
import threading
import time
from collections import OrderedDict, deque
from types import TracebackType
from typing import Any, Callable, Iterable, Sequence

import zmq
from tornado.ioloop import IOLoop

from . import legacy, protocol
from .config import MAX_BUSY_POLL_US
from .errors import MessageError, UnmetDependency, error_content
from .outstream import DisplayHook, OutStream, finish_output, redirect
from .serialize import is_legacy_payload, serialize_object, unpack_apply_message
from .session import Session, has_message, recv_frames
from .watcher import ControlWatcher

log = logging.getLogger(__name__)

Handler = Callable[[Any, list, dict], None]

#: File name of code run by execute_request.
CODE_FILENAME = "<streamkernel>"
_PACKAGE_DIR = os.path.dirname(os.path.normpath(os.path.abspath(__file__)))
_AST_FILE = os.path.normpath(os.path.abspath(ast.__file__))
_MAX_ABORTED = 100_000
_MAX_MATCHES = 1000
#: Completions stop at this many characters in all.
_MAX_MATCH_CHARS = 1 << 20
#: Longer texts complete nothing: each match repeats the whole dotted text before its
#: name, and the completer builds every match before the first is taken.
_MAX_COMPLETION_TEXT = 10_000
#: Code strings up to this long are compiled once and kept (256 of them at most).
_CACHED_CODE = 1 << 16
#: Shell messages served per loop wake-up at most (control is still served before each).
_BATCH = 64
#: The token a completion completes, matched at the start of the reversed line: a
#: search for ``[\w.]*$`` from the front takes time quadratic in the line's length.
_TOKEN_REVERSED = re.compile(r"[\w.]*")


def _last_token(line: str) -> str:
    """The name (dotted or not) that ``line`` ends with."""
    match = _TOKEN_REVERSED.match(line[::-1])
    return match.group(0)[::-1] if match else ""


class Kernel:
    """An engine kernel on ZMQStreams; the host passes in streams, session and loop.

    Parameters
    ----------
    session : Session
        Signs and verifies every message.
    control_stream, shell_streams, iopub_stream : ZMQStream
        The control ROUTER, the shell ROUTERs (MUX and task, usually one socket)
        and the iopub PUB. ``task_stream`` is added to the shell streams.
    int_id, ident : int, str
        The engine id the hub gave and the engine uuid (the session id by default).
    user_ns : dict
        Namespace of user code; a new one by default.
    exec_lines : list of str
        Code run at start and after each clear_request.
    on_shutdown : callable
        Called (from the loop, ``shutdown_delay`` seconds after the reply) when a
        shutdown_request is served. Without one the kernel just stops serving.
    on_stuck : callable
        Called from the control thread when running code ignores the interrupt of
        a shutdown for ``shutdown_grace`` seconds (the engine process exits).
    busy_poll : float
        Seconds to keep looking for the next shell message, without sleeping, after
        the queue runs dry, while requests come that close together (0: never). The
        loop waits meanwhile; control messages that come are served.
    """

    def __init__(self, *, session: Session | None = None, control_stream: Any = None,
                 shell_streams: Sequence[Any] = (), iopub_stream: Any = None,
                 task_stream: Any = None, loop: IOLoop | None = None, int_id: int = -1,
                 ident: str | bytes = "", user_ns: dict[str, Any] | None = None,
                 exec_lines: Iterable[str] = (), log: logging.Logger | None = None,
                 client: Any = None, on_shutdown: Callable[[], None] | None = None,
                 shutdown_delay: float = 1.0, on_stuck: Callable[[], None] | None = None,
                 shutdown_grace: float = 5.0, busy_poll: float = 0.0,
                 **legacy: Any) -> None:
        self.log = log or globals()["log"]
        for name in legacy:  # 0.11 traitlets options with no meaning here (config=...)
            self.log.debug("ignoring Kernel option %r", name)
        self.session = session if session is not None else Session(parse_dates=False)
        self.control_stream = control_stream
        self.shell_streams = [s for s in shell_streams if s is not None]
        if task_stream is not None and task_stream not in self.shell_streams:
            self.shell_streams.append(task_stream)
        self.task_stream = task_stream
        self.iopub_stream = iopub_stream
        self.loop = loop or IOLoop.current()
        self.int_id = int_id
        self.ident = ident.decode("ascii") if isinstance(ident, bytes) else (
            ident or self.session.session)
        self.bident = self.ident.encode("ascii")
        self.user_ns: dict[str, Any] = {} if user_ns is None else user_ns
        self.exec_lines = list(exec_lines)
        self.client = client
        self.on_shutdown = on_shutdown
        self.shutdown_delay = shutdown_delay
        self.on_stuck = on_stuck
        if isinstance(busy_poll, bool) or not isinstance(busy_poll, (int, float)) or not (
                0 <= busy_poll <= MAX_BUSY_POLL_US / 1e6):
            raise ValueError("busy_poll must be a number of seconds from 0 to %g, not %r"
                             % (MAX_BUSY_POLL_US / 1e6, busy_poll))
        self.busy_poll = busy_poll
        #: when the shell queue last ran dry, and whether to busy-poll when it next does
        self._idle_since = -math.inf
        self._polling = False
        self.aborted: OrderedDict[str, None] = OrderedDict()
        #: control requests received while a request ran, served before the next one
        self.deferred_control: deque[tuple[Any, list[bytes], dict[str, Any], dict]] = deque()
        #: a shell message taken off its socket, waiting while control is served first
        self._held: tuple[Any, list] | None = None
        self.shutting_down = False
        #: Held by the kernel's thread except while user code runs (see watcher.py).
        self.socket_lock = threading.Lock()
        self.running_since: float | None = None
        self.running_msg_id: str | None = None
        #: Interrupt user code with SIGINT (the process's handler calls interrupt()).
        self.interrupt_by_signal = False
        self._interrupt_reason: str | None = None
        self._pending_interrupt = False
        self._sending = False
        self._send_lock = threading.Lock()
        self._thread_id: int | None = None
        self.shutdown_grace = shutdown_grace
        self._watcher = ControlWatcher(self, shutdown_grace=shutdown_grace)
        self._parent: dict[str, Any] | bytes = {}
        self._iopub_socket = getattr(iopub_stream, "socket", iopub_stream)
        self._pyin_topic = self._topic(protocol.PYIN)
        self.shell_handlers: dict[str, Handler] = {
            t: getattr(self, t) for t in protocol.SHELL_REQUESTS}
        self.control_handlers: dict[str, Handler] = {
            t: getattr(self, t) for t in protocol.CONTROL_REQUESTS}
        self.stdout = OutStream("stdout", self._publish, self._topic("stdout"),
                                self.loop.add_callback)
        self.stderr = OutStream("stderr", self._publish, self._topic("stderr"),
                                self.loop.add_callback)
        self.displayhook = DisplayHook(self._publish, self._topic(protocol.PYOUT), self.user_ns)
        self._init_namespace()

    # -- setup ----------------------------------------------------------------------

    @property
    def prefix(self) -> str:
        """The iopub topic prefix ``engine.<id>``."""
        return "engine.%d" % self.int_id

    def _topic(self, kind: str) -> bytes:
        return protocol.topic(self.int_id, kind)

    def _init_namespace(self) -> None:
        self.user_ns.setdefault("__name__", "__main__")
        self.displayhook.namespace = self.user_ns
        self._completer = rlcompleter.Completer(self.user_ns)
        self._parent = {}
        for line in self.exec_lines:
            self.log.debug("running exec_line %r", line)
            try:
                with self._user_io():
                    self._run_code(line)
            except BaseException:
                self.log.error("exec_line %r failed", line, exc_info=True)

    def start(self) -> None:
        """Start receiving on the control and shell streams (from the loop's thread)."""
        self._thread_id = threading.get_ident()
        self.socket_lock.acquire()
        if self._watcher.ident is not None:  # started before: a thread runs only once
            self._watcher = ControlWatcher(self, shutdown_grace=self.shutdown_grace)
        self._watcher.start()
        if self.control_stream is not None:
            self.control_stream.on_recv(self.dispatch_control, copy=False)
        for stream in self.shell_streams:
            stream.on_recv(self._dispatcher(stream), copy=False)

    def stop(self) -> None:
        """Stop receiving (start() may follow); the streams stay open for the host to close."""
        self._watcher.stop()
        for stream in [self.control_stream] + self.shell_streams:
            if stream is not None and not stream.closed():
                stream.stop_on_recv()
        if self.running_since is None and self.socket_lock.locked():
            self.socket_lock.release()

    def _dispatcher(self, stream: Any) -> Callable[[list], None]:
        socket = stream.socket

        def dispatcher(frames: list) -> None:
            # serve what else is already queued (or comes within busy_poll) without a
            # loop round trip per message; control is served before each shell message
            self._polling = time.perf_counter() - self._idle_since < self.busy_poll
            self.dispatch_queue(stream, frames)
            for _ in range(_BATCH):
                if stream.closed() or self.shutting_down or not self._next_waits(socket):
                    return
                self.serve_control()  # before taking the next one, which an abort may cover
                waiting = recv_frames(socket, check=False)
                if waiting is None:
                    return
                self._serve_shell(stream, waiting)
            self._idle_since = time.perf_counter()  # back to the loop with more waiting
        return dispatcher

    def _next_waits(self, socket: Any) -> bool:
        """True when a message waits on ``socket``. When the queue has run dry, look
        again for up to ``busy_poll`` seconds if the last message came within that
        long of the queue running dry: a sleeping thread takes long to wake up."""
        if has_message(socket):
            return True
        self._idle_since = start = time.perf_counter()
        if not self._polling:
            return False
        control = self.control_stream
        deadline = start + self.busy_poll
        while time.perf_counter() < deadline:
            if control is not None and not control.closed() and has_message(control.socket):
                self.serve_control()  # asked, so its socket will not wake the loop for it
                if self.shutting_down:
                    return False
            if has_message(socket):
                return True
        self._polling = False  # requests come further apart: sleep until one comes
        return False

    # -- sending --------------------------------------------------------------------

    def _publish(self, msg_type: str, content: dict[str, Any], topic: bytes) -> None:
        """Send on iopub. An interrupt of the running code never lands inside the send
        (half a multipart message would corrupt the socket): it is raised after it."""
        if self._iopub_socket is None:
            return
        with self._send_lock:
            self._sending = True
            try:
                if self._pending_interrupt and not self.interrupt_by_signal:
                    self._clear_async_interrupt()  # hold it until the message is out
                self.session.send(self._iopub_socket, msg_type, content, parent=self._parent,
                                  ident=topic)
            finally:
                self._sending = False
        if self._pending_interrupt and self.running_since is not None:
            self._pending_interrupt = False
            raise KeyboardInterrupt(self._interrupt_reason or "interrupted")

    def _clear_async_interrupt(self) -> None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._thread_id or 0), None)

    def _reply(self, stream: Any, parent: dict[str, Any], content: dict[str, Any],
               idents: list[bytes], subheader: dict[str, Any] | None = None,
               buffers: Sequence[Any] | None = None) -> dict[str, Any]:
        """Send a reply now, straight on the stream's socket (ROUTER sends never block),
        unless the stream already queues messages, which must leave first."""
        if getattr(stream, "socket", None) is not None and not stream.sending():
            stream = stream.socket
        return self.session.send(stream, protocol.reply_type(parent["msg_type"]), content,
                                 parent=parent.get("raw_header") or parent["header"],
                                 ident=idents, buffers=buffers,
                                 subheader=subheader)

    def _reply_aborted(self, stream: Any, idents: list[bytes], msg: dict[str, Any]) -> None:
        status = {protocol.STATUS: protocol.ABORTED}
        self.log.info("aborting %s %s", msg["msg_type"], msg["msg_id"])
        self._reply(stream, msg, status, idents, subheader=status)

    def _engine_info(self, method: str) -> dict[str, Any]:
        return {"engine_uuid": self.ident, "engine_id": self.int_id, "method": method}

    # -- dispatch -------------------------------------------------------------------

    def _unpack(self, frames: list, where: str) -> tuple[list[bytes], dict[str, Any]] | None:
        try:
            idents, rest = self.session.feed_identities(frames, copy=False)
            return idents, self.session.deserialize(rest, content=True, copy=False)
        except MessageError as e:
            self.log.warning("dropped invalid %s message: %s", where, e)
        except Exception as e:
            self.log.warning("dropped invalid %s message: %s: %s", where, type(e).__name__, e)
        return None

    def dispatch_control(self, frames: list) -> None:
        """Handle one control message (received frames)."""
        unpacked = self._unpack(frames, "control")
        if unpacked is None:
            return
        idents, msg = unpacked
        self._handle(self.control_stream, idents, msg, self.control_handlers)

    def serve_control(self) -> None:
        """Handle every waiting control message: those put aside while a request ran
        first, then those on the control socket."""
        while self.deferred_control:
            self._handle(*self.deferred_control.popleft())
        control = self.control_stream
        if control is not None and not control.closed():
            waiting = recv_frames(control.socket)
            while waiting is not None:
                self.dispatch_control(waiting)
                waiting = recv_frames(control.socket) if not control.closed() else None

    def dispatch_queue(self, stream: Any, frames: list) -> None:
        """Handle one shell message, after serving every waiting control message; an
        abort of everything waiting (or a shutdown) among them answers it ``aborted``."""
        self._held = (stream, frames)
        try:
            self.serve_control()
        finally:
            held, self._held = self._held, None
        if held is not None:
            self._serve_shell(stream, frames)

    def _serve_shell(self, stream: Any, frames: list) -> None:
        unpacked = self._unpack(frames, "shell")
        if unpacked is None:
            return
        idents, msg = unpacked
        msg_id = msg["msg_id"]
        if msg_id in self.aborted or self.shutting_down:
            self.aborted.pop(msg_id, None)
            self._reply_aborted(stream, idents, msg)
            return
        self._handle(stream, idents, msg, self.shell_handlers)

    def _handle(self, stream: Any, idents: list[bytes], msg: dict[str, Any],
                handlers: dict[str, Handler]) -> None:
        msg_type = msg["msg_type"]
        handler = handlers.get(msg_type)
        if handler is None:
            if msg_type.endswith("_request") and len(msg_type) <= 100:  # a request: answer it
                self.log.warning("unknown request type %r: error reply", msg_type)
                self._reply(stream, msg, self._message_error(
                    "unknown request type %r on this socket" % msg_type, msg_type), idents)
            else:
                self.log.warning("dropped message of unknown type %r", msg_type[:100])
            return
        if log.isEnabledFor(logging.DEBUG):
            self.log.debug("%s %s from %r", msg_type, msg["msg_id"], idents)
        try:
            handler(stream, idents, msg)
        except Exception:
            self.log.error("%s %s failed", msg_type, msg["msg_id"], exc_info=True)
            try:
                self._reply(stream, msg, error_content(self._engine_info(msg_type)), idents)
            except Exception:
                self.log.error("could not send the error reply", exc_info=True)

    # -- control handlers -------------------------------------------------------------

    def abort_queues(self) -> None:
        """Answer every message waiting on the shell streams as aborted."""
        self._answer_aborted(self._drain())

    def abort_queue(self, stream: Any) -> None:
        """Answer every message waiting on ``stream`` as aborted."""
        self._answer_aborted(self._drain([stream]))

    def _drain(self, streams: Sequence[Any] | None = None) -> list[tuple[Any, list]]:
        """Take every message waiting on the shell streams, without answering yet; the
        one already taken off its socket for :meth:`dispatch_queue` comes first."""
        waiting = []
        held = self._held
        if held is not None and (streams is None or held[0] in streams):
            waiting.append(held)
            self._held = None
        for stream in self.shell_streams if streams is None else streams:
            socket = getattr(stream, "socket", stream)
            frames = recv_frames(socket)
            while frames is not None:
                waiting.append((stream, frames))
                frames = recv_frames(socket)
        return waiting

    def _answer_aborted(self, waiting: list[tuple[Any, list]]) -> None:
        for stream, frames in waiting:
            unpacked = self._unpack(frames, "shell")
            if unpacked is not None:
                self._reply_aborted(stream, *unpacked)
        if waiting:
            # Sending on the shell sockets here, maybe from a control callback or the
            # control thread, takes the wake-up their edge-triggered file descriptors
            # gave for a message that came meanwhile: have the streams look again.
            self.loop.add_callback(self._look_at_shell)

    def _look_at_shell(self) -> None:
        for stream in self.shell_streams:
            if not stream.closed():
                stream._handle_events(stream.socket, 0)

    def abort_request(self, stream: Any, idents: list[bytes], msg: dict[str, Any]) -> None:
        """Abort the named queued requests, or all waiting ones when none are named."""
        msg_ids = msg["content"].get("msg_ids")
        if isinstance(msg_ids, str):
            msg_ids = [msg_ids]
        if msg_ids is not None and not (isinstance(msg_ids, list) and all(
                isinstance(m, (str, int)) for m in msg_ids)):
            self._reply(stream, msg, self._message_error(
                "abort_request msg_ids must be a list of message ids", "abort"), idents)
            return
        if not msg_ids:
            self.abort_queues()
        else:
            self.mark_aborted(msg_ids)
            if self.running_msg_id in msg_ids:  # only from the control thread
                self.interrupt("aborted by abort_request %s" % msg["msg_id"])
        self._reply(stream, msg, {protocol.STATUS: protocol.OK}, idents)

    def mark_aborted(self, msg_ids: Iterable[Any]) -> None:
        """Remember ids to answer as aborted when they reach the front of the queue."""
        aborted = self.aborted
        for mid in msg_ids:
            key = str(mid)
            aborted[key] = None
            aborted.move_to_end(key)  # named again: as recent as the newest
        while len(aborted) > _MAX_ABORTED:  # the oldest go first, each in constant time
            aborted.popitem(last=False)

    def shutdown_request(self, stream: Any, idents: list[bytes], msg: dict[str, Any]) -> None:
        """Abort what is queued, reply, then shut down after ``shutdown_delay``."""
        try:
            self._answer_shutdown(stream, idents, msg)
        finally:  # shut down even when the reply could not be sent
            self._schedule_shutdown()

    def _answer_shutdown(self, stream: Any, idents: list[bytes], msg: dict[str, Any]) -> None:
        """Stop serving, answer what is queued as aborted and reply; the caller shuts down."""
        self.log.info("shutdown requested by %s", msg["header"].get("session", "?"))
        self.shutting_down = True
        try:
            self.abort_queues()
        except Exception:
            content = error_content(self._engine_info("shutdown"))
        else:
            content = _shutdown_reply(msg["content"])
        self._reply(stream, msg, content, idents)

    def _schedule_shutdown(self) -> None:
        self.loop.call_later(self.shutdown_delay, self._finish_shutdown)

    def _finish_shutdown(self) -> None:
        self.abort_queues()
        self.stop()
        for stream in self.shell_streams + [self.control_stream, self.iopub_stream]:
            flush = getattr(stream, "flush", None)
            if flush is not None and not stream.closed():
                flush(zmq.POLLOUT)
        if self.on_shutdown is not None:
            self.on_shutdown()

    # -- shell handlers ---------------------------------------------------------------

    def clear_request(self, stream: Any, idents: list[bytes], msg: dict[str, Any]) -> None:
        """Empty the user namespace and rerun ``exec_lines``."""
        self.user_ns.clear()
        self._reply(stream, msg, {protocol.STATUS: protocol.OK}, idents)
        self._init_namespace()

    def complete_request(self, stream: Any, idents: list[bytes], msg: dict[str, Any]) -> None:
        """Reply with completions of ``text`` (or of the token before the cursor)."""
        content = msg["content"]
        matches = self.complete(content.get("text"), content.get("line"),
                                content.get("cursor_pos"), content.get("block"))
        self._reply(stream, msg, {"matches": matches, protocol.STATUS: protocol.OK}, idents)

    def complete(self, text: Any = None, line: Any = None, cursor_pos: Any = None,
                 block: Any = None) -> list[str]:
        """Return names from the user namespace and builtins that complete the input."""
        if not isinstance(line, str):
            line = block if isinstance(block, str) else ""
        if not isinstance(cursor_pos, int) or not 0 <= cursor_pos <= len(line):
            cursor_pos = len(line)
        if not isinstance(text, str) or not text:
            text = _last_token(line[:cursor_pos])
        matches: list[str] = []
        if len(text) > _MAX_COMPLETION_TEXT:
            return matches
        seen: set[str] = set()
        state = 0
        size = 0
        while len(matches) < _MAX_MATCHES:
            try:
                with self._user_io():
                    word = self._completer.complete(text, state)
            except BaseException:
                break
            if word is None:
                break
            state += 1
            if word not in seen:
                size += len(word)
                if size > _MAX_MATCH_CHARS:
                    break
                seen.add(word)
                matches.append(word)
        return matches

    def execute_request(self, stream: Any, idents: list[bytes], msg: dict[str, Any]) -> None:
        """Run a code string; an error answers everything waiting as aborted."""
        code = msg["content"].get("code")
        self._parent = msg.get("raw_header") or msg["header"]
        if not isinstance(code, str):
            self.log.warning("execute_request %s without a string 'code': error reply",
                             msg["msg_id"])
            self._reply(stream, msg, self._message_error(
                "execute_request content needs a string 'code'", "execute"), idents)
            return
        self._publish(protocol.PYIN, {"code": code}, self._pyin_topic)
        started = protocol.now()
        try:
            self._run_user(msg["msg_id"], self._run_code, code)
        except BaseException:
            content = self._error("execute")
        else:
            content = {protocol.STATUS: protocol.OK}
        waiting = []
        aborted_alone = (self._interrupt_reason or "").startswith("aborted by")
        self._interrupt_reason = None
        if content[protocol.STATUS] == protocol.ERROR and not aborted_alone:
            # stop on error: what was queued before this reply leaves is aborted after it
            waiting = self._drain()
        self._reply(stream, msg, content, idents, subheader={protocol.STARTED: started})
        self._answer_aborted(waiting)

    def apply_request(self, stream: Any, idents: list[bytes], msg: dict[str, Any]) -> None:
        """Call a serialized function; the result travels in the reply's buffers."""
        self._parent = msg.get("raw_header") or msg["header"]
        sub = {protocol.DEPENDENCIES_MET: True, protocol.ENGINE: self.ident,
               protocol.STARTED: protocol.now()}
        bufs = msg.pop("buffers")
        result_buf: list[Any] = []
        unpack, pack = unpack_apply_message, serialize_object
        if bufs and is_legacy_payload(bufs[0]):  # a Python 2 client: answer in its format
            unpack, pack = legacy.unpack_apply_message, legacy.serialize_object

        def call() -> list[Any]:
            f, args, kwargs = unpack(bufs, self.user_ns, copy=False)
            del bufs[:]  # the frames are no longer needed (arrays keep what they use)
            return pack(f(*args, **kwargs))

        try:
            result_buf = self._run_user(msg["msg_id"], call)
        except BaseException:
            del bufs[:]
            content = self._error("apply")
            if content["ename"] in ("UnmetDependency", "ImpossibleDependency"):
                sub[protocol.DEPENDENCIES_MET] = False
        else:
            content = {protocol.STATUS: protocol.OK}
        sub[protocol.STATUS] = content[protocol.STATUS]
        self._interrupt_reason = None
        self._reply(stream, msg, content, idents, subheader=sub, buffers=result_buf)

    # -- running user code --------------------------------------------------------------

    def _run_user(self, msg_id: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Return ``fn(*args)`` run as user code of request ``msg_id``: its output goes to
        iopub, and the control thread may serve control and interrupt it meanwhile."""
        saved = sys.stdout, sys.stderr, sys.displayhook
        self.stdout.parent = self.stderr.parent = self._parent
        sys.stdout, sys.stderr, sys.displayhook = self.stdout, self.stderr, self.displayhook
        self._interrupt_reason = None
        self._pending_interrupt = False
        self.running_msg_id = msg_id
        self.running_since = time.monotonic()
        if self._watcher.parked:  # this request may run long enough to need it
            self._watcher.wake()
        self.socket_lock.release()
        try:
            return fn(*args)
        finally:
            try:
                self.running_since = None  # from here on SIGINT no longer interrupts
            finally:
                self.socket_lock.acquire()
                self.running_msg_id = None
                if self._pending_interrupt or (
                        self._interrupt_reason is not None and not self.interrupt_by_signal):
                    # an interrupt that came too late for the code: it must not hit the kernel
                    self._pending_interrupt = False
                    if not self.interrupt_by_signal:
                        self._clear_async_interrupt()
                sys.stdout, sys.stderr, sys.displayhook = saved
                finish_output(self.stdout, self.stderr)

    def interrupt(self, reason: str = "interrupted") -> bool:
        """Raise KeyboardInterrupt in running user code; False when none runs."""
        if self.running_since is None or self._thread_id is None:
            return False
        self._interrupt_reason = reason
        if self.interrupt_by_signal and self._thread_id == threading.main_thread().ident:
            signal.pthread_kill(self._thread_id, signal.SIGINT)  # see on_sigint
        else:
            with self._send_lock:  # never while the kernel thread sends (see _publish)
                self._pending_interrupt = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(self._thread_id), ctypes.py_object(KeyboardInterrupt))
        return True

    def on_sigint(self) -> bool:
        """For the process's SIGINT handler: interrupt user code if it runs. True also
        for an interrupt the control thread sent that came after the code ended."""
        if self.running_since is None:
            late = self._interrupt_reason is not None
            self._interrupt_reason = None
            return late
        if self._sending:  # in the middle of a message: raised once it is out
            self._pending_interrupt = True
            return True
        raise KeyboardInterrupt(self._interrupt_reason or "interrupted by SIGINT")

    def _user_io(self) -> Any:
        self.stdout.parent = self.stderr.parent = self._parent
        return redirect(self.stdout, self.stderr, self.displayhook)

    def _run_code(self, code: str) -> None:
        """Run all of ``code``; the value of a final expression statement goes to pyout."""
        body, last = _compile(code)
        if body is not None:
            exec(body, self.user_ns)
        if last is not None:
            exec(last, self.user_ns)

    def _message_error(self, text: str, method: str) -> dict[str, Any]:
        """Reply content for a request that cannot be served as sent (a client's mistake)."""
        error = MessageError(text)
        return error_content(self._engine_info(method), (MessageError, error, None))

    def _error(self, method: str) -> dict[str, Any]:
        """Publish pyerr for the exception being handled and return the reply content."""
        etype, evalue, tb = sys.exc_info()
        if isinstance(evalue, KeyboardInterrupt) and not evalue.args and self._interrupt_reason:
            evalue = KeyboardInterrupt(self._interrupt_reason)  # raised in this thread bare
        tb = _user_traceback(tb, trailing=isinstance(evalue, KeyboardInterrupt))
        content = error_content(self._engine_info(method), (etype, evalue, tb))
        self._publish(protocol.PYERR, content, self._topic(protocol.PYERR))
        return content


def _shutdown_reply(request: dict[str, Any]) -> dict[str, Any]:
    """The request's content with ``status: ok`` (as legacy engines answered), or just
    the status and ``restart`` when the content cannot be sent back."""
    content = dict(request)
    content[protocol.STATUS] = protocol.OK
    try:
        protocol.pack(content)
    except (TypeError, ValueError, RecursionError):
        content = {protocol.STATUS: protocol.OK}
        if isinstance(request.get("restart"), bool):
            content["restart"] = request["restart"]
    return content


@functools.lru_cache(maxsize=64)
def _internal(filename: str) -> bool:
    """True for frames of this package and of the compiler (not the user's)."""
    path = os.path.normpath(os.path.abspath(filename))
    return path.startswith(_PACKAGE_DIR + os.sep) or path == _AST_FILE


def _user_traceback(tb: TracebackType | None, trailing: bool) -> TracebackType | None:
    """``tb`` without this package's frames before the user's code, and after it when
    ``trailing`` (an interrupt is raised inside the engine's handler, not the user's code)."""
    while tb is not None and _internal(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    if not trailing:
        return tb
    entries = []
    while tb is not None:
        entries.append(tb)
        tb = tb.tb_next
    while entries and _internal(entries[-1].tb_frame.f_code.co_filename):
        entries.pop()
    for entry in reversed(entries):
        tb = TracebackType(tb, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return tb


def _compile(code: str) -> tuple[Any, Any]:
    """Compile ``code`` into (statements, final expression in 'single' mode or None);
    code run again is compiled once, unless it is longer than :data:`_CACHED_CODE`."""
    return _compile_source(code) if len(code) > _CACHED_CODE else _compile_cached(code)


def _compile_source(code: str) -> tuple[Any, Any]:
    tree = ast.parse(code, CODE_FILENAME, "exec")
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    body = compile(tree, CODE_FILENAME, "exec") if tree.body else None
    single = compile(ast.Interactive([last]), CODE_FILENAME, "single") if last else None
    return body, single


_compile_cached = functools.lru_cache(maxsize=256)(_compile_source)


__all__ = ["Kernel", "UnmetDependency"]
