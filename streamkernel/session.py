"""Session: build, sign, send, receive and verify messages.

A message on the wire is one ZeroMQ multipart message::

    [ident, ..., b'<IDS|MSG>', signature, header, parent_header, content, buffer, ...]

``signature`` is the hex HMAC (MD5 by default, SHA-256 on request) of header,
parent_header and content, keyed by the exec key; buffers are not signed. With
an empty key the signature is empty and nothing is checked. A signature seen
before is rejected (replay), from a bounded history. Nothing is unpacked before
its signature checks out.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
from collections import deque
from itertools import repeat
from typing import Any, Callable, Iterable, Sequence, Union

import zmq

from . import protocol
from .errors import (DuplicateSignature, InvalidSignature, MalformedMessage, MessageError,
                     UnsignedMessage)
from .protocol import DELIM, MIN_FRAMES

log = logging.getLogger(__name__)

_DIGESTS = {"hmac-md5": hashlib.md5, "hmac-sha256": hashlib.sha256}

#: Anything frames can be: bytes, or zmq.Frame when received with ``copy=False``.
Frame = Union[bytes, "zmq.Frame", memoryview]


def _as_bytes(frame: Any) -> bytes:
    if isinstance(frame, bytes):
        return frame
    if isinstance(frame, zmq.Frame):
        return frame.bytes
    return bytes(frame)


class Session:
    """Builds, signs, sends, receives and verifies messages for one peer identity.

    Parameters
    ----------
    key : bytes
        HMAC key (the ``exec_key``). Empty: messages are neither signed nor checked.
    session : str
        This session's id, sent as ``header.session``; a new uuid4 by default.
    signature_scheme : str
        ``"hmac-md5"`` (what legacy peers use) or ``"hmac-sha256"``.
    digest_history_size : int
        At least this many of the latest signatures are remembered to reject replays
        (at most twice as many: the history is two generations of this size, and the
        older one is forgotten whole). A hash of each is kept, about 50 bytes.
    parse_dates : bool
        Turn date strings of received headers and contents into datetimes, as
        legacy peers did. The engine leaves them as strings and echoes them as received.
    """

    def __init__(self, key: bytes | str = b"", *, session: str | None = None,
                 username: str = protocol.USERNAME, signature_scheme: str = "hmac-md5",
                 digest_history_size: int = 1 << 14, parse_dates: bool = True) -> None:
        key = key.encode("utf-8") if isinstance(key, str) else bytes(key)
        if signature_scheme not in _DIGESTS:
            raise ValueError("signature_scheme must be one of %s, not %r"
                             % (", ".join(_DIGESTS), signature_scheme))
        if digest_history_size < 1:
            raise ValueError("digest_history_size must be positive")
        self.key = key
        self.session = session or protocol.new_id()
        self.bsession = self.session.encode("ascii")
        self.username = username
        self.signature_scheme = signature_scheme
        self.parse_dates = parse_dates
        self._auth = _Hmac(key, _DIGESTS[signature_scheme]) if key else None
        self.digest_history_size = digest_history_size
        self._digests: set[int] = set()
        self._old_digests: set[int] = set()
        self.none = protocol.pack({})

    # -- building -----------------------------------------------------------------

    @property
    def msg_id(self) -> str:
        """A new message id on every access."""
        return protocol.new_id()

    def msg_header(self, msg_type: str) -> dict[str, Any]:
        """Return a new header for ``msg_type`` from this session."""
        return protocol.msg_header(protocol.new_id(), msg_type, self.username, self.session)

    def msg(self, msg_type: str, content: dict[str, Any] | None = None,
            parent: dict[str, Any] | bytes | None = None,
            subheader: dict[str, Any] | None = None) -> dict[str, Any]:
        """Return a message dict; ``subheader`` keys are merged into the header.

        ``parent`` is a message, a header, or a header already packed (bytes).
        """
        header = self.msg_header(msg_type)
        if subheader:
            header.update(subheader)
        return {
            "header": header,
            "msg_id": header["msg_id"],
            "msg_type": msg_type,
            "parent_header": parent if isinstance(parent, bytes) else protocol.extract_header(
                parent),
            "content": {} if content is None else content,
        }

    # -- signing ------------------------------------------------------------------

    def sign(self, parts: Sequence[bytes]) -> bytes:
        """Return the hex HMAC of ``parts`` (header, parent, content); ``b''`` without a key."""
        if self._auth is None:
            return b""
        return self._auth.hexdigest(parts)

    def _remember(self, signature: bytes) -> None:
        digest = hash(signature)  # a replay has the same bytes, so the same hash
        if digest in self._digests or digest in self._old_digests:
            raise DuplicateSignature("duplicate signature (replayed message)")
        self._digests.add(digest)
        if len(self._digests) >= self.digest_history_size:
            self._old_digests, self._digests = self._digests, set()

    # -- serializing --------------------------------------------------------------

    def serialize(self, msg: dict[str, Any], ident: bytes | Sequence[bytes] | None = None
                  ) -> list[bytes]:
        """Return ``[idents..., DELIM, signature, header, parent, content]`` for ``msg``.

        ``parent_header`` and ``content`` may be given already packed, as bytes.
        """
        content = msg.get("content")
        if content is None:
            content = self.none
        elif isinstance(content, dict):
            content = protocol.pack(content)
        elif isinstance(content, str):
            content = content.encode("utf-8")
        elif not isinstance(content, bytes):
            raise TypeError("content must be a dict or bytes, not %s" % type(content).__name__)
        parent = msg.get("parent_header") or {}
        if not isinstance(parent, bytes):
            parent = protocol.pack(parent)
        real = [protocol.pack(msg["header"]), parent, content]
        if ident is None:
            frames: list[bytes] = []
        elif isinstance(ident, (bytes, bytearray, memoryview, zmq.Frame)):
            frames = [ident]  # type: ignore[list-item]
        else:
            frames = list(ident)
        frames.append(DELIM)
        frames.append(self.sign(real))
        frames.extend(real)
        return frames

    def send(self, stream: Any, msg_or_type: dict[str, Any] | str,
             content: dict[str, Any] | bytes | None = None,
             parent: dict[str, Any] | bytes | None = None,
             ident: bytes | Sequence[bytes] | None = None,
             buffers: Sequence[Any] | None = None,
             subheader: dict[str, Any] | None = None, track: bool = False) -> dict[str, Any]:
        """Build (unless given a message dict), sign and send a message on a socket or stream.

        Buffers are sent without copying. Returns the message dict sent.
        """
        if isinstance(msg_or_type, dict):
            msg = msg_or_type
        else:
            msg = self.msg(msg_or_type, content, parent, subheader)  # type: ignore[arg-type]
        frames: list[Any] = self.serialize(msg, ident)
        if buffers:
            for buf in buffers:
                _check_buffer(buf)
            frames.extend(buffers)
        if track:
            msg["tracker"] = stream.send_multipart(frames, copy=False, track=True)
        else:  # without buffers, all frames are routing ids and small JSON: copied
            send_frames(stream, frames, copy=not buffers)
        return msg

    # -- receiving ----------------------------------------------------------------

    def feed_identities(self, msg_list: Sequence[Any], copy: bool = True
                        ) -> tuple[list[bytes], list[Any]]:
        """Split ``msg_list`` at the delimiter into (routing idents, the rest).

        Raises MalformedMessage when there is no delimiter.
        """
        for idx, frame in enumerate(msg_list):
            if len(frame) == len(DELIM) and _as_bytes(frame) == DELIM:
                idents = [_as_bytes(f) for f in msg_list[:idx]]
                return idents, list(msg_list[idx + 1:])
        raise MalformedMessage("no delimiter %r among %d frames" % (DELIM, len(msg_list)))

    def deserialize(self, msg_list: Sequence[Any], content: bool = True, copy: bool = True
                    ) -> dict[str, Any]:
        """Verify and unpack ``[signature, header, parent, content, buffers...]``.

        The signature is checked (and remembered) before anything is unpacked.
        Buffers are returned as received (bytes, or zmq.Frame when ``copy=False``);
        ``raw_header`` is the header as received, to echo as a reply's parent.
        Raises a MessageError subclass for anything that must be dropped.
        """
        if len(msg_list) < MIN_FRAMES:
            raise MalformedMessage("a message needs at least %d frames after the delimiter, got %d"
                                   % (MIN_FRAMES, len(msg_list)))
        signature = _as_bytes(msg_list[protocol.SIGNATURE])
        header_b = _as_bytes(msg_list[protocol.HEADER])
        parent_b = _as_bytes(msg_list[protocol.PARENT])
        content_b = _as_bytes(msg_list[protocol.CONTENT])
        if self._auth is not None:
            if not signature:
                raise UnsignedMessage("unsigned message")
            if not hmac.compare_digest(signature, self.sign((header_b, parent_b, content_b))):
                raise InvalidSignature("invalid signature")
            self._remember(signature)
        try:
            header = protocol.unpack(header_b)
            parent = protocol.unpack(parent_b)
            body = protocol.unpack(content_b) if content else content_b
        except (ValueError, UnicodeDecodeError) as e:
            raise MalformedMessage("frames are not JSON: %s" % e) from None
        except RecursionError:
            raise MalformedMessage("JSON nested too deeply") from None
        if not isinstance(header, dict) or not isinstance(parent, dict) or (
                content and not isinstance(body, dict)):
            raise MalformedMessage("header, parent_header and content must be JSON objects")
        msg_type = header.get("msg_type")
        if not isinstance(msg_type, str) or not isinstance(header.get("msg_id"), str):
            raise MalformedMessage("header lacks a string msg_type or msg_id")
        if self.parse_dates:
            header = protocol.extract_dates(header)
            parent = protocol.extract_dates(parent)
            if content:
                body = protocol.extract_dates(body)
        buffers = list(msg_list[MIN_FRAMES:])
        if copy:
            buffers = [_as_bytes(b) for b in buffers]
        return {
            "header": header,
            "msg_id": header["msg_id"],
            "msg_type": msg_type,
            "parent_header": parent,
            "content": body,
            "buffers": buffers,
            "raw_header": header_b,
        }

    #: 0.11 names of :meth:`deserialize`
    unserialize = deserialize
    unpack_message = deserialize

    def recv(self, socket: Any, mode: int = zmq.NOBLOCK, content: bool = True,
             copy: bool = True) -> tuple[list[bytes] | None, dict[str, Any] | None]:
        """Receive one message from a socket or stream: ``(idents, msg)``, or
        ``(None, None)`` when nothing is waiting. Invalid messages raise MessageError."""
        socket = getattr(socket, "socket", socket)
        try:
            msg_list = socket.recv_multipart(mode, copy=copy)
        except zmq.Again:
            return None, None
        idents, rest = self.feed_identities(msg_list, copy)
        return idents, self.deserialize(rest, content=content, copy=copy)


_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))


class _Hmac:
    """HMAC (RFC 2104) from two keyed hash states copied per message: the same digest as
    :func:`hmac.new`, with less setup per message than a copy of an HMAC object."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes, digest: Callable[..., Any]) -> None:
        block = digest().block_size
        if len(key) > block:
            key = digest(key).digest()
        key = key.ljust(block, b"\0")
        self._inner = digest(key.translate(_IPAD))
        self._outer = digest(key.translate(_OPAD))

    def hexdigest(self, parts: Sequence[bytes]) -> bytes:
        """The hex digest of the concatenated ``parts``, as ASCII bytes."""
        inner = self._inner.copy()
        for part in parts:
            inner.update(part)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest().encode("ascii")


_raw_send = zmq.backend.Socket.send
_consume: Callable[[Any], None] = deque(maxlen=0).extend
_raw_recv = zmq.backend.Socket.recv
_raw_get = zmq.backend.Socket.get
_SNDMORE = int(zmq.SNDMORE)
_RCVMORE = int(zmq.RCVMORE)
_NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
#: pyzmq's Cython backend sets ``Frame.more`` on every receive (its cffi backend does not)
_FRAMES_KNOW_MORE = zmq.backend.Socket.__module__.startswith("zmq.backend.cython")


def socket_events(socket: zmq.Socket) -> int:
    """The socket's pending events (``POLLIN | POLLOUT`` bits), asked without pyzmq's sugar."""
    return int(_raw_get(socket, _EVENTS))


def has_message(socket: zmq.Socket) -> bool:
    """True when a message waits on ``socket`` (cheaper than a receive that finds none)."""
    return bool(socket_events(socket) & _POLLIN)


def recv_frames(socket: zmq.Socket, copy: bool = False, check: bool = True,
                wait: bool = False) -> list[Any] | None:
    """Receive one multipart message; None when nothing is queued.

    ``check`` first asks the socket whether a message waits (:func:`has_message`);
    without it the receive is tried at once, which is cheaper when one is likely to
    wait. ``wait`` blocks for the first frame (up to the socket's ``rcvtimeo``).
    """
    if check and not wait and not has_message(socket):
        return None
    try:
        frame = _raw_recv(socket, 0 if wait else _NOBLOCK, copy)
    except zmq.Again:
        return None
    frames = [frame]
    if copy or not _FRAMES_KNOW_MORE:
        while _raw_get(socket, _RCVMORE):
            frames.append(_raw_recv(socket, 0, copy))
    else:  # the frame says whether more follow: no socket option lookup per frame
        while frame.more:  # type: ignore[union-attr]
            frame = _raw_recv(socket, 0, False)
            frames.append(frame)
    return frames


#: bytes frames shorter than this are copied into the message; larger ones are not.
COPY_THRESHOLD = 65536


def send_frames(socket: Any, frames: Sequence[Any], copy: bool | None = None) -> None:
    """Send ``frames`` as one multipart message on a socket or ZMQStream.

    On a socket, small bytes frames are copied and everything else (large bytes,
    memoryviews, arrays, zmq.Frame) is sent without copying; ``copy=True`` copies
    every frame. A ZMQStream queues the message for its loop.
    """
    if not isinstance(socket, zmq.backend.Socket):
        socket.send_multipart(frames, copy=False)
        return
    n = len(frames)
    flags = [_SNDMORE] * (n - 1) + [0]
    copies: Iterable[bool] = repeat(True, n) if copy else [
        type(frame) is bytes and len(frame) < COPY_THRESHOLD for frame in frames]
    # One C-level loop: no bytecode runs between the frames, so an interrupt raised in
    # this thread (KeyboardInterrupt) cannot leave half a message on the socket.
    _consume(map(_raw_send, repeat(socket, n), frames, flags, copies))


def _check_buffer(buf: Any) -> None:
    if isinstance(buf, (bytes, zmq.Frame)):
        return
    try:
        view = memoryview(buf)
    except TypeError:
        raise TypeError("buffer %r does not support the buffer protocol"
                        % type(buf).__name__) from None
    if not view.contiguous:
        raise ValueError("buffer is not contiguous")


__all__ = ["Session", "MessageError", "send_frames", "recv_frames", "has_message",
           "socket_events", "COPY_THRESHOLD"]
