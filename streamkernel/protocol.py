"""Message-type names, wire constants and message shapes of the engine protocol.

Everything the wire defines lives here: the delimiter, the message types and
their reply types, the header fields, the date format and the iopub topics.
"""
from __future__ import annotations

import json
import json.encoder as _json_encoder
import os
import random
import re
import time
from datetime import datetime
from typing import Any

#: Frame that separates the routing prefix from the message proper.
DELIM = b"<IDS|MSG>"

#: Frames after the delimiter: signature, header, parent_header, content.
SIGNATURE, HEADER, PARENT, CONTENT = range(4)
MIN_FRAMES = 4

EXECUTE_REQUEST = "execute_request"
APPLY_REQUEST = "apply_request"
COMPLETE_REQUEST = "complete_request"
CLEAR_REQUEST = "clear_request"
ABORT_REQUEST = "abort_request"
SHUTDOWN_REQUEST = "shutdown_request"

#: Requests served on the shell (MUX and task) socket.
SHELL_REQUESTS = (EXECUTE_REQUEST, COMPLETE_REQUEST, APPLY_REQUEST, CLEAR_REQUEST)
#: Requests served on the control socket: the shell ones plus abort and shutdown.
CONTROL_REQUESTS = (SHUTDOWN_REQUEST, ABORT_REQUEST) + SHELL_REQUESTS

REGISTRATION_REQUEST = "registration_request"
REGISTRATION_REPLY = "registration_reply"
UNREGISTRATION_REQUEST = "unregistration_request"

#: iopub message types
PYIN, PYOUT, PYERR, STREAM = "pyin", "pyout", "pyerr", "stream"

#: Header keys that replies merge in (the legacy "subheader").
STARTED, ENGINE, STATUS, DEPENDENCIES_MET = "started", "engine", "status", "dependencies_met"

OK, ERROR, ABORTED = "ok", "error", "aborted"

#: Legacy date format: local time, no zone, always six digits of microseconds.
DATE_FORMAT = "%Y-%m-%dT%H:%M:%S.%f"
DATE_PATTERN = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d+$")

USERNAME = os.environ.get("USER", "username")


def reply_type(msg_type: str) -> str:
    """Return the reply type for a request type: ``execute_request`` -> ``execute_reply``."""
    return msg_type.rpartition("_")[0] + "_reply" if "_" in msg_type else msg_type + "_reply"


def topic(int_id: int, kind: str) -> bytes:
    """Return the iopub topic frame ``engine.<id>.<kind>``."""
    return b"engine.%d.%s" % (int_id, kind.encode("ascii"))


#: Source of message ids: seeded from os.urandom, reseeded in forked children, and
#: private, so user code seeding the random module cannot make ids repeat.
_ids = random.Random()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_ids.seed)
_UUID4_CLEAR = ~((0xC000 << 48) | (0xF000 << 64))
_UUID4_SET = (0x8000 << 48) | (4 << 76)


def new_id() -> str:
    """Return a fresh message id (a random uuid4 string), without a system call."""
    h = (_ids.getrandbits(128) & _UUID4_CLEAR | _UUID4_SET).to_bytes(16, "big").hex()
    return "%s-%s-%s-%s-%s" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:])


_second: tuple[int, str] = (-1, "")  # the last second formatted, as (seconds, text)


def now() -> str:
    """The current local time in :data:`DATE_FORMAT` (formatted once per second)."""
    global _second
    ns = time.time_ns()
    seconds = ns // 1_000_000_000
    second = _second
    if second[0] != seconds:
        second = _second = (seconds, time.strftime("%Y-%m-%dT%H:%M:%S.", time.localtime(seconds)))
    return "%s%06d" % (second[1], ns // 1000 % 1_000_000)


def msg_header(msg_id: str, msg_type: str, username: str, session: str) -> dict[str, Any]:
    """Return a message header with the current local time as ``date``."""
    return {
        "msg_id": msg_id,
        "msg_type": msg_type,
        "username": username,
        "session": session,
        "date": now(),
    }


def extract_header(msg_or_header: dict[str, Any] | None) -> dict[str, Any]:
    """Return the header of a message dict, or the dict itself when it is a header."""
    if not msg_or_header:
        return {}
    header = msg_or_header.get("header", msg_or_header)
    return dict(header)


def _date_default(obj: Any) -> str:
    if isinstance(obj, datetime):
        return obj.strftime(DATE_FORMAT)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)  # type: ignore[return-value]
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    raise TypeError("%r is not JSON serializable" % type(obj).__name__)


_c_make_encoder = getattr(_json_encoder, "c_make_encoder", None)
if _c_make_encoder is not None:  # one C encoder, made once
    _encode = _c_make_encoder(
        None, _date_default, _json_encoder.encode_basestring_ascii, None, ":", ",",
        False, False, True)

    def pack(obj: Any) -> bytes:
        """Pack a JSON-able object as compact ASCII JSON; datetimes use :data:`DATE_FORMAT`."""
        return "".join(_encode(obj, 0)).encode("ascii")
else:  # pragma: no cover - Pythons without the C accelerator
    _encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, default=_date_default)

    def pack(obj: Any) -> bytes:
        """Pack a JSON-able object as compact ASCII JSON; datetimes use :data:`DATE_FORMAT`."""
        return _encoder.encode(obj).encode("ascii")


def _parse_date(value: str) -> Any:
    if DATE_PATTERN.match(value):
        try:
            return datetime.strptime(value, DATE_FORMAT)
        except ValueError:
            pass
    return value


def extract_dates(obj: Any) -> Any:
    """Turn every string matching :data:`DATE_PATTERN` into a datetime, at any depth.

    Containers are copied, never changed in place.
    """
    if isinstance(obj, str):
        return _parse_date(obj)
    if not isinstance(obj, (dict, list)):
        return obj
    root = dict(obj) if isinstance(obj, dict) else list(obj)
    stack = [root]
    while stack:
        node = stack.pop()
        keys = node.keys() if isinstance(node, dict) else range(len(node))
        for k in keys:
            v = node[k]
            if isinstance(v, str):
                node[k] = _parse_date(v)
            elif isinstance(v, dict):
                node[k] = dict(v)
                stack.append(node[k])
            elif isinstance(v, list):
                node[k] = list(v)
                stack.append(node[k])
    return root


_decoder = json.JSONDecoder()
_decode, _scan = _decoder.decode, _decoder.scan_once  # type: ignore[attr-defined]


def unpack(data: bytes | memoryview | str) -> Any:
    """Unpack JSON bytes; date strings stay strings (see :func:`extract_dates`)."""
    text = data if isinstance(data, str) else bytes(data).decode("utf-8")
    try:  # compact JSON, as peers send it: one scan
        obj, end = _scan(text, 0)
        if end == len(text):
            return obj
    except StopIteration:
        pass
    return _decode(text)  # whitespace around the value, or an error to raise


__all__ = [
    "DELIM", "MIN_FRAMES", "SIGNATURE", "HEADER", "PARENT", "CONTENT",
    "EXECUTE_REQUEST", "APPLY_REQUEST", "COMPLETE_REQUEST", "CLEAR_REQUEST",
    "ABORT_REQUEST", "SHUTDOWN_REQUEST", "SHELL_REQUESTS", "CONTROL_REQUESTS",
    "REGISTRATION_REQUEST", "REGISTRATION_REPLY", "UNREGISTRATION_REQUEST",
    "PYIN", "PYOUT", "PYERR", "STREAM",
    "STARTED", "ENGINE", "STATUS", "DEPENDENCIES_MET", "OK", "ERROR", "ABORTED",
    "DATE_FORMAT", "DATE_PATTERN", "USERNAME",
    "reply_type", "topic", "new_id", "now", "msg_header", "extract_header",
    "pack", "unpack", "extract_dates",
]
