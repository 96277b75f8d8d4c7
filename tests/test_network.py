"""Engines on other hosts: address resolution, ssh tunnels, CURVE, and namespaced hosts.

The multi-host tests build hosts from Linux network namespaces joined by veth
pairs (a bridge in the hub's namespace) and skip, saying why, when that is not
permitted. The ssh tests also need ``sshd`` on the machine.
"""
from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import zmq

from streamkernel import config as config_module
from streamkernel.config import EngineConfig, disambiguate_url, is_local_address
from streamkernel.errors import ConfigError
from streamkernel.testing import StubHub
from streamkernel.tunnel import Tunnel, TunnelError, Tunnels, split_server, split_tcp_url

from .legacy_env import kill, py3_env

REPO = Path(__file__).resolve().parent.parent
SUBNET = "10.71.0"
HUB_IP = SUBNET + ".1"
#: Identifies the engine that ran a request: its address towards the hub, and its pid.
WHOAMI = ("import os, socket as _s\n_u = _s.socket(_s.AF_INET, _s.SOCK_DGRAM)\n"
          "_u.connect((%r, 9))\n(_u.getsockname()[0], os.getpid())" % HUB_IP)


# -- address resolution ---------------------------------------------------------------------

def _outward_address() -> str | None:
    """This host's address on its default route, if it has one (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            return str(s.getsockname()[0])
    except OSError:
        return None


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.2.1", "localhost", "LOCALHOST", "::1",
                                  "[::1]", "0.0.0.0", socket.gethostname()])
def test_is_local_address_for_loopback_and_this_host(host: str) -> None:
    assert is_local_address(host)


@pytest.mark.parametrize("host", ["", "192.0.2.1", "198.51.100.7", "2001:db8::1",
                                  "hub.example.org", "not an address"])
def test_is_local_address_for_other_hosts(host: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_dns(*args: Any) -> Any:
        raise AssertionError("looked up a name")
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(socket, "gethostbyname_ex", no_dns)
    assert not is_local_address(host)


def test_is_local_address_finds_interface_addresses() -> None:
    address = _outward_address()
    if address is None or address.startswith("127."):
        pytest.skip("this host has no non-loopback IPv4 address on a default route")
    assert is_local_address(address)
    assert disambiguate_url("tcp://*:5555", address) == "tcp://127.0.0.1:5555"


@pytest.mark.parametrize("url, location, expected", [
    ("tcp://*:5555", "192.0.2.10", "tcp://192.0.2.10:5555"),
    ("tcp://0.0.0.0:5555", "192.0.2.10", "tcp://192.0.2.10:5555"),
    ("tcp://[::]:5555", "2001:db8::5", "tcp://[2001:db8::5]:5555"),
    ("tcp://*:5555", "[2001:db8::5]", "tcp://[2001:db8::5]:5555"),
    ("tcp://*:5555", "127.0.0.1", "tcp://127.0.0.1:5555"),
    ("tcp://*:5555", "localhost", "tcp://127.0.0.1:5555"),
    ("tcp://*:5555", socket.gethostname(), "tcp://127.0.0.1:5555"),
    ("tcp://*:5555", "", "tcp://127.0.0.1:5555"),
    ("tcp://192.0.2.3:5555", "192.0.2.10", "tcp://192.0.2.3:5555"),
    ("tcp://127.0.0.1:5555", "192.0.2.10", "tcp://127.0.0.1:5555"),
    ("ipc:///tmp/hub", "192.0.2.10", "ipc:///tmp/hub"),
])
def test_disambiguate_url_like_the_legacy_function(url: str, location: str,
                                                   expected: str) -> None:
    assert disambiguate_url(url, location) == expected


def test_disambiguate_url_uses_the_bind_check(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def bindable(host: str) -> bool:
        seen.append(host)
        return host == "192.0.2.44"
    monkeypatch.setattr(config_module, "_bindable", bindable)
    assert disambiguate_url("tcp://*:1", "192.0.2.44") == "tcp://127.0.0.1:1"
    assert disambiguate_url("tcp://*:1", "192.0.2.45") == "tcp://192.0.2.45:1"
    assert seen == ["192.0.2.44", "192.0.2.45"]


# -- configuration of ssh and CURVE ------------------------------------------------------------

def _config(**kw: Any) -> EngineConfig:
    return EngineConfig(url="tcp://127.0.0.1:1", exec_key="k", **kw)


def test_remote_settings_default_off() -> None:
    cfg = _config()
    assert cfg.ssh == "" and cfg.sshkey == "" and cfg.ssh_command == "ssh"
    assert cfg.curve_serverkey == cfg.curve_publickey == cfg.curve_secretkey == ""


def test_curve_keys_are_checked() -> None:
    server_public, _ = zmq.curve_keypair()
    public, secret = zmq.curve_keypair()
    other_public, _ = zmq.curve_keypair()
    s, p, k = server_public.decode(), public.decode(), secret.decode()
    assert _config(curve_serverkey=s).curve_serverkey == s
    assert _config(curve_serverkey=s, curve_secretkey=k).curve_secretkey == k
    assert _config(curve_serverkey=s, curve_publickey=p, curve_secretkey=k)
    for kw, message in [
        (dict(curve_serverkey="short"), "curve_serverkey must be a Z85"),
        (dict(curve_serverkey=s[:-1] + "~"), "curve_serverkey must be a Z85"),
        (dict(curve_publickey=p, curve_secretkey=k), "need curve_serverkey"),
        (dict(curve_serverkey=s, curve_publickey=p), "curve_publickey needs curve_secretkey"),
        (dict(curve_serverkey=s, curve_publickey=other_public.decode(), curve_secretkey=k),
         "not the public key of curve_secretkey"),
    ]:
        with pytest.raises(ConfigError, match=message) as info:
            _config(**kw)
        assert k not in str(info.value)


@pytest.mark.parametrize("kw, message", [
    (dict(ssh="user@host name"), "ssh"), (dict(ssh_command="  "), "ssh_command is empty"),
    (dict(sshkey=5), "sshkey must be a str"), (dict(curve_serverkey=None), "must be a str"),
])
def test_bad_ssh_settings(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(**kw)


# -- tunnel module, with a stand-in for ssh ---------------------------------------------------

_FAKE_SSH = r"""
import json, sys, time
record, mode, args = sys.argv[1], sys.argv[2], sys.argv[3:]
json.dump(args, open(record, "w"))
if mode == "deny":
    sys.stderr.write("root@hub: Permission denied (publickey).\n")
    sys.exit(255)
marker = [a.split(" ", 1)[1] for a in args if a.startswith("LocalCommand=")][0]
if mode == "ok":
    sys.stderr.write("Warning: Permanently added 'hub' to the list of known hosts.\n")
    print(marker, flush=True)
time.sleep(60)
"""


@pytest.fixture
def fake_ssh(tmp_path: Path) -> Any:
    script = tmp_path / "fake_ssh.py"
    script.write_text(_FAKE_SSH)

    def command(mode: str) -> tuple[str, Path]:
        record = tmp_path / ("args-%s.json" % uuid.uuid4().hex)
        return "%s %s %s %s" % (sys.executable, script, record, mode), record
    return command


@pytest.mark.parametrize("server, expected", [
    ("hub", ("", "hub", None)), ("me@hub", ("me", "hub", None)),
    ("me@hub:2222", ("me", "hub", 2222)), ("10.0.0.1:22", ("", "10.0.0.1", 22)),
    ("me@[::1]:2200", ("me", "::1", 2200)), ("[fe80::1]", ("", "fe80::1", None)),
    ("fe80::1", ("", "fe80::1", None)),
])
def test_split_server(server: str, expected: tuple[str, str, int | None]) -> None:
    assert split_server(server) == expected


@pytest.mark.parametrize("server", ["", "me@", "hub:x", "hub:0", "hub:70000", "a b", "[::1]x"])
def test_split_server_refuses(server: str) -> None:
    with pytest.raises(TunnelError):
        split_server(server)


def test_split_tcp_url() -> None:
    assert split_tcp_url("tcp://10.0.0.1:5555") == ("10.0.0.1", 5555)
    assert split_tcp_url("tcp://[::1]:5555") == ("[::1]", 5555)
    for url in ("ipc:///tmp/x", "tcp://*", "inproc://x"):
        with pytest.raises(TunnelError, match="only tcp"):
            split_tcp_url(url)


def test_tunnel_runs_ssh_with_forwards_and_terminates_it(fake_ssh: Any) -> None:
    command, record = fake_ssh("ok")
    tunnel = Tunnel("me@hub:2222", ["tcp://127.0.0.1:5555", "tcp://10.0.0.9:6000"],
                    ssh_command=command, keyfile="/keys/engine")
    try:
        tunnel.start()
        assert tunnel.proc is not None and tunnel.proc.poll() is None
        args = json.loads(record.read_text())
        lp = tunnel.local_ports
        assert tunnel.local_urls == ["tcp://127.0.0.1:%d" % p for p in lp]
        assert args[:2] == ["-N", "-T"] and args[-1] == "me@hub"
        for option in ("BatchMode=yes", "ExitOnForwardFailure=yes", "PermitLocalCommand=yes"):
            assert args[args.index(option) - 1] == "-o"
        assert args[args.index("-i") + 1] == "/keys/engine"
        assert args[args.index("-p") + 1] == "2222"
        forwards = [args[i + 1] for i, a in enumerate(args) if a == "-L"]
        assert forwards == ["127.0.0.1:%d:127.0.0.1:5555" % lp[0],
                            "127.0.0.1:%d:10.0.0.9:6000" % lp[1]]
        assert tunnel.failed() is None
    finally:
        tunnel.close()
    assert tunnel.proc.poll() is not None
    assert "Permanently added" in tunnel.error_text()


def test_tunnel_reports_what_ssh_said(fake_ssh: Any) -> None:
    command, _ = fake_ssh("deny")
    tunnel = Tunnel("root@hub", ["tcp://127.0.0.1:1"], ssh_command=command)
    with pytest.raises(TunnelError, match=r"exited with status 255: "
                                          r"root@hub: Permission denied \(publickey\)"):
        tunnel.start()


def test_tunnel_gives_up_when_ssh_never_gets_ready(fake_ssh: Any) -> None:
    command, _ = fake_ssh("hang")
    tunnel = Tunnel("hub", ["tcp://127.0.0.1:1"], ssh_command=command, timeout=0.5)
    with pytest.raises(TunnelError, match="did not open its forwards within"):
        tunnel.start()
    assert tunnel.proc is not None and tunnel.proc.poll() is not None


def test_tunnel_without_an_ssh_client() -> None:
    with pytest.raises(TunnelError, match="cannot run /nonexistent/ssh"):
        Tunnel("hub", ["tcp://127.0.0.1:1"], ssh_command="/nonexistent/ssh").start()


def test_tunnels_batch_and_reuse_forwards(fake_ssh: Any) -> None:
    command, _ = fake_ssh("ok")
    tunnels = Tunnels("hub", ssh_command=command)
    try:
        a, b = tunnels.forward(["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"])
        assert len(tunnels.tunnels) == 1
        assert tunnels.forward(["tcp://127.0.0.1:2", "tcp://127.0.0.1:1"]) == [b, a]
        c, = tunnels.forward(["tcp://127.0.0.1:3"])
        assert len(tunnels.tunnels) == 2 and len({a, b, c}) == 3
        assert tunnels.failed() is None
        proc = tunnels.tunnels[1].proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        assert "exited with status -9" in (tunnels.failed() or "")
    finally:
        tunnels.close()
    assert all(t.proc is not None and t.proc.poll() is not None for t in tunnels.tunnels)


# -- CURVE ------------------------------------------------------------------------------------

def _run_engine(path: Path | str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-E", "-m", "streamkernel", "--config", str(path),
                             *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=py3_env())


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        kill(p)
        if p.stderr is not None:
            p.stderr.close()


class _Relay(threading.Thread):
    """A TCP relay that records every byte between its clients and ``target``."""

    daemon = True

    def __init__(self, target: tuple[str, int]) -> None:
        super().__init__(name="test-relay")
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.seen = bytearray()
        self._halt = threading.Event()

    def run(self) -> None:
        pairs: dict[socket.socket, socket.socket] = {}
        try:
            while not self._halt.is_set():
                ready, _, _ = select.select([self.listener, *pairs], [], [], 0.05)
                for s in ready:
                    if s is self.listener:
                        a, _ = self.listener.accept()
                        b = socket.create_connection(self.target)
                        pairs[a], pairs[b] = b, a
                        continue
                    data = s.recv(65536) if s in pairs else b""
                    if data:
                        self.seen += data
                        pairs[s].sendall(data)
                    elif s in pairs:
                        other = pairs.pop(s)
                        pairs.pop(other, None)
                        s.close()
                        other.close()
        finally:
            for s in pairs:
                s.close()
            self.listener.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


@pytest.mark.integration
@pytest.mark.parametrize("curve", [True, False], ids=["curve", "plaintext"])
def test_curve_registration_execute_and_heartbeat(tmp_path: Path, procs: list, curve: bool
                                                  ) -> None:
    public, secret = zmq.curve_keypair()
    with StubHub(heartbeat_period=0.2, curve=curve,
                 curve_clients=[public] if curve else None) as hub:
        reg = hub.urls["registration"].rpartition(":")
        relay = _Relay((reg[0][len("tcp://"):], int(reg[2])))
        relay.start()
        keys = dict(curve_publickey=public.decode(), curve_secretkey=secret.decode()) \
            if curve else {}
        path = hub.write_connection_file(str(tmp_path / "engine.json"), **keys,
                                         url="tcp://127.0.0.1:%d" % relay.port)
        proc = _run_engine(path, "--heartbeat-timeout", "2")
        procs.append(proc)
        try:
            eid = hub.register()
            hub.wait_beating(eid)
            time.sleep(0.2)
            hub.send(eid, "execute_request", {"code": "secret_code_marker = 6 * 7"})
            assert hub.recv()["content"] == {"status": "ok"}
            hub.send(eid, "execute_request", {"code": "secret_code_marker"}, via="task")
            assert hub.recv("task")["content"] == {"status": "ok"}
            beats = hub.echoes[hub.engines[eid].encode()]
            time.sleep(0.5)
            assert hub.echoes[hub.engines[eid].encode()] > beats
            hub.send(eid, "shutdown_request", {"restart": False}, via="control")
            assert hub.recv("control")["content"]["status"] == "ok"
            assert proc.wait(10) == 0
        finally:
            relay.stop()
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    assert ("CURVE encryption on; this engine's public key is %s" % public.decode() in err) \
        == curve
    plain = [b"registration_request", b"registration_reply", hub.engines[eid].encode()]
    if curve:
        assert not any(p in relay.seen for p in plain), "CURVE traffic carried plaintext"
    else:
        assert all(p in relay.seen for p in plain)


@pytest.mark.integration
def test_warns_when_the_hub_listens_on_another_hosts_loopback(tmp_path: Path, procs: list
                                                              ) -> None:
    with StubHub(heartbeat_period=0.2, location="192.0.2.10") as hub:
        proc = _run_engine(hub.write_connection_file(str(tmp_path / "engine.json")))
        procs.append(proc)
        hub.register()
        kill(proc)
    assert proc.stderr is not None
    assert ("WARNING the hub listens on this host's loopback but runs on 192.0.2.10: set 'ssh'"
            in proc.stderr.read().decode())


@pytest.mark.integration
def test_curve_with_an_ephemeral_engine_key(tmp_path: Path, procs: list) -> None:
    with StubHub(heartbeat_period=0.2, curve=True) as hub:  # no ZAP: any client key
        path = hub.write_connection_file(str(tmp_path / "engine.json"))
        assert json.loads(Path(path).read_text())["curve_serverkey"] == \
            hub.curve_publickey.decode()
        proc = _run_engine(path)
        procs.append(proc)
        eid = hub.register()
        hub.wait_beating(eid)
        time.sleep(0.2)
        hub.send(eid, "execute_request", {"code": "x = 1"})
        assert hub.recv()["content"] == {"status": "ok"}


@pytest.mark.integration
@pytest.mark.parametrize("case", ["wrong-server-key", "unlisted-engine-key", "no-curve"])
def test_curve_peer_with_the_wrong_key_is_not_served(tmp_path: Path, procs: list,
                                                     case: str) -> None:
    public, secret = zmq.curve_keypair()
    unlisted_public, unlisted_secret = zmq.curve_keypair()
    with StubHub(heartbeat_period=0.2, curve=True, curve_clients=[public]) as hub:
        info = hub.connection_info()
        info.update(curve_publickey=public.decode(), curve_secretkey=secret.decode())
        if case == "wrong-server-key":
            info["curve_serverkey"] = zmq.curve_keypair()[0].decode()
        elif case == "unlisted-engine-key":
            info.update(curve_publickey=unlisted_public.decode(),
                        curve_secretkey=unlisted_secret.decode())
        else:
            for key in ("curve_serverkey", "curve_publickey", "curve_secretkey"):
                del info[key]
        path = tmp_path / "engine.json"
        path.write_text(json.dumps(info))
        start = time.monotonic()
        proc = _run_engine(path, "--timeout", "0.5")
        procs.append(proc)
        assert proc.wait(10) == 255
        assert time.monotonic() - start < 5
        assert proc.stderr is not None
        assert "registration timed out after 0.5 s" in proc.stderr.read().decode()
        assert not hub.sockets["registration"].poll(200), "the hub received a message"

        # A client with an unlisted key sends a well-formed request: nothing arrives, no reply.
        with zmq.Context() as ctx:
            rogue = ctx.socket(zmq.DEALER)
            rogue.linger = 0
            rogue.curve_serverkey = hub.curve_publickey
            rogue.curve_publickey, rogue.curve_secretkey = unlisted_public, unlisted_secret
            rogue.connect(hub.urls["registration"])
            hub.session.send(rogue, "registration_request",
                             {"queue": "x", "heartbeat": "x", "control": "x"})
            assert not hub.sockets["registration"].poll(500)
            assert not rogue.poll(100)
            rogue.close()


# -- hosts made of network namespaces ---------------------------------------------------------

class Netns:
    """Network namespaces, links and processes made for one test; all removed afterwards."""

    def __init__(self, tmp_path: Path) -> None:
        self.tag = "sk" + uuid.uuid4().hex[:6]
        self.tmp_path = tmp_path
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.files: list[Any] = []
        self.cleanups: list[Any] = []

    def ip(self, *args: str) -> None:
        """Run ``ip ARGS``; raise with its message when it fails."""
        out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
        if out.returncode:
            raise RuntimeError("ip %s: %s" % (" ".join(args), out.stderr.strip()))

    def add(self, name: str) -> str:
        ns = "%s-%s" % (self.tag, name)
        self.ip("netns", "add", ns)
        self.namespaces.append(ns)
        self.ip("-n", ns, "link", "set", "lo", "up")
        return ns

    def spawn(self, ns: str, argv: list[str], log_name: str, **kw: Any) -> subprocess.Popen:
        """Start ``argv`` inside ``ns`` (``ip netns exec`` execs it: the pid is the program's)."""
        log = open(self.tmp_path / log_name, "wb")
        self.files.append(log)
        kw.setdefault("stdout", log)
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stderr=log,
                                env=py3_env(), cwd=str(REPO), **kw)
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.tmp_path / name).read_text(errors="replace")

    def close(self) -> None:
        for proc in self.procs:
            kill(proc)
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
        for f in self.files:
            f.close()
        for ns in reversed(self.namespaces):  # its veth ends (and their peers) go with it
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        for cleanup in self.cleanups:
            cleanup()


def _netns_unavailable() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "no 'ip' command (iproute2)"
    return None


@pytest.fixture
def netns(tmp_path: Path) -> Iterator[Netns]:
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    net = Netns(tmp_path)
    try:
        try:
            net.add("probe")
        except RuntimeError as e:
            pytest.skip("cannot create a network namespace: %s" % e)
        yield net
    finally:
        net.close()


class Lan:
    """A hub host and engine hosts on one subnet: a bridge in the hub's namespace."""

    def __init__(self, net: Netns, engines: int) -> None:
        self.hub = net.add("hub")
        net.ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        net.ip("-n", self.hub, "addr", "add", HUB_IP + "/24", "dev", "br0")
        net.ip("-n", self.hub, "link", "set", "br0", "up")
        self.engines: list[str] = []
        self.addresses: list[str] = []
        self.hub_ends: list[str] = []
        for i in range(engines):
            ns = net.add("eng%d" % i)
            hub_end, eng_end = "%sh%d" % (net.tag, i), "%se%d" % (net.tag, i)
            net.ip("link", "add", hub_end, "netns", self.hub, "type", "veth",
                   "peer", "name", eng_end, "netns", ns)
            net.ip("-n", self.hub, "link", "set", hub_end, "master", "br0", "up")
            address = "%s.%d" % (SUBNET, i + 2)
            net.ip("-n", ns, "addr", "add", address + "/24", "dev", eng_end)
            net.ip("-n", ns, "link", "set", eng_end, "up")
            self.engines.append(ns)
            self.addresses.append(address)
            self.hub_ends.append(hub_end)


class HubDriver:
    """``python -m tests.nshub`` inside a namespace, driven by JSON lines."""

    def __init__(self, net: Netns, ns: str, *args: str) -> None:
        self.proc = net.spawn(ns, [sys.executable, "-E", "-m", "tests.nshub", *args], "hub.log",
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.urls = self.read(20)["ready"]

    def read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise TimeoutError("the hub did not answer within %.1f s" % timeout)
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError("the hub exited with status %s" % self.proc.wait(5))
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise AssertionError("hub: %s" % answer["error"])
        return answer

    def cmd(self, op: str, timeout: float = 10.0, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(dict(kw, op=op, timeout=timeout)) + "\n").encode())
        self.proc.stdin.flush()
        return self.read(timeout + 5)


def _engine_argv(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-E", "-m", "streamkernel", "--config", str(config), *args]


@pytest.mark.integration
def test_engines_on_two_hosts_and_a_cut_link(netns: Netns, tmp_path: Path) -> None:
    hb_timeout, period = 1.5, 0.2
    lan = Lan(netns, 2)
    config = tmp_path / "ipcontroller-engine.json"
    hub = HubDriver(netns, lan.hub, "--ip", "*", "--location", HUB_IP,
                    "--connection-file", str(config), "--heartbeat-period", str(period))
    written = json.loads(config.read_text())
    assert written["url"].startswith("tcp://*:") and written["location"] == HUB_IP

    engines, ids, uuids = [], [], []
    for i, ns in enumerate(lan.engines):  # one at a time, so engine i gets id i
        engines.append(netns.spawn(ns, _engine_argv(config, "--heartbeat-timeout",
                                                    str(hb_timeout)), "engine%d.log" % i))
        answer = hub.cmd("register")
        ids.append(answer["id"])
        uuids.append(answer["uuid"])
    assert ids == [0, 1]
    for eid in ids:
        hub.cmd("wait_beating", id=eid)
        hub.cmd("wait_iopub", id=eid)

    served: dict[int, int] = {0: 0, 1: 0}

    def execute(eid: int, code: str, pyout: bool = False) -> dict[str, Any]:
        answer = hub.cmd("execute", id=eid, code=code, pyout=pyout)
        assert answer["reply"]["status"] == "ok", answer
        served[eid] += 1
        return answer

    for eid, address in enumerate(lan.addresses):
        execute(eid, "x = %d * 7" % (eid + 6))
        assert execute(eid, "x", pyout=True)["pyout"] == str((eid + 6) * 7)
        seen_address, pid = eval(execute(eid, WHOAMI, pyout=True)["pyout"])
        assert seen_address == address and pid == engines[eid].pid
        log = netns.log("engine%d.log" % eid)
        assert "registered as engine %d with the hub at tcp://*:" % eid in log
        assert "loopback" not in log

    exited: dict[str, float] = {}

    def wait_exit() -> None:
        engines[0].wait(30)
        exited["at"] = time.monotonic()
    watcher = threading.Thread(target=wait_exit, daemon=True)
    watcher.start()
    beats_before = hub.cmd("echoes")["echoes"]
    cut_at = time.monotonic()
    netns.ip("-n", lan.hub, "link", "set", lan.hub_ends[0], "down")
    during = 0
    while watcher.is_alive() and time.monotonic() - cut_at < hb_timeout + 5:
        execute(1, "x += 1")
        during += 1
        time.sleep(0.05)
    watcher.join(1)
    assert "at" in exited, "the engine on the cut link did not exit"
    exit_after = exited["at"] - cut_at
    assert engines[0].returncode == 4
    assert "no heartbeat from the hub" in netns.log("engine0.log")
    assert hb_timeout - period - 0.1 <= exit_after <= hb_timeout + 6  # bounded: it does exit

    assert execute(1, "x", pyout=True)["pyout"] == str(7 * 7 + during)
    seen_address, _ = eval(execute(1, WHOAMI, pyout=True)["pyout"])
    assert seen_address == lan.addresses[1]
    beats_after = hub.cmd("echoes")["echoes"]
    assert beats_after[uuids[0]] - beats_before[uuids[0]] <= 1  # at most one was in flight
    assert beats_after[uuids[1]] - beats_before[uuids[1]] >= (hb_timeout - 0.5) / period
    assert engines[1].poll() is None

    hosts = ", ".join("%s (%s)" % pair for pair in zip(lan.addresses, lan.engines))
    print("\nhosts: hub %s (namespace %s, hub bound on tcp://*), engines %s"
          % (HUB_IP, lan.hub, hosts))
    print("requests served: engine 0 on %s: %d, engine 1 on %s: %d (%d while the link was cut)"
          % (lan.addresses[0], served[0], lan.addresses[1], served[1], during))
    print("cut link %s: engine 0 exited with status %d %.2f s after the cut "
          "(--heartbeat-timeout %.1f s, pings every %.1f s)"
          % (lan.hub_ends[0], engines[0].returncode, exit_after, hb_timeout, period))


# -- ssh tunnels into a namespaced hub --------------------------------------------------------

def _sshd_unavailable() -> str | None:
    sshd = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd")
                                    else None)
    if sshd is None:
        return "sshd is not installed (e.g. apt-get install openssh-server)"
    if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        return "the ssh client or ssh-keygen is not installed"
    return None


class SshServer:
    """An sshd in a namespace, with its own host key, user key and client configuration."""

    def __init__(self, net: Netns, ns: str, address: str, port: int = 2222) -> None:
        d = net.tmp_path / "ssh"
        d.mkdir()
        for name in ("host_key", "user_key", "stranger_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)],
                           check=True, timeout=30)
        (d / "authorized_keys").write_text((d / "user_key.pub").read_text())
        (d / "known_hosts").write_text("[%s]:%d %s" % (address, port,
                                                       (d / "host_key.pub").read_text()))
        (d / "sshd_config").write_text("\n".join([
            "ListenAddress %s:%d" % (address, port), "HostKey %s" % (d / "host_key"),
            "AuthorizedKeysFile %s" % (d / "authorized_keys"), "PidFile none",
            "StrictModes no", "UsePAM no", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password",
            "AllowTcpForwarding yes", ""]))
        (d / "ssh_config").write_text("\n".join([
            "Host *", "  IdentitiesOnly yes", "  UserKnownHostsFile %s" % (d / "known_hosts"),
            "  GlobalKnownHostsFile /dev/null", "  StrictHostKeyChecking yes", ""]))
        self.dir = d
        self.server = "%s@%s:%d" % (_user(), address, port)
        self.ssh_command = "ssh -F %s" % (d / "ssh_config")
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        self._privsep(net, sshd, d / "sshd_config")
        self.proc = net.spawn(ns, [sshd, "-D", "-e", "-f", str(d / "sshd_config")], "sshd.log")
        deadline = time.monotonic() + 10
        while "Server listening" not in net.log("sshd.log"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.skip("sshd did not start: %s" % net.log("sshd.log").strip())
            time.sleep(0.05)

    @staticmethod
    def _privsep(net: Netns, sshd: str, config: Path) -> None:
        """Create sshd's privilege separation directory if it is missing (and remove it after)."""
        out = subprocess.run([sshd, "-t", "-f", str(config)], capture_output=True, text=True,
                             timeout=10)
        missing = re.search(r"Missing privilege separation directory: (\S+)", out.stderr)
        if missing:
            path = missing.group(1)
            os.makedirs(path, mode=0o755)
            net.cleanups.append(lambda: os.rmdir(path) if not os.listdir(path) else None)
            out = subprocess.run([sshd, "-t", "-f", str(config)], capture_output=True,
                                 text=True, timeout=10)
        if out.returncode:
            pytest.skip("sshd refuses its test configuration: %s" % out.stderr.strip())


def _user() -> str:
    import pwd
    return pwd.getpwuid(os.geteuid()).pw_name


def _tunnel_pids(log: str) -> list[int]:
    return [int(p) for p in re.findall(r"ssh tunnel \(pid (\d+)\)", log)]


def _gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open("/proc/%d/stat" % pid) as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.integration
def test_engine_tunnels_through_ssh(netns: Netns, tmp_path: Path) -> None:
    reason = _sshd_unavailable()
    if reason:
        pytest.skip(reason)
    lan = Lan(netns, 1)
    sshd = SshServer(netns, lan.hub, HUB_IP)
    # The hub listens on its own loopback only: the engine's host reaches it through ssh alone.
    config = tmp_path / "ipcontroller-engine.json"
    extra = {"ssh": sshd.server, "ssh_command": sshd.ssh_command,
             "sshkey": str(sshd.dir / "user_key")}
    hub = HubDriver(netns, lan.hub, "--ip", "127.0.0.1", "--location", HUB_IP,
                    "--connection-file", str(config), "--extra", json.dumps(extra))
    assert all(u.startswith("tcp://127.0.0.1:") for u in hub.urls.values())

    # A key the server does not know: no tunnel, so no registration (status 255, promptly).
    stranger = tmp_path / "stranger.json"
    stranger.write_text(json.dumps(dict(json.loads(config.read_text()),
                                        sshkey=str(sshd.dir / "stranger_key"))))
    start = time.monotonic()
    bad = netns.spawn(lan.engines[0], _engine_argv(stranger, "--timeout", "1"), "stranger.log")
    assert bad.wait(20) == 255
    refused_after = time.monotonic() - start
    assert "Permission denied (publickey)" in netns.log("stranger.log")

    start = time.monotonic()
    engine = netns.spawn(lan.engines[0],
                         _engine_argv(config, "--heartbeat-timeout", "3", "--timeout", "20"),
                         "engine.log")
    eid = hub.cmd("register", timeout=40)["id"]
    registered_after = time.monotonic() - start
    hub.cmd("wait_beating", id=eid)
    hub.cmd("wait_iopub", id=eid)
    answer = hub.cmd("execute", id=eid, code="y = 2 ** 10")
    assert answer["reply"]["status"] == "ok"
    seen_address, pid = eval(hub.cmd("execute", id=eid, code=WHOAMI, pyout=True)["pyout"])
    assert seen_address == lan.addresses[0] and pid == engine.pid
    assert hub.cmd("execute", id=eid, code="y", pyout=True)["pyout"] == "1024"
    log = netns.log("engine.log")
    pids = _tunnel_pids(log)
    assert len(pids) == 2, log  # registration, then the six sockets of the reply
    assert log.count(" -> tcp://127.0.0.1:") == 7
    time.sleep(1.0)
    assert hub.cmd("wait_beating", id=eid)["echoes"] >= 3
    assert hub.cmd("shutdown", id=eid)["reply"]["status"] == "ok"
    assert engine.wait(10) == 0
    assert all(_gone(p) for p in pids), "ssh tunnels outlived the engine"

    # A tunnel that dies after registration: the engine has lost its hub (status 4).
    cut = netns.spawn(lan.engines[0], _engine_argv(config, "--timeout", "20"), "cut.log")
    hub.cmd("wait_beating", id=hub.cmd("register", timeout=40)["id"])
    cut_pids = _tunnel_pids(netns.log("cut.log"))
    os.kill(cut_pids[1], signal.SIGKILL)
    assert cut.wait(10) == 4
    assert "lost the hub: ssh tunnel (pid %d)" % cut_pids[1] in netns.log("cut.log")
    assert _gone(cut_pids[0])

    # Killed outright, the engine still takes its ssh processes with it (parent-death signal).
    killed = netns.spawn(lan.engines[0], _engine_argv(config, "--timeout", "20"), "killed.log")
    hub.cmd("wait_beating", id=hub.cmd("register", timeout=40)["id"])
    killed_pids = _tunnel_pids(netns.log("killed.log"))
    assert len(killed_pids) == 2
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(5)
    assert all(_gone(p) for p in killed_pids), "ssh tunnels outlived a killed engine"

    print("\nssh: engine %s -> %s (hub bound on its 127.0.0.1); registered %.2f s after start; "
          "tunnel pids %s; unknown key refused, exit 255 after %.2f s"
          % (lan.addresses[0], sshd.server, registered_after, pids, refused_after))
