"""Serialization of apply requests and results into message buffers.

An apply request travels as buffers::

    [pickle(f), pickle(args), pickle(kwargs), data, ...]

Pickles use protocol 5. Large buffers (numpy arrays, and top-level
``bytes``/``bytearray``/``memoryview`` arguments of at least ``threshold`` bytes) leave the
pickle as out-of-band data frames, so they are sent and received without copies.
Objects the standard pickler cannot handle by reference (lambdas, functions and
classes defined in ``__main__``) are pickled by value with dill. Functions from
the sender's ``__main__`` are rebound to the receiver's namespace, so they see the
engine's variables as their globals.
"""
from __future__ import annotations

import ctypes
import io
import pickle
import threading
import types
from typing import Any, Callable, Iterable, Iterator, Sequence


from .errors import SerializationError

#: Buffers smaller than this travel inside the pickle.
COPY_THRESHOLD = 64
PROTOCOL = 5


class _NeedsDill(Exception):
    pass


def _from_main(obj: Any) -> bool:
    return getattr(obj, "__module__", None) == "__main__" or "<" in getattr(
        obj, "__qualname__", "")


class _Pickler(pickle.Pickler):
    """The fast C pickler; hands anything from ``__main__`` (or local) back to dill."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (types.FunctionType, type)) and _from_main(obj):
            raise _NeedsDill
        return NotImplemented


def _as_bytes(buf: Any) -> bytes:
    if type(buf) is bytes:
        return buf
    view = memoryview(buf)
    if view.nbytes >= SPLIT_COPY and view.c_contiguous and _copy_api is not None:
        return _copy_in_two(view)
    return bytes(view)


#: Buffers at least this large become ``bytes`` in two threads at once: such a copy
#: mostly waits for the kernel to map fresh pages, which two threads do side by side.
SPLIT_COPY = 8 << 20


class _PyBuffer(ctypes.Structure):
    """``Py_buffer`` of the C API: where a buffer's bytes are."""

    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int),
                ("ndim", ctypes.c_int), ("format", ctypes.c_char_p),
                ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


def _load_copy_api() -> tuple[Any, Any, Any, Any] | None:
    try:
        api = ctypes.pythonapi
        new, data = api.PyBytes_FromStringAndSize, api.PyBytes_AsString
        get, release = api.PyObject_GetBuffer, api.PyBuffer_Release
    except (AttributeError, OSError):  # not CPython
        return None
    new.restype, new.argtypes = ctypes.py_object, (ctypes.c_void_p, ctypes.c_ssize_t)
    data.restype, data.argtypes = ctypes.c_void_p, (ctypes.py_object,)
    get.restype, get.argtypes = ctypes.c_int, (
        ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int)
    release.restype, release.argtypes = None, (ctypes.POINTER(_PyBuffer),)
    return new, data, get, release


_copy_api = _load_copy_api()


def _copy_in_two(view: memoryview) -> bytes:
    """``bytes(view)``, its second half copied by a helper thread. The new object is
    filled before anything else can see it, as the C API allows for an object made by
    ``PyBytes_FromStringAndSize(NULL, size)``; ``view`` keeps the source alive."""
    new, data, get, release = _copy_api  # type: ignore[misc]
    size = view.nbytes
    result = new(None, size)
    dst = data(result)
    info = _PyBuffer()
    get(view, ctypes.byref(info), 0)  # PyBUF_SIMPLE: the start of a contiguous buffer
    src = info.buf
    release(ctypes.byref(info))
    half = size // 2
    # the helper holds its own references, so nothing it uses is freed under it
    finished = threading.Event()
    threading.Thread(target=_memmove, daemon=True, args=(
        dst + half, src + half, size - half, finished, result, view)).start()
    try:
        ctypes.memmove(dst, src, half)  # both memmoves run without the interpreter lock
    finally:
        _wait(finished)
    return result


def _memmove(dst: int, src: int, size: int, finished: threading.Event, *keep_alive: Any) -> None:
    try:
        ctypes.memmove(dst, src, size)
    finally:
        finished.set()


def _wait(finished: threading.Event) -> None:
    """Wait until ``finished`` is set; an interrupt meanwhile is raised after, so an
    interrupted request leaves no copy running beside the next one."""
    interrupted: BaseException | None = None
    while True:
        try:
            finished.wait()
            break
        except BaseException as e:  # KeyboardInterrupt
            interrupted = e
    if interrupted is not None:
        raise interrupted


def _as_memoryview(buf: Any) -> memoryview:
    return memoryview(buf)


class _OutOfBand:
    """Marks a top-level bytes, bytearray or memoryview argument to travel as its own frame."""

    __slots__ = ("data",)

    def __init__(self, data: Any) -> None:
        self.data = data

    def __reduce__(self) -> Any:
        rebuild = _REBUILD.get(type(self.data), _as_memoryview)
        return rebuild, (pickle.PickleBuffer(self.data),)


_REBUILD: dict[type, Callable[[Any], Any]] = {bytes: _as_bytes, bytearray: bytearray}


def _mark(obj: Any, threshold: int) -> Any:
    if isinstance(obj, (bytes, bytearray, memoryview)) and len(obj) >= threshold:
        if isinstance(obj, memoryview) and not obj.contiguous:
            return obj.tobytes()
        return _OutOfBand(obj)
    if isinstance(obj, memoryview):
        return obj.tobytes()
    return obj


def _dumps(obj: Any, buffers: list[Any], threshold: int) -> bytes:
    """Pickle ``obj``; buffers of at least ``threshold`` bytes go to ``buffers``."""
    def out_of_band(pb: pickle.PickleBuffer) -> bool:
        raw = pb.raw()
        if raw.nbytes < threshold:
            return True
        buffers.append(raw)
        return False

    start = len(buffers)
    f = io.BytesIO()
    try:
        _Pickler(f, PROTOCOL, buffer_callback=out_of_band).dump(obj)
    except (_NeedsDill, pickle.PicklingError, TypeError, AttributeError):
        del buffers[start:]
        try:
            import dill  # only for what the standard pickler cannot do

            return dill.dumps(obj, protocol=PROTOCOL, buffer_callback=out_of_band)
        except Exception as e:
            raise SerializationError("cannot serialize %s: %s: %s" % (
                type(obj).__name__, type(e).__name__, e)) from e
    except Exception as e:
        raise SerializationError("cannot serialize %s: %s: %s" % (
            type(obj).__name__, type(e).__name__, e)) from e
    return f.getvalue()


class _Unpickler(pickle.Unpickler):
    """C unpickler that reads dill's pickles and binds ``__main__`` to a namespace."""

    def __init__(self, file: Any, namespace: dict[str, Any] | None,
                 buffers: Iterable[Any]) -> None:
        super().__init__(file, buffers=buffers)
        self.namespace = namespace

    def find_class(self, module: str, name: str) -> Any:
        if module == "__builtin__" and name == "__main__":  # dill: the sender's globals
            if self.namespace is None:
                import __main__
                return __main__.__dict__
            return self.namespace
        if module == "__builtin__" and name == "NoneType":
            return type(None)
        if module == "dill.dill":
            module = "dill._dill"
        return super().find_class(module, name)


def _loads(data: Any, namespace: dict[str, Any] | None, buffers: Iterator[Any]) -> Any:
    try:
        return _Unpickler(io.BytesIO(data), namespace, buffers).load()
    except Exception as e:
        raise SerializationError("cannot unpickle: %s: %s" % (type(e).__name__, e)) from e


def _frame_buffer(frame: Any) -> Any:
    """A zero-copy view of a received frame (zmq.Frame, bytes or buffer)."""
    buf = getattr(frame, "buffer", None)
    return frame if buf is None else buf


def is_legacy_payload(first: Any) -> bool:
    """True when a pickle comes from a Python 2 sender (protocol 2 or lower)."""
    head = bytes(memoryview(_frame_buffer(first))[:2])
    return not (len(head) == 2 and head[0] == 0x80 and head[1] >= 3)


# -- single objects ---------------------------------------------------------------

def serialize_object(obj: Any, threshold: int = COPY_THRESHOLD) -> list[Any]:
    """Serialize ``obj`` into ``[pickle, data buffers...]``."""
    buffers: list[Any] = []
    if type(obj) in (list, tuple):
        marked = [_mark(o, threshold) for o in obj]
        if any(m is not o for m, o in zip(marked, obj)):  # else keep it (and its self-references)
            obj = type(obj)(marked)
    else:
        obj = _mark(obj, threshold)
    head = _dumps(obj, buffers, threshold)
    return [head] + buffers


def deserialize_object(frames: Sequence[Any], namespace: dict[str, Any] | None = None
                       ) -> tuple[Any, list[Any]]:
    """Rebuild an object from :func:`serialize_object` frames: ``(obj, unused frames)``."""
    if not frames:
        raise SerializationError("no frames to deserialize")
    data = iter([_frame_buffer(f) for f in frames[1:]])
    obj = _loads(_frame_buffer(frames[0]), namespace, data)
    return obj, list(data)


unserialize_object = deserialize_object


# -- apply ----------------------------------------------------------------------

def interactive(f: Any) -> Any:
    """Mark ``f`` to run with the engine's namespace as its globals, as if defined there."""
    f.__module__ = "__main__"
    return f


def _is_interactive(f: Any) -> bool:
    return isinstance(f, types.FunctionType) and f.__module__ == "__main__"


def _portable(f: Any) -> Any:
    """An interactive function from another module travels without its module's globals."""
    import __main__
    if _is_interactive(f) and f.__globals__ is not __main__.__dict__:
        g = types.FunctionType(f.__code__, {"__name__": "__main__"}, f.__name__,
                               f.__defaults__, f.__closure__)
        g.__kwdefaults__ = f.__kwdefaults__
        g.__dict__.update(f.__dict__)
        g.__module__ = "__main__"
        return g
    return f


def _bind(f: Any, namespace: dict[str, Any] | None) -> Any:
    if namespace is None or not _is_interactive(f) or f.__globals__ is namespace:
        return f
    g = types.FunctionType(f.__code__, namespace, f.__name__, f.__defaults__, f.__closure__)
    g.__kwdefaults__ = f.__kwdefaults__
    g.__dict__.update(f.__dict__)
    g.__module__ = "__main__"
    return g


def pack_apply_message(f: Callable[..., Any], args: Sequence[Any] = (),
                       kwargs: dict[str, Any] | None = None,
                       threshold: int = COPY_THRESHOLD) -> list[Any]:
    """Pack ``f(*args, **kwargs)`` into apply_request buffers."""
    if not callable(f):
        raise TypeError("f must be callable, not %s" % type(f).__name__)
    if not isinstance(args, (list, tuple)):
        raise TypeError("args must be a tuple or list, not %s" % type(args).__name__)
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, dict):
        raise TypeError("kwargs must be a dict, not %s" % type(kwargs).__name__)
    buffers: list[Any] = []
    frames = [
        _dumps(_portable(f), buffers, threshold),
        _dumps(tuple(_mark(a, threshold) for a in args), buffers, threshold),
        _dumps({k: _mark(v, threshold) for k, v in kwargs.items()}, buffers, threshold),
    ]
    return frames + buffers


def unpack_apply_message(bufs: Sequence[Any], g: dict[str, Any] | None = None,
                         copy: bool = True) -> tuple[Callable[..., Any], tuple[Any, ...],
                                                     dict[str, Any]]:
    """Unpack ``(f, args, kwargs)`` from apply_request buffers.

    ``g`` is the namespace that functions from the sender's ``__main__`` get as
    globals. Data frames are used in place (zero-copy) where their type allows.
    """
    if len(bufs) < 3:
        raise SerializationError("an apply request needs 3 buffers (f, args, kwargs), got %d"
                                 % len(bufs))
    data = iter([_frame_buffer(b) for b in bufs[3:]])
    f = _bind(_loads(_frame_buffer(bufs[0]), g, data), g)
    args = _loads(_frame_buffer(bufs[1]), g, data)
    kwargs = _loads(_frame_buffer(bufs[2]), g, data)
    if not callable(f):
        raise SerializationError("apply target is not callable: %s" % type(f).__name__)
    if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
        raise SerializationError("apply args must be a sequence and kwargs a dict")
    return f, tuple(args), kwargs


__all__ = [
    "COPY_THRESHOLD", "serialize_object", "deserialize_object", "unserialize_object",
    "pack_apply_message", "unpack_apply_message", "is_legacy_payload", "interactive",
]
