"""Progress of a long stage, one helper for all of them (generate, score, targets, distill, evaluate).

On a terminal it is a progress bar. Into a log file (CI, a Ray job, ``| tee``) a bar is a line per
update, so there it is a line at least every ``PROGRESS_INTERVAL_S`` instead: what is done, the
rate and the time left, e.g. ``score: 1,536/4,000 rows (38%), 51.2 rows/s, 00:48 left``.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

import ray
from ray.experimental.tqdm_ray import tqdm as ray_tqdm
from tqdm import tqdm

# A line at least every 30 s as long as no single update (a batch, a step) takes over 10 s.
PROGRESS_INTERVAL_S = 20.0


def progress_bars_wanted() -> bool:
    """Whether the driver's output is a terminal. Workers draw progress bars only then, and print
    progress lines otherwise. Asked on the driver, since a worker's own stdout is never a terminal."""
    return sys.stdout.isatty()


class Progress:
    """``done`` of ``total`` units (rows, steps): a bar if ``terminal``, else a line to ``stream``
    at most every ``interval_s`` while updates come, and one when it is closed.

    ``stream`` None: the process's own stdout. In a Ray Train worker ``sys.stdout`` is Ray's
    patched print, which would also log the line, and the driver would show it twice.
    """

    def __init__(
        self,
        label: str,
        total: int,
        *,
        terminal: bool,
        unit: str = "rows",
        initial: int = 0,
        interval_s: float = PROGRESS_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        stream: TextIO | None = None,
    ):
        self.label, self.total, self.unit = label, total, unit
        self.initial = self.done = initial  # a resumed run starts part-way; its rate counts from here
        self.interval_s, self.clock, self.stream = interval_s, clock, stream
        self.started = self.last_line = clock()
        self.last_line_done: int | None = None
        # Ray's tqdm: a plain tqdm bar in a Ray worker reaches the driver as garbled log lines.
        self.bar = ray_tqdm(total=total, desc=label) if terminal else None
        if self.bar is not None:
            self.bar.update(initial)

    def update(self, count: int = 1) -> None:
        self.set(self.done + count)

    def set(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.done)
        self.done = done
        if self.bar is None and self.clock() - self.last_line >= self.interval_s:
            self._print_line()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.last_line_done != self.done:  # where it ended, unless the last line said so
            self._print_line()

    def line(self) -> str:
        elapsed = self.clock() - self.started
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
        left = tqdm.format_interval((self.total - self.done) / rate) if rate > 0 else "?"
        percent = 100 * self.done / self.total if self.total else 100.0
        return (
            f"{self.label}: {self.done:,}/{self.total:,} {self.unit} ({percent:.0f}%), "
            f"{rate:.3g} {self.unit}/s, {left} left"
        )

    def _print_line(self) -> None:
        self.last_line, self.last_line_done = self.clock(), self.done
        print(self.line(), file=self.stream or sys.__stdout__, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


@contextmanager
def progress_of(progress: Progress, count: Callable[[], int]) -> Iterator[Progress]:
    """Close ``progress`` on exit, feeding it ``count()`` every ``progress.interval_s`` meanwhile,
    from a thread: for work that runs in other processes (Ray Data actors) while this one waits."""
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(progress.interval_s):
            progress.set(count())

    thread = threading.Thread(target=poll, name=f"progress {progress.label}", daemon=True)
    thread.start()
    try:
        yield progress
    finally:
        stop.set()
        thread.join()
    progress.set(count())  # after a failure, no final line: the error is the news
    progress.close()


@ray.remote(num_cpus=0)
class RowCounter:
    """Rows that Ray Data actors have finished. The driver cannot count them as they come back: a
    map task holds its outputs until a whole block is full, often the whole split."""

    def __init__(self):
        self.rows = 0

    def add(self, rows: int) -> None:
        self.rows += rows

    def count(self) -> int:
        return self.rows


@contextmanager
def actor_progress(label: str, total: int, unit: str = "rows") -> Iterator[ray.actor.ActorHandle | None]:
    """Progress lines of the ``total`` rows a pool of Ray Data actors works through: yields a
    RowCounter for the actors to ``add.remote(rows)`` to, which the driver polls. On a terminal,
    where Ray Data draws its own bars, it yields None and prints nothing."""
    if progress_bars_wanted():
        yield None
        return
    counter = RowCounter.remote()
    with progress_of(Progress(label, total, terminal=False, unit=unit), lambda: ray.get(counter.count.remote())):
        yield counter
