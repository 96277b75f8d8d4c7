"""The README's command blocks marked ``<!-- runnable ... -->`` run and print what they promise."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from .legacy_env import LEGACY_DIR, py3_env

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
BLOCK_TIMEOUT = 100
_BLOCK = re.compile(r"<!-- runnable:?(?P<opts>[^>]*)-->\n```sh\n(?P<code>.*?)```", re.S)


def _blocks() -> list:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    return [pytest.param(m.group("opts"), m.group("code"), id="block%d" % i)
            for i, m in enumerate(_BLOCK.finditer(text))]


@pytest.mark.integration
@pytest.mark.timeout(BLOCK_TIMEOUT + 60)
@pytest.mark.parametrize("opts, code", _blocks())
def test_readme_block_runs(opts: str, code: str) -> None:
    if "needs-legacy" in opts:
        if LEGACY_DIR != "/tmp/streamkernel-legacy" or not os.path.exists(
                os.path.join(LEGACY_DIR, "env.sh")):
            pytest.skip("the README block uses the legacy environment in /tmp/streamkernel-legacy")
        if not os.path.exists(os.path.join(ROOT, "..", "shared", "legacy", "setup.sh")):
            pytest.skip("the README block needs ../shared/legacy/setup.sh beside the checkout")
    env = py3_env()  # `python` and `python3` in a block: the interpreter running the tests
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    proc = subprocess.Popen(["bash", "-e", "-c", code], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=BLOCK_TIMEOUT)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the block left running
        except ProcessLookupError:
            pass
    if timed_out:
        out, _ = proc.communicate()
    text = out.decode("utf-8", "replace")
    assert not timed_out, "the block ran for more than %d s:\n%s" % (BLOCK_TIMEOUT, text)
    assert proc.returncode == 0, text
    for expected in re.findall(r'expect "([^"]*)"', opts):
        assert expected in text, text
