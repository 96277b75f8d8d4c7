"""Serve control messages while user code holds the kernel's thread.

The kernel's thread owns the control and shell sockets, except while user code
runs: then it releases ``Kernel.socket_lock`` and this watcher may take it. A
request that has run for longer than ``delay`` seconds has its control socket
served from here: ``abort_request`` and ``shutdown_request`` are answered at
once (and interrupt the running request when they name it or shut the engine
down); other control requests wait for the kernel's thread. Between requests the
watcher parks: an idle engine has no thread waking up to look.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from . import protocol
from .session import recv_frames

if TYPE_CHECKING:
    from .kernel import Kernel

log = logging.getLogger(__name__)


class ControlWatcher(threading.Thread):
    """A daemon thread that serves urgent control requests during long user code."""

    daemon = True

    def __init__(self, kernel: Kernel, *, delay: float = 0.05, interval: float = 0.02,
                 shutdown_grace: float = 5.0) -> None:
        super().__init__(name="streamkernel-control")
        self.kernel = kernel
        self.delay = delay
        self.interval = interval
        self.shutdown_grace = shutdown_grace
        self._stopped = threading.Event()
        self._shutdown_at: float | None = None
        #: True while waiting for the next request; the kernel's thread then calls wake()
        self.parked = False
        self._wake = threading.Event()

    def stop(self) -> None:
        """Stop watching (returns at once; the thread ends within ``interval``)."""
        self._stopped.set()
        self._wake.set()

    def wake(self) -> None:
        """A request started (called by the kernel's thread when ``parked``)."""
        self.parked = False
        self._wake.set()

    def _park(self) -> None:
        self.parked = True
        # the kernel's thread sets running_since before it looks at parked
        if self.kernel.running_since is None and not self._stopped.is_set():
            self._wake.wait()
        self._wake.clear()
        self.parked = False

    def run(self) -> None:
        kernel = self.kernel
        while not self._stopped.wait(self.interval):
            started = kernel.running_since
            if started is None:
                self._park()
                continue
            if time.monotonic() - started < self.delay:
                continue
            if not kernel.socket_lock.acquire(blocking=False):
                continue
            try:
                if kernel.running_since is not None:
                    self._serve()
                    self._check_stuck_shutdown()
            except Exception:
                log.error("control watcher failed", exc_info=True)
            finally:
                kernel.socket_lock.release()

    def _serve(self) -> None:
        kernel = self.kernel
        stream = kernel.control_stream
        if stream is None or stream.closed():
            return
        while True:
            frames = recv_frames(stream.socket)
            if frames is None:
                return
            unpacked = kernel._unpack(frames, "control")
            if unpacked is None:
                continue
            idents, msg = unpacked
            msg_type = msg["msg_type"]
            if msg_type == protocol.ABORT_REQUEST:
                kernel._handle(stream.socket, idents, msg, {msg_type: kernel.abort_request})
            elif msg_type == protocol.SHUTDOWN_REQUEST:
                kernel._handle(stream.socket, idents, msg, {msg_type: self._shutdown})
            else:  # needs the kernel's thread: served before the next shell request
                kernel.deferred_control.append((stream, idents, msg, kernel.control_handlers))
                kernel.loop.add_callback(kernel.serve_control)

    def _shutdown(self, socket: Any, idents: list[bytes], msg: dict[str, Any]) -> None:
        kernel = self.kernel
        try:
            kernel._answer_shutdown(socket, idents, msg)
        finally:  # the running code is interrupted and the engine shuts down regardless
            kernel.interrupt("engine shutting down")
            kernel.loop.add_callback(kernel._schedule_shutdown)
            self._shutdown_at = time.monotonic()

    def _check_stuck_shutdown(self) -> None:
        if self._shutdown_at is None:
            return
        if time.monotonic() - self._shutdown_at > self.shutdown_grace:
            log.error("running code ignored the interrupt for %.1f s after shutdown",
                      self.shutdown_grace)
            self._shutdown_at = None
            self.kernel.abort_queues()
            if self.kernel.on_stuck is not None:
                self.kernel.on_stuck()


__all__ = ["ControlWatcher"]
