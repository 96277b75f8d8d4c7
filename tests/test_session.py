"""Session: signing, verification, replay protection, framing and sending."""
from __future__ import annotations

import glob
import hashlib
import hmac
import os
import time
from datetime import datetime
from typing import Any, Callable

import pytest
import zmq

from streamkernel import protocol
from streamkernel.errors import (DuplicateSignature, InvalidSignature, MalformedMessage,
                                 MessageError, UnsignedMessage)
from streamkernel.protocol import DELIM
from streamkernel import session as session_module
from streamkernel.session import Session, recv_frames, send_frames

from .harness import CAPTURES, KEY

try:
    import numpy
except ImportError:  # pragma: no cover
    numpy = None  # type: ignore[assignment]

needs_numpy = pytest.mark.skipif(numpy is None, reason="numpy is not installed")

CAPTURE_FILES = sorted(glob.glob(os.path.join(CAPTURES, "*.json")))


def wire(session: Session, msg_type: str = "execute_request",
         content: dict[str, Any] | None = None, ident: Any = None) -> list[bytes]:
    """Serialized frames of a fresh message."""
    return session.serialize(session.msg(msg_type, content or {"code": "1"}), ident)


def after_delim(frames: list[Any]) -> list[Any]:
    return frames[frames.index(DELIM) + 1:]


def signed(session: Session, header: bytes, parent: bytes = b"{}",
           content: bytes = b"{}") -> list[bytes]:
    """Frames after the delimiter, correctly signed, for raw header/parent/content."""
    return [session.sign([header, parent, content]), header, parent, content]


def on_the_wire(obj: Any) -> Any:
    """``obj`` as a receiver with ``parse_dates`` sees it."""
    return protocol.extract_dates(protocol.unpack(protocol.pack(obj)))


# -- construction -----------------------------------------------------------------------

def test_constructor_validates_arguments() -> None:
    with pytest.raises(ValueError):
        Session(KEY, signature_scheme="hmac-sha1")
    with pytest.raises(ValueError):
        Session(KEY, digest_history_size=0)
    s = Session("str-key")
    assert s.key == b"str-key"
    assert Session(KEY).session != Session(KEY).session
    assert Session(KEY, session="abc").bsession == b"abc"


def test_msg_builds_header_parent_and_content() -> None:
    s = Session(KEY, session="sess", username="bob")
    parent = s.msg("execute_request", {"code": "1"})
    reply = s.msg("execute_reply", {"status": "ok"}, parent, subheader={"started": 1})
    assert reply["header"]["session"] == "sess" and reply["header"]["username"] == "bob"
    assert reply["header"]["started"] == 1
    assert reply["msg_id"] == reply["header"]["msg_id"] != parent["msg_id"]
    assert reply["parent_header"] == parent["header"]
    assert s.msg("x")["content"] == {} and s.msg("x")["parent_header"] == {}


# -- sign / verify ----------------------------------------------------------------------

@pytest.mark.parametrize("scheme, digestmod", [("hmac-md5", hashlib.md5),
                                               ("hmac-sha256", hashlib.sha256)])
def test_sign_matches_an_independent_hmac(scheme: str, digestmod: Any) -> None:
    s = Session(KEY, signature_scheme=scheme)
    frames = wire(s)
    sig, header, parent, content = after_delim(frames)
    expected = hmac.new(KEY, header + parent + content, digestmod).hexdigest().encode()
    assert sig == expected
    assert len(sig) == 2 * digestmod().digest_size
    assert sig == sig.lower()
    assert s.sign([b"a", b"b", b"c"]) == hmac.new(KEY, b"abc", digestmod).hexdigest().encode()
    # the peer with the same key and scheme accepts it
    msg = Session(KEY, signature_scheme=scheme).deserialize(after_delim(frames))
    assert msg["content"] == {"code": "1"}


def test_str_and_bytes_like_keys_sign_as_their_bytes() -> None:
    expected = Session(KEY).sign([b"h", b"p", b"c"])
    for key in (KEY.decode(), bytearray(KEY), memoryview(KEY)):
        assert Session(key).sign([b"h", b"p", b"c"]) == expected


@pytest.mark.parametrize("key", [b"k", b"x" * 64, b"y" * 65, b"z" * 200, bytes(range(256))])
@pytest.mark.parametrize("scheme, digestmod", [("hmac-md5", hashlib.md5),
                                               ("hmac-sha256", hashlib.sha256)])
def test_sign_matches_hmac_for_keys_shorter_and_longer_than_a_block(
        key: bytes, scheme: str, digestmod: Any) -> None:
    s = Session(key, signature_scheme=scheme)
    for parts in ([b"", b"", b""], [b"h" * 300, b"{}", b"c" * 70000]):
        assert s.sign(parts) == hmac.new(key, b"".join(parts), digestmod).hexdigest().encode()


def test_schemes_do_not_verify_each_other() -> None:
    frames = wire(Session(KEY, signature_scheme="hmac-sha256"))
    with pytest.raises(InvalidSignature):
        Session(KEY, signature_scheme="hmac-md5").deserialize(after_delim(frames))


def test_sign_without_key_is_empty_and_nothing_is_checked() -> None:
    s = Session(b"")
    frames = wire(s)
    assert after_delim(frames)[0] == b""
    receiver = Session(b"")
    assert receiver.deserialize(after_delim(frames))["msg_type"] == "execute_request"
    # no key: no replay history either
    assert receiver.deserialize(after_delim(frames))["msg_type"] == "execute_request"


@pytest.mark.parametrize("path", CAPTURE_FILES, ids=os.path.basename)
def test_legacy_capture_frames_verify(path: str, capture: Callable[[str], dict]) -> None:
    cap = capture(path)
    s = Session(cap["exec_key"])
    assert cap["messages"]
    for m in cap["messages"]:
        idents, rest = s.feed_identities(m["frames"])
        sig, header, parent, content = rest[:4]
        expected = hmac.new(cap["exec_key"].encode(), header + parent + content,
                            hashlib.md5).hexdigest().encode()
        assert sig == expected == s.sign([header, parent, content])
        msg = s.deserialize(rest)
        assert isinstance(msg["header"]["date"], datetime)
        assert msg["buffers"] == rest[4:]
        if m["stream"] == "iopub":
            assert idents[0].startswith(b"engine.%d." % cap["engine_id"])
    with pytest.raises(InvalidSignature):
        Session(cap["exec_key"] + "x").deserialize(
            s.feed_identities(cap["messages"][0]["frames"])[1])


def test_unsigned_message_is_rejected() -> None:
    s = Session(KEY)
    rest = after_delim(wire(Session(b"")))
    assert rest[0] == b""
    with pytest.raises(UnsignedMessage):
        s.deserialize(rest)


@pytest.mark.parametrize("mangle", [
    lambda sig: b"0" * len(sig),
    lambda sig: sig[:16],
    lambda sig: sig[:-1],
    lambda sig: sig + b"0",
    lambda sig: sig.upper(),
    lambda sig: b"\xff" * len(sig),
    lambda sig: bytes.fromhex(sig.decode()),
], ids=["zeros", "half", "truncated", "extended", "upper", "binary", "raw-digest"])
def test_invalid_signature_is_rejected(mangle: Callable[[bytes], bytes]) -> None:
    sender, receiver = Session(KEY), Session(KEY)
    rest = after_delim(wire(sender))
    rest[0] = mangle(rest[0])
    with pytest.raises(InvalidSignature):
        receiver.deserialize(rest)


def test_signature_of_other_frames_is_rejected() -> None:
    sender, receiver = Session(KEY), Session(KEY)
    one = after_delim(wire(sender, content={"code": "a = 1"}))
    two = after_delim(wire(sender, content={"code": "a = 2"}))
    with pytest.raises(InvalidSignature):
        receiver.deserialize([two[0]] + one[1:])
    # the same frames, with parent and content swapped
    with pytest.raises(InvalidSignature):
        receiver.deserialize([one[0], one[1], one[3], one[2]])
    # content tampered with after signing
    with pytest.raises(InvalidSignature):
        receiver.deserialize(one[:3] + [b'{"code":"import os"}'])


def test_wrong_key_is_rejected() -> None:
    rest = after_delim(wire(Session(KEY + b"!")))
    with pytest.raises(InvalidSignature):
        Session(KEY).deserialize(rest)


def test_replay_is_rejected() -> None:
    sender, receiver = Session(KEY), Session(KEY)
    rest = after_delim(wire(sender))
    receiver.deserialize(rest)
    with pytest.raises(DuplicateSignature):
        receiver.deserialize(rest)
    with pytest.raises(DuplicateSignature):
        receiver.deserialize(list(rest) + [b"extra buffer"])  # buffers are not signed


def test_rejections_are_message_errors() -> None:
    for cls in (UnsignedMessage, InvalidSignature, DuplicateSignature, MalformedMessage):
        assert issubclass(cls, MessageError)


def test_invalid_signature_is_not_remembered() -> None:
    sender, receiver = Session(KEY), Session(KEY)
    rest = after_delim(wire(sender))
    bad = [rest[0]] + rest[1:3] + [b'{"code":"2"}']
    with pytest.raises(InvalidSignature):
        receiver.deserialize(bad)
    assert receiver.deserialize(rest)["content"] == {"code": "1"}


def test_digest_history_keeps_the_latest_and_forgets_the_oldest() -> None:
    size = 5
    sender, receiver = Session(KEY), Session(KEY, digest_history_size=size)
    messages = [after_delim(wire(sender, content={"i": i})) for i in range(2 * size + 3)]
    for m in messages:
        receiver.deserialize(m)
    # the newest `size` are always remembered (here also the generation before them) ...
    for m in messages[size:]:
        with pytest.raises(DuplicateSignature):
            receiver.deserialize(m)
    # ... and what is older than two generations is forgotten
    for m in messages[:size]:
        assert receiver.deserialize(m)["content"]["i"] in range(size)


def test_digest_history_memory_is_bounded() -> None:
    size = 50
    sender, receiver = Session(KEY), Session(KEY, digest_history_size=size)
    for i in range(20 * size):
        receiver.deserialize(after_delim(wire(sender, content={"i": i})))
        assert len(receiver._digests) < size and len(receiver._old_digests) <= size


# -- malformed --------------------------------------------------------------------------

HEADER = b'{"msg_id":"m1","msg_type":"execute_request"}'


@pytest.mark.parametrize("header, parent, content", [
    (b"not json", b"{}", b"{}"),
    (HEADER, b"not json", b"{}"),
    (HEADER, b"{}", b"not json"),
    (b"\xff\xfe", b"{}", b"{}"),
    (b"[]", b"{}", b"{}"),
    (b"null", b"{}", b"{}"),
    (b'"header"', b"{}", b"{}"),
    (HEADER, b"[]", b"{}"),
    (HEADER, b"{}", b"[1,2]"),
    (HEADER, b"{}", b"7"),
    (b'{"msg_id":"m1"}', b"{}", b"{}"),
    (b'{"msg_type":"execute_request"}', b"{}", b"{}"),
    (b'{"msg_id":1,"msg_type":"execute_request"}', b"{}", b"{}"),
    (b'{"msg_id":"m1","msg_type":null}', b"{}", b"{}"),
    (b'{"msg_id":"m1","msg_type":["execute_request"]}', b"{}", b"{}"),
    (b"", b"", b""),
], ids=lambda v: v.decode("latin-1")[:20])
def test_signed_but_malformed_is_rejected(header: bytes, parent: bytes, content: bytes) -> None:
    s = Session(KEY)
    with pytest.raises(MalformedMessage):
        s.deserialize(signed(s, header, parent, content))


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_too_few_frames_is_rejected(n: int) -> None:
    s = Session(KEY)
    with pytest.raises(MalformedMessage):
        s.deserialize(signed(s, HEADER)[:n])


@pytest.mark.parametrize("depth", [600, 900, 5000, 100_000])
def test_deeply_nested_json_is_rejected_as_malformed_or_accepted(depth: int) -> None:
    nested = ("[" * depth + "]" * depth).encode()
    content = b'{"x":' + nested + b"}"
    for s in (Session(KEY), Session(KEY, parse_dates=False)):
        try:
            msg = s.deserialize(signed(s, HEADER, b"{}", content))
        except MalformedMessage:
            continue
        assert msg["msg_id"] == "m1"


def test_content_false_leaves_content_packed() -> None:
    s = Session(KEY)
    rest = after_delim(wire(Session(KEY), content={"code": "x"}))
    msg = s.deserialize(rest, content=False)
    assert msg["content"] == b'{"code":"x"}'


def test_parse_dates() -> None:
    rest = after_delim(wire(Session(KEY)))
    assert isinstance(Session(KEY).deserialize(rest)["header"]["date"], datetime)
    date = Session(KEY, parse_dates=False).deserialize(rest)["header"]["date"]
    assert isinstance(date, str) and protocol.DATE_PATTERN.match(date)


# -- feed_identities --------------------------------------------------------------------

@pytest.mark.parametrize("prefix", [[], [b"a"], [b"\x00k\x8bEg", b"client"], [b""] * 3,
                                    [bytes(range(256))], [b"p%d" % i for i in range(20)]])
def test_feed_identities_splits_at_the_delimiter(prefix: list[bytes]) -> None:
    s = Session(KEY)
    frames = wire(s, ident=prefix)
    idents, rest = s.feed_identities(frames)
    assert idents == prefix
    assert rest == frames[len(prefix) + 1:]


def test_feed_identities_with_zmq_frames() -> None:
    s = Session(KEY)
    frames = [zmq.Frame(f) for f in wire(s, ident=[b"peer", b"client"])]
    idents, rest = s.feed_identities(frames, copy=False)
    assert idents == [b"peer", b"client"]
    assert all(isinstance(f, zmq.Frame) for f in rest)
    assert Session(KEY).deserialize(rest, copy=False)["content"] == {"code": "1"}


def test_feed_identities_with_memoryviews() -> None:
    s = Session(KEY)
    frames = [memoryview(f) for f in wire(s, ident=b"peer")]
    idents, rest = s.feed_identities(frames)
    assert idents == [b"peer"]
    assert Session(KEY).deserialize(rest)["content"] == {"code": "1"}


@pytest.mark.parametrize("frames", [[], [b""], [b"a", b"b"], [b"<IDS|MSG", b"x"],
                                    [b"<ids|msg>"], [b" <IDS|MSG>"]])
def test_feed_identities_without_delimiter(frames: list[bytes]) -> None:
    with pytest.raises(MalformedMessage):
        Session(KEY).feed_identities(frames)
    with pytest.raises(MalformedMessage):
        Session(KEY).feed_identities([zmq.Frame(f) for f in frames], copy=False)


# -- serialize / deserialize ------------------------------------------------------------

def test_serialize_deserialize_round_trip() -> None:
    sender, receiver = Session(KEY), Session(KEY)
    parent = sender.msg("execute_request", {"code": "1"})
    content = {"status": "ok", "text": "caf\u00e9 \u2603", "n": [1, 2.5, None],
               "when": datetime(2011, 7, 31, 1, 2, 3, 4)}
    msg = sender.msg("execute_reply", content, parent, subheader={"started": datetime.now()})
    frames = sender.serialize(msg, [b"peer", b"client"])
    assert frames[:3] == [b"peer", b"client", DELIM]
    assert all(b < 0x80 for f in frames[4:] for b in f)
    idents, rest = receiver.feed_identities(frames)
    got = receiver.deserialize(rest)
    assert idents == [b"peer", b"client"]
    assert got["msg_id"] == msg["msg_id"] and got["msg_type"] == "execute_reply"
    assert got["content"] == content
    assert got["parent_header"] == on_the_wire(parent["header"])
    assert got["header"] == on_the_wire(msg["header"])
    assert isinstance(got["header"]["date"], datetime)
    assert got["buffers"] == []


def test_serialize_accepts_packed_content_and_parent() -> None:
    s = Session(KEY)
    msg = s.msg("x")
    msg["content"] = b'{"a":1}'
    msg["parent_header"] = b'{"msg_id":"p"}'
    got = Session(KEY).deserialize(after_delim(s.serialize(msg)))
    assert got["content"] == {"a": 1} and got["parent_header"] == {"msg_id": "p"}
    msg = s.msg("x")
    msg["content"] = None
    assert after_delim(s.serialize(msg))[3] == b"{}"
    msg["content"] = 5
    with pytest.raises(TypeError):
        s.serialize(msg)


def test_serialize_ident_forms() -> None:
    s = Session(KEY)
    msg = s.msg("x")
    assert s.serialize(msg)[0] == DELIM
    assert s.serialize(msg, b"one")[:2] == [b"one", DELIM]
    assert s.serialize(msg, [b"a", b"b"])[:3] == [b"a", b"b", DELIM]


# -- sockets ----------------------------------------------------------------------------

@pytest.fixture
def pair(socket: Callable[[int], zmq.Socket]) -> tuple[zmq.Socket, zmq.Socket]:
    a, b = socket(zmq.PAIR), socket(zmq.PAIR)
    port = a.bind_to_random_port("tcp://127.0.0.1")
    b.connect("tcp://127.0.0.1:%d" % port)
    return a, b


def test_send_and_recv_over_a_socket_pair(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    a, b = pair
    sender, receiver = Session(KEY), Session(KEY)
    big = os.urandom(100_000)
    buffers = [b"small", bytearray(b"ba" * 100), memoryview(big), big]
    sent = sender.send(a, "apply_request", {"k": "v"}, ident=[b"client"], buffers=buffers)
    assert b.poll(5000)
    idents, msg = receiver.recv(b)
    assert idents == [b"client"] and msg is not None
    assert msg["msg_id"] == sent["msg_id"] and msg["content"] == {"k": "v"}
    assert msg["buffers"] == [b"small", b"ba" * 100, big, big]
    assert receiver.recv(b) == (None, None)


def test_recv_copy_false_returns_frames(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    a, b = pair
    sender, receiver = Session(KEY), Session(KEY)
    data = os.urandom(50_000)
    sender.send(a, "apply_request", {}, buffers=[data])
    assert b.poll(5000)
    idents, msg = receiver.recv(b, copy=False)
    assert idents == [] and msg is not None
    assert isinstance(msg["buffers"][0], zmq.Frame)
    assert msg["buffers"][0].bytes == data
    # the same frames deserialized by hand
    sender.send(a, "apply_request", {"n": 2}, buffers=[data])
    assert b.poll(5000)
    frames = b.recv_multipart(copy=False)
    idents, rest = receiver.feed_identities(frames, copy=False)
    msg = receiver.deserialize(rest, copy=False)
    assert msg["content"] == {"n": 2}
    assert bytes(msg["buffers"][0].buffer) == data


@pytest.mark.parametrize("check", [True, False])
def test_recv_frames_takes_whole_messages_and_none_when_empty(
        pair: tuple[zmq.Socket, zmq.Socket], check: bool) -> None:
    a, b = pair
    assert recv_frames(b, check=check) is None
    data = os.urandom(100_000)
    send_frames(a, [b"id", DELIM, b"sig", b"{}", b"{}", b"{}", data])
    send_frames(a, [b"second"], copy=True)
    deadline = time.monotonic() + 5
    first = None
    while first is None and time.monotonic() < deadline:
        first = recv_frames(b, check=check)
    assert first is not None and [bytes(f.buffer) for f in first[:6]] == [
        b"id", DELIM, b"sig", b"{}", b"{}", b"{}"]
    assert first[6].bytes == data
    second = None
    while second is None and time.monotonic() < deadline:
        second = recv_frames(b, copy=True, check=check)
    assert second == [b"second"]
    assert recv_frames(b, check=check) is None


@pytest.mark.parametrize("frames_know_more", [True, False])
def test_recv_frames_waits_up_to_rcvtimeo(pair: tuple[zmq.Socket, zmq.Socket],
                                          monkeypatch: pytest.MonkeyPatch,
                                          frames_know_more: bool) -> None:
    # without Frame.more (pyzmq's cffi backend) the socket is asked after each frame
    monkeypatch.setattr(session_module, "_FRAMES_KNOW_MORE", frames_know_more)
    a, b = pair
    b.rcvtimeo = 50
    assert recv_frames(b, wait=True) is None
    send_frames(a, [b"one", b"", b"three"])
    b.rcvtimeo = 5000
    got = recv_frames(b, wait=True)
    assert got is not None and [f.bytes for f in got] == [b"one", b"", b"three"]
    send_frames(a, [b"a", b"b"])
    assert recv_frames(b, copy=True, wait=True) == [b"a", b"b"]


def test_recv_raises_message_error_for_a_forgery(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    a, b = pair
    frames = wire(Session(KEY + b"?"))
    a.send_multipart(frames)
    assert b.poll(5000)
    with pytest.raises(InvalidSignature):
        Session(KEY).recv(b)


def test_send_track(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    a, b = pair
    msg = Session(KEY).send(a, "x", {}, buffers=[b"z" * 100_000], track=True)
    assert isinstance(msg["tracker"], zmq.MessageTracker)
    assert b.poll(5000)
    b.recv_multipart()
    msg["tracker"].wait(5)
    assert msg["tracker"].done


def test_send_a_prebuilt_message(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    a, b = pair
    s = Session(KEY)
    msg = s.msg("execute_request", {"code": "2"})
    assert s.send(a, msg) is msg
    assert b.poll(5000)
    got = Session(KEY).recv(b)[1]
    assert got is not None and got["msg_id"] == msg["msg_id"]


@pytest.mark.parametrize("buf, error", [
    ("a str", TypeError),
    ([1, 2, 3], TypeError),
    (12345, TypeError),
    (memoryview(bytes(100))[::2], ValueError),
], ids=["str", "list", "int", "strided-memoryview"])
def test_send_checks_buffers_before_sending(pair: tuple[zmq.Socket, zmq.Socket], buf: Any,
                                            error: type) -> None:
    a, b = pair
    with pytest.raises(error):
        Session(KEY).send(a, "x", {}, buffers=[b"ok", buf])
    assert not b.poll(100), "nothing may be sent when a buffer is refused"


@needs_numpy
def test_send_numpy_buffers(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    a, b = pair
    arr = numpy.arange(1000, dtype=numpy.float64).reshape(10, 100)
    with pytest.raises(ValueError):
        Session(KEY).send(a, "x", {}, buffers=[arr[:, ::2]])
    with pytest.raises(ValueError):
        Session(KEY).send(a, "x", {}, buffers=[arr.T[::2]])
    assert not b.poll(100)
    Session(KEY).send(a, "x", {}, buffers=[arr, numpy.asfortranarray(arr)])
    assert b.poll(5000)
    msg = Session(KEY).recv(b)[1]
    assert msg is not None
    assert msg["buffers"][0] == arr.tobytes()
    assert msg["buffers"][1] == numpy.asfortranarray(arr).tobytes(order="A")
