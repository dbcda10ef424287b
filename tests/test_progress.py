"""flexkd.progress: off a terminal, every long stage prints a progress line at least every
PROGRESS_INTERVAL_S (rows done, rate, time left); on one, a bar and no lines."""

import io
import threading
import time

import numpy as np

from flexkd.progress import PROGRESS_INTERVAL_S, Progress, progress_of
from flexkd.stages.score import _lockstep


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_line_once_the_interval_has_passed_with_rows_rate_and_time_left():
    assert PROGRESS_INTERVAL_S <= 20  # with updates every 10 s at most, a line at least every 30 s
    clock, out = FakeClock(), io.StringIO()
    progress = Progress("targets train", 1000, terminal=False, interval_s=30, clock=clock, stream=out)
    clock.now += 29
    progress.update(290)
    assert out.getvalue() == ""  # not yet
    clock.now += 1
    progress.update(10)
    assert out.getvalue() == "targets train: 300/1,000 rows (30%), 10 rows/s, 01:10 left\n"
    clock.now += 10
    progress.update(100)
    assert out.getvalue().count("\n") == 1  # 10 s after the last line
    clock.now += 20
    progress.update(200)
    assert out.getvalue().splitlines()[-1] == "targets train: 600/1,000 rows (60%), 10 rows/s, 00:40 left"
    clock.now += 40
    progress.set(1000)
    progress.close()  # closing says where it ended
    assert out.getvalue().splitlines()[-1] == "targets train: 1,000/1,000 rows (100%), 10 rows/s, 00:00 left"
    lines = out.getvalue().count("\n")
    progress.close()  # not twice
    assert out.getvalue().count("\n") == lines


def test_a_resumed_run_counts_its_rate_from_where_it_started():
    clock, out = FakeClock(), io.StringIO()
    with Progress(
        "distill", 500, terminal=False, unit="steps", initial=400, interval_s=60, clock=clock, stream=out
    ) as progress:
        clock.now += 50
        progress.update(50)
    assert out.getvalue() == "distill: 450/500 steps (90%), 1 steps/s, 00:50 left\n"


def test_a_terminal_gets_a_bar_and_no_lines():
    clock, out = FakeClock(), io.StringIO()
    with Progress("score", 100, terminal=True, interval_s=1, clock=clock, stream=out) as progress:
        for _ in range(10):
            clock.now += 5
            progress.update(10)
    assert out.getvalue() == ""


def test_progress_of_work_elsewhere_polls_the_count_while_waiting():
    """The targets stage waits on Ray Data; a thread reads the writers' count and prints lines."""
    out, rows = io.StringIO(), [0]
    finished = threading.Event()

    def count() -> int:
        rows[0] += 10
        if rows[0] >= 30:
            finished.set()
        return rows[0]

    progress = Progress("targets train", 1000, terminal=False, interval_s=0.01, stream=out)
    with progress_of(progress, count):
        assert finished.wait(10)
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3 and all(line.startswith("targets train: ") for line in lines)
    assert lines[-1].startswith(f"targets train: {rows[0]}/1,000 rows")  # the final count, on exit


def test_score_counts_the_rows_of_each_step():
    batches = [{"input_ids": np.zeros((n, 4))} for n in (8, 8, 3)]
    assert [rows for _, rows in _lockstep(batches)] == [8, 8, 3]


def test_no_final_line_after_a_failure():
    out = io.StringIO()
    progress = Progress("targets train", 10, terminal=False, interval_s=60, stream=out)
    try:
        with progress_of(progress, lambda: 5):
            raise RuntimeError("a writer failed")
    except RuntimeError:
        pass
    time.sleep(0.01)
    assert out.getvalue() == ""


def test_actors_count_their_rows_for_the_drivers_lines(local_ray, capfd, monkeypatch):
    """Ray Data hands a map task's outputs back only once a block is full, so the generate and
    targets actors add to a RowCounter, and the driver prints lines from it while it waits."""
    import ray

    from flexkd import progress

    monkeypatch.setattr(progress, "progress_bars_wanted", lambda: False)

    @ray.remote
    def answer(counter, rows: int) -> None:
        ray.get(counter.add.remote(rows))

    with progress.actor_progress("generate", 10, unit="prompts") as counter:
        ray.get([answer.remote(counter, 4), answer.remote(counter, 6)])
    assert capfd.readouterr().out.splitlines()[-1].startswith("generate: 10/10 prompts (100%)")
    monkeypatch.setattr(progress, "progress_bars_wanted", lambda: True)
    with progress.actor_progress("generate", 10) as counter:
        assert counter is None  # on a terminal Ray Data draws its bars
