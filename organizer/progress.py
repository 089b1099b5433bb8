"""Progress for `organizer scan`: a rich progress bar (photos, photos/s, ETA) on a terminal, plain
log lines with the same figures otherwise (systemd's journal, a pipe, a CI log)."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator

from .pipeline import Progress

log = logging.getLogger(__name__)


def _rate_column():
    from rich.progress import ProgressColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        """Photos per second (rich's own speed column counts bytes)."""

        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text("-- photos/s" if speed is None else f"{speed:.1f} photos/s", style="progress.data.speed")

    return RateColumn()


@contextlib.contextmanager
def progress_reporter(label: str) -> Iterator[Progress]:
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TimeElapsedColumn, TimeRemainingColumn

        with Bar("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), _rate_column(),
                 TimeElapsedColumn(), "ETA", TimeRemainingColumn(), console=Console(stderr=True),
                 transient=False) as bar:
            task = bar.add_task(label, total=None)

            def update(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            yield update
        return

    start = [time.monotonic()]
    last = [0.0]

    def log_update(done: int, total: int) -> None:
        now = time.monotonic()
        if done == 0:
            start[0] = now
        if done in (0, total) or now - last[0] >= 5:
            last[0] = now
            elapsed = now - start[0]
            rate = done / elapsed if elapsed > 0 and done else 0.0
            eta = f", ETA {_clock((total - done) / rate)}" if rate and done < total else ""
            log.info("%s: %d/%d photos, %.1f photos/s%s", label.lower(), done, total, rate, eta)

    yield log_update


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds + 0.5), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"
