"""The demo's progress line: weighted phases, the ETA, and plain lines off a terminal."""

import io

import pytest

from qwenvl_jax.demo.progress import Phase, Progress


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_eta_follows_the_weighted_work_left():
    clock, lines = Clock(), []
    p = Progress(
        [Phase("stage0", 100, 10.0), Phase("stage2", 50, 30.0)],
        log=lines.append,
        every_s=5.0,
        clock=clock,
    )
    assert p.eta() is None and p.fraction() == 0.0
    p.start("stage0")
    clock.t = 20.0  # this machine is 2x slower than the weights say
    p.update(100)
    p.finish("stage0")
    assert p.fraction() == pytest.approx(0.25)
    # 20 s for a quarter of the work: 60 s left, not the 30 s the weights alone would give.
    assert p.eta() == pytest.approx(60.0)
    p.start("stage2")
    clock.t = 50.0
    p.update(25)  # half of stage 2: 10 + 15 of 40 done
    assert p.fraction() == pytest.approx(25 / 40)
    assert p.eta() == pytest.approx(50.0 * 15 / 25)
    assert lines[-1].startswith("[demo] stage2 25/50 | 62% of the run | elapsed 0:50 | ETA 0:30")


def test_plain_lines_are_throttled_but_phase_changes_always_print():
    clock, lines = Clock(), []
    p = Progress([Phase("a", 10, 1.0), Phase("b", 10, 1.0)], log=lines.append, every_s=30.0,
                 clock=clock)  # fmt: skip
    p.start("a")
    for i in range(1, 10):
        clock.t = i  # 1 s per step: no line until 30 s have passed
        p.update(i)
    assert len(lines) == 1  # the phase's start
    clock.t = 31.0
    p.update(10)
    p.finish("a")
    p.start("b")
    assert len(lines) == 4 and lines[-1].startswith("[demo] b 0/10")
    with pytest.raises(KeyError, match="unknown phase 'c'"):
        p.start("c")


def test_a_non_terminal_stream_gets_lines_without_carriage_returns():
    out = io.StringIO()
    p = Progress([Phase("a", 2, 1.0)], stream=out, every_s=0.0)
    p.start("a")
    p.update(1)
    p.finish("a")
    p.close()
    text = out.getvalue()
    assert "\r" not in text and text.count("\n") == 3
    assert text.splitlines()[-1].startswith("[demo] a 2/2 | 100% of the run")


def test_a_terminal_gets_one_line_redrawn_in_place():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    p = Progress([Phase("stage2", 4, 1.0)], stream=out)
    p.start("stage2")
    for i in range(1, 5):
        p.update(i)
    p.close()
    text = out.getvalue()
    assert "\r" in text and "stage2 4/4" in text and "ETA" in text
    assert text.rstrip("\n").count("\n") == 0  # one line, redrawn
