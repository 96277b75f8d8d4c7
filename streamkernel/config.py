"""Engine configuration: the connection file a controller writes, plus engine options."""
from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import math
import re
import shlex
import socket
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

SIGNATURE_SCHEMES = ("hmac-md5", "hmac-sha256")
_Z85 = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                 ".-:+=^!/*?&<>()[]{}@%$#")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MAX_BUSY_POLL_US = 100_000
_MAX_FILE = 1 << 20
_TCP_URL = re.compile(r"^tcp://(\*|[\w.-]+|\[[0-9a-fA-F:.]+\]):(\d{1,5})$")
_TRANSPORTS = ("tcp", "ipc", "inproc", "pgm", "epgm", "ws", "wss")
#: A host name, an IPv4 address or an IPv6 address (bracketed or not, with a zone or not).
_HOST = re.compile(r"^([\w-]+(\.[\w-]+)*\.?|\[?[0-9A-Fa-f:.]+(%[\w.-]+)?\]?)\Z")


@dataclass(frozen=True)
class EngineConfig:
    """What an engine needs to find and join its hub.

    ``url``, ``exec_key``, ``ssh`` and ``location`` are the fields of the legacy
    ``ipcontroller-engine.json``; the others are engine options with defaults.
    """

    url: str
    exec_key: str
    ssh: str = ""
    location: str = ""
    signature_scheme: str = "hmac-md5"
    timeout: float = 2.0
    registration_retries: int = 0
    heartbeat_timeout: float = 10.0
    busy_poll_us: int = 200
    insecure: bool = False
    log_level: str = "INFO"
    log_file: str = ""
    log_url: str = ""
    sshkey: str = ""
    ssh_command: str = "ssh"
    curve_serverkey: str = ""
    curve_publickey: str = ""
    curve_secretkey: str = ""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            expected: Any = {"str": str, "float": (int, float), "bool": bool,
                             "int": int}[str(field.type)]
            if isinstance(value, bool) and expected != bool:
                expected_ok = False
            else:
                expected_ok = isinstance(value, expected)
            if not expected_ok:
                raise ConfigError("%s must be a %s, not %s" % (
                    field.name, field.type, type(value).__name__))
        if not self.url:
            raise ConfigError("url is empty: it must be the hub's registration address")
        check_url("url", self.url)
        if self.log_url:
            check_url("log_url", self.log_url)
        if self.location and not _HOST.match(self.location):
            raise ConfigError("location %r is not a host name or an IP address" % self.location)
        if self.signature_scheme not in SIGNATURE_SCHEMES:
            raise ConfigError("signature_scheme %r is not one of %s" % (
                self.signature_scheme, ", ".join(SIGNATURE_SCHEMES)))
        if self.registration_retries < 0:
            raise ConfigError("registration_retries must be >= 0, not %r"
                              % self.registration_retries)
        if not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise ConfigError("timeout must be positive, not %r" % self.timeout)
        if not (self.heartbeat_timeout >= 0 and math.isfinite(self.heartbeat_timeout)):
            raise ConfigError("heartbeat_timeout must be >= 0 (0 disables), not %r"
                              % self.heartbeat_timeout)
        if not 0 <= self.busy_poll_us <= MAX_BUSY_POLL_US:
            raise ConfigError("busy_poll_us must be from 0 to %d microseconds, not %r"
                              % (MAX_BUSY_POLL_US, self.busy_poll_us))
        if self.log_level not in LOG_LEVELS:
            raise ConfigError("log_level %r is not one of %s"
                              % (self.log_level, ", ".join(LOG_LEVELS)))
        if not self.exec_key and not self.insecure:
            raise ConfigError("exec_key is empty: messages would be unsigned; "
                              "pass --insecure to run without signatures")
        self._check_remote()

    def _check_remote(self) -> None:
        """Check the ssh and CURVE settings (the secret key is never echoed)."""
        if any(c.isspace() for c in self.ssh):
            raise ConfigError("ssh %r must be [user@]host[:port]" % self.ssh)
        try:
            if not shlex.split(self.ssh_command):
                raise ConfigError("ssh_command is empty: it must name the ssh client, e.g. 'ssh'")
        except ValueError as e:
            raise ConfigError("ssh_command %r cannot be split: %s" % (self.ssh_command, e)) from e
        keys = ("curve_serverkey", "curve_publickey", "curve_secretkey")
        for name in keys:
            value = getattr(self, name)
            if value and (len(value) != 40 or not set(value) <= _Z85):
                raise ConfigError("%s must be a Z85-encoded CURVE key of 40 characters" % name)
        if not self.curve_serverkey:
            if self.curve_publickey or self.curve_secretkey:
                raise ConfigError("curve_publickey/curve_secretkey need curve_serverkey "
                                  "(the hub's public key)")
            return
        if self.curve_publickey and not self.curve_secretkey:
            raise ConfigError("curve_publickey needs curve_secretkey")
        import zmq  # only for CURVE settings; the rest of this module is stdlib only

        if not zmq.has("curve"):
            raise ConfigError("curve_serverkey is set but libzmq %s has no CURVE support"
                              % zmq.zmq_version())
        if self.curve_publickey and zmq.curve_public(self.curve_secretkey.encode(
                "ascii")) != self.curve_publickey.encode("ascii"):
            raise ConfigError("curve_publickey is not the public key of curve_secretkey")

    @property
    def key(self) -> bytes:
        """The HMAC key as bytes."""
        return self.exec_key.encode("utf-8")

    @classmethod
    def from_dict(cls, data: Any, **overrides: Any) -> EngineConfig:
        """Build a config from a decoded connection file; ``overrides`` win."""
        if not isinstance(data, dict):
            raise ConfigError("the connection file must hold a JSON object, not %s"
                              % type(data).__name__)
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = " (did you mean %r?)" % close[0] if close else ""
                raise ConfigError("unknown key %r%s" % (key, hint))
        merged = dict(data)
        merged.update({k: v for k, v in overrides.items() if v is not None})
        for required in ("url", "exec_key"):
            if required not in merged:
                raise ConfigError("missing key %r" % required)
        if merged.get("ssh") is None:
            merged["ssh"] = ""
        if merged.get("location") is None:
            merged["location"] = ""
        return cls(**merged)

    @classmethod
    def from_file(cls, path: str, **overrides: Any) -> EngineConfig:
        """Read a connection file such as ``ipcontroller-engine.json``."""
        try:
            with open(path, "rb") as f:
                raw = f.read(_MAX_FILE + 1)
        except OSError as e:
            raise ConfigError("cannot read %s: %s" % (path, e.strerror or e)) from e
        if len(raw) > _MAX_FILE:
            raise ConfigError("%s is larger than %d bytes: not a connection file"
                              % (path, _MAX_FILE))
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ConfigError("%s is not valid JSON: %s" % (path, e)) from e
        except RecursionError:
            raise ConfigError("%s is not valid JSON: nested too deeply" % path) from None
        try:
            return cls.from_dict(data, **overrides)
        except ConfigError as e:
            raise ConfigError("%s: %s" % (path, e)) from e


__all__ = ["EngineConfig", "SIGNATURE_SCHEMES"]


_WILDCARDS = ("*", "0.0.0.0", "[::]")


def check_url(name: str, url: str) -> None:
    """Raise ConfigError unless ``url`` is a ZeroMQ address (tcp with a valid port)."""
    transport, sep, _ = url.partition("://")
    if not sep or transport not in _TRANSPORTS:
        raise ConfigError("%s %r is not a ZeroMQ address like tcp://127.0.0.1:5555" % (name, url))
    if transport == "tcp":
        match = _TCP_URL.match(url)
        if match is None or not 0 < int(match.group(2)) < 65536:
            raise ConfigError("%s %r is not a tcp address with a port (1-65535), like "
                              "tcp://127.0.0.1:5555" % (name, url))


def disambiguate_url(url: str, location: str | None = None) -> str:
    """Make a hub address connectable, as 0.11's ``disambiguate_url`` did.

    A host that means "all interfaces" (``*``, ``0.0.0.0``) becomes ``location``,
    the controller's address, or loopback when ``location`` is empty or names
    this host (:func:`is_local_address`). Other addresses and non-TCP URLs are
    returned unchanged.
    """
    proto, sep, rest = url.partition("://")
    host, colon, port = rest.rpartition(":")
    if not sep or not colon or proto != "tcp":
        return url
    if host in _WILDCARDS:
        host = _connectable_host(location)
    return "%s://%s:%s" % (proto, host, port)


def is_local_address(host: str) -> bool:
    """Whether ``host`` is this machine, as seen from this network namespace.

    True for ``localhost``, this host's name, loopback and wildcard addresses,
    and any IP address assigned to one of this host's interfaces (a UDP socket
    can bind to it). Other names are not looked up.
    """
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        return False
    if host.lower() == "localhost" or host == socket.gethostname():
        return True
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    return ip.is_loopback or ip.is_unspecified or _bindable(host)


def _bindable(host: str) -> bool:
    """Whether a UDP socket can bind to ``host``: it is assigned to an interface here."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
    except OSError:
        return False
    return True


def _connectable_host(location: str | None) -> str:
    if not location or is_local_address(location):
        return "127.0.0.1"
    if ":" in location and not location.startswith("["):
        return "[%s]" % location  # an IPv6 address in a URL
    return location


__all__ += ["check_url", "disambiguate_url", "is_local_address"]
