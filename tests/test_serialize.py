"""serialize: objects and apply requests to buffers and back, with out-of-band data."""
from __future__ import annotations

import collections
import datetime
import decimal
import fractions
import functools
import math
import operator
import pickle
import signal
import socket
import threading
from dataclasses import dataclass
from typing import Any

import pytest
import zmq

from streamkernel.errors import SerializationError
from streamkernel.serialize import (COPY_THRESHOLD, SPLIT_COPY, _as_bytes, _wait,
                                    deserialize_object,
                                    interactive,
                                    is_legacy_payload, pack_apply_message, serialize_object,
                                    unpack_apply_message, unserialize_object)

try:
    import numpy
except ImportError:  # pragma: no cover
    numpy = None  # type: ignore[assignment]

needs_numpy = pytest.mark.skipif(numpy is None, reason="numpy is not installed")

MODULE_CONSTANT = 17
Point = collections.namedtuple("Point", "x y")


@dataclass
class Record:
    name: str
    values: list


def module_function(x: int, y: int = 1) -> int:
    return x * 10 + y


@interactive
def get_a() -> Any:
    return a  # type: ignore[name-defined] # noqa: F821 (from the engine's namespace)


@interactive
def set_b(value: Any) -> None:
    global b
    b = value  # type: ignore[name-defined]


@interactive
def call_helper() -> Any:
    return helper(3)  # type: ignore[name-defined] # noqa: F821


def round_trip(obj: Any, **kwargs: Any) -> Any:
    frames = serialize_object(obj, **kwargs)
    assert isinstance(frames[0], bytes)
    got, unused = deserialize_object(frames)
    assert unused == []
    return got


def apply_round_trip(f: Any, args: tuple = (), kwargs: dict | None = None,
                     ns: dict | None = None, through_frames: bool = False) -> Any:
    bufs = pack_apply_message(f, args, kwargs)
    if through_frames:
        bufs = [zmq.Frame(bytes(memoryview(b))) for b in bufs]
    g, a, kw = unpack_apply_message(bufs, {} if ns is None else ns)
    return g(*a, **kw)


def address(buf: Any) -> int:
    """Address of the first byte of a buffer."""
    return numpy.frombuffer(buf, dtype=numpy.uint8).ctypes.data


# -- round trips -------------------------------------------------------------------------

VALUES = [
    None, True, False, 0, -1, 2 ** 100, 1.5, float("inf"), -0.0, 1 + 2j,
    "", "caf\u00e9 \u2603 \U0001f600", "x" * 10_000,
    b"", b"small", b"\x00\xff" * 5_000,
    bytearray(b"abc"), bytearray(range(256)) * 100,
    [], [1, [2, [3]]], (), (1, (2,)), {}, {"a": {1: 2}, (1, 2): None},
    set(), {1, 2, 3}, frozenset({"x"}),
    range(10), slice(1, 20, 3), Ellipsis, NotImplemented,
    datetime.datetime(2011, 7, 31, 1, 2, 3, 4), datetime.timedelta(seconds=5),
    decimal.Decimal("1.10"), fractions.Fraction(1, 3),
    collections.OrderedDict([("b", 1), ("a", 2)]), collections.Counter("hello"),
    Point(1, 2), Record("r", [1, 2]),
    ValueError("boom", 2), int, len, pow, operator.add, module_function,
    functools.partial(module_function, 2),
    {"nested big bytes": b"q" * 1000, "list": [b"w" * 1000]},
]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
def test_round_trip(value: Any) -> None:
    got = round_trip(value)
    if isinstance(value, BaseException):
        assert type(got) is type(value) and got.args == value.args
    elif isinstance(value, functools.partial):
        assert got() == value()
    else:
        assert got == value
        assert type(got) is type(value)


def test_round_trip_nan_and_identity_of_shared_objects() -> None:
    assert math.isnan(round_trip(float("nan")))
    shared = [1, 2]
    got = round_trip({"a": shared, "b": shared})
    assert got["a"] is got["b"]


def test_round_trip_of_recursive_structure() -> None:
    lst: list = [1]
    lst.append(lst)
    got = round_trip(lst)
    assert got[0] == 1 and got[1] is got


def test_round_trip_of_top_level_sequences() -> None:
    big = b"k" * 5000
    assert round_trip([big, 1, "x"]) == [big, 1, "x"]
    assert round_trip((big, big)) == (big, big)


def test_local_class_and_instances_travel_by_value() -> None:
    class Local:
        def __init__(self, v: int) -> None:
            self.v = v

        def double(self) -> int:
            return 2 * self.v
    got = round_trip(Local(21))
    assert got.double() == 42


def test_legacy_alias() -> None:
    assert unserialize_object is deserialize_object


# -- out-of-band buffers ---------------------------------------------------------------

def test_small_buffers_stay_in_band_large_ones_go_out() -> None:
    assert len(serialize_object(b"x" * (COPY_THRESHOLD - 1))) == 1
    assert len(serialize_object(b"x" * COPY_THRESHOLD)) == 2
    assert len(serialize_object(b"x" * 10, threshold=5)) == 2
    assert len(serialize_object(memoryview(b"x" * 10))) == 1


def test_large_bytes_are_not_copied() -> None:
    data = bytes(range(256)) * 1000
    frames = serialize_object(data)
    assert len(frames) == 2
    assert address(frames[1]) == address(data)      # sent from the object itself
    got, _ = deserialize_object([frames[0], data])
    assert got is data                               # received bytes are used as they are


def test_large_memoryview_is_not_copied() -> None:
    backing = bytearray(range(256)) * 1000
    view = memoryview(backing)
    frames = serialize_object(view)
    assert len(frames) == 2
    assert address(frames[1]) == address(backing)
    received = bytearray(frames[1])
    got, _ = deserialize_object([frames[0], received])
    assert isinstance(got, memoryview)
    assert address(got) == address(received)
    assert got == view


def test_strided_memoryview_is_copied_in_band() -> None:
    view = memoryview(bytes(range(256)) * 100)[::2]
    got = round_trip(view)
    assert bytes(got) == view.tobytes()


def test_large_bytearray_goes_out_of_band() -> None:
    data = bytearray(range(256)) * 1000
    frames = serialize_object(data)
    assert len(frames) == 2, "a large bytearray must travel as its own frame"
    assert address(frames[1]) == address(data)
    got, _ = deserialize_object([frames[0], bytes(frames[1])])
    assert got == data and type(got) is bytearray


@pytest.mark.parametrize("extra", [0, 1, 4097])
def test_large_frames_become_bytes_copied_in_two_halves(extra: int) -> None:
    data = bytes(range(251)) * ((SPLIT_COPY + extra) // 251 + 1)  # every byte in its place
    data = data[:SPLIT_COPY + extra]
    frames = serialize_object(data)
    received = zmq.Frame(bytes(frames[1]))  # read-only, as the engine receives it
    got, _ = deserialize_object([frames[0], received])
    assert type(got) is bytes and got == data
    assert address(got) != address(received)


def test_an_interrupt_of_a_split_copy_waits_for_the_helper_thread() -> None:
    finished = threading.Event()
    threading.Timer(0.5, finished.set).start()  # the helper's copy ends in 0.5 s
    main = threading.get_ident()
    threading.Timer(0.05, signal.pthread_kill, (main, signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        _wait(finished)
    assert finished.is_set()  # raised only once the helper had finished


def test_large_bytes_from_a_read_only_view_of_another_type() -> None:
    backing = bytes(range(256)) * (SPLIT_COPY // 256 + 1)
    view = memoryview(backing).cast("B", shape=[len(backing)]).toreadonly().cast("I")
    assert _as_bytes(view) == backing


def test_extra_frames_are_returned_unused() -> None:
    frames = serialize_object(b"x" * 1000) + [b"extra"]
    got, unused = deserialize_object(frames)
    assert got == b"x" * 1000 and unused == [b"extra"]


@needs_numpy
@pytest.mark.parametrize("make", [
    lambda: numpy.arange(10_000, dtype=numpy.float64),
    lambda: numpy.arange(10_000, dtype=numpy.int32).reshape(100, 100),
    lambda: numpy.asfortranarray(numpy.arange(10_000.0).reshape(100, 100)),
    lambda: numpy.zeros(1000, dtype=[("a", "i4"), ("b", "f8")]),
    lambda: numpy.ones(1000, dtype=bool),
    lambda: (numpy.arange(1000) * 1j),
], ids=["float64", "int32-2d", "fortran", "structured", "bool", "complex"])
def test_numpy_arrays_are_not_copied(make: Any) -> None:
    arr = make()
    frames = serialize_object(arr)
    assert len(frames) == 2
    assert address(frames[1]) == arr.ctypes.data            # sent zero-copy
    frame = zmq.Frame(bytes(frames[1]))
    got, _ = deserialize_object([frames[0], frame])
    assert got.ctypes.data == address(frame.buffer)           # received zero-copy
    numpy.testing.assert_array_equal(got, arr)
    assert got.dtype == arr.dtype and got.shape == arr.shape
    assert got.flags.f_contiguous == arr.flags.f_contiguous


@needs_numpy
@pytest.mark.parametrize("make", [
    lambda: numpy.arange(10_000).reshape(100, 100)[:, ::2],
    lambda: numpy.arange(10_000)[::-3],
    lambda: numpy.array(3.5),
    lambda: numpy.array([], dtype=numpy.float32),
    lambda: numpy.array([1, "a", None], dtype=object),
    lambda: numpy.arange(5),
], ids=["strided", "reversed", "0d", "empty", "object", "small"])
def test_numpy_arrays_of_every_layout_round_trip(make: Any) -> None:
    arr = make()
    got = round_trip(arr)
    numpy.testing.assert_array_equal(got, arr)
    assert got.dtype == arr.dtype and got.shape == arr.shape


@needs_numpy
def test_read_only_array_round_trips() -> None:
    arr = numpy.arange(1000)
    arr.flags.writeable = False
    numpy.testing.assert_array_equal(round_trip(arr), arr)


@needs_numpy
def test_numpy_inside_containers_goes_out_of_band() -> None:
    arrays = [numpy.arange(1000), numpy.ones((50, 50))]
    frames = serialize_object({"a": arrays[0], "b": [arrays[1]]})
    assert len(frames) == 3
    got, _ = deserialize_object(frames)
    numpy.testing.assert_array_equal(got["a"], arrays[0])
    numpy.testing.assert_array_equal(got["b"][0], arrays[1])


# -- apply -------------------------------------------------------------------------------

def test_apply_builtin_and_module_function_by_reference() -> None:
    assert apply_round_trip(pow, (2, 10)) == 1024
    assert apply_round_trip(module_function, (4,), {"y": 2}) == 42
    bufs = pack_apply_message(module_function, (1,))
    f, _, _ = unpack_apply_message(bufs, {})
    assert f is module_function


def test_apply_lambda_and_closure_travel_by_value() -> None:
    assert apply_round_trip(lambda x, y=1: x * y, (6,), {"y": 7}) == 42

    def make_adder(n: int) -> Any:
        def add(x: int) -> int:
            return x + n
        return add
    assert apply_round_trip(make_adder(40), (2,)) == 42
    assert apply_round_trip(lambda: MODULE_CONSTANT) == 17


def test_apply_recursive_local_function() -> None:
    def fact(n: int) -> int:
        return 1 if n < 2 else n * fact(n - 1)
    assert apply_round_trip(fact, (5,), through_frames=True) == 120


def test_apply_with_many_argument_kinds_through_zmq_frames() -> None:
    big = b"b" * 5000
    view = memoryview(bytearray(b"v" * 5000))
    got = apply_round_trip(lambda *a, **k: (a, sorted(k.items())),
                           (big, view, [1, 2], "s"), {"k": big, "m": {"n": None}},
                           through_frames=True)
    args, kwargs = got
    assert args[0] == big and bytes(args[1]) == bytes(view) and args[2:] == ([1, 2], "s")
    assert kwargs == [("k", big), ("m", {"n": None})]


@needs_numpy
def test_apply_numpy_arguments_are_received_without_copy() -> None:
    arr = numpy.arange(10_000.0)
    bufs = pack_apply_message(numpy.sum, (arr,))
    assert len(bufs) == 4
    frames = [zmq.Frame(bytes(memoryview(b))) for b in bufs]
    f, args, kwargs = unpack_apply_message(frames, {})
    assert args[0].ctypes.data == address(frames[3].buffer)
    assert f(*args, **kwargs) == arr.sum()


def test_interactive_functions_use_the_given_namespace() -> None:
    ns: dict[str, Any] = {"a": 5}
    bufs = pack_apply_message(get_a)
    f, args, kwargs = unpack_apply_message(bufs, ns)
    assert f.__globals__ is ns
    assert f() == 5
    apply_round_trip(set_b, (9,), ns=ns)
    assert ns["b"] == 9
    ns["helper"] = lambda x: x * 2
    assert apply_round_trip(call_helper, ns=ns) == 6
    # the sender's function is left as it was
    assert get_a.__globals__ is globals()
    assert "b" not in globals()


def test_interactive_marks_the_function() -> None:
    def f() -> None:
        pass
    assert interactive(f) is f
    assert f.__module__ == "__main__"
    ns: dict[str, Any] = {"x": 1}
    g = interactive(lambda: x)  # type: ignore[name-defined] # noqa: F821
    assert apply_round_trip(g, ns=ns) == 1


def test_interactive_lambda_keeps_defaults_and_kwdefaults() -> None:
    def f(p: int, q: int = 2, *, r: int = 3) -> int:
        return p + q + r + c  # type: ignore[name-defined] # noqa: F821
    assert apply_round_trip(interactive(f), (1,), ns={"c": 100}) == 106


def test_is_legacy_payload() -> None:
    assert is_legacy_payload(pickle.dumps(5, protocol=2))
    assert is_legacy_payload(pickle.dumps(5, protocol=0))
    assert not is_legacy_payload(serialize_object(5)[0])
    assert not is_legacy_payload(zmq.Frame(serialize_object(5)[0]))
    assert is_legacy_payload(b"")


# -- errors ----------------------------------------------------------------------------

def _generator() -> Any:
    yield 1


class _RefusesPickling:
    def __reduce__(self) -> Any:
        raise RuntimeError("no pickling for me")


@pytest.mark.parametrize("make", [
    _generator, _RefusesPickling, socket.socket,
    lambda: {"nested": [_generator()]},
], ids=["generator", "reduce-raises", "socket", "nested-generator"])
def test_unpicklable_objects_raise_serialization_error(make: Any) -> None:
    obj = make()
    if isinstance(obj, socket.socket):
        obj.close()
    with pytest.raises(SerializationError):
        serialize_object(obj)
    with pytest.raises(SerializationError):
        pack_apply_message(len, (obj,))
    with pytest.raises(SerializationError):
        pack_apply_message(len, (), {"k": obj})


def test_unpicklable_function_raises_serialization_error() -> None:
    gen = _generator()
    with pytest.raises(SerializationError):
        pack_apply_message(lambda: gen)


def test_deep_structure_raises_serialization_error_or_round_trips() -> None:
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    try:
        got = round_trip(deep)
    except SerializationError:
        return
    assert isinstance(got, list)


@pytest.mark.parametrize("frames", [
    [b"garbage"],
    [b"\x80\x05garbage"],
    [b""],
    [pickle.dumps(5, protocol=5)[:-1]],
    [pickle.dumps(pickle.PickleBuffer(b"x" * 100), protocol=5, buffer_callback=lambda b: False)],
    [b"\x80\x04\x95\x1a\x00\x00\x00\x00\x00\x00\x00\x8c\x0bno_such_mod\x94\x8c\x01x\x94\x93\x94."],
], ids=["garbage", "bad-protocol-5", "empty", "truncated", "missing-buffer", "missing-module"])
def test_bad_pickles_raise_serialization_error(frames: list[bytes]) -> None:
    with pytest.raises(SerializationError):
        deserialize_object(frames)


def test_deserialize_nothing() -> None:
    with pytest.raises(SerializationError):
        deserialize_object([])


def test_pack_apply_argument_checks() -> None:
    with pytest.raises(TypeError):
        pack_apply_message(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        pack_apply_message(len, "abc")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        pack_apply_message(len, (), [("k", 1)])  # type: ignore[arg-type]


def test_unpack_apply_checks() -> None:
    good = pack_apply_message(len, ([1],))
    with pytest.raises(SerializationError):
        unpack_apply_message(good[:2])
    with pytest.raises(SerializationError):
        unpack_apply_message([serialize_object(5)[0]] + good[1:])
    with pytest.raises(SerializationError):
        unpack_apply_message(good[:1] + [serialize_object("not args")[0]] + good[2:])
    with pytest.raises(SerializationError):
        unpack_apply_message(good[:2] + [serialize_object(["not", "kwargs"])[0]])
    with pytest.raises(SerializationError):
        unpack_apply_message([b"junk"] + good[1:])
    big = pack_apply_message(len, (b"x" * 1000,))
    with pytest.raises(SerializationError):
        unpack_apply_message(big[:3])   # its data frame is missing
