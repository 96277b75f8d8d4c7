"""Capture files: recorded engine traffic, its replay plan, and comparison with a replay.

A capture holds one scenario recorded on an engine's sockets::

    {"scenario", "description", "set", "exec_key", "engine_ident", "engine_id",
     "legacy", "client_view", "messages": [{"t", "stream", "dir", "frames": [base64...]}]}

``stream`` is registration, shell, control or iopub and ``dir`` is in or out, both
as the engine sees them. The frames are what the engine's sockets passed: routing
prefix (iopub: topic), ``<IDS|MSG>``, signature, header, parent_header, content,
buffers.

:func:`compare` checks what an engine sent in a replay against what the recorded
engine sent. Volatile values are normalised (:func:`normalise`); every intended
difference (:data:`INTENDED`, documented in ``tests/captures/README.md``) turns the
recorded messages into the messages we intend to send before the strict comparison,
and is listed in the report. Standard library only, so scripts and tests share it.
"""
from __future__ import annotations

import ast
import base64
import copy
import difflib
import hashlib
import hmac
import io
import json
import logging
import os
import pickle
import re
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable, Sequence

log = logging.getLogger(__name__)

DELIM = b"<IDS|MSG>"
STREAMS = ("registration", "shell", "control", "iopub")
#: Streams on which every request gets exactly one reply.
REPLY_STREAMS = ("shell", "control")
DATE_FORMAT = "%Y-%m-%dT%H:%M:%S.%f"

#: Placeholders of normalised values.
MSG_ID, DATE, ENGINE, USERNAME, FILE, LINE = (
    "<msg_id>", "<date>", "<engine>", "<username>", "<file>", "<n>")

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}$")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_FRAME_LINE = re.compile(r'^(\s*File )"([^"]*)", line \d+', re.MULTILINE)
_SUGGESTION = re.compile(r"\. Did you mean: .*\?(?=\n?$)")
_STACK_FRAME = re.compile(r'^\s*File "([^"]*)", line \d+, in ')
_TB_HEADER = "Traceback (most recent call last):\n"
_SYNTAX_WHERE = re.compile(r"\(([^()]*), line \d+\)$")
_PROCESS_ID = re.compile(r"\b(pid|process) \d+\b")
_SYNTAX_ERRORS = ("SyntaxError", "IndentationError", "TabError")

#: Intended differences from the legacy engine, by id. ``tests/captures/README.md``
#: documents each one in a table; the test suite checks that both list the same ids.
INTENDED: dict[str, str] = {
    "whole-code": "execute runs the whole code, not only its first statement",
    "incomplete-code": "incomplete code fails with SyntaxError, not TypeError",
    "py2-syntax": "code that is only valid Python 2 fails with SyntaxError",
    "py2-effects": "what a Python-2-only request would have done does not happen",
    "true-division": "/ between integers is true division: 1/0 says 'division by zero'",
    "py3-values": "pyout shows Python 3 values and reprs",
    "flush-before-reply": "stdout/stderr are published before the reply, with its parent",
    "pyout-after-stream": "pyout comes after the output printed before the value",
    "abort-header-status": "replies aborted after an error carry status in the header",
    "no-abort-sleep": "no 50 ms sleep after each aborted reply",
    "no-kernel-frames": "tracebacks hold no frames of the engine's own code",
    "complete-reply": "complete_request gets a reply; legacy crashed and closed its shell",
    "control-while-running": "abort and shutdown are served while a request runs",
}

#: Our kernel serves abort and shutdown requests from its control thread once a
#: request has run this long (``streamkernel/watcher.py``); legacy served control only
#: between requests. Requests that ran less than this plus a margin are left alone.
WATCHER_DELAY = 0.05
_WATCHER_MARGIN = 0.1


class CaptureError(ValueError):
    """A capture file or message that cannot be read."""


# -- messages and captures ---------------------------------------------------------------

def _parse_date(value: Any) -> datetime | None:
    if isinstance(value, str):
        try:
            return datetime.strptime(value, DATE_FORMAT)
        except ValueError:
            return None
    return None


@dataclass
class Message:
    """One multipart message as an engine socket passed it, decoded."""

    stream: str
    dir: str
    frames: list[bytes]
    t: float = 0.0
    idents: list[bytes] = field(init=False)
    signature: bytes = field(init=False)
    header: dict[str, Any] = field(init=False)
    parent: dict[str, Any] = field(init=False)
    content: dict[str, Any] = field(init=False)
    buffers: list[bytes] = field(init=False)

    def __post_init__(self) -> None:
        self.frames = [bytes(f) for f in self.frames]
        try:
            i = self.frames.index(DELIM)
        except ValueError:
            raise CaptureError("%s/%s message without %r"
                               % (self.stream, self.dir, DELIM)) from None
        rest = self.frames[i + 1:]
        if len(rest) < 4:
            raise CaptureError("%s/%s message with %d frames after the delimiter"
                               % (self.stream, self.dir, len(rest)))
        self.idents = self.frames[:i]
        self.signature = rest[0]
        try:
            self.header, self.parent, self.content = (json.loads(f.decode("utf-8"))
                                                      for f in rest[1:4])
        except (UnicodeDecodeError, ValueError) as e:
            raise CaptureError("%s/%s message is not JSON: %s" % (self.stream, self.dir, e)) from e
        if not all(isinstance(x, dict) for x in (self.header, self.parent, self.content)):
            raise CaptureError("%s/%s message parts are not JSON objects" % (self.stream, self.dir))
        self.buffers = rest[4:]

    @property
    def msg_type(self) -> str:
        return str(self.header.get("msg_type", "?"))

    @property
    def msg_id(self) -> str:
        return str(self.header.get("msg_id", ""))

    @property
    def parent_id(self) -> str | None:
        mid = self.parent.get("msg_id")
        return str(mid) if mid is not None else None

    @property
    def date(self) -> datetime | None:
        """``header.date`` as a datetime (when the sender built the message)."""
        return _parse_date(self.header.get("date"))

    def signed_parts(self) -> list[bytes]:
        """header, parent_header and content: the frames the signature covers."""
        i = self.frames.index(DELIM)
        return self.frames[i + 2:i + 5]

    def to_json(self) -> dict[str, Any]:
        return {"t": self.t, "stream": self.stream, "dir": self.dir,
                "frames": [base64.b64encode(f).decode("ascii") for f in self.frames]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Message:
        try:
            frames = [base64.b64decode(f, validate=True) for f in data["frames"]]
            return cls(str(data["stream"]), str(data["dir"]), frames, float(data.get("t", 0.0)))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, CaptureError):
                raise
            raise CaptureError("bad capture message: %s: %s" % (type(e).__name__, e)) from e

    def describe(self) -> str:
        """A short label: ``execute_reply (to 8cd4bde8)``."""
        parent = self.parent_id
        return "%s%s" % (self.msg_type, " (to %s)" % parent[:8] if parent else "")


@dataclass
class Capture:
    """A recorded scenario; ``meta`` keeps the other top-level keys (set, legacy, ...)."""

    scenario: str
    exec_key: str
    engine_ident: str
    engine_id: int
    messages: list[Message]
    description: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    @classmethod
    def from_dict(cls, data: Any, path: str | None = None) -> Capture:
        if not isinstance(data, dict):
            raise CaptureError("a capture is a JSON object")
        missing = [k for k in ("scenario", "exec_key", "engine_ident", "messages") if k not in data]
        if missing:
            raise CaptureError("capture lacks %s" % ", ".join(missing))
        meta = {k: v for k, v in data.items() if k not in (
            "scenario", "exec_key", "engine_ident", "engine_id", "messages", "description")}
        return cls(scenario=str(data["scenario"]), exec_key=str(data["exec_key"]),
                   engine_ident=str(data["engine_ident"]),
                   engine_id=int(data.get("engine_id", 0)),
                   messages=[Message.from_json(m) for m in data["messages"]],
                   description=str(data.get("description", "")), meta=meta, path=path)

    @classmethod
    def load(cls, path: str) -> Capture:
        """Read a capture file."""
        try:
            with open(path, "rb") as f:
                data = json.loads(f.read().decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise CaptureError("cannot read %s: %s" % (path, e)) from e
        try:
            return cls.from_dict(data, path)
        except CaptureError as e:
            raise CaptureError("%s: %s" % (path, e)) from e

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"scenario": self.scenario, "description": self.description}
        out.update(self.meta)
        out.update(exec_key=self.exec_key, engine_ident=self.engine_ident,
                   engine_id=self.engine_id, messages=[m.to_json() for m in self.messages])
        return out

    def save(self, path: str) -> None:
        """Write the capture as JSON (keys sorted, like the legacy captures)."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1, sort_keys=True)
            f.write("\n")

    # -- views ------------------------------------------------------------------------

    def select(self, stream: str | None = None, direction: str | None = None) -> list[Message]:
        return [m for m in self.messages if (stream is None or m.stream == stream)
                and (direction is None or m.dir == direction)]

    def requests(self) -> list[Message]:
        """Incoming shell and control messages, in the order the engine read them."""
        return [m for m in self.messages if m.dir == "in" and m.stream in REPLY_STREAMS]

    def replies(self) -> list[Message]:
        return [m for m in self.messages if m.dir == "out" and m.stream in REPLY_STREAMS]

    def msg_types(self, direction: str = "in") -> set[str]:
        return {m.msg_type for m in self.messages if m.dir == direction}

    def peers(self) -> dict[str, bytes]:
        """Routing ids the engine saw for its hub peers: ``mux``, ``task``, ``control``."""
        peers: dict[str, bytes] = {}
        for m in self.requests():
            if not m.idents:
                continue
            first = m.idents[0]
            kind = "control" if m.stream == "control" else ("task" if first == b"task" else "mux")
            peers.setdefault(kind, first)
        return peers

    def verify(self, msg: Message) -> bool:
        """True when ``msg`` carries the right signature for this capture's key."""
        return msg.signature == sign(self.exec_key.encode(), msg.signed_parts())


def sign(key: bytes, parts: Iterable[bytes]) -> bytes:
    """The legacy signature: hex HMAC-MD5 of header, parent and content (``b''`` without key)."""
    if not key:
        return b""
    h = hmac.new(key, digestmod=hashlib.md5)
    for p in parts:
        h.update(p)
    return h.hexdigest().encode("ascii")


def capture_from_log(lines: Iterable[str], meta: dict[str, Any], scenario: str,
                     description: str = "", **extra: Any) -> Capture:
    """Build a capture from ``record_engine.py`` JSON lines and its meta file."""
    messages = [Message.from_json(json.loads(line)) for line in lines if line.strip()]
    messages.sort(key=lambda m: m.t)
    return Capture(scenario=scenario, exec_key=str(meta["exec_key"]),
                   engine_ident=str(meta["engine_ident"]), engine_id=int(meta["engine_id"]),
                   messages=messages, description=description, meta=dict(extra))


# -- replay plan ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    """One incoming message of a replay.

    ``after_replies``: send it once the engine has sent this many replies (what the
    recorded engine had sent when the client sent it). ``hold_on``: the msg_id of the
    request the recorded engine was busy with when this one was sent, so it must be
    queued while the replayed engine works on that request. ``hold``: other messages
    queue behind this one.
    """

    message: Message
    after_replies: int
    hold_on: str | None = None
    hold: bool = False


def replay_plan(capture: Capture) -> list[Step]:
    """The requests of ``capture`` in the order clients sent them, with their timing.

    Timing comes from the header dates: a request's date is when its client sent it,
    a reply's date is when the engine answered, on one host clock.
    """
    read_order = {m.msg_id: i for i, m in enumerate(capture.requests())}
    reqs = sorted(capture.requests(), key=lambda m: (m.date or datetime.min, read_order[m.msg_id]))
    answered: dict[str, datetime] = {}
    reply_dates: list[datetime] = []
    for r in capture.replies():
        d = r.date
        if d is None or r.parent_id is None:
            continue
        reply_dates.append(d)
        answered[r.parent_id] = min(d, answered.get(r.parent_id, d))
    steps: list[dict[str, Any]] = []
    for i, m in enumerate(reqs):
        sent = m.date or datetime.min
        busy = [p for p in reqs[:i] if p.msg_id in answered and answered[p.msg_id] > sent]
        hold_on = min(busy, key=lambda p: read_order[p.msg_id]).msg_id if busy else None
        steps.append({"message": m, "after_replies": sum(d <= sent for d in reply_dates),
                      "hold_on": hold_on})
    holders = {s["hold_on"] for s in steps if s["hold_on"]}
    return [Step(hold=s["message"].msg_id in holders, **s) for s in steps]


# -- normalisation -------------------------------------------------------------------------

class _Stub:
    """Stands in for any class a pickle names: nothing is imported or run."""

    _name = "?"

    def __init__(self, *args: Any) -> None:
        self.args = args
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


_STUBS: dict[tuple[str, str], type] = {}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key not in _STUBS:
            _STUBS[key] = type(name, (_Stub,), {"_name": "%s.%s" % key})
        return _STUBS[key]


def _plain(obj: Any, depth: int = 0) -> Any:
    """A JSON-able description of an unpickled object; stubs become dicts."""
    if depth > 20:
        return "..."
    if isinstance(obj, _Stub):
        return {"class": obj._name, "args": _plain(list(obj.args), depth + 1),
                "state": _plain(obj.state, depth + 1)}
    if isinstance(obj, bytes):
        return {"bytes": obj.decode("latin-1")}
    if isinstance(obj, dict):
        return {repr(k): _plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_plain(v, depth + 1) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


def _unpickle(data: bytes) -> Any:
    return _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()


def describe_pickle(data: bytes) -> Any:
    """Describe a pickle (Python 2 or 3) without importing anything it names."""
    try:
        return _plain(_unpickle(data))
    except Exception as e:
        return "<undecodable pickle of %d bytes: %s>" % (len(data), type(e).__name__)


def _data(b: bytes) -> dict[str, Any]:
    return {"data": len(b), "sha1": hashlib.sha1(b).hexdigest()[:16]}


def describe_result(buffers: Sequence[bytes]) -> Any:
    """The value a 0.11 client unserializes from apply_reply buffers, described.

    ``SerializeIt`` wrappers (alone, or in a list, tuple or dict) are unwrapped, so
    a list of wrapped items and a wrapped list describe the same value; raw data
    travels in the frames after the first.
    """
    if not buffers:
        return None
    frames = iter(buffers[1:])

    def value(obj: Any) -> Any:
        if isinstance(obj, _Stub) and obj._name.endswith(".SerializeIt"):
            state = obj.state if isinstance(obj.state, dict) else {}
            state = {k.decode() if isinstance(k, bytes) else k: v for k, v in state.items()}
            data = state.get("data")
            if data is None:
                data = next(frames, b"")
            kind = state.get("typeDescriptor")
            if kind in (b"pickle", "pickle") and isinstance(data, bytes):
                return describe_pickle(data)
            return _data(bytes(data)) if len(data) > 64 else _plain(bytes(data))
        if isinstance(obj, (list, tuple)):
            return [value(v) for v in obj]
        if isinstance(obj, dict):
            return {repr(k): value(v) for k, v in obj.items()}
        return _plain(obj)

    try:
        head = _unpickle(buffers[0])
    except Exception as e:
        return "<undecodable pickle of %d bytes: %s>" % (len(buffers[0]), type(e).__name__)
    out = value(head)
    rest = [_data(b) for b in frames]
    return {"result": out, "unused frames": rest} if rest else {"result": out}


def normalise_traceback(lines: Sequence[Any]) -> list[Any]:
    """Replace file paths and line numbers of frame lines by placeholders, and drop the
    "Did you mean" hints newer Pythons add to the last line."""
    out: list[Any] = []
    for entry in lines:
        if isinstance(entry, str):
            entry = _FRAME_LINE.sub(r'\1"%s", line %s' % (FILE, LINE), entry)
            entry = _SUGGESTION.sub("", entry)
        out.append(entry)
    return out


def _normalise_content(content: dict[str, Any], ident: str) -> dict[str, Any]:
    c = copy.deepcopy(content)
    for k, v in list(c.items()):
        if v == ident:
            c[k] = ENGINE
    info = c.get("engine_info")
    if isinstance(info, dict) and info.get("engine_uuid") == ident:
        info["engine_uuid"] = ENGINE
    if isinstance(c.get("traceback"), list):
        c["traceback"] = normalise_traceback(c["traceback"])
    if c.get("ename") in _SYNTAX_ERRORS and isinstance(c.get("evalue"), str):
        c["evalue"] = _SYNTAX_WHERE.sub("(%s, line %s)" % (FILE, LINE), c["evalue"])
    if isinstance(c.get("evalue"), str):
        c["evalue"] = _PROCESS_ID.sub(r"\1 <pid>", c["evalue"])
    return c


def _normalise_header(header: dict[str, Any], ident: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in header.items():
        if k == "msg_id" and isinstance(v, str) and _UUID.match(v):
            v = MSG_ID
        elif k in ("date", "started") and isinstance(v, str) and _DATE.match(v):
            v = DATE
        elif k in ("session", "engine") and v == ident:
            v = ENGINE
        elif k == "username" and isinstance(v, str):
            v = USERNAME
        out[k] = v
    return out


def _normalise_buffers(msg: Message) -> Any:
    if msg.msg_type == "apply_reply" and msg.buffers:
        return describe_result(msg.buffers)
    return [_data(b) for b in msg.buffers]


@dataclass
class Norm:
    """A normalised message: ``fields`` are compared, the rest locates and explains it."""

    stream: str
    msg_type: str
    parent_id: str | None
    fields: dict[str, Any]
    date: datetime | None = None
    raw: Message | None = None
    fixed: bool = False

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.msg_type, self.parent_id, self.fields["content"].get("status"))

    def label(self) -> str:
        return "%s%s" % (self.msg_type, " (to %s)" % self.parent_id[:8] if self.parent_id else "")


def normalise(msg: Message, ident: str, key: bytes | None = None) -> Norm:
    """Normalise the volatile values of an outgoing message sent by engine ``ident``.

    msg_id, date, started, username, the engine's session/uuid, file paths and line
    numbers in tracebacks, process ids become placeholders. A signature is replaced
    by ``valid``/``invalid`` when ``key`` is given.
    """
    if key is None:
        signature: Any = None
    else:
        signature = "valid" if msg.signature == sign(key, msg.signed_parts()) else "invalid"
    fields = {
        "prefix": [f.decode("latin-1") for f in msg.idents],
        "signature": signature,
        "header": _normalise_header(msg.header, ident),
        "parent": msg.parent,
        "content": _normalise_content(msg.content, ident),
        "buffers": _normalise_buffers(msg),
    }
    return Norm(msg.stream, msg.msg_type, msg.parent_id, fields, msg.date, msg)


# -- the messages we intend to send ---------------------------------------------------------

@dataclass
class Applied:
    """An intended difference that changed the expectation (or was checked) somewhere."""

    rule: str
    where: str
    note: str = ""

    def __str__(self) -> str:
        return "[%s] %s%s" % (self.rule, self.where, ": " + self.note if self.note else "")


@dataclass
class Override:
    """What our engine sends for one request where intended differences make it
    impossible to derive from the recorded messages (``tests/captures/intended/``)."""

    msg_id: str
    rules: list[str]
    reply: dict[str, Any]
    iopub: list[Any]
    note: str = ""
    code: str | None = None


def load_overrides(path: str) -> list[Override]:
    """Read ``intended/<scenario>.json``: ``{"scenario", "requests": [...]}``."""
    with open(path) as f:
        data = json.load(f)
    out = []
    for r in data.get("requests", []):
        rules = r.get("difference")
        rules = [rules] if isinstance(rules, str) else list(rules or [])
        unknown = [x for x in rules if x not in INTENDED]
        if not rules or unknown:
            raise CaptureError("%s: request %s: unknown or missing difference %r"
                               % (path, r.get("msg_id"), unknown or rules))
        out.append(Override(msg_id=r["msg_id"], rules=rules, reply=r.get("reply", {}),
                            iopub=r.get("iopub", []), note=r.get("note", ""),
                            code=r.get("code")))
    return out


def overrides_for(capture: Capture, directory: str | None = None) -> list[Override]:
    """The overrides of ``capture`` from ``directory`` (default: ``intended/`` beside it)."""
    if directory is None:
        if capture.path is None:
            return []
        directory = os.path.join(os.path.dirname(capture.path), "intended")
    path = os.path.join(directory, capture.scenario + ".json")
    return load_overrides(path) if os.path.exists(path) else []


class _Expect:
    """Builds the expectation for one capture: the recorded messages, then the rules."""

    def __init__(self, capture: Capture) -> None:
        self.capture = capture
        self.ident = capture.engine_ident
        self.requests = {m.msg_id: m for m in capture.requests()}
        self.plan = replay_plan(capture)
        self.sent_order = {s.message.msg_id: i for i, s in enumerate(self.plan)}
        self.streams: dict[str, list[Norm]] = {s: [] for s in STREAMS}
        for m in capture.messages:
            if m.dir == "out":
                n = normalise(m, self.ident)
                n.fields["signature"] = "valid"  # ours must be valid; the recorded ones are
                self.streams[m.stream].append(n)
        self.applied: list[Applied] = []

    def note(self, rule: str, where: str, note: str = "") -> None:
        self.applied.append(Applied(rule, where, note))

    # -- building messages --------------------------------------------------------------

    def message(self, stream: str, msg_type: str, request: Message, content: dict[str, Any],
                subheader: dict[str, Any] | None = None) -> Norm:
        header = {"msg_id": MSG_ID, "msg_type": msg_type, "username": USERNAME,
                  "session": ENGINE, "date": DATE}
        header.update(subheader or {})
        if stream == "iopub":
            kind = content.get("name", "?") if msg_type == "stream" else msg_type
            prefix = ["engine.%d.%s" % (self.capture.engine_id, kind)]
        else:
            prefix = [f.decode("latin-1") for f in request.idents]
        fields = {"prefix": prefix, "signature": "valid", "header": header,
                  "parent": request.header, "content": content, "buffers": []}
        return Norm(stream, msg_type, request.msg_id, fields, fixed=True)

    def error_content(self, method: str, ename: str, evalue: str,
                      tb: list[str] | None = None) -> dict[str, Any]:
        if tb is None:
            tb = ["Traceback (most recent call last):\n",
                  '  File "%s", line %s, in <module>\n' % (FILE, LINE),
                  "%s: %s\n" % (ename, evalue)]
        return {"status": "error", "ename": ename, "evalue": evalue,
                "traceback": normalise_traceback(tb),
                "engine_info": {"engine_uuid": ENGINE, "engine_id": self.capture.engine_id,
                                "method": method}}

    def outcome(self, request: Message, reply: dict[str, Any], iopub: list[Any]
                ) -> dict[str, list[Norm]]:
        """Messages for ``request``: iopub items are ``"pyin"``, ``"pyerr"`` or
        ``[msg_type, content]``; an error ``reply`` gets engine_info and a traceback."""
        method = request.msg_type.partition("_")[0]
        content = dict(reply)
        if content.get("status") == "error":
            content = self.error_content(method, content["ename"], content["evalue"],
                                         content.get("traceback"))
        out: dict[str, list[Norm]] = {"iopub": []}
        for item in iopub:
            if item == "pyin":
                out["iopub"].append(self.message("iopub", "pyin", request,
                                                 {"code": request.content.get("code")}))
            elif item == "pyerr":
                out["iopub"].append(self.message("iopub", "pyerr", request, content))
            else:
                out["iopub"].append(self.message("iopub", item[0], request, dict(item[1])))
        sub: dict[str, Any] = {}
        if request.msg_type == "execute_request":
            sub["started"] = DATE
        elif request.msg_type == "apply_request":
            sub.update(started=DATE, engine=ENGINE, status=content.get("status"),
                       dependencies_met=True)
        reply_type = request.msg_type.rpartition("_")[0] + "_reply"
        out[request.stream] = [self.message(request.stream, reply_type, request, content, sub)]
        return out

    def replace(self, request: Message, new: dict[str, list[Norm]]) -> None:
        """Put ``new`` where the recorded messages of ``request`` were."""
        order = self.sent_order
        for stream, msgs in self.streams.items():
            if stream not in new and stream not in ("iopub",) + REPLY_STREAMS:
                continue
            idx = [i for i, n in enumerate(msgs) if n.parent_id == request.msg_id]
            if not idx and not new.get(stream):
                continue
            if idx:
                at = idx[0]
            else:
                mine = order.get(request.msg_id, len(order))
                later = [i for i, n in enumerate(msgs)
                         if order.get(n.parent_id or "", -1) > mine]
                at = later[0] if later else len(msgs)
            kept = [n for n in msgs if n.parent_id != request.msg_id]
            at -= sum(1 for i in idx if i < at)
            self.streams[stream] = kept[:at] + new.get(stream, []) + kept[at:]

    def recorded(self, request: Message, stream: str) -> list[Norm]:
        return [n for n in self.streams[stream] if n.parent_id == request.msg_id]


def _py3_syntax_error(code: str) -> SyntaxError | None:
    try:
        ast.parse(code, "<code>", "exec")
    except SyntaxError as e:
        return e
    except (ValueError, TypeError):
        return None
    return None


def _syntax_content(e: SyntaxError) -> dict[str, Any]:
    """The error of code Python 3 cannot compile: no frames, as Python shows it."""
    evalue = _SYNTAX_WHERE.sub("(%s, line %s)" % (FILE, LINE), str(e))
    tb = traceback.format_exception_only(type(e), e)
    return {"status": "error", "ename": type(e).__name__, "evalue": evalue, "traceback": tb}


_LEGACY_NONE_CODE = "exec: arg 1 must be a string, file, or code object"


def _rule_overrides(x: _Expect, overrides: Sequence[Override]) -> None:
    for o in overrides:
        req = x.requests.get(o.msg_id)
        if req is None:
            raise CaptureError("override for unknown request %s" % o.msg_id)
        if o.code is not None and req.content.get("code") != o.code:
            raise CaptureError("override for %s names code %r, the request has %r"
                               % (o.msg_id, o.code, req.content.get("code")))
        x.replace(req, x.outcome(req, o.reply, o.iopub))
        for rule in o.rules:
            x.note(rule, "%s %s" % (req.msg_type, o.msg_id[:8]), o.note)


def _rule_syntax(x: _Expect, overridden: set[str]) -> None:
    """py2-syntax / incomplete-code: code Python 3 cannot compile is a SyntaxError."""
    for req in x.requests.values():
        code = req.content.get("code")
        if (req.msg_type != "execute_request" or not isinstance(code, str)
                or req.msg_id in overridden):
            continue
        e = _py3_syntax_error(code)
        replies = x.recorded(req, req.stream)
        if e is None or not replies:
            continue
        legacy = replies[0].fields["content"]
        if legacy.get("status") == "aborted" or legacy.get("ename") == "SyntaxError":
            continue
        rule = ("incomplete-code" if legacy.get("ename") == "TypeError"
                and legacy.get("evalue") == _LEGACY_NONE_CODE else "py2-syntax")
        x.replace(req, x.outcome(req, _syntax_content(e), ["pyin", "pyerr"]))
        x.note(rule, "execute_request %s" % req.msg_id[:8],
               "%r: %s: %s" % (code, type(e).__name__, e.msg))


def _legacy_kernel_frame(entry: Any, method: str | None) -> bool:
    m = _STACK_FRAME.match(entry) if isinstance(entry, str) else None
    if m is None:
        return False
    return "/IPython/" in m.group(1) or (method == "apply" and m.group(1) == "<string>")


def _true_division(code: Any) -> bool:
    """True when ``code`` divides with ``/`` and has no ``//`` or ``%``."""
    try:
        ops = {type(n.op) for n in ast.walk(ast.parse(code))
               if isinstance(n, (ast.BinOp, ast.AugAssign))}
    except (SyntaxError, ValueError, TypeError):
        return False
    return ast.Div in ops and not ops & {ast.FloorDiv, ast.Mod}


def _rule_messages(x: _Expect) -> None:
    """Rules about single recorded messages (skipping those the rules above built)."""
    for stream, msgs in x.streams.items():
        for n in msgs:
            if n.fixed or n.raw is None:
                continue
            c = n.fields["content"]
            raw = n.raw.content
            where = "%s %s" % (stream, n.label())
            if c.get("status") == "aborted" and "status" not in n.fields["header"]:
                n.fields["header"]["status"] = "aborted"
                x.note("abort-header-status", where)
            if isinstance(raw.get("traceback"), list):
                method = (raw.get("engine_info") or {}).get("method")
                keep = [not _legacy_kernel_frame(e, method) for e in raw["traceback"]]
                if not all(keep):
                    tb = [e for e, k in zip(c["traceback"], keep) if k]
                    left = [e for e, k in zip(raw["traceback"], keep)
                            if k and isinstance(e, str) and _STACK_FRAME.match(e)]
                    if tb[:1] == [_TB_HEADER] and not left:
                        tb = tb[1:]  # no frames left: Python prints no header either
                    c["traceback"] = tb
                    x.note("no-kernel-frames", where, "%d frame(s)" % keep.count(False))
            request = x.requests.get(n.parent_id or "")
            if (c.get("ename") == "ZeroDivisionError" and request is not None
                    and c.get("evalue") == "integer division or modulo by zero"
                    and _true_division(request.content.get("code"))):
                c["evalue"] = "division by zero"
                tb = c.get("traceback")
                if isinstance(tb, list) and tb:
                    tb[-1] = "ZeroDivisionError: division by zero\n"
                x.note("true-division", where, repr(request.content.get("code")))
            if n.msg_type == "pyout" and isinstance(c.get("data"), str):
                new = _py3_repr(c["data"])
                if new is not None and new != c["data"]:
                    x.note("py3-values", where, "%s -> %s" % (c["data"], new))
                    c["data"] = new


def _rule_pyout_order(x: _Expect) -> None:
    """pyout-after-stream: output a request printed goes before its pyout."""
    msgs = x.streams["iopub"]
    i = 0
    while i < len(msgs):
        n = msgs[i]
        j = i + 1
        if n.msg_type == "pyout" and not n.fixed:
            while (j < len(msgs) and msgs[j].msg_type == "stream"
                   and msgs[j].parent_id == n.parent_id):
                j += 1
            if j > i + 1:
                msgs[i:j] = msgs[i + 1:j] + [n]
                x.note("pyout-after-stream", "iopub " + n.label())
        i = j


def _rule_control_while_running(x: _Expect) -> None:
    """control-while-running: an abort of all (or a shutdown) that arrived while a
    long request ran is served at once, so what it aborts is answered before it."""
    for step in x.plan:
        m = step.message
        if (m.msg_type not in ("abort_request", "shutdown_request") or step.hold_on is None
                or (m.msg_type == "abort_request" and m.content.get("msg_ids"))):
            continue
        running = x.requests[step.hold_on]
        msgs = x.streams[running.stream]
        reply = next((n for n in msgs if n.parent_id == running.msg_id), None)
        if reply is None or reply.fixed or reply.raw is None or reply.date is None:
            continue
        started = _parse_date(reply.raw.header.get("started"))
        if started is None or (reply.date - started).total_seconds() < (
                WATCHER_DELAY + _WATCHER_MARGIN):
            continue
        order = x.sent_order
        queued = {s.message.msg_id for s in x.plan if s.hold_on == running.msg_id
                  and order[s.message.msg_id] < order[m.msg_id]}
        at = msgs.index(reply)
        moved = [n for n in msgs[at + 1:] if n.parent_id in queued
                 and n.fields["content"].get("status") == "aborted"]
        if not moved:
            continue
        rest = [n for n in msgs if all(n is not k for k in moved)]
        at = rest.index(reply)
        x.streams[running.stream] = rest[:at] + moved + rest[at:]
        x.note("control-while-running", "%s %s" % (m.msg_type, m.msg_id[:8]),
               "%d aborted before %s" % (len(moved), reply.label()))


def _py3_repr(data: str) -> str | None:
    """The Python 3 repr of a Python 2 unicode (``u'...'``) or long (``12L``) repr."""
    if re.match(r"^u(['\"]).*\1$", data, re.DOTALL):
        try:
            return repr(ast.literal_eval(data[1:]))
        except (ValueError, SyntaxError):
            return None
    if re.match(r"^-?\d+L$", data):
        return data[:-1]
    return None


def expected(capture: Capture, overrides: Sequence[Override] = ()
             ) -> tuple[dict[str, list[Norm]], list[Applied]]:
    """The messages our engine is meant to send for ``capture``, per stream, and the
    intended differences that made them differ from the recorded ones."""
    x = _Expect(capture)
    _rule_overrides(x, overrides)
    _rule_syntax(x, {o.msg_id for o in overrides})
    _rule_messages(x)
    _rule_pyout_order(x)
    _rule_control_while_running(x)
    return x.streams, x.applied


# -- comparison -----------------------------------------------------------------------------

@dataclass
class Difference:
    """One way our messages differ from the expected ones."""

    stream: str
    where: str
    field: str
    expected: Any
    ours: Any

    def __str__(self) -> str:
        head = "%s %s: %s" % (self.stream, self.where, self.field)
        if isinstance(self.expected, list) and isinstance(self.ours, list):
            lines = difflib.unified_diff([repr(x) for x in self.expected],
                                         [repr(x) for x in self.ours], lineterm="", n=0)
            body = [line for line in lines if line[:1] in "-+" and line[:3] not in ("---", "+++")]
            return head + " (- expected, + ours):\n" + "\n".join(
                "      " + (line if len(line) <= 240 else line[:237] + "...") for line in body)
        return "%s: expected %s, ours %s" % (head, _short(self.expected), _short(self.ours))


def _short(v: Any, limit: int = 160) -> str:
    s = v if isinstance(v, str) and v.startswith("<") and v.endswith(">") else repr(v)
    return s if len(s) <= limit else s[:limit - 3] + "..."


_MISSING = "<missing>"


def _diff(a: Any, b: Any, path: str, out: list[tuple[str, Any, Any]]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            _diff(a.get(k, _MISSING), b.get(k, _MISSING), "%s.%s" % (path, k), out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, "%s[%d]" % (path, i), out)
    elif a != b or type(a) is not type(b):
        out.append((path.lstrip("."), a, b))


@dataclass
class Report:
    """Result of comparing one replay with its capture."""

    scenario: str
    compared: int = 0
    differences: list[Difference] = field(default_factory=list)
    applied: list[Applied] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.differences

    def rules(self) -> set[str]:
        """Ids of the intended differences that showed up."""
        return {a.rule for a in self.applied}

    def format(self, verbose: bool = False) -> str:
        lines = ["%s: %d messages compared, %d difference(s), intended differences: %s" % (
            self.scenario, self.compared, len(self.differences),
            ", ".join(sorted(self.rules())) or "none")]
        if verbose:
            lines += ["  intended " + str(a) for a in self.applied]
        lines += ["  DIFF " + str(d) for d in self.differences]
        return "\n".join(lines)


def compare(capture: Capture, ours: Sequence[Message], *, our_ident: str | None = None,
            overrides: Sequence[Override] = (), problems: Sequence[str] = (),
            streams: Sequence[str] = ("shell", "control", "iopub")) -> Report:
    """Compare the messages an engine sent in a replay (``ours``, as the engine sent
    them) with the recorded ones, after the intended differences."""
    ident = our_ident or capture.engine_ident
    key = capture.exec_key.encode()
    want, applied = expected(capture, overrides)
    report = Report(capture.scenario, applied=applied)
    report.differences += [Difference("replay", "-", "problem", None, p) for p in problems]
    got = {s: [normalise(m, ident, key) for m in ours if m.stream == s and m.dir == "out"]
           for s in STREAMS}
    _unflushed_output(want, got, report)
    for stream in streams:
        _compare_stream(stream, want[stream], got[stream], report)
    _check_timing(want, got, report)
    return report


def _unflushed_output(want: dict[str, list[Norm]], got: dict[str, list[Norm]],
                      report: Report) -> None:
    """flush-before-reply: output of a request the recorded engine never published
    (it held output until a later flush) is expected from ours, before the reply."""
    published = {n.parent_id for n in want["iopub"] if n.msg_type == "stream"}
    keep = []
    for n in got["iopub"]:
        if n.msg_type == "stream" and n.parent_id not in published:
            report.applied.append(Applied("flush-before-reply", "iopub " + n.label(),
                                          "not published by the recorded engine"))
        else:
            keep.append(n)
    got["iopub"] = keep


def _compare_stream(stream: str, want: list[Norm], got: list[Norm], report: Report) -> None:
    sm = difflib.SequenceMatcher(None, [n.key for n in want], [n.key for n in got],
                                 autojunk=False)
    mismatched = False
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        if op == "equal" or (op == "replace" and i2 - i1 == j2 - j1):
            for w, g, pos in zip(want[i1:i2], got[j1:j2], range(j1, j2)):
                report.compared += 1
                found: list[tuple[str, Any, Any]] = []
                _diff(w.fields, g.fields, "", found)
                where = "[%d] %s" % (pos, g.label())
                for path, a, b in found[:12]:
                    report.differences.append(Difference(stream, where, path, a, b))
            continue
        mismatched = True
    if mismatched:
        report.differences.append(Difference(stream, "messages", "sequence",
                                             [_seq_label(n) for n in want],
                                             [_seq_label(n) for n in got]))


def _seq_label(n: Norm) -> str:
    status = n.fields["content"].get("status")
    return "%s%s" % (n.label(), " " + status if status else "")


#: Gap between two aborted replies above which we would be sleeping like legacy did.
ABORT_GAP = 0.045


def _check_timing(want: dict[str, list[Norm]], got: dict[str, list[Norm]],
                  report: Report) -> None:
    """no-abort-sleep and flush-before-reply, checked on our header dates."""
    for stream in REPLY_STREAMS:
        legacy = [n for n in want[stream] if n.raw is not None]
        slept = any(a.fields["content"].get("status") == b.fields["content"].get("status")
                    == "aborted" and a.date and b.date
                    and (b.date - a.date).total_seconds() >= ABORT_GAP
                    for a, b in zip(legacy, legacy[1:]))
        ours = got[stream]
        for a, b in zip(ours, ours[1:]):
            if (a.fields["content"].get("status") == b.fields["content"].get("status") == "aborted"
                    and a.date and b.date):
                gap = (b.date - a.date).total_seconds()
                if gap >= ABORT_GAP:
                    report.differences.append(Difference(
                        stream, b.label(), "gap after the previous aborted reply",
                        "< %.3f s" % ABORT_GAP, "%.3f s" % gap))
        if slept:
            report.applied.append(Applied("no-abort-sleep", stream,
                                          "legacy slept 50 ms after each aborted reply"))
    replies = {n.parent_id: n for s in REPLY_STREAMS for n in got[s]}
    for n in got["iopub"]:
        reply = replies.get(n.parent_id)
        if n.msg_type != "stream" or reply is None or not (n.date and reply.date):
            continue
        if n.date > reply.date:
            report.differences.append(Difference(
                "iopub", n.label(), "published after the reply", "before", "after"))


__all__ = [
    "DELIM", "STREAMS", "REPLY_STREAMS", "INTENDED", "CaptureError", "Message", "Capture",
    "sign", "capture_from_log", "Step", "replay_plan", "describe_pickle", "describe_result",
    "normalise_traceback", "Norm", "normalise", "Applied", "Override", "load_overrides",
    "overrides_for", "expected", "Difference", "Report", "compare", "ABORT_GAP",
    "WATCHER_DELAY",
]
