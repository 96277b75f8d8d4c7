"""The real IPython 0.11 client (Python 2) drives our engine through the real controller.

Needs the legacy environment (``$STREAMKERNEL_LEGACY_DIR``, default
``/tmp/streamkernel-legacy``). The numpy part runs when Python 2 can import numpy,
from the legacy ``PYTHONPATH`` or ``$STREAMKERNEL_LEGACY_PY2PATH``.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from .legacy_env import controller, kill, py2_env, start_engine, wait_for_log  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.legacy]

CLIENT = r"""
from __future__ import print_function
import json, operator, sys, time
from IPython.parallel import Client, error

def report(key, value):
    print('%-12s %r' % (key, value))
    sys.stdout.flush()
    results[key] = [type(value).__name__, repr(value)]

results = {}
rc = Client(sys.argv[1])
deadline = time.time() + 20
while not rc.ids and time.time() < deadline:
    time.sleep(0.05)
dv = rc[:]
dv.block = True
report('execute', dv.execute('a = 10 * 2'))
report('pull', dv.pull('a'))
dv.push({'d': {'x': 1, u'y': [2.5, 'z', u'caf\xe9', None, (1, 2)]}, 's': '\xff\x00'})
report('pull_dict', dv.pull(['d', 's']))
dv.scatter('r', range(10))
report('gather', dv.gather('r'))
report('add', rc[0].apply_sync(operator.add, 2, 3))
lv = rc.load_balanced_view()
report('lb_pow', lv.apply_sync(pow, 2, 10))
report('lb_map', lv.map_sync(abs, [-1, 2, -3]))
try:
    rc[0].apply_sync(lambda x: x + 1, 1)
except error.RemoteError as e:
    report('lambda', '%s: %s' % (e.ename, e.evalue))
try:
    dv.execute("print 'py2 syntax'")
except error.CompositeError as e:
    report('py2_syntax', str(e).splitlines()[-1])
report('after', rc[0].apply_sync(operator.mul, 6, 7))
try:
    import numpy
except ImportError:
    numpy = None
if numpy is not None:
    arr = numpy.arange(12, dtype='f8').reshape(3, 4)
    dv.push({'arr': arr})
    back = dv.pull('arr')[0]
    report('array', [back.dtype.str, back.shape, bool((back == arr).all())])
    dv.execute('import numpy; big = numpy.ones((1000, 3), dtype="i4") * 2')
    big = dv.pull('big')[0]
    report('big_array', [big.dtype.str, big.shape, int(big.sum())])
print('RESULTS ' + json.dumps(results))
"""


def test_python2_client_uses_our_engine(controller, tmp_path):  # noqa: F811
    engine, log_path = start_engine(controller.engine_file, str(tmp_path))
    client = None
    try:
        wait_for_log(log_path, "registered as engine 0", engine)
        script = tmp_path / "client.py"
        script.write_text(CLIENT)
        env = py2_env(controller.legacy, controller.ipython_dir)
        extra = os.environ.get("STREAMKERNEL_LEGACY_PY2PATH")
        if extra:
            env["PYTHONPATH"] = extra + os.pathsep + env["PYTHONPATH"]
        client = subprocess.Popen([controller.legacy["PY2"], "-W", "ignore", str(script),
                                   controller.client_file], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=env)
        out, err = client.communicate(timeout=40)
        text = out.decode()
        print(text)
        assert client.returncode == 0, err.decode()[-3000:]
        results = json.loads(text.rpartition("RESULTS ")[2])
        got = {k: v[1] for k, v in results.items()}
        assert got["execute"] == "[None]" and got["pull"] == "[20]"
        assert got["pull_dict"] == ("[[{'y': [2.5, 'z', u'caf\\xe9', None, (1, 2)], 'x': 1}, "
                                    "'\\xff\\x00']]")
        assert got["gather"] == repr(list(range(10)))
        assert got["add"] == "5" and got["lb_pow"] == "1024" and got["lb_map"] == "[1, 2, 3]"
        assert "Python2CodeError: cannot run Python 2 function '<lambda>'" in got["lambda"]
        assert "Python 3 client" in got["lambda"]
        assert "runs as Python 3 on this engine" in got["py2_syntax"]
        assert got["after"] == "42"
        if "array" in got:
            assert got["array"] == "['<f8', (3, 4), True]"
            assert got["big_array"] == "['<i4', (1000, 3), 6000]"
        log = wait_for_log(log_path, "registered")
        assert "Traceback" not in log
    finally:
        if client is not None:
            kill(client)
        kill(engine)
