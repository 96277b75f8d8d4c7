#!/usr/bin/env python3
"""Replay capture files against an engine and report how its messages differ.

Each capture's requests go, frames unchanged, to an engine registered with a stub
hub on 127.0.0.1 (exec_key and engine id from the capture). What the engine sends
is compared with what the recorded engine sent: per stream the same messages in
the same order, the same routing prefixes and topics, headers, parent headers,
contents and apply results. msg_id, date, session/engine uuid, username, signatures
(checked for validity instead), process ids and file paths and line numbers in
tracebacks are normalised. The intended differences documented in
tests/captures/README.md are applied first (see streamkernel/capture.py), with the
per-request expectations in <capture dir>/intended/<scenario>.json.

The engine is `python -m streamkernel --config {config}` by default, or any command
given with --engine ({config} becomes the connection file), or an Engine run inside
this process with --in-process. In-process, the engine is held before replying to
a request that others were queued behind in the recording, so they are queued
again; an engine process gets those requests right after it, which usually but not
always queues them in time.

Exit status: 0 when nothing differs beyond the normalised values and the intended
differences, 1 when something differs, 2 on bad usage.
"""
from __future__ import annotations

import os
import sys

if os.environ.get("PYTHONPATH") and not sys.flags.ignore_environment:
    # the legacy env.sh puts Python 2 packages on PYTHONPATH; keep them out
    os.execv(sys.executable, [sys.executable, "-E"] + sys.argv)

import argparse
import glob
import logging
import shlex
import time
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from streamkernel.capture import (Capture, CaptureError, Difference, Report, compare,  # noqa: E402
                                  overrides_for)
from streamkernel.replay import EngineTarget, default_command, replay  # noqa: E402


def replay_one(path: str, args: argparse.Namespace) -> Report:
    """Replay one capture and return the comparison report."""
    capture = Capture.load(path)
    overrides = overrides_for(capture, args.intended)
    command = None if args.in_process else (shlex.split(args.engine) if args.engine
                                            else default_command())
    with EngineTarget(capture, command, timeout=args.timeout) as target:
        result = replay(capture, target, timeout=args.timeout)
        report = compare(capture, result.messages, our_ident=target.ident,
                         overrides=overrides, problems=result.problems)
        if capture.select("registration", "out"):
            registration = compare(capture, target.registration[:1], our_ident=target.ident,
                                   streams=("registration",))
            report.compared += registration.compared
            report.differences += registration.differences
        if "shutdown_request" in capture.msg_types("in"):
            code = target.exited(3.0)
            if code != 0:
                report.differences.append(Difference(
                    "process", "after shutdown_reply", "exit status", 0,
                    "still running" if code is None else code))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="replay_capture.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("captures", nargs="+", metavar="CAPTURE",
                   help="capture files, or directories of them")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--engine", metavar="COMMAND",
                     help="engine command line; {config} becomes the connection file "
                          "(default: %s)" % " ".join(default_command()))
    how.add_argument("--in-process", action="store_true",
                     help="run streamkernel.engine.Engine in this process (holds the engine "
                          "while queued requests arrive)")
    p.add_argument("--intended", metavar="DIR",
                   help="directory of per-request expectations (default: intended/ beside "
                        "each capture)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per wait (default: 5)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also list every intended difference applied")
    p.add_argument("--log-level", default="WARNING", type=str.upper)
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")

    paths: list[str] = []
    for item in args.captures:
        if os.path.isdir(item):
            paths += sorted(glob.glob(os.path.join(item, "*.json")))
        else:
            paths.append(item)
    failed = compared = 0
    for path in paths:
        start = time.monotonic()
        try:
            report = replay_one(path, args)
        except (CaptureError, OSError, RuntimeError, TimeoutError) as e:
            print("%s: cannot replay: %s" % (path, e))
            failed += 1
            continue
        compared += report.compared
        failed += not report.ok
        print("%s %s (%.1f s)" % ("OK  " if report.ok else "DIFF", report.format(args.verbose),
                                  time.monotonic() - start))
    print("%d capture(s), %d message(s) compared, %d with differences"
          % (len(paths), compared, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
