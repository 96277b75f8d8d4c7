"""KernelStream behaves as ZMQStream does: every test runs on both."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Iterator

import pytest
import zmq
from tornado.ioloop import IOLoop
from zmq.eventloop.zmqstream import ZMQStream

from streamkernel.stream import KernelStream

from .harness import KernelHarness

STREAMS = [ZMQStream, KernelStream]
TIMEOUT = 10.0


@pytest.fixture
def loop() -> Iterator[IOLoop]:
    asyncio.set_event_loop(asyncio.new_event_loop())
    io_loop = IOLoop.current()
    yield io_loop
    io_loop.close(all_fds=False)
    asyncio.set_event_loop(None)


@pytest.fixture
def pair(socket: Callable[[int], zmq.Socket]) -> tuple[zmq.Socket, zmq.Socket]:
    """(the stream's ROUTER, a DEALER peer) connected over 127.0.0.1."""
    router, dealer = socket(zmq.ROUTER), socket(zmq.DEALER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer.setsockopt(zmq.IDENTITY, b"peer")
    dealer.connect("tcp://127.0.0.1:%d" % port)
    dealer.send(b"hello")  # the connection is up once the router has it
    assert router.poll(int(TIMEOUT * 1000))
    assert router.recv_multipart() == [b"peer", b"hello"]
    return router, dealer


def run_until(loop: IOLoop, done: Callable[[], bool]) -> None:
    """Run the loop until ``done()`` (checked every 5 ms); fail after TIMEOUT."""
    def check() -> None:
        if done() or loop.time() > deadline:
            loop.stop()
        else:
            loop.call_later(0.005, check)
    deadline = loop.time() + TIMEOUT
    loop.add_callback(check)
    loop.start()
    assert done(), "timed out"


@pytest.mark.parametrize("copy", [False, True])
@pytest.mark.parametrize("cls", STREAMS)
def test_a_burst_arrives_whole_and_in_order(cls: type, copy: bool, loop: IOLoop,
                                            pair: Any) -> None:
    router, dealer = pair
    for i in range(300):
        dealer.send_multipart([b"%d" % i, b"", b"x" * (i % 7)])
    got: list[list[Any]] = []
    stream = cls(router, loop)
    stream.on_recv(got.append, copy=copy)
    run_until(loop, lambda: len(got) == 300)
    frame_type = bytes if copy else zmq.Frame
    assert all(type(f) is frame_type for msg in got for f in msg)
    assert [[bytes(f) for f in msg] for msg in got] == [
        [b"peer", b"%d" % i, b"", b"x" * (i % 7)] for i in range(300)]


@pytest.mark.parametrize("cls", STREAMS)
def test_messages_sent_through_the_stream_leave_in_order(cls: type, loop: IOLoop,
                                                         pair: Any) -> None:
    router, dealer = pair
    stream = cls(router, loop)
    sent: list[list[bytes]] = []
    stream.on_send(lambda msg, status: sent.append(msg))
    for i in range(50):
        stream.send_multipart([b"peer", b"%d" % i])
    run_until(loop, lambda: len(sent) == 50)
    received = [dealer.recv_multipart() for _ in range(50)]
    assert received == [[b"%d" % i] for i in range(50)]


@pytest.mark.parametrize("cls", STREAMS)
def test_stop_on_recv_holds_messages_until_receiving_again(cls: type, loop: IOLoop,
                                                           pair: Any) -> None:
    router, dealer = pair
    got: list[list[bytes]] = []
    stream = cls(router, loop)
    stream.on_recv(got.append, copy=True)
    dealer.send(b"first")
    run_until(loop, lambda: len(got) == 1)
    stream.stop_on_recv()
    dealer.send(b"second")
    loop.call_later(0.2, loop.stop)
    loop.start()
    assert len(got) == 1
    stream.on_recv(got.append, copy=True)
    run_until(loop, lambda: len(got) == 2)
    assert got == [[b"peer", b"first"], [b"peer", b"second"]]


@pytest.mark.parametrize("cls", STREAMS)
def test_flush_delivers_what_waits(cls: type, loop: IOLoop, pair: Any) -> None:
    router, dealer = pair
    got: list[list[bytes]] = []
    stream = cls(router, loop)
    stream.on_recv(got.append, copy=True)
    for i in range(5):
        dealer.send(b"%d" % i)
    assert router.poll(int(TIMEOUT * 1000))
    while len(got) < 5:
        assert stream.flush(zmq.POLLIN) > 0 or router.poll(100)
    assert got == [[b"peer", b"%d" % i] for i in range(5)]


@pytest.mark.parametrize("cls", STREAMS)
def test_flush_without_a_callback_discards_what_waits(cls: type, loop: IOLoop,
                                                      pair: Any) -> None:
    router, dealer = pair
    stream = cls(router, loop)
    for i in range(3):
        dealer.send(b"%d" % i)
    assert router.poll(int(TIMEOUT * 1000))
    time.sleep(0.1)  # all three in
    assert stream.flush(zmq.POLLIN, limit=2) == 2
    assert stream.flush(zmq.POLLIN) == 1
    assert not router.poll(0)


@pytest.mark.parametrize("cls", STREAMS)
def test_a_failing_callback_is_logged(cls: type, loop: IOLoop, pair: Any,
                                      caplog: pytest.LogCaptureFixture) -> None:
    router, dealer = pair
    got: list[bytes] = []

    def callback(msg: list[bytes]) -> None:
        got.append(msg[-1])
        if msg[-1] == b"fail":
            raise ValueError("callback failed")
    loop.asyncio_loop.set_exception_handler(lambda *args: None)  # type: ignore[attr-defined]
    stream = cls(router, loop)
    stream.on_recv(callback, copy=True)
    dealer.send(b"fail")
    with caplog.at_level(logging.ERROR, logger="tornado.general"):
        run_until(loop, lambda: got == [b"fail"])
    assert "Uncaught exception in ZMQStream callback" in caplog.text
    assert "ValueError: callback failed" in caplog.text
    if cls is KernelStream:  # ZMQStream stops receiving here until something else wakes it
        dealer.send(b"after")
        run_until(loop, lambda: got == [b"fail", b"after"])


@pytest.mark.parametrize("cls", STREAMS)
def test_a_socket_closed_under_the_stream_ends_it(cls: type, loop: IOLoop,
                                                  pair: Any) -> None:
    router, dealer = pair
    stream = cls(router, loop)
    stream.on_recv(lambda msg: None)
    router.close(linger=0)
    dealer.send(b"lost")
    with pytest.warns(UserWarning, match="after closing socket"):
        assert stream.closed()
    loop.call_later(0.1, loop.stop)
    loop.start()  # nothing left registered for the closed socket


@pytest.mark.parametrize("cls", STREAMS)
def test_kernel_serves_bursts_and_aborts_on_either_stream(cls: type) -> None:
    """An embedding host passes plain ZMQStreams; the engine uses KernelStreams."""
    h = KernelHarness(stream_class=cls)
    try:
        sent = [h.request("execute_request", {"code": "n = %d" % i}) for i in range(100)]
        replies = [h.recv()[1] for _ in sent]
        assert [r["parent_header"]["msg_id"] for r in replies] == [m["msg_id"] for m in sent]
        assert all(r["content"] == {"status": "ok"} for r in replies)
        failing = h.request("execute_request", {"code": "import time; time.sleep(0.3); 1/0"})
        queued = [h.request("execute_request", {"code": "n = -1"}) for _ in range(5)]
        replies = [h.recv()[1] for _ in range(6)]
        assert replies[0]["parent_header"]["msg_id"] == failing["msg_id"]
        assert replies[0]["content"]["ename"] == "ZeroDivisionError"
        assert [r["parent_header"]["msg_id"] for r in replies[1:]] == [
            m["msg_id"] for m in queued]
        assert all(r["content"]["status"] == "aborted" for r in replies[1:])
        h.request("execute_request", {"code": "n"})
        assert h.recv()[1]["content"] == {"status": "ok"}
        assert h.kernel.user_ns["n"] == 99
    finally:
        h.close()
