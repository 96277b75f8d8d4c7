"""Engine configuration: the connection file a controller writes, plus engine options."""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

SIGNATURE_SCHEMES = ("hmac-md5", "hmac-sha256")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


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
    heartbeat_timeout: float = 10.0
    insecure: bool = False
    log_level: str = "INFO"
    log_file: str = ""
    log_url: str = ""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            expected = {"str": str, "float": (int, float), "bool": bool}[str(field.type)]
            if isinstance(value, bool) and expected != bool:
                expected_ok = False
            else:
                expected_ok = isinstance(value, expected)
            if not expected_ok:
                raise ConfigError("%s must be a %s, not %s" % (
                    field.name, field.type, type(value).__name__))
        if not self.url:
            raise ConfigError("url is empty: it must be the hub's registration address")
        if "://" not in self.url:
            raise ConfigError("url %r is not a ZeroMQ address like tcp://127.0.0.1:5555" % self.url)
        if self.signature_scheme not in SIGNATURE_SCHEMES:
            raise ConfigError("signature_scheme %r is not one of %s" % (
                self.signature_scheme, ", ".join(SIGNATURE_SCHEMES)))
        if not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise ConfigError("timeout must be positive, not %r" % self.timeout)
        if not (self.heartbeat_timeout >= 0 and math.isfinite(self.heartbeat_timeout)):
            raise ConfigError("heartbeat_timeout must be >= 0 (0 disables), not %r"
                              % self.heartbeat_timeout)
        if self.log_level not in LOG_LEVELS:
            raise ConfigError("log_level %r is not one of %s" % (self.log_level, ", ".join(LOG_LEVELS)))
        if not self.exec_key and not self.insecure:
            raise ConfigError("exec_key is empty: messages would be unsigned; "
                              "pass --insecure to run without signatures")

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
                raw = f.read()
        except OSError as e:
            raise ConfigError("cannot read %s: %s" % (path, e.strerror or e)) from e
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ConfigError("%s is not valid JSON: %s" % (path, e)) from e
        try:
            return cls.from_dict(data, **overrides)
        except ConfigError as e:
            raise ConfigError("%s: %s" % (path, e)) from e


__all__ = ["EngineConfig", "SIGNATURE_SCHEMES"]


def disambiguate_url(url: str, location: str | None = None) -> str:
    """Make a hub address connectable: ``*`` and ``0.0.0.0`` become ``location``,
    or loopback when the hub runs on this host (or ``location`` is unknown)."""
    proto, sep, rest = url.partition("://")
    host, colon, port = rest.rpartition(":")
    if not sep or not colon or proto != "tcp":
        return url
    if host in ("*", "0.0.0.0"):
        host = _connectable_host(location)
    return "%s://%s:%s" % (proto, host, port)


def _connectable_host(location: str | None) -> str:
    import socket

    if not location:
        return "127.0.0.1"
    try:
        local_ips = socket.gethostbyname_ex(socket.gethostname())[2]
    except (OSError, IndexError):
        local_ips = []
    if not local_ips or location in local_ips or location.startswith("127."):
        return "127.0.0.1"
    return location


__all__ += ["disambiguate_url"]
