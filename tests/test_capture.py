"""streamkernel.capture: replay plan, normalisation, comparison and the two scripts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Callable

import pytest

from streamkernel.capture import (DATE, ENGINE, MSG_ID, USERNAME, Capture, Message, compare,
                                  describe_result, normalise, replay_plan, sign)

from .harness import CAPTURES
from .legacy_env import py3_env

SCRIPTS = os.path.join(os.path.dirname(__file__), os.pardir, "scripts")


def load(name: str) -> Capture:
    return Capture.load(os.path.join(CAPTURES, name + ".json"))


def edited(cap: Capture, msg: Message, part: str, change: Callable[[Any], Any]) -> Message:
    """A copy of ``msg`` with ``part`` (header, parent or content) changed and re-signed."""
    i = msg.frames.index(b"<IDS|MSG>")
    frames = list(msg.frames)
    pos = {"header": 2, "parent": 3, "content": 4}[part]
    frames[i + pos] = json.dumps(change(json.loads(frames[i + pos]))).encode()
    frames[i + 1] = sign(cap.exec_key.encode(), frames[i + 2:i + 5])
    return Message(msg.stream, msg.dir, frames, msg.t)


def test_plan_queues_what_was_sent_while_the_engine_was_busy() -> None:
    steps = replay_plan(load("execute_error"))
    first = steps[0].message.msg_id
    assert steps[0].hold and steps[0].hold_on is None and steps[0].after_replies == 0
    assert [s.hold_on for s in steps[1:]] == [first] * 3
    steps = replay_plan(load("abort_queued"))
    assert [s.message.msg_type for s in steps].count("abort_request") == 1
    assert all(s.hold_on == steps[0].message.msg_id for s in steps[1:])
    # sent after the previous reply: waits for it, queues behind nothing
    steps = replay_plan(load("execute_stdout"))
    assert [(s.after_replies, s.hold_on, s.hold) for s in steps] == [(0, None, False),
                                                                     (1, None, False)]


def test_normalise_replaces_only_volatile_values() -> None:
    cap = load("execute_error")
    reply = cap.select("shell", "out")[0]
    n = normalise(reply, cap.engine_ident, cap.exec_key.encode())
    header = n.fields["header"]
    assert (header["msg_id"], header["date"], header["started"]) == (MSG_ID, DATE, DATE)
    assert (header["session"], header["username"]) == (ENGINE, USERNAME)
    assert n.fields["signature"] == "valid"
    assert n.fields["content"]["engine_info"] == {"engine_id": 0, "method": "execute",
                                                  "engine_uuid": ENGINE}
    assert n.fields["content"]["traceback"][1].startswith('  File "<file>", line <n>, in ')
    assert n.fields["parent"] == reply.parent  # the request's header: compared as is
    bad = edited(cap, reply, "header", lambda h: dict(h, date="2026-12-03T12:28:19.0437"))
    assert normalise(bad, cap.engine_ident).fields["header"]["date"] == "2026-12-03T12:28:19.0437"


def test_compare_accepts_the_recorded_messages() -> None:
    cap = load("execute_pyout")
    report = compare(cap, cap.select(direction="out"))
    assert report.ok and report.compared == 3, report.format()


@pytest.mark.parametrize("change, field", [
    (lambda cap, m: edited(cap, m, "content", lambda c: dict(c, status="error")),
     "content.status"),
    (lambda cap, m: edited(cap, m, "header", lambda h: dict(h, started="x")), "header.started"),
    (lambda cap, m: edited(cap, m, "header", lambda h: {k: v for k, v in h.items()
                                                        if k != "started"}), "header.started"),
    (lambda cap, m: edited(cap, m, "header", lambda h: dict(h, status="ok")), "header.status"),
    (lambda cap, m: edited(cap, m, "parent", lambda p: dict(p, date="2026-12-03T12:28:15")),
     "parent.date"),
    (lambda cap, m: Message(m.stream, m.dir, [b"\x00other"] + m.frames[1:]), "prefix[0]"),
    (lambda cap, m: Message(m.stream, m.dir, m.frames[:3] + [b"0" * 32] + m.frames[4:]),
     "signature"),
])
def test_compare_catches_each_kind_of_change(change: Callable, field: str) -> None:
    cap = load("execute_pyout")
    ours = cap.select(direction="out")
    i = next(k for k, m in enumerate(ours) if m.msg_type == "execute_reply")
    ours[i] = change(cap, ours[i])
    report = compare(cap, ours)
    assert [d.field for d in report.differences] == [field], report.format()


def test_compare_catches_missing_extra_and_reordered_messages() -> None:
    cap = load("execute_stdout")
    ours = cap.select(direction="out")
    iopub = [m for m in ours if m.stream == "iopub"]
    for wrong in (ours[:-1], ours + [iopub[0]], [m for m in ours if m.stream != "iopub"]
                  + iopub[::-1]):
        report = compare(cap, wrong)
        assert any(d.field == "sequence" and d.stream == "iopub" for d in report.differences)


def test_results_compare_as_the_value_a_client_unserializes() -> None:
    cap = load("apply_builtin")
    replies = [m for m in cap.select("shell", "out")]
    assert describe_result(replies[0].buffers) == {"result": 5}
    assert describe_result(replies[1].buffers) == {"result": [3, 2, 1]}
    legacy = pytest.importorskip("streamkernel.legacy")
    assert describe_result(legacy.serialize_object([3, 2, 1])) == {"result": [3, 2, 1]}
    assert describe_result(legacy.serialize_object([3, 2, 0])) != {"result": [3, 2, 1]}


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=120, env=py3_env())


@pytest.mark.parametrize("script", ["record_capture.py", "replay_capture.py"])
def test_scripts_have_help(script: str) -> None:
    out = run_script(os.path.join(SCRIPTS, script), "--help")
    assert out.returncode == 0 and "usage:" in out.stdout, out.stderr


@pytest.mark.integration
def test_replay_script_exits_0_only_without_differences(tmp_path: Any) -> None:
    script = os.path.join(SCRIPTS, "replay_capture.py")
    good = os.path.join(CAPTURES, "execute_pyout.json")
    out = run_script(script, good)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK   execute_pyout: 3 messages compared, 0 difference(s)" in out.stdout
    # the same capture claiming that the legacy engine displayed 3: ours differs
    cap = Capture.load(good)
    cap.messages = [edited(cap, m, "content", lambda c: dict(c, data="3"))
                    if m.msg_type == "pyout" else m for m in cap.messages]
    cap.save(str(tmp_path / "execute_pyout.json"))
    out = run_script(script, "--in-process", str(tmp_path / "execute_pyout.json"))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "content.data: expected '3', ours '2'" in out.stdout
