"""KernelStream: a ZMQStream with a lean receive path.

ZMQStream asks its socket for ``EVENTS`` through pyzmq's attribute sugar and
combines the answer and its poll state as ``enum.Flag`` values, twice per
wake-up, and receives through ``recv_multipart``: a few dozen Python calls per
message that do no work. KernelStream asks with plain integers and receives with
:func:`~streamkernel.session.recv_frames`; callbacks, sending, flushing and
closing are ZMQStream's own. Unlike ZMQStream, it keeps receiving after a
callback raised.
"""
from __future__ import annotations

from typing import Any

import zmq
from tornado.log import gen_log
from zmq.eventloop.zmqstream import ZMQStream

from .session import recv_frames, socket_events

_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)


class KernelStream(ZMQStream):
    """A ZMQStream for the engine's sockets: the same callbacks, fewer calls per message."""

    def _events(self) -> int | None:
        """The socket's pending events, or None when it cannot be asked (closed)."""
        if self.socket is None:
            return None
        try:
            return socket_events(self.socket)
        except zmq.ZMQError:  # closed, or its context terminated
            return None

    def _handle_events(self, fd: Any, events: int) -> None:
        pending = self._events()
        if pending is None:  # closed or failing: ZMQStream logs and cleans up
            super()._handle_events(fd, events)
            return
        try:
            if pending & _POLLIN and self._recv_callback is not None:
                self._handle_recv()
            if self.socket is not None and pending & _POLLOUT and self.sending():
                self._handle_send()
        except Exception:
            gen_log.error("Uncaught exception in zmqstream callback", exc_info=True)
            raise
        finally:  # also after a failed callback, so that later messages still arrive
            self._rebuild_io_state()

    def _handle_recv(self) -> None:
        if self._flushed:
            return
        frames = recv_frames(self.socket, copy=self._recv_copy, check=False)
        if frames is not None and self._recv_callback is not None:  # else: discarded
            self._run_callback(self._recv_callback, frames)

    def _rebuild_io_state(self) -> None:
        if self.socket is None:
            return
        state = (_POLLIN if self._recv_callback is not None else 0) | (
            _POLLOUT if self.sending() else 0)
        self._state = state
        self._update_handler(state)

    def _update_handler(self, state: int) -> None:
        pending = self._events()
        if pending is not None and state & pending:
            # events that came meanwhile: the socket's fd is edge-triggered, so look again
            self.io_loop.add_callback(lambda: self._handle_events(self.socket, 0))


__all__ = ["KernelStream"]
