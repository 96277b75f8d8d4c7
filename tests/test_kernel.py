"""The kernel on real sockets: each handler, routing, abort and stop-on-error."""
from __future__ import annotations

import sys
import threading
import time

import pytest

from streamkernel import protocol
from streamkernel.kernel import Kernel, _shutdown_reply
from streamkernel.serialize import deserialize_object, interactive, pack_apply_message

from .harness import CLIENT_ID, ENGINE_ID


def execute(h, code, kind="mux"):
    msg = h.request("execute_request", {"code": code, "silent": False}, kind=kind)
    idents, reply = h.recv(kind)
    assert reply["parent_header"]["msg_id"] == msg["msg_id"]
    return idents, reply


def apply(h, f, *args, kind="mux", **kwargs):
    msg = h.request("apply_request", {}, kind=kind, buffers=pack_apply_message(f, args, kwargs))
    idents, reply = h.recv(kind)
    assert reply["parent_header"]["msg_id"] == msg["msg_id"]
    return reply


def bad_frames(client, code, bad):
    """An execute_request of ``code`` made invalid: forged, unsigned, without a delimiter,
    with cut JSON (signed as sent), or altered after signing (unicode put in)."""
    frames = client.serialize(client.msg("execute_request", {"code": code}), [CLIENT_ID])
    delim = frames.index(protocol.DELIM)
    if bad == "forged":
        frames[delim + 1] = b"0" * 32
    elif bad == "unsigned":
        frames[delim + 1] = b""
    elif bad == "no delimiter":
        del frames[delim]
    elif bad == "not json":
        frames[delim + 4] = "{\"code\": \"\u00e9".encode()  # cut JSON, signed as sent
        frames[delim + 1] = client.sign(frames[delim + 2:delim + 5])
    else:
        frames[delim + 4] = frames[delim + 4].replace(b"ran", "r\u00e9n".encode())
    return frames


def test_execute_ok_routes_back_through_the_full_prefix(harness):
    # the engine sent [mux peer id, client id, ...]: the peer id routed it to the MUX hub
    idents, reply = execute(harness, "a = 5")
    assert idents == [CLIENT_ID]
    assert reply["msg_type"] == "execute_reply"
    assert reply["content"] == {"status": "ok"}
    assert set(reply["header"]) == {"msg_id", "msg_type", "username", "session", "date",
                                    "started"}
    assert reply["header"]["session"] == ENGINE_ID


def test_execute_runs_all_statements_and_publishes_output_before_reply(harness):
    execute(harness, "a = 5")
    _, reply = execute(harness, "print(a * 2)\nimport sys; print('e', file=sys.stderr)\na + 1")
    assert reply["content"]["status"] == "ok"
    pub = harness.iopub()
    kinds = [(topic, m["msg_type"]) for topic, m in pub]
    assert kinds[-4:] == [(b"engine.0.pyin", "pyin"), (b"engine.0.stdout", "stream"),
                          (b"engine.0.stderr", "stream"), (b"engine.0.pyout", "pyout")]
    assert pub[-3][1]["content"] == {"name": "stdout", "data": "10\n"}
    assert pub[-1][1]["content"] == {"data": "6"}
    assert all(m["parent_header"]["msg_id"] == reply["parent_header"]["msg_id"]
               for _, m in pub[-4:])


def test_execute_error_aborts_what_is_queued(harness):
    msgs = [harness.request("execute_request", {"code": c})
            for c in ("import time; time.sleep(0.3); 1/0", "x1 = 1", "x2 = 2")]
    replies = [harness.recv()[1] for _ in msgs]
    assert [r["parent_header"]["msg_id"] for r in replies] == [m["msg_id"] for m in msgs]
    first = replies[0]["content"]
    assert first["status"] == "error" and first["ename"] == "ZeroDivisionError"
    assert first["engine_info"] == {"engine_uuid": ENGINE_ID, "engine_id": 0,
                                    "method": "execute"}
    for r in replies[1:]:
        assert r["content"] == {"status": "aborted"}
        assert r["header"]["status"] == "aborted"
    _, reply = execute(harness, "x3 = 3")
    assert reply["content"]["status"] == "ok"


def test_apply_lambda_sees_engine_namespace_via_mux_and_task(harness):
    execute(harness, "a = 5")
    for kind in ("mux", "task"):
        reply = apply(harness, interactive(lambda: a), kind=kind)  # noqa: F821
        assert reply["header"]["status"] == "ok"
        assert reply["header"]["engine"] == ENGINE_ID
        assert reply["header"]["dependencies_met"] is True
        assert deserialize_object(reply["buffers"])[0] == 5


def test_apply_error_does_not_abort_the_queue(harness):
    harness.request("apply_request", {}, buffers=pack_apply_message(lambda: 1 / 0, (), {}))
    harness.request("execute_request", {"code": "y = 1"})
    _, r1 = harness.recv()
    _, r2 = harness.recv()
    assert r1["content"]["ename"] == "ZeroDivisionError"
    assert r1["header"]["status"] == "error"
    assert r2["content"]["status"] == "ok"


def test_unmet_dependency_sets_header_flag(harness):
    def f():
        from streamkernel.errors import UnmetDependency
        raise UnmetDependency()
    reply = apply(harness, f)
    assert reply["header"]["dependencies_met"] is False
    assert reply["header"]["status"] == "error"


def test_abort_by_msg_id_and_abort_all(harness):
    first = harness.request("execute_request", {"code": "import time; time.sleep(0.3)"})
    second = harness.request("execute_request", {"code": "z = 1"})
    harness.request("abort_request", {"msg_ids": [second["msg_id"]]}, kind="control")
    _, r1 = harness.recv()
    _, abort_reply = harness.recv("control")
    _, r2 = harness.recv()
    assert r1["parent_header"]["msg_id"] == first["msg_id"]
    assert abort_reply["content"] == {"status": "ok"}
    assert r2["content"] == {"status": "aborted"} and r2["header"]["status"] == "aborted"
    harness.request("abort_request", {}, kind="control")
    _, r3 = harness.recv("control")
    assert r3["content"] == {"status": "ok"}


def hold_the_loop(h, seconds=0.5):
    """Keep the kernel's loop busy for ``seconds``, so what is sent meanwhile waits."""
    busy = threading.Event()
    h.loop.add_callback(lambda: (busy.set(), time.sleep(seconds)))
    assert busy.wait(5)


@pytest.mark.parametrize("control", [
    ("abort_request", {}, {"status": "ok"}),
    ("shutdown_request", {"restart": False}, {"status": "ok", "restart": False}),
])
def test_abort_all_and_shutdown_answer_every_waiting_request_in_order(harness, control):
    # the first waiting request is already off its socket when control is served
    msg_type, content, expected = control
    hold_the_loop(harness)
    sent = [harness.request("execute_request", {"code": "ran = %d" % i}) for i in range(3)]
    harness.request(msg_type, content, kind="control")
    replies = [harness.recv()[1] for _ in sent]
    assert [r["parent_header"]["msg_id"] for r in replies] == [m["msg_id"] for m in sent]
    assert [r["content"] for r in replies] == [{"status": "aborted"}] * 3
    assert harness.recv("control")[1]["content"] == expected
    assert "ran" not in harness.kernel.user_ns


@pytest.mark.parametrize("bad", ["forged", "unsigned", "no delimiter", "not json"])
def test_abort_all_drops_a_bad_message_it_finds_first_and_aborts_the_rest(harness, bad):
    # the bad message is the one already off its socket when control is served
    hold_the_loop(harness)
    harness.send_frames("mux", bad_frames(harness.client, "ran = -1", bad))
    sent = [harness.request("execute_request", {"code": "ran = %d" % i}) for i in range(2)]
    harness.request("abort_request", {}, kind="control")
    replies = [harness.recv()[1] for _ in sent]
    assert [r["parent_header"]["msg_id"] for r in replies] == [m["msg_id"] for m in sent]
    assert [r["content"] for r in replies] == [{"status": "aborted"}] * 2
    assert harness.recv("control")[1]["content"] == {"status": "ok"}
    _, reply = execute(harness, "ran = 'after'")  # nothing else was left to answer
    assert reply["content"] == {"status": "ok"}
    assert harness.kernel.user_ns["ran"] == "after"


def test_shell_streams_look_again_only_after_aborted_replies(harness):
    looks = []
    harness.kernel._look_at_shell = lambda: looks.append(1)  # schedules nothing per request
    for _ in range(50):
        execute(harness, "pass")
    execute(harness, "1/0")  # stop on error with nothing waiting
    assert looks == []
    msgs = [harness.request("execute_request", {"code": c})
            for c in ("import time; time.sleep(0.3)", "x = 1")]
    time.sleep(0.1)
    harness.request("abort_request", {}, kind="control")
    harness.recv("control")
    replies = {r["parent_header"]["msg_id"]: r["content"]["status"]
               for r in (harness.recv()[1] for _ in msgs)}
    assert [replies[m["msg_id"]] for m in msgs] == ["ok", "aborted"]
    assert harness.call(lambda: len(looks)) == 1


@pytest.mark.timeout(60)
def test_aborts_of_everything_waiting_amid_requests_never_stall_the_shell_queue(harness):
    # an abort from control receives and sends on the shell socket, which takes the
    # wake-up of a shell message that came meanwhile: it must still be served
    sent = received = 0
    while received < 20000:
        while sent - received < 8:
            harness.request("execute_request", {"code": "pass"})
            sent += 1
            if sent % 20 == 0:
                harness.request("abort_request", {}, kind="control")
        harness.recv(timeout=5)
        received += 1


def test_abort_naming_the_first_waiting_request_keeps_the_rest(harness):
    hold_the_loop(harness)
    sent = [harness.request("execute_request", {"code": "ran = %d" % i}) for i in range(3)]
    harness.request("abort_request", {"msg_ids": [sent[0]["msg_id"]]}, kind="control")
    replies = [harness.recv()[1] for _ in sent]
    assert [r["parent_header"]["msg_id"] for r in replies] == [m["msg_id"] for m in sent]
    assert [r["content"]["status"] for r in replies] == ["aborted", "ok", "ok"]
    assert harness.kernel.user_ns["ran"] == 2


def test_clear_resets_namespace_and_reruns_exec_lines(make_harness):
    h = make_harness(exec_lines=["base = 42"])
    execute(h, "v = 1")
    h.request("clear_request", {}, kind="control")
    _, r = h.recv("control")
    assert r["msg_type"] == "clear_reply" and r["content"] == {"status": "ok"}
    _, r = execute(h, "v")
    assert r["content"]["ename"] == "NameError"
    _, r = execute(h, "assert base == 42")
    assert r["content"]["status"] == "ok"


def test_complete_request(harness):
    execute(harness, "my_variable = 1")
    harness.request("complete_request", {"text": "my_va", "line": "x = my_va", "block": None})
    _, r = harness.recv()
    assert r["msg_type"] == "complete_reply"
    assert r["content"] == {"matches": ["my_variable"], "status": "ok"}
    harness.request("complete_request", {"line": "print(le", "cursor_pos": 8})
    _, r = harness.recv()
    assert "len(" in r["content"]["matches"]
    harness.request("complete_request", {})
    _, r = harness.recv()
    assert r["content"]["status"] == "ok"


@pytest.mark.timeout(30)
def test_complete_request_with_a_long_line_answers_at_once(harness):
    """The token before the cursor is found in time linear in the line's length (a
    search for it from the front took minutes for 200k characters)."""
    execute(harness, "my_variable = 1")
    harness.request("complete_request", {"text": "", "line": "a" * 200_000 + "!my_va"})
    _, r = harness.recv(timeout=20)
    assert r["content"] == {"matches": ["my_variable"], "status": "ok"}
    harness.request("complete_request", {"line": "x." * 100_000 + "!"})
    _, r = harness.recv(timeout=20)
    assert r["content"]["status"] == "ok"


@pytest.mark.parametrize("line, token", [
    ("", ""), ("x = foo.ba", "foo.ba"), ("print(os.pa", "os.pa"), ("a b", "b"),
    ("x = café.nöm", "café.nöm"), ("1+", ""), ("\udcff.x", ".x"), ("a" * 100_000 + "!", ""),
])
def test_the_token_before_the_cursor(line, token):
    from streamkernel.kernel import _last_token
    assert _last_token(line) == token


def test_completions_are_bounded_in_size(harness):
    """Each match repeats the dotted text before its name: a long text completes
    nothing, and all matches together stay within 1 MiB of characters."""
    execute(harness, "class Wide: pass\n"
                     "wide = Wide()\n"
                     "for i in range(1000): setattr(wide, 'a%04d' % i + 'x' * 3000, i)")
    harness.request("complete_request", {"text": "wide.a"})
    _, r = harness.recv()
    matches = r["content"]["matches"]
    assert 300 < len(matches) < 1000 and sum(map(len, matches)) <= 1 << 20
    assert matches[0].startswith("wide.a0000x")
    harness.request("complete_request", {"text": "print.__self__." * 700})  # 10.5k
    _, r = harness.recv()
    assert r["content"] == {"matches": [], "status": "ok"}
    harness.request("complete_request", {"text": "print.__self__." * 600 + "prin"})
    _, r = harness.recv()
    assert r["content"]["matches"] == ["print.__self__." * 600 + "print("]


def test_only_short_code_is_kept_compiled():
    from streamkernel import kernel
    small, large = "x_small = 1", "x_large = 1\n" + "pass\n" * 20_000
    before = kernel._compile_cached.cache_info().currsize
    assert kernel._compile(small) is kernel._compile(small)
    assert kernel._compile(large) is not kernel._compile(large)
    assert kernel._compile_cached.cache_info().currsize <= before + 1


@pytest.mark.timeout(15)
def test_abort_of_many_ids_keeps_the_newest_and_answers_at_once(harness):
    """Ids marked aborted are capped at the newest 100k; trimming the oldest takes
    constant time each (these 500k ids took 26 s)."""
    first = ["old-%d" % i for i in range(250_000)]
    harness.request("abort_request", {"msg_ids": first}, kind="control")
    _, r = harness.recv("control", timeout=12)
    assert r["content"] == {"status": "ok"}
    harness.request("abort_request", {"msg_ids": ["new-%d" % i for i in range(250_000)]},
                    kind="control")
    _, r = harness.recv("control", timeout=12)
    assert r["content"] == {"status": "ok"}
    aborted = harness.kernel.aborted
    assert len(aborted) == 100_000
    assert "new-249999" in aborted and "new-150000" in aborted
    assert "new-149999" not in aborted and "old-249999" not in aborted
    harness.kernel.mark_aborted(["new-150000"] + ["newer-%d" % i for i in range(99_999)])
    assert "new-150000" in aborted and "new-150001" not in aborted  # named again: kept
    _, r = execute(harness, "still = 1")
    assert r["content"] == {"status": "ok"}


def test_abort_of_the_running_request_says_why(harness):
    running = harness.request("execute_request",
                              {"code": "import time\nwhile True: time.sleep(0.01)"})
    time.sleep(0.3)
    abort = harness.request("abort_request", {"msg_ids": [running["msg_id"]]}, kind="control")
    harness.recv("control")
    _, r = harness.recv()
    assert r["content"]["ename"] == "KeyboardInterrupt"
    assert r["content"]["evalue"] == "aborted by abort_request %s" % abort["msg_id"]
    assert "streamkernel/" not in "".join(r["content"]["traceback"])


def test_shutdown_replies_and_calls_host(harness):
    harness.request("shutdown_request", {"restart": False}, kind="control")
    _, r = harness.recv("control")
    assert r["content"] == {"restart": False, "status": "ok"}
    assert harness.shutdown_called.wait(5)


def test_invalid_messages_are_dropped_and_engine_keeps_serving(harness, caplog):
    good = harness.client.serialize(harness.client.msg("execute_request", {"code": "1"}),
                                    [CLIENT_ID])
    forged = list(good)
    forged[3] = b"0" * 32
    harness.send_frames("mux", forged)                       # wrong signature
    harness.send_frames("mux", [CLIENT_ID, b"no delimiter"])  # malformed
    harness.send_frames("mux", good)
    harness.send_frames("mux", good)                          # replay
    _, r = harness.recv()
    assert r["content"]["status"] == "ok"
    assert harness.no_message()


def test_sys_stdout_restored_after_request(harness):
    before = sys.stdout, sys.stderr, sys.displayhook
    execute(harness, "import sys; sys.stdout = None; print_ok = 1")
    time.sleep(0.05)
    assert (sys.stdout, sys.stderr, sys.displayhook) == before


def test_abort_naming_the_running_request_interrupts_it_and_keeps_the_queue(harness):
    running = harness.request("execute_request", {"code": "import time\nfor i in range(3000): time.sleep(0.01)"})
    queued = harness.request("execute_request", {"code": "after = 1"})
    time.sleep(0.3)
    t0 = time.monotonic()
    harness.request("abort_request", {"msg_ids": [running["msg_id"]]}, kind="control")
    _, abort_reply = harness.recv("control")
    _, r1 = harness.recv()
    elapsed = time.monotonic() - t0
    assert abort_reply["content"] == {"status": "ok"}
    assert r1["parent_header"]["msg_id"] == running["msg_id"]
    assert r1["content"]["ename"] == "KeyboardInterrupt"
    assert elapsed < 10  # the code would run 30 s if not interrupted
    _, r2 = harness.recv()
    assert r2["parent_header"]["msg_id"] == queued["msg_id"]
    assert r2["content"] == {"status": "ok"}


def assert_long_request_aborted(h, while_running=lambda: True):
    """A long request is interrupted by an abort_request naming it (served by the watcher)."""
    running = h.request("execute_request", {"code": "import time\nfor i in range(3000): time.sleep(0.01)"})
    time.sleep(0.3)
    assert while_running()
    h.request("abort_request", {"msg_ids": [running["msg_id"]]}, kind="control")
    _, abort_reply = h.recv("control")
    _, r = h.recv()
    assert abort_reply["content"] == {"status": "ok"}
    assert r["content"]["ename"] == "KeyboardInterrupt"


def test_idle_watcher_parks_and_a_request_after_idle_wakes_it(harness):
    watcher = harness.kernel._watcher
    deadline = time.monotonic() + 5
    while not watcher.parked and time.monotonic() < deadline:
        time.sleep(0.01)
    assert watcher.parked  # idle: the control thread waits without waking up
    time.sleep(0.2)
    assert watcher.parked and watcher.is_alive()
    assert_long_request_aborted(harness, lambda: not watcher.parked)


def test_busy_poll_serves_requests_and_control_while_the_loop_waits(make_harness):
    h = make_harness(busy_poll=0.1, shutdown_delay=0.1)
    h.kernel.busy_poll = 30.0  # beyond what Kernel() takes: long enough that nothing races
    execute(h, "a = 1")  # the first request after idle: the kernel sleeps after it
    h.call(lambda: None)
    execute(h, "a += 1")  # one close after another: the kernel busy-polls after this one
    ran = threading.Event()
    h.loop.add_callback(ran.set)  # runs once the busy poll gives the loop back
    _, reply = execute(h, "a += 1")
    assert reply["content"] == {"status": "ok"} and not ran.is_set()
    h.request("abort_request", {"msg_ids": ["later"]}, kind="control")
    _, reply = h.recv("control")
    assert reply["content"] == {"status": "ok"} and not ran.is_set()
    h.request("shutdown_request", {"restart": False}, kind="control")
    _, reply = h.recv("control")  # a shutdown ends the busy poll
    assert reply["content"]["status"] == "ok"
    assert ran.wait(10) and h.shutdown_called.wait(10)


def test_bad_messages_during_a_busy_poll_are_dropped_and_never_run(make_harness):
    h = make_harness(busy_poll=0.1)
    h.kernel.busy_poll = 30.0  # beyond what Kernel() takes: the kernel polls throughout
    execute(h, "ran = []")
    h.call(lambda: None)
    execute(h, "ran.append(0)")  # close to the first: the kernel busy-polls after this one
    for kind in ("mux", "control"):
        for bad in ("forged", "unsigned", "no delimiter", "not json", "altered"):
            h.send_frames(kind, bad_frames(
                h.client, "ran.append('%s %s \u00e9')" % (kind, bad), bad))
    _, reply = execute(h, "ran.append(1)")
    assert reply["content"] == {"status": "ok"}
    assert h.no_message("mux", 0.2) and h.no_message("control", 0.2)
    h.request("shutdown_request", {"restart": False}, kind="control")  # ends the busy poll
    h.recv("control")
    assert h.kernel.user_ns["ran"] == [0, 1]


def test_busy_poll_stops_when_requests_come_further_apart(make_harness):
    h = make_harness(busy_poll=0.1)
    h.kernel.busy_poll = 30.0  # beyond what Kernel() takes: a busy poll would hold call()
    execute(h, "a = 1")
    h.call(lambda: None)  # after a request that came after idle, the loop is free at once
    h.kernel.busy_poll = 0.05
    execute(h, "a = 2")  # close to the first: a busy poll follows, and finds nothing
    time.sleep(0.2)
    assert h.call(lambda: h.kernel._polling) is False
    execute(h, "a = 3")  # 0.2 s after the queue ran dry: no busy poll after this one
    assert h.call(lambda: h.kernel._polling) is False
    _, reply = execute(h, "a")
    assert reply["content"] == {"status": "ok"}


def test_busy_poll_is_off_for_embedding_hosts_unless_asked():
    assert Kernel().busy_poll == 0 and Kernel(busy_poll=0.1).busy_poll == 0.1


@pytest.mark.parametrize("value", [-1, -1e-9, 0.1001, 10**400, float("nan"), float("inf"),
                                   True, "0.001", None])
def test_busy_poll_must_be_a_number_of_seconds_up_to_a_tenth(value):
    with pytest.raises(ValueError, match="busy_poll must be a number of seconds from 0 to 0.1"):
        Kernel(busy_poll=value)


def test_kernel_stopped_and_started_again_serves_and_is_watched(harness):
    kernel, done = harness.kernel, threading.Event()

    def restart():
        kernel.stop()
        kernel.stop()  # twice is harmless
        kernel.start()
        done.set()
    harness.loop.add_callback(restart)
    assert done.wait(5)
    _, r = execute(harness, "restarted = 1")
    assert r["content"] == {"status": "ok"}
    assert_long_request_aborted(harness)


def test_shutdown_while_running_replies_at_once_and_aborts_queue(harness):
    running = harness.request("execute_request", {"code": "import time\nfor i in range(3000): time.sleep(0.01)"})
    queued = harness.request("execute_request", {"code": "after = 1"})
    time.sleep(0.3)
    t0 = time.monotonic()
    harness.request("shutdown_request", {"restart": False}, kind="control")
    _, sd = harness.recv("control")
    assert time.monotonic() - t0 < 10  # answered while the 30 s request still runs
    assert sd["content"] == {"restart": False, "status": "ok"}
    replies = {}
    for _ in range(2):
        _, r = harness.recv()
        replies[r["parent_header"]["msg_id"]] = r
    assert replies[queued["msg_id"]]["content"] == {"status": "aborted"}
    assert replies[running["msg_id"]]["content"]["ename"] == "KeyboardInterrupt"
    assert harness.shutdown_called.wait(5)
    assert time.monotonic() - t0 < 15


@pytest.mark.parametrize("running", [False, True])
@pytest.mark.parametrize("msg_ids", [5, True, 1.5, {"a": 1}, [["x"]], [None]])
def test_abort_with_unusable_msg_ids_gets_an_error_reply(harness, running, msg_ids):
    if running:  # answered by the control thread
        harness.request("execute_request", {"code": "import time; time.sleep(0.4)"})
        time.sleep(0.15)
    harness.request("abort_request", {"msg_ids": msg_ids}, kind="control")
    _, r = harness.recv("control")
    assert r["msg_type"] == "abort_reply"
    assert r["content"]["status"] == "error" and r["content"]["ename"] == "MessageError"
    assert "msg_ids" in r["content"]["evalue"]
    if running:
        _, r = harness.recv()
        assert r["content"] == {"status": "ok"}  # the running request was left alone
    _, r = execute(harness, "1")
    assert r["content"] == {"status": "ok"}


def test_shutdown_reply_echoes_content_or_falls_back_to_status_and_restart():
    assert _shutdown_reply({"restart": True, "x": [1]}) == {"restart": True, "x": [1],
                                                           "status": "ok"}
    deep: dict = {"restart": False}
    node = deep
    for _ in range(100_000):  # too deep to encode
        node["x"] = {}
        node = node["x"]
    assert _shutdown_reply(deep) == {"restart": False, "status": "ok"}
    assert _shutdown_reply({"restart": "yes", "n": object()}) == {"status": "ok"}


@pytest.mark.parametrize("running", [False, True])
def test_shutdown_goes_on_when_its_reply_cannot_be_sent(harness, running, monkeypatch):
    if running:  # answered by the control thread
        harness.request("execute_request", {"code": "import time\nfor i in range(3000): time.sleep(0.01)"})
        time.sleep(0.3)
    kernel = harness.kernel
    reply = kernel._reply
    failed = []

    def failing_reply(stream, parent, content, *args, **kwargs):
        if parent["msg_type"] == "shutdown_request" and not failed:
            failed.append(parent["msg_id"])
            raise OSError("cannot send")
        return reply(stream, parent, content, *args, **kwargs)

    monkeypatch.setattr(kernel, "_reply", failing_reply)
    harness.request("shutdown_request", {"restart": False}, kind="control")
    _, r = harness.recv("control")  # the error reply that followed the failed one
    assert r["msg_type"] == "shutdown_reply" and r["content"]["status"] == "error"
    assert failed
    assert harness.shutdown_called.wait(10)


def test_control_clear_during_a_long_request_waits_for_it(harness):
    harness.request("execute_request", {"code": "import time; time.sleep(0.4); v = 1"})
    time.sleep(0.1)
    harness.request("clear_request", {}, kind="control")
    _, r = harness.recv()
    assert r["content"] == {"status": "ok"}
    _, c = harness.recv("control")
    assert c["content"] == {"status": "ok"}
    _, r = execute(harness, "v")
    assert r["content"]["ename"] == "NameError"


def test_endless_output_is_streamed_in_bounded_chunks_and_abort_still_stops_it(harness):
    from streamkernel.outstream import CHUNK_SIZE
    running = harness.request("execute_request", {"code": "while True: print('x' * 999)"})
    time.sleep(0.5)
    harness.request("abort_request", {"msg_ids": [running["msg_id"]]}, kind="control")
    _, abort_reply = harness.recv("control")
    _, reply = harness.recv()
    assert abort_reply["content"] == {"status": "ok"}
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    chunks = [m["content"]["data"] for _, m in harness.iopub() if m["msg_type"] == "stream"]
    assert len(chunks) > 3 and max(map(len, chunks)) <= CHUNK_SIZE
    _, r = execute(harness, "still = 'serving'")
    assert r["content"] == {"status": "ok"}
