"""Hostile input: malformed, forged and replayed frames, and user code that fights the engine.

Every bad message is dropped with one log line that holds no key material, and
every request that passes the session's checks gets exactly one well-formed reply;
either way the engine keeps serving.
"""
from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Any, Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamkernel import outstream, protocol
from streamkernel.protocol import DELIM
from streamkernel.serialize import deserialize_object, interactive, pack_apply_message
from streamkernel.session import Session

from .harness import CLIENT_ID, ENGINE_ID, KEY, TIMEOUT, KernelHarness

try:
    import numpy
except ImportError:  # pragma: no cover
    numpy = None  # type: ignore[assignment]

needs_numpy = pytest.mark.skipif(numpy is None, reason="numpy is not installed")

HUGE = 20 * 1024 * 1024


# -- helpers ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared() -> Iterator[KernelHarness]:
    """One kernel for the frame tests: junk frames leave no state behind."""
    h = KernelHarness()
    yield h
    h.close()


def check_reply(reply: dict, request: dict, statuses: tuple[str, ...] = ("ok", "error")) -> None:
    """Assert ``reply`` is a well-formed reply to ``request``."""
    assert reply["msg_type"] == protocol.reply_type(request["msg_type"])
    assert reply["parent_header"]["msg_id"] == request["msg_id"]
    header = reply["header"]
    assert header["session"] == ENGINE_ID
    assert isinstance(header["msg_id"], str) and isinstance(header["date"], datetime)
    content = reply["content"]
    assert content["status"] in statuses, content
    if content["status"] == "error":
        assert isinstance(content["ename"], str) and content["ename"]
        assert isinstance(content["evalue"], str)
        assert isinstance(content["traceback"], list)
        assert all(isinstance(line, str) for line in content["traceback"])
        assert content["engine_info"]["engine_uuid"] == ENGINE_ID
    if request["msg_type"] == "apply_request":
        assert header["status"] == content["status"]
        assert header["engine"] == ENGINE_ID


def roundtrip(h: KernelHarness, msg_type: str, content: dict | None = None, *,
              kind: str = "mux", buffers: Any = ()) -> dict:
    """Send one request; return its reply, which must be the next message on ``kind``."""
    request = h.request(msg_type, content or {}, kind=kind, buffers=buffers)
    _, reply = h.recv(kind)
    check_reply(reply, request)
    return reply


def execute(h: KernelHarness, code: str, kind: str = "mux") -> dict:
    return roundtrip(h, "execute_request", {"code": code, "silent": False}, kind=kind)


def apply(h: KernelHarness, f: Any, *args: Any, kind: str = "mux", **kwargs: Any) -> dict:
    return roundtrip(h, "apply_request", kind=kind, buffers=pack_apply_message(f, args, kwargs))


def result(reply: dict) -> Any:
    assert reply["content"]["status"] == "ok", reply["content"]
    return deserialize_object(reply["buffers"])[0]


def assert_serving(h: KernelHarness, kind: str = "mux") -> None:
    """The engine answers a valid request on ``kind`` (and nothing came before the answer)."""
    reply = execute(h, "serving = 1", kind=kind)
    assert reply["content"]["status"] == "ok", reply["content"]


def assert_fully_working(h: KernelHarness) -> None:
    for kind in ("mux", "task", "control"):
        assert_serving(h, kind)
    assert result(apply(h, pow, 2, 10)) == 1024
    get_serving = interactive(lambda: serving)  # type: ignore[name-defined] # noqa: F821
    assert result(apply(h, get_serving)) == 1


def assert_error(reply: dict, ename: str) -> None:
    content = reply["content"]
    assert content["status"] == "error", content
    assert content["ename"] == ename, content


def streams(h: KernelHarness, settle: float = 0.2) -> str:
    return "".join(m["content"]["data"] for _, m in h.iopub(settle) if m["msg_type"] == "stream")


def signed(h: KernelHarness, header: Any, parent: Any = b"{}", content: Any = b"{}",
           prefix: tuple[bytes, ...] = (CLIENT_ID,)) -> list[bytes]:
    """Correctly signed frames for arbitrary header, parent and content (bytes or JSON-able)."""
    parts = [p if isinstance(p, bytes) else protocol.pack(p) for p in (header, parent, content)]
    return list(prefix) + [DELIM, h.client.sign(parts)] + parts


def valid(h: KernelHarness, msg_type: str = "execute_request", content: Any = None,
          prefix: Any = (CLIENT_ID,), session: Session | None = None) -> list[bytes]:
    session = session or h.client
    msg = session.msg(msg_type, {"code": "never_run = 1"} if content is None else content)
    return session.serialize(msg, list(prefix))


def with_signature(frames: list[bytes], sig: bytes) -> list[bytes]:
    frames = list(frames)
    frames[frames.index(DELIM) + 1] = sig
    return frames


def signature_of(frames: list[bytes]) -> bytes:
    return frames[frames.index(DELIM) + 1]


_huge: list[bytes] = []


def huge() -> bytes:
    if not _huge:
        _huge.append(bytes(range(256)) * (HUGE // 256))
    return _huge[0]


def new_header(msg_type: Any = "execute_request", **extra: Any) -> dict:
    return dict({"msg_id": protocol.new_id(), "msg_type": msg_type}, **extra)


JUNK: dict[str, Callable[[KernelHarness], list[bytes]]] = {
    "no-delimiter": lambda h: [CLIENT_ID, b"exec_key=" + KEY],
    "prefix-only": lambda h: [CLIENT_ID],
    "delimiter-only": lambda h: [CLIENT_ID, DELIM],
    "too-few-frames": lambda h: valid(h)[:-1],
    "signature-only": lambda h: valid(h)[:3],
    "empty-frames": lambda h: [CLIENT_ID, DELIM, b"", b"", b"", b""],
    "all-empty": lambda h: [b"", b"", b""],
    "many-frames": lambda h: [CLIENT_ID] + [b"f"] * 10_000,
    "not-json-header": lambda h: signed(h, b"not json " + KEY),
    "not-utf8-header": lambda h: signed(h, b'{"a":"\xff\xfe"}'),
    "list-header": lambda h: signed(h, b"[]"),
    "null-header": lambda h: signed(h, b"null"),
    "string-header": lambda h: signed(h, b'"execute_request"'),
    "not-json-parent": lambda h: signed(h, new_header(), parent=b"{parent"),
    "list-parent": lambda h: signed(h, new_header(), parent=b"[{}]"),
    "not-json-content": lambda h: signed(h, new_header(), content=b"{code: 1}"),
    "string-content": lambda h: signed(h, new_header(), content=b'"never_run = 1"'),
    "list-content": lambda h: signed(h, new_header(), content=b'["never_run = 1"]'),
    "no-msg-type": lambda h: signed(h, {"msg_id": protocol.new_id()}, content={"code": "1"}),
    "no-msg-id": lambda h: signed(h, {"msg_type": "execute_request"}, content={"code": "1"}),
    "int-msg-id": lambda h: signed(h, new_header(msg_id=5), content={"code": "1"}),
    "null-msg-type": lambda h: signed(h, new_header(None), content={"code": "1"}),
    "list-msg-type": lambda h: signed(h, new_header(["execute_request"])),
    "reply-type": lambda h: signed(h, new_header("execute_reply"), content={"status": "ok"}),
    "empty-type": lambda h: signed(h, new_header("")),
    "method-name-type": lambda h: signed(h, new_header("dispatch_control")),
    "dunder-type": lambda h: signed(h, new_header("__init__")),
    "huge-no-delimiter": lambda h: [CLIENT_ID, huge()],
    "huge-bad-signature": lambda h: [CLIENT_ID, DELIM, b"0" * 32, huge(), b"{}", b"{}"],
    "huge-signature": lambda h: with_signature(valid(h), huge()),
    "huge-signed-garbage": lambda h: signed(h, huge()),
    "unsigned": lambda h: with_signature(valid(h), b""),
    "wrong-signature": lambda h: with_signature(valid(h), b"0" * 32),
    "truncated-signature": lambda h: with_signature(valid(h), signature_of(valid(h))[:16]),
    "uppercase-signature": lambda h: with_signature(valid(h), signature_of(valid(h)).upper()),
    "binary-signature": lambda h: with_signature(valid(h), b"\xff" * 32),
    "key-as-signature": lambda h: with_signature(valid(h), KEY),
    "other-frames-signature": lambda h: with_signature(
        valid(h, content={"code": "never_run = 2"}), signature_of(valid(h))),
    "wrong-key": lambda h: valid(h, session=Session(KEY + b"x")),
    "sha256-signature": lambda h: valid(h, session=Session(KEY, signature_scheme="hmac-sha256")),
}


def ran_junk(h: KernelHarness) -> bool:
    """True when code from a junk message ran."""
    return bool(h.call(lambda: "never_run" in h.kernel.user_ns))  # type: ignore[union-attr]


def warnings_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("streamkernel") and r.levelno >= logging.WARNING]


def assert_no_key_material(caplog: pytest.LogCaptureFixture) -> None:
    key = KEY.decode()
    assert key not in caplog.text
    for record in caplog.records:
        assert key not in record.getMessage()
        assert key not in (record.exc_text or "")


# -- frames -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mux", "control"])
@pytest.mark.parametrize("case", list(JUNK))
def test_junk_is_dropped_with_one_log_line(shared: KernelHarness,
                                           caplog: pytest.LogCaptureFixture,
                                           kind: str, case: str) -> None:
    frames = JUNK[case](shared)
    caplog.set_level(logging.DEBUG, logger="streamkernel")
    caplog.clear()
    shared.send_frames(kind, frames)
    assert_serving(shared, kind)   # the next message on `kind` is this request's reply
    logged = warnings_logged(caplog)
    assert len(logged) == 1, logged
    assert len(logged[0]) < 1000
    assert_no_key_material(caplog)
    assert not ran_junk(shared)


@pytest.mark.parametrize("kind, msg_type", [
    ("mux", "shutdown_request"), ("mux", "abort_request"),    # control only
    ("mux", "bogus_request"), ("control", "bogus_request"),   # served nowhere
])
def test_requests_not_served_on_a_socket_get_an_error_reply(
        shared: KernelHarness, caplog: pytest.LogCaptureFixture, kind: str,
        msg_type: str) -> None:
    caplog.clear()
    shared.send_frames(kind, valid(shared, msg_type, {"restart": False, "code": "1"}))
    _, reply = shared.recv(kind)
    assert reply["msg_type"] == msg_type.replace("_request", "_reply")
    assert_error(reply, "MessageError")
    assert "unknown request type" in reply["content"]["evalue"]
    assert len(warnings_logged(caplog)) == 1
    assert_serving(shared, kind)
    assert not shared.shutdown_called.is_set()
    assert not ran_junk(shared)


@pytest.mark.parametrize("replay_on", ["mux", "task", "control"])
def test_replay_is_dropped(shared: KernelHarness, caplog: pytest.LogCaptureFixture,
                           replay_on: str) -> None:
    frames = valid(shared, content={"code": "replayed = 1"})
    shared.send_frames("mux", frames)
    _, reply = shared.recv("mux")
    assert reply["content"]["status"] == "ok"
    caplog.clear()
    shared.send_frames(replay_on, frames)
    shared.send_frames(replay_on, frames)
    assert_serving(shared, replay_on)
    assert len(warnings_logged(caplog)) == 2
    assert_no_key_material(caplog)


PREFIXES = {
    "none": [],
    "one": [b"c"],
    "twenty": [b"hop-%d" % i for i in range(20)],
    "binary": [bytes(range(256)), b"\x00\xff\x00"],
    "empty": [b""],
    "empties": [b"", b"", b""],
    "long": [b"i" * 100_000],
    "delimiter-like": [b"<IDS|MSG", b"IDS|MSG>", b"<ids|msg>"],
}


@pytest.mark.parametrize("kind", ["mux", "task", "control"])
@pytest.mark.parametrize("name", list(PREFIXES))
def test_replies_repeat_unusual_routing_prefixes(shared: KernelHarness, kind: str,
                                                 name: str) -> None:
    prefix = PREFIXES[name]
    msg = shared.client.msg("execute_request", {"code": "routed = 1"})
    shared.send_frames(kind, shared.client.serialize(msg, prefix))
    idents, reply = shared.recv(kind)
    assert idents == prefix
    check_reply(reply, msg)
    assert reply["content"]["status"] == "ok"


@pytest.mark.parametrize("name", list(PREFIXES))
def test_junk_with_unusual_routing_prefixes_is_dropped(shared: KernelHarness,
                                                       caplog: pytest.LogCaptureFixture,
                                                       name: str) -> None:
    prefix = PREFIXES[name]
    caplog.clear()
    shared.send_frames("mux", with_signature(valid(shared, prefix=prefix), b"f" * 32))
    shared.send_frames("mux", prefix + [b"no delimiter"])
    assert_serving(shared)
    assert len(warnings_logged(caplog)) == 2


# -- property: random frame sequences -----------------------------------------------------

KNOWN = list(protocol.CONTROL_REQUESTS)

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3),
    max_leaves=6)
_non_dict = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8),
                      st.lists(_json, max_size=3))
_text = st.text(max_size=12)

# headers that can never make a message the engine answers (texts are too short to be
# a known type)
_bad_header = st.one_of(
    _json,
    st.fixed_dictionaries({"msg_type": st.sampled_from(KNOWN)}),
    st.fixed_dictionaries({"msg_id": _text}),
    st.fixed_dictionaries({"msg_id": _text, "msg_type": _text.filter(lambda t: t not in KNOWN)}),
    st.fixed_dictionaries({"msg_id": st.integers() | st.none(),
                           "msg_type": st.sampled_from(KNOWN)}),
    st.fixed_dictionaries({"msg_id": _text, "msg_type": _json}),
)
_good_header = st.builds(lambda t, i: {"msg_id": i, "msg_type": t}, st.sampled_from(KNOWN),
                         st.uuids().map(str))
_packed = st.one_of(_json.map(protocol.pack), st.binary(max_size=24))
_prefix = st.lists(st.binary(max_size=6), max_size=4)
_signature = st.one_of(
    st.binary(min_size=1, max_size=40), st.just(KEY), st.just(DELIM),
    st.text("0123456789abcdef", min_size=32, max_size=32).map(str.encode),
)
_frame = st.one_of(
    st.binary(max_size=40), st.just(DELIM), st.just(b""), st.just(KEY),
    st.sampled_from([b"{}", b"[]", b"null", b'{"msg_id":"x","msg_type":"execute_request"}',
                     b"\xff\xfe"]),
    st.text("0123456789abcdef", min_size=32, max_size=32).map(str.encode),
)


@st.composite
def junk_message(draw: Any) -> tuple[str, Any]:
    """(socket kind, a recipe for frames that the engine must drop)."""
    kind = draw(st.sampled_from(["mux", "task", "control"]))
    shape = draw(st.sampled_from(["raw", "bad-header", "bad-content", "bad-parent",
                                  "bad-signature", "unsigned", "replay"]))
    prefix = draw(_prefix)
    if shape == "raw":
        return kind, ("raw", draw(st.lists(_frame, min_size=1, max_size=10)))
    if shape == "bad-header":
        header = draw(_bad_header | _packed)
        return kind, ("signed", prefix, header, draw(st.just({}) | _json), draw(_json))
    if shape == "bad-content":
        content = draw(_non_dict | st.binary(max_size=24).filter(lambda b: not _is_json_dict(b)))
        return kind, ("signed", prefix, draw(_good_header), {}, content)
    if shape == "bad-parent":
        return kind, ("signed", prefix, draw(_good_header), draw(_non_dict), {})
    if shape in ("bad-signature", "unsigned"):
        sig = b"" if shape == "unsigned" else draw(_signature)
        buffers = draw(st.lists(_frame, max_size=2))
        return kind, ("resigned", prefix, draw(_good_header), sig, buffers)
    return kind, ("replay",)


def build(h: KernelHarness, recipe: Any, last_valid: list[bytes]) -> list[bytes]:
    if recipe[0] == "raw":
        return list(recipe[1])
    if recipe[0] == "signed":
        _, prefix, header, parent, content = recipe
        return signed(h, header, parent, content, prefix=tuple(prefix))
    if recipe[0] == "resigned":
        _, prefix, header, sig, buffers = recipe
        parts = [protocol.pack(header), b"{}", b'{"code":"never_run = 1"}']
        return list(prefix) + [DELIM, sig] + parts + list(buffers)
    return list(last_valid)


def _is_json_dict(data: bytes) -> bool:
    try:
        return isinstance(protocol.unpack(data), dict)
    except (ValueError, UnicodeDecodeError):
        return False


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(self.format(record))


@pytest.fixture(scope="module")
def property_harness() -> Iterator[tuple[KernelHarness, list[bytes], _ListHandler]]:
    """One kernel for all examples of the property test, its last valid message, its log."""
    h = KernelHarness(exec_lines=["hits = 0"])
    last_valid = valid(h, content={"code": "replayed = 1"})
    h.send_frames("mux", last_valid)
    h.recv("mux")
    handler = _ListHandler()
    logger = logging.getLogger("streamkernel")
    logger.addHandler(handler)
    yield h, last_valid, handler
    logger.removeHandler(handler)
    try:
        # nothing was answered twice, nothing answered junk, no junk ran
        assert h.no_message("mux", 0.1) and h.no_message("control", 0.1)
        assert not ran_junk(h)
    finally:
        h.close()


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(junk=st.lists(junk_message(), min_size=1, max_size=6))
def test_random_frames_never_stop_the_engine(
        property_harness: tuple[KernelHarness, list[bytes], _ListHandler],
        junk: list[tuple[str, Any]]) -> None:
    h, last_valid, handler = property_harness
    for kind, recipe in junk:
        h.send_frames(kind, build(h, recipe, last_valid))
    for kind in ("control", "mux"):
        first = h.request("execute_request", {"code": "hits = hits + 1"}, kind=kind)
        second = h.request("complete_request", {"text": "hit"}, kind=kind)
        _, r1 = h.recv(kind)
        _, r2 = h.recv(kind)
        check_reply(r1, first, statuses=("ok",))
        check_reply(r2, second, statuses=("ok",))
        assert r2["content"]["matches"] == ["hits"]
    last_valid[:] = valid(h, content={"code": "replayed = 1"})
    h.send_frames("mux", last_valid)
    _, r = h.recv("mux")
    assert r["content"]["status"] == "ok"
    while h.hub["iopub"].poll(0):
        h.hub["iopub"].recv_multipart()
    assert KEY.decode() not in "".join(handler.messages)


# -- user code that fights the engine -----------------------------------------------------

@pytest.mark.parametrize("code, ename", [
    ("import sys; sys.exit()", "SystemExit"),
    ("import sys; sys.exit(3)", "SystemExit"),
    ("raise SystemExit('bye')", "SystemExit"),
    ("raise KeyboardInterrupt", "KeyboardInterrupt"),
    ("raise GeneratorExit", "GeneratorExit"),
    ("def f(n):\n    return f(n + 1)\nf(0)", "RecursionError"),
    ("class BadStr(Exception):\n    def __str__(self):\n        raise RuntimeError('no')\n"
     "raise BadStr()", "BadStr"),
    ("class BadStr(Exception):\n    def __str__(self):\n        raise KeyboardInterrupt\n"
     "raise BadStr()", "BadStr"),
    ("class BadStr(Exception):\n    def __str__(self):\n        return 5\n"
     "raise BadStr()", "BadStr"),
    ("class BadStr(Exception):\n    def __str__(self):\n        raise SystemExit\n"
     "raise BadStr()", "BadStr"),
    ("raise ValueError('v' * 10_000_000)", "ValueError"),
    ("1/0", "ZeroDivisionError"),
    ("def (", "SyntaxError"),
], ids=["exit", "exit-3", "systemexit", "keyboardinterrupt", "generatorexit", "recursion",
        "str-raises", "str-raises-kbi", "str-not-str", "str-raises-exit", "huge-message",
        "zerodiv", "syntax"])
def test_execute_error_is_one_reply_and_engine_survives(harness: KernelHarness, code: str,
                                                        ename: str) -> None:
    reply = execute(harness, code)
    assert_error(reply, ename)
    assert len(reply["content"]["evalue"]) <= 100_000
    assert all(len(line) <= 100_000 for line in reply["content"]["traceback"])
    assert_fully_working(harness)


def test_null_byte_in_code(harness: KernelHarness) -> None:
    reply = execute(harness, "a = 1\x00")
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] in ("SyntaxError", "ValueError")
    assert_fully_working(harness)


def test_huge_traceback_is_bounded(harness: KernelHarness) -> None:
    code = ("prev = None\n"
            "for i in range(5000):\n"
            "    e = ValueError(i)\n"
            "    e.__cause__ = prev\n"
            "    prev = e\n"
            "raise prev")
    reply = execute(harness, code)
    assert_error(reply, "ValueError")
    assert len(reply["content"]["traceback"]) <= 1001
    code = ("import sys\n"
            "def a(n):\n    return b(n - 1) if n else 1 / 0\n"
            "def b(n):\n    return a(n - 1)\n"
            "a(600)")
    reply = execute(harness, code)
    assert_error(reply, "ZeroDivisionError")
    assert len(reply["content"]["traceback"]) <= 1001
    assert_fully_working(harness)


def test_changed_warning_filters(harness: KernelHarness) -> None:
    try:
        reply = execute(harness, "import warnings; warnings.simplefilter('error')")
        assert reply["content"]["status"] == "ok"
        assert_error(execute(harness, "import warnings; warnings.warn('w')"), "UserWarning")
        assert_fully_working(harness)
        assert result(apply(harness, lambda: [1, 2])) == [1, 2]
        assert execute(harness, "print('still printing')")["content"]["status"] == "ok"
        assert "still printing\n" in streams(harness)
        execute(harness, "import warnings; warnings.simplefilter('ignore')")
        assert_fully_working(harness)
    finally:
        execute(harness, "import warnings; warnings.resetwarnings()")


def test_changed_decimal_context(harness: KernelHarness) -> None:
    reply = execute(harness, "import decimal\nctx = decimal.getcontext()\nctx.prec = 1\n"
                             "ctx.traps[decimal.Inexact] = True\nctx.traps[decimal.Rounded] = True")
    assert reply["content"]["status"] == "ok"
    assert_error(execute(harness, "decimal.Decimal(1) / decimal.Decimal(3)"), "Inexact")
    assert_fully_working(harness)


@pytest.mark.parametrize("code", [
    "import sys; sys.stdout = None",
    "import sys, io; sys.stdout = io.StringIO(); sys.stderr = io.StringIO()",
    "import sys, os; devnull = open(os.devnull, 'w'); sys.stdout = devnull",
    "import sys; sys.stdout.close()",
    "import sys; sys.displayhook = None",
    "import sys; del sys.stdout",
], ids=["none", "stringio", "devnull", "close", "displayhook", "del"])
def test_replaced_or_closed_stdout(harness: KernelHarness, code: str) -> None:
    reply = execute(harness, code)
    assert reply["content"]["status"] == "ok"
    harness.iopub(0.05)
    assert execute(harness, "print('back again')\n7 * 6")["content"]["status"] == "ok"
    published = harness.iopub()
    assert "back again\n" in "".join(m["content"].get("data", "") for _, m in published
                                     if m["msg_type"] == "stream")
    assert [m["content"]["data"] for _, m in published if m["msg_type"] == "pyout"] == ["42"]
    assert_fully_working(harness)
    execute(harness, "if 'devnull' in globals(): devnull.close()")


def test_bytes_written_to_stdout_buffer(harness: KernelHarness) -> None:
    reply = execute(harness, "import sys\nsys.stdout.buffer.write(b'raw \\xff bytes\\n')\n"
                             "sys.stdout.flush()")
    assert reply["content"]["status"] == "ok"
    assert streams(harness) == "raw \ufffd bytes\n"
    assert_fully_working(harness)


def test_printing_from_another_thread_while_the_engine_publishes(harness: KernelHarness) -> None:
    code = ("import sys, threading, time\n"
            "stop = threading.Event()\n"
            "def chatter():\n"
            "    i = 0\n"
            "    while not stop.is_set() and i < 100_000:\n"
            "        sys.stdout.write('thread %d\\n' % i)\n"
            "        i += 1\n"
            "        time.sleep(0.0005)\n"
            "t = threading.Thread(target=chatter, daemon=True)\n"
            "t.start()\n"
            "for i in range(3000):\n"
            "    sys.stdout.write('main %d\\n' % i)\n"
            "    if i % 500 == 0:\n"
            "        time.sleep(0.06)\n")
    try:
        assert execute(harness, code)["content"]["status"] == "ok"
        assert_fully_working(harness)
    finally:
        assert execute(harness, "stop.set(); t.join(5); assert not t.is_alive()")[
            "content"]["status"] == "ok"
    lines = streams(harness).splitlines()
    assert [line for line in lines if line.startswith("main")] == [
        "main %d" % i for i in range(3000)]
    thread_lines = [line for line in lines if line.startswith("thread")]
    assert thread_lines, "the thread's output during the request is published"
    numbers = [int(line.split()[1]) for line in thread_lines]
    assert numbers == sorted(numbers)
    assert_fully_working(harness)


def test_a_20mb_print_arrives_in_bounded_chunks(harness: KernelHarness) -> None:
    size = 20 * 1000 * 1000
    request = harness.request("execute_request", {"code": "print('x' * %d)" % size})
    _, reply = harness.recv()
    check_reply(reply, request, statuses=("ok",))
    chunks: list[str] = []
    total = 0
    deadline = time.monotonic() + 30
    while total < size + 1 and time.monotonic() < deadline:
        topic, msg = _next_iopub(harness)
        if msg["msg_type"] == "stream":
            assert msg["parent_header"]["msg_id"] == request["msg_id"]
            data = msg["content"]["data"]
            assert len(data) <= outstream.CHUNK_SIZE
            chunks.append(data)
            total += len(data)
    assert total == size + 1
    text = "".join(chunks)
    assert text == "x" * size + "\n"
    assert_fully_working(harness)


def _next_iopub(h: KernelHarness) -> tuple[bytes, dict]:
    frames = h.recv_raw("iopub", timeout=TIMEOUT)
    idents, rest = h.client.feed_identities(frames)
    return idents[0], h.client.deserialize(rest)


@pytest.mark.parametrize("content", [{}, {"code": 5}, {"code": None}, {"code": ["1"]}],
                         ids=["missing", "int", "null", "list"])
def test_execute_without_string_code(harness: KernelHarness, content: dict) -> None:
    reply = roundtrip(harness, "execute_request", content)
    assert reply["content"]["status"] == "error"
    assert_fully_working(harness)


# -- apply --------------------------------------------------------------------------------

def _raise(exc: BaseException) -> Any:
    raise exc


def _recurse(n: int) -> int:
    return _recurse(n + 1)


class _BadStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


@pytest.mark.parametrize("f, args, ename", [
    (__import__("sys").exit, (), "SystemExit"),
    (__import__("sys").exit, (4,), "SystemExit"),
    (_raise, (SystemExit("bye"),), "SystemExit"),
    (_raise, (KeyboardInterrupt(),), "KeyboardInterrupt"),
    (_recurse, (0,), "RecursionError"),
    (_raise, (_BadStr(),), "_BadStr"),
    (lambda: (i for i in range(3)), (), "SerializationError"),
    (lambda: _BadPickle(), (), "SerializationError"),
], ids=["exit", "exit-4", "systemexit", "keyboardinterrupt", "recursion", "str-raises",
        "unpicklable-result", "reduce-raises"])
def test_apply_error_is_one_reply_and_engine_survives(harness: KernelHarness, f: Any,
                                                      args: tuple, ename: str) -> None:
    reply = apply(harness, f, *args)
    assert_error(reply, ename)
    assert reply["header"]["status"] == "error"
    assert reply["buffers"] == []
    assert_fully_working(harness)


class _BadPickle:
    def __reduce__(self) -> Any:
        raise RuntimeError("cannot pickle this")


@pytest.mark.parametrize("buffers", [
    [b"junk", b"junk", b"junk"],
    [b"only one"],
    [],
    pack_apply_message(len, ([1],))[:2],
    pack_apply_message(len, (b"x" * 1000,))[:3],
    [pack_apply_message(len, ())[1]] * 3,
], ids=["junk", "one", "none", "two", "missing-data", "not-callable"])
def test_apply_with_bad_buffers(harness: KernelHarness, buffers: list[bytes]) -> None:
    reply = roundtrip(harness, "apply_request", buffers=buffers)
    assert reply["content"]["status"] == "error"
    assert_fully_working(harness)


def test_apply_returning_none(harness: KernelHarness) -> None:
    assert result(apply(harness, lambda: None)) is None
    assert_fully_working(harness)


def test_apply_returning_an_enormous_result(harness: KernelHarness) -> None:
    size = 50 * 1000 * 1000
    reply = apply(harness, lambda n: b"r" * n, size)
    got = result(reply)
    assert len(got) == size and got[:10] == b"r" * 10 and got[-1:] == b"r"
    assert_fully_working(harness)


@needs_numpy
def test_apply_with_non_contiguous_numpy_arguments(harness: KernelHarness) -> None:
    base = numpy.arange(10_000, dtype=numpy.float64).reshape(100, 100)
    for arr in (base[:, ::2], base.T, base[::-1], base[::3, 1::7]):
        reply = apply(harness, lambda a: (a.sum(), a.shape, a.flags.c_contiguous), arr)
        total, shape, _ = result(reply)
        assert total == arr.sum() and shape == arr.shape
    assert_fully_working(harness)


@needs_numpy
def test_apply_with_read_only_buffers(harness: KernelHarness) -> None:
    arr = numpy.arange(5000, dtype=numpy.int64)
    arr.flags.writeable = False
    data = b"d" * 5000
    view = memoryview(data)
    assert view.readonly
    reply = apply(harness, lambda a, v, b: (int(a.sum()), bytes(v[:3]), len(b)), arr, view, data)
    assert result(reply) == (int(arr.sum()), b"ddd", 5000)
    # a read-only argument returned as the result
    got = result(apply(harness, lambda a: a, arr))
    numpy.testing.assert_array_equal(got, arr)
    assert_fully_working(harness)


def test_apply_that_prints_bytes_and_text(harness: KernelHarness) -> None:
    def noisy() -> int:
        import sys
        print("text")
        sys.stdout.buffer.write(b"bytes\n")
        return 1
    assert result(apply(harness, noisy)) == 1
    assert streams(harness) == "text\nbytes\n"


def _cause_chain() -> None:
    prev = None
    for i in range(5000):
        e = ValueError(i)
        e.__cause__ = prev
        prev = e
    assert prev is not None
    raise prev


def _replace_stdout() -> int:
    import io
    import sys
    sys.stdout = io.StringIO()
    sys.stderr = None  # type: ignore[assignment]
    sys.displayhook = None  # type: ignore[assignment]
    return 1


def _strict_decimal() -> int:
    import decimal
    ctx = decimal.getcontext()
    ctx.prec = 1
    ctx.traps[decimal.Inexact] = True
    return 1


def _strict_warnings() -> int:
    import warnings
    warnings.simplefilter("error")
    return 1


def test_apply_huge_traceback_is_bounded(harness: KernelHarness) -> None:
    reply = apply(harness, _cause_chain)
    assert_error(reply, "ValueError")
    assert len(reply["content"]["traceback"]) <= 1001
    assert_fully_working(harness)


@pytest.mark.parametrize("fight", [_replace_stdout, _strict_decimal, _strict_warnings],
                         ids=["stdout", "decimal", "warnings"])
def test_apply_that_changes_global_state(harness: KernelHarness, fight: Any) -> None:
    try:
        assert result(apply(harness, fight)) == 1
        assert_fully_working(harness)
        assert execute(harness, "print('printed')")["content"]["status"] == "ok"
        assert "printed\n" in streams(harness)
        assert result(apply(harness, lambda: {"still": "serialized"})) == {"still": "serialized"}
    finally:
        execute(harness, "import warnings; warnings.resetwarnings()")


@pytest.mark.parametrize("kind", ["mux", "task"])
def test_a_request_sent_after_an_error_reply_is_not_aborted(harness: KernelHarness,
                                                            kind: str) -> None:
    # only what was queued when the error happened is aborted; a client that waits
    # for the error reply before sending must be served (the harness pauses the engine
    # after each error reply, so a drain that follows the reply is caught every time)
    for _ in range(20):
        assert_error(execute(harness, "1/0", kind=kind), "ZeroDivisionError")
        reply = execute(harness, "after_error = 1", kind=kind)
        assert reply["content"]["status"] == "ok", reply["content"]
