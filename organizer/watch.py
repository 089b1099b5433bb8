"""Watch: notice new, changed, moved and deleted photos, and wait until new files settle.

The watchdog handler only puts paths on a queue; everything else happens in the service's own
thread. :class:`Settler` holds a path back until its size and mtime have not changed for the
settle time, so photos still being copied are not read half-written.
"""

from __future__ import annotations

import logging
import os
import queue
import time
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

log = logging.getLogger(__name__)


class _Enqueue(FileSystemEventHandler):
    """Puts every touched path (both ends of a move) on the queue. Nothing else."""

    def __init__(self, q: "queue.Queue[str]"):
        self.q = q

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        if event.is_directory and event.event_type == "modified":
            # watchdog adds one for the parent folder of every created/deleted file; queued, it
            # made the service walk that whole folder (recursively) again for each new photo
            return
        self.q.put(os.fsdecode(event.src_path))
        dest = getattr(event, "dest_path", "")
        if dest:
            self.q.put(os.fsdecode(dest))


class _OverflowFlag(logging.Handler):
    """watchdog only logs an inotify queue overflow (events were lost); notice it."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.hit = False

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self.hit = True
        # with a handler attached, Python no longer prints watchdog's warnings itself: pass them on
        log.log(record.levelno, "watchdog: %s", record.getMessage())


class Watcher:
    """A watchdog observer on one folder (recursive); ``polling=True`` for network shares."""

    def __init__(self, folder: Path, polling: bool = False, poll_interval: float = 2.0):
        self.queue: "queue.Queue[str]" = queue.Queue()
        self.observer = PollingObserver(timeout=poll_interval) if polling else Observer()
        self.observer.schedule(_Enqueue(self.queue), str(folder), recursive=True)
        self._overflow = _OverflowFlag()

    def start(self) -> None:
        """Raises OSError when the folder is missing (it may vanish right before)."""
        logging.getLogger("watchdog").addHandler(self._overflow)
        try:
            self.observer.start()
        except OSError:
            self.stop()
            raise

    def stop(self) -> None:
        """Safe to call on a watcher that never started, or failed to."""
        logging.getLogger("watchdog").removeHandler(self._overflow)
        self.observer.stop()
        if self.observer.ident is not None:  # a thread never started cannot be joined
            self.observer.join(timeout=10)

    def overflowed(self) -> bool:
        """True once after the kernel dropped events (the caller should rescan)."""
        hit, self._overflow.hit = self._overflow.hit, False
        return hit

    def drain(self) -> set[str]:
        paths = set()
        while True:
            try:
                paths.add(self.queue.get_nowait())
            except queue.Empty:
                return paths

    @property
    def alive(self) -> bool:
        """False when the observer or its emitter stopped: watchdog's emitter ends quietly when the
        watched folder itself is deleted or replaced, and then no event ever arrives again."""
        return self.observer.is_alive() and all(e.is_alive() for e in self.observer.emitters)


@dataclass
class _Pending:
    size: int
    mtime: float
    since: float  # when this (size, mtime) was first seen
    wait: float | None = None  # how long it must stay unchanged, if longer than the settle time


class Settler:
    """Tracks paths until they are stable (unchanged for ``seconds``) or gone."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.pending: dict[str, _Pending] = {}

    def add(self, path: str, now: float | None = None, wait: float | None = None,
            seen: tuple[int, float] | None = None) -> None:
        """Track ``path``. ``wait`` with ``seen`` (its size and mtime when it was read): a file that
        read as incomplete (a copy that paused) is held until it changes -- then the settle time
        applies again -- or stays unchanged for ``wait`` seconds."""
        now = time.monotonic() if now is None else now
        try:
            st = os.stat(path)
            sig = (st.st_size, st.st_mtime)
        except OSError:
            sig = (-1, -1.0)
        if wait is not None and seen is not None and seen != sig:
            wait = None  # it changed since it was read: the copy went on
        p = self.pending.get(path)
        if p is None or (p.size, p.mtime) != sig or wait is not None:
            self.pending[path] = _Pending(sig[0], sig[1], now, wait)

    def ready(self, now: float | None = None) -> tuple[list[str], list[str]]:
        """(settled existing files, paths that no longer exist); both leave the settler."""
        now = time.monotonic() if now is None else now
        settled, gone = [], []
        for path, p in list(self.pending.items()):
            if not os.path.lexists(path):
                gone.append(path)
                del self.pending[path]
                continue
            try:
                st = os.stat(path)
                sig = (st.st_size, st.st_mtime)
            except OSError:
                sig = (-2, -2.0)  # unreadable (e.g. a dangling symlink): settle, then report
            if sig != (p.size, p.mtime):
                self.pending[path] = _Pending(sig[0], sig[1], now)
            elif now - p.since >= (self.seconds if p.wait is None else max(p.wait, self.seconds)):
                settled.append(path)
                del self.pending[path]
        return sorted(settled), sorted(gone)

    def __len__(self) -> int:
        return len(self.pending)
