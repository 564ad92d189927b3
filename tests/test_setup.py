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
