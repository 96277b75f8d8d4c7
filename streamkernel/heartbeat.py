"""Heartbeat: echo the hub's pings from a ZeroMQ proxy, which runs in C without the
interpreter lock, so beats go on while user code runs, even code that holds the lock."""
from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Any, Callable

import zmq

from .session import recv_frames

log = logging.getLogger(__name__)

_ids = itertools.count()


class Heartbeat(threading.Thread):
    """Forward every ping from the hub's PUB (``ping_url``) to its ROUTER (``pong_url``).

    The echo leaves a DEALER whose identity is ``heart_id``. A copy of each ping goes
    to a capture socket; :meth:`silent_for` reads it to tell how long the hub has
    been quiet. Create, query and stop it from one thread (the engine's loop).
    """

    daemon = True

    def __init__(self, context: zmq.Context, ping_url: str, pong_url: str,
                 heart_id: bytes, *, configure: Callable[[Any], None] | None = None) -> None:
        super().__init__(name="streamkernel-heartbeat")
        self.context = context
        self.ping_url = ping_url
        self.pong_url = pong_url
        self.heart_id = heart_id
        self.configure = configure
        self.last_beat: float | None = None
        self.beats = 0
        n = next(_ids)
        self._capture_url = "inproc://streamkernel-heartbeat-capture-%d" % n
        self._control_url = "inproc://streamkernel-heartbeat-control-%d" % n
        self._capture = context.socket(zmq.SUB)  # a PUB copy never blocks the proxy
        self._capture.linger = 0
        self._capture.setsockopt(zmq.SUBSCRIBE, b"")
        self._capture.rcvhwm = 16
        self._capture.bind(self._capture_url)
        self._control = context.socket(zmq.PAIR)
        self._control.linger = 0
        self._control.bind(self._control_url)
        self._ready = threading.Event()
        self._started_at = time.monotonic()
        self._failure: zmq.ZMQError | None = None

    def run(self) -> None:
        sockets = []
        try:
            ping, pong = self.context.socket(zmq.SUB), self.context.socket(zmq.DEALER)
            capture, control = self.context.socket(zmq.PUB), self.context.socket(zmq.PAIR)
            sockets = [ping, pong, capture, control]
            for sock in sockets:
                sock.linger = 0
            for sock in (ping, pong):
                if self.configure is not None:
                    self.configure(sock)
            ping.setsockopt(zmq.SUBSCRIBE, b"")
            pong.setsockopt(zmq.IDENTITY, self.heart_id)
            capture.sndhwm = 16  # only "a ping came" matters: the rest is dropped
            try:
                ping.connect(self.ping_url)
                pong.connect(self.pong_url)
            except zmq.ZMQError as e:  # start() raises it in the thread that started us
                self._failure = e
                return
            capture.connect(self._capture_url)
            control.connect(self._control_url)
            self._ready.set()
            zmq.proxy_steerable(ping, pong, capture, control)
        except zmq.ContextTerminated:
            pass
        except Exception:
            log.error("heartbeat stopped", exc_info=True)
        finally:
            self._ready.set()
            for sock in sockets:
                sock.close(linger=0)

    def start(self) -> None:
        """Start echoing; raises ``zmq.ZMQError`` when the hub's addresses cannot be used."""
        self._started_at = time.monotonic()
        super().start()
        self._ready.wait(5)
        if self._failure is not None:
            self.join()
            raise self._failure
        self._capture.getsockopt(zmq.EVENTS)  # subscribe now: a SUB does so when used

    def stop(self, timeout: float = 2.0) -> None:
        """Stop echoing, wait for the thread and close the sockets."""
        if self.is_alive():
            self._control.send(b"TERMINATE")
            self.join(timeout)
        self._capture.close(linger=0)
        self._control.close(linger=0)

    def silent_for(self, now: float | None = None) -> float:
        """Seconds since the last ping (or since start, before the first)."""
        now = time.monotonic() if now is None else now
        while not self._capture.closed and recv_frames(self._capture, copy=True) is not None:
            self.last_beat = now
            self.beats += 1
        return now - (self.last_beat if self.last_beat is not None else self._started_at)


__all__ = ["Heartbeat"]
