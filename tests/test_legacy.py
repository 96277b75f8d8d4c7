"""Python 2 (IPython 0.11) apply payloads: reading, running, and answering in their format.

The payloads in ``data/legacy_payloads.json`` were made by the real 0.11 code
(``data/make_legacy_fixtures.py``, Python 2.7 with numpy 1.16). Tests marked
``legacy`` also decode our replies with the real Python 2 ``unserialize_object``;
numpy cases there need numpy for Python 2, found on the legacy ``PYTHONPATH`` or
in ``$STREAMKERNEL_LEGACY_PY2PATH``.
"""
from __future__ import annotations

import base64
import io
import json
import math
import os
import pickle
import pickletools
import subprocess
import sys
from typing import Any

import pytest

from streamkernel import legacy
from streamkernel.errors import SerializationError
from streamkernel.serialize import is_legacy_payload, pack_apply_message

from .legacy_env import legacy_env

try:
    import numpy
except ImportError:  # pragma: no cover
    numpy = None  # type: ignore[assignment]

DATA = os.path.join(os.path.dirname(__file__), "data", "legacy_payloads.json")
with open(DATA) as _f:
    CASES: dict[str, Any] = {c["name"]: c for c in json.load(_f)["cases"]}


def frames(name: str) -> list[bytes]:
    return [base64.b64decode(f) for f in CASES[name]["frames"]]


#: Python 2 value (by case name) -> the Python 3 value the engine sees.
PY3: dict[str, Any] = {
    "none": None, "true": True, "false": False, "int": 42, "negative_int": -7,
    "int_64bit": 2 ** 40, "long_small": 5, "long_big": 2 ** 70, "float": 1.5,
    "float_inf": math.inf, "complex": complex(1, -2.5),
    "str_ascii": "abc", "str_empty": "", "str_utf8": b"caf\xc3\xa9", "str_binary": b"\xff\x00\x80",
    "str_long": "x" * 100, "unicode_ascii": "abc", "unicode_latin1": "caf\xe9",
    "unicode_astral": "\u20ac\U0001f600", "list": [1, "a", "\xe9", 2.5, None],
    "list_long": list(range(40)), "tuple": (1, "two", (3.0,)),
    "dict": {"a": [1, 2], "b": (3,), 1: None, "c": {"d": "e"}},
    "set": {1, "x", "y"}, "frozenset": frozenset([2, 3]), "nested_str": {"k": ["abc", b"\xff"]},
}
if numpy is not None:
    PY3.update({
        "array_f8": numpy.arange(5, dtype="f8"),
        "array_i4_2d": numpy.arange(6, dtype="i4").reshape(2, 3),
        "array_bool": numpy.array([True, False, True]),
        "array_c16": numpy.array([1 + 2j, 3 - 4j]),
        "array_be": numpy.array([1, 256], dtype=">i4"),
        "array_bytes": numpy.array([b"ab", b"c"]),
        "array_fortran": numpy.arange(6.0).reshape(2, 3),
        "array_0d": numpy.array(3.5),
        "array_empty": numpy.zeros((0, 3)),
        "numpy_scalar": numpy.float64(2.5),
    })
VALUE_NAMES = [c["name"][len("arg_"):] for c in CASES.values() if c["name"].startswith("arg_")]


def same(a: Any, b: Any, byte_order: bool = True) -> bool:
    """Equal, with the same types all the way down (arrays: same dtype and contents)."""
    if numpy is not None and isinstance(a, numpy.ndarray):
        dtype_ok = a.dtype == b.dtype if byte_order else a.dtype.newbyteorder("=") == \
            b.dtype.newbyteorder("=")
        return (type(b) is numpy.ndarray and dtype_ok and a.shape == b.shape
                and numpy.array_equal(a, b))
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y, byte_order) for x, y in zip(a, b))
    if isinstance(a, (dict, set, frozenset)):  # repr tells 'a' from b'a'
        return sorted(map(repr, a)) == sorted(map(repr, b)) and (
            not isinstance(a, dict) or all(same(a[k], b[k], byte_order) for k in a))
    return a == b or (a != a and b != b)


def expected(name: str) -> Any:
    if name not in PY3:
        pytest.skip("numpy is not installed")
    return PY3[name]


# -- Python 2 -> Python 3 -------------------------------------------------------------

@pytest.mark.parametrize("name", VALUE_NAMES)
def test_argument_and_keyword_arrive_with_the_documented_type(name):
    want = expected(name)
    f, args, kwargs = legacy.unpack_apply_message(frames("arg_" + name))
    assert f is len
    assert same(want, args[0]), (args[0], want)
    assert list(kwargs) == ["kw"] and same(want, kwargs["kw"])


@pytest.mark.parametrize("name", VALUE_NAMES)
def test_push_puts_the_value_in_the_namespace(name):
    want = expected(name)
    ns: dict[str, Any] = {}
    f, args, kwargs = legacy.unpack_apply_message(frames("push_" + name), ns)
    assert f(*args, **kwargs) is None
    # numpy turns pickled non-native arrays native; values are kept
    assert same(want, ns["v"], byte_order=False), (ns["v"], want)


@pytest.mark.parametrize("name", VALUE_NAMES)
def test_result_layout_of_python2_is_read(name):
    want = expected(name)
    value, rest = legacy.deserialize_object(frames("object_" + name))
    assert rest == []
    assert same(list(want) if type(want) is tuple else want, value)  # 0.11 made tuples lists


def test_numpy_arrays_are_zero_copy_views_of_their_frames():
    numpy_ = pytest.importorskip("numpy")
    fr = frames("arg_array_f8")
    big = bytearray(fr[3])
    f, args, _ = legacy.unpack_apply_message(fr[:3] + [big] + fr[4:])
    assert numpy_.shares_memory(args[0], numpy_.frombuffer(big, dtype="u1"))


# -- functions ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, result", [
    ("add", 5), ("sqrt", 4.0), ("pow", 1024), ("sorted", [3, 2, 1]), ("div", 3),
    ("div_float", 3.5), ("map", [1, 2, 3]), ("range", [0, 1, 2, 3]),
])
def test_callables_by_reference_run_with_python2_meaning(name, result):
    f, args, kwargs = legacy.unpack_apply_message(frames(name))
    assert same(result, f(*args, **kwargs))


def test_execute_push_pull_run_natively_in_the_namespace(capsys):
    ns: dict[str, Any] = {"__name__": "__main__"}
    for name in ("execute", "execute_unicode", "push", "execute_print"):
        f, args, kwargs = legacy.unpack_apply_message(frames(name), ns)
        assert f(*args, **kwargs) is None
    assert ns["ve"] == 20 and ns["s"] == "caf\xe9" and ns["a"] == 5
    assert capsys.readouterr().out == "out 5\n"
    f, args, kwargs = legacy.unpack_apply_message(frames("pull_one"), ns)
    assert f(*args, **kwargs) == 5
    f, args, kwargs = legacy.unpack_apply_message(frames("pull_many"), ns)
    assert f(*args, **kwargs) == [5, [1, 2]]
    f, args, kwargs = legacy.unpack_apply_message(frames("pull_missing"), ns)
    with pytest.raises(NameError, match="name 'nope' is not defined"):
        f(*args, **kwargs)


def test_execute_runs_python3_source_and_says_so():
    f, args, kwargs = legacy.unpack_apply_message(frames("execute_py2_syntax"), {})
    with pytest.raises(SyntaxError, match="runs as Python 3 on this engine"):
        f(*args, **kwargs)


def test_reference_reads_the_namespace():
    f, args, _ = legacy.unpack_apply_message(frames("reference"), {"a": [1, 2, 3]})
    assert f(*args) == 3
    with pytest.raises(NameError):
        legacy.unpack_apply_message(frames("reference"), {})


@pytest.mark.parametrize("name", ["lambda", "function_defaults", "lambda_in_args"])
def test_python2_functions_get_a_one_line_reason(name):
    with pytest.raises(legacy.Python2CodeError) as info:
        legacy.unpack_apply_message(frames(name), {})
    text = str(info.value)
    assert "\n" not in text
    assert "'<lambda>'" in text and "Python 2 bytecode" in text
    assert "operator.add" in text and "Python 3 client" in text


def test_depend_decorated_function_is_refused_clearly():
    with pytest.raises(SerializationError, match="@depend or @require") as info:
        legacy.unpack_apply_message(frames("dependent"), {})
    assert "\n" not in str(info.value)


# -- restricted unpickling -----------------------------------------------------------------

def _apply_frames(f_pickle: bytes) -> list[bytes]:
    return [f_pickle, b"\x80\x02].", b"\x80\x02}."]


@pytest.mark.parametrize("payload", [
    b"\x80\x02cposix\nsystem\nU\x04true\x85R.",                 # os.system('true')
    b"\x80\x02c__builtin__\neval\nU\x031+1\x85R.",             # eval('1+1')
    b"\x80\x02c__builtin__\n__import__\nU\x02os\x85R.",        # __import__('os')
    b"\x80\x02c__builtin__\ngetattr\nc__builtin__\nlen\nU\x04__eq\x86R.",
])
def test_nothing_but_constructors_runs_while_loading(payload):
    with pytest.raises(SerializationError, match="may not be called while unpickling"):
        legacy.unpack_apply_message(_apply_frames(payload))


@pytest.mark.parametrize("payload, reason", [
    (b"\x80\x02cantigravity\nfly\n.", "not available to Python 2 clients"),
    (b"\x80\x02c__main__\nf\n.", "client's __main__"),
    (b"\x80\x02cmath\nnope\n.", "not found"),
    (b"\x80\x02cmath\npi\n.", "only callables"),
])
def test_unknown_or_unsafe_names_are_refused(payload, reason):
    with pytest.raises(SerializationError, match=reason):
        legacy.unpack_apply_message(_apply_frames(payload))
    assert "antigravity" not in sys.modules


def test_c_functions_of_loaded_modules_run_by_reference():
    f, args, kwargs = legacy.unpack_apply_message(_apply_frames(b"\x80\x02cposix\ngetpid\n."))
    assert f() == os.getpid()


def test_native_payloads_are_not_legacy():
    assert not is_legacy_payload(pack_apply_message(pow, (2, 3))[0])
    assert is_legacy_payload(frames("add")[0])


# -- Python 3 -> Python 2 ------------------------------------------------------------------

class _Serialized:
    data: Any
    typeDescriptor: bytes
    metadata: dict

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({k.decode(): v for k, v in state.items()})


class _Py2Eyes(pickle.Unpickler):
    """Reads our replies as Python 2 types them: ``bytes`` is ``str``, ``str`` is ``unicode``."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("IPython.utils.newserialized", "SerializeIt"):
            return _Serialized
        if module.startswith("numpy.core") and hasattr(numpy, "_core"):
            module = "numpy._core" + module[len("numpy.core"):]
        return super().find_class(module, name)


def py2_view(reply: list[Any]) -> Any:
    """The value a Python 2 client gets, Python 2 ``str`` shown as ``bytes``."""
    def load(data: Any) -> Any:
        return _Py2Eyes(io.BytesIO(bytes(data)), encoding="bytes").load()
    head, data = load(reply[0]), iter(reply[1:])

    def value(s: _Serialized) -> Any:
        raw = s.data if s.data is not None else bytes(next(data))
        kind = s.typeDescriptor
        if kind == b"pickle":
            return load(raw)
        if kind == b"ndarray":
            return numpy.frombuffer(raw, s.metadata[b"dtype"]).reshape(s.metadata[b"shape"])
        return bytes(raw)
    if isinstance(head, list):
        return [value(s) for s in head]
    if isinstance(head, dict):
        return {k: value(head[k]) for k in sorted(head)}
    return value(head)


def opcodes(data: bytes) -> set[str]:
    return {op.name for op, _, _ in pickletools.genops(data)}


@pytest.mark.parametrize("value, py2", [
    (None, None), (True, True), (7, 7), (2 ** 40, 2 ** 40), (2 ** 70, 2 ** 70), (1.5, 1.5),
    (1 - 2j, 1 - 2j), ("abc", b"abc"), ("x" * 100, b"x" * 100), ("caf\xe9", "caf\xe9"),
    (b"\xff", b"\xff"), ([1, "a", "\xe9"], [1, b"a", "\xe9"]), ((1, "a"), (1, b"a")),
    ({"a": ("b",), 1: None}, {b"a": (b"b",), 1: None}), ({"x", 1}, {b"x", 1}),
    (frozenset([2]), frozenset([2])), (memoryview(b"ab"), b"ab"),
])
def test_reply_types_as_python2_sees_them(value, py2):
    reply = legacy.serialize_object(value)
    assert reply[0].startswith(b"\x80\x02")
    assert same(py2, py2_view(reply))


def test_ints_are_python2_int_within_64_bits_and_long_beyond():
    inner = py2_pickles(legacy.serialize_object([2 ** 40, -2 ** 63]))
    assert "INT" in opcodes(inner[0]) and "LONG1" not in opcodes(inner[0])
    assert "LONG1" in opcodes(py2_pickles(legacy.serialize_object(2 ** 64))[0])


def py2_pickles(reply: list[Any]) -> list[bytes]:
    head = _Py2Eyes(io.BytesIO(reply[0]), encoding="bytes").load()
    return [head.data if head.data is not None else bytes(reply[1])]


def test_arrays_go_as_raw_frames_in_lists_and_dicts():
    numpy_ = pytest.importorskip("numpy")
    a, b = numpy_.arange(6.0).reshape(2, 3), numpy_.arange(3, dtype=">i4")
    reply = legacy.serialize_object([a, "x", b])
    assert len(reply) == 3 and bytes(reply[1]) == a.tobytes()
    assert same([a, b"x", b], py2_view(reply))
    reply = legacy.serialize_object({"b": b, "a": a})
    assert [bytes(r) for r in reply[1:]] == [a.tobytes(), b.tobytes()]  # sorted key order
    f = numpy_.asfortranarray(a)
    assert same(a, py2_view(legacy.serialize_object(f)))
    assert same({b"k": a, b"n": None}, py2_view(legacy.serialize_object({"k": a, "n": None})))


@pytest.mark.parametrize("value", [
    None, 3, "abc", "caf\xe9", b"\xff", (1, (2,)), [1, "x"], {"a": 1, 2: "b"}, {1, 2},
    2 ** 70, -1.5, 3j, bytearray(b"\x00\xff"),
])
def test_python3_round_trip_through_the_legacy_format(value):
    assert same(value, legacy.deserialize_object(legacy.serialize_object(value))[0])


def test_unserializable_result_is_a_clear_error():
    with pytest.raises(SerializationError, match="cannot send function to a Python 2 client"):
        legacy.serialize_object(lambda: 1)
    inner: list[Any] = []
    knot = (inner,)
    inner.append(knot)
    with pytest.raises(SerializationError, match="tuple that contains itself"):
        legacy.serialize_object(knot)


def _shared_and_looped(depth: int) -> list[Any]:
    """A list whose levels each hold the level below twice (2**depth paths, depth
    lists), a list that contains itself and a dict that contains itself."""
    dag: list[Any] = []
    for _ in range(depth):
        dag = [dag, dag]
    loop: list[Any] = []
    loop.append(loop)
    knot: dict[str, Any] = {}
    knot["me"] = knot
    return [dag, loop, knot, (dag, dag)]


def test_shared_and_self_referencing_containers_are_written_once():
    """A second reference is a memo lookup, as in Python 2's pickle: the reply grows
    with the number of containers, not of paths through them (2**40 here)."""
    frames = legacy.serialize_object(_shared_and_looped(40))
    assert sum(len(bytes(memoryview(f))) for f in frames) < 2000
    dag, loop, knot, pair = legacy.deserialize_object(frames)[0]
    for _ in range(40):
        assert dag[0] is dag[1]
        dag = dag[0]
    assert dag == [] and loop[0] is loop and knot["me"] is knot and pair[0] is pair[1]


_PY2_SHAPES = r"""
import base64, cPickle, json, sys
frames = [base64.b64decode(f) for f in json.load(sys.stdin)]
head = cPickle.loads(frames[0])
# the pickle as Python 2 reads it (0.11's uncan() then copies containers, as it always did)
dag, loop, knot, pair = cPickle.loads(frames[1] if head.data is None else head.data)
depth = 0
while dag:
    assert dag[0] is dag[1]
    dag, depth = dag[0], depth + 1
json.dump([depth, loop[0] is loop, knot['me'] is knot, pair[0] is pair[1]], sys.stdout)
"""


@pytest.mark.legacy
def test_python2_reads_shared_and_self_referencing_containers():
    frames = [base64.b64encode(bytes(memoryview(f))).decode()
              for f in legacy.serialize_object(_shared_and_looped(40))]
    assert py2_run(_PY2_SHAPES, json.dumps(frames)) == [40, True, True, True]


# -- decoded by the real Python 2 client code ---------------------------------------------

_PY2_DECODE = r"""
import base64, json, sys
from IPython.parallel import util
try:
    import numpy
except ImportError:
    numpy = None

def sig(v, top=False):
    # type signature, with the documented exceptions folded in
    t = type(v).__name__
    if t == 'unicode' and all(ord(c) < 128 for c in v):
        t = 'str'
    if t == 'long' and -2 ** 63 <= v < 2 ** 63:
        t = 'int'
    if isinstance(v, (list, tuple)):
        return [t] + [sig(x) for x in v]
    if isinstance(v, dict):
        return [t] + sorted([sig(k), sig(x)] for k, x in v.items())
    if isinstance(v, (set, frozenset)):
        return [t] + sorted(sig(x) for x in v)
    if numpy is not None and isinstance(v, numpy.ndarray):
        return [t, v.dtype.newbyteorder('=').str, list(v.shape)]
    return t

def equal(a, b):
    if numpy is not None and isinstance(a, numpy.ndarray):
        return numpy.array_equal(a, b)
    return a == b

out = {}
for name, sent, ours in json.load(sys.stdin):
    if name.startswith('array') or name.startswith('numpy'):
        if numpy is None:
            continue
    orig = util.unpack_apply_message([base64.b64decode(f) for f in sent])[1][0]
    back = util.unserialize_object([base64.b64decode(f) for f in ours])[0]
    out[name] = [sig(orig), sig(back), bool(equal(orig, back)), repr(back)]
json.dump({'numpy': numpy is not None, 'results': out}, sys.stdout)
"""


def py2_run(script: str, stdin: str, timeout: float = 30) -> Any:
    env_vars = legacy_env()
    if env_vars is None:
        pytest.skip("legacy IPython 0.11 environment not found (set STREAMKERNEL_LEGACY_DIR)")
    path = env_vars["PYTHONPATH"]
    extra = os.environ.get("STREAMKERNEL_LEGACY_PY2PATH")
    env = dict(os.environ, PYTHONPATH=extra + os.pathsep + path if extra else path)
    done = subprocess.run([env_vars["PY2"], "-W", "ignore", "-c", script], input=stdin.encode(),
                          capture_output=True, env=env, timeout=timeout)
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


def _round_trip_in_python2(names: list[str]) -> dict[str, Any]:
    rows = []
    for name in names:
        value = legacy.unpack_apply_message(frames("arg_" + name))[1][0]
        ours = [base64.b64encode(bytes(memoryview(f))).decode()
                for f in legacy.serialize_object(value)]
        rows.append([name, CASES["arg_" + name]["frames"], ours])
    return py2_run(_PY2_DECODE, json.dumps(rows))


def _check_round_trip(names: list[str]) -> None:
    got = _round_trip_in_python2(names)
    if not got["results"] and names:
        pytest.skip("numpy for Python 2 not found (add its directory to "
                    "STREAMKERNEL_LEGACY_PY2PATH); arrays are checked by the tests above")
    assert sorted(got["results"]) == sorted(names)
    for name, (orig, back, equal, text) in got["results"].items():
        assert orig == back and equal, (name, orig, back, text)


@pytest.mark.legacy
def test_python2_reads_every_value_back_with_its_type():
    _check_round_trip([n for n in VALUE_NAMES if not n.startswith(("array", "numpy"))])


@pytest.mark.legacy
def test_python2_reads_numpy_values_back():
    names = [n for n in VALUE_NAMES if n.startswith(("array", "numpy"))]
    if numpy is None or not names:
        pytest.skip("numpy is not installed")
    _check_round_trip(names)


# -- in the kernel ---------------------------------------------------------------------------

def legacy_apply(h, name: str, kind: str = "mux") -> dict[str, Any]:
    msg = h.request("apply_request", {}, kind=kind, buffers=frames(name))
    _, reply = h.recv(kind)
    assert reply["parent_header"]["msg_id"] == msg["msg_id"]
    return reply


def test_kernel_answers_python2_requests_in_their_format(harness):
    for name, kind, result in (("add", "mux", 5), ("sorted", "task", [3, 2, 1])):
        reply = legacy_apply(harness, name, kind)
        header = reply["header"]
        assert header["status"] == "ok" and header["dependencies_met"] is True
        assert header["engine"] == harness.engine_id and "started" in header
        assert reply["content"] == {"status": "ok"}
        assert reply["buffers"][0].startswith(b"\x80\x02c" + b"IPython.utils.newserialized")
        assert legacy.deserialize_object(reply["buffers"])[0] == result


def test_kernel_runs_execute_push_pull_from_python2(harness):
    for name in ("push", "execute", "execute_print"):
        reply = legacy_apply(harness, name)
        assert reply["content"] == {"status": "ok"}, reply["content"]
        assert legacy.deserialize_object(reply["buffers"])[0] is None
    out = [m["content"] for _, m in harness.iopub() if m["msg_type"] == "stream"]
    assert {"name": "stdout", "data": "out 5\n"} in out
    reply = legacy_apply(harness, "pull_many")
    assert legacy.deserialize_object(reply["buffers"])[0] == [5, [1, 2]]


def test_python2_function_gets_an_error_reply_and_the_engine_keeps_serving(harness):
    reply = legacy_apply(harness, "lambda")
    content = reply["content"]
    assert reply["header"]["status"] == "error" and content["status"] == "error"
    assert content["ename"] == "Python2CodeError"
    assert "\n" not in content["evalue"] and "Python 3 client" in content["evalue"]
    assert reply["buffers"] == []
    pyerr = [m for _, m in harness.iopub() if m["msg_type"] == "pyerr"]
    assert pyerr and pyerr[-1]["content"]["ename"] == "Python2CodeError"
    assert legacy.deserialize_object(legacy_apply(harness, "pow")["buffers"])[0] == 1024


def test_nothing_is_unpickled_before_the_signature_checks_out(harness, monkeypatch):
    loads: list[Any] = []
    real_load = legacy._load

    def spy(data: Any) -> Any:
        loads.append(bytes(data))
        return real_load(data)
    monkeypatch.setattr(legacy, "_load", spy)
    msg = harness.client.msg("apply_request", {})
    forged = harness.client.serialize(msg, [b"client"]) + frames("add")
    forged[forged.index(b"<IDS|MSG>") + 1] = b"0" * 32
    harness.send_frames("mux", forged)
    assert harness.no_message() and loads == []
    assert legacy.deserialize_object(legacy_apply(harness, "add")["buffers"])[0] == 5
    assert loads


def test_native_requests_still_use_the_native_format(harness):
    from streamkernel.serialize import deserialize_object
    legacy_apply(harness, "add")
    harness.request("apply_request", {}, buffers=pack_apply_message(pow, (2, 5)))
    _, reply = harness.recv()
    assert not is_legacy_payload(reply["buffers"][0])
    assert deserialize_object(reply["buffers"])[0] == 32


_PY2_REPR = r"""
import base64, json, sys
from IPython.parallel import util
out = {}
for name, ours in json.load(sys.stdin):
    value = util.unserialize_object([base64.b64decode(f) for f in ours])[0]
    out[name] = repr(value)
json.dump(out, sys.stdout)
"""


@pytest.mark.legacy
def test_python2_reads_python3_results():
    import datetime
    cases = {
        "bytearray(b'ab')": bytearray(b"ab"), "bytearray(b'\\xffa')": bytearray(b"\xffa"),
        "datetime.datetime(2011, 7, 1, 12, 0)": datetime.datetime(2011, 7, 1, 12, 0),
        "(1, 2, 3, 4, 5)": (1, 2, 3, 4, 5), "()": (), "[]": [], "{}": {},
        "-1180591620717411303424L": -2 ** 70, "9223372036854775808L": 2 ** 63,
        "-9223372036854775808": -2 ** 63, "[300, -300, 70000, -70000]": [300, -300, 70000, -70000],
        "set([(1, 'a')])": {(1, "a")}, "{'k': '\\xff'}": {"k": b"\xff"}, "xrange(3)": range(3),
        "['%s']" % ("x" * 300): ["x" * 300], "u'%s'" % ("\\xe9" * 300): "\xe9" * 300,
        "ValueError(u'x',)": ValueError("x"), "(1+2j)": 1 + 2j, "[1.5, -0.0]": [1.5, -0.0],
    }
    rows = [[text, [base64.b64encode(bytes(memoryview(f))).decode()
                    for f in legacy.serialize_object(value)]] for text, value in cases.items()]
    got = py2_run(_PY2_REPR, json.dumps(rows))
    assert got == {text: text for text in cases}
