"""The environment `make venv` builds: pyuv imports on this Python and runs a loop."""

import pyuv


def test_pyuv_runs_a_timer() -> None:
    loop = pyuv.Loop()
    fired: list[int] = []
    timer = pyuv.Timer(loop)
    timer.start(lambda t: (fired.append(1), t.close()), 0.001, 0)
    loop.run()
    assert fired == [1]
    assert pyuv.__version__ == "1.4.0"


def test_pyuv_write_of_a_list_does_not_leak_it() -> None:
    """The installed pyuv has the third fix of tools/build_pyuv.py: a written list is released."""
    import socket
    import sys

    loop = pyuv.Loop()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    tcp = pyuv.TCP(loop)
    done: list[object] = []
    tcp.connect(server.getsockname(), lambda handle, error: done.append(error))
    loop.run()
    peer, _ = server.accept()
    assert done == [None]
    buffers = [b"cell-%d" % i * 100 for i in range(8)]
    before = sys.getrefcount(buffers)
    item_before = sys.getrefcount(buffers[0])
    for _ in range(100):
        tcp.write(buffers, lambda handle, error: done.append(error))
    loop.run()
    assert done[1:] == [None] * 100
    # Counted outside the asserts: pytest's rewriting holds temporaries of its own.
    list_after = sys.getrefcount(buffers)
    item_after = sys.getrefcount(buffers[0])
    assert list_after == before
    assert item_after == item_before
    received = b""
    expected = b"".join(buffers) * 100
    while len(received) < len(expected):
        received += peer.recv(1 << 16)
    assert received == expected
    tcp.close()
    loop.run()
    peer.close()
    server.close()
