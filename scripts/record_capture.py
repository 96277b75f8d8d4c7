#!/usr/bin/env python3
"""Record an engine's traffic (ours or the legacy one) as a capture file.

The recorder is a proxy between a hub and one engine. The engine registers at the
proxy; the proxy relays registration to the hub, rewrites the mux, task, control
and iopub addresses of the hub's registration_reply to its own (re-signing it with
the exec_key) and then relays those sockets both ways, logging every frame as the
engine sees it. Heartbeats go straight to the hub and are not recorded. The proxy
names itself ``mux``, ``task`` and ``control`` to the engine, so those are the first
routing frame of what the engine receives.

Subcommands:

  run       start a legacy controller, the proxy and an engine, run a scenario
            (a JSON file, or -e CODE ...) with streamkernel.client.Client, write the capture
  proxy     only the proxy, for a controller and engine you start yourself
  convert   turn a tools/record_engine.py log (JSON lines + meta file) into a capture

Scenario file: {"scenario", "description", "steps": [step, ...]}, a step being one of
  {"execute": CODE}  {"complete": TEXT, "line": LINE}  {"clear": {}}  {"abort": [NAME...]}
  {"shutdown": {"restart": false}}  {"sleep": SECONDS}  {"wait": [NAME...]}
with optional "name" (for abort/wait), "wait": false (do not wait for the reply)
and "timeout". Requests go to engine 0; clear, abort and shutdown use the control channel.

Examples:
  scripts/record_capture.py run scenario.json -o capture.json              # legacy engine
  scripts/record_capture.py run --engine ours -e 'a = 5' -e 'a' -o ours.json
  scripts/record_capture.py proxy --hub-file ipcontroller-engine.json \\
      --engine-file proxied.json -o capture.json    # then: ipengine --file=proxied.json
"""
from __future__ import annotations

import os
import sys

if os.environ.get("PYTHONPATH") and not sys.flags.ignore_environment:
    # the legacy env.sh puts Python 2 packages on PYTHONPATH; keep them out
    os.execv(sys.executable, [sys.executable, "-E"] + sys.argv)

import argparse
import json
import logging
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from typing import Any, Sequence

import zmq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from streamkernel import __version__  # noqa: E402
from streamkernel.capture import DELIM, Capture, Message, capture_from_log, sign  # noqa: E402
from streamkernel.config import disambiguate_url  # noqa: E402
from streamkernel.testing import py2_env, py3_env, read_legacy_env, stop_process  # noqa: E402

log = logging.getLogger("record_capture")

LEGACY_DIR = os.environ.get("STREAMKERNEL_LEGACY_DIR", "/tmp/streamkernel-legacy")
RECORD_ENGINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir,
                             "shared", "legacy", "tools", "record_engine.py")
#: Routing ids the proxy shows the engine for its peers.
PEER_IDS = {"mux": b"mux", "task": b"task", "control": b"control"}
_HUB = b"hub"


class RecordingProxy:
    """Relays one engine's sockets to a hub and logs every message the engine passes."""

    def __init__(self, hub_info: dict[str, Any], *, ip: str = "127.0.0.1") -> None:
        self.hub_info = hub_info
        self.key = str(hub_info["exec_key"]).encode()
        self.location = hub_info.get("location") or ""
        self.context = zmq.Context()
        self.messages: list[Message] = []
        self.engine_ident: str | None = None
        self.engine_id: int | None = None
        self.registered = threading.Event()
        self._stop = threading.Event()
        self.down: dict[str, zmq.Socket] = {}
        self.up: dict[str, zmq.Socket] = {}
        self.urls: dict[str, str] = {}
        for name, kind in (("registration", zmq.ROUTER), ("mux", zmq.ROUTER),
                           ("task", zmq.ROUTER), ("control", zmq.ROUTER), ("iopub", zmq.SUB)):
            sock = self.context.socket(kind)
            sock.linger = 0
            if name in PEER_IDS:
                sock.setsockopt(zmq.IDENTITY, PEER_IDS[name])
            port = sock.bind_to_random_port("tcp://" + ip)
            self.urls[name] = "tcp://%s:%d" % (ip, port)
            self.down[name] = sock
        self.down["iopub"].setsockopt(zmq.SUBSCRIBE, b"")
        self._thread = threading.Thread(target=self._run, name="recording-proxy", daemon=True)

    def engine_file(self) -> dict[str, Any]:
        """Connection file for the engine: the proxy's registration address."""
        return {"url": self.urls["registration"], "exec_key": self.key.decode(), "ssh": "",
                "location": "127.0.0.1"}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in list(self.down.values()) + list(self.up.values()):
            sock.close(linger=0)
        self.context.term()

    def _log(self, stream: str, direction: str, frames: Sequence[bytes]) -> None:
        try:
            self.messages.append(Message(stream, direction, list(frames), time.time()))
        except ValueError as e:
            log.warning("not recorded (%s/%s): %s", stream, direction, e)

    def _upstream(self, kind: int, url: str, identity: bytes | None = None) -> zmq.Socket:
        sock = self.context.socket(kind)
        sock.linger = 0
        if identity is not None:
            sock.setsockopt(zmq.IDENTITY, identity)
        if kind == zmq.ROUTER:
            sock.setsockopt(zmq.CONNECT_ROUTING_ID, _HUB)
        sock.connect(disambiguate_url(url, self.location))
        return sock

    # -- relaying ---------------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        for sock in self.down.values():
            poller.register(sock, zmq.POLLIN)
        registered_up: set[int] = set()
        while not self._stop.is_set():
            for sock in list(self.up.values()):
                if id(sock) not in registered_up:
                    poller.register(sock, zmq.POLLIN)
                    registered_up.add(id(sock))
            for sock, _ in poller.poll(50):
                try:
                    frames = sock.recv_multipart()
                    self._relay(sock, frames)
                except Exception:
                    log.error("relay failed", exc_info=True)

    def _relay(self, sock: zmq.Socket, frames: list[bytes]) -> None:
        down = {id(s): n for n, s in self.down.items()}
        up = {id(s): n for n, s in self.up.items()}
        if id(sock) in down:
            name = down[id(sock)]
            if name == "registration":
                self._engine_rid = frames[0]
                self._log("registration", "out", frames[1:])
                if "registration" not in self.up:
                    self.up["registration"] = self._upstream(zmq.DEALER, self.hub_info["url"],
                                                             frames[0])
                self.up["registration"].send_multipart(frames[1:])
            elif name == "iopub":
                self._log("iopub", "out", frames)
                if "iopub" in self.up:
                    self.up["iopub"].send_multipart(frames)
            else:  # engine -> hub: [engine ident, client..., DELIM, ...]
                stream = "control" if name == "control" else "shell"
                self._log(stream, "out", [PEER_IDS[name]] + frames[1:])
                self.up[name].send_multipart([_HUB] + frames[1:])
        elif id(sock) in up:
            name = up[id(sock)]
            if name == "registration":
                frames = self._rewrite_registration(frames)
                self._log("registration", "in", frames)
                self.down["registration"].send_multipart([self._engine_rid] + frames)
            else:  # hub -> engine: [hub, client..., DELIM, ...]
                stream = "control" if name == "control" else "shell"
                assert self.engine_ident is not None
                self._log(stream, "in", [PEER_IDS[name]] + frames[1:])
                self.down[name].send_multipart([self.engine_ident.encode()] + frames[1:])

    def _rewrite_registration(self, frames: list[bytes]) -> list[bytes]:
        """Point the engine at the proxy; the reply is re-signed with the exec_key."""
        i = frames.index(DELIM)
        header, parent, content_b = frames[i + 2:i + 5]
        content = json.loads(content_b.decode("utf-8"))
        if content.get("status") != "ok":
            return frames
        request = next(m for m in reversed(self.messages) if m.stream == "registration")
        self.engine_ident = str(request.content["queue"])
        self.engine_id = int(content["id"])
        ident = self.engine_ident.encode()
        for name in ("mux", "task", "control"):
            if content.get(name):
                self.up[name] = self._upstream(zmq.ROUTER, str(content[name]), ident)
                content[name] = self.urls[name]
        self.up["iopub"] = self._upstream(zmq.PUB, str(content["iopub"]))
        content["iopub"] = self.urls["iopub"]
        content_b = json.dumps(content, separators=(",", ":")).encode("ascii")
        time.sleep(0.1)  # let the upstream connections complete before the engine sends
        self.registered.set()
        return frames[:i + 1] + [sign(self.key, [header, parent, content_b]),
                                 header, parent, content_b] + frames[i + 5:]

    def capture(self, scenario: str, description: str = "", **meta: Any) -> Capture:
        """The recording so far as a capture."""
        if self.engine_ident is None or self.engine_id is None:
            raise RuntimeError("no engine registered through the proxy")
        messages = sorted(self.messages, key=lambda m: m.t)
        meta.setdefault("recorder", "scripts/record_capture.py (proxy; peer ids mux/task/control)")
        return Capture(scenario=scenario, exec_key=self.key.decode(),
                       engine_ident=self.engine_ident, engine_id=self.engine_id,
                       messages=messages, description=description, meta=meta)


# -- legacy controller and engines -------------------------------------------------------------

def legacy_env(legacy_dir: str) -> dict[str, str]:
    """PY2, LEGACY_IPYTHON and PYTHONPATH from ``<legacy_dir>/env.sh``."""
    env = read_legacy_env(legacy_dir)
    if env is None:
        raise SystemExit("no legacy environment at %s (build it with ../shared/legacy/setup.sh)"
                         % legacy_dir)
    return env


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def start_controller(legacy: dict[str, str], workdir: str) -> tuple[subprocess.Popen, str]:
    """Start a legacy ipcontroller in ``workdir``; returns (process, its ipython dir)."""
    ipdir = os.path.join(workdir, "ipdir")
    security = os.path.join(ipdir, "profile_default", "security")
    log_path = os.path.join(workdir, "controller.log")
    script = os.path.join(legacy["LEGACY_IPYTHON"], "IPython", "parallel", "scripts",
                          "ipcontroller")
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([legacy["PY2"], "-W", "ignore", script, "--ip=127.0.0.1",
                                 "--ipython-dir=" + ipdir], stdout=out, stderr=subprocess.STDOUT,
                                env=py2_env(legacy, ipdir))
    deadline = time.monotonic() + 30
    while not (os.path.exists(os.path.join(security, "ipcontroller-client.json"))
               and os.path.exists(os.path.join(security, "ipcontroller-engine.json"))
               and "Scheduler started" in _read(log_path)):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            raise SystemExit("ipcontroller did not start:\n" + _read(log_path))
        time.sleep(0.1)
    time.sleep(0.3)
    return proc, ipdir


def engine_command(engine: str, config: str, legacy: dict[str, str] | None,
                   ipdir: str) -> tuple[list[str], dict[str, str], str]:
    """argv, environment and a version string for ``--engine``."""
    if engine == "ours":
        import platform
        return ([sys.executable, "-E", "-m", "streamkernel", "--config", config], py3_env(),
                "streamkernel %s, pyzmq %s, libzmq %s, Python %s" % (
                    __version__, zmq.__version__, zmq.zmq_version(), platform.python_version()))
    if engine in ("legacy", "legacy-recorder"):
        assert legacy is not None
        py2 = legacy["PY2"]
        version = subprocess.run(
            [py2, "-c", "import sys, zmq; print('pyzmq %s, libzmq %s, Python %s' % "
                        "(zmq.__version__, zmq.zmq_version(), sys.version.split()[0]))"],
            capture_output=True, text=True, env=py2_env(legacy, ipdir)).stdout.strip()
        if engine == "legacy":
            script = os.path.join(legacy["LEGACY_IPYTHON"], "IPython", "parallel", "scripts",
                                  "ipengine")
        else:
            script = os.path.abspath(RECORD_ENGINE)
        return ([py2, "-W", "ignore", script, "--file=" + config, "--ipython-dir=" + ipdir],
                py2_env(legacy, ipdir), "IPython 0.11, " + version)
    argv = [a.replace("{config}", config) for a in shlex.split(engine)]
    return argv, dict(os.environ), argv[0]


# -- scenarios ----------------------------------------------------------------------------------

def run_steps(client: Any, steps: Sequence[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
    """Send the scenario's requests with ``client``; returns the client's view of them."""
    names: dict[str, str] = {}
    view: list[dict[str, Any]] = []
    pending: dict[str, dict[str, Any]] = {}

    def finish(msg_id: str, wait: float) -> None:
        entry = pending.pop(msg_id, None)
        if entry is None:
            return
        try:
            reply = client.reply(msg_id, timeout=wait)
        except TimeoutError:
            entry["status"] = "no reply within %.1f s" % wait
            return
        content = reply["content"]
        entry["status"] = content.get("status")
        if content.get("ename"):
            entry["ename"] = content["ename"]
        if "matches" in content:
            entry["matches"] = content["matches"][:20]

    for step in steps:
        wait = step.get("wait", True)
        limit = float(step.get("timeout", timeout))
        if "sleep" in step:
            time.sleep(float(step["sleep"]))
            continue
        if "wait" in step and isinstance(step["wait"], list):
            for name in step["wait"]:
                finish(names.get(name, name), limit)
            continue
        if "execute" in step:
            entry = {"type": "execute_request", "code": step["execute"]}
            msg_id = client.execute(step["execute"])
        elif "complete" in step:
            entry = {"type": "complete_request", "text": step["complete"]}
            msg_id = client.complete(step["complete"], step.get("line"))
        elif "clear" in step:
            entry = {"type": "clear_request", "channel": "control"}
            msg_id = client.clear()
        elif "abort" in step:
            ids = [names.get(n, n) for n in (step["abort"] or [])]
            entry = {"type": "abort_request", "channel": "control", "msg_ids": ids}
            msg_id = client.abort(ids)
        elif "shutdown" in step:
            restart = bool((step["shutdown"] or {}).get("restart", False))
            entry = {"type": "shutdown_request", "channel": "control", "restart": restart}
            msg_id = client.shutdown(restart=restart)
        else:
            raise SystemExit("unknown scenario step %r" % step)
        entry["msg_id"] = msg_id
        if "name" in step:
            names[step["name"]] = msg_id
            entry["name"] = step["name"]
        view.append(entry)
        pending[msg_id] = entry
        if wait:
            finish(msg_id, limit)
    for msg_id in list(pending):
        finish(msg_id, timeout)
    return view


def load_scenario(args: argparse.Namespace) -> dict[str, Any]:
    if args.scenario_file:
        with open(args.scenario_file) as f:
            scenario = json.load(f)
    else:
        scenario = {"scenario": "commands", "steps": [{"execute": c} for c in args.execute]}
    if args.name:
        scenario["scenario"] = args.name
    if not scenario.get("steps"):
        raise SystemExit("the scenario has no steps (give a scenario file or -e CODE)")
    return scenario


def cmd_run(args: argparse.Namespace) -> int:
    from streamkernel.client import Client

    scenario = load_scenario(args)
    legacy = legacy_env(args.legacy_dir)
    procs: list[subprocess.Popen] = []
    proxy: RecordingProxy | None = None
    with tempfile.TemporaryDirectory(prefix="sk-record-") as work:
        try:
            controller, ipdir = start_controller(legacy, work)
            procs.append(controller)
            security = os.path.join(ipdir, "profile_default", "security")
            with open(os.path.join(security, "ipcontroller-engine.json")) as f:
                hub_info = json.load(f)
            proxy = RecordingProxy(hub_info)
            proxy.start()
            config = os.path.join(work, "proxied-engine.json")
            with open(config, "w") as f:
                json.dump(proxy.engine_file(), f)
            argv, env, version = engine_command(args.engine, config, legacy, ipdir)
            engine_log = os.path.join(work, "engine.log")
            engine_view = os.path.join(work, "engine-view.jsonl")
            env = dict(env, LEGACY_CAPTURE_LOG=engine_view,
                       LEGACY_CAPTURE_META=engine_view + ".meta")
            with open(engine_log, "wb") as out:
                engine = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
            procs.append(engine)
            if not proxy.registered.wait(20):
                raise SystemExit("the engine did not register:\n" + _read(engine_log))
            with Client(os.path.join(security, "ipcontroller-client.json"),
                        timeout=args.timeout) as client:
                client.wait_for_engines(1, timeout=20)
                time.sleep(0.2)
                view = run_steps(client, scenario["steps"], args.timeout)
                time.sleep(args.settle)
            exit_code = None
            if any("shutdown" in s for s in scenario["steps"]):
                try:
                    exit_code = engine.wait(5)
                except subprocess.TimeoutExpired:
                    pass
            meta = {"set": args.set, "legacy": version,
                    "client_view": {"requests": view, "engine_exit_code": exit_code}}
            capture = proxy.capture(scenario["scenario"], scenario.get("description", ""), **meta)
            capture.save(args.output)
            print("%s: %d messages (%s)" % (args.output, len(capture.messages), ", ".join(
                "%s %s %s" % (m.stream, m.dir, m.msg_type) for m in capture.messages)))
            if args.engine_view and os.path.exists(engine_view + ".meta"):
                with open(engine_view) as lines, open(engine_view + ".meta") as m:
                    other = capture_from_log(lines, json.load(m), capture.scenario,
                                             capture.description, **meta)
                other.meta["recorder"] = "tools/record_engine.py (engine sockets)"
                other.save(args.engine_view)
                print("%s: %d messages (engine view)" % (args.engine_view, len(other.messages)))
        finally:
            for proc in reversed(procs):
                stop_process(proc)
            if proxy is not None:
                proxy.stop()
            if args.keep_logs:
                os.makedirs(args.keep_logs, exist_ok=True)
                for name in ("controller.log", "engine.log"):
                    if os.path.exists(os.path.join(work, name)):
                        shutil.copy(os.path.join(work, name), args.keep_logs)
    return 0


def cmd_proxy(args: argparse.Namespace) -> int:
    with open(args.hub_file) as f:
        hub_info = json.load(f)
    proxy = RecordingProxy(hub_info)
    with open(args.engine_file, "w") as f:
        json.dump(proxy.engine_file(), f)
    proxy.start()
    print("engine connection file: %s (Ctrl-C or SIGTERM to stop and write %s)"
          % (args.engine_file, args.output), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    try:
        while not stop.wait(0.2):
            pass
    except KeyboardInterrupt:
        pass
    proxy.stop()
    if proxy.engine_ident is None:
        print("no engine registered: nothing written", file=sys.stderr)
        return 1
    capture = proxy.capture(args.name or "proxy", args.description, set=args.set)
    capture.save(args.output)
    print("%s: %d messages" % (args.output, len(capture.messages)))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    with open(args.log) as lines, open(args.meta) as m:
        capture = capture_from_log(lines, json.load(m), args.name, args.description, set=args.set)
    capture.save(args.output)
    print("%s: %d messages" % (args.output, len(capture.messages)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="record_capture.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log-level", default="WARNING", type=str.upper)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="controller + proxy + engine + scenario -> capture")
    run.add_argument("scenario_file", nargs="?", help="scenario JSON file")
    run.add_argument("-e", "--execute", action="append", default=[], metavar="CODE",
                     help="execute CODE (repeatable) instead of a scenario file")
    run.add_argument("-o", "--output", required=True, help="capture file to write")
    run.add_argument("--engine", default="legacy",
                     help="legacy (ipengine), legacy-recorder (tools/record_engine.py), ours, "
                          "or a command with {config} (default: %(default)s)")
    run.add_argument("--engine-view", metavar="PATH",
                     help="with --engine legacy-recorder: also write the engine's own view")
    run.add_argument("--legacy-dir", default=LEGACY_DIR, help="default: %(default)s")
    run.add_argument("--name", help="scenario name (default: from the file, or 'commands')")
    run.add_argument("--set", default="B", help="capture set label (default: %(default)s)")
    run.add_argument("--keep-logs", metavar="DIR", help="copy the controller and engine logs here")
    run.add_argument("--timeout", type=float, default=10.0, help="seconds per reply")
    run.add_argument("--settle", type=float, default=0.5,
                     help="seconds to keep recording after the last reply")
    run.set_defaults(func=cmd_run)

    prx = sub.add_parser("proxy", help="run only the recording proxy")
    prx.add_argument("--hub-file", required=True, help="the controller's ipcontroller-engine.json")
    prx.add_argument("--engine-file", required=True, help="connection file to write for the engine")
    prx.add_argument("-o", "--output", required=True)
    prx.add_argument("--name", default="")
    prx.add_argument("--description", default="")
    prx.add_argument("--set", default="B")
    prx.set_defaults(func=cmd_proxy)

    conv = sub.add_parser("convert", help="record_engine.py JSON lines -> capture")
    conv.add_argument("log")
    conv.add_argument("meta", help="the LEGACY_CAPTURE_META file")
    conv.add_argument("-o", "--output", required=True)
    conv.add_argument("--name", required=True)
    conv.add_argument("--description", default="")
    conv.add_argument("--set", default="B")
    conv.set_defaults(func=cmd_convert)

    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
