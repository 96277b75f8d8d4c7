"""protocol: reply types, topics, headers, JSON packing and date handling."""
from __future__ import annotations

import json
import os
import re
import uuid
import warnings
from datetime import datetime

import pytest

from streamkernel import protocol
from streamkernel.protocol import extract_dates, pack, reply_type, topic, unpack


@pytest.mark.parametrize("request_type, expected", [
    ("execute_request", "execute_reply"),
    ("apply_request", "apply_reply"),
    ("complete_request", "complete_reply"),
    ("clear_request", "clear_reply"),
    ("abort_request", "abort_reply"),
    ("shutdown_request", "shutdown_reply"),
    ("registration_request", "registration_reply"),
    ("queue_status_request", "queue_status_reply"),
    ("ping", "ping_reply"),
])
def test_reply_type(request_type: str, expected: str) -> None:
    assert reply_type(request_type) == expected


def test_every_served_request_has_a_distinct_reply_type() -> None:
    replies = [reply_type(t) for t in protocol.CONTROL_REQUESTS]
    assert len(set(replies)) == len(protocol.CONTROL_REQUESTS)
    assert set(protocol.SHELL_REQUESTS) <= set(protocol.CONTROL_REQUESTS)
    assert protocol.REGISTRATION_REPLY == reply_type(protocol.REGISTRATION_REQUEST)


@pytest.mark.parametrize("int_id, kind, expected", [
    (0, "stdout", b"engine.0.stdout"),
    (3, "pyin", b"engine.3.pyin"),
    (12, "pyerr", b"engine.12.pyerr"),
    (-1, "pyout", b"engine.-1.pyout"),
])
def test_topic(int_id: int, kind: str, expected: bytes) -> None:
    assert topic(int_id, kind) == expected


def test_new_id_is_a_fresh_uuid4() -> None:
    ids = {protocol.new_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(uuid.UUID(i).version == 4 for i in ids)


def test_new_ids_do_not_follow_the_random_module() -> None:
    import random
    random.seed(42)
    first = protocol.new_id()
    random.seed(42)
    assert protocol.new_id() != first  # user code seeding random cannot make ids repeat


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_new_ids_differ_in_a_forked_child() -> None:
    read, write = os.pipe()
    with warnings.catch_warnings():  # the child only writes and leaves: no lock is needed
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: its next id, then leave at once
        os.write(write, protocol.new_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 100).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert uuid.UUID(child).version == 4
    assert child != protocol.new_id()


def test_now_is_the_local_time_in_the_legacy_format() -> None:
    before = datetime.now()
    stamp = protocol.now()
    after = datetime.now()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}", stamp)
    assert before.replace(microsecond=0) <= datetime.strptime(stamp, protocol.DATE_FORMAT) <= after


def test_msg_header_fields() -> None:
    before = datetime.now().replace(microsecond=0)
    h = protocol.msg_header("id-1", "execute_request", "alice", "sess")
    assert h["msg_id"] == "id-1" and h["msg_type"] == "execute_request"
    assert h["username"] == "alice" and h["session"] == "sess"
    assert set(h) == {"msg_id", "msg_type", "username", "session", "date"}
    # the date is the current local time, and goes on the wire in the legacy format
    packed = unpack(pack(h["date"]))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}", packed)
    assert before <= datetime.strptime(packed, protocol.DATE_FORMAT) <= datetime.now()


def test_extract_header() -> None:
    header = {"msg_id": "a", "msg_type": "t"}
    assert protocol.extract_header(None) == {}
    assert protocol.extract_header({}) == {}
    got = protocol.extract_header({"header": header, "content": {}})
    assert got == header and got is not header
    got = protocol.extract_header(header)
    assert got == header and got is not header


# -- pack ---------------------------------------------------------------------------

def test_pack_uses_compact_separators() -> None:
    assert pack({"a": [1, 2, {"b": None}], "c": True}) == b'{"a":[1,2,{"b":null}],"c":true}'
    assert b" " not in pack({"x": [1, 2, 3], "y": {"z": 1}})


def test_pack_escapes_non_ascii_as_u_escapes() -> None:
    packed = pack({"s": "caf\u00e9 \u2603 \U0001f600"})
    assert packed == b'{"s":"caf\\u00e9 \\u2603 \\ud83d\\ude00"}'
    assert all(b < 0x80 for b in packed)
    assert isinstance(packed, bytes)
    assert json.loads(packed) == {"s": "caf\u00e9 \u2603 \U0001f600"}


@pytest.mark.parametrize("dt, text", [
    (datetime(2011, 7, 31, 12, 30, 5, 123456), "2011-07-31T12:30:05.123456"),
    (datetime(2011, 7, 31, 12, 30, 5), "2011-07-31T12:30:05.000000"),
    (datetime(2024, 1, 2, 3, 4, 5, 7), "2024-01-02T03:04:05.000007"),
    (datetime(1999, 12, 31, 23, 59, 59, 999999), "1999-12-31T23:59:59.999999"),
])
def test_pack_dates_always_have_six_microsecond_digits(dt: datetime, text: str) -> None:
    assert pack(dt) == ('"%s"' % text).encode()
    assert pack({"header": {"date": dt}}) == ('{"header":{"date":"%s"}}' % text).encode()
    assert re.fullmatch(r'"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}"', pack(dt).decode())


def test_pack_sets_tuples_and_bytes() -> None:
    assert pack((1, 2)) == b"[1,2]"
    assert sorted(json.loads(pack({3, 1, 2}))) == [1, 2, 3]
    assert json.loads(pack(frozenset(["a"]))) == ["a"]
    assert pack(b"abc") == b'"abc"'
    assert pack(b"\xff") == b'"\\ufffd"'


def test_pack_refuses_what_json_cannot_hold() -> None:
    with pytest.raises(TypeError):
        pack({"x": object()})
    with pytest.raises(TypeError):
        pack({"x": 1j})


# -- extract_dates / unpack -------------------------------------------------------------

def test_extract_dates_turns_date_strings_into_datetimes_recursively() -> None:
    obj = {
        "date": "2011-07-31T12:30:05.123456",
        "nested": {"list": ["2011-07-31T12:30:05.000001", "not a date", 5, None]},
        "short": "2011-07-31T12:30:05.5",
    }
    got = extract_dates(obj)
    assert got["date"] == datetime(2011, 7, 31, 12, 30, 5, 123456)
    assert got["nested"]["list"] == [datetime(2011, 7, 31, 12, 30, 5, 1), "not a date", 5, None]
    assert got["short"] == datetime(2011, 7, 31, 12, 30, 5, 500000)
    assert obj["date"] == "2011-07-31T12:30:05.123456", "the input must not be modified"


@pytest.mark.parametrize("text", [
    "2011-07-31",                       # no time
    "2011-07-31T12:30:05",              # no fraction
    "2011-07-31 12:30:05.123456",       # space, not T
    "x2011-07-31T12:30:05.123456",      # prefix
    "2011-07-31T12:30:05.123456Z",      # zone
    "2011-07-31T12:30:05.123456\n",     # trailing newline
    "2011-13-31T12:30:05.123456",       # month 13: matches the pattern, is no date
    "2011-07-31T12:30:05.1234567",      # seven digits
])
def test_extract_dates_leaves_other_strings_alone(text: str) -> None:
    assert extract_dates({"d": text}) == {"d": text}


def test_extract_dates_leaves_keys_alone() -> None:
    key = "2011-07-31T12:30:05.123456"
    assert extract_dates({key: 1}) == {key: 1}


def test_dates_round_trip_through_pack_and_extract_dates() -> None:
    dt = datetime(2011, 7, 31, 12, 30, 5, 42)
    assert extract_dates(unpack(pack({"date": dt}))) == {"date": dt}


def test_unpack_accepts_bytes_memoryview_and_str() -> None:
    for data in (b'{"a":1}', memoryview(b'{"a":1}'), '{"a":1}', bytearray(b'{"a":1}')):
        assert unpack(data) == {"a": 1}  # type: ignore[arg-type]


def test_unpack_keeps_date_strings_as_strings() -> None:
    assert unpack(b'{"date":"2011-07-31T12:30:05.123456"}') == {
        "date": "2011-07-31T12:30:05.123456"}


def test_unpack_reads_escaped_and_raw_utf8() -> None:
    assert unpack(b'{"s":"caf\\u00e9"}') == {"s": "caf\u00e9"}
    assert unpack('{"s":"caf\u00e9"}'.encode("utf-8")) == {"s": "caf\u00e9"}


def test_pack_unpack_round_trip() -> None:
    obj = {"a": [1, 2.5, "x\u00e9", None, True, {"b": []}], "msg_id": protocol.new_id()}
    assert unpack(pack(obj)) == obj


def test_unpack_accepts_whitespace_around_the_value() -> None:
    assert unpack(b' \n{"a": [1, 2]}\t ') == {"a": [1, 2]}
    assert unpack(b'{"a":1}\n') == {"a": 1}


@pytest.mark.parametrize("data, error", [
    (b"not json", ValueError),
    (b"", ValueError),
    (b"   ", ValueError),
    (b'{"a":', ValueError),
    (b'{"a":1} {"b":2}', ValueError),
    (b'{"a":1}x', ValueError),
    (b"\xff\xfe", UnicodeDecodeError),
])
def test_unpack_errors(data: bytes, error: type) -> None:
    with pytest.raises(error):
        unpack(data)


def test_public_names() -> None:
    assert protocol.DELIM == b"<IDS|MSG>"
    assert (protocol.SIGNATURE, protocol.HEADER, protocol.PARENT, protocol.CONTENT) == (0, 1, 2, 3)
    assert protocol.MIN_FRAMES == 4
    assert protocol.DATE_FORMAT == "%Y-%m-%dT%H:%M:%S.%f"


def test_extract_dates_handles_any_depth_unpack_accepts() -> None:
    # json accepts this depth, so a received message can hold it
    depth = 800
    data = unpack(("[" * depth + '"2011-07-31T12:30:05.000001"' + "]" * depth).encode())
    got = extract_dates(data)
    for _ in range(depth):
        got = got[0]
    assert got == datetime(2011, 7, 31, 12, 30, 5, 1)
