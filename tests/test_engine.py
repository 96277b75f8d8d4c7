"""The engine process: registration, heartbeat, serving, exit codes, config errors."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from streamkernel.testing import StubHub

from .legacy_env import kill, py3_env

pytestmark = pytest.mark.integration


def run_engine(config_path, *args):
    return subprocess.Popen([sys.executable, "-m", "streamkernel", "--config", str(config_path),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=py3_env())


def start_engine(hub, tmp_path, procs, *args):
    """Start an engine for ``hub``; return (process, engine id) once it heartbeats."""
    proc = run_engine(hub.write_connection_file(tmp_path / "engine.json"), *args)
    procs.append(proc)
    eid = hub.register()
    hub.wait_beating(eid)
    return proc, eid


@pytest.fixture
def hub():
    h = StubHub(heartbeat_period=0.2)
    yield h
    h.close()


@pytest.fixture
def procs():
    started = []
    yield started
    for p in started:
        kill(p)
        p.stdout.close()
        p.stderr.close()


def test_registers_heartbeats_serves_and_shuts_down(hub, tmp_path, procs):
    proc = run_engine(hub.write_connection_file(tmp_path / "engine.json"))
    procs.append(proc)
    eid = hub.register()
    reg = hub.last_registration
    uuid = reg["content"]["queue"]
    assert reg["content"] == {"queue": uuid, "heartbeat": uuid, "control": uuid}
    assert reg["header"]["session"] == uuid
    hub.wait_beating(eid)
    time.sleep(0.2)
    hub.send(eid, "execute_request", {"code": "x = 6 * 7"})
    reply = hub.recv()
    assert reply["content"] == {"status": "ok"}
    assert reply["idents"] == [uuid.encode(), hub.client_id]
    hub.send(eid, "execute_request", {"code": "x"}, via="task")
    assert hub.recv("task")["content"] == {"status": "ok"}
    hub.send(eid, "shutdown_request", {"restart": False}, via="control")
    assert hub.recv("control")["content"] == {"restart": False, "status": "ok"}
    assert proc.wait(10) == 0
    err = proc.stderr.read().decode()
    assert "registered as engine 0" in err and "Traceback" not in err


def test_no_registration_reply_exits_255(hub, tmp_path, procs):
    proc = run_engine(hub.write_connection_file(tmp_path / "engine.json"), "--timeout", "0.5")
    procs.append(proc)
    assert proc.wait(10) == 255
    err = proc.stderr.read().decode()
    assert "registration timed out after 0.5 s" in err and "Traceback" not in err
    sock = hub.sockets["registration"]
    msgs = []
    while sock.poll(500):
        msgs.append(hub.session.recv(sock, mode=0)[1]["msg_type"])
    # no unregistration_request {"id": None}: a 0.11 hub fails on it (KeyError) and stops
    assert msgs == ["registration_request"]


def test_refused_registration_exits_3(hub, tmp_path, procs):
    proc = run_engine(hub.write_connection_file(tmp_path / "engine.json"))
    procs.append(proc)
    hub.register(refuse=True)
    assert proc.wait(10) == 3
    assert "registration refused by the hub: KeyError: queue_id in use" in proc.stderr.read().decode()


@pytest.mark.parametrize("change", [
    {"id": float("inf")},                      # int() raises OverflowError
    {"id": "zero"},
    {"heartbeat": "ab"},                       # two one-letter "addresses"
    {"heartbeat": ["pgm://x", "tcp://127.0.0.1:1"]},
    {"mux": "tcp://no such host:1"},
])
def test_unusable_registration_reply_exits_3(hub, tmp_path, procs, change):
    proc = run_engine(hub.write_connection_file(tmp_path / "engine.json"),
                      "--heartbeat-timeout", "30")
    procs.append(proc)
    sock = hub.sockets["registration"]
    assert sock.poll(10000)
    idents, msg = hub.session.recv(sock, mode=0)
    content = {"status": "ok", "id": 0, "mux": hub.urls["mux"], "task": hub.urls["task"],
               "control": hub.urls["control"], "iopub": hub.urls["iopub"],
               "heartbeat": [hub.urls["ping"], hub.urls["pong"]], **change}
    hub.session.send(sock, "registration_reply", content, ident=idents)
    assert proc.wait(10) == 3
    err = proc.stderr.read().decode()
    assert "unusable registration reply" in err and "Traceback" not in err


def test_heartbeat_loss_exits_4(hub, tmp_path, procs):
    proc, eid = start_engine(hub, tmp_path, procs, "--heartbeat-timeout", "1")
    hub.beating.clear()
    start = time.monotonic()
    assert proc.wait(10) == 4
    assert time.monotonic() - start < 9  # well before the default of 10 s
    assert "no heartbeat from the hub" in proc.stderr.read().decode()


def test_sigterm_while_idle_exits_0(hub, tmp_path, procs):
    proc, eid = start_engine(hub, tmp_path, procs)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(10) == 0


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"),
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"exec_key": "k"}', "missing key 'url'"),
    ('{"url": "tcp://127.0.0.1:1", "exec_key": "k", "locaton": "x"}',
     "unknown key 'locaton' (did you mean 'location'?)"),
    ('{"url": "tcp://127.0.0.1:1", "exec_key": ""}', "exec_key is empty"),
    ('{"url": "tcp://127.0.0.1:1", "exec_key": 5}', "exec_key must be a str"),
    ('{"url": "pgm://127.0.0.1;239.192.1.1:5555", "exec_key": "k"}', "cannot connect to url"),
    ('{"url": "tcp://*:5555", "exec_key": "k", "location": "10.0.0.5 "}',
     "location '10.0.0.5 ' is not a host name or an IP address"),
    ('{"url": "tcp://*:5555", "exec_key": "k", "location": "my host"}',
     "location 'my host' is not a host name or an IP address"),
    ('{"url": "tcp://127.0.0.1:1", "exec_key": "k", "busy_poll_us": 100001}',
     "busy_poll_us must be from 0 to 100000 microseconds, not 100001"),
])
def test_config_errors_are_one_line_and_exit_1(tmp_path, procs, content, message):
    path = tmp_path / "engine.json"
    if content is not None:
        path.write_text(content)
    proc = run_engine(path)
    procs.append(proc)
    assert proc.wait(10) == 1
    err = proc.stderr.read().decode()
    assert message in err
    assert err.count("\n") == 1 and err.startswith("streamkernel: ")


def test_version_and_help():
    out = subprocess.run([sys.executable, "-m", "streamkernel", "--version"],
                         capture_output=True, text=True, env=py3_env())
    assert out.returncode == 0 and out.stdout.startswith("streamkernel ")
    out = subprocess.run([sys.executable, "-m", "streamkernel", "--help"],
                         capture_output=True, text=True, env=py3_env())
    assert out.returncode == 0 and "--config" in out.stdout and "--insecure" in out.stdout


HUGE = "1" + "0" * 400  # an int too large for a float


@pytest.mark.parametrize("option, value, message", [
    ("--busy-poll-us", "-1", "'-1' must be >= 0"),
    ("--busy-poll-us", "100001", "'100001' must be at most 100000"),
    ("--busy-poll-us", HUGE, "must be at most 100000"),
    ("--busy-poll-us", "2.5", "'2.5' is not a number"),
    ("--registration-retries", HUGE, None),  # a valid count: the config is read next
    ("--timeout", HUGE, "is not a finite number"),
    ("--timeout", "nan", "'nan' is not a finite number"),
    ("--heartbeat-timeout", "inf", "'inf' is not a finite number"),
])
def test_bad_numbers_on_the_command_line_are_one_line_and_exit_2(tmp_path, option, value,
                                                                   message):
    out = subprocess.run([sys.executable, "-m", "streamkernel", "--config",
                          str(tmp_path / "none.json"), option, value],
                         capture_output=True, text=True, env=py3_env(), timeout=30)
    last = out.stderr.strip().splitlines()[-1]
    if message is None:
        assert out.returncode == 1 and last.startswith("streamkernel: cannot read")
    else:  # argparse's usage, then one line
        assert out.returncode == 2 and last.startswith("streamkernel: error: ") and message in last
    assert "Traceback" not in out.stderr


def test_sigint_interrupts_running_code_and_exits_when_idle(hub, tmp_path, procs):
    proc, eid = start_engine(hub, tmp_path, procs)
    time.sleep(0.2)
    hub.send(eid, "execute_request", {"code": "import time\nwhile True: time.sleep(0.01)"})
    time.sleep(0.3)
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGINT)
    reply = hub.recv(timeout=5)
    latency = time.monotonic() - t0
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    assert latency < 10  # the loop never ends by itself
    frames = "".join(reply["content"]["traceback"])
    assert '"<streamkernel>"' in frames and "streamkernel/" not in frames  # the user's only
    abort_id = hub.send(eid, "execute_request", {"code": "while True: time.sleep(0.01)"})
    time.sleep(0.3)
    hub.send(eid, "abort_request", {"msg_ids": [abort_id]}, via="control")
    assert hub.recv("control")["content"] == {"status": "ok"}
    reply = hub.recv(timeout=5)
    assert reply["content"]["evalue"].startswith("aborted by abort_request")
    assert "streamkernel/" not in "".join(reply["content"]["traceback"])
    hub.send(eid, "execute_request", {"code": "ok = 1"})
    assert hub.recv()["content"] == {"status": "ok"}
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(10) == 0
    assert "interrupted while idle" in proc.stderr.read().decode()


def test_log_file_and_log_url(hub, tmp_path, procs, socket):
    import zmq
    sub = socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    port = sub.bind_to_random_port("tcp://127.0.0.1")
    log_file = tmp_path / "engine.log"
    proc = run_engine(hub.write_connection_file(tmp_path / "engine.json", log_level="DEBUG"),
                      "--log-level", "INFO", "--log-file", str(log_file),
                      "--log-url", "tcp://127.0.0.1:%d" % port)
    procs.append(proc)
    eid = hub.register()
    hub.wait_beating(eid)
    for _ in range(3):  # a SUB takes in its publishers only when it is used
        sub.poll(100)
    hub.send(eid, "shutdown_request", {}, via="control")
    assert proc.wait(10) == 0
    records = []
    while sub.poll(500):
        topic, text = sub.recv_multipart()
        records.append((topic, text.decode()))
    assert any(t == b"engine.0.INFO" and "shutdown requested" in m for t, m in records), records
    content = log_file.read_text()
    assert "registered as engine 0" in content and "exiting with status 0" in content
    assert "DEBUG" not in content  # --log-level INFO wins over the file's DEBUG
    assert proc.stderr.read() == b""


def test_unwritable_log_file_is_a_config_error(tmp_path, procs):
    config = tmp_path / "engine.json"
    config.write_text('{"url": "tcp://127.0.0.1:1", "exec_key": "k"}')
    proc = run_engine(config, "--log-file", str(tmp_path / "missing" / "x.log"))
    procs.append(proc)
    assert proc.wait(10) == 1
    err = proc.stderr.read().decode()
    assert err.startswith("streamkernel: cannot open log file") and err.count("\n") == 1


def test_registration_retries(hub, tmp_path, procs):
    proc = run_engine(hub.write_connection_file(tmp_path / "engine.json"), "--timeout", "0.5",
                      "--registration-retries", "2")
    procs.append(proc)
    sock = hub.sockets["registration"]
    assert sock.poll(5000)
    _, first = hub.session.recv(sock, mode=0)      # left unanswered
    assert first["msg_type"] == "registration_request"
    eid = hub.register(timeout=5)                   # the retry is answered
    hub.wait_beating(eid)
    hub.send(eid, "execute_request", {"code": "1"})
    assert hub.recv()["content"] == {"status": "ok"}
    hub.send(eid, "shutdown_request", {}, via="control")
    assert proc.wait(10) == 0
    assert "retrying (1 more try)" in proc.stderr.read().decode()


def test_hub_restart_is_detected(tmp_path, procs):
    hub = StubHub(heartbeat_period=0.2)
    try:
        proc = run_engine(hub.write_connection_file(tmp_path / "engine.json"))
        procs.append(proc)
        hub.wait_beating(hub.register())
    finally:
        hub.close()                                 # the hub goes away
    assert proc.wait(10) == 4                       # before the 10 s heartbeat limit
    assert "closed the connection (it stopped or restarted)" in proc.stderr.read().decode()


def test_sigterm_while_user_code_runs_interrupts_it_and_exits_0(hub, tmp_path, procs):
    proc, eid = start_engine(hub, tmp_path, procs)
    time.sleep(0.2)
    hub.send(eid, "execute_request", {"code": "while True: pass"})
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGTERM)
    assert hub.recv(timeout=10)["content"]["ename"] == "KeyboardInterrupt"
    assert proc.wait(10) == 0


def test_heartbeat_goes_on_while_code_holds_the_interpreter_lock(tmp_path, procs):
    hub = StubHub(heartbeat_period=0.1)
    try:
        proc, eid = start_engine(hub, tmp_path, procs, "--heartbeat-timeout", "1")
        time.sleep(0.3)
        ident = hub.engines[eid].encode()
        before = hub.echoes[ident]
        # a regular expression that backtracks for seconds inside C, holding the lock
        code = "import re; re.match('(a+)+$', 'a' * 25 + 'b')"  # one call of about 1.5 s
        hub.send(eid, "execute_request", {"code": code})
        assert hub.recv(timeout=60)["content"] == {"status": "ok"}
        assert hub.echoes[ident] - before >= 5    # pings every 0.1 s were answered
        hub.send(eid, "execute_request", {"code": "1"})
        assert hub.recv()["content"] == {"status": "ok"}
        assert proc.poll() is None                # no false heartbeat loss afterwards
    finally:
        hub.close()
