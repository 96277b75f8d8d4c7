"""outstream: buffering and chunking of user output, other threads, and redirect()."""
from __future__ import annotations

import io
import sys
import threading
from typing import Any, Callable

import pytest

from streamkernel import outstream
from streamkernel.outstream import CHUNK_SIZE, FLUSH_INTERVAL, DisplayHook, OutStream, redirect


class Recorder:
    """Collects what an OutStream publishes, and the wake-ups it asks for."""

    def __init__(self) -> None:
        self.published: list[tuple[str, dict, bytes]] = []
        self.wakes: list[Callable[[], None]] = []
        self.lock = threading.Lock()

    def publish(self, msg_type: str, content: dict, topic: bytes) -> None:
        self.published.append((msg_type, dict(content), topic))

    def wake(self, callback: Callable[[], None]) -> None:
        with self.lock:
            self.wakes.append(callback)

    def run_wakes(self) -> None:
        with self.lock:
            wakes, self.wakes = self.wakes, []
        for cb in wakes:
            cb()

    @property
    def data(self) -> list[str]:
        return [c["data"] for t, c, _ in self.published if t == "stream"]

    @property
    def text(self) -> str:
        return "".join(self.data)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(outstream, "time", c)
    return c


@pytest.fixture
def out(rec: Recorder) -> OutStream:
    return OutStream("stdout", rec.publish, b"engine.0.stdout", rec.wake)


def test_stream_messages_carry_name_and_topic(rec: Recorder, out: OutStream) -> None:
    out.write("hello\n")
    out.flush()
    assert rec.published == [("stream", {"name": "stdout", "data": "hello\n"},
                              b"engine.0.stdout")]


def test_small_writes_are_buffered_until_flush(rec: Recorder, out: OutStream,
                                               clock: Clock) -> None:
    for i in range(100):
        out.write("line %d\n" % i)
    assert rec.published == []
    out.flush()
    assert rec.data == ["".join("line %d\n" % i for i in range(100))]
    out.flush()
    assert len(rec.published) == 1, "an empty flush publishes nothing"


def test_a_write_after_the_flush_interval_publishes(rec: Recorder, out: OutStream,
                                                    clock: Clock) -> None:
    out.write("a")
    clock.now += FLUSH_INTERVAL * 0.8
    out.write("b")
    assert rec.published == []
    clock.now += FLUSH_INTERVAL * 0.4      # past the interval since the first write
    out.write("c")
    assert rec.data == ["abc"]
    clock.now += FLUSH_INTERVAL * 0.5      # the interval restarts with the next write
    out.write("d")
    assert rec.data == ["abc"]


def test_output_is_published_in_chunks_of_chunk_size(rec: Recorder, out: OutStream,
                                                     clock: Clock) -> None:
    text = "".join(chr(0x41 + i % 26) for i in range(2 * CHUNK_SIZE + 10))
    out.write(text)
    assert rec.data[:2] == [text[:CHUNK_SIZE], text[CHUNK_SIZE:2 * CHUNK_SIZE]]
    out.flush()
    assert all(len(d) <= CHUNK_SIZE for d in rec.data)
    assert rec.text == text


def test_many_writes_publish_once_a_chunk_is_full(rec: Recorder, out: OutStream,
                                                  clock: Clock) -> None:
    piece = "x" * 1000
    total = 0
    for _ in range(10 * CHUNK_SIZE // 1000):
        out.write(piece)
        total += len(piece)
        # never more than a chunk waits in memory
        assert total - len(rec.text) < CHUNK_SIZE
    out.flush()
    assert len(rec.text) == total
    assert all(len(d) <= CHUNK_SIZE for d in rec.data)


def test_non_ascii_text_is_chunked_by_characters(rec: Recorder, out: OutStream) -> None:
    text = "\u00e9\u2603\U0001f600" * CHUNK_SIZE
    out.write(text)
    out.flush()
    assert rec.text == text
    assert all(len(d) <= CHUNK_SIZE for d in rec.data)


def test_write_returns_length_and_checks_type(out: OutStream) -> None:
    assert out.write("abc") == 3
    assert out.write("") == 0
    with pytest.raises(TypeError):
        out.write(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        out.write(None)  # type: ignore[arg-type]


def test_print_goes_through(rec: Recorder, out: OutStream) -> None:
    print("a", 1, sep="-", file=out)
    print("b", file=out, flush=True)
    assert rec.text == "a-1\nb\n"


def test_file_like_attributes(out: OutStream) -> None:
    assert out.writable() and not out.isatty()
    assert out.encoding == "utf-8" and out.name == "stdout"
    with pytest.raises(io.UnsupportedOperation):
        out.fileno()


def test_set_parent_flushes_the_previous_requests_output(rec: Recorder, out: OutStream) -> None:
    out.set_parent({"msg_id": "one"})
    out.write("for one")
    out.set_parent({"msg_id": "two"})
    assert rec.data == ["for one"]
    assert out.parent == {"msg_id": "two"}


# -- bytes ------------------------------------------------------------------------------

def test_bytes_via_buffer_with_invalid_utf8(rec: Recorder, out: OutStream) -> None:
    data = b"caf\xc3\xa9 \xff\xfe end\n"
    assert out.buffer.write(data) == len(data)
    out.buffer.flush()
    out.flush()
    assert rec.text == "caf\u00e9 \ufffd\ufffd end\n"


def test_flush_publishes_bytes_written_to_buffer(rec: Recorder, out: OutStream) -> None:
    out.buffer.write(b"raw bytes\n")
    out.flush()
    assert rec.text == "raw bytes\n"


def test_a_character_split_across_buffer_writes_is_kept_whole(rec: Recorder,
                                                              out: OutStream) -> None:
    snowman = "\u2603".encode()
    for byte in snowman:
        out.buffer.write(bytes([byte]))
        out.buffer.flush()
    out.flush()
    assert rec.text == "\u2603"


def test_bytes_written_directly(rec: Recorder, out: OutStream) -> None:
    out.write(b"ok \xff")  # type: ignore[arg-type]
    out.write(bytearray(b"!"))  # type: ignore[arg-type]
    out.flush()
    assert rec.text == "ok \ufffd!"


# -- other threads ----------------------------------------------------------------------

def in_thread(fn: Callable[[], Any]) -> None:
    t = threading.Thread(target=fn)
    t.start()
    t.join(10)
    assert not t.is_alive()


def test_writes_from_other_threads_are_buffered_and_wake_the_owner(rec: Recorder,
                                                                   out: OutStream) -> None:
    in_thread(lambda: [out.write("from thread %d\n" % i) for i in range(3)])
    assert rec.published == [], "only the owning thread publishes"
    assert len(rec.wakes) == 1, "one wake-up is asked for until it has run"
    rec.run_wakes()
    assert rec.text == "from thread 0\nfrom thread 1\nfrom thread 2\n"
    in_thread(lambda: out.write("again\n"))
    assert len(rec.wakes) == 1
    rec.run_wakes()
    assert rec.text.endswith("again\n")


def test_flush_from_another_thread_does_not_publish(rec: Recorder, out: OutStream) -> None:
    out.write("owner's")
    in_thread(out.flush)
    assert rec.published == []
    out.flush()
    assert rec.text == "owner's"


def test_big_writes_from_another_thread_are_not_published_there(rec: Recorder,
                                                                out: OutStream) -> None:
    in_thread(lambda: out.write("y" * (3 * CHUNK_SIZE)))
    assert rec.published == []
    rec.run_wakes()
    assert rec.text == "y" * (3 * CHUNK_SIZE)
    assert all(len(d) <= CHUNK_SIZE for d in rec.data)


def test_other_threads_memory_is_bounded(rec: Recorder, out: OutStream,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    limit = 10_000
    monkeypatch.setattr(outstream, "MAX_PENDING", limit)

    def spam() -> None:
        for _ in range(100):
            out.write("z" * 1000)
    in_thread(spam)
    rec.run_wakes()
    text = rec.text
    assert text.count("z") <= limit
    assert text.count("z") > 0
    assert "%d characters" % (100 * 1000 - text.count("z")) in text
    # after the flush there is room again
    in_thread(lambda: out.write("fresh"))
    rec.run_wakes()
    assert rec.text.endswith("fresh")


def test_concurrent_writers_lose_nothing_below_the_limit(rec: Recorder, out: OutStream) -> None:
    def writer(n: int) -> Callable[[], None]:
        def write() -> None:
            for i in range(500):
                out.write("%d:%d\n" % (n, i))
        return write
    threads = [threading.Thread(target=writer(n)) for n in range(4)]
    for t in threads:
        t.start()
    for i in range(500):
        out.write("main:%d\n" % i)
    for t in threads:
        t.join(10)
    rec.run_wakes()
    out.flush()
    lines = rec.text.splitlines()
    assert len(lines) == 5 * 500
    for n in ["main", "0", "1", "2", "3"]:
        mine = [line for line in lines if line.startswith(n + ":")]
        assert mine == ["%s:%d" % (n, i) for i in range(500)]


# -- display hook and redirect ------------------------------------------------------------

def test_display_hook(rec: Recorder) -> None:
    ns: dict[str, Any] = {}
    hook = DisplayHook(rec.publish, b"engine.0.pyout", ns)
    hook(None)
    assert rec.published == [] and "_" not in ns
    hook([1, "a"])
    assert rec.published == [("pyout", {"data": "[1, 'a']"}, b"engine.0.pyout")]
    assert ns["_"] == [1, "a"]


def test_redirect_swaps_and_restores(rec: Recorder) -> None:
    out = OutStream("stdout", rec.publish, b"o")
    err = OutStream("stderr", rec.publish, b"e")
    hook = DisplayHook(rec.publish, b"p", {})
    before = sys.stdout, sys.stderr, sys.displayhook
    with redirect(out, err, hook):
        assert (sys.stdout, sys.stderr, sys.displayhook) == (out, err, hook)
        print("to out")
        print("to err", file=sys.stderr)
        sys.displayhook(42)
    assert (sys.stdout, sys.stderr, sys.displayhook) == before
    assert [(t, c.get("name"), c["data"]) for t, c, _ in rec.published] == [
        ("stream", "stdout", "to out\n"), ("stream", "stderr", "to err\n"),
        ("pyout", None, "42")]


@pytest.mark.parametrize("exc", [ValueError, KeyboardInterrupt, SystemExit])
def test_redirect_restores_even_on_exception(rec: Recorder, exc: type) -> None:
    out = OutStream("stdout", rec.publish, b"o")
    err = OutStream("stderr", rec.publish, b"e")
    before = sys.stdout, sys.stderr, sys.displayhook
    with pytest.raises(exc):
        with redirect(out, err, DisplayHook(rec.publish, b"p", {})):
            print("partial")
            raise exc()
    assert (sys.stdout, sys.stderr, sys.displayhook) == before
    assert rec.text == "partial\n", "what was printed is flushed on the way out"


def test_redirect_restores_after_user_replaced_the_streams(rec: Recorder) -> None:
    out = OutStream("stdout", rec.publish, b"o")
    err = OutStream("stderr", rec.publish, b"e")
    before = sys.stdout, sys.stderr, sys.displayhook
    with redirect(out, err, DisplayHook(rec.publish, b"p", {})):
        sys.stdout = io.StringIO()
        sys.stderr = None  # type: ignore[assignment]
        sys.displayhook = print
    assert (sys.stdout, sys.stderr, sys.displayhook) == before
