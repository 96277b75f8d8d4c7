"""config: reading the connection file, validating it, and making hub addresses connectable."""
from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from streamkernel.config import EngineConfig, disambiguate_url
from streamkernel.errors import ConfigError

GOOD = {"url": "tcp://127.0.0.1:5555", "exec_key": "190aa70d-0762-4231-8481-b964c3bdf819",
        "ssh": "", "location": "10.0.0.5"}


def write(tmp_path: Path, data: Any, name: str = "ipcontroller-engine.json") -> str:
    path = tmp_path / name
    if isinstance(data, bytes):
        path.write_bytes(data)
    elif isinstance(data, str):
        path.write_text(data)
    else:
        path.write_text(json.dumps(data))
    return str(path)


def test_from_file_reads_a_legacy_connection_file(tmp_path: Path) -> None:
    cfg = EngineConfig.from_file(write(tmp_path, GOOD))
    assert cfg.url == GOOD["url"] and cfg.exec_key == GOOD["exec_key"]
    assert cfg.ssh == "" and cfg.location == "10.0.0.5"
    assert cfg.key == GOOD["exec_key"].encode()
    assert cfg.signature_scheme == "hmac-md5"
    assert cfg.timeout == 2.0 and cfg.heartbeat_timeout == 10.0 and cfg.insecure is False


def test_from_file_with_null_ssh_and_location(tmp_path: Path) -> None:
    cfg = EngineConfig.from_file(write(tmp_path, dict(GOOD, ssh=None, location=None)))
    assert cfg.ssh == "" and cfg.location == ""


def test_from_file_minimal_and_engine_options(tmp_path: Path) -> None:
    data = {"url": "tcp://h:1", "exec_key": "k", "signature_scheme": "hmac-sha256",
            "timeout": 5, "heartbeat_timeout": 0, "insecure": False}
    cfg = EngineConfig.from_file(write(tmp_path, data))
    assert cfg.signature_scheme == "hmac-sha256" and cfg.timeout == 5
    assert cfg.heartbeat_timeout == 0


def test_busy_poll_defaults_to_200_microseconds_and_0_turns_it_off(tmp_path: Path) -> None:
    assert EngineConfig.from_file(write(tmp_path, GOOD)).busy_poll_us == 200
    cfg = EngineConfig.from_file(write(tmp_path, dict(GOOD, busy_poll_us=0)))
    assert cfg.busy_poll_us == 0
    assert EngineConfig.from_file(write(tmp_path, GOOD), busy_poll_us=50).busy_poll_us == 50


def test_overrides_win_and_none_is_ignored(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    cfg = EngineConfig.from_file(path, timeout=7.5, heartbeat_timeout=None, insecure=None)
    assert cfg.timeout == 7.5 and cfg.heartbeat_timeout == 10.0 and cfg.insecure is False


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = EngineConfig.from_file(write(tmp_path, GOOD))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.url = "tcp://other:1"  # type: ignore[misc]


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="nope.json"):
        EngineConfig.from_file(path)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        EngineConfig.from_file(str(tmp_path))


@pytest.mark.parametrize("text", ["", "{", "{'url': 'x'}", "not json", '{"url": "x",}'],
                         ids=["empty", "unclosed", "single-quotes", "text", "trailing-comma"])
def test_bad_json(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match="not valid JSON"):
        EngineConfig.from_file(path)


def test_not_utf8(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        EngineConfig.from_file(write(tmp_path, b'{"url": "\xff"}'))


@pytest.mark.parametrize("data", [[], ["url"], "tcp://x:1", 5, None])
def test_not_an_object(tmp_path: Path, data: Any) -> None:
    with pytest.raises(ConfigError, match="JSON object"):
        EngineConfig.from_file(write(tmp_path, json.dumps(data)))


@pytest.mark.parametrize("key, hint", [
    ("exec_kye", "exec_key"), ("urll", "url"), ("locaton", "location"),
    ("heartbeat-timeout", "heartbeat_timeout"), ("signature", "signature_scheme"),
])
def test_unknown_key_suggests_the_closest(tmp_path: Path, key: str, hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        EngineConfig.from_file(write(tmp_path, dict(GOOD, **{key: "x"})))
    message = str(info.value)
    assert repr(key) in message
    assert "did you mean %r?" % hint in message


def test_unknown_key_without_a_close_match(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        EngineConfig.from_file(write(tmp_path, dict(GOOD, zzzzzz=1)))
    assert "'zzzzzz'" in str(info.value) and "did you mean" not in str(info.value)


def test_error_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, {"url": "tcp://h:1"}, name="my-engine.json")
    with pytest.raises(ConfigError, match="my-engine.json"):
        EngineConfig.from_file(path)


@pytest.mark.parametrize("missing", ["url", "exec_key"])
def test_missing_required_key(tmp_path: Path, missing: str) -> None:
    data = {k: v for k, v in GOOD.items() if k != missing}
    with pytest.raises(ConfigError, match="missing key %r" % missing):
        EngineConfig.from_file(write(tmp_path, data))


@pytest.mark.parametrize("key, value", [
    ("url", 5), ("url", None), ("url", ["tcp://h:1"]),
    ("exec_key", None), ("exec_key", 123), ("exec_key", {"k": "v"}),
    ("ssh", 1), ("location", ["x"]),
    ("timeout", "2"), ("timeout", True), ("timeout", None), ("timeout", [2]),
    ("heartbeat_timeout", "10"), ("heartbeat_timeout", False),
    ("busy_poll_us", 1.5), ("busy_poll_us", "200"), ("busy_poll_us", True),
    ("insecure", "yes"), ("insecure", 1), ("insecure", 0.0),
    ("signature_scheme", 5),
])
def test_wrong_types(tmp_path: Path, key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=key):
        EngineConfig.from_file(write(tmp_path, dict(GOOD, **{key: value})))


@pytest.mark.parametrize("key, value", [
    ("url", ""), ("url", "127.0.0.1:5555"),
    ("signature_scheme", "hmac-sha1"), ("signature_scheme", "HMAC-MD5"),
    ("timeout", 0), ("timeout", -1),
    ("heartbeat_timeout", -0.5),
    ("timeout", float("nan")), ("heartbeat_timeout", float("nan")),
    ("busy_poll_us", -1), ("busy_poll_us", 100_001),
])
def test_bad_values(tmp_path: Path, key: str, value: Any) -> None:
    with pytest.raises(ConfigError):
        EngineConfig.from_file(write(tmp_path, dict(GOOD, **{key: value})))


def test_empty_key_is_refused_unless_insecure(tmp_path: Path) -> None:
    path = write(tmp_path, dict(GOOD, exec_key=""))
    with pytest.raises(ConfigError, match="insecure"):
        EngineConfig.from_file(path)
    cfg = EngineConfig.from_file(path, insecure=True)
    assert cfg.exec_key == "" and cfg.key == b"" and cfg.insecure is True
    cfg = EngineConfig.from_file(write(tmp_path, dict(GOOD, exec_key="", insecure=True)))
    assert cfg.insecure is True


def test_constructor_validates_too() -> None:
    assert EngineConfig(url="tcp://h:1", exec_key="k").key == b"k"
    with pytest.raises(ConfigError):
        EngineConfig(url="tcp://h:1", exec_key="")
    with pytest.raises(ConfigError):
        EngineConfig(url="tcp://h:1", exec_key="k", timeout="1")  # type: ignore[arg-type]


def test_from_dict_refuses_non_dicts() -> None:
    with pytest.raises(ConfigError):
        EngineConfig.from_dict(["url"])


def test_the_error_does_not_echo_the_key(tmp_path: Path) -> None:
    secret = "s3cr3t-key-material"
    with pytest.raises(ConfigError) as info:
        EngineConfig.from_file(write(tmp_path, {"exec_key": secret, "url": "nowhere"}))
    assert secret not in str(info.value)


# -- disambiguate_url --------------------------------------------------------------------

@pytest.fixture
def host_ips(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Pretend this host's interfaces carry these addresses (the bind check finds them)."""
    import streamkernel.config
    ips = ["192.168.7.7", "10.9.9.9"]
    monkeypatch.setattr(streamkernel.config, "_bindable", lambda host: host in ips)
    return ips


@pytest.mark.parametrize("url, location, expected", [
    ("tcp://*:5555", None, "tcp://127.0.0.1:5555"),
    ("tcp://0.0.0.0:5555", None, "tcp://127.0.0.1:5555"),
    ("tcp://*:5555", "", "tcp://127.0.0.1:5555"),
    ("tcp://*:5555", "192.168.7.7", "tcp://127.0.0.1:5555"),     # the hub runs here
    ("tcp://0.0.0.0:5555", "10.9.9.9", "tcp://127.0.0.1:5555"),
    ("tcp://*:5555", "127.0.0.5", "tcp://127.0.0.1:5555"),
    ("tcp://*:5555", "172.16.0.1", "tcp://172.16.0.1:5555"),    # another host
    ("tcp://0.0.0.0:6000", "hub.example.org", "tcp://hub.example.org:6000"),
    ("tcp://10.1.2.3:5555", "172.16.0.1", "tcp://10.1.2.3:5555"),  # a real address stays
    ("tcp://localhost:5555", None, "tcp://localhost:5555"),
    ("ipc:///tmp/hub", "172.16.0.1", "ipc:///tmp/hub"),
    ("inproc://hub", None, "inproc://hub"),
    ("tcp://*", None, "tcp://*"),                                  # no port: left alone
    ("not a url", None, "not a url"),
])
def test_disambiguate_url(host_ips: list[str], url: str, location: str | None,
                          expected: str) -> None:
    assert disambiguate_url(url, location) == expected


def test_disambiguate_url_when_host_lookup_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    # 0.11 fell back to loopback here; the interface check does not need the host's name
    def fail(name: str) -> Any:
        raise socket.gaierror("no name")
    monkeypatch.setattr(socket, "gethostbyname_ex", fail)
    monkeypatch.setattr(socket, "getaddrinfo", fail)
    assert disambiguate_url("tcp://*:1", "172.16.0.1") == "tcp://172.16.0.1:1"
