"""One progress line for the whole demo: the phase, its step, the run's elapsed time and its ETA.

The demo is a chain of phases (data, stage 0, the training stages, the evaluation) whose steps cost
very different times, so the run's progress is counted in *expected seconds*: each phase is given
its share of the run (`Phase.weight`, from the measured profile in docs/demo.md) and a step of a
phase is worth `weight / steps` of it. The ETA is then the elapsed time scaled by the work left,
which corrects itself for a faster or slower machine as the run goes.

On a terminal the line is a tqdm bar redrawn in place; otherwise (a log file, a notebook's captured
output, CI) it is a plain line every `every_s` seconds and at each phase's end, so a log shows
where the run was without a flood of carriage returns.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from typing import IO


@dataclasses.dataclass(frozen=True)
class Phase:
    """A part of the run.

    Attributes:
        name: shown on the line (stage0, stage2, eval, ...).
        steps: its steps (optimizer steps, or records evaluated).
        weight: its expected share of the run, in any unit (seconds on the reference machine).
    """

    name: str
    steps: int
    weight: float


def _clock(seconds: float) -> str:
    s = int(max(seconds, 0) + 0.5)
    return (
        f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
    )


class Progress:
    """Tracks the run through its phases and draws one line (see the module docstring).

    Args:
        phases: the run's phases, in order (a phase already done may be skipped with `finish`).
        stream: where a terminal line goes (default stderr); a non-terminal gets plain lines.
        log: receives the plain lines (default: print to `stream`).
        every_s: seconds between plain lines.
        clock: time source (tests pass their own).
    """

    def __init__(
        self,
        phases: Sequence[Phase],
        *,
        stream: IO[str] | None = None,
        log: Callable[[str], None] | None = None,
        every_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not phases:
            raise ValueError("Progress needs at least one phase")
        self.phases = {p.name: p for p in phases}
        self._order = [p.name for p in phases]
        self._total = sum(p.weight for p in phases)
        self._done: dict[str, float] = {}  # phase -> fraction of it done
        self._current: str | None = None
        self._step = 0
        self._clock = clock
        self._t0 = clock()
        self._last_line = -float("inf")
        self._every = every_s
        self._stream = stream if stream is not None else sys.stderr
        self._log = log
        self._bar = None
        if log is None and _is_terminal(self._stream):
            from tqdm import tqdm

            self._bar = tqdm(
                total=1000,
                file=self._stream,
                bar_format="{desc} |{bar:20}| {percentage:3.0f}% {postfix}",
                dynamic_ncols=True,
            )

    def fraction(self) -> float:
        """The share of the run's expected work done, in [0, 1]."""
        done = sum(self.phases[n].weight * f for n, f in self._done.items())
        return min(done / self._total, 1.0) if self._total > 0 else 1.0

    def eta(self) -> float | None:
        """Seconds left: elapsed x (work left / work done); None before any work is done."""
        f = self.fraction()
        if f <= 0:
            return None
        return (self._clock() - self._t0) * (1 - f) / f

    def line(self) -> str:
        """The progress line as text."""
        name = self._current or "-"
        p = self.phases.get(name)
        where = f"{name} {self._step}/{p.steps}" if p else name
        eta = self.eta()
        return (
            f"[demo] {where} | {100 * self.fraction():.0f}% of the run"
            f" | elapsed {_clock(self._clock() - self._t0)}"
            f" | ETA {_clock(eta) if eta is not None else '?'}"
        )

    def start(self, name: str) -> None:
        """Enters phase `name` (one of the phases)."""
        if name not in self.phases:
            raise KeyError(f"unknown phase {name!r}; phases: {self._order}")
        self._current, self._step = name, 0
        self._done.setdefault(name, 0.0)
        self._draw(force=True)

    def update(self, step: int) -> None:
        """The current phase is at `step` of its steps."""
        if self._current is None:
            return
        p = self.phases[self._current]
        self._step = step
        self._done[self._current] = min(step / p.steps, 1.0) if p.steps > 0 else 1.0
        self._draw()

    def finish(self, name: str) -> None:
        """Phase `name` is done (also for a phase skipped because an earlier run finished it)."""
        self._done[name] = 1.0
        if self._current == name:
            self._step = self.phases[name].steps
        self._draw(force=True)

    def close(self) -> None:
        """Ends the line (the bar's last state stays on the terminal)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _draw(self, force: bool = False) -> None:
        if self._bar is not None:
            text = self.line()
            desc, _, rest = text.partition(" | ")
            self._bar.set_description_str(desc, refresh=False)
            self._bar.set_postfix_str(rest.split(" | ", 1)[-1], refresh=False)
            self._bar.n = int(1000 * self.fraction())
            self._bar.refresh()
            return
        now = self._clock()
        if force or now - self._last_line >= self._every:
            self._last_line = now
            out = self.line()
            if self._log is not None:
                self._log(out)
            else:
                print(out, file=self._stream, flush=True)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
