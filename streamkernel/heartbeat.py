"""Heartbeat: echo the hub's pings from a thread, so beats go on while code runs."""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import zmq

log = logging.getLogger(__name__)


class Heartbeat(threading.Thread):
    """Forward every ping from the hub's PUB (``ping_url``) to its ROUTER (``pong_url``).

    The echo leaves a DEALER whose identity is ``heart_id``. ``last_beat`` is the
    monotonic time of the latest ping (``None`` before the first).
    """

    daemon = True

    def __init__(self, context: zmq.Context, ping_url: str, pong_url: str,
                 heart_id: bytes, *, configure: Callable[[Any], None] | None = None,
                 poll_interval: float = 0.1) -> None:
        super().__init__(name="streamkernel-heartbeat")
        self.context = context
        self.ping_url = ping_url
        self.pong_url = pong_url
        self.heart_id = heart_id
        self.configure = configure
        self.poll_interval = poll_interval
        self.last_beat: float | None = None
        self.beats = 0
        self._stop_event = threading.Event()
        self._ready = threading.Event()

    def run(self) -> None:
        ping = self.context.socket(zmq.SUB)
        pong = self.context.socket(zmq.DEALER)
        try:
            for sock in (ping, pong):
                sock.linger = 0
                if self.configure is not None:
                    self.configure(sock)
            ping.setsockopt(zmq.SUBSCRIBE, b"")
            pong.setsockopt(zmq.IDENTITY, self.heart_id)
            ping.connect(self.ping_url)
            pong.connect(self.pong_url)
            self._ready.set()
            poller = zmq.Poller()
            poller.register(ping, zmq.POLLIN)
            timeout = int(self.poll_interval * 1000)
            while not self._stop_event.is_set():
                if not poller.poll(timeout):
                    continue
                while True:
                    try:
                        frames = ping.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.last_beat = time.monotonic()
                    self.beats += 1
                    pong.send_multipart(frames)
        except zmq.ContextTerminated:
            pass
        except Exception:
            log.error("heartbeat stopped", exc_info=True)
        finally:
            self._ready.set()
            ping.close(linger=0)
            pong.close(linger=0)

    def stop(self, timeout: float = 2.0) -> None:
        """Stop echoing and wait for the thread."""
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout)

    def silent_for(self, now: float | None = None) -> float:
        """Seconds since the last ping (or since start, before the first)."""
        now = time.monotonic() if now is None else now
        return now - (self.last_beat if self.last_beat is not None else self._started_at)

    def start(self) -> None:
        self._started_at = time.monotonic()
        super().start()
        self._ready.wait(5)


__all__ = ["Heartbeat"]
