"""stdout/stderr and the display hook of user code, published on iopub.

The kernel swaps them in with :func:`redirect` for one request and restores the
previous ones afterwards, so nothing outside a request is touched.
"""
from __future__ import annotations

import codecs
import io
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from . import protocol

#: Output is published once this many characters are buffered ...
CHUNK_SIZE = 64 * 1024
#: ... or this many seconds after the first buffered write.
FLUSH_INTERVAL = 0.05
#: Output buffered from other threads beyond this is dropped (with a note).
MAX_PENDING = 16 * 1024 * 1024

Publisher = Callable[[str, dict, bytes], None]


class _BinaryWriter(io.RawIOBase):
    """``sys.stdout.buffer``: bytes are decoded as UTF-8 (invalid bytes become U+FFFD);
    a character split across writes is kept whole."""

    def __init__(self, text: OutStream) -> None:
        super().__init__()
        self._text = text
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._written = False

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self._written = True
        text = self._decoder.decode(data)
        if text:
            self._text.write(text)
        return len(data)

    def finish(self) -> None:
        """Write out an incomplete character left by the last write (as U+FFFD)."""
        if not self._written:
            return
        self._written = False
        text = self._decoder.decode(b"", final=True)
        if text:
            self._text.write(text)


class OutStream(io.TextIOBase):
    """A text stream whose writes become iopub ``stream`` messages.

    Writes from any thread are buffered; only the thread that owns the stream
    publishes, other threads ask it to through ``wake``.
    """

    def __init__(self, name: str, publish: Publisher, topic: bytes,
                 wake: Callable[[Callable[[], None]], None] | None = None) -> None:
        super().__init__()
        self.name = name
        self.topic = topic
        self.parent: dict[str, Any] | bytes = {}
        self._publish = publish
        self._wake = wake
        self._owner = threading.get_ident()
        self._lock = threading.Lock()
        self._parts: list[str] = []
        self._size = 0
        self._dropped = 0
        self._start = 0.0
        self._wake_pending = False
        self.buffer = _BinaryWriter(self)

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    @property
    def errors(self) -> str:  # type: ignore[override]
        return "replace"

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def set_parent(self, parent: dict[str, Any]) -> None:
        """Flush what belongs to the previous request, then attribute output to ``parent``."""
        self.flush()
        self.parent = parent

    def write(self, s: Any) -> int:
        if isinstance(s, (bytes, bytearray)):
            s = bytes(s).decode("utf-8", "replace")
        elif not isinstance(s, str):
            raise TypeError("write() argument must be str, not %s" % type(s).__name__)
        if not s:
            return 0
        mine = threading.get_ident() == self._owner
        with self._lock:
            if not mine and self._size + len(s) > MAX_PENDING:
                self._dropped += len(s)
                return len(s)
            if not self._parts:
                self._start = time.monotonic()
            self._parts.append(s)
            self._size += len(s)
            due = self._size >= CHUNK_SIZE or time.monotonic() - self._start > FLUSH_INTERVAL
        if mine:
            if due:
                self.flush()
        elif self._wake is not None and not self._wake_pending:
            self._wake_pending = True
            self._wake(self._flush_from_owner)
        return len(s)

    def _flush_from_owner(self) -> None:
        self._wake_pending = False
        self.flush()

    def flush(self) -> None:
        if threading.get_ident() != self._owner or not (self._parts or self._dropped):
            return  # (what another thread adds meanwhile is flushed on its wake-up)
        with self._lock:
            if not self._parts and not self._dropped:
                return
            data = "".join(self._parts)
            if self._dropped:
                data += "\n[%d characters of output from other threads dropped]\n" % self._dropped
            self._parts = []
            self._size = 0
            self._dropped = 0
        for i in range(0, len(data), CHUNK_SIZE):
            self._publish(protocol.STREAM, {"name": self.name, "data": data[i:i + CHUNK_SIZE]},
                          self.topic)

    def fileno(self) -> int:
        raise io.UnsupportedOperation("OutStream has no file descriptor")


class DisplayHook:
    """``sys.displayhook`` for user code: publishes ``pyout {data: repr(value)}``."""

    def __init__(self, publish: Publisher, topic: bytes, namespace: dict[str, Any]) -> None:
        self._publish = publish
        self.topic = topic
        self.namespace = namespace

    def __call__(self, value: Any) -> None:
        if value is None:
            return
        self.namespace["_"] = value
        for stream in (sys.stdout, sys.stderr):  # output printed before the value goes first
            flush = getattr(stream, "flush", None)
            if flush is not None:
                flush()
        self._publish(protocol.PYOUT, {"data": repr(value)}, self.topic)


@contextmanager
def redirect(stdout: OutStream, stderr: OutStream, displayhook: DisplayHook
             ) -> Iterator[None]:
    """Swap in the request's stdout, stderr and display hook; restore them afterwards."""
    saved = sys.stdout, sys.stderr, sys.displayhook
    sys.stdout, sys.stderr, sys.displayhook = stdout, stderr, displayhook
    try:
        yield
    finally:
        sys.stdout, sys.stderr, sys.displayhook = saved
        finish_output(stdout, stderr)


def finish_output(*streams: OutStream) -> None:
    """Publish what a request left in ``streams`` (an incomplete character included)."""
    for stream in streams:
        try:
            stream.buffer.finish()
            stream.flush()
        except Exception:
            pass


__all__ = ["OutStream", "DisplayHook", "redirect", "finish_output", "CHUNK_SIZE", "FLUSH_INTERVAL"]
