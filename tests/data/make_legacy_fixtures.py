# mypy: ignore-errors
# Python 2 only: writes tests/data/legacy_payloads.json with real IPython 0.11 payloads.
#
#   . /tmp/streamkernel-legacy/env.sh
#   PYTHONPATH=<dir with numpy for Python 2>:$PYTHONPATH $PY2 -W ignore \
#       tests/data/make_legacy_fixtures.py > tests/data/legacy_payloads.json
#
# Each case holds the frames that IPython.parallel.util made (base64), and the
# Python 2 type name and repr of the value, so tests can check both directions.
from __future__ import print_function

import base64
import json
import math
import operator
import sys

from IPython.parallel import util
from IPython.parallel.controller.dependency import depend
from IPython.utils.pickleutil import Reference

try:
    import numpy
except ImportError:
    numpy = None


def b64(frames):
    return [base64.b64encode(bytes(f)).decode("ascii") for f in frames]


def describe(value):
    return {"type": type(value).__name__, "repr": repr(value)}


VALUES = [
    ("none", None),
    ("true", True),
    ("false", False),
    ("int", 42),
    ("negative_int", -7),
    ("int_64bit", 2 ** 40),
    ("long_small", long(5)),  # noqa: F821 (Python 2)
    ("long_big", 2 ** 70),
    ("float", 1.5),
    ("float_inf", float("inf")),
    ("complex", complex(1, -2.5)),
    ("str_ascii", "abc"),
    ("str_empty", ""),
    ("str_utf8", "caf\xc3\xa9"),
    ("str_binary", "\xff\x00\x80"),
    ("str_long", "x" * 100),
    ("unicode_ascii", u"abc"),
    ("unicode_latin1", u"caf\xe9"),
    ("unicode_astral", u"\u20ac\U0001f600"),
    ("list", [1, "a", u"\xe9", 2.5, None]),
    ("list_long", list(range(40))),
    ("tuple", (1, "two", (3.0,))),
    ("dict", {"a": [1, 2], u"b": (3,), 1: None, "c": {"d": "e"}}),
    ("set", set([1, "x", u"y"])),
    ("frozenset", frozenset([2, 3])),
    ("nested_str", {"k": ["abc", "\xff"]}),
]

if numpy is not None:
    VALUES += [
        ("array_f8", numpy.arange(5, dtype="f8")),
        ("array_i4_2d", numpy.arange(6, dtype="i4").reshape(2, 3)),
        ("array_bool", numpy.array([True, False, True])),
        ("array_c16", numpy.array([1 + 2j, 3 - 4j])),
        ("array_be", numpy.array([1, 256], dtype=">i4")),
        ("array_bytes", numpy.array(["ab", "c"])),
        ("array_fortran", numpy.asfortranarray(numpy.arange(6.0).reshape(2, 3))),
        ("array_0d", numpy.array(3.5)),
        ("array_empty", numpy.zeros((0, 3))),
        ("numpy_scalar", numpy.float64(2.5)),
    ]


def case(name, f, args=(), kwargs=None, **extra):
    out = {"name": name, "frames": b64(util.pack_apply_message(f, args, kwargs or {}))}
    out.update(extra)
    return out


@depend(len, "x")
def depending(x):
    return x


def main():
    cases = []
    for name, value in VALUES:
        # a top-level argument and keyword (raw-frame paths), and a push of a dict
        cases.append(case("arg_" + name, len, (value,), {"kw": value}, value=describe(value)))
        cases.append(case("push_" + name, util._push, ({"v": value},), value=describe(value)))
        obj, bufs = util.serialize_object(value)
        cases.append({"name": "object_" + name, "frames": b64([obj] + bufs),
                      "value": describe(value)})
    cases += [
        case("execute", util._execute, ("ve = 10 * 2",)),
        case("execute_unicode", util._execute, (u"s = u'caf\xe9'",)),
        case("execute_print", util._execute, ("print('out', a)",)),
        case("execute_py2_syntax", util._execute, ("print 'hi'",)),
        case("push", util._push, ({"a": 5, "b": [1, 2]},)),
        case("pull_one", util._pull, ("a",)),
        case("pull_many", util._pull, (["a", "b"],)),
        case("pull_missing", util._pull, ("nope",)),
        case("add", operator.add, (2, 3)),
        case("div", operator.div, (7, 2)),
        case("div_float", operator.div, (7.0, 2)),
        case("sqrt", math.sqrt, (16.0,)),
        case("pow", pow, (2, 10)),
        case("sorted", sorted, ([3, 1, 2],), {"reverse": True}),
        case("map", map, (abs, [-1, 2, -3])),
        case("range", range, (4,)),
        case("reference", len, (Reference("a"),)),
        case("lambda", lambda x: x + 1, (1,)),
        case("function_defaults", util.interactive(lambda a, b=2: a * b), (3,)),
        case("lambda_in_args", map, (lambda x: x, [1, 2])),
        case("dependent", depending, (1,)),
        case("py2_buffer", len, (buffer("abcdef"),)),  # noqa: F821 (Python 2)
    ]
    json.dump({"python": sys.version.split()[0],
               "numpy": numpy.__version__ if numpy is not None else None,
               "cases": cases}, sys.stdout, indent=0, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
