"""The engine process: register with a hub, heartbeat, and serve a Kernel.

Exit codes: 0 clean (shutdown_request, SIGTERM, SIGINT while idle), 1 bad
configuration, 2 bad command line, 3 registration refused, 4 heartbeat lost,
70 internal error, 255 no registration reply in time.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Sequence

import zmq
from tornado.ioloop import IOLoop, PeriodicCallback
from zmq.eventloop.zmqstream import ZMQStream

from . import __version__, protocol
from .config import (LOG_LEVELS, MAX_BUSY_POLL_US, EngineConfig, disambiguate_url,
                     is_local_address)
from .errors import ConfigError, MessageError
from .heartbeat import Heartbeat
from .kernel import Kernel
from .session import Session
from .stream import KernelStream
from .tunnel import TunnelError, Tunnels

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_HEARTBEAT = 4
EXIT_INTERNAL = 70
EXIT_TIMEOUT = 255

_LINGER_MS = 1000


class Engine:
    """Registers with the hub at ``config.url`` and runs a Kernel on the sockets it names."""

    _tunnels: Tunnels | None = None
    _tunnel_watch: PeriodicCallback | None = None
    _curve: tuple[bytes, bytes, bytes] | None = None
    _warned_loopback = False

    def __init__(self, config: EngineConfig, *, context: zmq.Context | None = None,
                 loop: IOLoop | None = None, user_ns: dict[str, Any] | None = None,
                 exec_lines: Sequence[str] = ()) -> None:
        self.config = config
        self.context = context or zmq.Context()
        self.loop = loop or IOLoop.current()
        self.user_ns = user_ns
        self.exec_lines = list(exec_lines)
        self.session = Session(config.key, signature_scheme=config.signature_scheme,
                               parse_dates=False)
        self.ident = self.session.session
        self.id: int | None = None
        self.kernel: Kernel | None = None
        self.heart: Heartbeat | None = None
        self.exit_code: int | None = None
        self._streams: list[ZMQStream] = []
        self._watchdog: PeriodicCallback | None = None
        self._abort_handle: Any = None
        self._tries_left = 0
        self._monitor: ZMQStream | None = None
        self.on_registered: Callable[[], None] | None = None
        try:
            self.registrar = self._stream(zmq.DEALER, config.url)
        except zmq.ZMQError as e:  # e.g. a transport this libzmq lacks, or a bad host
            raise ConfigError("cannot connect to url %s: %s" % (config.url, e)) from e

    def _stream(self, kind: int, *urls: str) -> ZMQStream:
        sock = self.context.socket(kind)
        sock.linger = _LINGER_MS
        if kind != zmq.PUB:
            sock.setsockopt(zmq.IDENTITY, self.ident.encode("ascii"))
        self._secure(sock)
        try:
            targets = self._hub_urls(urls)
        except TunnelError as e:  # only before registration: _connect forwards first
            log.error("cannot reach the hub through ssh: %s", e)
            self.loop.add_callback(self.exit, EXIT_TIMEOUT)
            targets = []
        try:
            for url in targets:
                if "[" in url:
                    sock.ipv6 = True
                sock.connect(url)
        except zmq.ZMQError:
            sock.close(linger=0)
            raise
        stream = KernelStream(sock, self.loop)
        self._streams.append(stream)
        return stream

    def start(self) -> None:
        """Send the registration request; retry or give up after ``config.timeout`` seconds."""
        log.info("registering with the hub at %s", self.config.url)
        self._tries_left = int(self.config.registration_retries)
        self._register()

    def _register(self) -> None:
        self.registrar.on_recv(self.complete_registration)
        content = {"queue": self.ident, "heartbeat": self.ident, "control": self.ident}
        self.session.send(self.registrar, protocol.REGISTRATION_REQUEST, content)
        self._abort_handle = self.loop.call_later(self.config.timeout, self._registration_timeout)

    def _registration_timeout(self) -> None:
        if self._tries_left <= 0:
            self.abort()
            return
        self._tries_left -= 1
        log.warning("no registration reply within %.1f s: retrying (%d more %s)",
                    self.config.timeout, self._tries_left,
                    "try" if self._tries_left == 1 else "tries")
        self._streams.remove(self.registrar)
        self.registrar.close(linger=0)  # drop the unanswered request
        self.registrar = self._stream(zmq.DEALER, self.config.url)
        self._register()

    def _watch_hub(self) -> None:
        """Exit when the hub closes the registration connection: it stopped or restarted
        (a restarted hub no longer knows this engine)."""
        monitor = self.registrar.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._monitor = ZMQStream(monitor, self.loop)
        self._monitor.on_recv(self._hub_disconnected)

    def _hub_disconnected(self, frames: list[bytes]) -> None:
        log.error("the hub at %s closed the connection (it stopped or restarted): exiting",
                  self.config.url)
        self.exit(EXIT_HEARTBEAT)

    def complete_registration(self, frames: list[bytes]) -> None:
        """Handle the registration_reply: connect the sockets and start the kernel."""
        try:
            _, rest = self.session.feed_identities(frames)
            msg = self.session.deserialize(rest)
        except MessageError as e:
            log.warning("dropped invalid registration reply: %s", e)
            return
        if self._abort_handle is not None:
            self.loop.remove_timeout(self._abort_handle)
            self._abort_handle = None
        self.registrar.stop_on_recv()
        self._watch_hub()
        content = msg["content"]
        if content.get(protocol.STATUS) != protocol.OK:
            log.error("registration refused by the hub: %s: %s",
                      content.get("ename", "error"), content.get("evalue", content))
            self.exit(EXIT_REFUSED)
            return
        try:
            self._connect(content)
        except Exception as e:  # whatever the hub sent, the engine must not hang on it
            log.error("unusable registration reply (%s: %s)", type(e).__name__, e)
            self.exit(EXIT_REFUSED)
            return
        log.info("registered as engine %d with the hub at %s", self.id, self.config.url)
        if self.on_registered is not None:
            self.on_registered()

    def _connect(self, content: dict[str, Any]) -> None:
        self.id = int(content["id"])
        shell_urls = [str(content["mux"])] + ([str(content["task"])] if content.get("task") else [])
        hub_urls = shell_urls + [str(content[k]) for k in ("control", "iopub")]
        hub_urls += [str(u) for u in content["heartbeat"]]
        try:
            self._hub_urls(hub_urls)  # one ssh process for all of them, when tunnelling
        except TunnelError as e:
            raise ValueError("cannot open ssh tunnels to the hub's sockets: %s" % e) from e
        shell = self._stream(zmq.ROUTER, *shell_urls)
        control = self._stream(zmq.ROUTER, str(content["control"]))
        iopub = self._stream(zmq.PUB, str(content["iopub"]))
        ping_url, pong_url = self._hub_urls([str(u) for u in content["heartbeat"]])
        self.kernel = Kernel(session=self.session, control_stream=control, shell_streams=[shell],
                             iopub_stream=iopub, loop=self.loop, int_id=self.id,
                             ident=self.ident, user_ns=self.user_ns, exec_lines=self.exec_lines,
                             on_shutdown=lambda: self.exit(EXIT_OK), on_stuck=self._exit_now,
                             busy_poll=self.config.busy_poll_us / 1e6)
        self.kernel.interrupt_by_signal = True
        self.kernel.start()
        self.heart = Heartbeat(self.context, ping_url, pong_url, self.ident.encode("ascii"),
                               configure=self._secure)
        self.heart.start()
        if self.config.heartbeat_timeout > 0:
            period = min(1.0, self.config.heartbeat_timeout / 4)
            self._watchdog = PeriodicCallback(self._check_heartbeat, period * 1000)
            self._watchdog.start()

    def _check_heartbeat(self) -> None:
        if self.heart is None:
            return
        silent = self.heart.silent_for()
        if silent > self.config.heartbeat_timeout:
            log.error("no heartbeat from the hub for %.1f s (limit %.1f s): exiting",
                      silent, self.config.heartbeat_timeout)
            self.exit(EXIT_HEARTBEAT)

    def abort(self) -> None:
        """Registration timed out: exit with status 255."""
        self._abort_handle = None
        self.registrar.stop_on_recv()  # a late reply no longer registers this engine
        log.error("registration timed out after %.1f s: no reply from the hub at %s",
                  self.config.timeout, self.config.url)
        if self.id is not None:
            # (0.11 engines sent {"id": None} here; a 0.11 hub fails on it with KeyError)
            self.session.send(self.registrar, protocol.UNREGISTRATION_REQUEST, {"id": self.id})
        self.exit(EXIT_TIMEOUT)

    def _exit_now(self) -> None:
        """Running code ignored a shutdown's interrupt: leave without waiting for it."""
        log.error("exiting with status 0 while user code still runs")
        time.sleep(_LINGER_MS / 1000)  # let the replies already sent leave
        os._exit(EXIT_OK)

    def exit(self, code: int) -> None:
        """Stop the loop; :meth:`close` then releases everything."""
        if self.exit_code is None:
            self.exit_code = code
        self.loop.add_callback(self.loop.stop)

    def close(self) -> None:
        """Stop the heartbeat, flush and close every socket."""
        if self._watchdog is not None:
            self._watchdog.stop()
        if self.kernel is not None:
            self.kernel.stop()
        if self.heart is not None:
            self.heart.stop()
        if self._tunnel_watch is not None:
            self._tunnel_watch.stop()
        if self._monitor is not None:
            self._monitor.stop_on_recv()
            if not self.registrar.closed():
                self.registrar.socket.disable_monitor()
            self._monitor.close(linger=0)
        for stream in self._streams:
            if not stream.closed():
                stream.flush(zmq.POLLOUT)
                stream.close(linger=_LINGER_MS)
        self.context.term()
        if self._tunnels is not None:  # after term: the last messages have left through them
            self._tunnels.close()

    def _hub_urls(self, urls: Sequence[str]) -> list[str]:
        """Where to connect for the hub's ``urls``: disambiguated, then through ssh if set.

        Raises :class:`TunnelError` when ssh cannot open the forwards.
        """
        resolved = [disambiguate_url(u, self.config.location) for u in urls]
        if self.config.ssh and not is_local_address(self.config.location):
            if self._tunnels is None:
                self._tunnels = Tunnels(self.config.ssh, ssh_command=self.config.ssh_command,
                                        keyfile=self.config.sshkey)
                self._tunnel_watch = PeriodicCallback(self._check_tunnels, 500)
                self._tunnel_watch.start()
            return self._tunnels.forward(resolved)
        if (not self._warned_loopback and self.config.location
                and not is_local_address(self.config.location)
                and any(_is_loopback_url(u) for u in resolved)):
            self._warned_loopback = True
            log.warning("the hub listens on this host's loopback but runs on %s: set 'ssh' in "
                        "the connection file or make the hub listen on an external address",
                        self.config.location)
        return resolved

    def _check_tunnels(self) -> None:
        failure = self._tunnels.failed() if self._tunnels is not None else None
        if failure and self.exit_code is None:
            log.error("lost the hub: %s", failure)
            self.exit(EXIT_TIMEOUT if self.id is None else EXIT_HEARTBEAT)

    def _secure(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE client of the hub when ``curve_serverkey`` is set."""
        if not self.config.curve_serverkey:
            return
        if self._curve is None:
            secret = self.config.curve_secretkey.encode("ascii")
            if secret:
                public = zmq.curve_public(secret)
            else:
                public, secret = zmq.curve_keypair()  # ephemeral: the hub allows any key
            self._curve = (self.config.curve_serverkey.encode("ascii"), public, secret)
            log.info("CURVE encryption on; this engine's public key is %s", public.decode())
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = self._curve


def _is_loopback_url(url: str) -> bool:
    proto, _, rest = url.partition("://")
    host = rest.rpartition(":")[0].strip("[]")
    if proto != "tcp":
        return False
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_LOG_FORMAT = "%(asctime)s streamkernel %(levelname)s %(message)s"


def _number(kind: Callable[[str], Any], minimum: float, strict: bool,
            maximum: float = math.inf) -> Callable[[str], Any]:
    """An argparse type: a finite number above (or, unless strict, equal to) ``minimum``,
    and at most ``maximum``."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not a number" % text) from None
        shown = repr(text if len(text) <= 40 else text[:40] + "...")
        if value != value or value in (math.inf, -math.inf):  # NaN, or a float overflow
            raise argparse.ArgumentTypeError("%s is not a finite number" % shown)
        if value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError("%s must be %s %s" % (
                shown, ">" if strict else ">=", minimum))
        if value > maximum:
            raise argparse.ArgumentTypeError("%s must be at most %s" % (shown, maximum))
        return value
    return parse


def _parser() -> argparse.ArgumentParser:
    d = EngineConfig  # defaults shown in --help are the config's
    p = argparse.ArgumentParser(
        prog="streamkernel",
        description="Python 3 engine for an IPython 0.11 controller: registers with the hub "
                    "named in the connection file and runs what clients send it. Options "
                    "may also be keys of the connection file; the command line wins.",
        epilog="exit status: 0 clean, 1 bad configuration, 2 bad command line, 3 registration "
               "refused, 4 heartbeat lost, 70 internal error, 255 registration timed out")
    p.add_argument("--config", "--file", dest="config", metavar="PATH", required=True,
                   help="connection file written by the controller (ipcontroller-engine.json)")
    p.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default=None,
                   help="logging level (default: %s)" % d.log_level)
    p.add_argument("--log-file", metavar="PATH", default=None,
                   help="append the log to this file instead of stderr (default: stderr)")
    p.add_argument("--log-url", metavar="URL", default=None,
                   help="also publish log records over ZeroMQ PUB to this address, with topics "
                        "engine.<id>.<LEVEL>, as 0.11 engines did (default: off)")
    p.add_argument("--timeout", type=_number(float, 0, strict=True), default=None,
                   metavar="SECONDS",
                   help="seconds to wait for the registration reply (default: %s)" % d.timeout)
    p.add_argument("--registration-retries", type=_number(int, 0, strict=False), default=None,
                   metavar="N",
                   help="send the registration request again N times after a timeout "
                        "(default: %s)" % d.registration_retries)
    p.add_argument("--heartbeat-timeout", type=_number(float, 0, strict=False), default=None,
                   metavar="SECONDS",
                   help="exit when the hub's heartbeat stops this long; 0 never (default: %s)"
                        % d.heartbeat_timeout)
    p.add_argument("--busy-poll-us", type=_number(int, 0, False, MAX_BUSY_POLL_US),
                   default=None, metavar="N",
                   help="after a request, look for the next one for up to N microseconds "
                        "(at most %d) without sleeping, while requests come that close "
                        "together; 0 never (default: %s)" % (MAX_BUSY_POLL_US, d.busy_poll_us))
    p.add_argument("--insecure", action="store_const", const=True, default=None,
                   help="allow an empty exec_key: messages go unsigned (default: refuse)")
    p.add_argument("--version", action="version", version="%(prog)s " + __version__)
    return p


def _setup_logging(config: EngineConfig, context: zmq.Context) -> Any:
    """Configure the root logger from the config; returns the PUB handler, if any."""
    root = logging.getLogger()
    root.setLevel(config.log_level)
    if config.log_file:
        try:
            handler: logging.Handler = logging.FileHandler(config.log_file)
        except OSError as e:
            raise ConfigError("cannot open log file %s: %s" % (config.log_file, e.strerror)) from e
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    root.addHandler(handler)
    if not config.log_url:
        return None
    from zmq.log.handlers import PUBHandler

    sock = context.socket(zmq.PUB)
    sock.linger = _LINGER_MS
    try:
        sock.connect(config.log_url)
    except zmq.ZMQError as e:
        sock.close()
        raise ConfigError("cannot connect log_url %s: %s" % (config.log_url, e)) from e

    class EnginePUBHandler(PUBHandler):
        def emit(self, record: logging.LogRecord) -> None:
            self.socket.getsockopt(zmq.EVENTS)  # take in new subscribers before sending
            super().emit(record)

    pub = EnginePUBHandler(sock)
    pub.root_topic = "engine"
    pub.setLevel(config.log_level)
    root.addHandler(pub)
    return pub


def main(argv: Sequence[str] | None = None) -> int:
    """Run an engine from the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        config = EngineConfig.from_file(
            args.config, timeout=args.timeout, heartbeat_timeout=args.heartbeat_timeout,
            registration_retries=args.registration_retries, busy_poll_us=args.busy_poll_us,
            insecure=args.insecure, log_level=args.log_level, log_file=args.log_file,
            log_url=args.log_url)
        context = zmq.Context()
        pub_handler = _setup_logging(config, context)
        return _run(config, context, pub_handler)
    except ConfigError as e:  # also one found only when connecting (a transport libzmq lacks)
        print("streamkernel: %s" % e, file=sys.stderr)
        return EXIT_CONFIG
    except Exception as e:  # one line for operators; the traceback at DEBUG
        log.debug("internal error", exc_info=True)
        print("streamkernel: internal error: %s: %s" % (type(e).__name__, e), file=sys.stderr)
        return EXIT_INTERNAL


def _run(config: EngineConfig, context: zmq.Context, pub_handler: Any) -> int:
    if config.insecure and not config.exec_key:
        log.warning("running without an exec_key: messages are neither signed nor checked")
    asyncio.set_event_loop(asyncio.new_event_loop())
    loop = IOLoop.current()
    engine = Engine(config, loop=loop, context=context)

    def on_signal(signum: int, frame: Any) -> None:
        log.info("got signal %d: exiting", signum)
        engine.exit(EXIT_OK)
        loop.add_callback_from_signal(loop.stop)
        kernel = engine.kernel
        if kernel is not None and kernel.running_since is not None:
            kernel.shutting_down = True
            timer = threading.Timer(kernel.shutdown_grace, engine._exit_now)
            timer.daemon = True
            timer.start()
            kernel._interrupt_reason = "engine terminating (signal %d)" % signum
            kernel.on_sigint()  # raises KeyboardInterrupt into the running code

    def on_sigint(signum: int, frame: Any) -> None:
        if engine.kernel is not None and engine.kernel.on_sigint():
            return  # (on_sigint raised KeyboardInterrupt into the running code)
        log.info("interrupted while idle: exiting")
        engine.exit(EXIT_OK)
        loop.add_callback_from_signal(loop.stop)

    def on_registered() -> None:
        if pub_handler is not None and engine.id is not None:
            pub_handler.root_topic = "engine.%d" % engine.id

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_sigint)
    engine.on_registered = on_registered
    engine.start()
    try:
        loop.start()
    except KeyboardInterrupt:
        log.info("interrupted: exiting")
        engine.exit(EXIT_OK)
    finally:
        if pub_handler is not None:
            logging.getLogger().removeHandler(pub_handler)
            pub_handler.socket.close(linger=_LINGER_MS)
        engine.close()
    code = EXIT_OK if engine.exit_code is None else engine.exit_code
    log.info("exiting with status %d", code)
    return code


__all__ = ["Engine", "main", "main_exit", "EXIT_OK", "EXIT_CONFIG", "EXIT_USAGE", "EXIT_REFUSED",
           "EXIT_HEARTBEAT", "EXIT_INTERNAL", "EXIT_TIMEOUT"]


def main_exit() -> None:
    """Console-script entry point: run :func:`main` and exit with its status."""
    sys.exit(main())
