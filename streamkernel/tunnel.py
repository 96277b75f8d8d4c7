"""ssh tunnels: reach a hub through an ssh server with the system ``ssh`` client.

Each :class:`Tunnel` is one ``ssh -N -L`` child process forwarding local ports on
127.0.0.1 to addresses as the ssh server sees them, like the 0.11 client's
``tunnel_connection`` (``ssh -L 127.0.0.1:lport:remoteip:rport server``). The
engine owns the processes and terminates them when it closes; on Linux they also
get SIGTERM when the thread that started them dies.
"""
from __future__ import annotations

import atexit
import ctypes
import logging
import os
import selectors
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import weakref
from collections import deque
from typing import Callable, Sequence

from .errors import StreamKernelError

log = logging.getLogger(__name__)

#: Seconds to wait for ssh to log in and open its forwards (the 0.11 tunnels waited 15 s).
TUNNEL_TIMEOUT = 15.0

_PR_SET_PDEATHSIG = 1
_live: weakref.WeakSet[Tunnel] = weakref.WeakSet()


class TunnelError(StreamKernelError):
    """An ssh tunnel could not be opened, or its ssh process exited."""


def split_server(server: str) -> tuple[str, str, int | None]:
    """Split ``[user@]host[:port]`` (the 0.11 form of ``ssh``) into user, host and port.

    ``user`` is ``""`` when absent (ssh then uses its own default); an IPv6 host
    may be written ``[::1]:22``.
    """
    user, at, hostport = server.rpartition("@")
    if not at:
        user = ""
    port: int | None = None
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise TunnelError("bad ssh server %r" % server)
            port = _port(rest[1:], server)
    elif hostport.count(":") == 1:
        host, _, p = hostport.partition(":")
        port = _port(p, server)
    else:
        host = hostport
    if not host or any(c.isspace() for c in server):
        raise TunnelError("bad ssh server %r: expected [user@]host[:port]" % server)
    return user, host, port


def _port(text: str, server: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise TunnelError("bad port in ssh server %r" % server)
    return int(text)


def split_tcp_url(url: str) -> tuple[str, int]:
    """``tcp://host:port`` to ``(host, port)``; IPv6 hosts keep their brackets."""
    proto, sep, rest = url.partition("://")
    host, colon, port = rest.rpartition(":")
    if proto != "tcp" or not sep or not colon or not host or not port.isdigit():
        raise TunnelError("cannot tunnel %r: only tcp://host:port addresses can go through ssh"
                          % url)
    return host, int(port)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks Linux to SIGTERM the child when its parent thread exits."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl
            os._exit(1)
    return preexec


class Tunnel:
    """One ssh process forwarding free local ports to ``remotes`` (``tcp://`` URLs).

    ``local_urls[i]`` is where to connect instead of ``remotes[i]``. ``server``
    is ``[user@]host[:port]``; ``ssh_command`` is the client to run, split like a
    shell would (e.g. ``"ssh -F cluster.conf"``); ``keyfile`` is passed as ``-i``.
    """

    def __init__(self, server: str, remotes: Sequence[str], *, ssh_command: str = "ssh",
                 keyfile: str = "", timeout: float = TUNNEL_TIMEOUT) -> None:
        self.server = server
        self.remotes = list(remotes)
        self.timeout = timeout
        user, host, port = split_server(server)
        targets = [split_tcp_url(url) for url in self.remotes]
        self.local_ports = [free_port() for _ in targets]
        self.local_urls = ["tcp://127.0.0.1:%d" % p for p in self.local_ports]
        self._marker = "streamkernel-tunnel-ready-%s" % uuid.uuid4().hex
        argv = shlex.split(ssh_command) or ["ssh"]
        argv += ["-N", "-T", "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
                 "-o", "ConnectTimeout=%d" % max(1, int(timeout)),
                 "-o", "PermitLocalCommand=yes", "-o", "LocalCommand=echo " + self._marker]
        if keyfile:
            argv += ["-i", keyfile]
        if port is not None:
            argv += ["-p", str(port)]
        for lport, (rhost, rport) in zip(self.local_ports, targets):
            argv += ["-L", "127.0.0.1:%d:%s:%d" % (lport, rhost, rport)]
        argv.append("%s@%s" % (user, host) if user else host)
        self.argv = argv
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr_tail: deque[str] = deque(maxlen=20)
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        """The ssh process id, once started."""
        return None if self.proc is None else self.proc.pid

    def start(self) -> None:
        """Run ssh and wait until its forwards listen; raises :class:`TunnelError`."""
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         preexec_fn=_die_with_parent())
        except OSError as e:
            raise TunnelError("cannot run %s: %s" % (self.argv[0], e.strerror or e)) from e
        if not _live:
            atexit.unregister(_close_all)
            atexit.register(_close_all)
        _live.add(self)
        self._reader = threading.Thread(target=self._read, name="streamkernel-ssh-%d"
                                        % self.proc.pid, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + self.timeout
        while not self._ready.wait(0.02):
            if self.proc.poll() is not None:
                self.close()
                raise TunnelError("ssh to %s exited with status %d: %s" % (
                    self.server, self.proc.returncode, self.error_text()))
            if time.monotonic() > deadline:
                self.close()
                raise TunnelError("ssh to %s did not open its forwards within %.0f s: %s" % (
                    self.server, self.timeout, self.error_text()))
        log.info("ssh tunnel (pid %d) via %s: %s", self.proc.pid, self.server, ", ".join(
            "%s -> %s" % pair for pair in zip(self.local_urls, self.remotes)))

    def _read(self) -> None:
        """Watch ssh's stdout for the ready marker; keep its stderr (drained, never blocking)."""
        assert self.proc is not None and self.proc.stdout and self.proc.stderr
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ, "out")
        sel.register(self.proc.stderr, selectors.EVENT_READ, "err")
        pending = {"out": b"", "err": b""}
        try:
            while sel.get_map():
                for key, _ in sel.select():
                    chunk = os.read(key.fd, 4096)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        continue
                    lines = (pending[key.data] + chunk).split(b"\n")
                    pending[key.data] = lines.pop()
                    for raw in lines:
                        line = raw.decode("utf-8", "replace").rstrip()
                        if key.data == "out" and line == self._marker:
                            self._ready.set()
                        elif line:
                            self.stderr_tail.append(line)
                            log.debug("ssh %s: %s", self.server, line)
        except (OSError, ValueError):
            pass
        finally:
            sel.close()

    def error_text(self) -> str:
        """What ssh wrote to stderr (last lines), or a hint when it wrote nothing."""
        return " / ".join(self.stderr_tail) or "no message from ssh"

    def failed(self) -> str | None:
        """A description of the failure if ssh has exited, else None."""
        if self.proc is None or self.proc.poll() is None:
            return None
        return "ssh tunnel (pid %d) via %s exited with status %d: %s" % (
            self.proc.pid, self.server, self.proc.returncode, self.error_text())

    def close(self, timeout: float = 2.0) -> None:
        """Terminate the ssh process (SIGTERM, then SIGKILL) and wait for it."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(1)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        _live.discard(self)


class Tunnels:
    """The tunnels of one engine: one ssh process per batch of addresses, reused per URL."""

    def __init__(self, server: str, *, ssh_command: str = "ssh", keyfile: str = "",
                 timeout: float = TUNNEL_TIMEOUT) -> None:
        split_server(server)  # fail early on a malformed server
        self.server = server
        self.ssh_command = ssh_command
        self.keyfile = keyfile
        self.timeout = timeout
        self.tunnels: list[Tunnel] = []
        self._local: dict[str, str] = {}

    def forward(self, urls: Sequence[str]) -> list[str]:
        """Local URLs for ``urls``, opening one new ssh process for those not yet forwarded."""
        new = [u for u in dict.fromkeys(urls) if u not in self._local]
        if new:
            tunnel = Tunnel(self.server, new, ssh_command=self.ssh_command,
                            keyfile=self.keyfile, timeout=self.timeout)
            tunnel.start()
            self.tunnels.append(tunnel)
            self._local.update(zip(new, tunnel.local_urls))
        return [self._local[u] for u in urls]

    def failed(self) -> str | None:
        """The first dead tunnel's failure, if any."""
        for tunnel in self.tunnels:
            message = tunnel.failed()
            if message:
                return message
        return None

    def close(self) -> None:
        """Terminate every ssh process."""
        for tunnel in self.tunnels:
            tunnel.close()


def _close_all() -> None:
    for tunnel in list(_live):
        tunnel.close(timeout=1.0)


__all__ = ["Tunnel", "Tunnels", "TunnelError", "TUNNEL_TIMEOUT", "split_server",
           "split_tcp_url", "free_port"]
