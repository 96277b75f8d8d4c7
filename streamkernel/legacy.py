"""Apply requests from Python 2 (IPython 0.11) clients, answered in their own format.

A 0.11 client packs ``f(*args, **kwargs)`` as Python 2 pickles (protocol 2)::

    [pickle(can(f)), pickle([SerializeIt, ...]), pickle({name: SerializeIt}), data, ...]

A ``SerializeIt`` carries one value: a pickle, a raw ``str`` ("bytes"), a
``buffer``, or an array's raw memory ("ndarray", always in its own data frame);
data larger than 64 bytes travels in the data frames, in argument order and then
keyword order. The result goes back as ``[pickle(SerializeIt, list or dict of
them), data, ...]``, as the client's ``unserialize_object`` expects.

Payloads are read with a restricted unpickler: only the 0.11 wrapper classes
(local stand-ins), data constructors (``set``, ``complex``, ``copy_reg._reconstructor``,
numpy arrays, datetime...) run while unpickling. Other module-level callables,
such as ``operator.add``, ``math.sqrt``, ``pow``, ``posix.getpid``, arrive as
inert references and are only resolved once the pickle is loaded. Python 2
builtins keep their Python 2 meaning (``map``, ``filter``, ``zip`` and ``range``
return lists; ``reduce``, ``apply``, ``cmp``, ``xrange``, ``unicode``, ``long`` and
``operator.div`` exist).

Python 2 functions travel as bytecode and never run. The three helpers a
0.11 view sends (``util._execute`` for ``execute``, ``util._push`` and
``util._pull`` for ``push``/``pull``/``scatter``/``gather``) are recognised by
name, docstring and file name and replaced by native equivalents;
``execute`` code runs as Python 3 source. Any other function gets a
:class:`Python2CodeError`.

Type rules, Python 2 -> Python 3:

* ``str`` -> ``str`` when it is ASCII, else ``bytes``; ``unicode`` -> ``str``;
* ``int`` and ``long`` -> ``int``; ``buffer`` -> ``memoryview``;
* ``None``, ``bool``, ``float``, ``complex``, ``list``, ``tuple``, ``dict``,
  ``set``, ``frozenset`` and numpy arrays and scalars keep their type.

Python 3 -> Python 2:

* ``str`` -> ``str`` when it is ASCII, else ``unicode``; ``bytes`` -> ``str``;
* ``int`` -> ``int`` within 64 bits, else ``long``; ``memoryview`` -> ``str``;
* the other types above keep their type; a top-level tuple stays a tuple;
* anything else is pickled with protocol 2 and Python 2 module names, and reads
  back only if the client has the same class.

So every Python 2 value comes back with the type it had, except an ASCII
``unicode`` (returned as the equal ``str``) and a ``long`` that fits in 64 bits
(returned as the equal ``int``).
"""
from __future__ import annotations

import _compat_pickle
import collections
import copyreg
import datetime
import functools
import importlib
import io
import itertools
import logging
import operator
import pickle
import struct
import sys
from typing import Any, Callable, Iterator, Sequence

from .errors import SerializationError

log = logging.getLogger(__name__)


def _numpy(load: bool = False) -> Any:
    """numpy when it is already imported (no numpy object can exist otherwise), or,
    with ``load``, when it can be; None without numpy. Keeps numpy out of an idle engine."""
    module = sys.modules.get("numpy")
    if module is None and load:
        try:
            import numpy as module
        except ImportError:  # numpy is optional
            return None
    return module


#: Values whose data is larger than this many bytes travel in their own frame.
THRESHOLD = 64

_NEWSERIALIZED = "IPython.utils.newserialized"
_PICKLEUTIL = "IPython.utils.pickleutil"
_HINT = ("send a builtin or by-reference callable such as operator.add or math.sqrt, "
         "run Python 3 source with view.execute(), or use a Python 3 client")


class Python2CodeError(SerializationError):
    """A Python 2 function (bytecode) was sent; this engine cannot run it."""


# -- Python 2 builtins with their Python 2 meaning ------------------------------------

def _py2_map(f: Any, *seqs: Any) -> list:
    if len(seqs) == 1:
        return list(seqs[0]) if f is None else [f(x) for x in seqs[0]]
    rows = itertools.zip_longest(*seqs)
    return list(rows) if f is None else [f(*row) for row in rows]


def _py2_filter(f: Any, seq: Any) -> Any:
    kept = [x for x in seq if (f(x) if f is not None else x)]
    if isinstance(seq, str):
        return "".join(kept)
    return tuple(kept) if isinstance(seq, tuple) else kept


def _py2_zip(*seqs: Any) -> list:
    return list(zip(*seqs))


def _py2_range(*args: int) -> list:
    return list(range(*args))


def _py2_apply(f: Any, args: Sequence[Any] = (), kwargs: dict | None = None) -> Any:
    return f(*args, **(kwargs or {}))


def _py2_cmp(a: Any, b: Any) -> int:
    return (a > b) - (a < b)


def _py2_bytearray(data: Any = b"", encoding: Any = None, *rest: Any) -> bytearray:
    if isinstance(data, str) and encoding is not None:
        return bytearray(data, _text(encoding), *rest)
    return bytearray(data)


def _py2_div(a: Any, b: Any) -> Any:
    return a // b if isinstance(a, int) and isinstance(b, int) else a / b


_PY2_NAMES: dict[tuple[str, str], Any] = {("__builtin__", k): v for k, v in {
    "map": _py2_map, "filter": _py2_filter, "zip": _py2_zip, "range": _py2_range,
    "apply": _py2_apply, "cmp": _py2_cmp, "reduce": functools.reduce, "xrange": range,
    "unicode": str, "long": int, "basestring": str, "buffer": memoryview,
    "intern": sys.intern, "unichr": chr, "bytearray": _py2_bytearray}.items()}
_PY2_NAMES.update({("operator", "div"): _py2_div, ("operator", "isCallable"): callable,
                   ("operator", "sequenceIncludes"): operator.contains})

#: What may be called while a payload is unpickled (besides the stand-ins below).
_CONSTRUCTORS = frozenset([
    object, set, frozenset, complex, list, tuple, dict, int, float, str, bytes, bool,
    range, slice, memoryview, _py2_bytearray, collections.OrderedDict, datetime.date,
    datetime.time, datetime.datetime, datetime.timedelta,
])
#: Modules that may be imported to resolve a by-reference callable (besides loaded ones).
_IMPORTABLE = frozenset(["math", "cmath", "operator", "itertools", "functools", "string",
                         "time", "heapq", "bisect", "struct", "binascii", "zlib", "numpy"])


def _text(b: Any) -> Any:
    """A Python 2 ``str``: ``str`` when ASCII, else the ``bytes`` themselves."""
    try:
        return b.decode("ascii")
    except UnicodeDecodeError:
        return b


# -- stand-ins for the 0.11 classes -------------------------------------------------------

def _state(state: dict) -> dict[str, Any]:
    return {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in state.items()}


class _SerializeIt:
    """IPython.utils.newserialized.SerializeIt: one value, as pickle, raw str, buffer or array."""

    def __init__(self, data: Any = None, kind: str = "pickle",
                 metadata: dict | None = None) -> None:
        self.data = data
        self.kind = kind
        self.metadata = metadata or {}

    def __setstate__(self, state: dict) -> None:
        state = _state(state)
        self.data = state.get("data")
        self.kind = _text(state.get("typeDescriptor", b"pickle"))
        self.metadata = _convert(state.get("metadata") or {}, None, {})


class _Code:
    """The fields of a pickled Python 2 code object (IPython.utils.codeutil.code_ctor)."""

    def __init__(self, *fields: Any) -> None:
        self.fields = fields
        named = len(fields) == 12  # Python 2: argcount ... filename, name, firstlineno, lnotab
        self.name = _text(fields[9]) if named else "?"
        self.filename = _text(fields[8]) if named else "?"
        self.consts = fields[5] if named else ()


class _CannedFunction:
    """IPython.utils.pickleutil.CannedFunction: a Python 2 function as bytecode."""

    code: Any = None
    name: Any = "?"

    def __setstate__(self, state: dict) -> None:
        state = _state(state)
        self.code, self.name = state.get("code"), _text(state.get("__name__", b"?"))

    def get(self, g: dict[str, Any] | None) -> Callable[..., Any]:
        helper = _helper(self.code)
        if helper is not None:
            log.debug("running %s as its Python 3 equivalent", helper.__name__)
            return functools.partial(helper, {} if g is None else g)
        name = self.code.name if isinstance(self.code, _Code) else self.name
        raise Python2CodeError("cannot run Python 2 function %r on a Python 3 engine (it "
                               "travels as Python 2 bytecode): %s" % (name, _HINT))


class _Reference:
    """IPython.utils.pickleutil.Reference: a name in the engine's namespace."""

    name: Any = None

    def __setstate__(self, state: dict) -> None:
        self.name = _text(_state(state).get("name"))

    def get(self, g: dict[str, Any] | None) -> Any:
        try:
            return (g or {})[self.name]
        except KeyError:
            raise NameError("name %r is not defined" % self.name) from None


class _ByRef:
    """A callable named in a pickle; resolved only after loading, never called while loading."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise pickle.UnpicklingError("%s may not be called while unpickling a Python 2 payload"
                                     % _qualname(self.obj))


def _qualname(obj: Any) -> str:
    return "%s.%s" % (getattr(obj, "__module__", "?"), getattr(obj, "__name__", "?"))


# -- the helpers a 0.11 view sends, natively ------------------------------------------------

def _execute(ns: dict[str, Any], code: Any) -> None:
    """``view.execute(code)``: run ``code`` as Python 3 source in the namespace."""
    try:
        compiled = compile(code, "<string>", "exec")
    except SyntaxError as e:
        e.msg = "%s (view.execute() code runs as Python 3 on this engine)" % e.msg
        raise
    exec(compiled, ns)


def _push(ns: dict[str, Any], values: dict[str, Any]) -> None:
    """``view.push(values)`` (and ``scatter``): update the namespace."""
    ns.update(values)


def _pull(ns: dict[str, Any], keys: Any) -> Any:
    """``view.pull(keys)`` (and ``gather``): one value, or a list for a list of names."""
    names = list(keys) if isinstance(keys, (list, tuple, set)) else [keys]
    for key in names:
        if key not in ns:
            raise NameError("name '%s' is not defined" % (key,))
    return [ns[k] for k in names] if isinstance(keys, (list, tuple, set)) else ns[keys]


_HELPERS = {
    ("_execute", "helper method for implementing `client.execute` via `client.apply`"): _execute,
    ("_push", "helper method for implementing `client.push` via `client.apply`"): _push,
    ("_pull", "helper method for implementing `client.pull` via `client.apply`"): _pull,
}


def _helper(code: Any) -> Callable[..., Any] | None:
    if not isinstance(code, _Code) or not code.consts:
        return None
    if not code.filename.replace("\\", "/").endswith("parallel/util.py"):
        return None
    return _HELPERS.get((code.name, _text(code.consts[0])))


# -- reading --------------------------------------------------------------------------

def _numpy_global(name: str) -> Any:
    if _numpy(load=True) is None:
        raise pickle.UnpicklingError("the payload holds numpy data, but numpy is not "
                                     "installed on this engine")
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]
    return getattr(multiarray, name)


def _ufunc(module: Any, name: Any) -> Any:
    """``numpy.core._ufunc_reconstruct``: a numpy ufunc such as ``numpy.sqrt``, by name."""
    numpy = _numpy(load=True)
    ufunc = getattr(numpy, _text(name), None) if numpy is not None else None
    if not isinstance(ufunc, getattr(numpy, "ufunc", ())):
        raise pickle.UnpicklingError("numpy ufunc %r is not available on this engine"
                                     % _text(name))
    return ufunc


_STAND_INS: dict[tuple[str, str], Callable[[], Any]] = {
    (_NEWSERIALIZED, "SerializeIt"): lambda: _SerializeIt,
    (_PICKLEUTIL, "CannedFunction"): lambda: _CannedFunction,
    (_PICKLEUTIL, "Reference"): lambda: _Reference,
    ("IPython.utils.codeutil", "code_ctor"): lambda: _Code,
    ("copy_reg", "_reconstructor"): lambda: copyreg._reconstructor,  # type: ignore[attr-defined]
    ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_global("_reconstruct"),
    ("numpy.core.multiarray", "scalar"): lambda: _numpy_global("scalar"),
    ("numpy", "ndarray"): lambda: _numpy_global("ndarray"),
    ("numpy", "dtype"): lambda: _numpy_global("dtype"),
    ("numpy.core", "_ufunc_reconstruct"): lambda: _ufunc,
}


def _refuse(module: str, name: str, why: str) -> pickle.UnpicklingError:
    return pickle.UnpicklingError("cannot load %s.%s from a Python 2 payload: %s"
                                  % (module, name, why))


def _resolve(module: str, name: str) -> Any:
    """Find the Python 3 object a Python 2 pickle names."""
    if (module, name) in _PY2_NAMES:
        return _PY2_NAMES[(module, name)]
    if module.startswith("IPython."):
        raise _refuse(module, name, "this IPython 0.11 object (for example a @depend or "
                      "@require function) cannot be used on a Python 3 engine; " + _HINT)
    if module == "__main__":
        raise _refuse(module, name, "names from the client's __main__ do not exist here; "
                      + _HINT)
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    else:
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    if module not in sys.modules and module.partition(".")[0] not in _IMPORTABLE:
        raise _refuse(module, name, "module %r is not available to Python 2 clients" % module)
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise _refuse(module, name, "not found on this Python 3 engine (%s)" % e) from None
    if not callable(obj):
        raise _refuse(module, name, "only callables are loaded by reference")
    return obj


class _Unpickler(pickle.Unpickler):
    """Reads Python 2 pickles: ``str`` as bytes, only allowed constructors run."""

    def __init__(self, data: Any) -> None:
        super().__init__(io.BytesIO(data), encoding="bytes")

    def find_class(self, module: str, name: str) -> Any:
        stand_in = _STAND_INS.get((module, name))
        if stand_in is not None:
            return stand_in()
        obj = _resolve(module, name)
        builtin_error = (isinstance(obj, type) and issubclass(obj, BaseException)
                         and obj.__module__ == "builtins")
        if obj in _CONSTRUCTORS or builtin_error:
            return obj
        return _ByRef(obj)


def _load(data: Any) -> Any:
    try:
        return _Unpickler(data).load()
    except pickle.UnpicklingError as e:  # our own one-line reasons
        raise SerializationError(str(e)) from None
    except Exception as e:
        raise SerializationError("cannot unpickle a Python 2 payload: %s: %s"
                                 % (type(e).__name__, e)) from None


def _convert(obj: Any, g: dict[str, Any] | None, memo: dict[int, Any]) -> Any:
    """Apply the Python 2 -> 3 type rules; resolve references and canned objects."""
    t = type(obj)
    if t is bytes:
        return _text(obj)
    if t in (int, float, str, bool, complex) or obj is None:
        return obj
    if id(obj) in memo:
        return memo[id(obj)]
    out: Any
    if t is list:
        out = memo[id(obj)] = []
        out.extend(_convert(x, g, memo) for x in obj)
    elif t is dict:
        out = memo[id(obj)] = {}
        for k, v in obj.items():
            out[_convert(k, g, memo)] = _convert(v, g, memo)
    elif t in (tuple, set, frozenset):
        out = memo[id(obj)] = t(_convert(x, g, memo) for x in obj)
    elif t is _ByRef:
        out = obj.obj
    elif t.__module__ == "numpy" and t is _numpy().ndarray and obj.dtype == object:
        out = memo[id(obj)] = obj.copy(order="C")
        flat = out.reshape(-1)
        for i, x in enumerate(flat):
            flat[i] = _convert(x, g, memo)
    elif t in (_CannedFunction, _Reference):
        out = obj.get(g)
    else:
        out = obj
    return out


def _frame_view(frame: Any) -> Any:
    buf = getattr(frame, "buffer", None)  # zmq.Frame: a zero-copy view
    return frame if buf is None else buf


def _value(s: Any, data: Iterator[Any], g: dict[str, Any] | None) -> Any:
    """The value one SerializeIt carries; its data comes from ``data`` when not inline."""
    if not isinstance(s, _SerializeIt):
        raise SerializationError("expected a SerializeIt in a Python 2 payload, got %s"
                                 % type(s).__name__)
    raw = s.data
    if raw is None:
        raw = next(data, None)
        if raw is None:
            raise SerializationError("a Python 2 payload is missing a data frame")
    if s.kind == "pickle":
        return _convert(_load(raw), g, {})
    if s.kind == "bytes":
        return _text(bytes(raw))
    if s.kind == "buffer":
        return memoryview(raw)
    if s.kind == "ndarray":
        dtype, shape = s.metadata.get("dtype"), s.metadata.get("shape")
        numpy = _numpy(load=True)
        if numpy is None:
            raise SerializationError("the payload holds a numpy array, but numpy is not "
                                     "installed on this engine")
        return numpy.frombuffer(raw, dtype=dtype).reshape(shape)
    raise SerializationError("unknown SerializeIt type %r in a Python 2 payload" % s.kind)


def _py2_order(key: Any) -> tuple:
    """Sort key giving Python 2's order of dict keys (numbers, then strings, then others)."""
    if key is None:
        return (0,)
    if isinstance(key, (int, float)):
        return (1, key)
    if isinstance(key, (bytes, str)):
        return (2, key.decode("latin-1") if isinstance(key, bytes) else key)
    return (3, type(key).__name__, repr(key))


def unpack_apply_message(bufs: Sequence[Any], g: dict[str, Any] | None = None,
                         copy: bool = True) -> tuple[Callable[..., Any], tuple[Any, ...],
                                                     dict[str, Any]]:
    """Unpack ``(f, args, kwargs)`` from a Python 2 client's apply_request buffers.

    ``g`` is the engine namespace that ``execute``/``push``/``pull`` and
    ``Reference`` arguments use. Arrays stay views of their frames (read-only).
    """
    if len(bufs) < 3:
        raise SerializationError("an apply request needs 3 buffers (f, args, kwargs), got %d"
                                 % len(bufs))
    views = [_frame_view(b) for b in bufs]
    f = _convert(_load(views[0]), g, {})
    sargs, skwargs = _load(views[1]), _load(views[2])
    if not isinstance(sargs, (list, tuple)) or not isinstance(skwargs, dict):
        raise SerializationError("Python 2 apply args must be a list and kwargs a dict")
    data = iter(views[3:])
    args = tuple(_value(s, data, g) for s in sargs)
    kwargs = {_text(k) if isinstance(k, bytes) else k: _value(skwargs[k], data, g)
              for k in sorted(skwargs, key=_py2_order)}
    if not callable(f):
        raise SerializationError("apply target is not callable: %s" % type(f).__name__)
    return f, args, kwargs


def deserialize_object(frames: Sequence[Any], g: dict[str, Any] | None = None
                       ) -> tuple[Any, list[Any]]:
    """Read a value in the 0.11 result layout: ``(value, unused frames)``, as 0.11 did."""
    if not frames:
        raise SerializationError("no frames to deserialize")
    head = _load(_frame_view(frames[0]))
    data = iter([_frame_view(f) for f in frames[1:]])
    if isinstance(head, (list, tuple)):
        obj: Any = [_value(s, data, g) for s in head]
    elif isinstance(head, dict):
        obj = {_convert(k, g, {}): _value(head[k], data, g)
               for k in sorted(head, key=_py2_order)}
    else:
        obj = _value(head, data, g)
    return obj, list(data)


# -- writing ----------------------------------------------------------------------------

def _global(module: str, name: str) -> bytes:
    return b"c%s\n%s\n" % (module.encode("ascii"), name.encode("ascii"))


_COMPLEX, _SET, _FROZENSET, _BYTEARRAY = (_global("__builtin__", n) for n in (
    "complex", "set", "frozenset", "bytearray"))
_NUMPY_DTYPE = _global("numpy", "dtype")
_NUMPY_SCALAR = _global("numpy.core.multiarray", "scalar")
_NUMPY_ARRAY = (_global("numpy.core.multiarray", "_reconstruct") + _global("numpy", "ndarray")
                + b"K\x00\x85U\x01b\x87R")  # _reconstruct(ndarray, (0,), 'b')
_INT64 = 1 << 63


class _Writer:
    """Writes a protocol 2 pickle that Python 2 reads with the types of the module rules."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.active: set[int] = set()  # tuples being written (they cannot contain themselves)
        #: id -> (memo index, the object, kept alive so that its id is not reused)
        self.memo: dict[int, tuple[int, Any]] = {}

    def dumps(self, obj: Any) -> bytes:
        self.out.write(b"\x80\x02")
        self.write(obj)
        self.out.write(b".")
        return self.out.getvalue()

    def write(self, obj: Any) -> None:
        w, t = self.out.write, type(obj)
        if obj is None:
            w(b"N")
        elif t is bool:
            w(b"\x88" if obj else b"\x89")
        elif t is int:
            self.write_int(obj)
        elif t is float:
            w(b"G" + struct.pack(">d", obj))
        elif t is complex:
            w(_COMPLEX)
            self.write((obj.real, obj.imag))
            w(b"R")
        elif t is str and obj.isascii():
            self.write(obj.encode("ascii"))
        elif t is str:
            self.write_unicode(obj)
        elif t is bytes:
            n = len(obj)
            w((b"U" + bytes([n])) if n < 256 else (b"T" + struct.pack("<i", n)))
            w(obj)
        elif t is bytearray:  # bytearray(u'...', 'latin-1')
            w(_BYTEARRAY)
            self.write_unicode(obj.decode("latin-1"))
            self.write(b"latin-1")
            w(b"\x86R")
        elif t in (list, tuple, dict):
            self.write_container(obj)
        elif t in (set, frozenset):
            w(_FROZENSET if t is frozenset else _SET)
            self.write((list(obj),))
            w(b"R")
        elif t is _SerializeIt:
            w(_global(_NEWSERIALIZED, "SerializeIt") + b")\x81")
            self.write({"data": obj.data, "typeDescriptor": obj.kind, "metadata": obj.metadata})
            w(b"b")
        elif (numpy := _numpy()) is not None and isinstance(obj, numpy.dtype):
            w(_NUMPY_DTYPE)
            self.write(obj.__reduce__()[1])
            w(b"R")
            self.write(obj.__reduce__()[2])
            w(b"b")
        elif numpy is not None and isinstance(obj, numpy.generic):
            w(_NUMPY_SCALAR)
            self.write(obj.__reduce__()[1])
            w(b"R")
        elif numpy is not None and t is numpy.ndarray:
            w(_NUMPY_ARRAY)
            self.write(obj.__reduce__()[2])
            w(b"b")
        else:
            self.write_other(obj)

    def write_int(self, n: int) -> None:
        w = self.out.write
        if 0 <= n < 256:
            w(b"K" + bytes([n]))
        elif 0 <= n < 65536:
            w(b"M" + struct.pack("<H", n))
        elif -(1 << 31) <= n < (1 << 31):
            w(b"J" + struct.pack("<i", n))
        elif -_INT64 <= n < _INT64:
            w(b"I%d\n" % n)  # a Python 2 int on 64-bit builds
        else:
            data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
            w((b"\x8a" + bytes([len(data)])) if len(data) < 256
              else (b"\x8b" + struct.pack("<i", len(data))))
            w(data)

    def write_unicode(self, s: str) -> None:
        data = s.encode("utf-8", "surrogatepass")
        self.out.write(b"X" + struct.pack("<I", len(data)) + data)

    def write_container(self, obj: Any) -> None:
        """Lists, dicts and tuples, each once: a second reference is a memo lookup, as in
        Python 2's pickle (so shared and self-referencing containers keep their shape)."""
        w = self.out.write
        known = self.memo.get(id(obj))
        if known is not None:
            n = known[0]
            w((b"h" + bytes([n])) if n < 256 else (b"j" + struct.pack("<I", n)))  # BINGET
            return
        if type(obj) is tuple:
            if id(obj) in self.active:
                raise SerializationError("cannot send a tuple that contains itself to a "
                                         "Python 2 client")
            self.active.add(id(obj))
            if len(obj) <= 3:
                for x in obj:
                    self.write(x)
                w(b")\x85\x86\x87"[len(obj):len(obj) + 1])
            else:
                w(b"(")
                for x in obj:
                    self.write(x)
                w(b"t")
            self.active.discard(id(obj))
            self._memoize(obj)
            return
        w(b"]" if type(obj) is list else b"}")
        self._memoize(obj)  # before the items, which may refer back to it
        if obj:
            w(b"(")
            for x in (itertools.chain.from_iterable(obj.items()) if type(obj) is dict
                      else obj):
                self.write(x)
            w(b"e" if type(obj) is list else b"u")

    def _memoize(self, obj: Any) -> None:
        n = len(self.memo)
        self.memo[id(obj)] = (n, obj)
        self.out.write((b"q" + bytes([n])) if n < 256 else (b"r" + struct.pack("<I", n)))

    def write_other(self, obj: Any) -> None:
        buf = io.BytesIO()
        pickler = pickle.Pickler(buf, protocol=2, fix_imports=True)
        pickler.fast = True  # no memo entries of its own, which would overwrite ours
        try:
            pickler.dump(obj)
        except Exception as e:
            raise SerializationError("cannot send %s to a Python 2 client: %s: %s"
                                     % (type(obj).__name__, type(e).__name__, e)) from None
        self.out.write(buf.getvalue()[2:-1])


def _dumps(obj: Any) -> bytes:
    try:
        return _Writer().dumps(obj)
    except RecursionError as e:
        raise SerializationError("cannot send %s to a Python 2 client: nested too deeply"
                                 % type(obj).__name__) from e


def _is_array(obj: Any) -> bool:
    numpy = _numpy()
    return numpy is not None and isinstance(obj, numpy.ndarray)


def _serialize_it(obj: Any, buffers: list[Any], threshold: int) -> _SerializeIt:
    if _is_array(obj) and obj.ndim > 0 and not obj.dtype.hasobject and obj.dtype.fields is None:
        numpy = _numpy()
        obj = numpy.ascontiguousarray(obj)
        s = _SerializeIt(None, "ndarray", {"shape": obj.shape, "dtype": obj.dtype.str})
        buffers.append(obj.reshape(-1).view(numpy.uint8))
        return s
    if isinstance(obj, memoryview):
        s = _SerializeIt(obj if obj.contiguous else obj.tobytes(), "buffer")
    elif type(obj) is bytes:
        s = _SerializeIt(obj, "bytes")
    elif type(obj) is str and obj.isascii():
        s = _SerializeIt(obj.encode("ascii"), "bytes")
    else:
        s = _SerializeIt(_dumps(obj), "pickle")
    if s.kind == "buffer" or len(s.data) > threshold:
        buffers.append(s.data)
        s.data = None
    return s


def serialize_object(obj: Any, threshold: int = THRESHOLD) -> list[Any]:
    """Serialize a result for a Python 2 client: ``[pickle, data frames...]``.

    A list or dict holding numpy arrays goes element by element, so the arrays
    travel as raw frames; anything else is one value.
    """
    buffers: list[Any] = []
    if type(obj) is list and any(_is_array(x) for x in obj):
        head: Any = [_serialize_it(x, buffers, threshold) for x in obj]
    elif (type(obj) is dict and any(_is_array(x) for x in obj.values())
          and (all(type(k) is str for k in obj) or all(type(k) is int for k in obj))):
        head = {k: _serialize_it(obj[k], buffers, threshold) for k in sorted(obj)}
    else:
        head = _serialize_it(obj, buffers, threshold)
    return [_dumps(head)] + buffers


__all__ = ["THRESHOLD", "Python2CodeError", "unpack_apply_message", "serialize_object",
           "deserialize_object"]
