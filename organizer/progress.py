"""Progress for `organizer scan`: a rich progress bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator

from .pipeline import Progress

log = logging.getLogger(__name__)


@contextlib.contextmanager
def progress_reporter(label: str) -> Iterator[Progress]:
    if sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TimeRemainingColumn

        with Bar("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                 TimeRemainingColumn(), transient=False) as bar:
            task = bar.add_task(label, total=None)

            def update(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            yield update
        return

    last = [0.0]

    def log_update(done: int, total: int) -> None:
        now = time.monotonic()
        if done in (0, total) or now - last[0] >= 5:
            last[0] = now
            log.info("%s: %d/%d photos", label.lower(), done, total)

    yield log_update
