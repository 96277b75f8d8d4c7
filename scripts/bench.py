#!/usr/bin/env python3
"""Benchmark engines side by side: ours, legacy 0.11, a protocol floor and the bare transport.

A StubHub (the hub the tests use) plays the hub for one engine at a time. Engines
are measured in alternation (A B C A B C ...) and the ratios ours/legacy and
ours/floor are taken from the same run. Prints one JSON object.

The floor (``bench.py floor --config FILE``) is a blocking pyzmq loop that does
only what the protocol requires per request: split identities, verify the
signature, parse header and content, build, sign and send the reply. An apply
request's data frames go back as the result without a copy, so its echo is the
transport's own speed on this machine. The transport (``bench.py floor --bare``)
registers and heartbeats like the floor but sends every message back as it came:
the most requests per second any engine could answer here, and so the highest
ratio to the legacy engine that a run can show.
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import pickle
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from typing import Any, Callable, Dict, List, Optional, Tuple

import zmq

from streamkernel.serialize import deserialize_object, pack_apply_message
from streamkernel.session import recv_frames, send_frames
from streamkernel.testing import StubHub, py3_env, read_legacy_env

DELIM = b"<IDS|MSG>"


# -- the floor --------------------------------------------------------------------------

def floor(config_path: str, bare: bool = False) -> int:
    """A minimal engine: register, echo heartbeats, answer every request 'ok'
    (``bare``: send every request back untouched)."""
    import threading

    with open(config_path) as f:
        cfg = json.load(f)
    key = cfg["exec_key"].encode()
    ident = str(uuid.uuid4())
    ctx = zmq.Context()
    auth = hmac.new(key, digestmod=hashlib.md5)
    dumps = json.JSONEncoder(separators=(",", ":")).encode

    def sign(parts: list[bytes]) -> bytes:
        h = auth.copy()
        for p in parts:
            h.update(p)
        return h.hexdigest().encode()

    def header(msg_type: str) -> dict[str, Any]:
        return {"msg_id": str(uuid.uuid4()), "msg_type": msg_type, "username": "floor",
                "session": ident, "date": datetime.now().strftime("%Y-%m-%dT%H:%M:%S.%f")}

    reg = ctx.socket(zmq.DEALER)
    reg.setsockopt(zmq.IDENTITY, ident.encode())
    reg.connect(cfg["url"])
    parts = [dumps(header("registration_request")).encode(), b"{}",
             dumps({"queue": ident, "heartbeat": ident, "control": ident}).encode()]
    reg.send_multipart([DELIM, sign(parts)] + parts)
    frames = reg.recv_multipart()
    content = json.loads(frames[frames.index(DELIM) + 4])
    shell = ctx.socket(zmq.ROUTER)
    shell.setsockopt(zmq.IDENTITY, ident.encode())
    shell.connect(content["mux"])
    shell.connect(content["task"])

    def heart() -> None:
        ping, pong = ctx.socket(zmq.SUB), ctx.socket(zmq.DEALER)
        ping.setsockopt(zmq.SUBSCRIBE, b"")
        pong.setsockopt(zmq.IDENTITY, ident.encode())
        ping.connect(content["heartbeat"][0])
        pong.connect(content["heartbeat"][1])
        zmq.proxy(ping, pong)
    threading.Thread(target=heart, daemon=True).start()
    if bare:
        while True:
            shell.send_multipart(shell.recv_multipart(copy=False), copy=False)

    # the result of an echo: a pickle whose one object is the next out-of-band frame
    echo_head = pickle.dumps(pickle.PickleBuffer(b""), protocol=5, buffer_callback=lambda b: False)
    seen: set[bytes] = set()
    while True:
        frames = shell.recv_multipart(copy=False)
        i = next(n for n, f in enumerate(frames) if f.bytes == DELIM)
        sig, h, p, c = (f.bytes for f in frames[i + 1:i + 5])
        if not hmac.compare_digest(sig, sign([h, p, c])) or sig in seen:
            continue
        seen.add(sig)
        req = json.loads(h)
        json.loads(c)
        rh = header(req["msg_type"].rpartition("_")[0] + "_reply")
        reply = [dumps(rh).encode(), h, b'{"status":"ok"}']
        data = [echo_head, frames[i + 8]] if len(frames) > i + 8 else []
        shell.send_multipart([f.bytes for f in frames[:i]] + [DELIM, sign(reply)] + reply + data,
                             copy=False)


# -- measuring --------------------------------------------------------------------------

def rss_kb(pid: int, field: str = "VmRSS") -> int:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class Run:
    """One engine process under a fresh StubHub."""

    def __init__(self, name: str, command: list[str], env: dict[str, str] | None,
                 workdir: str) -> None:
        self.name = name
        self.hub = StubHub(heartbeat_period=1.0)
        config = self.hub.write_connection_file(os.path.join(workdir, "engine-%s.json" % name))
        cmd = [c.replace("{config}", config) for c in command]
        self.log = open(os.path.join(workdir, "%s.log" % name), "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        try:
            self.eid = self.hub.register(timeout=30)
            self.hub.wait_beating(self.eid, timeout=30)
        except BaseException:
            self.close()
            raise
        time.sleep(0.3)
        self.sock = self.hub.sockets["mux"]

    def prepare(self, n: int, msg_type: str, content: dict[str, Any],
                buffers: list[Any] | None = None) -> list[list[Any]]:
        session, target = self.hub.session, self.hub.engines[self.eid].encode()
        return [session.serialize(session.msg(msg_type, content), [target, self.hub.client_id])
                + list(buffers or []) for _ in range(n)]

    def stream(self, requests: list[list[Any]], window: int) -> list[float]:
        """Send requests keeping ``window`` in flight; return per-reply latencies (s)."""
        sent_at: list[float] = []
        latencies: list[float] = []
        sent = received = 0
        n = len(requests)
        sock = self.sock
        sock.rcvtimeo = 30000
        clock = time.perf_counter
        try:
            while received < n:
                while sent < n and sent - received < window:
                    sent_at.append(clock())
                    send_frames(sock, requests[sent])
                    sent += 1
                # the plain calls: the client's own overhead is part of every latency
                if recv_frames(sock, wait=True) is None:
                    raise TimeoutError("%s: no reply (%d of %d)" % (self.name, received, n))
                latencies.append(clock() - sent_at[received])
                received += 1
        finally:
            sock.rcvtimeo = -1
        return latencies

    def throughput(self, msg_type: str, content: dict[str, Any], n: int, window: int,
                   buffers: list[Any] | None = None) -> tuple[float, list[float]]:
        reqs = self.prepare(n, msg_type, content, buffers)
        start = time.perf_counter()
        lat = self.stream(reqs, window)
        return n / (time.perf_counter() - start), lat

    def echo(self, size: int, array: bool = False, again: bool = False) -> dict[str, Any]:
        """Apply ``identity`` to ``size`` random bytes (or a numpy array of them, which
        travels without copies): MB/s both ways, and the engine's peak RSS. ``again``
        names the figures of an echo that repeats one the engine has served already."""
        payload: Any = os.urandom(size)
        if array:
            import numpy
            payload = numpy.frombuffer(payload, dtype="u1")
        buffers = pack_apply_message(_identity, (payload,), {})
        reqs = self.prepare(1, "apply_request", {}, buffers)
        start = time.perf_counter()
        self.sock.send_multipart(reqs[0], copy=False)
        if not self.sock.poll(120000):
            raise TimeoutError("no echo reply")
        frames = self.sock.recv_multipart(copy=False)
        elapsed = time.perf_counter() - start
        _, rest = self.hub.session.feed_identities(frames, copy=False)
        reply = self.hub.session.deserialize(rest, copy=False)
        if bytes(memoryview(deserialize_object(reply["buffers"])[0])) != bytes(payload):
            raise AssertionError("%s: the echo of %d bytes came back different" % (self.name, size))
        name = "echo_%dMB%s%s" % (size >> 20, "_array" if array else "", "_again" if again else "")
        return {name + "_MB_per_s": round(2 * size / elapsed / 1e6, 1),
                name + "_peak_rss_MB": round(rss_kb(self.proc.pid, "VmHWM") / 1024, 1)}

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.log.close()
        self.hub.close()


def _identity(x: Any) -> Any:
    return x


def _has_numpy() -> bool:
    try:
        import numpy  # noqa: F401
    except ImportError:
        return False
    return True


def measure_rate(run: Run, n: int, apply: bool, echo: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    execute = ("execute_request", {"code": "pass", "silent": False})
    run.throughput(*execute, n=min(n, 500), window=64)  # warm up
    out["execute_w64_per_s"], _ = run.throughput(*execute, n=n, window=64)
    out["execute_w1_per_s"], lat = run.throughput(*execute, n=n, window=1)
    lat.sort()
    out["latency_w1_p50_us"] = round(lat[len(lat) // 2] * 1e6, 1)
    out["latency_w1_p99_us"] = round(lat[int(len(lat) * 0.99)] * 1e6, 1)
    if apply:
        out["apply_tiny_w64_per_s"], _ = run.throughput(
            "apply_request", {}, n=n, window=64, buffers=pack_apply_message(abs, (-1,), {}))
    for k in list(out):
        if k.endswith("_per_s"):
            out[k] = round(out[k], 1)
    if echo:
        run.echo(1 << 10)  # warm up: the first by-value function imports dill
        for size in (1 << 20, 100 << 20):  # the first of its size, then the same again
            out.update(run.echo(size))
            out.update(run.echo(size, again=True))
        if _has_numpy():
            run.echo(1 << 10, array=True)  # warm up: the first array imports numpy
            out.update(run.echo(100 << 20, array=True))
    return out


def measure_memory(run: Run, big: int, apply: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"idle_rss_MB": round(rss_kb(run.proc.pid) / 1024, 1)}
    execute = ("execute_request", {"code": "pass", "silent": False})
    run.throughput(*execute, n=10_000, window=64)
    out["rss_after_10k_MB"] = round(rss_kb(run.proc.pid) / 1024, 1)
    run.throughput(*execute, n=big - 10_000, window=64)
    out["rss_after_%dk_MB" % (big // 1000)] = round(rss_kb(run.proc.pid) / 1024, 1)
    out["rss_growth_MB"] = round(out["rss_after_%dk_MB" % (big // 1000)]
                                 - out["rss_after_10k_MB"], 1)
    if apply:  # ours: output floods stay bounded
        before = rss_kb(run.proc.pid, "VmHWM")
        run.throughput("execute_request", {"code": "for i in range(500_000): print('x' * 99)"},
                       n=1, window=1)
        out["print_50MB_peak_rss_growth_MB"] = round(
            (rss_kb(run.proc.pid, "VmHWM") - before) / 1024, 1)
    return out


Engines = Dict[str, Tuple[List[str], Optional[Dict[str, str]]]]
#: engines that answer apply requests (and echo their data); engines whose memory counts
APPLY, MEMORY = ("ours", "floor"), ("ours", "legacy")


def engines(args: argparse.Namespace, parser: argparse.ArgumentParser, workdir: str) -> Engines:
    """name -> (command, environment)."""
    py3 = py3_env()
    floor_cmd = [sys.executable, "-E", os.path.abspath(__file__), "floor", "--config", "{config}"]
    found: Engines = {
        "ours": (args.engine.split() if args.engine else
                 [sys.executable, "-E", "-m", "streamkernel", "--config", "{config}",
                  "--log-level", "WARNING"], py3),
        "floor": (floor_cmd, py3),
        "transport": (floor_cmd + ["--bare"], py3),
    }
    if args.legacy:
        env = read_legacy_env(args.legacy)
        if env is None:
            parser.error("no legacy environment at %s" % args.legacy)
        legacy_env = dict(os.environ, PYTHONPATH=env["PYTHONPATH"],
                          IPYTHONDIR=os.path.join(workdir, "ipython"))
        script = os.path.join(env["LEGACY_IPYTHON"], "IPython", "parallel", "scripts", "ipengine")
        found["legacy"] = ([env["PY2"], "-W", "ignore", script, "--file={config}",
                            "--log-level=40"], legacy_env)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode")
    fl = sub.add_parser("floor", help="run the protocol floor engine (used by the benchmark)")
    fl.add_argument("--config", required=True)
    fl.add_argument("--bare", action="store_true",
                    help="send every message back untouched (the transport alone)")
    parser.add_argument("--legacy", metavar="DIR", default=None,
                        help="legacy environment (setup.sh DIR) to benchmark the 0.11 engine")
    parser.add_argument("--engine", default=None,
                        help="engine command, {config} is replaced (default: ours)")
    parser.add_argument("--requests", type=int, default=5000,
                        help="requests per throughput measurement (default 5000)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds per engine (default 3); medians are reported, "
                             "and each round's figures under 'rounds'")
    parser.add_argument("--memory-requests", type=int, default=100_000,
                        help="requests for the RSS-growth measurement (default 100000)")
    args = parser.parse_args(argv)
    if args.mode == "floor":
        return floor(args.config, args.bare)
    if args.rounds < 1 or args.requests < 100:
        parser.error("--rounds must be at least 1 and --requests at least 100")
    if args.memory_requests <= 10_000:
        parser.error("--memory-requests must be more than 10000 (RSS is read after 10k "
                     "requests and again after this many)")

    # SIGTERM unwinds like Ctrl-C, so every engine started is killed on the way out
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    result: dict[str, Any] = {"python": sys.version.split()[0], "rounds": args.rounds,
                              "requests": args.requests}
    with tempfile.TemporaryDirectory(prefix="bench-") as workdir:
        todo = engines(args, parser, workdir)
        rates: dict[str, list[dict[str, Any]]] = {name: [] for name in todo}
        for _ in range(args.rounds):
            for name, (cmd, env) in todo.items():
                run = Run(name, cmd, env, workdir)
                try:
                    rates[name].append(measure_rate(run, args.requests, apply=name in APPLY,
                                                    echo=name in APPLY))
                finally:
                    run.close()
        for name, (cmd, env) in todo.items():
            summary = {k: statistics.median(r[k] for r in rates[name]) for k in rates[name][0]}
            if args.rounds > 1:  # the medians' spread: one slow round is visible
                summary["rounds"] = {k: [r[k] for r in rates[name]] for k in rates[name][0]}
            if name in MEMORY:
                run = Run(name, cmd, env, workdir)
                try:
                    summary.update(measure_memory(run, args.memory_requests, name == "ours"))
                finally:
                    run.close()
            result[name] = summary
    ours = result["ours"]
    ratio: Callable[[str, str, str], float] = lambda a, b, k: round(
        result[a][k] / result[b][k], 2)
    execute = ("execute_w64_per_s", "execute_w1_per_s")
    result["ratios"] = {
        "ours/floor": {k: ratio("ours", "floor", k) for k in execute + (
            "apply_tiny_w64_per_s", "echo_1MB_MB_per_s", "echo_1MB_again_MB_per_s",
            "echo_100MB_MB_per_s", "echo_100MB_again_MB_per_s", "echo_100MB_array_MB_per_s")
            if k in ours},
        "ours/transport": {k: ratio("ours", "transport", k) for k in execute}}
    if "legacy" in result:
        for a in ("ours", "transport"):
            result["ratios"][a + "/legacy"] = {k: ratio(a, "legacy", k) for k in execute}
    print(json.dumps(result, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
