"""What a run shows while it runs (on stderr; the report itself goes to stdout and bench/results/): each phase
says what it measures as it starts, shows progress while it drains, and prints its figure when it ends.

On a terminal a progress bar redraws in place (``\\r``, at most 10 times a second); otherwise (a pipe, a log
file, CI) plain lines, one per tenth of the work or every ``PLAIN_EVERY`` seconds, whichever comes first.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import TextIO

BAR_WIDTH = 28  # characters of the bar itself
REDRAW = 0.1  # seconds between redraws of a terminal bar
PLAIN_EVERY = 15.0  # seconds between plain progress lines when the work moves slowly
PLAIN_STEPS = 10  # plain progress lines per task at most (one per tenth), besides the time-based ones
TICK = 0.5  # seconds between looks of a time-only task (no count to report)


def _count(value: float) -> str:
    return f"{value:,.0f}"


def _rate(value: float) -> str:
    return f"{value / 1000:,.1f}k" if value >= 10_000 else f"{value:,.0f}"


class Task:
    """Progress of one measured piece of work: ``update(done)`` as it moves, ``close(figure)`` when it ends."""

    def __init__(self, console: Console, label: str, total: float | None, unit: str, *, clock: bool = False) -> None:
        self.console = console
        self.clock = clock  # progress is the time elapsed (of ``total`` seconds), not a count
        self.label = label
        self.total = total
        self.unit = unit
        self.started = console.clock()
        self.done = 0.0
        self._drawn = 0.0
        self._printed = self.started
        self._step = 0
        self._open = True
        if not console.tty:
            size = f" of {_count(total)} {unit}" if total else ""
            if clock:
                size = f" ({total:.0f} s)" if total else ""
            console.line(f"    {label}: started{size}")

    @property
    def elapsed(self) -> float:
        return self.console.clock() - self.started

    def update(self, done: float) -> None:
        if not self._open:
            return
        self.done = done
        now = self.console.clock()
        if self.console.tty:
            if now - self._drawn >= REDRAW:
                self._drawn = now
                self.console.draw(self.render())
            return
        # A count moves in tenths; time alone (a clock task) only every PLAIN_EVERY seconds.
        step = int(done / self.total * PLAIN_STEPS) if self.total and not self.clock else 0
        if step > self._step or now - self._printed >= PLAIN_EVERY:
            self._step = max(self._step, step)
            self._printed = now
            self.console.line("    " + self.render())

    def render(self) -> str:
        elapsed = self.elapsed
        if self.clock:
            if self.total:
                return f"{self.label:<28} [{_bar(elapsed / self.total)}] {elapsed:5.1f} of {self.total:.0f} s"
            return f"{self.label:<28} {elapsed:5.1f} s so far"
        rate = self.done / elapsed if elapsed > 0 and self.done else 0.0
        speed = f"  {_rate(rate)} {self.unit}/s" if rate else ""
        if self.total:
            share = min(1.0, self.done / self.total)
            return (
                f"{self.label:<28} [{_bar(share)}] {share * 100:5.1f}%  {_count(self.done)}/{_count(self.total)} "
                f"{self.unit}{speed}  {elapsed:5.1f} s"
            )
        return f"{self.label:<28} {_count(self.done)} {self.unit}{speed}  {elapsed:5.1f} s"

    def feed(self, scale: float = 1.0) -> Callable[[int], None]:
        """A callback taking a count (messages stored) that updates this task with ``count * scale`` units."""

        def update(count: int) -> None:
            self.update(count * scale)

        return update

    def close(self, figure: str = "") -> None:
        if not self._open:
            return
        self._open = False
        self.console.clear()
        self.console.line(f"    {self.label}: {figure or 'done'} ({self.elapsed:.1f} s)")


class Console:
    """Phase announcements, progress tasks and figures, written to ``stream`` (stderr by default)."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        tty: bool | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.clock = clock
        self._drawn = False
        self.phases = 0
        self.phase_total = 0

    def line(self, text: str) -> None:
        self.clear()
        self.stream.write(text + "\n")
        self.stream.flush()

    def draw(self, text: str) -> None:
        """Redraw the terminal's current line in place."""
        self.stream.write("\r\x1b[2K    " + text)
        self.stream.flush()
        self._drawn = True

    def clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self._drawn = False

    def phase(self, name: str, what: str) -> None:
        self.phases += 1
        of = f"/{self.phase_total}" if self.phase_total else ""
        self.line(f"==> [{self.phases}{of}] {name}: {what}")

    def figure(self, name: str, text: str, seconds: float) -> None:
        self.line(f"<== {name} ({seconds:.1f} s): {text}")

    def failed(self, name: str, error: str, seconds: float) -> None:
        self.line(f"<== {name} FAILED after {seconds:.1f} s: {error}")

    def note(self, text: str) -> None:
        self.line(f"    {text}")

    def task(self, label: str, total: float | None, unit: str) -> Task:
        return Task(self, label, total, unit)

    @contextlib.asynccontextmanager
    async def timed(self, label: str, seconds: float | None = None) -> AsyncIterator[Task]:
        """Progress of work that reports no count of its own: elapsed time, against ``seconds`` when the work
        lasts a known time (a paced run), else just the time so far."""
        task = Task(self, label, seconds, "s", clock=True)

        async def tick() -> None:
            while True:
                task.update(task.elapsed)
                await asyncio.sleep(TICK)

        ticking = asyncio.create_task(tick())
        try:
            yield task
        finally:
            ticking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticking
            task.close()


def _bar(share: float) -> str:
    filled = int(max(0.0, min(1.0, share)) * BAR_WIDTH)
    return "#" * filled + "-" * (BAR_WIDTH - filled)
